"""`run --pack` on several cores (pack_pool.py) and how a pack's members are pruned
(packing._PackPruner): a piece a helper process trains is recorded exactly as if this
process had trained it, a lost helper hands its piece back, no helper outlives its run,
and a pack prunes its later members against its earlier ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.study import StudyDirection
from optuna.trial import TrialState
from typer.testing import CliRunner

from automl.cli import app
from automl.data import DeviceData, load_dataset, to_device
from automl.pack_pool import (
    PROCESSES_ENV,
    Job,
    Pool,
    Pruning,
    _frozen,
    planned_processes,
    train_job,
)
from automl.packing import _PackPruner, pack_pieces
from automl.spaces import DataSpec, Space, TrialConfig, load_space

HELPER_CODE = "automl.pack_pool import helper_main"
RUN = [sys.executable, "-c", "from automl.cli import entry; entry()", "run"]


@pytest.fixture(scope="module")
def digits() -> DeviceData:
    torch.set_num_threads(1)
    return to_device(load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0), "cpu")


def _job(key: int, widths: list[int], lrs: list[float], *, epochs: int = 6) -> Job:
    """A piece of len(widths) members judged by a median pruner against eight finished
    trials whose values at every step are 0.5 .. 0.85."""
    configs = [
        TrialConfig(
            optimizer="rmsprop" if i % 2 else "adam",
            optimizer_params={"lr": lr},
            loss="nll",
            batch_size=64,
            epochs=epochs,
            n_layers=2,
            hidden_units=w,
            dropout=0.3,
            seed=100 * key + i,
        )
        for i, (w, lr) in enumerate(zip(widths, lrs, strict=True))
    ]
    finished = [(n, 900 + n, {s: 0.5 + 0.05 * n for s in range(epochs)}) for n in range(8)]
    pruning = Pruning(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        metric="val_accuracy",
        direction=StudyDirection.MAXIMIZE,
        finished=finished,
    )
    n = len(widths)
    return Job(
        key=key,
        configs=configs,
        numbers=list(range(10 * key, 10 * key + n)),
        trial_ids=list(range(1000 + 10 * key, 1000 + 10 * key + n)),
        objective="val_accuracy",
        patience=0,
        pruning=pruning,
    )


def _wait_ready(pool: Pool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(h.ready for h in pool.helpers):
        assert time.monotonic() < deadline, "the helper never became ready"
        time.sleep(0.05)


# --------------------------------------------------------------------------- pruning


def _pack_pruner(n: int, finished: list[Any] | None = None) -> _PackPruner:
    base = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    members = [_frozen(number, 10 + number, {}, True) for number in range(n)]
    return _PackPruner(base, members, finished=finished or [], direction=StudyDirection.MAXIMIZE)


def _report(pruner: _PackPruner, number: int, values: dict[int, float]) -> bool:
    return pruner.prune(None, _frozen(number, 10 + number, dict(values), True))


def test_a_pack_member_is_judged_against_the_members_asked_before_it() -> None:
    pruner = _pack_pruner(5)
    # Step 0 of a new study's first pack: nothing has finished, so Optuna's own median
    # pruner prunes no one; here members 0 and 1 are the two startup trials and the
    # later ones are held to their median.
    assert not _report(pruner, 0, {0: 0.9})
    assert not _report(pruner, 1, {0: 0.8})
    assert _report(pruner, 2, {0: 0.1})  # below 0.85, the median of 0.9 and 0.8
    # The pruned member no longer counts: against 0.9 and 0.8 (median 0.85), 0.82 is
    # pruned; had 0.1 still counted (median 0.8), it would not have been.
    assert _report(pruner, 3, {0: 0.82})
    assert not _report(pruner, 4, {0: 0.86})
    # Optuna's pruner alone, on a study with no finished trial, prunes none of them.
    study = optuna.create_study(direction="maximize", pruner=pruner.base)
    assert not pruner.base.prune(study, _frozen(2, 12, {0: 0.1}, True))


def test_a_pack_member_is_judged_against_the_finished_trials_too() -> None:
    finished = [_frozen(n, 900 + n, {0: 0.6, 1: 0.7}, False) for n in range(3)]
    pruner = _pack_pruner(2, finished)
    # Member 0 has no earlier member, but three finished trials (median 0.6).
    assert _report(pruner, 0, {0: 0.5})
    assert not _report(pruner, 1, {0: 0.65})
    # Member 1 at step 1: the finished trials' 0.7s, and member 0 no longer (pruned).
    assert _report(pruner, 1, {0: 0.65, 1: 0.69})


def test_a_pack_pruner_without_a_snapshot_reads_the_study_as_it_is() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.6, 0.7, 0.8):
        study.add_trial(
            optuna.trial.create_trial(
                value=value, intermediate_values={0: value}, params={}, distributions={}
            )
        )
    base = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    members = [_frozen(100, 500, {}, True)]
    pruner = _PackPruner(base, members)  # finished=None: the study's own
    assert pruner.prune(study, _frozen(100, 500, {0: 0.65}, True))  # median 0.7
    assert not pruner.prune(study, _frozen(100, 500, {0: 0.75}, True))


# --------------------------------------------------------------------------- helpers


@pytest.mark.slow
def test_a_helper_trains_a_piece_exactly_as_this_process_does(digits: DeviceData) -> None:
    jobs = [
        _job(0, [20, 40, 33], [3e-3, 1e-4, 2e-2]),
        _job(1, [64, 70], [1e-3, 5e-5]),
        _job(2, [8, 16, 12, 9], [1e-2, 3e-3, 1e-5, 5e-2]),
    ]
    pool = Pool(2)
    try:
        pool.set_data(digits)
        _wait_ready(pool)
        with pool.session(jobs) as session:
            remote = {}
            for key, reply in session:
                if reply is None:  # this process's share (meanwhile the helper takes one)
                    train_job(jobs[key], digits)
                else:
                    remote[key] = reply
        assert remote, "the helper trained no piece"
    finally:
        pool.close()
    kinds = set()
    for key, records in remote.items():
        here = train_job(jobs[key], digits)
        assert [r.history for r in records] == [r.history for r in here]
        assert [(r.kind, r.message) for r in records] == [(r.kind, r.message) for r in here]
        kinds |= {r.kind for r in records}
        for theirs, mine in zip(records, here, strict=True):
            if theirs.kind == "complete":
                timed = {"train_seconds"}
                assert {k: v for k, v in theirs.result["metrics"].items() if k not in timed} == {
                    k: v for k, v in mine.result["metrics"].items() if k not in timed
                }
                for name, array in theirs.result["best_state"].items():
                    assert (array == mine.result["best_state"][name]).all()
    assert "complete" in kinds


@pytest.mark.slow
def test_a_lost_helper_hands_its_piece_back(digits: DeviceData) -> None:
    job = _job(0, [128, 128], [1e-3, 1e-3], epochs=400)  # long enough to be killed in
    pool = Pool(2)
    try:
        pool.set_data(digits)
        _wait_ready(pool)
        helper = pool.helpers[0]
        with pool.session([job]) as session:
            deadline = time.monotonic() + 30
            while helper.job is None:  # the helper takes it first: this loop is idle
                assert time.monotonic() < deadline
                time.sleep(0.01)
            helper.process.kill()
            got = list(session)
        assert got == [(0, None)]  # back to this process, to train here
        assert helper.dead
    finally:
        pool.close()
    assert all(h.process.poll() is not None for h in pool.helpers)


def test_a_closed_pool_leaves_no_process(digits: DeviceData) -> None:
    pool = Pool(3)
    pids = [h.process.pid for h in pool.helpers]
    assert len(pids) == 2
    pool.close()  # while they still import torch
    for pid in pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _helpers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.split(") ")[1].split()[1]) == pid and HELPER_CODE in cmdline:
            found.append(int(entry.name))
    return found


_LONG_SPACE = (
    "name: digits\ndata: {dataset: digits}\ntrain: {epochs: 500, patience: 0}\n"
    "study: {pruner: none}\n"
    "space:\n  optimizer: {adam: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}\n"
    "  hidden_units: {low: 8, high: 32}\n"
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_run_takes_its_helpers_with_it(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(_LONG_SPACE)
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    env = {**os.environ, PROCESSES_ENV: "3"}
    proc = subprocess.Popen(
        [*RUN, str(space), "--n-trials", "100", "--pack", "4", "--storage", url, "--device", "cpu"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        helpers: list[int] = []
        while len(helpers) < 2:
            assert time.monotonic() < deadline, "no helper started"
            time.sleep(0.1)
            helpers = _helpers_of(proc.pid)
        time.sleep(2.0)  # ready, and training
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in helpers)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigint_with_helpers_leaves_no_trial_running_and_no_helper(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(_LONG_SPACE)
    url = f"sqlite:///{tmp_path / 'int.db'}"
    proc = subprocess.Popen(
        [*RUN, str(space), "--n-trials", "100", "--pack", "4", "--storage", url, "--json"],
        cwd=tmp_path,
        env={**os.environ, PROCESSES_ENV: "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    helpers: list[int] = []
    while not helpers:
        assert time.monotonic() < deadline, "no helper started"
        time.sleep(0.1)
        helpers = _helpers_of(proc.pid)
    while True:  # the first pack is asked (a loaded machine may take a while)
        assert time.monotonic() < deadline, "no trial started"
        try:
            if optuna.load_study(study_name="digits", storage=url).trials:
                break
        except KeyError:  # no study yet
            pass
        time.sleep(0.1)
    time.sleep(1.5)  # the first pack trains, in both processes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not any(_alive(pid) for pid in helpers)
    states = [t.state for t in optuna.load_study(study_name="digits", storage=url).trials]
    assert states and TrialState.RUNNING not in states


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path, tiny_space: Path) -> None:
    """Helpers are plain ``python -c`` processes: multiprocessing's spawn would run the
    caller's script again in each (its whole run, where it has no __main__ guard)."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "search.py"
    url = f"sqlite:///{tmp_path / 'once.db'}"
    script.write_text(
        "from pathlib import Path\n"
        f"with open({str(marker)!r}, 'a') as fh:\n"
        "    fh.write('run\\n')\n"
        "from automl.cli import app\n"
        f"app(['run', {str(tiny_space)!r}, '--n-trials', '8', '--pack', '4', "
        f"'--storage', {url!r}], standalone_mode=False)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, PROCESSES_ENV: "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "run\n"


# --------------------------------------------------------------------------- whole runs


def _record(url: str, name: str) -> list[tuple[Any, ...]]:
    trials = optuna.load_study(study_name=name, storage=url).trials
    return [
        (
            t.number,
            t.state,
            t.params,
            t.values,
            t.intermediate_values,
            t.user_attrs.get("epochs_run"),
        )
        for t in trials
    ]


@pytest.mark.slow
def test_a_seeded_pack_run_is_repeatable_with_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeded --pack runs hold the very same trials, whichever process trained which
    piece: the pieces, their pruning and the sampler's view do not depend on timing (the
    sampler's constant liar saw this process's running trials or not as a cache timer
    fell, and seeded runs went apart after a few packs)."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: rep\ndata: {dataset: digits}\ntrain: {epochs: 8, patience: 0}\n"
        "study: {seed: 3, pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 1}}\n"
        "space:\n"
        "  optimizer:\n"
        "    adam: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}}\n"
        "    rmsprop: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}}\n"
        "  hidden_units: {low: 8, high: 96, log: true}\n"
        "  n_layers: {low: 1, high: 2}\n"
        "  dropout: {low: 0.1, high: 0.4}\n"
    )
    monkeypatch.setenv(PROCESSES_ENV, "2")
    records = []
    trained_by_helpers = 0
    for i in range(2):
        url = f"sqlite:///{tmp_path / f'rep{i}.db'}"
        result = CliRunner().invoke(
            app,
            ["--debug", "run", str(space), "--n-trials", "48", "--pack", "8", "--storage", url],
        )
        assert result.exit_code == 0, result.output
        trained_by_helpers += sum(
            int(line.split("here, ")[1].split()[0])
            for line in result.stderr.splitlines()
            if "trained here, " in line
        )
        records.append(_record(url, "rep"))
    assert records[0] == records[1]
    assert len(records[0]) == 48
    assert {r[1] for r in records[0]} >= {TrialState.COMPLETE, TrialState.PRUNED}
    assert trained_by_helpers > 0


def test_planned_processes_follow_cores_threads_device_and_pruner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from automl import workers

    def space(pruner: str = "median", model: str = "mlp") -> Space:
        path = tmp_path / "s.yaml"
        path.write_text(
            f"data: {{dataset: digits}}\nmodel: {model}\nstudy: {{pruner: {pruner}}}\n"
            "space: {optimizer: {adam: {lr: 0.01}}}\n"
        )
        return load_space(path)

    for name in (PROCESSES_ENV, "AUTOML_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(workers, "n_cores", lambda: 4)
    monkeypatch.setattr(workers, "visible_gpus", lambda env=None: [])
    assert planned_processes(space(), 8, "cpu") == 4
    assert planned_processes(space(), 3, "auto") == 3  # no more than the pack
    assert planned_processes(space(), 1, "cpu") == 1  # no pack
    assert planned_processes(space(), 8, "cuda") == 1
    assert planned_processes(space("hyperband"), 8, "cpu") == 1  # writes to the study
    assert planned_processes(space(model="cnn"), 8, "cpu") == 1  # never fused
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert planned_processes(space(), 8, "cpu") == 2  # two threads each
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("AUTOML_NUM_THREADS", "1")  # a --workers worker's share: one core
    assert planned_processes(space(), 8, "cpu") == 1
    # A worker's share of 3 cores (its OMP_NUM_THREADS too): three processes, a thread each.
    monkeypatch.setenv("AUTOML_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert planned_processes(space(), 8, "cpu") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("AUTOML_NUM_THREADS", "1")
    monkeypatch.setenv(PROCESSES_ENV, "3")
    assert planned_processes(space(), 8, "cpu") == 3
    monkeypatch.setattr(workers, "visible_gpus", lambda env=None: ["0"])
    monkeypatch.delenv(PROCESSES_ENV)
    monkeypatch.delenv("AUTOML_NUM_THREADS")
    assert planned_processes(space(), 8, "auto") == 1  # auto will pick the GPU


def test_pack_pieces_share_the_work_among_processes(digits: DeviceData) -> None:
    same = [TrialConfig(hidden_units=64, n_layers=2, batch_size=64, seed=i) for i in range(8)]
    pieces, alone = pack_pieces(same, [True] * 8, digits, processes=1)
    assert pieces == [list(range(8))] and alone == []
    pieces, _ = pack_pieces(same, [True] * 8, digits, processes=2)
    assert sorted(map(len, pieces)) == [4, 4]
    assert sorted(i for p in pieces for i in p) == list(range(8))
    assert all(p == sorted(p) for p in pieces)  # members in the order they were asked
    # A retry (which resumes its checkpoint) and a CNN train one by one.
    mixed = [*same[:3], TrialConfig(model="cnn")]
    pieces, alone = pack_pieces(mixed, [True, False, True, True], digits, processes=1)
    assert pieces == [[0, 2]] and alone == [1, 3]
    # A lone compatible configuration is a piece of one: fused, not the sequential loop.
    pieces, alone = pack_pieces(same[:1], [True], digits, processes=2)
    assert pieces == [[0]] and alone == []
    # A pack of nothing but retries: no piece to share out.
    pieces, alone = pack_pieces(same[:3], [False] * 3, digits, processes=2)
    assert pieces == [] and alone == [0, 1, 2]


def test_a_run_with_several_processes_says_so_in_debug(tmp_path: Path, tiny_space: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dbg.db'}"
    env = {PROCESSES_ENV: "2"}
    result = CliRunner().invoke(
        app,
        ["--debug", "run", str(tiny_space), "--n-trials", "8", "--pack", "4", "--storage", url],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "piece(s); helpers ready" in result.stderr
    doc = optuna.load_study(study_name="tiny", storage=url)
    assert len(doc.trials) == 8
    assert all(t.state.is_finished() for t in doc.trials)


def test_data_too_big_to_copy_leaves_the_run_alone(
    digits: DeviceData, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automl import pack_pool

    monkeypatch.setattr(pack_pool, "MAX_HELPER_BYTES", 1000)
    pool = Pool(2)
    try:
        assert pool.processes == 2
        pool.set_data(digits)  # 500 kB: more than each helper may copy
        assert pool.processes == 1
        deadline = time.monotonic() + 30
        while not all(h.dead for h in pool.helpers):  # they end, and are not started again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pool._restart_lost()
        assert all(h.dead for h in pool.helpers) and pool.restarts == 0
    finally:
        pool.close()


def test_a_groups_hooks_run_in_the_callers_order_each_epoch(digits: DeviceData) -> None:
    """The pruner judges a member against the ones asked before it, so each epoch the
    members report in the order given, even where train_packed regroups them by
    optimizer (sgd, adam, sgd: adam's update runs on its own slice)."""
    from automl.packing import train_packed

    configs = [
        TrialConfig(optimizer=opt, optimizer_params={"lr": 0.01}, epochs=3, hidden_units=16, seed=i)
        for i, opt in enumerate(["sgd", "adam", "sgd"])
    ]
    calls: list[tuple[int, int]] = []

    def hook(m: int) -> Any:
        return lambda epoch, _metrics: calls.append((epoch, m))

    results = train_packed(configs, digits, on_epoch=[hook(m) for m in range(3)])
    assert all(not isinstance(r, Exception) for r in results)
    assert calls == [(e, m) for e in range(3) for m in range(3)]
