"""Helper processes that train a pack's fused pieces beside the run (``run --pack K`` on a
CPU with several cores).

A fused piece trains on one core; a pack of 8 trials is one to four pieces, trained one
after another. Threads do not help (a fused step is tens of small operations, each taking
the GIL), and torch's own threads lose badly to any other load on the cores. So the run
starts helper processes, as many as its share of cores allows, and a pack's pieces are
shared out: this process and each idle helper take the costliest piece left.

What a helper does is pure computation: it gets a copy of the run's data once, then
pieces (configurations, the objective, and what the pruner needs), trains each with
``packing.train_packed`` and sends back, per member, every epoch's metrics and how it
ended. Only the run's own process writes to the study: it reports those epochs as if it
had trained the piece itself (packing._run_group with the reply), so the study holds the
same records either way. Every piece's pruner compares with the trials finished before
its pack (and the piece's own earlier members), so the decisions do not depend on which
process trains a piece, or when.

A helper ignores SIGINT and SIGTERM (the run stops, then stops it), dies with the run
(PR_SET_PDEATHSIG), and a helper that is lost hands its piece back to the run. Helpers
start when the run starts (importing torch on the other cores while the run imports its
own) and are used only once they are ready.

``AUTOML_PACK_PROCESSES=N`` sets how many processes train a pack (1: no helpers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from automl.data import DeviceData
    from automl.spaces import Space, TrialConfig

log = logging.getLogger(__name__)

PROCESSES_ENV = "AUTOML_PACK_PROCESSES"
MAX_PROCESSES = 8
# A helper lost (crashed, killed) is started again at most this many times a run.
MAX_RESTARTS = 2
# Pruners a helper can apply itself: they read only the finished trials' values.
HELPER_PRUNERS = ("median", "percentile", "threshold", "none")
# Each helper holds a copy of the run's data: no helpers for data above this size.
MAX_HELPER_BYTES = 512 * 2**20


def planned_processes(space: Space, pack: int, device: str) -> int:
    """How many processes should train this run's packs: its cores (its share of them
    under ``--workers``, which a pack run spends on processes of one thread each, not on
    one process's threads) divided by torch's threads a process (``OMP_NUM_THREADS``,
    set by the user), at most the pack size and MAX_PROCESSES; 1 where helpers cannot
    help (a GPU, a pruner that reads more than the finished trials' values).
    ``AUTOML_PACK_PROCESSES`` overrides the count."""
    from automl.workers import n_cores, visible_gpus

    if pack < 2 or space.model != "mlp":  # (only MLPs are fused)
        return 1
    if device not in ("cpu", "auto") or (device == "auto" and (visible_gpus() or _may_pick_mps())):
        return 1
    if not space.is_multi_objective and space.study.pruner.name not in HELPER_PRUNERS:
        return 1
    raw = os.environ.get(PROCESSES_ENV, "").strip()
    if raw:
        wanted = int(raw) if raw.isdigit() else 1
    else:
        share = os.environ.get("AUTOML_NUM_THREADS", "")
        cores = int(share) if share.isdigit() and int(share) > 0 else n_cores()
        wanted = cores // _threads_per_process()
    return max(1, min(wanted, pack, MAX_PROCESSES))


def _threads_per_process() -> int:
    """Torch's threads in each process of a pack run: one, unless the user set
    ``OMP_NUM_THREADS`` (a ``--workers`` worker's own share, ``AUTOML_NUM_THREADS``, goes
    to processes instead)."""
    if os.environ.get("AUTOML_NUM_THREADS"):
        return 1
    raw = os.environ.get("OMP_NUM_THREADS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _may_pick_mps() -> bool:
    return sys.platform == "darwin"


# --------------------------------------------------------------------------- messages


@dataclass
class Pruning:
    """What a helper's pruner needs: the study's pruner, the objective it prunes on, the
    study's direction, and the intermediate values of the trials finished before the
    pack (by trial number)."""

    pruner: Any
    metric: str
    direction: Any
    finished: list[tuple[int, int, dict[int, float]]]  # (number, trial id, values)


@dataclass
class Job:
    """One piece for a helper: members' configurations, trial numbers and ids."""

    key: int
    configs: list[TrialConfig]
    numbers: list[int]
    trial_ids: list[int]
    objective: str
    patience: int
    pruning: Pruning | None
    session: int = 0  # the Pool.session it belongs to


@dataclass
class MemberRecord:
    """How a member of a piece trained in a helper went: the metrics of every epoch it
    reported, and how it ended: "complete" (``result``: its PackedResult's fields, the
    best weights as arrays), "pruned", "diverged" or "error" (``message``, and the
    exception's type name in ``error_type``)."""

    history: list[dict[str, float]]
    kind: str
    message: str = ""
    error_type: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def outcome(self) -> Any:
        """The member's end as train_packed returns it: a PackedResult or an exception."""
        import optuna
        import torch

        from automl.packing import PackedResult
        from automl.training import TrialDiverged

        if self.kind == "complete":
            fields = dict(self.result)
            state = fields.pop("best_state", None)
            if state is not None:
                state = {k: torch.from_numpy(v) for k, v in state.items()}
            # (its history: the epochs the record holds, the very metrics it reported)
            return PackedResult(**fields, history=self.history, best_state=state)
        if self.kind == "pruned":
            return optuna.TrialPruned(self.message)
        if self.kind == "diverged":
            return TrialDiverged(self.message)
        error = type(self.error_type or "RuntimeError", (RuntimeError,), {})
        return error(self.message)


def record_of(history: list[dict[str, float]], result: Any) -> MemberRecord:
    """A member's MemberRecord from its hook's history and train_packed's result."""
    import optuna

    from automl.packing import PackedResult
    from automl.training import TrialDiverged

    if isinstance(result, PackedResult):
        fields = {
            name: getattr(result, name)
            for name in (
                "metrics",
                "epochs_run",
                "best_epoch",
                "n_params",
                "train_seconds",
                "stopped_early",
                "group_size",
            )
        }
        if result.best_state is not None:
            fields["best_state"] = {k: v.cpu().numpy() for k, v in result.best_state.items()}
        return MemberRecord(history, "complete", result=fields)
    if isinstance(result, optuna.TrialPruned):
        return MemberRecord(history, "pruned", str(result))
    if isinstance(result, TrialDiverged):
        return MemberRecord(history, "diverged", str(result))
    return MemberRecord(history, "error", str(result), error_type=type(result).__name__)


def make_job(
    key: int,
    trials: Sequence[optuna.Trial],
    configs: Sequence[TrialConfig],
    run: Any,
    finished: Sequence[optuna.trial.FrozenTrial],
) -> Job:
    """The Job of a piece: ``trials`` and their ``configs``, and what the helper's pruner
    needs of ``run``'s study (the ``finished`` trials' values for a percentile pruner)."""
    import optuna

    from automl.packing import pack_pruning

    space = run.objective.space
    study = run.study
    pruner = study.pruner
    pruning = None
    if not space.is_multi_objective and not isinstance(pruner, optuna.pruners.NopPruner):
        pruning = Pruning(
            pruner=pruner,
            metric=space.objectives[0],
            direction=study.direction,
            finished=(
                [(t.number, t._trial_id, dict(t.intermediate_values)) for t in finished]
                if pack_pruning(pruner)
                else []
            ),
        )
    return Job(
        key=key,
        configs=list(configs),
        numbers=[t.number for t in trials],
        trial_ids=[t._trial_id for t in trials],
        objective=space.objectives[0],
        patience=space.train.patience,
        pruning=pruning,
    )


# --------------------------------------------------------------------------- the helper


def _frozen(number: int, trial_id: int, values: dict[int, float], running: bool) -> Any:
    """A FrozenTrial holding only what a pruner reads: number, id, state, values."""
    from optuna.trial import FrozenTrial, TrialState

    return FrozenTrial(
        number=number,
        state=TrialState.RUNNING if running else TrialState.COMPLETE,
        value=None,
        datetime_start=None,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values=values,
        trial_id=trial_id,
    )


def train_job(job: Job, data: DeviceData) -> list[MemberRecord]:
    """Train ``job``'s piece as one fused group, pruning as the run would
    (_PackPruner over the finished trials the job carries), and record each member."""
    import optuna

    from automl.packing import _PackPruner, pack_pruning, train_packed

    members = list(zip(job.numbers, job.trial_ids, strict=True))
    histories: list[list[dict[str, float]]] = [[] for _ in job.configs]
    pruning = job.pruning
    pruner: Any = None
    if pruning is not None:
        pruner = pruning.pruner
        if pack_pruning(pruner):
            pruner = _PackPruner(
                pruner,
                [_frozen(n, i, {}, True) for n, i in members],
                finished=[_frozen(n, i, v, False) for n, i, v in pruning.finished],
                direction=pruning.direction,
            )

    def hook_for(m: int) -> Any:
        number, trial_id = members[m]
        values: dict[int, float] = {}

        def hook(epoch: int, metrics: dict[str, float]) -> None:
            histories[m].append(dict(metrics))
            if pruning is None or pruning.metric not in metrics:
                return
            values[epoch] = metrics[pruning.metric]
            if pruner.prune(None, _frozen(number, trial_id, dict(values), True)):
                raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")

        return hook

    results = train_packed(
        job.configs,
        data,
        objective=job.objective,
        patience=job.patience,
        on_epoch=[hook_for(m) for m in range(len(job.configs))],
    )
    return [record_of(h, r) for h, r in zip(histories, results, strict=True)]


# What a helper process runs: python -c HELPER_CODE SOCKET_FD PARENT_PID THREADS ROOT.
HELPER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[4]); "
    "from automl.pack_pool import helper_main; helper_main(*map(int, sys.argv[1:4]))"
)


def helper_main(fd: int, parent: int, threads: int) -> None:
    """A helper process: import torch, take the run's data, then train pieces until told
    to stop or the run is gone."""
    import signal
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    import torch

    import automl.packing  # noqa: F401  (imported now, while the run starts)

    torch.set_num_threads(max(1, threads))
    conn = Connection(fd)
    try:
        kind, arrays = conn.recv()
        if kind != "data":
            return
        data = _device_data(arrays)
        conn.send(("ready", None))
        while True:
            kind, job = conn.recv()
            if kind != "train":
                return
            try:
                reply: tuple[str, Any] = ("done", train_job(job, data))
            except Exception as exc:  # the piece as a whole failed: the run fails its members
                reply = ("failed", f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    except (EOFError, OSError):  # the run is gone
        return


def _arrays(data: DeviceData) -> dict[str, Any]:
    """``data`` as plain arrays and values, to send to a helper."""
    out: dict[str, Any] = {
        name: getattr(data, name).numpy() for name in ("X_train", "y_train", "X_val", "y_val")
    }
    out.update(
        task=data.task, n_outputs=data.n_outputs, input_shape=data.input_shape, y_std=data.y_std
    )
    return out


def _device_data(arrays: dict[str, Any]) -> DeviceData:
    import torch

    from automl.data import DeviceData

    return DeviceData(
        X_train=torch.from_numpy(arrays["X_train"]),
        y_train=torch.from_numpy(arrays["y_train"]),
        X_val=torch.from_numpy(arrays["X_val"]),
        y_val=torch.from_numpy(arrays["y_val"]),
        task=arrays["task"],
        n_outputs=arrays["n_outputs"],
        input_shape=tuple(arrays["input_shape"]),
        y_std=arrays["y_std"],
    )


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when the run dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the run died before that took effect
        os._exit(0)


# --------------------------------------------------------------------------- the pool


class _Helper:
    """The run's side of one helper process: its connection, and the thread that feeds
    it pieces.

    The process is a plain ``python -c`` (not multiprocessing's spawn, which runs the
    parent's main script again in the child: a script without a ``__main__`` guard
    would start the whole run twice), in a session of its own (a Ctrl-C in the terminal
    is the run's to handle), with no stdout or stderr of its own."""

    def __init__(self, pool: Pool, index: int) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        import automl

        self.pool = pool
        self.index = index
        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(automl.__file__)))
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    HELPER_CODE,
                    str(theirs.fileno()),
                    str(os.getpid()),
                    str(pool.threads),
                    root,
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.started = time.monotonic()
        self.ready = False
        self.dead = False
        self.job: Job | None = None
        self.thread = threading.Thread(
            target=self._serve, name=f"automl-pack-helper-{index}", daemon=True
        )
        self.thread.start()

    def _serve(self) -> None:
        pool = self.pool
        try:
            arrays = pool.wait_for_data()
            if arrays is None:
                return
            self.conn.send(("data", arrays))
            kind, _ = self.conn.recv()
            if kind != "ready":
                raise EOFError("the helper did not start")
            self.ready = True
            log.debug(
                "pack helper %d ready after %.2fs", self.index, time.monotonic() - self.started
            )
            while (job := pool.next_job(self)) is not None:
                self.conn.send(("train", job))
                reply = self.conn.recv()
                pool.job_done(self, job, reply)
        except Exception as exc:  # lost (killed, crashed): its piece goes back
            log.debug("pack helper %d lost: %s", self.index, exc)
        finally:
            self.dead = True
            pool.helper_lost(self)

    def stop(self) -> None:
        """End the process at once: it holds nothing to save, and a clean exit would
        take torch's teardown (a few tenths of a second) from the run."""
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(timeout=5.0)
        with contextlib.suppress(Exception):
            self.conn.close()
        self.dead = True


class Pool:
    """The helper processes of one run (``processes - 1`` of them) and the pieces of the
    pack being trained (see the module docstring)."""

    def __init__(self, processes: int, threads: int = 1) -> None:
        self.threads = threads
        self.cond = threading.Condition()
        self.arrays: dict[str, Any] | None = None
        self.have_data = False
        self.disabled = False
        self.closed = False
        self.queue: list[Job] = []  # in the order given (costliest first)
        self.session_id = 0  # the current session's; jobs of an earlier one are dropped
        self.replies: list[tuple[int, Any]] = []
        self.restarts = 0
        self.started = time.monotonic()
        self.helpers: list[_Helper] = []
        for index in range(processes - 1):
            try:
                self.helpers.append(_Helper(self, index))
            except Exception as exc:  # cannot start processes here: train alone
                log.debug("cannot start a pack helper: %s", exc)
                break

    @property
    def processes(self) -> int:
        """This process and its helpers that are up or starting (a lost one that will not
        be started again no longer counts)."""
        if self.disabled:
            return 1
        return 1 + sum(1 for h in self.helpers if not h.dead or self.restarts < MAX_RESTARTS)

    # ------------------------------------------------------------------ the run's side

    def set_data(self, data: DeviceData | None) -> None:
        """The run's data, for the helpers (None: they cannot have it, and end): a copy
        each, so only data up to MAX_HELPER_BYTES goes."""
        arrays = None
        if data is not None:
            tensors = (data.X_train, data.y_train, data.X_val, data.y_val)
            size = sum(t.numel() * t.element_size() for t in tensors)
            if all(t.device.type == "cpu" for t in tensors) and size <= MAX_HELPER_BYTES:
                arrays = _arrays(data)
        with self.cond:
            self.arrays, self.have_data = arrays, True
            self.disabled = arrays is None  # the helpers end; none is started again
            self.cond.notify_all()

    @contextlib.contextmanager
    def session(self, jobs: Sequence[Job]) -> Iterator[Iterator[tuple[int, Any]]]:
        """Share ``jobs`` with the helpers for the block, each taken in the order given
        (costliest first, so that the last ones to end are short); iterate the
        result to get, one at a time, ``(key, None)`` for a piece this process must train
        itself and ``(key, records)`` for one a helper trained. Leaving the block early
        (a stop signal, an error) kills the helpers still training."""
        self._restart_lost()
        log.debug(
            "pack: %d piece(s); helpers ready: %d of %d (%.2fs since they started)",
            len(jobs),
            sum(h.ready and not h.dead for h in self.helpers),
            len(self.helpers),
            time.monotonic() - self.started,
        )
        with self.cond:
            self.session_id += 1
            for job in jobs:
                job.session = self.session_id
            self.queue = list(jobs)
            self.replies = []
            self.cond.notify_all()
        finished = False
        counts = {"here": 0, "helpers": 0}
        try:
            yield self._results(counts)
            finished = True
            log.debug(
                "pack: %d piece(s) trained here, %d by helpers", counts["here"], counts["helpers"]
            )
        finally:
            with self.cond:
                self.session_id += 1  # what is still out there belongs to no session now
                self.queue = []
                busy = [h for h in self.helpers if h.job is not None]
                self.replies = []
            if not finished:
                for helper in busy:
                    helper.stop()

    def _in_flight(self) -> int:
        return sum(
            1 for h in self.helpers if h.job is not None and h.job.session == self.session_id
        )

    def _results(self, counts: dict[str, int]) -> Iterator[tuple[int, Any]]:
        while True:
            with self.cond:
                while not self.queue and not self.replies and self._in_flight():
                    self.cond.wait(timeout=0.05)  # (short: the run's signals get through)
                if self.replies:
                    key, reply = self.replies.pop(0)
                    counts["helpers"] += 1
                elif self.queue:
                    key, reply = self.queue.pop(0).key, None
                    counts["here"] += 1
                else:
                    return
            yield key, reply

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue = []
            self.cond.notify_all()
        for helper in self.helpers:
            helper.stop()

    def _restart_lost(self) -> None:
        if self.disabled:
            return
        for i, helper in enumerate(self.helpers):
            if helper.dead and self.restarts < MAX_RESTARTS and not self.closed:
                self.restarts += 1
                with contextlib.suppress(Exception):
                    helper.stop()
                    self.helpers[i] = _Helper(self, helper.index)

    # ------------------------------------------------------------------ helpers' side

    def wait_for_data(self) -> dict[str, Any] | None:
        with self.cond:
            while not self.have_data and not self.closed:
                self.cond.wait()
            return None if self.closed else self.arrays

    def next_job(self, helper: _Helper) -> Job | None:
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            job = self.queue.pop(0)
            helper.job = job
            return job

    def job_done(self, helper: _Helper, job: Job, reply: tuple[str, Any]) -> None:
        kind, body = reply
        with self.cond:
            helper.job = None
            if job.session == self.session_id:
                if kind == "done":
                    self.replies.append((job.key, body))
                else:  # the whole piece failed there: it fails here the same way
                    self.replies.append((job.key, _failed_records(job, str(body))))
                self.cond.notify_all()

    def helper_lost(self, helper: _Helper) -> None:
        with self.cond:
            job, helper.job = helper.job, None
            if job is not None and job.session == self.session_id:
                self.queue.insert(0, job)  # this process (or another helper) trains it
            self.cond.notify_all()


def _failed_records(job: Job, message: str) -> list[MemberRecord]:
    name, _, text = message.partition(": ")
    return [MemberRecord([], "error", text, error_type=name) for _ in job.configs]


@contextlib.contextmanager
def maybe_pool(space: Space, pack: int, device: str) -> Iterator[Pool | None]:
    """A Pool of helper processes for this run when they can help (planned_processes),
    else None; closed (its helpers stopped) at the end of the block."""
    processes = planned_processes(space, pack, device)
    if processes < 2:
        yield None
        return
    pool = Pool(processes, threads=_threads_per_process())
    if not pool.helpers:
        yield None
        return
    try:
        yield pool
    finally:
        pool.close()
