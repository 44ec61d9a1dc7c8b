"""Studies (create/load/list/delete), samplers, pruners, and the run loop."""

from __future__ import annotations

import errno
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from automl.errors import (
    AutomlError,
    StorageError,
    StudyNotFoundError,
    TrialsFailedError,
    UsageError,
)
from automl.spaces import Space, grid_search_space
from automl.storage import (  # noqa: F401  (re-exported: the storage API used to live here)
    DEFAULT_STORAGE,
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    MAX_RETRY,
    _journal_path,
    _sqlite_path,
    _storage_exceptions,
    mask_url,
    open_storage,
    resolve_storage_url,
    root_cause,
)

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Optuna's experimental warnings are silenced in storage.py (imported above). We drive
# heartbeats ourselves around ask/tell (lifecycle.Heartbeats).
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used")
# A trial resumed from a checkpoint may re-run the one epoch it reported before dying.
warnings.filterwarnings("ignore", message=r"The reported value is ignored because this")


# ------------------------------------------------------------------ storage faults in a run


def _storage_faults(func: F) -> F:
    """A storage that fails mid-run (database dropped, file made read-only, disk full)
    ends the run with a StorageError (exit 1) and one masked line, not a traceback.
    Trials already told stay stored: each tell is its own transaction."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _storage_exceptions() as exc:
            raise _storage_fault(exc, args, kwargs) from None
        except OSError as exc:
            full_or_readonly = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
            if exc.errno not in full_or_readonly:
                raise
            raise _storage_fault(exc, args, kwargs) from None

    return wrapper  # type: ignore[return-value]


def _storage_fault(
    exc: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> StorageError:
    options = kwargs.get("options") or next((a for a in args if isinstance(a, RunOptions)), None)
    where = mask_url(options.storage_url) if isinstance(options, RunOptions) else "the storage"
    return StorageError(
        f"the storage {where} failed during the run: {root_cause(exc)}; trials finished "
        "before it are kept; fix the storage and run the same command again to go on"
    )


# --------------------------------------------------------------------------- samplers, pruners


def _lean_tpe(sampler: Any) -> Any:
    """The same TPE, cheaper per trial as the study grows (bench/bookkeeping.py):

    - the log of the normal CDF, evaluated for every kernel at every candidate, comes
      from SciPy's vectorised ``log_ndtr`` instead of Optuna's per-element Python once
      the study has used it enough to pay for importing SciPy (a third of the sampling
      time at 1,000 trials; the values agree to 1e-7; see _LogNdtr);
    - the group-decomposed search space is updated with the trials finished since the
      last call instead of being rebuilt from every trial (re-adding a trial's
      distributions never changes the groups, so the result is the same);
    - a finished trial's parameters are converted to TPE's internal form once per search
      space, not on every sampling call.

    Where Optuna's internals differ (another release), the sampler is used as it is."""
    try:
        from optuna.samplers._tpe import _truncnorm

        if hasattr(_truncnorm, "_log_ndtr") and not isinstance(_truncnorm._log_ndtr, _LogNdtr):
            _truncnorm._log_ndtr = _LogNdtr()
    except ImportError:
        pass
    space = getattr(sampler, "_group_decomposed_search_space", None)
    if space is not None and hasattr(space, "_search_space"):
        sampler._group_decomposed_search_space = _IncrementalGroupSpace(space)
    if hasattr(sampler, "_get_internal_repr") and hasattr(sampler, "_get_params"):
        sampler._get_internal_repr = _InternalReprCache(sampler._get_params)
    return sampler


class _LogNdtr:
    """The log of the normal CDF for TPE: Optuna's own formulas (the very same values),
    evaluated a whole array at a time, until it has been given BUDGET elements, SciPy's
    vectorised ``log_ndtr`` (imported then) from there on. Importing SciPy costs
    0.1-0.2 s, about what the exact way costs over 500k elements more than SciPy's: a
    short study (64 trials: 114k elements in 1,744 calls) never pays for the import, a
    long one pays for it early and then gets SciPy's speed."""

    BUDGET = 500_000

    def __init__(self) -> None:
        self._scipys: Any = None
        self._left = self.BUDGET

    def __call__(self, a: Any) -> Any:
        if self._scipys is not None:
            return self._scipys(a)
        import numpy as np

        self._left -= int(np.size(a))
        if self._left >= 0:
            return _exact_log_ndtr(a)
        try:
            from scipy.special import log_ndtr
        except ImportError:
            log_ndtr = _exact_log_ndtr
        self._scipys = log_ndtr
        return log_ndtr(a)


def _exact_log_ndtr(a: Any) -> Any:
    """Optuna's ``_truncnorm._log_ndtr``, value for value, 3x faster: its per-element
    branches (``_ndtr_single``, ``_log_ndtr_single``) as array masks, with math's erf,
    erfc and log applied element-wise (numpy's own log may differ in the last bit); the
    far left tail (below -20, rare) goes through Optuna's own series."""
    import math

    import numpy as np
    from optuna.samplers._tpe._truncnorm import _log_ndtr_single

    def each(f: Any) -> Any:  # math's function over an array, as floats
        apply = np.frompyfunc(f, 1, 1)
        return lambda x: np.asarray(apply(x), dtype=float)

    erf, erfc, log = each(math.erf), each(math.erfc), each(math.log)
    root2 = 2**0.5
    values = np.asarray(a, dtype=float)
    out = np.empty(values.shape)
    flat, result = values.reshape(-1), out.reshape(-1)
    high = flat > 6
    if high.any():  # -ndtr(-a)
        result[high] = -(0.5 * erfc(flat[high] / root2))
    middle = (flat > -20) & ~high
    if middle.any():  # log(ndtr(a))
        x = flat[middle] / root2
        y = np.empty(x.shape)
        left = x < -1 / root2
        central = ~left & (x < 1 / root2)
        right = ~(left | central)
        y[left] = 0.5 * erfc(-x[left])
        y[central] = 0.5 + 0.5 * erf(x[central])
        y[right] = 1.0 - 0.5 * erfc(x[right])
        result[middle] = log(y)
    tail = ~(high | middle)
    if tail.any():
        result[tail] = [_log_ndtr_single(float(v)) for v in flat[tail]]
    return out


class _InternalReprCache:
    """TPE's ``_get_internal_repr`` with each finished trial's row computed once per
    search space: converting every trial's parameters on every sampling call was the
    largest single cost of sampling at 1,000 trials. A finished trial's parameters never
    change; a running trial's (constant liar) are converted each time, as Optuna does."""

    def __init__(self, get_params: Any) -> None:
        self._get_params = get_params
        self._rows: dict[tuple[Any, ...], dict[int, tuple[float, ...] | None]] = {}

    def __call__(self, trials: list[Any], search_space: dict[str, Any], study: Any) -> Any:
        import numpy as np

        names = list(search_space)
        rows = self._rows.setdefault(tuple(search_space.items()), {})
        columns: list[list[float]] = [[] for _ in names]
        for trial in trials:
            finished = trial.state.is_finished()
            row: tuple[float, ...] | None
            if finished and trial._trial_id in rows:
                row = rows[trial._trial_id]
            else:
                params = self._get_params(trial, study)
                row = (
                    tuple(d.to_internal_repr(params[n]) for n, d in search_space.items())
                    if search_space.keys() <= params.keys()
                    else None  # a trial without every parameter is left out
                )
                if finished:
                    rows[trial._trial_id] = row
            if row is not None:
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
        return {name: np.asarray(column) for name, column in zip(names, columns, strict=True)}


class _IncrementalGroupSpace:
    """Optuna's ``_GroupDecomposedSearchSpace`` fed only the trials it has not seen."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._seen: set[int] = set()

    def calculate(self, study: optuna.Study, use_cache: bool = False) -> Any:
        import copy

        from optuna.trial import TrialState

        inner = self._inner
        if inner._study_id is None:
            inner._study_id = study._study_id
        elif inner._study_id != study._study_id:
            raise ValueError("`_GroupDecomposedSearchSpace` cannot handle multiple studies.")
        states = (
            (TrialState.COMPLETE, TrialState.PRUNED)
            if inner._include_pruned
            else (TrialState.COMPLETE,)
        )
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            if trial.number not in self._seen:
                self._seen.add(trial.number)
                inner._search_space.add_distributions(trial.distributions)
        return copy.deepcopy(inner._search_space)


# Options that count something: Optuna divides by some or compares them, so a bad one
# failed every trial (ZeroDivisionError, TypeError) instead of the space file.
_OPTION_MINIMUM = {
    "min_resource": 1,
    "reduction_factor": 2,
    "n_startup_trials": 0,
    "n_warmup_steps": 0,
    "interval_steps": 1,
    "n_min_trials": 1,
    "n_ei_candidates": 1,
    "population_size": 2,
    "bootstrap_count": 0,
    "min_early_stopping_rate": 0,
}


def optuna_classes() -> dict[str, Any]:
    """The Optuna class behind each sampler and pruner name of a space file (no name is
    both)."""
    import optuna

    return {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "qmc": optuna.samplers.QMCSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "grid": optuna.samplers.GridSampler,
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "wilcoxon": optuna.pruners.WilcoxonPruner,
    }


def _check_options(cls: Any, opts: dict[str, Any], what: str, name: str) -> None:
    """Each option of ``opts`` of the type ``cls``'s signature gives it (int, float or
    bool, where it names one) and counts within their minimum: before the first trial."""
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    for key, value in opts.items():
        param = params.get(key)
        if param is None:
            continue  # Optuna's own TypeError names an unknown option
        types = {
            t.strip()
            for t in str(param.annotation).replace("<class '", "").replace("'>", "").split("|")
        }
        types.discard("None")
        if value is None and "None" in str(param.annotation):
            continue
        if types in ({"int"}, {"int", "str"}):  # ("str | int": max_resource's "auto")
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                "str" in types and isinstance(value, str)
            )
            noun = "a whole number"
        elif types == {"float"}:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            noun = "a number"
        elif types == {"bool"}:
            ok = isinstance(value, bool)
            noun = "true or false"
        else:
            continue
        if not ok:
            raise UsageError(f"study.{what}.{key}: must be {noun} for '{name}', got {value!r}")
        low = _OPTION_MINIMUM.get(key)
        if low is not None and isinstance(value, int) and value < low:
            raise UsageError(f"study.{what}.{key}: must be at least {low}, got {value!r}")


def create_sampler(space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    try:
        return _create_sampler(space, seed)
    except UsageError as exc:  # named with its file, as the space file's other errors
        raise UsageError(f"{space.path}: {exc}" if space.path else str(exc)) from None


def _create_sampler(space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    spec = space.study.sampler
    opts = spec.options
    name = spec.name
    seed = worker_seed(seed)
    classes = optuna_classes()
    if name in classes:
        _check_options(classes[name], opts, "sampler", name)
    try:
        if name == "tpe":
            opts.setdefault("multivariate", True)
            opts.setdefault("group", True)
            opts.setdefault("constant_liar", True)
            return _lean_tpe(optuna.samplers.TPESampler(seed=seed, **opts))
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **opts)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, **opts)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, **opts)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if name == "grid":
            return _grid_sampler(grid_search_space(space), seed, **opts)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"study.sampler: bad option for '{name}': {exc}") from None
    raise UsageError(f"study.sampler: unknown sampler '{name}'")


def _grid_sampler(
    grid: dict[str, list[Any]], seed: int | None, **opts: Any
) -> optuna.samplers.BaseSampler:
    """A GridSampler for the ask/tell loop: Optuna's calls ``study.stop()`` when the grid
    is done, which only works inside ``optimize``; ``run_study`` asks ``is_exhausted``."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return AskTellGridSampler(grid, seed=seed, **opts)


def worker_seed(seed: int | None) -> int | None:
    """The sampler seed of this worker: worker k of a ``--workers N`` run (or a machine
    given ``AUTOML_WORKER_INDEX=k``) samples from its own stream, so seeded workers do
    not all propose the same first trials. Worker 0 keeps the seed as is."""
    index = os.environ.get("AUTOML_WORKER_INDEX", "0")
    if seed is None or not index.isdigit() or int(index) == 0:
        return seed
    return (seed + 7919 * int(index)) % 2**32


def resumed_seed(seed: int | None, n_trials: int) -> int | None:
    """The sampler seed for a study that already holds ``n_trials`` trials. A fresh
    sampler with the study's own seed would propose the study's first points again (each
    cron run repeating the last one's random start-up trials); mixing in the trial count
    gives every resumed run new points, and the same study state the same ones."""
    if seed is None or n_trials == 0:
        return seed
    return (seed + 104_729 * n_trials) % 2**32


def load_for_space(space: Space, seed: int | None) -> tuple[Space, Any]:
    """The space's data, loaded and split with ``seed``, and the space fitted to the task
    found there (a data file's is known only now: the default loss follows it). Losses and
    metrics that do not fit the task are bad input, raised before anything is written."""
    from automl.data import load_dataset
    from automl.spaces import check_task_fit

    dataset = load_dataset(space.data, seed=seed or 0)
    space = space.for_task(dataset.task)
    check_task_fit(
        dataset.task, space.loss.names, space.objectives, n_classes=dataset.n_classes or None
    )
    return space, dataset


def _reseed_if_raced(sampler: optuna.samplers.BaseSampler, expected: int, seed: int | None) -> None:
    """A seeded sampler whose first trial is not the study's next one (``expected``)
    draws from a fresh stream: other runs of the study started at the same moment, read
    the same trial count, and would otherwise propose the very same points (whole packs
    repeated). A lone run, the only one to get that number, keeps its seeded stream."""
    if seed is None:
        return  # unseeded samplers already draw from their own entropy
    original = sampler.before_trial
    undecided = [True]

    def before_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        # (A waiting trial popped first, a retry or an enqueued one, has an older number:
        # the first new trial decides.)
        if undecided[0] and trial.number >= expected:
            undecided[0] = False
            if trial.number > expected:
                sampler.reseed_rng()
        original(study, trial)

    sampler.before_trial = before_trial  # type: ignore[method-assign]


def create_pruner(space: Space) -> optuna.pruners.BasePruner:
    try:
        return _create_pruner(space)
    except UsageError as exc:  # named with its file, as the space file's other errors
        raise UsageError(f"{space.path}: {exc}" if space.path else str(exc)) from None


def _create_pruner(space: Space) -> optuna.pruners.BasePruner:
    import optuna

    spec = space.study.pruner
    opts = spec.options
    name = spec.name
    if space.is_multi_objective or name == "none":
        return optuna.pruners.NopPruner()
    classes = optuna_classes()
    if name in classes:
        _check_options(classes[name], opts, "pruner", name)
    try:
        if name == "median":
            opts.setdefault("n_startup_trials", 5)
            opts.setdefault("n_warmup_steps", 2)
            return optuna.pruners.MedianPruner(**opts)
        if name == "percentile":
            opts.setdefault("percentile", 25.0)
            return optuna.pruners.PercentilePruner(**opts)
        if name == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(**opts)
        if name == "hyperband":
            opts.setdefault("max_resource", space.train.epochs)
            return optuna.pruners.HyperbandPruner(**opts)
        if name == "threshold":
            return optuna.pruners.ThresholdPruner(**opts)
        if name == "wilcoxon":
            return optuna.pruners.WilcoxonPruner(**opts)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"study.pruner: bad option for '{name}': {exc}") from None
    raise UsageError(f"study.pruner: unknown pruner '{name}'")


# --------------------------------------------------------------------------- studies


def load_study(name: str, storage_url: str | None = None) -> optuna.Study:
    """Load an existing study; a missing one is a StudyNotFoundError naming the others."""
    import optuna

    url = resolve_storage_url(storage_url)
    try:
        storage = open_storage(url, create=False)
    except StorageError as exc:
        if "run a study first" in str(exc):
            raise StudyNotFoundError(f"no study named '{name}': {exc}; or pass --storage") from None
        raise
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        known = f"; studies here: {', '.join(names)}" if names else "; this storage has none"
        raise StudyNotFoundError(f"no study named '{name}' in {mask_url(url)}{known}") from None


def create_study(
    space: Space, name: str, storage: BaseStorage, *, seed: int | None
) -> optuna.Study:
    """Create the study, or load it when it exists (checking its directions match)."""
    import optuna
    from optuna.storages import RDBStorage

    from automl.storage_cache import RunStorage

    if isinstance(storage, RDBStorage):
        storage = RunStorage(storage)  # fewer database reads per trial (storage_cache.py)
    directions = space.directions
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        old = [d.name.lower() for d in existing.directions]
        if old != directions:
            raise UsageError(
                f"study '{name}' optimizes {old} but the space asks {directions}; "
                "use another --study name"
            )
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=create_sampler(space, resumed_seed(seed, len(existing.trials))),
            pruner=create_pruner(space),
        )
        _reseed_if_raced(study.sampler, len(existing.trials), seed)
        return study
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=create_sampler(space, seed),
        pruner=create_pruner(space),
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    _reseed_if_raced(study.sampler, 0, seed)
    study.set_metric_names(list(space.objectives))
    study.set_user_attr("space", space.source)
    study.set_user_attr("space_hash", space.hash)
    study.set_user_attr("objectives", list(space.objectives))
    study.set_user_attr("automl_version", _version())
    # The stored YAML keeps data.path as written; retrain/report need the file itself.
    if space.data.path is not None:
        study.set_user_attr("data_path", str(Path(space.data.path).resolve()))
    if space.path is not None:
        study.set_user_attr("space_file", str(Path(space.path).resolve()))
    return study


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("automl")
    except PackageNotFoundError:
        return "dev"


@dataclass(frozen=True)
class StudyRow:
    name: str
    directions: list[str]
    n_trials: int
    n_complete: int
    best_value: float | list[float] | None
    created: str | None


def list_studies(storage_url: str | None = None) -> list[StudyRow]:
    import optuna

    url = resolve_storage_url(storage_url)
    sqlite = _sqlite_path(url)
    if sqlite is not None and not sqlite.exists():
        return []
    journal = _journal_path(url)
    if journal is not None and not Path(journal).exists():
        return []
    storage = open_storage(url, create=False)
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=True):
        best: float | list[float] | None = None
        if s.best_trial is not None:
            best = s.best_trial.values if len(s.directions) > 1 else s.best_trial.value
        trials = storage.get_all_trials(s._study_id, deepcopy=False)
        rows.append(
            StudyRow(
                name=s.study_name,
                directions=[d.name.lower() for d in s.directions],
                n_trials=s.n_trials,
                n_complete=sum(t.state.name == "COMPLETE" for t in trials),
                best_value=best,
                created=s.datetime_start.isoformat(timespec="seconds")
                if s.datetime_start
                else None,
            )
        )
    return rows


def delete_study(name: str, storage_url: str | None = None) -> None:
    import optuna

    load_study(name, storage_url)  # raises StudyNotFoundError
    url = resolve_storage_url(storage_url)
    storage = open_storage(url, create=False)
    optuna.delete_study(study_name=name, storage=storage)
    # Its checkpoints and kept weights go with it (a new study of that name must not find
    # them); only files this tool writes, in the study's own folder.
    import shutil

    from automl.checkpoints import study_checkpoint_dir

    folder = study_checkpoint_dir(url, name)
    if folder.is_dir() and all(p.suffix in (".pt", ".tmp") for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def n_finished(study: optuna.Study, *, fresh: bool = False) -> int:
    """Complete and pruned trials; ``fresh``: as the database holds them now, including
    what other workers finished since the run's cache last read it (``--until``)."""
    from optuna.trial import TrialState

    if fresh:
        read_now = getattr(study._storage, "read_now", None)  # storage_cache.RunStorage
        if read_now is not None:
            read_now()
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# --------------------------------------------------------------------------- the run loop


class RunObserver(Protocol):
    """What the CLI (or a log file) hears while a run goes on."""

    def run_started(self, study: optuna.Study, target: int | None) -> None: ...
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def epoch_done(
        self, number: int, epoch: int, epochs: int, metrics: dict[str, float]
    ) -> None: ...
    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None: ...


class NullObserver:
    def run_started(self, study: optuna.Study, target: int | None) -> None:
        pass

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        pass

    def epoch_done(self, number: int, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        pass

    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None:
        pass


@dataclass
class RunSummary:
    study_name: str
    storage: str
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    stop_reason: str = ""
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def n_run(self) -> int:
        return self.n_complete + self.n_pruned + self.n_failed


@dataclass(frozen=True)
class RunOptions:
    study_name: str
    storage_url: str
    n_trials: int | None = None
    until: int | None = None
    timeout: float | None = None
    device: str = "auto"
    seed: int | None = None
    max_failures: int = 5
    allow_space_change: bool = False
    warm_start: str | None = None  # "OTHER_STUDY" or "OTHER_STUDY:K"
    pack: int = 1  # train K compatible trials at once as one fused model (packing.py)


@dataclass
class _Run:
    """The state of one ``run_study`` call, shared by its trial loop(s)."""

    study: optuna.Study
    options: RunOptions
    objective: Any
    obs: RunObserver
    summary: RunSummary
    stopper: Any  # lifecycle.GracefulStop
    checkpoint_dir: Path
    target: int | None
    started: float = field(default_factory=time.monotonic)
    consecutive_failures: int = 0
    # The trials a signal stopped, each (number, its queued copy, epochs checkpointed).
    retried: list[tuple[int, int, int]] = field(default_factory=list)
    pack_pool: Any = None  # pack_pool.Pool: helper processes that train --pack pieces

    def stop_reason(self) -> str | None:
        """Why no further trial should start, or None to go on."""
        opts = self.options
        if opts.n_trials is not None and self.summary.n_run >= opts.n_trials:
            return f"ran {self.summary.n_run} trial(s)"
        if opts.until is not None:
            held = n_finished(self.study, fresh=True)
            if held >= opts.until:
                return f"the study holds {held} finished trials (--until {opts.until})"
        elif self.target is not None and self.summary.n_run >= self.target:
            return f"ran {self.summary.n_run} trial(s)"
        if opts.timeout is not None and time.monotonic() - self.started >= opts.timeout:
            return f"timeout of {opts.timeout:g}s reached"
        is_exhausted = getattr(self.study.sampler, "is_exhausted", None)
        if is_exhausted is not None and is_exhausted(self.study):
            return "every point of the grid has been tried"
        return None

    def count(self, frozen: FrozenTrial) -> None:
        """Add a told trial to the summary; stop a run whose trials keep failing."""
        from optuna.trial import TrialState

        if frozen.state == TrialState.COMPLETE:
            self.summary.n_complete += 1
        elif frozen.state == TrialState.PRUNED:
            self.summary.n_pruned += 1
        else:
            self.summary.n_failed += 1
        if frozen.state != TrialState.FAIL:
            self.consecutive_failures = 0
            return
        reason = str(frozen.user_attrs.get("fail_reason", "failed"))
        self.summary.failures[reason] += 1
        self.consecutive_failures += 1
        limit = self.options.max_failures
        if limit and self.consecutive_failures >= limit:
            common, n = self.summary.failures.most_common(1)[0]
            raise TrialsFailedError(
                f"{self.consecutive_failures} trials in a row failed; most common reason "
                f"({n}x): {common}; fix it, or raise --max-failures"
            )


@_storage_faults
def run_study(space: Space, options: RunOptions, observer: RunObserver | None = None) -> RunSummary:
    """Run trials of ``space`` into the study until the budget is met.

    Safe to repeat (cron): ``until`` counts finished trials in the storage; trials of a
    killed run are failed by their heartbeat and retried from their last epoch checkpoint;
    SIGINT/SIGTERM record the current trial as failed ("interrupted"), queue its retry and
    raise RunInterrupted. No trial of this call is left RUNNING when it returns or raises."""
    from automl.lifecycle import parse_warm_start

    obs = observer or NullObserver()
    seed = options.seed if options.seed is not None else space.study.seed
    if options.warm_start:
        parse_warm_start(options.warm_start)  # a malformed flag is bad input: fail first
    done = _budget_already_met(options, obs)
    if done is not None:  # the cron case: no data, no torch, just say so
        return done
    from automl.pack_pool import maybe_pool

    # Helper processes for --pack start now, importing torch beside this process.
    with maybe_pool(space, options.pack, options.device) as pool:
        return _run_study(space, options, obs, seed, pool)


def _run_study(
    space: Space, options: RunOptions, obs: RunObserver, seed: int | None, pool: Any
) -> RunSummary:
    from automl.checkpoints import study_checkpoint_dir
    from automl.data import resolve_device, to_device
    from automl.lifecycle import (
        GracefulStop,
        RunInterrupted,
        StopRequested,
        check_data_file,
        check_stored_space,
        parse_warm_start,
        warm_start_from,
    )

    device = resolve_device(options.device)
    from automl.training import configure_threads

    configure_threads(device)
    if pool is not None and device == "cpu":
        import torch

        torch.set_num_threads(pool.threads)  # the run's cores go to pack processes
    # Bad data is bad input: find it before anything is written to the storage.
    space, dataset = load_for_space(space, seed)
    data = to_device(dataset, device, model=space.model)
    if pool is not None:
        pool.set_data(data if device == "cpu" else None)
        if device != "cpu":
            pool = None

    create_sampler(space, seed), create_pruner(space)  # bad options: fail before writing
    if options.warm_start:  # so is a warm-start study that is not there
        load_study(parse_warm_start(options.warm_start)[0], options.storage_url)
    storage = open_storage(options.storage_url)
    check_stored_space(storage, space, options.study_name, allow=options.allow_space_change)
    study = create_study(space, options.study_name, storage, seed=seed)
    check_data_file(study, space.data.path, record=True)
    given = (space.to_dict().get("study") or {}).get("pruner")
    if space.is_multi_objective and given not in (None, "none", {"name": "none"}):
        log.warning("study.pruner is off: Optuna cannot prune trials of several objectives")
    summary = RunSummary(study_name=options.study_name, storage=mask_url(options.storage_url))
    if options.warm_start:
        warm_start_from(study, space, options.warm_start, options.storage_url)
    checkpoint_dir = study_checkpoint_dir(options.storage_url, options.study_name)
    _fail_stale_trials(study)
    _sweep_checkpoints(study, checkpoint_dir)

    from automl.objective import Objective

    objective = Objective(space, dataset, data, device=device, seed=seed, on_epoch=obs.epoch_done)
    target = options.n_trials
    if options.until is not None:
        already = n_finished(study)
        left = max(options.until - already, 0)
        target = left if target is None else min(target, left)
    elif target is None and options.timeout is None:
        target = 20
    run = _Run(
        study,
        options,
        objective,
        obs,
        summary,
        GracefulStop(),
        checkpoint_dir,
        target,
        pack_pool=pool,
    )
    obs.run_started(study, target)
    try:
        with run.stopper:
            try:
                if options.pack > 1:
                    from automl.packing import run_packed

                    run_packed(run)  # K trials at a time, compatible ones fused
                else:
                    _run_trials(run)
            except StopRequested as stop:
                name = signal_name(stop.signum)
                counts = (
                    f"{summary.n_complete} complete, {summary.n_pruned} pruned, "
                    f"{summary.n_failed} failed"
                )
                what = f"; {_interrupted_text(run.retried)}" if run.retried else ""
                summary.stop_reason = f"interrupted by {name}{what}; this run: {counts}"
                raise RunInterrupted(summary.stop_reason, stop.signum) from None
    except BaseException as exc:
        summary.stop_reason = summary.stop_reason or (str(exc).splitlines() or [""])[0]
        raise
    finally:
        summary.seconds = time.monotonic() - run.started
        finished = getattr(obs, "run_finished", None)
        if finished is not None:
            finished(summary)
    if summary.n_run and summary.n_failed == summary.n_run:
        common, count = summary.failures.most_common(1)[0]
        raise TrialsFailedError(f"every trial failed; most common reason ({count}x): {common}")
    return summary


def _budget_already_met(options: RunOptions, obs: RunObserver) -> RunSummary | None:
    """With ``--until N``, a summary saying so when the study already holds N finished
    trials; None when there is work (or no study yet)."""
    import optuna

    if options.until is None:
        return None
    try:
        storage = open_storage(options.storage_url, create=False)
        study = optuna.load_study(study_name=options.study_name, storage=storage)
    except (StorageError, KeyError):
        return None  # nothing stored yet; the run proper reports real storage problems
    held = n_finished(study)
    if held < options.until:
        return None
    summary = RunSummary(
        study_name=options.study_name,
        storage=mask_url(options.storage_url),
        stop_reason=f"the study already holds {held} finished trials (--until {options.until})",
    )
    obs.run_started(study, 0)
    finished = getattr(obs, "run_finished", None)
    if finished is not None:
        finished(summary)
    return summary


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _run_trials(run: _Run) -> None:
    """The serial loop: ask, train (resuming a retried trial's checkpoint), tell."""
    while (reason := run.stop_reason()) is None:
        _check_storage_file(run.options.storage_url)
        # A signal while asking is raised by _run_trial, which then tells the trial.
        with run.stopper.protected(raise_pending=False):
            _fail_stale_trials(run.study)
            trial = run.study.ask()
            run.obs.trial_started(trial.number, trial.params)
        frozen = _run_trial(run, trial)
        run.count(frozen)
    run.summary.stop_reason = reason


def _check_storage_file(url: str) -> None:
    """SQLite goes on writing into a file deleted under it; those trials would vanish."""
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        raise StorageError(
            f"the storage file {path} was removed during the run, so trials written to it "
            "are gone; point --storage at a file that stays and run again"
        )


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail trials whose process stopped sending heartbeats (killed, lost power); the
    storage's retry callback queues each again with its parameters."""
    from optuna.storages._heartbeat import fail_stale_trials, is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):
        fail_stale_trials(study)


def _run_trial(run: _Run, trial: optuna.Trial) -> FrozenTrial:
    """Train one asked trial and tell its end; always tells, even when interrupted."""
    from optuna.trial import TrialState

    from automl.checkpoints import Checkpointer
    from automl.lifecycle import Heartbeats, StopRequested, retry_history

    checkpoint = Checkpointer(run.checkpoint_dir, trial.number, retry_history(trial))
    flush_reports = getattr(run.study._storage, "flush_reports", None)  # storage_cache.py
    if flush_reports is not None:
        checkpoint.before_save = lambda: flush_reports(trial._trial_id)
    outcome: tuple[Any, list[float] | None, str] = (TrialState.FAIL, None, "the run stopped")
    interrupted = False
    try:
        run.stopper.check()  # a signal during ask: record this trial as interrupted
        with Heartbeats(run.study._storage, [trial._trial_id]):
            outcome = _run_one(trial, run.objective, checkpoint)
    except StopRequested:
        interrupted = True
        outcome = (TrialState.FAIL, None, "interrupted")
        raise
    except BaseException as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        outcome = (TrialState.FAIL, None, f"{type(exc).__name__}: {first}".rstrip(": "))
        raise
    finally:
        with run.stopper.protected():
            frozen = _tell(run, trial, checkpoint, outcome, interrupted=interrupted)
    return frozen


def _interrupted_text(retried: list[tuple[int, int, int]]) -> str:
    """What a signal did to the trials it stopped: each recorded as failed and queued."""
    if len(retried) == 1:
        ((number, copy, epochs),) = retried
        kept = f"its checkpoint after epoch {epochs} kept" if epochs else "no checkpoint kept"
        return (
            f"trial {number} recorded as failed (interrupted), {kept}; the next run "
            f"retries it as trial {copy}"
        )
    numbers = ", ".join(str(n) for n, _, _ in retried)
    copies = ", ".join(str(c) for _, c, _ in retried)
    n_kept = sum(1 for _, _, e in retried if e)
    return (
        f"trials {numbers} recorded as failed (interrupted), {n_kept} with a checkpoint; the "
        f"next run retries them as trials {copies}"
    )


def _tell(
    run: _Run,
    trial: optuna.Trial,
    checkpoint: Any,
    outcome: tuple[Any, list[float] | None, str],
    *,
    interrupted: bool,
) -> FrozenTrial:
    from optuna.trial import TrialState

    from automl.checkpoints import prune_files
    from automl.lifecycle import retry_later

    study = run.study
    state, values, reason = outcome
    if checkpoint.resumed_from_epoch is not None:
        trial.set_user_attr("resumed_from_epoch", checkpoint.resumed_from_epoch)
        trial.set_user_attr("resumed_from_trial", checkpoint.resumed_from_trial)
    if state == TrialState.FAIL:
        trial.set_user_attr("fail_reason", reason)
    elif state == TrialState.PRUNED and reason:
        trial.set_user_attr("prune_reason", reason)
    previous_best: list[int] = []
    if state == TrialState.COMPLETE and values is not None:
        previous_best = _best_numbers(study)
        if _would_be_best(study, values):
            path = checkpoint.keep_weights({"params": dict(trial.params)})
            if path is not None:
                trial.set_user_attr("weights_path", str(path.resolve()))
    frozen = study.tell(trial, values, state=state)
    if interrupted:
        run.summary.n_failed += 1
        epochs = checkpoint.last_epoch or checkpoint.resumed_from_epoch or 0
        number = retry_later(study, frozen, epochs=epochs)
        run.retried.append((frozen.number, number, epochs))
    else:
        checkpoint.remove()
    if previous_best:
        # Only the best trial(s) keep their weights; a beaten best gives its file up.
        best_now = set(_best_numbers(study))
        prune_files(
            run.checkpoint_dir,
            checkpoints=(),
            weights=[n for n in previous_best if n not in best_now],
        )
    run.obs.trial_finished(frozen, study)
    return frozen


def _best_numbers(study: optuna.Study) -> list[int]:
    return [t.number for t in _best_trials(study)]


def _best_trials(study: optuna.Study) -> list[FrozenTrial]:
    # What ``study.best_trials`` returns (ties included), without its deep copy of every
    # trial, which cost more than the rest of a trial's bookkeeping at 1,000 trials.
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) == 1:  # the best value and its ties, in one pass
        scored = [t for t in trials if t.values]
        if not scored:
            return []
        pick = min if study.direction.name == "MINIMIZE" else max
        best = pick(t.values[0] for t in scored)
        return [t for t in scored if t.values[0] == best]
    feasible = any("constraints" in t.system_attrs for t in trials)
    try:
        return list(_get_pareto_front_trials_by_trials(trials, study.directions, feasible))
    except ValueError:
        return []


def _would_be_best(study: optuna.Study, values: list[float]) -> bool:
    """Whether ``values`` beat the best trial (one objective) or no complete trial
    dominates them (several)."""
    import math

    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    if not all(math.isfinite(v) for v in values):
        return False
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    mine = [s * v for s, v in zip(signs, values, strict=True)]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values is None:
            continue
        theirs = [s * v for s, v in zip(signs, t.values, strict=True)]
        if len(values) == 1:
            if theirs[0] <= mine[0]:
                return False
        elif all(a <= b for a, b in zip(theirs, mine, strict=True)) and theirs != mine:
            return False
    return True


def _sweep_checkpoints(study: optuna.Study, directory: Path) -> None:
    """Remove checkpoints no trial will resume (their trial is finished and no queued or
    running retry names it) and weights of trials that are no longer the best."""
    from optuna.trial import TrialState

    from automl.checkpoints import prune_files

    if not directory.is_dir():
        return
    trials = study.get_trials(deepcopy=False)
    pending = (TrialState.WAITING, TrialState.RUNNING)
    wanted = {t.number for t in trials if t.state in pending}
    for t in trials:
        if t.state in pending:
            wanted.update(int(n) for n in t.system_attrs.get("retry_history", []))
    best = set(_best_numbers(study))
    finished = [t.number for t in trials if t.state.is_finished()]
    prune_files(
        directory,
        checkpoints=[n for n in finished if n not in wanted],
        weights=[n for n in finished if n not in best],
    )


def _run_one(
    trial: optuna.Trial, objective: Any, checkpoint: Any
) -> tuple[Any, list[float] | None, str]:
    """Run one trial; classify its end as complete, pruned or failed with a reason."""
    import optuna
    from optuna.trial import TrialState

    from automl.training import TrialDiverged

    try:
        values = objective(trial, checkpoint=checkpoint)
        return TrialState.COMPLETE, values, ""
    except optuna.TrialPruned as exc:
        return TrialState.PRUNED, None, str(exc) or "pruned"
    except TrialDiverged as exc:
        return TrialState.PRUNED, None, f"diverged: {exc}"
    except AutomlError:
        raise
    except _storage_exceptions():
        raise  # the storage failing is no fault of this trial's: the run stops
    except Exception as exc:
        if not _is_oom(exc):
            log.debug("trial %d failed", trial.number, exc_info=True)
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            return TrialState.FAIL, None, f"{type(exc).__name__}: {first}".rstrip(": ")
        reason = f"out of memory: {(str(exc).splitlines() or [''])[0][:200]}"
    # Freed only here, after the except block: until then the traceback's frames hold the
    # trial's model and activations, and empty_cache could give nothing back.
    _free_device_memory()
    return TrialState.FAIL, None, reason


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
