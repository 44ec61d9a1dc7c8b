"""Several worker processes on one machine, sharing one study through its storage.

``automl run ... --workers N`` re-runs the same command line N times as child processes
with ``--workers 1 --json``. The storage is the only thing they share: each child is an
ordinary ``automl run`` (the same one a second machine would start), so heartbeats,
retries, ``--until`` and graceful stops work the same way with one process or many. The
parent creates the study first, gives each child its share of the cores (and of the
GPUs), polls the storage for one combined progress display, forwards Ctrl-C / SIGTERM,
and folds the children's results and exit codes into one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from automl.spaces import Space
    from automl.studies import RunSummary

log = logging.getLogger(__name__)

# Set in each child: its index (0..N-1), used to give every worker its own sampler seed.
WORKER_INDEX_ENV = "AUTOML_WORKER_INDEX"
WORKERS_ENV = "AUTOML_WORKERS"  # and how many workers this machine's run started
POLL_SECONDS = 1.0
# `run` options the parent handles itself (the budget is split, the URL travels in the
# environment, the study is named explicitly, a warm start is enqueued once).
PARENT_ONLY = (
    *("workers", "as_json", "n_trials", "until", "timeout", "storage", "study"),
    "warm_start",
)
# A child killed by a signal, or one whose exit code means nothing to us, counts as failed.
FAILED = 1


# --------------------------------------------------------------------------- pure helpers


def n_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def threads_per_worker(n_workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``n_workers`` so that together they fill, not
    oversubscribe, the cores."""
    return max(1, (cores if cores is not None else n_cores()) // max(1, n_workers))


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA devices a child may be given, without importing torch: the entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else one index per GPU the NVIDIA driver
    lists."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return [str(i) for i in range(len(list(gpus.iterdir())))]
    except OSError:
        return []


def worker_env(
    index: int,
    n_workers: int,
    *,
    base: Mapping[str, str] | None = None,
    gpus: Sequence[str] = (),
    cores: int | None = None,
) -> dict[str, str]:
    """The environment of worker ``index``: its thread count, its GPU when there are
    several, and its index (for its own sampler seed)."""
    env = dict(os.environ if base is None else base)
    threads = str(threads_per_worker(n_workers, cores))
    # torch sizes its intra-op pool from OMP_NUM_THREADS when it starts.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "AUTOML_NUM_THREADS"):
        env[name] = threads
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    # A machine given its own index (AUTOML_WORKER_INDEX=k) numbers its workers
    # k*N .. k*N+N-1, so no two workers anywhere share a sampler seed.
    machine = env.get(WORKER_INDEX_ENV, "0")
    offset = int(machine) * n_workers if machine.isdigit() else 0
    env[WORKER_INDEX_ENV] = str(offset + index)
    env[WORKERS_ENV] = str(n_workers)  # (a pack's share of --until: packing._room)
    return env


def split_trials(n_trials: int, n_workers: int) -> list[int]:
    """Share ``n_trials`` among at most ``n_workers`` workers, as evenly as possible."""
    n = min(n_trials, n_workers)
    return [n_trials // n + (1 if i < n_trials % n else 0) for i in range(n)]


def combine_exit_codes(codes: Sequence[int], *, signalled: int | None = None) -> int:
    """One exit code for the whole run: 128+signal when the parent was stopped by one,
    else the first failing child's code (1 for a child killed by a signal), else 0."""
    if signalled is not None:
        return 128 + signalled
    for code in codes:
        if code != 0:
            return code if code > 0 else FAILED
    return 0


# --------------------------------------------------------------------------- the parent


@dataclass
class WorkerResult:
    index: int
    exit_code: int
    doc: dict[str, Any] | None = None


@dataclass
class WorkersResult:
    summary: RunSummary
    workers: list[WorkerResult] = field(default_factory=list)
    exit_code: int = 0


def prepare_study(space: Space, study_name: str, storage_url: str, *, seed: int | None) -> None:
    """Check the data, then create the study once, before any worker starts (so N workers
    never race to create it, and bad data writes nothing)."""
    from automl.storage import open_storage
    from automl.studies import create_study, load_for_space

    seed = seed if seed is not None else space.study.seed
    space, _ = load_for_space(space, seed)
    create_study(space, study_name, open_storage(storage_url), seed=seed)


def run_workers(
    worker_args: Sequence[str],
    *,
    n_workers: int,
    study_name: str,
    storage_url: str,
    n_trials: int | None,
    until: int | None,
    timeout: float | None,
    device: str = "auto",
    display: Display | None = None,
) -> WorkersResult:
    """Start the workers (``automl`` + ``worker_args`` + a budget each), wait for all of
    them while ``display`` shows the study's progress, and fold their results."""
    from automl.storage import mask_url
    from automl.studies import RunSummary

    if n_trials is None and until is None and timeout is None:
        n_trials = 20
    budgets: list[list[str]]
    if n_trials is not None:
        budgets = [["--n-trials", str(k)] for k in split_trials(n_trials, n_workers)]
        if len(budgets) < n_workers:
            log.warning(
                "--n-trials %d keeps %d of the %d workers busy: starting %d",
                n_trials,
                len(budgets),
                n_workers,
                len(budgets),
            )
    else:
        budgets = [[] for _ in range(n_workers)]
    for budget in budgets:
        if until is not None:
            budget += ["--until", str(until)]
        if timeout is not None:
            budget += ["--timeout", repr(timeout)]
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    base = dict(os.environ)
    # The URL travels in the environment, not on the command line `ps` shows.
    base["AUTOML_STORAGE"] = storage_url
    display = display or NullDisplay()
    started = time.monotonic()
    poller = _StudyPoller(study_name, storage_url)
    counts = poller.poll()
    if until is not None and counts.n_finished >= until:
        # The cron form with nothing left to do: no worker needs to start.
        summary = RunSummary(study_name=study_name, storage=mask_url(storage_url))
        summary.stop_reason = (
            f"the study already holds {counts.n_finished} finished trials (--until {until})"
        )
        return WorkersResult(summary=summary)
    target = n_trials if n_trials is not None else until
    display.start(counts, target=target, counting="finished" if until else "run")
    children: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    signalled: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        signalled.append(signum)
        # A closed terminal (SIGHUP) stops the workers the clean way, as SIGTERM does.
        to_send = signal.SIGTERM if signum == signal.SIGHUP else signum
        for child, _ in children:
            if child.poll() is None:
                child.send_signal(to_send)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    exit_order: list[int] = []
    try:
        for index, budget in enumerate(budgets):
            if signalled:  # stopped while starting: start no more
                break
            out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _result
            cmd = [*automl_command(), *worker_args, *budget, "--workers", "1", "--json"]
            env = worker_env(index, len(budgets), base=base, gpus=gpus)
            # Own process group: a terminal's Ctrl-C reaches the parent only, which passes
            # it on once (a second Ctrl-C, passed on again, stops the workers at once).
            child = subprocess.Popen(cmd, stdout=out, env=env, start_new_session=True)
            children.append((child, out))
            log.debug("worker %d: pid %d, %s threads", index, child.pid, env["OMP_NUM_THREADS"])
        while len(exit_order) < len(children):
            for i, (child, _) in enumerate(children):
                if i not in exit_order and child.poll() is not None:
                    exit_order.append(i)
            display.update(poller.poll())
            if len(exit_order) < len(children):
                _sleep(POLL_SECONDS)
        display.update(poller.poll())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for child, _ in children:
            if child.poll() is None:  # only when the parent itself is failing
                child.kill()
                child.wait()
        display.stop()
    results = [_result(i, child, out) for i, (child, out) in enumerate(children)]
    summary = RunSummary(study_name=study_name, storage=mask_url(storage_url))
    reasons: list[str] = []
    for r in results:
        doc = r.doc or {}
        summary.n_complete += int(doc.get("n_complete", 0))
        summary.n_pruned += int(doc.get("n_pruned", 0))
        summary.n_failed += int(doc.get("n_failed", 0))
        reason = doc.get("stop_reason") or (f"exit code {r.exit_code}" if r.exit_code else "")
        if reason and reason not in reasons:
            reasons.append(reason)
    final = poller.poll()
    if any(r.doc is None for r in results):
        # A worker that stopped on an error or a signal printed no counts: take what the
        # study gained while the workers ran (other machines' trials included).
        summary.n_complete = final.n_complete - counts.n_complete
        summary.n_pruned = final.n_pruned - counts.n_pruned
        summary.n_failed = final.n_failed - counts.n_failed
    if reasons and all(r.startswith("ran ") for r in reasons):
        # Each worker ran its share of --n-trials: say what they ran together.
        reasons = [f"ran {summary.n_run} trial(s)"]
    if signalled:
        summary.stop_reason = f"stopped by {signal.Signals(signalled[0]).name}"
    elif until is not None and final.n_finished >= until:
        summary.stop_reason = (
            f"the study holds {final.n_finished} finished trials (--until {until})"
        )
    else:
        summary.stop_reason = "; ".join(reasons)
    summary.stop_reason += f" ({len(results)} workers)"
    summary.seconds = time.monotonic() - started
    code = combine_exit_codes(
        [results[i].exit_code for i in exit_order], signalled=signalled[0] if signalled else None
    )
    return WorkersResult(summary=summary, workers=results, exit_code=code)


def args_from_context(ctx: Any, *, skip: Sequence[str] = ()) -> list[str]:
    """Rebuild a command line from a click context: the parent command's options, the
    subcommand's name, then every option and argument given a non-default value (minus
    the parameters named in ``skip``). Options other helpers add pass through unchanged."""

    def params(c: Any) -> list[str]:
        args: list[str] = []
        positional: list[str] = []
        for p in c.command.params:
            if p.name in skip or p.name not in c.params:
                continue
            value = c.params[p.name]
            if p.param_type_name == "argument":
                values = value if isinstance(value, (list, tuple)) else [value]
                positional += [str(v) for v in values if v is not None]
                continue
            if value is None or value == p.default or (p.multiple and not value):
                continue
            if getattr(p, "is_flag", False) and isinstance(value, bool):
                names = p.opts if value else p.secondary_opts
                if names:
                    args.append(names[0])
                continue
            for v in value if p.multiple else [value]:
                args += [p.opts[0], str(v)]
        return positional + args

    parent = ctx.parent
    head = params(parent) if parent is not None and parent.parent is None else []
    return [*head, ctx.info_name, *params(ctx)]


def automl_command() -> list[str]:
    """How to start ``automl`` with this very interpreter and package."""
    script = Path(sys.executable).with_name("automl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from automl.cli import entry; entry()"]


def _sleep(seconds: float) -> None:
    # Interrupted by a forwarded signal is fine: the loop just polls again.
    time.sleep(seconds)


def _result(index: int, child: subprocess.Popen[bytes], out: IO[bytes]) -> WorkerResult:
    code = child.returncode if child.returncode is not None else FAILED
    out.seek(0)
    text = out.read().decode(errors="replace").strip()
    out.close()
    doc = None
    if text:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            log.warning("worker %d printed something that is not JSON: %.200s", index, text)
    return WorkerResult(index=index, exit_code=code, doc=doc)


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class StudyCounts:
    """What the parent reads from the storage each poll."""

    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_running: int = 0
    best: str = "no complete trial yet"
    finished: tuple[Any, ...] = ()  # FrozenTrials finished since the last poll

    @property
    def n_finished(self) -> int:
        return self.n_complete + self.n_pruned

    @property
    def n_run(self) -> int:
        return self.n_complete + self.n_pruned + self.n_failed


class _StudyPoller:
    """Reads trial counts and the best value of one study (cheaply, and never raising:
    a busy storage just shows the last counts)."""

    def __init__(self, study_name: str, storage_url: str) -> None:
        self.study_name = study_name
        self.storage_url = storage_url
        self._storage: Any = None
        self._study_id: int | None = None
        self._seen: set[int] = set()
        self._polled = False
        self._last = StudyCounts()

    def poll(self) -> StudyCounts:
        try:
            self._last = self._poll()
        except Exception as exc:  # a locked or restarting database: keep the last counts
            log.debug("progress poll failed: %s", exc)
        return self._last

    def _poll(self) -> StudyCounts:
        from optuna.study import StudyDirection
        from optuna.trial import TrialState

        from automl.storage import open_storage

        if self._storage is None:
            self._storage = open_storage(self.storage_url)
            self._study_id = self._storage.get_study_id_from_name(self.study_name)
        storage, study_id = self._storage, self._study_id
        assert study_id is not None
        trials = storage.get_all_trials(study_id, deepcopy=False)
        directions = storage.get_study_directions(study_id)
        by_state = {s: 0 for s in TrialState}
        for t in trials:
            by_state[t.state] += 1
        done = [t for t in trials if t.state.is_finished() and t.number not in self._seen]
        # Trials finished before the workers started are counted, not listed.
        first_poll, self._polled = not self._polled, True
        self._seen.update(t.number for t in done)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = "no complete trial yet"
        if complete and len(directions) == 1:
            pick = max if directions[0] == StudyDirection.MAXIMIZE else min
            top = pick(complete, key=lambda t: t.value)
            best = f"best {top.value:.4g} (#{top.number})"
        elif complete:
            best = f"{len(complete)} complete (several objectives)"
        return StudyCounts(
            n_complete=by_state[TrialState.COMPLETE],
            n_pruned=by_state[TrialState.PRUNED],
            n_failed=by_state[TrialState.FAIL],
            n_running=by_state[TrialState.RUNNING],
            best=best,
            finished=() if first_poll else tuple(sorted(done, key=lambda t: t.number)),
        )


class Display:
    """The combined progress display (a base that shows nothing)."""

    def start(self, counts: StudyCounts, *, target: int | None, counting: str) -> None:
        pass

    def update(self, counts: StudyCounts) -> None:
        pass

    def stop(self) -> None:
        pass


NullDisplay = Display


class PlainDisplay(Display):
    """One line per finished trial, whichever worker ran it (for logs and cron)."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write or (lambda line: print(line, flush=True))

    def start(self, counts: StudyCounts, *, target: int | None, counting: str) -> None:
        if target is None:
            goal = "trials until the timeout"
        elif counting == "finished":
            goal = f"until the study holds {target} finished trials"
        else:
            goal = f"{target} trial(s)"
        self.write(f"running {goal} with several workers; {counts.best}")

    def update(self, counts: StudyCounts) -> None:
        from automl.progress import describe_trial

        for trial in counts.finished:
            self.write(f"{describe_trial(trial)}; {counts.best}; {counts.n_running} running")


class RichDisplay(Display):
    """A live bar over the whole study: trials done/target, best so far, trials running."""

    def __init__(self, n_workers: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.n_workers = n_workers
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn(f"[bold]trials ({n_workers} workers)"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"),
            TextColumn("[dim]{task.fields[running]} running"),
        )
        self.task: Any = None
        self.counting = "run"
        self.baseline = 0

    def _done(self, counts: StudyCounts) -> int:
        if self.counting == "finished":
            return counts.n_finished
        return counts.n_run - self.baseline

    def start(self, counts: StudyCounts, *, target: int | None, counting: str) -> None:
        self.counting = counting
        self.baseline = counts.n_run
        self.progress.start()
        self.task = self.progress.add_task(
            "trials", total=target, completed=self._done(counts), best=counts.best, running=0
        )

    def update(self, counts: StudyCounts) -> None:
        self.progress.update(
            self.task, completed=self._done(counts), best=counts.best, running=counts.n_running
        )

    def stop(self) -> None:
        self.progress.stop()


def make_display(*, quiet: bool, n_workers: int) -> Display:
    if quiet:
        return Display()
    if sys.stdout.isatty():
        return RichDisplay(n_workers)
    return PlainDisplay()


# --------------------------------------------------------------------------- gRPC proxy


def serve_proxy(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 13000,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``storage_url`` to workers over gRPC (Optuna's storage proxy) until stopped.

    Workers then use ``--storage grpc://HOST:PORT``: hundreds of them share a few
    database connections instead of one each. The channel has no TLS and no
    authentication, so it belongs on a private network."""
    from automl.errors import StorageError, UsageError
    from automl.storage import _journal_path, mask_url, open_storage

    if storage_url.startswith("grpc://"):
        raise UsageError("the proxy serves a database, not another proxy; give --storage a URL")
    if _journal_path(storage_url) is not None:
        raise UsageError(
            "Optuna's gRPC proxy cannot serve a journal file; use a database URL "
            "(sqlite:///..., postgresql+psycopg://...)"
        )
    try:
        import grpc  # noqa: F401
        from optuna.storages import get_storage
        from optuna.storages._grpc.server import make_server
    except ModuleNotFoundError as exc:
        raise StorageError(
            f"the gRPC proxy needs '{exc.name}'; pip install 'automl[grpc]'", bad_input=True
        ) from None
    # The cached storage is what Optuna recommends behind the proxy (fewer queries).
    storage = get_storage(open_storage(storage_url))
    try:
        server = make_server(storage, host, port)
        server.start()
    except RuntimeError as exc:  # grpc: "Failed to bind to address"
        raise UsageError(
            f"cannot listen on {host}:{port} ({exc}); is the port in use? pick another --port"
        ) from None
    (ready or log.info)(
        f"serving {mask_url(storage_url)} on grpc://{host}:{port} (no TLS, no authentication: "
        "keep it on a private network); Ctrl-C stops it"
    )
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=2)
