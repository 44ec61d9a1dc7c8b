"""What a user sees while a run goes on: a Rich progress bar on a terminal, plain lines
otherwise, nothing on stdout with --json."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def _best_text(study: optuna.Study) -> str:
    from automl.studies import _best_trials

    best = _best_trials(study)  # from the run's trial cache, no database query
    if not best:
        return "no complete trial yet"
    if len(study.directions) > 1:
        return f"{len(best)} on the Pareto front"
    return f"best {best[0].values[0]:.4g} (#{best[0].number})"


def describe_trial(trial: FrozenTrial) -> str:
    """One plain line for a finished trial (used for logs and non-terminal output)."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    state = trial.state.name.lower()
    if trial.values is not None and state == "complete":
        value = ", ".join(f"{v:.4g}" for v in trial.values)
    else:
        from automl.results import trial_note

        value = trial_note(trial) or "-"  # (a heartbeat failure: "no heartbeat (killed?)")
    return f"trial {trial.number} {state} value={value} in {seconds:.2f}s"


class PlainObserver:
    """One line per finished trial, to a stream (stdout when it is not a terminal)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def __enter__(self) -> PlainObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()

    def run_started(self, study: optuna.Study, target: int | None) -> None:
        goal = f"{target} trial(s)" if target is not None else "until the timeout"
        if target == 0:
            goal = "nothing: the budget is already met"
        print(f"study '{study.study_name}': running {goal}", file=self.stream, flush=True)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        pass

    def epoch_done(self, number: int, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        pass

    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None:
        print(f"{describe_trial(trial)}; {_best_text(study)}", file=self.stream, flush=True)


class QuietObserver(PlainObserver):
    """Nothing at all (for --json)."""

    def run_started(self, study: optuna.Study, target: int | None) -> None:
        pass

    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None:
        pass


class RichObserver:
    """A live progress bar: trials done/target, best so far, current trial's epoch."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"),
            TextColumn("[dim]{task.fields[current]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self._last = 0.0

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def run_started(self, study: optuna.Study, target: int | None) -> None:
        self.task = self.progress.add_task(
            "trials", total=target, best=_best_text(study), current=""
        )

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.update(self.task, current=f"trial {number} starting")

    def epoch_done(self, number: int, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if self.task is not None and (now - self._last > 0.1 or epoch + 1 == epochs):
            self._last = now
            self.progress.update(self.task, current=f"trial {number} epoch {epoch + 1}/{epochs}")

    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=1, best=_best_text(study), current="")


class LogFileObserver(PlainObserver):
    """Plain, timestamped lines appended to a file (``--log-file``, for cron): the start,
    each finished trial, and why the run stopped."""

    def __init__(self, path: str | Path) -> None:
        from automl.errors import UsageError

        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            stream = Path(path).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as exc:  # closed in __exit__
            raise UsageError(f"cannot open --log-file {path}: {exc.strerror}") from None
        super().__init__(stream)
        self.path = Path(path)

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def _line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._follow_rotation()
        print(f"{stamp} {text}", file=self.stream, flush=True)

    def _follow_rotation(self) -> None:
        """Reopen the path when the file was moved or removed under the run (logrotate
        without copytruncate): the lines go on to the path, not to the moved file."""
        try:
            here = os.stat(self.path)
            same = os.path.samestat(here, os.fstat(self.stream.fileno()))
        except OSError:
            same = False
        if same:
            return
        try:
            stream = self.path.open("a", encoding="utf-8", buffering=1)
        except OSError:  # keep writing where we can
            return
        self.stream.close()
        self.stream = stream

    def run_started(self, study: optuna.Study, target: int | None) -> None:
        goal = f"{target} trial(s)" if target is not None else "until the timeout"
        self._line(f"start: study '{study.study_name}', running {goal}, pid {os.getpid()}")

    def trial_finished(self, trial: FrozenTrial, study: optuna.Study) -> None:
        self._line(f"{describe_trial(trial)}; {_best_text(study)}")

    def run_finished(self, summary: Any) -> None:
        self._line(
            f"stop: {summary.stop_reason or 'done'}; {summary.n_complete} complete, "
            f"{summary.n_pruned} pruned, {summary.n_failed} failed in {summary.seconds:.1f}s"
        )


class TeeObserver:
    """Passes every event to each of several observers (the screen and a log file)."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def __enter__(self) -> TeeObserver:
        for o in self.observers:
            o.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for o in reversed(self.observers):
            o.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for o in self.observers:
                method = getattr(o, name, None)
                if method is not None:
                    method(*args, **kwargs)

        return call


def make_observer(*, quiet: bool, log_file: str | Path | None = None) -> Any:
    """The screen's observer (Rich bar on a terminal, plain lines otherwise, nothing with
    --json), teed to a log file when one is given."""
    screen: Any
    if quiet:
        screen = QuietObserver(sys.stderr)
    elif sys.stdout.isatty():
        screen = RichObserver()
    else:
        screen = PlainObserver()
    if log_file is None:
        return screen
    return TeeObserver(screen, LogFileObserver(log_file))
