"""The reference to beat: a search written by hand in the style of Optuna's own PyTorch
example (``examples/pytorch/pytorch_simple.py``).

A DataLoader over a TensorDataset, an MLP whose layers, units and dropout are suggested
per trial, Adam/RMSprop/SGD, lr 1e-5..1e-1 (log), batch size 32/64/128, 10 epochs,
``trial.report`` + ``should_prune`` after each epoch, on the bundled digits set with the
SAME split and preprocessing as ``automl.data.load_dataset`` (validation 0.2, seed 0),
stored in SQLite. The pruner is a MedianPruner with automl's defaults (5 startup trials,
2 warm-up steps) so both searches prune alike.

    python bench/reference_optuna.py --n-trials 30 --storage sqlite:///ref.db

Prints one JSON line: n_trials, best value, seconds inside the study loop.
"""

from __future__ import annotations

import argparse
import json
import time

import optuna
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from automl.data import load_dataset
from automl.spaces import DataSpec

EPOCHS = 10
CLASSES = 10
DEVICE = torch.device("cpu")  # as in Optuna's example; --device changes it


def define_model(trial: optuna.Trial, n_features: int) -> nn.Sequential:
    n_layers = trial.suggest_int("n_layers", 1, 3)
    layers: list[nn.Module] = []
    in_features = n_features
    for i in range(n_layers):
        out_features = trial.suggest_int(f"n_units_l{i}", 4, 128, log=True)
        layers.append(nn.Linear(in_features, out_features))
        layers.append(nn.ReLU())
        p = trial.suggest_float(f"dropout_l{i}", 0.2, 0.5)
        layers.append(nn.Dropout(p))
        in_features = out_features
    layers.append(nn.Linear(in_features, CLASSES))
    layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)


def get_data(batch_size: int) -> tuple[DataLoader, DataLoader]:
    ds = load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0)
    train = TensorDataset(torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train))
    valid = TensorDataset(torch.from_numpy(ds.X_val), torch.from_numpy(ds.y_val))
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(valid, batch_size=batch_size, shuffle=False),
    )


def objective(trial: optuna.Trial) -> float:
    model = define_model(trial, 64).to(DEVICE)
    optimizer_name = trial.suggest_categorical("optimizer", ["Adam", "RMSprop", "SGD"])
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), lr=lr)
    batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])
    train_loader, valid_loader = get_data(batch_size)

    accuracy = 0.0
    for epoch in range(EPOCHS):
        model.train()
        for data, target in train_loader:
            data, target = data.to(DEVICE), target.to(DEVICE)
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()

        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in valid_loader:
                data, target = data.to(DEVICE), target.to(DEVICE)
                pred = model(data).argmax(dim=1, keepdim=True)
                correct += pred.eq(target.view_as(pred)).sum().item()
        accuracy = correct / len(valid_loader.dataset)  # type: ignore[arg-type]

        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.exceptions.TrialPruned()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--storage", default="sqlite:///reference.db")
    parser.add_argument("--study", default="reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu (the example's) or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=args.study,
        storage=args.storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
        load_if_exists=True,
    )
    started = time.perf_counter()
    study.optimize(objective, n_trials=args.n_trials)
    seconds = time.perf_counter() - started
    states = [t.state.name for t in study.trials]
    print(
        json.dumps(
            {
                "n_trials": len(study.trials),
                "n_pruned": states.count("PRUNED"),
                "best_value": study.best_value,
                "loop_seconds": round(seconds, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
