"""Shared fixtures: tiny, seeded, CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Each optimizer's hyperparameters, away from their defaults (the fused-training tests).
OPTIMIZER_PARAMS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "adam": {"lr": 2e-3, "weight_decay": 1e-4, "beta1": 0.85},
    "adamw": {"lr": 2e-3, "weight_decay": 1e-2},
    "rmsprop": {"lr": 1e-3, "momentum": 0.5, "alpha": 0.95},
    "adagrad": {"lr": 2e-2, "lr_decay": 0.01},
    "adadelta": {"lr": 1.0, "rho": 0.85},
    "adabound": {"lr": 1e-3, "final_lr": 0.05},
}


def imported_by(code: str, packages: tuple[str, ...], cwd: Path) -> list[str]:
    """The modules of ``packages`` that running ``code`` in a fresh interpreter imports."""
    probe = (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code + probe], capture_output=True, text=True, check=True, cwd=cwd
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


TINY_SPACE = """\
name: tiny
data:
  dataset: iris
  validation: 0.3
model: mlp
train:
  epochs: 3
  patience: 0
objective: val_accuracy
study:
  sampler: tpe
  pruner: none
  seed: 1
space:
  optimizer:
    adam:
      lr: {low: 1.0e-3, high: 1.0e-1, log: true}
    sgd:
      lr: {low: 1.0e-2, high: 0.5, log: true}
      momentum: {low: 0.0, high: 0.9}
  loss: [cross_entropy, mse]
  batch_size: [16, 32]
  hidden_units: {low: 8, high: 32, log: true}
  n_layers: {low: 1, high: 2}
"""


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread, as ``automl run`` uses on CPU (threads spinning
    against other load on a small machine slow them down many times over)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's AUTOML_STORAGE or writes ./studies of the checkout."""
    monkeypatch.delenv("AUTOML_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
