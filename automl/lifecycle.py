"""A study's life across many runs: graceful stops on SIGINT/SIGTERM, space changes
between runs, warm starts from another study and configurations enqueued by hand."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from automl.errors import AutomlError, UsageError

if TYPE_CHECKING:
    import optuna

    from automl.spaces import Distribution, Space

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- graceful stops


class StopRequested(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM. A BaseException, so that no
    ``except Exception`` on the way (a trial's own error handling) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(AutomlError):
    """A run stopped by a signal after recording its state (exit 130 for SIGINT, 143 for
    SIGTERM, the shell's convention of 128 + the signal number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# A SIGTERM this soon after the first is the same stop sent twice, not a second request.
DUPLICATE_SIGTERM_SECONDS = 2.0


class GracefulStop:
    """Signal handling for one run. The first SIGINT/SIGTERM raises StopRequested in the
    main thread (at once while a model trains; at the end of a ``protected()`` block while
    the storage is being written); a second one exits the process at once, or, inside a
    ``protected()`` block, as soon as the block ends (a trial's failure and its queued
    retry are written together); a third one exits at once whatever is being written.
    A SIGTERM within DUPLICATE_SIGTERM_SECONDS of the first is the same stop (systemd
    signals every process of a service; a --workers parent passes its own on).
    A closed terminal's SIGHUP counts as SIGTERM (unless ignored, as under ``nohup``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._protected = 0
        self._exit_after: int | None = None  # a second signal's exit, held for the block
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        # Signal handlers belong to the main thread; elsewhere (a thread pool) do nothing.
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # nohup: a closed terminal is meant not to stop the run
                self._previous[s] = signal.signal(s, self._handle)
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._previous and _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM
        if (
            signum == signal.SIGTERM == self.signum
            and time.monotonic() - self._first_at < DUPLICATE_SIGTERM_SECONDS
        ):
            # The same stop twice (systemd signals every process of the service, and a
            # --workers parent passes its own on): not a request to exit at once.
            return
        if self.signum is not None:
            if self._protected and self._exit_after is None:
                self._exit_after = signum
                os.write(
                    2,
                    b"\nsecond interrupt: exiting once this write to the storage ends "
                    b"(once more to exit at once)\n",
                )
                return
            os.write(2, b"\nsecond interrupt: exiting at once\n")
            _exit(128 + signum)
            return  # not reached (but a test may stub os._exit)
        self.signum = signum
        self._first_at = time.monotonic()
        if not self._protected:
            raise StopRequested(signum)

    @contextmanager
    def protected(self, *, raise_pending: bool = True) -> Iterator[None]:
        """Defer the first signal until the block ends (storage writes stay whole); then
        raise it, or with ``raise_pending=False`` leave it to a later ``check()``. A
        second signal held by the block exits the process as the block ends."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1
            if self._exit_after is not None and not self._protected:
                _exit(128 + self._exit_after)
        if raise_pending and not self._protected:
            self.check()

    def check(self) -> None:
        """Raise StopRequested when a signal arrived while protected."""
        if self.signum is not None:
            raise StopRequested(self.signum)


def _exit(code: int) -> None:
    """Leave the process now, with what was printed so far flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# The GracefulStop whose handlers are installed (a run's), innermost last.
_ACTIVE: list[GracefulStop] = []


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Defer a stop signal to the end of the block when a run handles them (a checkpoint
    written whole: a signal raised inside torch.save came out as torch's own RuntimeError,
    and the trial failed for good instead of being recorded as interrupted)."""
    if not _ACTIVE or threading.current_thread() is not threading.main_thread():
        yield
        return
    with _ACTIVE[-1].protected():
        yield


class Heartbeats:
    """The heartbeats of running trials (one trial, or a fused pack's members) from one
    thread, each write retried: Optuna's own thread (one a trial) died at its first
    failed write, and on SQLite several writing at once fail with "database is locked"
    (a read turned write); a trial that never got a heartbeat was never found stale, and
    stayed RUNNING forever after a kill."""

    ATTEMPTS = 5

    def __init__(self, storage: Any, trial_ids: list[int]) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage = storage
        self.trial_ids = list(trial_ids)
        self.interval = storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeats:
        if self.interval is not None and self.trial_ids:
            self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        assert self.interval is not None
        while True:
            for trial_id in self.trial_ids:
                self._beat(trial_id)
                if self._stop.is_set():
                    return
            if self._stop.wait(timeout=self.interval):
                return

    def _beat(self, trial_id: int) -> None:
        for attempt in range(self.ATTEMPTS):
            try:
                self.storage.record_heartbeat(trial_id)
                return
            except Exception as exc:  # the next attempt, or the next round
                if attempt == self.ATTEMPTS - 1:
                    log.debug("heartbeat of trial id %d not recorded: %s", trial_id, exc)
                    return
                if self._stop.wait(timeout=0.05 * 2**attempt):
                    return


def retry_history(trial: optuna.Trial) -> list[int]:
    """The numbers of the trials ``trial`` retries, oldest first (empty for a new one)."""
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    return [int(n) for n in attrs.get("retry_history", [])]


def original_number(trial: optuna.Trial) -> int:
    """The number of the first trial of a retry chain (``trial``'s own when not a retry)."""
    history = retry_history(trial) if hasattr(trial, "storage") else []
    return history[0] if history else trial.number


def retry_later(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, epochs: int) -> int:
    """Enqueue a WAITING copy of an interrupted trial, the way Optuna's heartbeat retry
    does (same parameters, ``failed_trial``/``retry_history``), so the next run resumes
    it from its checkpoint after ``epochs`` epochs. It keeps the intermediate values of
    those epochs only: the ones after them are trained and reported again (a fused
    pack's member keeps no checkpoint and starts over; its old reports were judged by
    the pruner as if already reached). Returns the copy's number."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    system_attrs = {
        **trial.system_attrs,
        "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
        "retry_history": history,
    }
    user_attrs = {
        k: v
        for k, v in trial.user_attrs.items()
        if k not in ("fail_reason", "prune_reason", "resumed_from_epoch", "resumed_from_trial")
    }
    template = optuna.create_trial(
        state=optuna.trial.TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=user_attrs,
        system_attrs=system_attrs,
        intermediate_values={s: v for s, v in trial.intermediate_values.items() if s < epochs},
    )
    storage = study._storage
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    return storage.get_trial_number_from_id(trial_id)


# --------------------------------------------------------------------------- space changes

# Keys whose change makes old trials incomparable to new ones.
INCOMPARABLE = ("objective", "data")


def diff_spaces(old: Any, new: Any, path: str = "") -> list[tuple[str, str]]:
    """A key-path diff of two parsed space files: ``(path, "old -> new")`` pairs, with
    ``+`` for added and ``-`` for removed keys. Lists compare as whole values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, str]] = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append((where, f"- {_short(old[key])}"))
            elif key not in old:
                out.append((where, f"+ {_short(new[key])}"))
            else:
                out.extend(diff_spaces(old[key], new[key], where))
        return out
    if old != new:
        return [(path or "(space)", f"{_short(old)} -> {_short(new)}")]
    return []


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def incomparable_changes(changes: list[tuple[str, str]]) -> list[str]:
    """The changed key paths that make old trials incomparable (objective, data, task)."""
    return [p for p, _ in changes if p.split(".")[0] in INCOMPARABLE]


def check_space_change(study: optuna.Study, space: Space, *, allow: bool) -> list[str]:
    """Compare ``space`` with the one the study was made with; warn with the differences,
    refuse (UsageError) a change of objective, data or task unless ``allow``. The study
    then records the new space. Returns the diff lines."""
    import yaml

    name = study.study_name
    # Everything that refuses the run comes before the first write: a refused run leaves
    # the study as it was.
    directions = [d.name.lower() for d in study.directions]
    if directions != space.directions:
        raise UsageError(
            f"study '{name}' optimizes {directions} but the space asks {space.directions}; "
            "use another --study name"
        )
    old_source = study.user_attrs.get("space")
    if old_source is None:
        if study.get_trials(deepcopy=False):
            raise UsageError(
                f"study '{name}' was not made by automl (it keeps no space file); use "
                "another --study name"
            )
        study.set_user_attr("space", space.source)
        study.set_user_attr("space_hash", space.hash)
        return []
    if study.user_attrs.get("space_hash") == space.hash or old_source == space.source:
        return []
    try:
        old = yaml.safe_load(old_source) or {}
    except yaml.YAMLError:
        old = {}
    changes = diff_spaces(old, space.to_dict())
    lines = [f"{path}: {what}" for path, what in changes]
    if not changes:  # only comments or layout changed
        study.set_user_attr("space", space.source)
        study.set_user_attr("space_hash", space.hash)
        return []
    conflicts = optuna_conflicts(old, space)
    named = {c.split(":")[0] for c in conflicts}
    # The trials themselves too: a parameter fixed for one run in between is missing
    # from the stored space but not from the trials that sampled it before.
    conflicts += [c for c in trial_conflicts(study, space) if c.split(":")[0] not in named]
    if conflicts:
        raise UsageError(
            f"study '{name}' cannot take this space: {'; '.join(conflicts)} (Optuna keeps one "
            "set of choices, one int/float kind and one log scale per parameter in a study); "
            f"use another --study name, e.g. with --warm-start {name}"
        )
    bad = set(incomparable_changes(changes))
    if bad and not allow:
        shown = "; ".join(f"{path}: {what}" for path, what in changes if path in bad)
        raise UsageError(
            f"study '{name}' was made with another objective or data, so its trials would "
            f"not compare ({shown}); use another --study name, or --allow-space-change "
            "to mix them"
        )
    log.warning("the space of study '%s' changed since its last run:", name)
    for line in lines:
        log.warning("  %s", line)
    history = list(study.user_attrs.get("space_history", []))
    history.append(study.user_attrs.get("space_hash"))
    study.set_user_attr("space_history", history)
    study.set_user_attr("space", space.source)
    study.set_user_attr("space_hash", space.hash)
    return lines


def check_stored_space(storage: Any, space: Space, study_name: str, *, allow: bool) -> list[str]:
    """``check_space_change`` against the study of that name, when it exists."""
    import optuna

    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    return check_space_change(existing, space, allow=allow)


def optuna_conflicts(old_raw: Any, new: Space) -> list[str]:
    """Changes Optuna refuses within one study (every trial would fail): a categorical's
    choices, a range's int/float kind or its log scale."""
    from automl.spaces import distributions, parse_stored_space

    try:
        old = parse_stored_space(old_raw, file="(stored space)")
    except AutomlError:  # written by another version: nothing to compare with
        return []
    before, after = distributions(old), distributions(new)
    found = (_conflict(name, before[name], after[name]) for name in before.keys() & after.keys())
    return sorted(c for c in found if c is not None)


def _conflict(name: str, a: Any, b: Any, where: str = "") -> str | None:
    """Why Optuna refuses ``b`` for ``name`` in a study that sampled it from ``a`` (one
    set of choices, one int/float kind, one log scale), or None; ``where`` says where
    ``a`` comes from. A fixed value is never sampled: no conflict."""
    from automl.spaces import Categorical, Fixed, Range

    if isinstance(a, Fixed) or isinstance(b, Fixed):
        return None
    if isinstance(a, Categorical) and isinstance(b, Categorical):
        if list(a.choices) == list(b.choices):
            return None
        return f"{name}: choices {list(a.choices)}{where} -> {list(b.choices)}"
    if isinstance(a, Range) and isinstance(b, Range) and (a.kind, a.log) == (b.kind, b.log):
        return None
    return f"{name}: {a.describe()}{where} -> {b.describe()}"


def trial_conflicts(study: optuna.Study, new: Space) -> list[str]:
    """The parameters whose distribution in ``new`` Optuna would refuse next to the one
    an earlier trial sampled them from (the rules of ``optuna_conflicts``)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from automl.spaces import Categorical, Range, distributions

    after = distributions(new)
    out: dict[str, str] = {}
    checked: set[tuple[str, str]] = set()
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            key = (name, repr(dist))
            if name in out or key in checked or name not in after:
                continue
            checked.add(key)
            sampled: Any = (
                Categorical(tuple(dist.choices))
                if isinstance(dist, CategoricalDistribution)
                else Range(
                    dist.low,  # type: ignore[attr-defined]
                    dist.high,  # type: ignore[attr-defined]
                    "int" if isinstance(dist, IntDistribution) else "float",
                    bool(getattr(dist, "log", False)),
                )
            )
            why = _conflict(name, sampled, after[name], f" in trial #{trial.number}")
            if why is not None:
                out[name] = why
    return [out[name] for name in sorted(out)]


# --------------------------------------------------------------------------- configurations


def _fit(dist: Distribution, value: Any) -> tuple[Any, str | None]:
    """``value`` as ``dist`` takes it, or why it does not fit."""
    from automl.spaces import Categorical, Fixed

    if isinstance(dist, Fixed):
        return value, None if value == dist.value else f"is fixed to {dist.value!r} here"
    if isinstance(dist, Categorical):
        for choice in dist.choices:
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice, None
        return value, f"{value!r} is not one of {list(dist.choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, f"{value!r} is not a number"
    if not math.isfinite(value) or not dist.low <= value <= dist.high:
        return value, f"{value!r} is outside {dist.low:g}..{dist.high:g}"
    if dist.kind == "int":
        if float(value) != int(value):
            return value, f"{value!r} is not a whole number"
        value = int(value)
    if dist.step:
        k = (value - dist.low) / dist.step
        if abs(k - round(k)) > 1e-8:
            return value, f"{value!r} is not on the step {dist.step:g} from {dist.low:g}"
    return value, None


def fit_params(space: Space, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``params`` into those this space can take (under Optuna's names) and one
    reason line for each it cannot."""
    from automl.spaces import Fixed, _did_you_mean, distributions

    dists = distributions(space)
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in params.items():
        dist = dists.get(name)
        if dist is None:
            dropped.append(f"{name}: not in this space{_did_you_mean(name, dists)}")
            continue
        fitted, why = _fit(dist, value)
        if why is not None:
            dropped.append(f"{name}: {why}")
        elif not isinstance(dist, Fixed):
            kept[name] = fitted
    return kept, dropped


def study_space(study: optuna.Study) -> Space:
    """The space a study was last run with (stored in its user attributes)."""
    import yaml

    from automl.spaces import parse_stored_space

    source = study.user_attrs.get("space")
    if not source:
        raise UsageError(
            f"study '{study.study_name}' stores no space file; run it with automl first"
        )
    return parse_stored_space(
        yaml.safe_load(source), file=f"study '{study.study_name}'", source=source
    )


def enqueue_params(
    study: optuna.Study, space: Space, params: Mapping[str, Any], *, source: str
) -> tuple[dict[str, Any], bool]:
    """Validate one configuration against the study's space and enqueue it (the next
    ``run`` trains it first). Raises UsageError naming every parameter that does not fit.
    Returns the parameters and whether they were queued (False: the study has them)."""
    kept, dropped = fit_params(space, params)
    dropped += _unreached(space, kept)
    if dropped:
        raise UsageError(f"--params does not fit study '{study.study_name}': {'; '.join(dropped)}")
    if not kept:
        raise UsageError(
            "--params names no searched parameter; see them with `automl space show SPACE`"
        )
    before = len(study.get_trials(deepcopy=False))
    study.enqueue_trial(kept, user_attrs={"enqueued": source}, skip_if_exists=True)
    return kept, len(study.get_trials(deepcopy=False)) > before


def _unreached(space: Space, params: Mapping[str, Any]) -> list[str]:
    """Parameters of a branch the configuration does not take (adam_lr beside optimizer:
    sgd, lr_step beside lr_schedule: cosine): a trial would never use them, so a queued
    configuration that names them is not the one its author meant."""
    from automl.spaces import CONDITIONS

    out = []
    branches = {"optimizer": space.optimizer.options, "loss": space.loss.options}
    for kind, options in branches.items():
        chosen = params.get(kind)
        if chosen is None:
            continue
        for option, own in options.items():
            for p in own:
                name = f"{option}_{p}"
                if name in params and option != chosen:
                    out.append(f"{name} applies only when {kind} = {option}, not {chosen}")
    for name, (condition, when) in CONDITIONS.items():
        value = space.model if condition == "model" else params.get(condition)
        if name in params and value is not None and value not in when:
            out.append(f"{name} applies only when {condition} is {' or '.join(when)}")
    return out


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a data file's fingerprint), read in 1 MB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_data_file(study: optuna.Study, path: str | None, *, record: bool) -> None:
    """Warn when the study's data file is not the one its trials were trained on (a file
    replaced, a column removed, labels changed): their scores would not compare with new
    ones, and retrain would train on other data. ``record``: a study that has no
    fingerprint yet (a new one, or one from an earlier version) keeps this file's."""
    if path is None:
        return
    try:
        digest = file_digest(path)
    except OSError:
        return  # reading the data reports it
    stored = study.user_attrs.get("data_sha256")
    if stored is None:
        if record:
            study.set_user_attr("data_sha256", digest)
        return
    if stored != digest:
        log.warning(
            "the data file %s changed since study '%s' was made: its trials were trained on "
            "other data and do not compare with new ones; use another --study name to start "
            "afresh",
            path,
            study.study_name,
        )


def parse_warm_start(text: str) -> tuple[str, int]:
    """``OTHER`` or ``OTHER:K`` (K > 0, default 5)."""
    name, sep, k = text.rpartition(":")
    if not sep:
        name, k = text, "5"
    if not name or not k.isdigit() or int(k) < 1:
        raise UsageError(f"--warm-start {text!r}: use OTHER_STUDY or OTHER_STUDY:K with K >= 1")
    return name, int(k)


def warm_start_from(study: optuna.Study, space: Space, spec: str, storage_url: str) -> list[int]:
    """``--warm-start OTHER[:K]``: queue the best K fitting configurations of OTHER (in
    the same storage) into ``study``."""
    from automl.studies import load_study

    name, k = parse_warm_start(spec)
    if name == study.study_name:  # it would queue copies of its own best trials
        raise UsageError(
            f"--warm-start {spec}: names this study itself; name another study of the "
            "storage, whose best configurations this one starts from"
        )
    other = load_study(name, storage_url)
    used = warm_start(study, other, space, k=k)
    log.info("warm start: %d configuration(s) of study '%s' considered", len(used), name)
    return used


def warm_start(study: optuna.Study, other: optuna.Study, space: Space, *, k: int) -> list[int]:
    """Enqueue the best ``k`` complete configurations of ``other`` into ``study``, each
    cut to the parameters this space takes (the rest dropped with a warning); a
    configuration the study already holds is not enqueued again (cron runs repeat).
    Returns the numbers of the trials of ``other`` that were used."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = [
        t for t in other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values
    ]
    sign = -1.0 if other.directions[0] == StudyDirection.MAXIMIZE else 1.0
    complete.sort(key=lambda t: sign * t.values[0])
    used: list[int] = []
    for trial in complete[:k]:
        kept, dropped = fit_params(space, trial.params)
        for line in dropped:
            log.warning(
                "warm start: trial %d of '%s': dropped %s", trial.number, other.study_name, line
            )
        if not kept:
            continue
        study.enqueue_trial(
            kept,
            user_attrs={"warm_start": f"{other.study_name}#{trial.number}"},
            skip_if_exists=True,
        )
        used.append(trial.number)
    return used
