"""Per-epoch training checkpoints: where they live, atomic writes, hand-over to a retry,
and clean-up once a trial is finished.

A trial saves ``<dir>/<number>.pt`` at the end of every epoch. The folder sits beside a
SQLite storage (``studies/automl.db`` -> ``studies/automl.db.checkpoints/<study>/``) or a
journal file; other storages use ``./studies/checkpoints/<storage>/<study>/``, where
``<storage>`` names the server and database with a hash of the URL (its password left
out), so that studies of one name in two databases never share a folder;
``AUTOML_CHECKPOINT_DIR`` overrides all of them (several machines sharing a PostgreSQL
study want a shared folder there: one such folder per storage). A retried
trial (Optuna's ``failed_trial`` / ``retry_history`` system attributes) loads the newest
checkpoint of the trials it retries and carries on from the next epoch. A finished trial's
checkpoints are removed; the best trial keeps its weights as ``<number>.weights.pt``.

Every file holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "AUTOML_CHECKPOINT_DIR"
DURABLE_AFTER = 2.0  # seconds of training after which a checkpoint is fsync'ed
MAX_OVERHEAD = 0.1  # share of the training time checkpoints may take
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def checkpoint_root(storage_url: str) -> Path:
    """The folder holding every study's checkpoints for this storage."""
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        return Path(env)
    from automl.storage import _journal_path, _sqlite_path

    sqlite = _sqlite_path(storage_url)
    if sqlite is not None:
        return sqlite.with_name(sqlite.name + ".checkpoints")
    journal = _journal_path(storage_url)
    if journal is not None:
        return Path(journal + ".checkpoints")
    return Path("studies") / "checkpoints" / storage_tag(storage_url)


def storage_tag(storage_url: str) -> str:
    """A folder name for a database server's storage: its scheme, host and database made
    safe, and a hash of the URL without its password ('postgresql_db1.example_5432_exp-
    1f3a...')."""
    from automl.storage import mask_url

    masked = mask_url(storage_url)
    match = re.match(r"(?P<scheme>[^:/]+)://(?:[^@/]*@)?(?P<rest>.*)", masked)
    readable = f"{match['scheme'].split('+')[0]}_{match['rest'].split('?')[0]}" if match else masked
    safe = _UNSAFE.sub("_", readable).strip("._")[:48] or "storage"
    return f"{safe}-{hashlib.sha256(masked.encode()).hexdigest()[:10]}"


def study_checkpoint_dir(storage_url: str, study_name: str) -> Path:
    """The folder of one study's checkpoints: its name where that is a safe file name,
    else the name made safe (at most 64 characters) and a hash of the name itself, so that
    'exp/1', 'exp 1' and 'exp_1' never share a folder (nor one another's weights)."""
    safe = _UNSAFE.sub("_", study_name).strip(".")
    if safe != study_name or len(safe) > 64:
        digest = hashlib.sha256(study_name.encode()).hexdigest()[:12]
        safe = f"{safe[:64] or 'study'}-{digest}"
    return checkpoint_root(storage_url) / safe


def atomic_save(obj: Any, path: Path, *, durable: bool = True) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``: a kill mid-write
    leaves the previous file whole. ``durable`` also flushes it to the disk first (power
    loss), which costs a few milliseconds."""
    import torch

    from automl.lifecycle import signals_deferred

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with signals_deferred():  # a stop signal lands after the file, not inside torch.save
        try:
            with tmp.open("wb") as fh:
                torch.save(obj, fh)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def load_file(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents, or None when it is missing or unreadable (logged)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file must not break a resume
        log.warning("ignoring the unreadable checkpoint %s: %s", path, exc)
        return None
    return state if isinstance(state, dict) else None


class Checkpointer:
    """One trial's checkpoint: ``save`` after each epoch, ``load`` to resume.

    ``predecessors`` are the numbers of the trials this one retries, oldest first; the
    newest readable checkpoint among them (or this trial's own) is the one resumed."""

    def __init__(self, directory: Path, number: int, predecessors: Sequence[int] = ()) -> None:
        self.directory = directory
        self.number = number
        self.predecessors = list(predecessors)
        self.resumed_from_epoch: int | None = None  # epochs already done when resumed
        self.resumed_from_trial: int | None = None
        self.saved_epochs = 0
        self.last_epoch = 0  # epochs done at the last write (1-based count)
        self._last_save = time.monotonic()
        self._save_seconds = 0.0
        # Called before each write: the run writes the trial's buffered reports, so the
        # storage holds every epoch up to the checkpoint (storage_cache.flush_reports).
        self.before_save: Callable[[], None] | None = None
        # A finished state given in memory (a fused pack's member, which has no epoch
        # checkpoints): what keep_weights keeps, without a file written and read back.
        self.final: dict[str, Any] | None = None
        self.unwritable = False  # a write failed (a full disk): no more tries

    @property
    def path(self) -> Path:
        return self.directory / f"{self.number}.pt"

    @property
    def weights_path(self) -> Path:
        return self.directory / f"{self.number}.weights.pt"

    def _candidates(self) -> list[tuple[int, Path]]:
        numbers = [self.number, *reversed(self.predecessors)]
        return [(n, self.directory / f"{n}.pt") for n in numbers]

    def load(self) -> dict[str, Any] | None:
        """The newest checkpoint of this trial or the ones it retries, or None."""
        for number, path in self._candidates():
            state = load_file(path)
            if state is not None and "epoch" in state:
                self.resumed_from_epoch = int(state["epoch"]) + 1
                self.resumed_from_trial = number
                log.info(
                    "trial %d resumes from trial %d's checkpoint after epoch %d",
                    self.number,
                    number,
                    self.resumed_from_epoch,
                )
                return state
        return None

    def save(self, state: dict[str, Any], *, force: bool = True) -> bool:
        """Write ``state``. Unless ``force``d, skip it while the last write took more than
        MAX_OVERHEAD of the training time since (a big model with short epochs is then
        saved every few epochs, never losing more than ~10 write-times of work).
        Returns whether it wrote."""
        now = time.monotonic()
        since = now - self._last_save
        if self.unwritable or (not force and self._save_seconds > MAX_OVERHEAD * since):
            return False
        if self.before_save is not None:
            self.before_save()
        # fsync costs ~5 ms: worth it after a long epoch, not after a 10 ms one (whose
        # loss to a power cut costs less; an unreadable file is skipped on resume).
        try:
            atomic_save(state, self.path, durable=since >= DURABLE_AFTER)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
            # The trial trains on without checkpoints rather than fail (every trial
            # would, with a reason that differs by a byte offset each time).
            self.unwritable = True
            _warn_unwritable(self.path, exc, "the trial trains on without checkpoints")
            return False
        self._last_save = time.monotonic()
        self._save_seconds = self._last_save - now
        self.saved_epochs += 1
        self.last_epoch = int(state.get("epoch", -1)) + 1
        if self.saved_epochs == 1:
            # This trial's own checkpoint now supersedes the ones it resumed from.
            _remove(self.directory / f"{n}.pt" for n in self.predecessors)
        return True

    def keep_weights(self, meta: dict[str, Any]) -> Path | None:
        """Write the model of the last checkpoint (at the trial's best epoch) as
        ``<number>.weights.pt`` with ``meta`` (or of ``final``, when it was given); None
        when there is neither."""
        state = self.final
        if state is None:
            for _, path in self._candidates():
                state = load_file(path)
                if state is not None and "model" in state:
                    break
            else:
                return None
        model = state.get("best_model") or state["model"]
        best_epoch = int(state.get("best_epoch", state["epoch"]))
        try:
            atomic_save({"model": model, "epoch": best_epoch + 1, **meta}, self.weights_path)
        except (OSError, RuntimeError) as exc:
            _warn_unwritable(self.weights_path, exc, "retrain will train it anew")
            return None
        return self.weights_path

    def remove(self) -> None:
        """Remove this trial's checkpoint and its predecessors' (not kept weights)."""
        _remove(path for _, path in self._candidates())


_WARNED: set[Path] = set()  # folders already warned about in this process


def _warn_unwritable(path: Path, exc: BaseException, consequence: str) -> None:
    """One warning a folder: why ``path`` could not be written (a full disk named as such)."""
    import shutil

    if path.parent in _WARNED:
        return
    _WARNED.add(path.parent)
    try:
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        full = False
    if full or getattr(exc, "errno", None) == errno.ENOSPC:
        why = "the disk is full"
    else:
        why = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0][:200]
    log.warning("cannot write %s: %s; %s", path, why, consequence)


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only folder must not fail a finished trial
            log.debug("could not remove %s: %s", path, exc)


def prune_files(directory: Path, *, checkpoints: Iterable[int], weights: Iterable[int]) -> None:
    """Remove the checkpoints and kept weights of the trials named."""
    _remove(directory / f"{n}.pt" for n in checkpoints)
    _remove(directory / f"{n}.weights.pt" for n in weights)
