"""The CUDA path, on a real GPU: training, fused training, the CLI end to end, a real
out-of-memory error, and data that stays on the device. Skipped where torch sees no GPU
(CI, and any machine without one); the conftest hides GPUs unless CUDA_VISIBLE_DEVICES
is set, so run these with e.g. ``CUDA_VISIBLE_DEVICES=0 pytest tests/test_cuda.py``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import OPTIMIZER_PARAMS
from optuna.trial import TrialState
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from automl.cli import app
from automl.data import DeviceData, load_dataset, to_device
from automl.packing import FUSED_OPTIMIZERS, train_packed
from automl.spaces import DataSpec, TrialConfig
from automl.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

runner = CliRunner()

SPACE = {
    "name": "gpu",
    "data": {"dataset": "digits", "validation": 0.2, "test": 0.1},
    "model": "mlp",
    "train": {"epochs": 4, "patience": 0},
    "objective": "val_accuracy",
    "study": {"sampler": "tpe", "pruner": "none", "seed": 3},
    "space": {
        "optimizer": {"adam": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
        "batch_size": [64],
        "hidden_units": {"low": 16, "high": 30000, "log": True},
        "n_layers": {"low": 1, "high": 2},
    },
}


@pytest.fixture(scope="module")
def digits_cpu() -> DeviceData:
    return to_device(load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0), "cpu")


@pytest.fixture(scope="module")
def digits_gpu() -> DeviceData:
    return to_device(load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0), "cuda")


def _config(optimizer: str = "adam", **extra: Any) -> TrialConfig:
    base: dict[str, Any] = dict(
        optimizer=optimizer,
        optimizer_params=OPTIMIZER_PARAMS[optimizer],
        loss="cross_entropy",
        batch_size=64,
        epochs=3,
        n_layers=2,
        hidden_units=48,
        seed=5,
    )
    base.update(extra)
    return TrialConfig(**base)


def _val_losses(result: Any) -> list[float]:
    return [h["val_loss"] for h in result.history]


def test_data_and_model_live_on_the_gpu(digits_gpu: DeviceData) -> None:
    assert digits_gpu.X_train.is_cuda and digits_gpu.y_train.is_cuda
    assert digits_gpu.X_val.is_cuda and digits_gpu.y_val.is_cuda
    result = train(_config(), digits_gpu, objective="val_accuracy", keep_model=True)
    assert result.model is not None
    assert all(p.is_cuda for p in result.model.parameters())
    assert result.metrics["val_accuracy"] > 0.9


@pytest.mark.parametrize("optimizer", FUSED_OPTIMIZERS)
def test_training_on_the_gpu_follows_the_cpu_curve(
    optimizer: str, digits_cpu: DeviceData, digits_gpu: DeviceData
) -> None:
    """Same initial weights and batch order on both devices (both drawn on the CPU):
    without dropout the curves differ only by float rounding."""
    config = _config(optimizer)
    cpu = train(config, digits_cpu)
    gpu = train(config, digits_gpu)
    assert _val_losses(gpu) == pytest.approx(_val_losses(cpu), rel=2e-3)


@pytest.mark.parametrize("optimizer", FUSED_OPTIMIZERS)
def test_fused_member_matches_alone_on_the_gpu(optimizer: str, digits_gpu: DeviceData) -> None:
    configs = [
        _config(optimizer, hidden_units=33, seed=7, l1=1e-5),
        _config(optimizer, hidden_units=16, seed=3, lr_schedule="cosine"),
        _config(optimizer, hidden_units=24, seed=11),
    ]
    packed = train_packed(configs, digits_gpu)
    for config, member in zip(configs, packed, strict=True):
        assert not isinstance(member, Exception), member
        alone = train(config, digits_gpu)
        assert _val_losses(member) == pytest.approx(_val_losses(alone), rel=1e-4), optimizer


def test_fused_members_with_dropout_learn_as_well_as_alone(digits_gpu: DeviceData) -> None:
    """CUDA's counter-based generator splits a stream differently when drawn in chunks, so
    with dropout a member's masks are not the ones it would draw alone; each member must
    still learn as well as alone, and draw masks at its own rate."""
    configs = [
        _config("adam", dropout=p, seed=s, epochs=8) for s, p in ((1, 0.2), (2, 0.5), (3, 0.0))
    ]
    packed = train_packed(configs, digits_gpu, objective="val_accuracy")
    for config, member in zip(configs, packed, strict=True):
        assert not isinstance(member, Exception), member
        alone = train(config, digits_gpu, objective="val_accuracy")
        assert member.metrics["val_accuracy"] == pytest.approx(
            alone.metrics["val_accuracy"], abs=0.03
        )


def _htod_copies(fn: Any) -> int:
    """How many host-to-device copies ``fn()`` makes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        e.count for e in prof.key_averages() if "memcpy htod" in e.key.lower().replace("_", " ")
    )


def test_data_stays_on_the_gpu_for_the_whole_trial(digits_gpu: DeviceData) -> None:
    """No copy per step: a 5-epoch trial of 23 steps an epoch copies to the GPU only per
    epoch (its batch order, a fused group's per-member rates and optimizer coefficients),
    never per batch. Measured on an H100: alone 11 copies, fused 36, for 115 steps."""
    config = _config("adam", epochs=5, dropout=0.2)
    steps = 5 * -(-digits_gpu.X_train.shape[0] // config.batch_size)
    alone = _htod_copies(lambda: train(config, digits_gpu))
    fused = _htod_copies(lambda: train_packed([config, _config("sgd", epochs=5)], digits_gpu))
    print(f"host-to-device copies: alone {alone}, fused {fused}, steps {steps}")
    assert alone <= 3 * 5 + 5 < steps
    assert fused <= 8 * 5 + 5 < steps


def _write_space(tmp_path: Path, **changes: Any) -> Path:
    doc = json.loads(json.dumps(SPACE))
    doc.update(changes)
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_cli_run_pack_retrain_and_predict_on_the_gpu(tmp_path: Path) -> None:
    space = _write_space(
        tmp_path,
        space={**SPACE["space"], "hidden_units": {"low": 16, "high": 128, "log": True}},
    )
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    for extra in ([], ["--pack", "4"]):
        args = ["run", str(space), "--storage", url, "--n-trials", "4", "--device", "cuda"]
        result = runner.invoke(app, [*args, "--json", *extra])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["n_complete"] == 4, doc
    study = optuna.load_study(study_name="gpu", storage=url)
    assert len(study.trials) == 8
    assert study.best_value > 0.9
    model = tmp_path / "model.pt"
    result = runner.invoke(
        app, ["retrain", "gpu", "--storage", url, "--device", "cuda", "-o", str(model), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test_metrics"]["test_accuracy"] > 0.9
    # The model file holds CPU tensors: it loads on a machine without a GPU.
    saved = torch.load(model, weights_only=True)
    tensors = [v for v in saved["state_dict"].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    bunch = load_digits(as_frame=True)
    rows = tmp_path / "rows.csv"
    bunch.frame.drop(columns=["target"]).head(50).to_csv(rows, index=False)
    result = runner.invoke(app, ["predict", str(model), str(rows)])
    assert result.exit_code == 0, result.output
    out = pd.read_csv(io.StringIO(result.stdout))
    assert list(out.columns) == ["prediction"] and len(out) == 50
    assert (out["prediction"].to_numpy() == bunch.target.to_numpy()[:50]).mean() > 0.9


def test_a_real_out_of_memory_fails_only_its_trial_and_frees_the_gpu(tmp_path: Path) -> None:
    """The GPU capped at 3 GiB for this process: a 2x30000-unit MLP (3.6 GB of weights,
    gradients and Adam state) raises a real CUDA out-of-memory error; that trial fails
    with the reason, its memory is given back, and the study goes on."""
    space = _write_space(tmp_path)
    url = f"sqlite:///{tmp_path / 'oom.db'}"
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total)
    try:
        args = ["run", str(space), "--storage", url, "--device", "cuda"]
        result = runner.invoke(app, [*args, "--n-trials", "1"])
        assert result.exit_code == 0, result.output
        queued = '{"hidden_units": 30000, "n_layers": 2}'
        result = runner.invoke(app, ["enqueue", "gpu", "--storage", url, "--params", queued])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, [*args, "--n-trials", "2"])
        assert result.exit_code == 0, result.output
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    trials = optuna.load_study(study_name="gpu", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params["hidden_units"] == 30000
    assert trials[1].user_attrs["fail_reason"].startswith("out of memory: CUDA out of memory")
    assert left < 256 * 2**20, f"{left / 2**20:.0f} MiB still allocated after the run"
