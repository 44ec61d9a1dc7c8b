"""Shared fixtures: tiny, seeded, CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

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
