"""A study's life across runs: kills and retries from epoch checkpoints, graceful stops,
--max-failures, space changes, warm starts, enqueue and --log-file. The kill and SIGTERM
tests start real `automl run` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from automl import spaces
from automl.checkpoints import Checkpointer, study_checkpoint_dir
from automl.cli import app
from automl.data import load_dataset, to_device
from automl.lifecycle import diff_spaces, fit_params, parse_warm_start, warm_start
from automl.spaces import TrialConfig
from automl.studies import RunOptions, run_study
from automl.training import train
from automl.workers import automl_command

runner = CliRunner()

# Enough epochs that a kill or a signal lands mid-trial; iris keeps each epoch a few
# milliseconds.
SLOW_EPOCHS = 60
SLOW_SPACE = """\
name: slow
data:
  dataset: iris
  validation: 0.3
model: mlp
train:
  epochs: {SLOW_EPOCHS}
  patience: 0
objective: val_accuracy
study:
  sampler: random
  pruner: none
  seed: 2
space:
  optimizer:
    adam:
      lr: {low: 1.0e-3, high: 1.0e-1, log: true}
  batch_size: 8
  hidden_units: {low: 8, high: 16}
  n_layers: 1
""".replace("{SLOW_EPOCHS}", str(SLOW_EPOCHS))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AUTOML_HEARTBEAT_INTERVAL="1",
        AUTOML_GRACE_PERIOD="2",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    env.pop("AUTOML_STORAGE", None)
    return env


def _wait_for(condition: Any, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _wait_until_stale(storage_url: str, study: optuna.Study, number: int) -> None:
    """Wait until the storage itself counts the killed trial as stale. The grace period
    (2 s) is not enough on its own: SQLite stamps heartbeats in whole seconds, so the
    stale check can lag the kill by up to a further second."""
    from optuna.storages import RDBStorage

    storage = RDBStorage(storage_url, heartbeat_interval=1, grace_period=2)
    trial_id = study.trials[number]._trial_id
    deadline = time.monotonic() + 30
    while trial_id not in storage._get_stale_trial_ids(study._study_id):
        assert time.monotonic() < deadline, "the killed trial never went stale"
        time.sleep(0.1)
    storage.engine.dispose()


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def _flat(text: str) -> str:
    """Output with Rich's line wrapping undone."""
    return " ".join(text.split())


def _short_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("AUTOML_GRACE_PERIOD", "2")


def test_heartbeats_reach_every_member_through_failed_writes() -> None:
    """One thread beats for every trial of a pack, and a failed write ("database is
    locked") is retried: Optuna's thread a trial died at its first failure, and a trial
    never beaten was never found stale (RUNNING forever after a kill)."""
    import threading

    from optuna.storages._heartbeat import BaseHeartbeat

    from automl.lifecycle import Heartbeats

    class Flaky(BaseHeartbeat):
        def __init__(self) -> None:
            self.calls: dict[int, int] = {}
            self.beaten: set[int] = set()
            self.done = threading.Event()

        def record_heartbeat(self, trial_id: int) -> None:
            self.calls[trial_id] = self.calls.get(trial_id, 0) + 1
            if trial_id == 3 and self.calls[trial_id] < 3:
                raise RuntimeError("database is locked")
            self.beaten.add(trial_id)
            if self.beaten == {1, 2, 3, 4}:
                self.done.set()

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            return []

        def get_heartbeat_interval(self) -> int | None:
            return 60

        def get_heartbeat_stale_trial_callback(self) -> Any:
            return None

    storage = Flaky()
    with Heartbeats(storage, [1, 2, 3, 4]) as beats:
        assert storage.done.wait(timeout=10)
    assert beats._thread is not None and not beats._thread.is_alive()
    assert storage.calls == {1: 1, 2: 1, 3: 3, 4: 1}  # one round, trial 3 on its 3rd try


# --------------------------------------------------------------------------- checkpoints


def _iris() -> Any:
    space = spaces.parse_space(
        {"data": {"dataset": "iris", "validation": 0.3}, "objective": "val_accuracy"}
    )
    return to_device(load_dataset(space.data, seed=0), "cpu", model="mlp")


def test_resumed_training_matches_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("automl.checkpoints.MAX_OVERHEAD", float("inf"))  # every epoch
    data = _iris()
    config = TrialConfig(
        epochs=5,
        hidden_units=16,
        n_layers=1,
        batch_size=16,
        optimizer="sgd",
        optimizer_params={"lr": 0.1, "momentum": 0.9},
        dropout=0.2,
        noise_std=0.05,
        lr_schedule="step",
        lr_step=2,
        seed=3,
    )
    whole = train(config, data, objective="val_accuracy")

    class Crash(Exception):
        pass

    def crash_at_epoch_3(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        train(config, data, on_epoch=crash_at_epoch_3, checkpoint=Checkpointer(tmp_path, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.pt"]
    saved = torch.load(tmp_path / "0.pt", weights_only=True)
    assert saved["epoch"] == 1  # epochs 1 and 2 done; the crash came before epoch 3's save

    retry = Checkpointer(tmp_path, 7, predecessors=[0])
    resumed = train(config, data, objective="val_accuracy", checkpoint=retry)
    assert retry.resumed_from_epoch == 2 and retry.resumed_from_trial == 0
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    assert resumed.metrics["val_accuracy"] == whole.metrics["val_accuracy"]
    # the retry's own checkpoint replaced its predecessor's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7.pt"]
    weights = retry.keep_weights({"params": {"x": 1}})
    assert weights is not None
    kept = torch.load(weights, weights_only=True)
    assert kept["epoch"] == whole.best_epoch + 1 and kept["params"] == {"x": 1}


def test_slow_writes_are_thinned_but_the_last_epoch_is_always_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = Checkpointer(tmp_path, 0)
    assert ck.save({"epoch": 0}, force=False)  # the first write always happens
    ck._save_seconds = 3600.0  # as if that write had taken an hour
    assert not ck.save({"epoch": 1}, force=False)
    assert torch.load(ck.path, weights_only=True)["epoch"] == 0
    assert ck.save({"epoch": 2}, force=True)
    assert torch.load(ck.path, weights_only=True)["epoch"] == 2 and ck.last_epoch == 3


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    (tmp_path / "3.pt").write_bytes(b"half a checkpoint")
    torch.save({"epoch": 4, "model": {}}, tmp_path / "1.pt")
    ck = Checkpointer(tmp_path, 3, predecessors=[1])
    state = ck.load()
    assert state is not None and state["epoch"] == 4
    assert ck.resumed_from_trial == 1 and ck.resumed_from_epoch == 5


def test_checkpoints_live_beside_a_sqlite_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    assert study_checkpoint_dir(url, "ok_name-1.2") == tmp_path / "x.db.checkpoints" / "ok_name-1.2"
    # Names made safe keep a hash of themselves: 'a/b c' and 'a b/c' never share weights.
    folders = {study_checkpoint_dir(url, n) for n in ("a/b c", "a b/c", "a_b_c", "a b c")}
    assert len(folders) == 4
    assert study_checkpoint_dir(url, "a/b c").name.startswith("a_b_c-")
    assert len(study_checkpoint_dir(url, "x" * 300).name) == 64 + 13  # within NAME_MAX
    pg = "postgresql+psycopg://u:p@h/db"
    folder = study_checkpoint_dir(pg, "s")
    assert folder.parent.parent == Path("studies/checkpoints") and folder.name == "s"
    assert folder.parent.name.startswith("postgresql_h_db-")
    # Studies of one name in two databases never share checkpoints or weights; a changed
    # password is the same storage.
    others = ["postgresql+psycopg://u:p@h/db2", "mysql+pymysql://u:p@h/db", "grpc://h:50051"]
    assert len({folder, *(study_checkpoint_dir(o, "s") for o in others)}) == 4
    assert study_checkpoint_dir("postgresql+psycopg://u:other@h/db", "s") == folder
    journal = tmp_path / "j.log"
    assert study_checkpoint_dir(f"journal:{journal}", "s") == tmp_path / "j.log.checkpoints" / "s"
    monkeypatch.setenv("AUTOML_CHECKPOINT_DIR", str(tmp_path / "shared"))
    assert study_checkpoint_dir(pg, "s") == tmp_path / "shared" / "s"


# --------------------------------------------------------------------------- kill, resume


@pytest.mark.slow
def test_sigkill_mid_trial_then_until_resumes_it_from_its_checkpoint(
    tmp_path: Path, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = tmp_path / "slow.yaml"
    space.write_text(SLOW_SPACE)
    log = tmp_path / "cron.log"
    args = ["run", str(space), "--until", "3", "--storage", storage_url, "--log-file", str(log)]
    ckdir = tmp_path / "studies.db.checkpoints" / "slow"
    proc = subprocess.Popen(
        [*automl_command(), *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for(
        lambda: (
            log.exists() and "trial 0 complete" in log.read_text() and (ckdir / "1.pt").exists()
        ),
        proc,
        "trial 1's first checkpoint",
    )
    proc.kill()
    proc.wait()

    study = optuna.load_study(study_name="slow", storage=storage_url)
    assert _states(study) == ["COMPLETE", "RUNNING"]
    killed = study.trials[1]
    assert killed.intermediate_values  # it reported epochs before dying
    completed = study.trials[0]

    _short_heartbeat(monkeypatch)
    _wait_until_stale(storage_url, study, killed.number)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    study = optuna.load_study(study_name="slow", storage=storage_url)
    trials = study.trials
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,  # kept as it was
        TrialState.FAIL,  # the killed one, failed by its heartbeat
        TrialState.COMPLETE,  # its retry
        TrialState.COMPLETE,
    ]
    assert trials[0].value == completed.value and trials[0].params == completed.params
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 1
    assert retry.params == killed.params
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert 1 <= resumed_from < SLOW_EPOCHS
    assert retry.user_attrs["resumed_from_trial"] == 1
    # its epochs continue: the killed trial's values are kept, the rest were added
    assert sorted(retry.intermediate_values) == list(range(SLOW_EPOCHS))
    for step, value in killed.intermediate_values.items():
        assert retry.intermediate_values[step] == value
    assert retry.user_attrs["epochs_run"] == SLOW_EPOCHS
    assert retry.user_attrs["seed"] == completed.user_attrs["seed"] + 1  # trial 1's seed

    # checkpoints of finished trials are gone; the best one's weights are kept
    best = study.best_trial
    weights = Path(best.user_attrs["weights_path"])
    assert sorted(p.name for p in ckdir.iterdir()) == [weights.name]
    assert weights.name == f"{best.number}.weights.pt"
    state = torch.load(weights, weights_only=True)
    assert state["params"] == best.params and "model" in state

    lines = log.read_text().splitlines()
    assert sum("start: study 'slow'" in line for line in lines) == 2
    assert any("trial 2 complete value=" in line for line in lines)
    assert "stop: the study holds 3 finished trials (--until 3)" in lines[-1]

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="slow", storage=storage_url).trials) == 4


@pytest.mark.slow
def test_sigterm_records_the_trial_as_interrupted_and_the_next_run_resumes_it(
    tmp_path: Path, storage_url: str
) -> None:
    space = tmp_path / "slow.yaml"
    space.write_text(SLOW_SPACE)
    log = tmp_path / "cron.log"
    args = ["run", str(space), "--n-trials", "2", "--storage", storage_url, "--log-file", str(log)]
    ckdir = tmp_path / "studies.db.checkpoints" / "slow"
    proc = subprocess.Popen(
        [*automl_command(), *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for(lambda: (ckdir / "0.pt").exists(), proc, "trial 0's first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    message = err.decode()
    assert "interrupted by SIGTERM" in message and "retries it as trial 1" in message

    study = optuna.load_study(study_name="slow", storage=storage_url)
    assert _states(study) == ["FAIL", "WAITING"]
    stopped, waiting = study.trials
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert waiting.params == stopped.params
    assert study._storage.get_trial_system_attrs(waiting._trial_id)["failed_trial"] == 0
    assert (ckdir / "0.pt").exists()
    assert "stop: interrupted by SIGTERM" in log.read_text().splitlines()[-1]
    assert "trial 0 fail value=interrupted" in log.read_text()

    result = runner.invoke(app, ["run", str(space), "--n-trials", "1", "--storage", storage_url])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="slow", storage=storage_url)
    assert _states(study) == ["FAIL", "COMPLETE"]
    retry = study.trials[1]
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert sorted(retry.intermediate_values) == list(range(SLOW_EPOCHS))
    assert not (ckdir / "0.pt").exists() and not (ckdir / "1.pt").exists()


def test_a_pack_of_only_retries_trains_them_on_several_processes(
    tmp_path: Path, storage_url: str
) -> None:
    """A --pack run whose pack holds nothing but retries (as after a SIGTERM mid-pack)
    trains them; with helper processes it crashed on an empty
    list of fused pieces, and every later cron run with it."""
    space = tmp_path / "slow.yaml"
    epochs = 8 * SLOW_EPOCHS  # a fused pair of iris models: long enough to be cut off
    space.write_text(SLOW_SPACE.replace(f"epochs: {SLOW_EPOCHS}", f"epochs: {epochs}"))
    args = ["run", str(space), "--n-trials", "2", "--pack", "2", "--storage", storage_url]
    env = {**_env(), "AUTOML_PACK_PROCESSES": "1"}
    proc = subprocess.Popen(
        [*automl_command(), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def training() -> bool:
        try:
            study = optuna.load_study(study_name="slow", storage=storage_url)
        except KeyError:  # not created yet
            return False
        return _states(study) == ["RUNNING", "RUNNING"]

    _wait_for(training, proc, "the pack's trials")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert (  # the whole pack, not its last member alone
        "trials 0, 1 recorded as failed (interrupted), 0 with a checkpoint; the next run "
        "retries them as trials 2, 3"
    ) in _flat(err.decode())
    study = optuna.load_study(study_name="slow", storage=storage_url)
    assert _states(study) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(not t.intermediate_values for t in study.trials[2:])  # they start over

    result = runner.invoke(app, args, env={"AUTOML_PACK_PROCESSES": "2"})
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="slow", storage=storage_url)
    assert _states(study) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    for retry in study.trials[2:]:  # a fused group keeps no checkpoint: trained anew
        assert sorted(retry.intermediate_values) == list(range(epochs))


class _InterruptAt:
    """An observer that sends this process SIGINT at one epoch of one trial."""

    def __init__(self, trial: int, epoch: int) -> None:
        self.at = (trial, epoch)
        self.finished: list[str] = []

    def run_started(self, study: Any, target: Any) -> None:
        pass

    def trial_started(self, number: int, params: Any) -> None:
        pass

    def epoch_done(self, number: int, epoch: int, epochs: int, metrics: Any) -> None:
        if (number, epoch) == self.at:
            os.kill(os.getpid(), signal.SIGINT)

    def trial_finished(self, trial: Any, study: Any) -> None:
        self.finished.append(f"{trial.number} {trial.state.name}")

    def run_finished(self, summary: Any) -> None:
        self.finished.append(summary.stop_reason)


def test_sigint_stops_after_recording_the_trial(tiny_space: Path, storage_url: str) -> None:
    from automl.lifecycle import RunInterrupted

    space = spaces.load_space(tiny_space)
    observer = _InterruptAt(trial=1, epoch=1)
    options = RunOptions(study_name="tiny", storage_url=storage_url, n_trials=5, device="cpu")
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as info:
        run_study(space, options, observer)
    assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert "trial 1 recorded as failed (interrupted)" in str(info.value)
    assert "this run: 1 complete, 0 pruned, 1 failed" in str(info.value)
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert _states(study) == ["COMPLETE", "FAIL", "WAITING"]
    assert observer.finished[:2] == ["0 COMPLETE", "1 FAIL"]
    assert observer.finished[-1].startswith("interrupted by SIGINT")
    ckdir = study_checkpoint_dir(storage_url, "tiny")
    assert torch.load(ckdir / "1.pt", weights_only=True)["epoch"] == 0


def test_a_signal_waits_for_a_protected_block_and_a_second_one_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from automl.lifecycle import GracefulStop, StopRequested

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = GracefulStop()
    with pytest.raises(StopRequested), stop.protected():
        stop._handle(signal.SIGTERM, None)  # deferred: the block goes on
        finished_block = True
    assert finished_block and exits == []
    stop._handle(signal.SIGINT, None)  # the second signal
    assert exits == [130]

    fresh = GracefulStop()
    with pytest.raises(StopRequested):
        fresh._handle(signal.SIGINT, None)  # unprotected: at once
    lenient = GracefulStop()
    with lenient.protected(raise_pending=False):
        lenient._handle(signal.SIGTERM, None)
    with pytest.raises(StopRequested) as info:
        lenient.check()
    assert info.value.signum == signal.SIGTERM


def test_a_second_signal_inside_a_storage_write_exits_as_the_write_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quick double Ctrl-C landed between a trial's failure and its queued retry: the
    retry was lost. The second signal now waits for the block; a third exits at once."""
    from automl.lifecycle import GracefulStop, StopRequested

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = GracefulStop()
    steps: list[str] = []
    with pytest.raises(StopRequested), stop.protected():  # (os._exit stubbed: it goes on)
        stop.signum = signal.SIGINT  # the first signal, already being handled
        stop._handle(signal.SIGINT, None)  # the second: held
        steps.append("failure written")
        assert exits == []
        steps.append("retry queued")
    assert steps == ["failure written", "retry queued"] and exits == [130]
    again = GracefulStop()
    with pytest.raises(StopRequested), again.protected():
        again._handle(signal.SIGTERM, None)
        again._handle(signal.SIGTERM, None)  # the same stop twice (systemd and a parent)
        assert again._exit_after is None
        again._handle(signal.SIGINT, None)  # a second request: held
        again._handle(signal.SIGINT, None)  # a third: at once
        assert exits == [130, 130]
    assert exits == [130, 130, 130]  # (os._exit stubbed: the held one follows)


def test_sighup_stops_a_run_as_sigterm_unless_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl.lifecycle import GracefulStop, StopRequested

    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGHUP) == stop._handle
        with pytest.raises(StopRequested) as info:
            stop._handle(signal.SIGHUP, None)
        assert info.value.signum == signal.SIGTERM
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with GracefulStop():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_signal_during_a_checkpoint_write_lands_after_the_file(tmp_path: Path) -> None:
    """A stop signal raised inside torch.save came out as torch's RuntimeError, and the
    trial failed for good. Now the file is written whole, then the signal stops the run."""
    import torch

    from automl.checkpoints import atomic_save
    from automl.lifecycle import GracefulStop, StopRequested

    class Signalling:  # pickled by torch.save: the signal arrives mid-write
        def __reduce__(self) -> Any:
            os.kill(os.getpid(), signal.SIGTERM)
            return (dict, ())

    path = tmp_path / "ck.pt"
    with GracefulStop(), pytest.raises(StopRequested):
        atomic_save({"weights": torch.ones(3), "probe": Signalling()}, path)
    assert torch.load(path, weights_only=False)["weights"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left


# --------------------------------------------------------------------------- failures


def test_max_failures_stops_with_the_most_common_reason(
    tiny_space: Path, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr("automl.training.train", broken)
    result = runner.invoke(
        app,
        [
            "run",
            str(tiny_space),
            "--storage",
            storage_url,
            "--n-trials",
            "9",
            *["--max-failures", "3"],
        ],
    )
    assert result.exit_code == 1
    assert "3 trials in a row failed" in result.stderr
    assert "(3x): RuntimeError: the GPU caught fire" in result.stderr
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert _states(study) == ["FAIL"] * 3


def test_an_error_that_ends_the_run_leaves_no_trial_running(
    tiny_space: Path, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automl.errors import DataError

    def unusable(*args: Any, **kwargs: Any) -> Any:
        raise DataError("the data went away")

    monkeypatch.setattr("automl.training.train", unusable)
    result = runner.invoke(app, ["run", str(tiny_space), "--storage", storage_url])
    assert result.exit_code == 2
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert _states(study) == ["FAIL"]
    assert study.trials[0].user_attrs["fail_reason"] == "DataError: the data went away"


# --------------------------------------------------------------------------- space changes


def test_diff_spaces_names_key_paths() -> None:
    old = {"objective": "val_accuracy", "space": {"batch_size": [16, 32], "dropout": 0.1}}
    new = {"objective": "val_f1", "space": {"batch_size": [16, 64], "n_layers": 2}}
    assert diff_spaces(old, new) == [
        ("objective", "val_accuracy -> val_f1"),
        ("space.batch_size", "[16, 32] -> [16, 64]"),
        ("space.dropout", "- 0.1"),
        ("space.n_layers", "+ 2"),
    ]


def test_a_changed_space_warns_and_a_changed_objective_is_refused(
    tiny_space: Path, storage_url: str
) -> None:
    base = ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "1"]
    assert runner.invoke(app, base).exit_code == 0
    text = tiny_space.read_text()
    tiny_space.write_text(text.replace("high: 32, log: true", "high: 64, log: true"))
    changed = runner.invoke(app, base)
    assert changed.exit_code == 0, changed.output
    assert "space.hidden_units.high: 32 -> 64" in _flat(changed.stderr)
    assert "space of study 'tiny' changed" in _flat(changed.stderr)
    quiet = runner.invoke(app, base)  # the study now records the new space
    assert quiet.exit_code == 0 and "changed" not in quiet.stderr

    # Optuna itself cannot change a categorical's choices within a study
    tiny_space.write_text(
        tiny_space.read_text().replace("batch_size: [16, 32]", "batch_size: [16, 64]")
    )
    choices = runner.invoke(app, [*base, "--allow-space-change"])
    assert choices.exit_code == 2
    assert "batch_size: choices [16, 32] -> [16, 64]" in _flat(choices.stderr)
    tiny_space.write_text(
        tiny_space.read_text()
        .replace("batch_size: [16, 64]", "batch_size: [16, 32]")
        .replace("objective: val_accuracy", "objective: val_f1")
    )
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2
    assert "objective: val_accuracy -> val_f1" in _flat(refused.stderr)
    assert "--allow-space-change" in _flat(refused.stderr)
    assert len(optuna.load_study(study_name="tiny", storage=storage_url).trials) == 3
    allowed = runner.invoke(app, [*base, "--allow-space-change"])
    assert allowed.exit_code == 0, allowed.output
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert "val_f1" in study.user_attrs["space"]
    assert len(study.user_attrs["space_history"]) == 2


def test_a_refused_run_leaves_the_stored_space_as_it_was(
    tiny_space: Path, storage_url: str
) -> None:
    base = ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "1"]
    assert runner.invoke(app, base).exit_code == 0
    before = optuna.load_study(study_name="tiny", storage=storage_url).user_attrs
    text = tiny_space.read_text()
    tiny_space.write_text(text.replace("objective: val_accuracy", "objective: val_loss"))
    other_direction = runner.invoke(app, [*base, "--allow-space-change"])
    assert other_direction.exit_code == 2
    assert "optimizes ['maximize'] but the space asks ['minimize']" in _flat(other_direction.stderr)
    assert optuna.load_study(study_name="tiny", storage=storage_url).user_attrs == before
    tiny_space.write_text(text)
    assert runner.invoke(app, base).exit_code == 0  # the study still takes its own space

    # A study of the same name made by plain Optuna is not taken over.
    foreign = optuna.create_study(study_name="foreign", storage=storage_url, direction="maximize")
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    refused = runner.invoke(app, [*base, "--study", "foreign"])
    assert refused.exit_code == 2
    assert "study 'foreign' was not made by automl" in _flat(refused.stderr)
    assert optuna.load_study(study_name="foreign", storage=storage_url).user_attrs == {}


# --------------------------------------------------------------------------- warm start


def test_warm_start_queues_the_best_fitting_configs(tiny_space: Path, storage_url: str) -> None:
    ran = runner.invoke(app, ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "4"])
    assert ran.exit_code == 0
    source = optuna.load_study(study_name="tiny", storage=storage_url)
    ranked = sorted(
        (t for t in source.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value
    )
    narrow = tiny_space.with_name("narrow.yaml")
    narrow.write_text(
        tiny_space.read_text()
        .replace("name: tiny", "name: narrow")
        .replace("batch_size: [16, 32]", "batch_size: [8, 16]")
    )
    result = runner.invoke(
        app,
        [
            "run",
            str(narrow),
            "--storage",
            storage_url,
            "--n-trials",
            "2",
            *["--warm-start", "tiny:2"],
        ],
    )
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="narrow", storage=storage_url)
    first = study.trials[:2]
    assert [t.user_attrs["warm_start"] for t in first] == [f"tiny#{t.number}" for t in ranked[:2]]
    for mine, theirs in zip(first, ranked[:2], strict=True):
        expected = dict(theirs.params)
        if expected["batch_size"] == 32:  # outside the new space: dropped, sampled anew
            expected.pop("batch_size")
            assert "batch_size: 32 is not one of [8, 16]" in _flat(result.stderr)
        for key, value in expected.items():
            assert mine.params[key] == value
    # a cron job repeating --warm-start queues nothing twice
    space = spaces.load_space(narrow)
    warm_start(study, source, space, k=2)
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


def test_warm_start_and_fit_params_validate() -> None:
    assert parse_warm_start("other") == ("other", 5)
    assert parse_warm_start("a:b:3") == ("a:b", 3)
    from automl.errors import UsageError

    with pytest.raises(UsageError, match="OTHER_STUDY:K"):
        parse_warm_start("other:0")
    space = spaces.parse_space(
        {
            "data": {"dataset": "iris"},
            "space": {
                "optimizer": {"adam": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}},
                "batch_size": [16, 32],
                "n_layers": {"low": 1, "high": 3},
            },
        }
    )
    kept, dropped = fit_params(
        space, {"adam_lr": 0.01, "batch_size": 64, "n_layers": 2.0, "dropuot": 0.1}
    )
    assert kept == {"adam_lr": 0.01, "n_layers": 2}
    assert len(dropped) == 2
    assert dropped[0] == "batch_size: 64 is not one of [16, 32]"
    assert dropped[1].startswith("dropuot: not in this space")


# --------------------------------------------------------------------------- enqueue


def test_enqueue_validates_and_the_next_run_trains_it_first(
    tiny_space: Path, storage_url: str
) -> None:
    ran = runner.invoke(app, ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "1"])
    assert ran.exit_code == 0
    params = {"optimizer": "sgd", "sgd_lr": 0.05, "sgd_momentum": 0.5, "batch_size": 32}
    ok = runner.invoke(
        app, ["enqueue", "tiny", "--params", json.dumps(params), "--storage", storage_url]
    )
    assert ok.exit_code == 0, ok.output
    assert "queued" in ok.stdout
    for bad, expected in (
        ('{"batch_size": 48}', "batch_size: 48 is not one of [16, 32]"),
        ('{"sgd_lr": 2.0}', "sgd_lr: 2.0 is outside 0.01..0.5"),
        ('{"hiden_units": 8}', "did you mean 'hidden_units'?"),
        (
            '{"optimizer": "sgd", "adam_lr": 0.01}',
            "adam_lr applies only when optimizer = adam, not sgd",
        ),
        ("{not json", "--params is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ):
        refused = runner.invoke(app, ["enqueue", "tiny", "--params", bad, "--storage", storage_url])
        assert refused.exit_code == 2, (bad, refused.output)
        assert expected in _flat(refused.stderr)
    missing = runner.invoke(app, ["enqueue", "nope", "--params", "{}", "--storage", storage_url])
    assert missing.exit_code == 2

    result = runner.invoke(
        app, ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "1"]
    )
    assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="tiny", storage=storage_url).trials[1]
    assert trial.state == TrialState.COMPLETE
    assert {k: trial.params[k] for k in params} == params
    assert trial.user_attrs["enqueued"] == "enqueue"


# --------------------------------------------------------------------------- log file


def test_log_file_appends_plain_lines(tiny_space: Path, storage_url: str) -> None:
    log = Path("logs") / "cron.log"
    args = ["run", str(tiny_space), "--storage", storage_url, "--log-file", str(log)]
    first = runner.invoke(app, [*args, "--n-trials", "2", "--json"])
    assert first.exit_code == 0
    assert json.loads(first.stdout)["n_complete"] + json.loads(first.stdout)["n_pruned"] == 2
    assert runner.invoke(app, [*args, "--until", "2"]).exit_code == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    assert "start: study 'tiny', running 2 trial(s)" in lines[0]
    assert lines[1].split(" ", 1)[1].startswith("trial 0 ")
    assert " value=" in lines[1] and " in " in lines[1]
    assert "stop: ran 2 trial(s); " in lines[3]
    assert "start: study 'tiny', running 0 trial(s)" in lines[4]
    assert "stop: the study already holds 2 finished trials (--until 2)" in lines[5]
    assert not any("\x1b[" in line for line in lines)  # no colour codes


def test_a_retry_does_not_report_again_the_epochs_it_inherited(storage_url: str) -> None:
    import warnings

    from automl.lifecycle import retry_later
    from automl.objective import Objective

    space = spaces.parse_space(
        {"data": {"dataset": "iris", "validation": 0.3}, "objective": "val_accuracy"}
    )
    study = optuna.create_study(study_name="r", storage=storage_url, direction="maximize")
    first = study.ask()
    first.report(0.5, 0)
    first.report(0.6, 1)  # reported after the checkpoint the retry resumes from (epoch 0)
    retry_later(study, study.tell(first, state=TrialState.FAIL), epochs=2)
    retry = study.ask()  # claims the queued copy, which inherits both values
    hook = Objective(space, None, None, device="cpu").epoch_hook(retry, TrialConfig(epochs=3))  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        for epoch, value in enumerate([0.5, 0.6, 0.7]):
            hook(epoch, {"val_accuracy": value})
    assert study.trials[1].intermediate_values == {0: 0.5, 1: 0.6, 2: 0.7}


def test_a_full_disk_trains_on_without_checkpoints_with_one_warning(
    tiny_space: Path, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch reports a full disk as a RuntimeError with a byte offset: every trial
    failed, each with its own reason. Now a trial trains on without checkpoints."""
    import shutil

    from automl import checkpoints

    def full(obj: Any, path: Path, *, durable: bool = True) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 118016")

    monkeypatch.setattr(checkpoints, "atomic_save", full)
    monkeypatch.setattr(checkpoints, "_WARNED", set())
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1024))
    result = runner.invoke(
        app, ["run", str(tiny_space), "--n-trials", "3", "--storage", storage_url]
    )
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert _states(study) == ["COMPLETE"] * 3
    assert all("weights_path" not in t.user_attrs for t in study.trials)  # none written
    warned = [x for x in _flat(result.stderr).split("WARNING") if "cannot write" in x]
    assert len(warned) == 1 and "the disk is full" in warned[0], warned
    assert "trains on without checkpoints" in warned[0]


def test_a_space_change_is_checked_against_every_trial_not_only_the_last_space(
    tmp_path: Path, storage_url: str
) -> None:
    """A parameter fixed for one run in between hid an incompatible change from the
    check: the next run crashed at its first tell (exit 1), left a trial RUNNING and
    stored its space. Now it is refused before any write."""
    base = "name: chg\ndata: {dataset: iris}\ntrain: {epochs: 1}\nspace:\n  dropout: %s\n"
    files = {}
    for key, dropout in (
        ("ranged", "{low: 0.0, high: 0.5}"),
        ("fixed", "0.1"),
        ("log", "{low: 0.01, high: 0.5, log: true}"),
    ):
        files[key] = tmp_path / f"{key}.yaml"
        files[key].write_text(base % dropout)
    for key in ("ranged", "fixed"):
        ok = runner.invoke(
            app, ["run", str(files[key]), "--n-trials", "1", "--storage", storage_url]
        )
        assert ok.exit_code == 0, ok.output
    stored = optuna.load_study(study_name="chg", storage=storage_url).user_attrs["space"]
    refused = runner.invoke(
        app, ["run", str(files["log"]), "--n-trials", "1", "--storage", storage_url]
    )
    assert refused.exit_code == 2, refused.output
    assert "cannot take this space: dropout: float 0..0.5 in trial #0 -> float 0.01..0.5, log" in (
        _flat(refused.stderr)
    )
    study = optuna.load_study(study_name="chg", storage=storage_url)
    assert _states(study) == ["COMPLETE", "COMPLETE"]
    assert study.user_attrs["space"] == stored


def test_a_retry_keeps_only_the_reports_its_checkpoint_covers_and_is_not_judged_on_them(
    storage_url: str,
) -> None:
    """A fused pack's member keeps no checkpoint: its retry starts over, yet inherited
    every report, and the pruner judged its first epoch by the last inherited step (it
    was 'pruned at epoch 1' with the value of step 2)."""
    from automl.lifecycle import retry_later
    from automl.objective import Objective

    space = spaces.parse_space(
        {"data": {"dataset": "iris", "validation": 0.3}, "objective": "val_accuracy"}
    )
    study = optuna.create_study(
        study_name="r",
        storage=storage_url,
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=0.65),  # prunes anything under 0.65
    )
    first = study.ask()
    for step, value in enumerate([0.7, 0.8, 0.9]):
        first.report(value, step)
    retry_later(study, study.tell(first, state=TrialState.FAIL), epochs=1)
    assert study.trials[1].intermediate_values == {0: 0.7}  # what its checkpoint covers
    gone = study.ask()  # the copy, stopped again before its first checkpoint
    assert gone.number == 1
    retry_later(study, study.tell(gone, state=TrialState.FAIL), epochs=0)
    assert study.trials[2].intermediate_values == {}  # no checkpoint: starts over, clean

    # A copy made by Optuna's heartbeat retry inherits every report: the epochs it
    # already holds are not judged again, the next one is.
    study = optuna.create_study(
        study_name="h",
        storage=storage_url,
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=0.65),
    )
    killed = study.ask()
    for step, value in enumerate([0.7, 0.1]):
        killed.report(value, step)
    heir = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params={},
        distributions={},
        intermediate_values={0: 0.7, 1: 0.1},
        system_attrs={"failed_trial": 0, "retry_history": [0]},
    )
    study.tell(killed, state=TrialState.FAIL)
    study.add_trial(heir)
    retry = study.ask()
    assert retry.number == 1
    hook = Objective(space, None, None, device="cpu").epoch_hook(retry, TrialConfig(epochs=3))  # type: ignore[arg-type]
    hook(0, {"val_accuracy": 0.7})
    hook(1, {"val_accuracy": 0.1})  # inherited: not judged again (0.1 would be pruned)
    with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 3 with val_accuracy=0\.5"):
        hook(2, {"val_accuracy": 0.5})


def test_the_log_file_follows_a_rotation(tmp_path: Path) -> None:
    """logrotate moves the file: the run's later lines went on into the moved file."""
    from automl.progress import LogFileObserver

    path = tmp_path / "logs" / "cron.log"
    observer = LogFileObserver(path)
    with observer:
        observer._line("before")
        path.rename(tmp_path / "logs" / "cron.log.1")
        observer._line("after the move")
        observer._line("and on")
        path.unlink()
        observer._line("after a removal")
    assert "before" in (tmp_path / "logs" / "cron.log.1").read_text()
    assert "after" not in (tmp_path / "logs" / "cron.log.1").read_text()
    assert path.read_text().splitlines()[0].endswith(" after a removal")


def test_warm_start_from_the_study_itself_is_refused(tiny_space: Path, storage_url: str) -> None:
    args = ["run", str(tiny_space), "--n-trials", "1", "--storage", storage_url]
    assert runner.invoke(app, args).exit_code == 0
    refused = runner.invoke(app, [*args, "--warm-start", "tiny"])
    assert refused.exit_code == 2
    assert "--warm-start tiny: names this study itself" in refused.stderr
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert _states(study) == ["COMPLETE"]  # nothing queued
