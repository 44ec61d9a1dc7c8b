"""A real search end to end: training learns, results are reproducible with a seed."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from automl.data import load_dataset, resolve_device, to_device
from automl.errors import DeviceError
from automl.spaces import TrialConfig, load_space
from automl.studies import RunOptions, run_study
from automl.training import train


def test_a_tiny_training_run_learns() -> None:
    from automl.spaces import DataSpec

    dataset = load_dataset(DataSpec(dataset="digits"), seed=0)
    data = to_device(dataset, "cpu")
    config = TrialConfig(
        optimizer="adam", optimizer_params={"lr": 3e-3}, epochs=4, hidden_units=64, seed=0
    )
    result = train(config, data, objective="val_accuracy")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["val_accuracy"] > 0.9
    assert result.epochs_run == 4
    assert result.n_params == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_splits_are_standardized_on_train_and_stratified() -> None:
    from automl.spaces import DataSpec

    dataset = load_dataset(DataSpec(dataset="iris", validation=0.2, test=0.2), seed=3)
    assert len(dataset.X_train) + len(dataset.X_val) + len(dataset.X_test) == 150
    assert len(dataset.X_test) == 30 and len(dataset.X_val) == 30
    assert abs(float(dataset.X_train.mean())) < 1e-5
    assert float(dataset.X_train.std()) == pytest.approx(1.0, abs=1e-3)
    # Stratified: every class has 10 rows in the test split.
    import numpy as np

    assert np.bincount(dataset.y_test).tolist() == [10, 10, 10]


def _values(storage: str, name: str) -> list[tuple[dict[str, object], float | None]]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.params, t.value) for t in study.trials]


def test_same_seed_same_trials(tiny_space: Path, tmp_path: Path) -> None:
    space = load_space(tiny_space)
    runs = []
    for i in range(2):
        url = f"sqlite:///{tmp_path / f'r{i}.db'}"
        run_study(
            space, RunOptions(study_name="tiny", storage_url=url, n_trials=4, device="cpu", seed=42)
        )
        runs.append(_values(url, "tiny"))
    assert runs[0] == runs[1]
    url = f"sqlite:///{tmp_path / 'other.db'}"
    run_study(
        space, RunOptions(study_name="tiny", storage_url=url, n_trials=4, device="cpu", seed=43)
    )
    assert _values(url, "tiny") != runs[0]


@pytest.mark.slow
def test_ten_trial_digits_search_reaches_095(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    space = load_space(root / "search_spaces" / "digits_mlp.yaml")
    url = f"sqlite:///{tmp_path / 'd.db'}"
    summary = run_study(
        space, RunOptions(study_name="d", storage_url=url, n_trials=10, device="cpu")
    )
    assert summary.n_run == 10
    study = optuna.load_study(study_name="d", storage=url)
    assert study.best_value >= 0.95


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="cuda:7"):
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 GPUs")
        resolve_device("cuda:7")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_the_console_script_exits_with_its_code_and_leaves_the_sqlite_file_whole(
    tiny_space: Path, tmp_path: Path
) -> None:
    """``automl`` ends with os._exit after closing its database connections: the study is
    all in the .db (no write-ahead log left beside it) and exit codes come through."""
    import subprocess

    from automl.workers import automl_command

    db = tmp_path / "studies.db"
    args = ["run", str(tiny_space), "--storage", f"sqlite:///{db}", "--n-trials", "2"]
    done = subprocess.run([*automl_command(), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "best trials of 'tiny'" in done.stdout  # the output was flushed before the exit
    assert not (tmp_path / "studies.db-wal").exists()
    import sqlite3

    with sqlite3.connect(db) as conn:  # the plain file alone holds both trials
        assert conn.execute("select count(*) from trials where state = 'COMPLETE'").fetchone() == (
            2,
        )
    bad = subprocess.run(
        [*automl_command(), "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_sigterm_lets_a_command_clean_up_and_exits_143(tmp_path: Path) -> None:
    """SIGTERM killed retrain, report or predict on the spot, leaving their temporary
    output file behind; now it ends the command as Ctrl-C does, cleanup included."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "slow_command.py"
    script.write_text(
        "import pathlib, time, sys\n"
        "import automl.cli as cli\n"
        "def slow():\n"
        "    tmp = pathlib.Path(sys.argv[1])\n"
        "    tmp.write_text('half written')\n"
        "    try:\n"
        "        time.sleep(60)\n"
        "    finally:\n"
        "        tmp.unlink()\n"
        "cli.app = slow\n"
        "cli.entry()\n"
    )
    tmp = tmp_path / ".out.tmp"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp)])
    deadline = time.monotonic() + 30
    while not tmp.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert not tmp.exists()
