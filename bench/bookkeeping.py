"""Bookkeeping cost per trial: everything a trial costs except training.

Both sides sample 8 parameters, report 10 intermediate values with ``should_prune`` after
each (a MedianPruner whose warm-up covers the 10 steps, so it reads the study every time
but prunes nothing) and store 12 user attributes, on a fresh SQLite file:

- ``optuna``: plain Optuna as a user writes it (``study.optimize``, TPESampler,
  ``trial.set_user_attr`` per attribute, ``storage="sqlite:///..."``);
- ``automl``: automl's real run loop (``studies.run_study``: ask/tell, heartbeats, stale-
  trial checks, checkpoints bookkeeping, the best-weights rule, user attributes) with
  ``training.train`` replaced by a stub that calls the epoch hook 10 times.

    python bench/bookkeeping.py --n-trials 1000 [--only automl|optuna]

Prints ms/trial over windows of the study's growth, one JSON line per side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

EPOCHS = 10
SPACE = """\
name: bookkeeping
data: {dataset: iris, validation: 0.3}
model: mlp
train: {epochs: 10, patience: 0}
objective: val_accuracy
study:
  sampler: tpe
  pruner: {name: median, n_warmup_steps: 10}
  seed: 0
space:
  optimizer:
    adam:
      lr: {low: 1.0e-5, high: 1.0e-1, log: true}
  loss: [cross_entropy, nll]
  batch_size: [16, 32, 64]
  hidden_units: {low: 8, high: 256, log: true}
  n_layers: {low: 1, high: 3}
  dropout: {low: 0.0, high: 0.5}
  weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}
  activation: [relu, tanh]
"""


def _fake_metrics(lr: float, epoch: int) -> dict[str, float]:
    acc = 0.5 + 0.04 * epoch - 0.02 * abs(math.log10(lr) + 3)
    return {
        "val_loss": 1 - acc,
        "val_accuracy": acc,
        "val_balanced_accuracy": acc,
        "val_f1": acc,
        "train_loss": 1 - acc,
        "lr": lr,
    }


def stamp() -> tuple[float, float, float]:
    """Wall time and this process's CPU time: on a machine others load, CPU time is the
    cost that load does not inflate (the wall figure is given too)."""
    return time.perf_counter(), time.process_time(), os.getloadavg()[0]


def windows(stamps: list[tuple[float, float, float]], n_windows: int = 5) -> list[dict[str, Any]]:
    """ms/trial (wall and CPU) over consecutive windows of the trial sequence."""
    deltas = [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in itertools.pairwise(stamps)]
    size = max(1, len(deltas) // n_windows)
    out: list[dict[str, Any]] = []
    for start in range(0, len(deltas) - size + 1, size):
        chunk = deltas[start : start + size]
        out.append(
            {
                "trials": f"{start + 1}-{start + len(chunk)}",
                "wall_ms_per_trial": round(1000 * sum(d[0] for d in chunk) / len(chunk), 1),
                "cpu_ms_per_trial": round(1000 * sum(d[1] for d in chunk) / len(chunk), 1),
                "load": round(sum(d[2] for d in chunk) / len(chunk), 2),
            }
        )
    return out


def run_optuna(n_trials: int, folder: Path) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stamps: list[tuple[float, float, float]] = []

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("adam_lr", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("loss", ["cross_entropy", "nll"])
        trial.suggest_categorical("batch_size", [16, 32, 64])
        trial.suggest_int("hidden_units", 8, 256, log=True)
        trial.suggest_int("n_layers", 1, 3)
        trial.suggest_float("dropout", 0.0, 0.5)
        trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        trial.suggest_categorical("activation", ["relu", "tanh"])
        metrics: dict[str, float] = {}
        for epoch in range(EPOCHS):
            metrics = _fake_metrics(lr, epoch)
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        attrs = {**metrics, "n_params": 1000, "device": "cpu", "seed": trial.number}
        attrs.update(epochs_run=EPOCHS, best_epoch=EPOCHS, stopped_early=False)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return metrics["val_accuracy"]

    study = optuna.create_study(
        storage=f"sqlite:///{folder / 'optuna.db'}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=EPOCHS),
    )
    stamps.append(stamp())
    study.optimize(objective, n_trials=n_trials, callbacks=[lambda s, t: stamps.append(stamp())])
    return {"side": "optuna", "n_trials": n_trials, "windows": windows(stamps)}


def run_automl(n_trials: int, folder: Path) -> dict[str, Any]:
    import yaml

    import automl.objective
    import automl.training
    from automl.spaces import parse_space
    from automl.studies import NullObserver, RunOptions, run_study
    from automl.training import TrainResult

    def fake_train(config: Any, data: Any, *, on_epoch: Any = None, **_: Any) -> TrainResult:
        history = []
        for epoch in range(config.epochs):
            metrics = _fake_metrics(config.lr, epoch)
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        best = {**history[-1], "n_params": 1000.0, "train_seconds": 0.0}
        return TrainResult(metrics=best, history=history, epochs_run=len(history))

    automl.training.train = fake_train  # type: ignore[assignment]
    stamps: list[tuple[float, float, float]] = []

    class Stamps(NullObserver):
        def trial_finished(self, trial: Any, study: Any) -> None:
            stamps.append(stamp())

    space = parse_space(yaml.safe_load(SPACE), file="bookkeeping", source=SPACE)
    options = RunOptions(
        study_name="bookkeeping",
        storage_url=f"sqlite:///{folder / 'automl.db'}",
        n_trials=n_trials,
        device="cpu",
    )
    stamps.append(stamp())
    run_study(space, options, Stamps())
    return {"side": "automl", "n_trials": n_trials, "windows": windows(stamps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=1000)
    parser.add_argument("--only", choices=["automl", "optuna"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for side, fn in (("automl", run_automl), ("optuna", run_optuna)):
            if args.only in (None, side):
                print(json.dumps(fn(args.n_trials, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
