"""Retrain a trial into one model file, and predict with it.

A model file is a plain dict saved with ``torch.save``: tensors, numbers, strings, lists
and dicts only, so ``torch.load(path, weights_only=True)`` reads it without unpickling
any object. It holds the weights, the trial's configuration, the preprocessing state and
where it came from (study, trial, storage with the password masked).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import AutomlError, DataError, UsageError
from automl.outputs import refuse_overwrite

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import pandas as pd
    import torch
    from optuna.trial import FrozenTrial

    from automl.data import Dataset, Preprocessor
    from automl.spaces import Space, TrialConfig

log = logging.getLogger(__name__)

MODEL_FORMAT = "automl-model"
MODEL_VERSION = 1


class ParetoTrialRequired(UsageError):
    """A multi-objective study has no single best trial: the user must pick one."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__(
            f"study '{study.study_name}' has several objectives; "
            "pick a trial on its Pareto front with --trial N"
        )
        self.study = study


# --------------------------------------------------------------------------- choosing


# How a trial's state reads in a sentence ("trial #3 failed").
_STATE_WORDS = {
    "FAIL": "failed",
    "PRUNED": "was pruned",
    "RUNNING": "is running",
    "WAITING": "is waiting",
}


def pick_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """The trial to retrain: ``number``, else the best (single objective only)."""
    from optuna.trial import TrialState

    if number is None:
        if len(study.directions) > 1:
            raise ParetoTrialRequired(study)
        try:
            return study.best_trial
        except ValueError:
            from automl.results import no_complete_trial

            raise UsageError(no_complete_trial(study)) from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        last = max(trials) if trials else None
        span = f"0..{last}" if last is not None else "none yet"
        raise UsageError(f"study '{study.study_name}' has no trial #{number} (trials: {span})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UsageError(
            f"trial #{number} {_STATE_WORDS[trial.state.name]}, not complete; retrain a "
            f"complete trial (see automl show {shlex.quote(study.study_name)} --state complete)"
        )
    return trial


def study_space(study: optuna.Study) -> Space:
    """The space the study was created with, its data path made usable from here."""
    import yaml

    from automl.spaces import parse_stored_space

    text = study.user_attrs.get("space")
    if not text:
        raise UsageError(
            f"study '{study.study_name}' was not created by automl (no 'space' attribute); "
            "retrain needs the space file it ran"
        )
    space_file = study.user_attrs.get("space_file")
    space = parse_stored_space(
        yaml.safe_load(text), file=space_file or "(study space)", source=text
    )
    if space.data.path is None:
        return space
    from dataclasses import replace

    path = _find_data_file(space.data.path, study.user_attrs)
    return replace(space, data=space.data.model_copy(update={"path": path}))


def _find_data_file(written: str, attrs: dict[str, Any]) -> str:
    """The study's data file: its absolute path at creation, else as written (relative to
    the space file, then to the working directory)."""
    candidates = [attrs.get("data_path")]
    if attrs.get("space_file"):
        candidates.append(str(Path(attrs["space_file"]).parent / written))
    candidates.append(written)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise DataError(
        f"the study's data file {attrs.get('data_path') or written} is not here any more; "
        "retrain needs the same data the search used"
    )


def data_seed(study: optuna.Study, trial: FrozenTrial, space: Space) -> int:
    """The seed the search split its data with (``run --seed``, else ``study.seed``).

    Each trial stores its own seed, derived from the run seed and its number; the run seed
    is found again from it so that a ``--seed`` given to ``run`` is honoured."""
    from automl.objective import trial_seed

    stored = trial.user_attrs.get("data_seed", study.user_attrs.get("data_seed"))
    if isinstance(stored, int):
        return stored
    own = trial.user_attrs.get("seed")
    base = space.study.seed or 0
    if not isinstance(own, int) or trial_seed(base, trial.number) == own:
        return base
    modulus = 2**31 - 1  # prime: trial_seed is invertible modulo it
    candidate = ((own - trial.number) * pow(1_000_003, -1, modulus)) % modulus
    if trial_seed(candidate, trial.number) == own:
        return candidate
    log.warning("cannot tell the search's data seed; using the space's seed %d", base)
    return base


def trial_config(study: optuna.Study, trial: FrozenTrial, space: Space) -> TrialConfig:
    """Rebuild the trial's full configuration from its parameters."""
    import optuna

    from automl.spaces import suggest

    seed = trial.user_attrs.get("seed", 0)
    try:
        return suggest(optuna.trial.FixedTrial(trial.params), space, seed=int(seed))
    except ValueError as exc:
        raise UsageError(
            f"trial #{trial.number} does not fit the study's space any more: {exc}"
        ) from None


def retrain_epochs(trial: FrozenTrial, config: TrialConfig) -> int:
    """The epoch at which the trial scored its value (else the epochs it ran)."""
    for key in ("best_epoch", "epochs_run"):
        value = trial.user_attrs.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return config.epochs


# --------------------------------------------------------------------------- retrain


@dataclass
class RetrainResult:
    """What ``retrain`` did and where the model went."""

    path: Path
    study: str
    trial: int
    epochs: int
    reused: bool
    n_train: int
    n_test: int
    test_metrics: dict[str, float] = field(default_factory=dict)
    search_values: list[float] | None = None
    seconds: float = 0.0
    n_params: int = 0


def retrain(
    study: optuna.Study,
    *,
    output: str | Path,
    trial_number: int | None = None,
    reuse: bool = False,
    device: str = "auto",
    storage_url: str | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> RetrainResult:
    """Train the trial's configuration on train + validation for its epoch count (or, with
    ``reuse``, take the weights the search kept), score the test split and save the file.
    ``on_epoch(done, total)`` hears each finished epoch (for a progress bar)."""
    import time

    import torch

    from automl.data import load_dataset, resolve_device, to_device
    from automl.models import build_model, count_parameters
    from automl.training import configure_threads, train

    trial = pick_trial(study, trial_number)
    space = study_space(study)
    from automl.lifecycle import check_data_file

    check_data_file(study, space.data.path, record=False)
    # A new model learns from train + validation, so its preprocessing is fitted on both
    # (a category only the validation rows hold is known); kept weights need the search's.
    dataset = load_dataset(
        space.data, seed=data_seed(study, trial, space), fit_on_validation=not reuse
    )
    space = space.for_task(dataset.task)
    config = trial_config(study, trial, space)
    dev = resolve_device(device)
    configure_threads(dev)  # one thread on CPU, as the search: small models lose with more
    epochs = retrain_epochs(trial, config)
    started = time.perf_counter()
    if reuse:
        data = to_device(dataset, dev, model=config.model)
        model = build_model(config, data.input_shape, data.n_outputs)
        _load_kept_weights(model, trial, storage_url, study.study_name)
        model.to(dev)
        n_train = len(dataset.X_train)
    else:
        from dataclasses import replace

        data = to_device(dataset, dev, model=config.model, include_val_in_train=True)
        config = replace(config, epochs=epochs)
        hook = None if on_epoch is None else (lambda e, _m: on_epoch(e + 1, epochs))
        result = train(config, data, keep_model=True, restore_best=False, on_epoch=hook)
        assert result.model is not None
        model = result.model
        n_train = len(dataset.X_train) + len(dataset.X_val)
    seconds = time.perf_counter() - started
    test_metrics = score_test(model, dataset, config, data.input_shape, dev)
    first = [f"test_{m.removeprefix('val_')}" for m in space.objectives]  # the objective first
    test_metrics = dict(sorted(test_metrics.items(), key=lambda kv: kv[0] not in first))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from automl.storage import mask_url, resolve_storage_url

    doc: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "state_dict": state,
        "config": _plain(config.to_dict()),
        "preprocessor": _plain(dataset.preprocessor.to_state()),
        "input_shape": [int(s) for s in data.input_shape],
        "n_outputs": int(data.n_outputs),
        "task": dataset.task,
        "classes": _plain(list(dataset.preprocessor.classes)),
        "dropped_columns": [str(c) for c in space.data.drop],
        "provenance": _plain(
            {
                "study": study.study_name,
                "trial": trial.number,
                "storage": mask_url(resolve_storage_url(storage_url)),
                "params": _plain(dict(trial.params)),
                "values": list(trial.values) if trial.values else None,
                "objectives": list(study.metric_names or []),
                "epochs": epochs,
                "reused": reuse,
                "n_train": n_train,
                "test_metrics": test_metrics,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch": str(torch.__version__),
            }
        ),
    }
    path = Path(output)
    save_model_file(doc, path)
    return RetrainResult(
        path=path,
        study=study.study_name,
        trial=trial.number,
        epochs=epochs,
        reused=reuse,
        n_train=n_train,
        n_test=len(dataset.X_test),
        test_metrics=test_metrics,
        search_values=list(trial.values) if trial.values else None,
        seconds=seconds,
        n_params=count_parameters(model),
    )


def score_test(
    model: torch.nn.Module,
    dataset: Dataset,
    config: TrialConfig,
    input_shape: tuple[int, ...],
    device: str,
) -> dict[str, float]:
    """The held-out test split's metrics (``test_accuracy``, ...); empty without one."""
    import torch

    from automl.training import compute_metrics, forward_in_chunks

    if len(dataset.X_test) == 0:
        return {}
    x = torch.from_numpy(dataset.X_test).reshape((len(dataset.X_test), *input_shape)).to(device)
    y = torch.from_numpy(dataset.y_test).to(device)
    model.eval()
    with torch.no_grad():
        out = forward_in_chunks(model, x)
    metrics = compute_metrics(out, y, dataset.task, dataset.n_outputs, dataset.preprocessor.y_std)
    return {"test_" + k.removeprefix("val_"): round(float(v), 6) for k, v in metrics.items()}


def kept_weights_path(
    trial: FrozenTrial, storage_url: str | None = None, study_name: str | None = None
) -> Path | None:
    """The file where the search kept this trial's weights: the user attr ``weights_path``
    (as stored, then beside the SQLite file), else ``<number>.weights.pt`` in the study's
    checkpoint folder; None when there is none."""
    from automl.storage import _sqlite_path, resolve_storage_url

    url = resolve_storage_url(storage_url)
    candidates: list[Path] = []
    value = trial.user_attrs.get("weights_path")
    if value:
        candidates.append(Path(str(value)))
        sqlite = _sqlite_path(url)
        if sqlite is not None and not Path(str(value)).is_absolute():
            candidates.append(sqlite.parent / str(value))
    if study_name is not None:
        try:
            from automl.checkpoints import study_checkpoint_dir
        except ImportError:  # pragma: no cover - checkpoints are optional
            pass
        else:
            candidates.append(study_checkpoint_dir(url, study_name) / f"{trial.number}.weights.pt")
    return next((p for p in candidates if p.is_file()), None)


def _load_kept_weights(
    model: torch.nn.Module, trial: FrozenTrial, storage_url: str | None, study_name: str
) -> None:
    import torch

    path = kept_weights_path(trial, storage_url, study_name)
    if path is None:
        where = trial.user_attrs.get("weights_path")
        detail = f" (its file {where} is gone)" if where else ""
        raise UsageError(
            f"the search kept no weights for trial #{trial.number}{detail}; "
            "run retrain without --reuse to train it again"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{path}: cannot read the kept weights: {exc}") from None
    state = saved
    if isinstance(saved, dict):
        for key in ("state_dict", "model", "model_state", "weights"):
            if isinstance(saved.get(key), dict):
                state = saved[key]
                break
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(
            f"{path}: the kept weights do not fit trial #{trial.number}'s model ({first}); "
            "run retrain without --reuse"
        ) from None


# --------------------------------------------------------------------------- the file


def _plain(value: Any) -> Any:
    """Only types ``weights_only`` loading accepts: numpy scalars become Python ones."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    for kind in (bool, int, float, str):  # subclasses (TorchVersion, IntEnum) are globals
        if isinstance(value, kind):
            return kind(value)
    return value


def save_model_file(doc: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash mid-write never leaves a half file under ``path``."""
    import torch

    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name such as model.pt")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(doc, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a bad path as RuntimeError
        why = exc.strerror if isinstance(exc, OSError) else str(exc).split("strerror: ")[-1]
        raise AutomlError(f"cannot write {path}: {why}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class LoadedModel:
    """A model file, ready to predict."""

    model: torch.nn.Module
    config: TrialConfig
    preprocessor: Preprocessor
    input_shape: tuple[int, ...]
    task: str
    classes: list[Any]
    provenance: dict[str, Any]
    dropped_columns: list[str] = field(default_factory=list)


def load_model_file(path: str | Path) -> LoadedModel:
    """Read a model file with ``weights_only=True`` and rebuild the model."""
    import pickle

    import torch

    from automl.data import Preprocessor
    from automl.models import build_model
    from automl.spaces import TrialConfig

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{p}: is a folder, not a model file; give the file retrain wrote")
    if not p.is_file():
        raise UsageError(
            f"{p}: no such model file; make one with automl retrain STUDY -o {shlex.quote(str(p))}"
        )
    try:
        doc = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused it; never retry without: that would run the file's code.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f": it holds Python objects ({found.group(1)}), never loaded" if found else ""
        raise UsageError(
            f"{p}: not an automl model file{what}; make one with automl retrain"
        ) from None
    except Exception:  # torch's zip/pickle readers fail in many ways on junk
        # (their words, 'pop from empty list', say nothing to the user)
        raise UsageError(
            f"{p}: not an automl model file (it is not a file torch saved); give the file "
            "automl retrain wrote"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise UsageError(f"{p}: not an automl model file; make one with automl retrain")
    if int(doc.get("version", 0)) > MODEL_VERSION:
        raise UsageError(
            f"{p}: model file version {doc['version']} is newer than this automl reads "
            f"({MODEL_VERSION}); upgrade automl"
        )
    config = TrialConfig.from_dict(doc["config"])
    shape = tuple(int(s) for s in doc["input_shape"])
    model = build_model(config, shape, int(doc["n_outputs"]))
    model.load_state_dict(doc["state_dict"])
    model.eval()
    return LoadedModel(
        model=model,
        config=config,
        preprocessor=Preprocessor.from_state(doc["preprocessor"]),
        input_shape=shape,
        task=str(doc["task"]),
        classes=list(doc.get("classes") or []),
        provenance=dict(doc.get("provenance") or {}),
        dropped_columns=[str(c) for c in doc.get("dropped_columns") or []],
    )


# --------------------------------------------------------------------------- predict


@dataclass
class Prediction:
    """Predictions in input row order, and what was noticed on the way."""

    frame: pd.DataFrame
    ignored_columns: list[str] = field(default_factory=list)
    target_present: bool = False


def predict_file(
    model_file: str | Path, data_file: str | Path, *, proba: bool = False
) -> Prediction:
    """Apply the model file's preprocessing and model to a CSV, Parquet or NPZ file."""
    from automl.data import read_table

    loaded = load_model_file(model_file)
    frame, image_shape = read_table(
        data_file, header=loaded.preprocessor.header, missing_hint="check the DATA_FILE path"
    )
    if str(data_file).lower().endswith(".npz"):
        frame = _npz_by_position(loaded, frame, image_shape, str(data_file))
    return predict_frame(loaded, frame, proba=proba, source=str(data_file))


def _npz_by_position(
    loaded: LoadedModel, frame: pd.DataFrame, image_shape: list[int] | None, source: str
) -> pd.DataFrame:
    """An NPZ's X (columns x0, x1, ...) for a model whose features have names (a bundled
    dataset's, a CSV's): its values taken in order, as many as the model takes, whatever
    X's shape (digits as N x 8 x 8, N x 1 x 8 x 8 or N x 64). A count that does not fit
    is said as shapes, not as missing columns."""
    pre = loaded.preprocessor
    needed = pre.feature_columns
    if set(needed) <= set(frame.columns) or pre.categorical:
        return frame  # an NPZ model's own columns (or text features: by name only)
    given = [c for c in frame.columns if c != "y"]
    if len(given) != len(needed):
        shape = " x ".join(map(str, image_shape)) if image_shape else str(len(given))
        wanted = " x ".join(map(str, loaded.input_shape))
        raise DataError(
            f"{source}: each row of X holds {shape} values ({len(given)}); the model takes "
            f"{wanted} ({len(needed)}) a row"
        )
    values = frame[given].copy()
    values.columns = list(needed)
    return values


def predict_frame(
    loaded: LoadedModel, frame: pd.DataFrame, *, proba: bool = False, source: str = "data"
) -> Prediction:
    """Predict every row of ``frame``; the target column and extra columns are ignored."""
    import numpy as np
    import pandas as pd
    import torch

    pre = loaded.preprocessor
    needed = pre.feature_columns
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise DataError(
            f"{source}: lacks the feature column(s) {shown} the model was trained on "
            f"(it needs {len(needed)} columns, named as in the training data)"
        )
    target_present = pre.target is not None and pre.target in frame.columns
    expected = {*needed, pre.target, *loaded.dropped_columns}  # data.drop: no surprise
    ignored = [c for c in frame.columns if c not in expected]
    if ignored:
        log.warning(
            "%s: ignoring %d column(s) the model does not use: %s",
            source,
            len(ignored),
            ", ".join(map(str, ignored[:8])) + (" ..." if len(ignored) > 8 else ""),
        )
    if proba and loaded.task != "classification":
        raise UsageError("--proba needs a classification model; this one does regression")
    X = pre.transform(frame, warn=source)
    x = torch.from_numpy(X).reshape((len(X), *loaded.input_shape))
    from automl.training import forward_in_chunks

    with torch.no_grad():
        out = forward_in_chunks(loaded.model, x)
    if loaded.task == "classification":
        probs = _probabilities(out, loaded.config.loss)
        labels = pre.decode_target(probs.argmax(axis=1))
        result = pd.DataFrame({"prediction": _label_series(labels, loaded.classes)})
        if proba:
            for j, cls in enumerate(loaded.classes):
                result[f"proba_{cls}"] = np.round(probs[:, j], 6)
    else:
        values = pre.decode_target(out.squeeze(-1).double().numpy())
        result = pd.DataFrame({"prediction": np.asarray(values, dtype=np.float64)})
    return Prediction(
        frame=result, ignored_columns=[str(c) for c in ignored], target_present=target_present
    )


def _probabilities(out: torch.Tensor, loss: str) -> np.ndarray:
    import torch

    if loss == "bce":  # trained as independent sigmoids: normalise them
        p = torch.sigmoid(out.double())
        p = p / p.sum(dim=1, keepdim=True).clamp(min=1e-12)
    else:
        p = torch.softmax(out.double(), dim=1)
    return p.numpy()


def _label_series(labels: np.ndarray, classes: list[Any]) -> Any:
    """Labels keep the type they had in the training data (ints stay ints, text text)."""
    import pandas as pd

    if classes and all(isinstance(c, bool) for c in classes):
        return pd.Series(labels, dtype=bool)
    if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return pd.Series(labels, dtype="int64")
    return pd.Series(labels, dtype=object)


# The file types predictions are written as, by the output's suffix (compressed CSV:
# .csv.gz and the like, by pandas).
PREDICTION_FORMATS = {
    "": "csv",
    ".csv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def prediction_format(output: Path, inputs: tuple[Path, ...] = ()) -> str:
    """The format predictions go to ``output`` in (PREDICTION_FORMATS), checked before
    any work: not a folder, not one of the ``inputs`` (``-o data.csv`` would replace the
    user's data with a column of predictions), a known file type."""
    if output.is_dir():
        raise UsageError(
            f"-o {output}: is a folder; name a file, e.g. {output / 'predictions.csv'}"
        )
    refuse_overwrite(output, [(source, "the input file") for source in inputs])
    suffixes = [x.lower() for x in output.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[0] == ".csv" and suffixes[1] in (".gz", ".bz2", ".xz"):
        return "csv"
    kind = PREDICTION_FORMATS.get(output.suffix.lower())
    if kind is None:
        raise UsageError(
            f"-o {output}: unknown file type '{output.suffix}'; use .csv (or .csv.gz) or .parquet"
        )
    return kind


def write_predictions(prediction: Prediction, output: str | Path | None) -> str | None:
    """CSV or Parquet (by the suffix) to ``output``, whole or not at all (through a
    temporary file); with no output, the CSV text (for stdout)."""
    if output is None:
        return str(prediction.frame.to_csv(index=False))
    path = Path(output)
    kind = prediction_format(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "parquet":
            prediction.frame.to_parquet(tmp, index=False)
        else:
            compression = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}.get(path.suffix.lower())
            prediction.frame.to_csv(tmp, index=False, compression=compression)
        os.replace(tmp, path)
    except OSError as exc:
        raise AutomlError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):  # (no folder to hold it: nothing to remove)
            tmp.unlink(missing_ok=True)
    return None
