"""MLP and CNN built from a TrialConfig; CNN input-shape rules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from automl.data import load_dataset, to_device
from automl.errors import DataError, SpaceError
from automl.models import ACTIVATIONS, Dropout, build_model, count_parameters, weight_l1
from automl.spaces import DataSpec, TrialConfig, parse_space
from automl.training import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**kw: Any) -> TrialConfig:
    return TrialConfig(**kw)


def test_mlp_has_n_layers_hidden_blocks_of_hidden_units() -> None:
    model = build_model(
        _config(n_layers=3, hidden_units=20, activation="tanh", dropout=0.3, batch_norm=True),
        (7,),
        4,
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (7, 20),
        (20, 20),
        (20, 20),
        (20, 4),
    ]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert [m.p for m in model.modules() if isinstance(m, (nn.Dropout, Dropout))] == [0.3, 0.3, 0.3]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3
    plain = build_model(_config(n_layers=1, hidden_units=5), (7,), 4)
    assert not any(isinstance(m, (nn.Dropout, Dropout, nn.BatchNorm1d)) for m in plain.modules())
    assert count_parameters(plain) == 7 * 5 + 5 + 5 * 4 + 4


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation(name: str) -> None:
    model = build_model(_config(activation=name, n_layers=1, hidden_units=4), (3,), 2)
    assert isinstance(model[1], ACTIVATIONS[name])
    assert model(torch.zeros(2, 3)).shape == (2, 2)


def test_cnn_on_digits_images() -> None:
    cfg = _config(model="cnn", channels=8, kernel_size=3, n_layers=2, hidden_units=32)
    model = build_model(cfg, (1, 8, 8), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 8, (3, 3)),
        (8, 16, (3, 3)),
    ]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert head[0].in_features == 16 * 2 * 2 and head[0].out_features == 32
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    with_bn = build_model(
        _config(model="cnn", channels=8, kernel_size=5, n_layers=3, batch_norm=True, dropout=0.2),
        (1, 8, 8),
        10,
    )
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 3
    assert sum(isinstance(m, (nn.Dropout, Dropout)) for m in with_bn.modules()) == 1
    assert with_bn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_cnn_trains_on_bundled_digits_as_1x8x8() -> None:
    dataset = load_dataset(DataSpec(dataset="digits", validation=0.2))
    assert dataset.input_shape == (1, 8, 8)
    data = to_device(dataset, "cpu", model="cnn")
    assert tuple(data.X_train.shape[1:]) == (1, 8, 8) and tuple(data.X_val.shape[1:]) == (1, 8, 8)
    small = replace(data, X_train=data.X_train[:400], y_train=data.y_train[:400])
    cfg = _config(
        model="cnn",
        channels=8,
        n_layers=1,
        hidden_units=32,
        epochs=3,
        batch_size=32,
        optimizer_params={"lr": 3e-3},
    )
    result = train(cfg, small, objective="val_accuracy")
    assert result.metrics["val_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.parametrize(("shape", "image"), [((60, 6, 6), (1, 6, 6)), ((60, 3, 5, 4), (3, 5, 4))])
def test_cnn_trains_on_npz_images(
    tmp_path: Path, shape: tuple[int, ...], image: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], shape[0] // 2)
    X = rng.normal(size=shape).astype(np.float32)
    X[y == 1] += 1.0  # separable by brightness
    np.savez(tmp_path / "img.npz", X=X, y=y)
    dataset = load_dataset(DataSpec(path=str(tmp_path / "img.npz"), validation=0.25))
    assert dataset.input_shape == image and dataset.task == "classification"
    data = to_device(dataset, "cpu", model="cnn")
    assert tuple(data.X_val.shape) == (15, *image)
    cfg = _config(model="cnn", channels=4, n_layers=1, hidden_units=8, epochs=2, batch_size=16)
    result = train(cfg, data, objective="val_accuracy")
    assert result.epochs_run == 2 and 0.0 <= result.metrics["val_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "data", [{"dataset": "iris"}, {"dataset": "diabetes"}, {"path": "t.csv", "target": "y"}]
)
def test_cnn_on_tabular_data_is_a_load_error(data: dict[str, Any]) -> None:
    with pytest.raises(SpaceError, match="cnn needs image-shaped input"):
        parse_space({"data": data, "model": "cnn"})


def test_cnn_on_an_npz_of_flat_rows_is_a_data_error_after_load(tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", X=np.zeros((20, 5), np.float32), y=np.arange(20) % 2)
    space = parse_space({"data": {"path": str(tmp_path / "flat.npz")}, "model": "cnn"})
    dataset = load_dataset(space.data)
    assert to_device(dataset, "cpu", model="mlp").X_train.shape[1] == 5  # fine for an MLP
    with pytest.raises(DataError, match=r"cnn needs image-shaped input.*5 features"):
        to_device(dataset, "cpu", model="cnn")


def test_cnn_on_flat_npz_fails_before_the_study_is_created(tmp_path: Path) -> None:
    from automl.studies import RunOptions, list_studies, run_study

    np.savez(tmp_path / "flat.npz", X=np.zeros((20, 5), np.float32), y=np.arange(20) % 2)
    space = parse_space({"data": {"path": str(tmp_path / "flat.npz")}, "model": "cnn"})
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(DataError, match="cnn needs image-shaped input"):
        run_study(space, RunOptions(study_name="flat", storage_url=url, n_trials=1, device="cpu"))
    assert list_studies(url) == []


def test_weight_l1_counts_weights_not_biases() -> None:
    model = build_model(_config(n_layers=1, hidden_units=2), (2,), 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-0.5)
    # weights: 2*2 + 2*1 = 6 entries of 0.5; biases excluded
    assert float(weight_l1(model).detach()) == pytest.approx(3.0)
