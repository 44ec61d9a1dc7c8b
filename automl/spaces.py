"""The space file: schema, validation, and ``suggest(trial) -> TrialConfig``.

No torch, sklearn or pandas here: ``automl space check`` must start fast.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from automl.errors import SpaceError

# --------------------------------------------------------------------------- vocabulary

BUNDLED_DATASETS: dict[str, Literal["classification", "regression"]] = {
    "digits": "classification",
    "iris": "classification",
    "wine": "classification",
    "breast_cancer": "classification",
    "diabetes": "regression",
}

BUNDLED_N_CLASSES: dict[str, int] = {"digits": 10, "iris": 3, "wine": 3, "breast_cancer": 2}

# Each optimizer's own hyperparameters (torch names, except beta1/beta2 for ``betas``).
OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "weight_decay", "momentum", "dampening", "nesterov"),
    "adam": ("lr", "weight_decay", "beta1", "beta2", "eps", "amsgrad"),
    "adamw": ("lr", "weight_decay", "beta1", "beta2", "eps", "amsgrad"),
    "rmsprop": ("lr", "weight_decay", "alpha", "momentum", "centered", "eps"),
    "adagrad": ("lr", "weight_decay", "lr_decay", "eps"),
    "adadelta": ("lr", "weight_decay", "rho", "eps"),
    "adabound": ("lr", "weight_decay", "beta1", "beta2", "eps", "final_lr", "gamma"),
}
DEFAULT_LR: dict[str, float] = {
    "sgd": 1e-2,
    "adam": 1e-3,
    "adamw": 1e-3,
    "rmsprop": 1e-3,
    "adagrad": 1e-2,
    "adadelta": 1.0,
    "adabound": 1e-3,
}

LOSS_PARAMS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("label_smoothing",),
    "nll": (),
    "mse": (),
    "huber": ("delta",),
    "l1": (),
    "smooth_l1": ("beta",),
    "bce": (),
}
CLASSIFICATION_LOSSES = frozenset(LOSS_PARAMS)
REGRESSION_LOSSES = frozenset({"mse", "huber", "l1", "smooth_l1"})
# The loss of a space file that names none, by task.
DEFAULT_LOSSES = {"classification": "cross_entropy", "regression": "mse"}

ACTIVATIONS = ("relu", "tanh", "gelu", "silu", "leaky_relu", "elu")
LR_SCHEDULES = ("none", "step", "exponential", "inverse_time", "cosine", "plateau")
MODELS = ("mlp", "cnn")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "nsga2", "grid")
PRUNERS = ("median", "percentile", "halving", "hyperband", "threshold", "wilcoxon", "none")
# The options a space file may give each sampler and pruner: Optuna's keyword arguments
# that take plain values (the seed comes from study.seed; callables cannot be written).
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "tpe": (
        "consider_prior", "prior_weight", "consider_magic_clip", "consider_endpoints",
        "n_startup_trials", "n_ei_candidates", "multivariate", "group",
        "warn_independent_sampling", "constant_liar",
    ),
    "random": (),
    "cmaes": (
        "x0", "sigma0", "n_startup_trials", "warn_independent_sampling",
        "consider_pruned_trials", "popsize", "use_separable_cma", "with_margin", "lr_adapt",
    ),
    "gp": ("n_startup_trials", "deterministic_objective", "warn_independent_sampling"),
    "qmc": ("qmc_type", "scramble", "warn_asynchronous_seeding", "warn_independent_sampling"),
    "nsga2": ("population_size", "mutation_prob", "crossover_prob", "swapping_prob"),
    "grid": (),
}  # fmt: skip
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "percentile": (
        "percentile", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials",
    ),
    "halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
    "threshold": ("lower", "upper", "n_warmup_steps", "interval_steps"),
    "wilcoxon": ("p_threshold", "n_startup_steps"),
    "none": (),
}  # fmt: skip

# metric -> (direction, task it needs or None for any)
METRICS: dict[str, tuple[Literal["minimize", "maximize"], str | None]] = {
    "val_loss": ("minimize", None),
    "val_accuracy": ("maximize", "classification"),
    "val_balanced_accuracy": ("maximize", "classification"),
    "val_f1": ("maximize", "classification"),
    "val_rmse": ("minimize", "regression"),
    "val_mae": ("minimize", "regression"),
    "val_r2": ("maximize", "regression"),
    "n_params": ("minimize", None),
    "train_seconds": ("minimize", None),
}


@dataclass(frozen=True)
class Rule:
    """What values a vocabulary name accepts."""

    kind: Literal["int", "float", "bool", "choice"]
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    low_open: bool = False  # lower bound exclusive
    high_open: bool = False  # upper bound exclusive
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} in {lo}{low}, {high}{hi}"

    def check(self, value: Any) -> str | None:
        """Return why ``value`` breaks the rule, or None."""
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                return f"must be {self.describe()}{_did_you_mean(value, self.choices)}"
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}"
        if self.kind == "int" and not float(value).is_integer():
            return f"must be {self.describe()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {self.describe()}"
        return None


_POS_INT = Rule("int", low=1)
_POS_FLOAT = Rule("float", low=0, low_open=True)
_NONNEG_FLOAT = Rule("float", low=0)
_UNIT = Rule("float", low=0, high=1, high_open=True)
_OPEN_UNIT = Rule("float", low=0, high=1, low_open=True, high_open=True)
_BOOL = Rule("bool")

# Optimizer hyperparameters, as they may appear inside an optimizer's own mapping.
OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": _POS_FLOAT,
    "weight_decay": _NONNEG_FLOAT,
    "momentum": Rule("float", low=0, high=1, high_open=True),
    "dampening": Rule("float", low=0, high=1),
    "nesterov": _BOOL,
    "beta1": Rule("float", low=0, high=1, high_open=True),
    "beta2": Rule("float", low=0, high=1, high_open=True),
    "eps": _POS_FLOAT,
    "amsgrad": _BOOL,
    "alpha": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "centered": _BOOL,
    "lr_decay": _NONNEG_FLOAT,
    "rho": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "final_lr": _POS_FLOAT,
    "gamma": _OPEN_UNIT,
}
LOSS_RULES: dict[str, Rule] = {
    "label_smoothing": _UNIT,
    "delta": _POS_FLOAT,
    "beta": _POS_FLOAT,
}
# Names allowed at the top level of ``space`` (optimizer and loss handled separately).
# Optimizer hyperparameters given at the top level apply to every chosen optimizer that
# takes them; ``lr_decay`` at the top level is the inverse_time schedule's, not adagrad's.
PARAM_RULES: dict[str, Rule] = {
    "batch_size": _POS_INT,
    "epochs": _POS_INT,
    "hidden_units": _POS_INT,
    "n_layers": _POS_INT,
    "activation": Rule("choice", choices=ACTIVATIONS),
    "dropout": _UNIT,
    "batch_norm": _BOOL,
    "l1": _NONNEG_FLOAT,
    "lr_schedule": Rule("choice", choices=LR_SCHEDULES),
    "lr_step": _POS_INT,
    "lr_gamma": Rule("float", low=0, high=1, low_open=True),
    "lr_decay": _NONNEG_FLOAT,
    "noise_std": _NONNEG_FLOAT,
    "mixup_alpha": _NONNEG_FLOAT,
    "channels": _POS_INT,
    "kernel_size": _POS_INT,
    **{k: v for k, v in OPTIMIZER_RULES.items() if k != "lr_decay"},
}
SPACE_NAMES = ("optimizer", "loss", *PARAM_RULES)

# When a name is only meaningful under a condition (shown by ``space show``).
CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lr_step": ("lr_schedule", ("step",)),
    "lr_gamma": ("lr_schedule", ("step", "exponential", "plateau")),
    "lr_decay": ("lr_schedule", ("inverse_time",)),
    "channels": ("model", ("cnn",)),
    "kernel_size": ("model", ("cnn",)),
}

DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "hidden_units": 128,
    "n_layers": 2,
    "activation": "relu",
    "dropout": 0.0,
    "batch_norm": False,
    "l1": 0.0,
    "lr_schedule": "none",
    "lr_step": 10,
    "lr_gamma": 0.5,
    "lr_decay": 0.1,
    "noise_std": 0.0,
    "mixup_alpha": 0.0,
    "channels": 16,
    "kernel_size": 3,
}


def _did_you_mean(value: Any, known: Iterable[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Fixed:
    value: Any

    def describe(self) -> str:
        return f"fixed {self.value!r}"


@dataclass(frozen=True)
class Categorical:
    choices: tuple[Any, ...]

    def describe(self) -> str:
        return "choice of " + ", ".join(repr(c) for c in self.choices)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    kind: Literal["int", "float"]
    log: bool = False
    step: float | None = None

    def describe(self) -> str:
        mods = (", log" if self.log else "") + (f", step {self.step:g}" if self.step else "")
        return f"{self.kind} {self.low:g}..{self.high:g}{mods}"


Distribution = Fixed | Categorical | Range


@dataclass(frozen=True)
class Choice:
    """A conditional choice (optimizer or loss): each option has its own parameters."""

    options: dict[str, dict[str, Distribution]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.options)


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataSpec(_Section):
    dataset: str | None = None
    path: str | None = None
    target: str | None = None
    drop: tuple[str, ...] = ()
    header: bool = True  # False: a CSV whose first row is data; its columns are x0, x1, ...
    task: Literal["auto", "classification", "regression"] = "auto"
    validation: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1)

    @field_validator("path")
    @classmethod
    def _home(cls, path: str | None) -> str | None:
        """``~/data.csv`` is the user's home, as in a shell."""
        return str(Path(path).expanduser()) if path is not None and path.startswith("~") else path

    @field_validator("drop", mode="before")
    @classmethod
    def _one_name(cls, drop: Any) -> Any:
        """``drop: id`` is one column, as ``drop: [id]``."""
        return (drop,) if isinstance(drop, str) else drop

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.dataset is None and self.path is None:
            raise ValueError("give either 'dataset' (a bundled one) or 'path' (a data file)")
        if self.dataset is not None and self.path is not None:
            raise ValueError("give 'dataset' or 'path', not both")
        if self.dataset is not None and self.dataset not in BUNDLED_DATASETS:
            raise ValueError(
                f"unknown dataset '{self.dataset}', expected one of "
                f"{', '.join(BUNDLED_DATASETS)}{_did_you_mean(self.dataset, BUNDLED_DATASETS)}"
            )
        if self.dataset is not None and not self.header:
            raise ValueError(
                f"'header' says whether a CSV file's first row names its columns; the "
                f"bundled dataset '{self.dataset}' has its names: remove 'header'"
            )
        if self.dataset is not None and self.target is not None:
            raise ValueError(
                f"'target' names the column to predict in a data file ('path'); the bundled "
                f"dataset '{self.dataset}' has its own target: remove 'target'"
            )
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test must be < 1, got {self.validation} + {self.test}")
        return self

    @property
    def known_task(self) -> Literal["classification", "regression"] | None:
        """The task when it is known without reading any data."""
        if self.task != "auto":
            return self.task
        if self.dataset is not None:
            return BUNDLED_DATASETS[self.dataset]
        return None


class TrainSpec(_Section):
    epochs: int = Field(20, gt=0)
    patience: int = Field(5, ge=0)


class NamedOptions(_Section):
    """A sampler or pruner: a name and its keyword options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StudySpec(_Section):
    sampler: NamedOptions = NamedOptions(name="tpe")
    pruner: NamedOptions = NamedOptions(name="median")
    seed: int | None = Field(None, ge=0, lt=2**32)  # what numpy's generators accept

    @model_validator(mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            value = dict(value)
            for key in ("sampler", "pruner"):
                if isinstance(value.get(key), str):
                    value[key] = {"name": value[key]}
        return value

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if self.sampler.name not in SAMPLERS:
            raise ValueError(
                f"unknown sampler '{self.sampler.name}', expected one of "
                f"{', '.join(SAMPLERS)}{_did_you_mean(self.sampler.name, SAMPLERS)}"
            )
        if self.pruner.name not in PRUNERS:
            raise ValueError(
                f"unknown pruner '{self.pruner.name}', expected one of "
                f"{', '.join(PRUNERS)}{_did_you_mean(self.pruner.name, PRUNERS)}"
            )
        for kind, spec, table in (
            ("sampler", self.sampler, SAMPLER_OPTIONS),
            ("pruner", self.pruner, PRUNER_OPTIONS),
        ):
            known = table[spec.name]
            for option in spec.options:
                if option not in known:
                    takes = ", ".join(known) or "no options"
                    raise ValueError(
                        f"{kind} '{spec.name}' has no option '{option}'; it takes "
                        f"{takes}{_did_you_mean(option, known)}"
                    )
        if self.pruner.name == "threshold" and not {"lower", "upper"} & set(self.pruner.options):
            raise ValueError("pruner 'threshold' needs 'lower' or 'upper' (or both)")
        return self


# --------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Space:
    """A validated space file."""

    name: str | None
    data: DataSpec
    model: Literal["mlp", "cnn"]
    train: TrainSpec
    objectives: tuple[str, ...]
    study: StudySpec
    optimizer: Choice
    loss: Choice
    params: dict[str, Distribution]
    source: str = ""  # the YAML text it was loaded from (or made into)
    path: str | None = None
    loss_given: bool = True  # False: the file names no loss, the task's default applies

    @property
    def directions(self) -> list[str]:
        return [METRICS[m][0] for m in self.objectives]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def for_task(self, task: str) -> Space:
        """The space for data whose task is now known: without a loss in the file, the
        task's default loss (mse for regression, cross_entropy for classification). A
        data file's task is found only when it is read (task: auto)."""
        default = DEFAULT_LOSSES.get(task)
        if self.loss_given or default is None or self.loss.names == (default,):
            return self
        from dataclasses import replace

        return replace(self, loss=Choice({default: {}}))

    def to_dict(self) -> dict[str, Any]:
        """The space as a plain mapping in the file format (for storing and diffing)."""
        return _load_with_space_rules(self.source) if self.source else {}


@dataclass(frozen=True)
class TrialConfig:
    """Every resolved hyperparameter of one trial."""

    model: str = "mlp"
    optimizer: str = "adam"
    optimizer_params: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3})
    loss: str = "cross_entropy"
    loss_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    epochs: int = 20
    hidden_units: int = 128
    n_layers: int = 2
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False
    l1: float = 0.0
    lr_schedule: str = "none"
    lr_step: int = 10
    lr_gamma: float = 0.5
    lr_decay: float = 0.1
    noise_std: float = 0.0
    mixup_alpha: float = 0.0
    channels: int = 16
    kernel_size: int = 3
    seed: int = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer_params["lr"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --------------------------------------------------------------------------- parsing


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Errors:
    """Collects every problem in a file, each with its key path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        # Keys and values are the user's: a newline in one must not split the line.
        line = f"{self.file}: {where}: {message}"
        self.lines.append(_CONTROL.sub(lambda m: repr(m.group())[1:-1], line))

    def raise_if_any(self) -> None:
        if self.lines:
            extra = f" (and {len(self.lines) - 1} more)" if len(self.lines) > 1 else ""
            raise SpaceError(self.lines[0] + extra, errors=list(self.lines))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _got(why: str, value: Any) -> str:
    """``why, got VALUE`` with any "did you mean" hint kept at the end."""
    rule, hint, rest = why.partition("; did you mean")
    return f"{rule}, got {value!r}{hint}{rest}"


def _parse_distribution(value: Any, where: str, rule: Rule, errors: _Errors) -> Distribution:
    """Turn a list, a {low, high, ...} mapping or a plain value into a distribution."""
    if isinstance(value, list):
        if not value:
            errors.add(where, "an empty choice list; give at least one value")
            return Fixed(None)
        bad = [v for v in value if not _is_scalar(v)]
        if bad:
            errors.add(where, f"choices must be plain values, got {bad[0]!r}")
            return Fixed(None)
        for v in value:
            why = rule.check(v)
            if why:
                errors.add(where, _got(why, v))
                return Fixed(None)
        value = [_whole(v, rule) for v in value]
        if len(set(map(repr, value))) != len(value):
            errors.add(where, f"choices repeat a value, got {value!r}")
        return Categorical(tuple(value)) if len(value) > 1 else Fixed(value[0])
    if isinstance(value, Mapping):
        return _parse_range(value, where, rule, errors)
    if not _is_scalar(value) or value is None:
        errors.add(where, f"expected a value, a list or a {{low, high}} mapping, got {value!r}")
        return Fixed(None)
    why = rule.check(value)
    if why:
        errors.add(where, _got(why, value))
    return Fixed(_whole(value, rule))


def _whole(value: Any, rule: Rule) -> Any:
    """An integer name's whole-number float (``batch_size: 32.0``, ``1e2``) as the int
    it means (torch takes no float sizes); anything else as it is."""
    if rule.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _parse_range(value: Mapping[str, Any], where: str, rule: Rule, errors: _Errors) -> Distribution:
    allowed = ("low", "high", "log", "step", "type", "choices")
    for key in value:
        if key not in allowed:
            errors.add(
                f"{where}.{key}",
                f"unknown key, expected one of {', '.join(allowed)}{_did_you_mean(key, allowed)}",
            )
            return Fixed(None)
    kind = value.get("type")
    if kind is not None and kind not in ("float", "int", "categorical"):
        errors.add(f"{where}.type", f"must be float, int or categorical, got {kind!r}")
        return Fixed(None)
    if kind == "categorical" or "choices" in value:
        choices = value.get("choices")
        if not isinstance(choices, list):
            errors.add(where, "a categorical mapping needs 'choices: [...]'")
            return Fixed(None)
        return _parse_distribution(choices, where, rule, errors)
    if rule.kind in ("choice", "bool"):
        errors.add(where, f"must be {rule.describe()}, not a range; use a list of choices")
        return Fixed(None)
    if "low" not in value or "high" not in value:
        errors.add(where, "a range needs both 'low' and 'high'")
        return Fixed(None)
    low, high = value["low"], value["high"]
    for key, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            errors.add(f"{where}.{key}", f"must be a number, got {bound!r}")
            return Fixed(None)
        if not math.isfinite(bound):
            errors.add(f"{where}.{key}", f"must be finite, got {bound!r}")
            return Fixed(None)
    log = value.get("log", False)
    if not isinstance(log, bool):
        errors.add(f"{where}.log", f"must be true or false, got {log!r}")
        return Fixed(None)
    step = value.get("step")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
    ):
        errors.add(f"{where}.step", f"must be a positive number, got {step!r}")
        return Fixed(None)
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    if rule.kind == "int":
        kind = "int"
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        errors.add(where, f"an int range needs integer bounds, got low={low} high={high}")
        return Fixed(None)
    if low > high:
        errors.add(where, f"low must be <= high, got low={low} high={high}")
        return Fixed(None)
    if log and low <= 0:
        errors.add(where, f"log: true needs low > 0, got low={low}")
        return Fixed(None)
    if log and step is not None:
        errors.add(where, "log and step cannot be combined; drop one")
        return Fixed(None)
    for key, bound in (("low", low), ("high", high)):
        why = rule.check(int(bound) if kind == "int" else float(bound))
        if why:
            errors.add(f"{where}.{key}", _got(why, bound))
            return Fixed(None)
    if step is not None:
        # Optuna would move high to the last step below it, with a warning mid-run.
        steps = (high - low) / step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            last = low + math.floor(steps) * step
            errors.add(
                where,
                f"step {step:g} does not divide {low:g}..{high:g}; use high: {last:g} or "
                f"{last + step:g}",
            )
            return Fixed(None)
    if kind == "int":
        return Range(int(low), int(high), "int", log, int(step) if step else None)
    return Range(float(low), float(high), "float", log, float(step) if step else None)


def _parse_choice(
    value: Any,
    where: str,
    known: Mapping[str, tuple[str, ...]],
    rules: Mapping[str, Rule],
    what: str,
    errors: _Errors,
) -> Choice:
    """Parse a conditional choice: a name, a list of names, or name -> own parameters."""
    if isinstance(value, str):
        value = {value: {}}
    elif isinstance(value, list):
        if not value:
            errors.add(where, f"an empty choice list; give at least one {what}")
            return Choice({})
        if not all(isinstance(v, str) for v in value):
            errors.add(where, f"expected {what} names, got {value!r}")
            return Choice({})
        if len(set(value)) != len(value):
            errors.add(where, f"choices repeat a value, got {value!r}")
        value = {v: {} for v in value}
    elif not isinstance(value, Mapping):
        errors.add(where, f"expected a {what} name, a list, or a mapping, got {value!r}")
        return Choice({})
    if not value:
        errors.add(where, f"no {what} given")
        return Choice({})
    options: dict[str, dict[str, Distribution]] = {}
    for name, params in value.items():
        if name not in known:
            errors.add(
                f"{where}.{name}",
                f"unknown {what} '{name}', expected one of "
                f"{', '.join(known)}{_did_you_mean(name, list(known))}",
            )
            continue
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            errors.add(f"{where}.{name}", f"expected a mapping of parameters, got {params!r}")
            continue
        parsed: dict[str, Distribution] = {}
        for pname, pvalue in params.items():
            if pname not in known[name]:
                owners = [k for k, v in known.items() if pname in v]
                hint = (
                    f" ({pname} belongs to {', '.join(owners)})"
                    if owners
                    else _did_you_mean(pname, known[name])
                )
                takes = ", ".join(known[name]) or "no parameters"
                errors.add(
                    f"{where}.{name}.{pname}",
                    f"{what} '{name}' does not take '{pname}'; it takes {takes}{hint}",
                )
                continue
            parsed[pname] = _parse_distribution(
                pvalue, f"{where}.{name}.{pname}", rules[pname], errors
            )
        options[str(name)] = parsed
    return Choice(options)


def _pydantic_errors(exc: ValidationError, section: str, errors: _Errors) -> None:
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        if err["type"] == "extra_forbidden":
            field_names = _SECTION_FIELDS.get(section, ())
            key = str(err["loc"][-1])
            errors.add(
                loc,
                f"unknown key, expected one of {', '.join(field_names)}"
                f"{_did_you_mean(key, field_names)}",
            )
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        got = "" if isinstance(value, Mapping) or "got" in msg else f", got {value!r}"
        errors.add(loc, f"{msg}{got}")


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "data": DataSpec,
    "train": TrainSpec,
    "study": StudySpec,
}
_SECTION_FIELDS = {k: tuple(m.model_fields) for k, m in _SECTION_MODELS.items()}
SECTIONS = ("name", "data", "model", "train", "objective", "study", "space")


MAX_VALUES = 100_000  # a space file has dozens; more means YAML aliases gone wild
MAX_DEPTH = 32


def _shape_problem(raw: Any) -> str | None:
    """Refuse documents no space file needs before walking them: ones that refer to
    themselves through YAML aliases, nest absurdly deep, or expand (``&a [*a, *a]``
    "billion laughs") into more values than any message could show."""
    seen = 0
    stack: list[tuple[Any, int, tuple[int, ...]]] = [(raw, 0, ())]
    while stack:
        value, depth, parents = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"the file expands to more than {MAX_VALUES} values (YAML aliases?)"
        if depth > MAX_DEPTH:
            return f"the file nests more than {MAX_DEPTH} levels deep"
        if isinstance(value, Mapping):
            children: Iterable[Any] = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set)):
            children = value
        else:
            continue
        if id(value) in parents:
            return "the file refers to itself through a YAML alias"
        inner = (*parents, id(value))
        stack.extend((child, depth + 1, inner) for child in children)
    return None


def parse_stored_space(raw: Any, *, file: str, source: str | None = None) -> Space:
    """``parse_space`` for a space a study stored, perhaps from an earlier version: a
    ``data.target`` beside a bundled ``data.dataset`` (once accepted and ignored) is
    left out rather than refused, so such a study can still be shown and retrained."""
    if isinstance(raw, Mapping) and isinstance(raw.get("data"), Mapping):
        data = raw["data"]
        if data.get("dataset") is not None and "target" in data:
            raw = {**raw, "data": {k: v for k, v in data.items() if k != "target"}}
    return parse_space(raw, file=file, source=source)


def parse_space(raw: Any, *, file: str = "space", source: str | None = None) -> Space:
    """Validate a parsed YAML document; raise SpaceError listing every problem."""
    errors = _Errors(file)
    if raw is None:
        errors.add("(top)", "the file is empty; start from `automl space new FILE`")
        errors.raise_if_any()
    if not isinstance(raw, Mapping):
        errors.add(
            "(top)",
            f"expected a mapping of sections ({', '.join(SECTIONS)}), got a {type(raw).__name__}",
        )
        errors.raise_if_any()
    shape = _shape_problem(raw)
    if shape:
        errors.add("(top)", shape)
        errors.raise_if_any()
    for key in raw:
        if key not in SECTIONS:
            errors.add(
                str(key),
                f"unknown section, expected one of {', '.join(SECTIONS)}"
                f"{_did_you_mean(key, SECTIONS)}",
            )

    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        errors.add("name", f"must be a non-empty string, got {name!r}")
        name = None

    sections: dict[str, Any] = {}
    for section, model_cls in _SECTION_MODELS.items():
        value = raw.get(section) or {}
        if section == "data" and section not in raw:
            errors.add("data", "missing; say which data to train on, e.g. 'dataset: digits'")
            continue
        if not isinstance(value, Mapping):
            errors.add(section, f"expected a mapping, got {value!r}")
            continue
        try:
            sections[section] = model_cls.model_validate(dict(value))
        except ValidationError as exc:
            _pydantic_errors(exc, section, errors)
    data: DataSpec | None = sections.get("data")
    train: TrainSpec = sections.get("train", TrainSpec())
    study: StudySpec = sections.get("study", StudySpec())

    model = raw.get("model", "mlp")
    if model not in MODELS:
        errors.add(
            "model",
            f"must be one of {', '.join(MODELS)}, got {model!r}{_did_you_mean(model, MODELS)}",
        )
        model = "mlp"

    objective = raw.get("objective", "val_loss")
    objectives: tuple[str, ...] = ()
    if isinstance(objective, str):
        objectives = (objective,)
    elif isinstance(objective, list) and objective and all(isinstance(o, str) for o in objective):
        objectives = tuple(objective)
    else:
        errors.add("objective", f"expected a metric name or a list of them, got {objective!r}")
    for metric in objectives:
        if metric not in METRICS:
            errors.add(
                "objective",
                f"unknown metric '{metric}', expected one of "
                f"{', '.join(METRICS)}{_did_you_mean(metric, METRICS)}",
            )
    if len(set(objectives)) != len(objectives):
        errors.add("objective", f"a metric is listed twice, got {list(objectives)}")

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, Mapping):
        errors.add("space", f"expected a mapping of parameter names, got {space_raw!r}")
        space_raw = {}
    optimizer = _parse_choice(
        space_raw.get("optimizer", "adam"),
        "space.optimizer",
        OPTIMIZER_PARAMS,
        OPTIMIZER_RULES,
        "optimizer",
        errors,
    )
    loss_default = DEFAULT_LOSSES[
        data.known_task if data is not None and data.known_task else "classification"
    ]
    loss = _parse_choice(
        space_raw.get("loss", loss_default), "space.loss", LOSS_PARAMS, LOSS_RULES, "loss", errors
    )
    params: dict[str, Distribution] = {}
    for key, value in space_raw.items():
        if key in ("optimizer", "loss"):
            continue
        if key not in PARAM_RULES:
            hint = ""
            owners = [o for o, ps in OPTIMIZER_PARAMS.items() if key in ps]
            if owners:
                hint = f"; it is an optimizer parameter: put it under space.optimizer.{owners[0]}"
            suggestion = hint or _did_you_mean(key, SPACE_NAMES)
            known = "" if suggestion else f", expected one of {', '.join(SPACE_NAMES)}"
            errors.add(f"space.{key}", f"unknown name{known}{suggestion}")
            continue
        params[str(key)] = _parse_distribution(value, f"space.{key}", PARAM_RULES[key], errors)

    # Top-level optimizer hyperparameters must be taken by at least one chosen optimizer.
    for key in params:
        if key in OPTIMIZER_RULES and key != "lr_decay":
            takers = [o for o in optimizer.names if key in OPTIMIZER_PARAMS[o]]
            if optimizer.names and not takers:
                errors.add(
                    f"space.{key}",
                    f"no chosen optimizer ({', '.join(optimizer.names)}) takes '{key}'",
                )
            elif takers and all(key in optimizer.options[o] for o in takers):
                errors.add(
                    f"space.{key}",
                    f"unused: every optimizer that takes '{key}' ({', '.join(takers)}) sets its "
                    f"own under space.optimizer; give it in one place",
                )

    if data is not None:
        _check_task(data, loss, objectives, errors)
        if model == "cnn" and data.dataset is not None and data.dataset != "digits":
            errors.add(
                "model",
                f"cnn needs image-shaped input, but dataset '{data.dataset}' is tabular; "
                "use model: mlp, or digits / an NPZ whose X is NxHxW or NxCxHxW",
            )
        if model == "cnn" and data.path is not None and not data.path.endswith(".npz"):
            errors.add(
                "model",
                f"cnn needs image-shaped input, but {data.path} is a table; "
                "use model: mlp, or an NPZ whose X is NxHxW or NxCxHxW",
            )
    if model != "cnn":
        for key in ("channels", "kernel_size"):
            if key in params and not isinstance(params[key], Fixed):
                errors.add(f"space.{key}", "only applies to model: cnn")

    if study.sampler.name == "grid":
        for pname, dist in _all_distributions(optimizer, loss, params).items():
            if isinstance(dist, Range) and dist.kind == "float" and dist.step is None:
                errors.add(
                    f"space.{pname}",
                    "the grid sampler needs categorical or stepped parameters; "
                    "add 'step' or use a list",
                )
    if study.sampler.name == "cmaes" and len(objectives) > 1:
        errors.add(
            "study.sampler",
            "cmaes optimizes one objective; with several use nsga2, tpe, gp, qmc or random",
        )

    errors.raise_if_any()
    assert data is not None
    return Space(
        name=name,
        data=data,
        model=model,
        train=train,
        objectives=objectives,
        study=study,
        optimizer=optimizer,
        loss=loss,
        params=params,
        source=source if source is not None else yaml.safe_dump(dict(raw), sort_keys=False),
        path=None,
        loss_given="loss" in space_raw,
    )


def _check_task(data: DataSpec, loss: Choice, objectives: Sequence[str], errors: _Errors) -> None:
    task = data.known_task
    if task is None:
        return
    n_classes = BUNDLED_N_CLASSES.get(data.dataset or "") if task == "classification" else None
    check_task_fit(task, loss.names, objectives, errors, n_classes=n_classes)


def check_task_fit(
    task: str,
    losses: Sequence[str],
    objectives: Sequence[str],
    errors: _Errors | None = None,
    n_classes: int | None = None,
) -> None:
    """Check losses and metrics fit the task; raise SpaceError (or add to ``errors``)."""
    own = errors if errors is not None else _Errors("space")
    allowed = REGRESSION_LOSSES if task == "regression" else CLASSIFICATION_LOSSES
    for name in losses:
        if name not in allowed:
            own.add(
                "space.loss",
                f"'{name}' does not fit a {task} task; use one of {', '.join(sorted(allowed))}",
            )
        if name == "bce" and n_classes is not None and n_classes != 2:
            own.add("space.loss", f"'bce' needs exactly 2 classes, the data has {n_classes}")
    for metric in objectives:
        need = METRICS.get(metric, ("", None))[1]
        if need is not None and need != task:
            fits = [m for m, (_, t) in METRICS.items() if t in (task, None)]
            own.add(
                "objective",
                f"'{metric}' is a {need} metric but the task is {task}; use one of "
                f"{', '.join(fits)}",
            )
    if errors is None:
        own.raise_if_any()


def _all_distributions(
    optimizer: Choice, loss: Choice, params: Mapping[str, Distribution]
) -> dict[str, Distribution]:
    """Every searched name as Optuna will see it."""
    out: dict[str, Distribution] = {}
    if len(optimizer.names) > 1:
        out["optimizer"] = Categorical(optimizer.names)
    for opt, own in optimizer.options.items():
        for p, d in own.items():
            out[f"{opt}_{p}"] = d
    if len(loss.names) > 1:
        out["loss"] = Categorical(loss.names)
    for name, own in loss.options.items():
        for p, d in own.items():
            out[f"{name}_{p}"] = d
    out.update(params)
    return out


class _SpaceLoader(yaml.SafeLoader):
    """YAML's safe loader, with two rules a space file's author expects: a key given
    twice in one mapping is an error (YAML keeps the last one silently; a key merged in
    with ``<<: *anchor`` may be overridden), and 1e-5 is a number (YAML 1.1 reads
    exponents without a dot, 1e-5 but not 1.0e-5, as text)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged below; its keys may be overridden here
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"'{key}' is given twice in one mapping; keep one",
                    key_node.start_mark,
                )
            seen.add(key) if isinstance(key, str | int | float | bool) else None
        return super().construct_mapping(node, deep=deep)


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_with_space_rules(text: str) -> Any:
    """One YAML document through _SpaceLoader (a SafeLoader), as yaml.safe_load reads."""
    loader = _SpaceLoader(text)
    try:
        return loader.get_single_data()  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def load_yaml(text: str, *, file: str) -> Any:
    """Parse YAML safely: tags such as !!python/object never construct anything."""
    try:
        return _load_with_space_rules(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if ("\t" in text and "tab" in str(exc).lower()) or (
            "\t" in text and "found character" in str(exc)
        ):
            problem = "tabs are not allowed in YAML indentation; indent with spaces"
        raise SpaceError(f"{file}: {where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise SpaceError(f"{file}: invalid YAML: nested too deeply") from None
    except Exception as exc:
        # safe_load still builds dates and !!int / !!float / !!timestamp values, and some
        # bad ones (2024-13-01, !!timestamp x) fail with ValueError or even AttributeError.
        first = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise SpaceError(
            f"{file}: invalid YAML: a value cannot be read ({first}); quote it to keep it text"
        ) from None


def load_space(path: str | Path) -> Space:
    """Read and validate a space file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"{p}: no such file; create one with `automl space new {p}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{p}: cannot read the space file: {exc}") from None
    raw = load_yaml(text, file=str(p))
    space = parse_space(raw, file=str(p), source=text)
    return _with_path(space, str(p))


def _with_path(space: Space, path: str) -> Space:
    from dataclasses import replace

    data = space.data
    if data.path is not None and not Path(data.path).is_absolute():
        # A data path in a space file is relative to the file, then to the working dir.
        beside = Path(path).parent / data.path
        if beside.exists() and not Path(data.path).exists():
            data = data.model_copy(update={"path": str(beside)})
    return replace(space, path=path, data=data)


def study_name_for(space: Space, override: str | None = None) -> str:
    """``--study``, else ``name:`` in the file, else the file's stem."""
    if override is not None:
        if not override.strip() or override != override.strip():
            raise SpaceError(
                f"--study {override!r}: a study name needs characters other than spaces, "
                "and none at its ends"
            )
        return override
    if space.name:
        return space.name
    if space.path:
        return Path(space.path).stem
    return "automl"


# --------------------------------------------------------------------------- suggest


def _suggest(trial: Any, name: str, dist: Distribution) -> Any:
    if isinstance(dist, Fixed):
        return dist.value
    if isinstance(dist, Categorical):
        return trial.suggest_categorical(name, list(dist.choices))
    if dist.kind == "int":
        return trial.suggest_int(
            name, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log
        )
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def suggest(trial: Any, space: Space, *, seed: int = 0) -> TrialConfig:
    """Sample one configuration from ``space`` through an Optuna trial (or FixedTrial).

    Names seen by Optuna: ``optimizer`` and ``loss`` when there is a choice, an optimizer's
    own parameters as ``{optimizer}_{param}`` (e.g. ``sgd_momentum``), a loss's own as
    ``{loss}_{param}``, and every other name as itself.
    """
    opts = space.optimizer.names
    opt = trial.suggest_categorical("optimizer", list(opts)) if len(opts) > 1 else opts[0]
    own = space.optimizer.options[opt]
    opt_params: dict[str, Any] = {}
    for p in OPTIMIZER_PARAMS[opt]:
        if p in own:
            opt_params[p] = _suggest(trial, f"{opt}_{p}", own[p])
        elif p in space.params and p != "lr_decay":
            opt_params[p] = _suggest(trial, p, space.params[p])
    opt_params.setdefault("lr", DEFAULT_LR[opt])

    losses = space.loss.names
    loss = trial.suggest_categorical("loss", list(losses)) if len(losses) > 1 else losses[0]
    loss_params = {
        p: _suggest(trial, f"{loss}_{p}", d) for p, d in space.loss.options[loss].items()
    }

    values: dict[str, Any] = {"epochs": space.train.epochs}
    for key in ("epochs", "batch_size", "hidden_units", "n_layers", "activation", "dropout"):
        if key in space.params:
            values[key] = _suggest(trial, key, space.params[key])
    for key in ("batch_norm", "l1", "noise_std", "mixup_alpha", "lr_schedule"):
        if key in space.params:
            values[key] = _suggest(trial, key, space.params[key])
    schedule = values.get("lr_schedule", "none")
    for key, (cond, when) in CONDITIONS.items():
        if key not in space.params:
            continue
        current = space.model if cond == "model" else schedule
        if current in when:
            values[key] = _suggest(trial, key, space.params[key])
    fields = {k: v for k, v in values.items() if k in TrialConfig.__dataclass_fields__}
    return TrialConfig(
        model=space.model,
        optimizer=opt,
        optimizer_params=opt_params,
        loss=loss,
        loss_params=loss_params,
        seed=seed,
        **fields,
    )


def distributions(space: Space) -> dict[str, Distribution]:
    """Every name Optuna may be asked for, with its distribution (for ``space show``)."""
    return _all_distributions(space.optimizer, space.loss, space.params)


def condition_of(space: Space, name: str) -> str:
    """A human description of when ``name`` is sampled."""
    if name in ("optimizer", "loss"):
        return ""
    for opt in space.optimizer.names:
        if name.startswith(f"{opt}_") and name[len(opt) + 1 :] in OPTIMIZER_PARAMS[opt]:
            return f"optimizer = {opt}" if len(space.optimizer.names) > 1 else ""
    for loss in space.loss.names:
        if name.startswith(f"{loss}_") and name[len(loss) + 1 :] in LOSS_PARAMS[loss]:
            return f"loss = {loss}" if len(space.loss.names) > 1 else ""
    if name in OPTIMIZER_RULES and name != "lr_decay":
        takers = [o for o in space.optimizer.names if name in OPTIMIZER_PARAMS[o]]
        if len(takers) < len(space.optimizer.names):
            return "optimizer in " + ", ".join(takers)
    if name in CONDITIONS:
        cond, when = CONDITIONS[name]
        return f"{cond} in {', '.join(when)}"
    return ""


def grid_search_space(space: Space) -> dict[str, list[Any]]:
    """The GridSampler's search space: every searched name with its finite values."""
    grid: dict[str, list[Any]] = {}
    for name, dist in distributions(space).items():
        if isinstance(dist, Categorical):
            grid[name] = list(dist.choices)
        elif isinstance(dist, Range):
            step = dist.step or 1
            n = round((dist.high - dist.low) / step) + 1
            vals = [dist.low + i * step for i in range(n)]
            grid[name] = [int(v) for v in vals] if dist.kind == "int" else vals
    return grid


# --------------------------------------------------------------------------- the flag grammar


def _scalar(token: str) -> Any:
    t = token.strip()
    low = t.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_spec(spec: str, *, where: str = "flag") -> Any:
    """Parse the flag grammar into the space file's form.

    ``a,b,c`` is a choice, ``a..b`` a range (int when both ends are integers) with
    ``:log`` and ``:step=N`` modifiers, a single value is fixed.
    """
    text = spec.strip()
    if not text:
        raise SpaceError(f"{where}: empty value; give a value, a list a,b or a range a..b")
    head, *mods = text.split(":")
    if ".." in head:
        low_s, _, high_s = head.partition("..")
        low, high = _scalar(low_s), _scalar(high_s)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise SpaceError(f"{where}: a range needs numbers on both sides of '..', got {spec!r}")
        out: dict[str, Any] = {"low": low, "high": high}
        for mod in mods:
            if mod == "log":
                out["log"] = True
            elif mod.startswith("step="):
                step = _scalar(mod[5:])
                if not isinstance(step, (int, float)) or isinstance(step, bool):
                    raise SpaceError(f"{where}: step must be a number, got {mod[5:]!r}")
                out["step"] = step
            elif mod in ("int", "float"):
                out["type"] = mod
            else:
                raise SpaceError(
                    f"{where}: unknown modifier ':{mod}' in {spec!r}; use :log or :step=N"
                )
        return out
    if mods:
        raise SpaceError(f"{where}: modifiers like ':{mods[0]}' only apply to ranges a..b")
    if "," in head:
        items = head.split(",")
        if not all(t.strip() for t in items):
            raise SpaceError(f"{where}: an empty item in the list {spec!r}; remove the extra comma")
        return [_scalar(t) for t in items]
    return _scalar(head)


def merge_flags(raw: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Lay command-line settings over a space file's mapping (or build one from nothing).

    ``flags`` holds ``data`` settings, ``model``, ``objective``, ``epochs`` and ``space``
    entries already parsed with :func:`parse_spec`; a key ``OPT.PARAM`` in ``space`` sets
    one optimizer's (or loss's) own parameter.
    """
    out: dict[str, Any] = {k: v for k, v in (raw or {}).items()}
    data = dict(out.get("data") or {})
    data_flags = flags.get("data") or {}
    if "dataset" in data_flags:
        data.pop("path", None)
        data.pop("target", None)
    if "path" in data_flags:
        data.pop("dataset", None)
    data.update(data_flags)
    if data:
        out["data"] = data
    for key in ("model", "objective", "name"):
        if flags.get(key) is not None:
            out[key] = flags[key]
    space = dict(out.get("space") or {})
    if flags.get("epochs") is not None:
        train = dict(out.get("train") or {})
        train["epochs"] = flags["epochs"]
        out["train"] = train
        space.pop("epochs", None)  # the flag fixes what the file searched
    for key, value in (flags.get("space") or {}).items():
        if key in ("optimizer", "loss"):
            names = value if isinstance(value, list) else [value]
            if len(set(map(str, names))) != len(names):  # as in a space file
                raise SpaceError(
                    f"--{key}: choices repeat a value, got {','.join(map(str, names))}"
                )
            old = space.get(key)
            old_map = old if isinstance(old, dict) else {}
            space[key] = {str(n): old_map.get(n) or {} for n in names}
        elif "." in key:
            group, _, param = key.partition(".")
            kind = "loss" if group in LOSS_PARAMS and group not in OPTIMIZER_PARAMS else "optimizer"
            current = space.get(kind, group)
            if isinstance(current, str):
                current = {current: {}}
            elif isinstance(current, list):
                current = {n: {} for n in current}
            current = {k: dict(v or {}) for k, v in dict(current).items()}
            if group not in current:  # the search's own choices do not include it
                chosen = ",".join(map(str, current))
                plural = "losses" if kind == "loss" else "optimizers"
                raise SpaceError(
                    f"--param {key}: {group} is not among the {plural} searched ({chosen}); "
                    f"add it (--{kind} {chosen},{group}) or leave the --param out"
                )
            current.setdefault(group, {})[param] = value
            space[kind] = current
        else:
            space[key] = value
            own = space.get("optimizer")
            if key in OPTIMIZER_RULES and isinstance(own, dict):
                # --lr over a file whose optimizers set their own: the flag is for all.
                space["optimizer"] = {
                    n: {p: v for p, v in dict(o or {}).items() if p != key} for n, o in own.items()
                }
    out["space"] = space
    return out
