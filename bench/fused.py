"""Fused throughput: seconds per trial of K small MLPs trained as one fused model
(``packing.train_packed``) against the same configurations trained one by one
(``training.train``), for K = 1, 4, 8, 16, 32, back to back on the same configurations.

The configurations come from the reference space (bench/space_reference.yaml): Adam,
2 hidden layers of 4..128 units (log; and a narrower 32..64 series, where padding to
the widest member wastes little), dropout 0.2..0.5, lr 1e-5..1e-1 (log), batch 64,
10 epochs on digits. Training only (no storage), one torch thread, same data on the
device for both. On a GPU machine run it with --device cuda.

    python bench/fused.py [--sizes 1,4,8,16,32] [--device cpu|cuda] [--widths 4-128,32-64]
    python bench/fused.py --device cuda --bf16   # also under bf16 autocast

Each row also gives the members' matrix-product work (unpadded, forward and backward,
training and validation) as GFLOP, the rate the by-width run achieved on it, and this
device's rate on one large product: how far a group is from what the hardware allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time

import torch

from automl.data import load_dataset, to_device
from automl.packing import split_by_width, train_packed
from automl.spaces import DataSpec, TrialConfig
from automl.training import train


def configs(k: int, seed: int = 0, widths: tuple[int, int] = (4, 128)) -> list[TrialConfig]:
    """``k`` configurations of the reference space; widths log-uniform in ``widths``."""
    rng = random.Random(seed)
    low, high = widths
    return [
        TrialConfig(
            optimizer="adam",
            optimizer_params={"lr": 10 ** rng.uniform(-5, -1)},
            loss="nll",
            batch_size=64,
            epochs=10,
            n_layers=2,
            hidden_units=round(low * (high / low) ** rng.random()),
            dropout=rng.uniform(0.2, 0.5),
            seed=i,
        )
        for i in range(k)
    ]


def matmul_gflop(
    group: list[TrialConfig], n_train: int, n_val: int, n_in: int, n_out: int
) -> float:
    """The members' matrix-product work in GFLOP, unpadded: 3 products a layer for a
    training row (forward, and backward for inputs and weights), 1 for a validation row."""
    total = 0.0
    for c in group:
        h = c.hidden_units
        macs = n_in * h + (c.n_layers - 1) * h * h + h * n_out
        total += 2 * macs * c.epochs * (3 * n_train + n_val)
    return total / 1e9


def peak_gflops(device: str) -> float:
    """One thread's rate on a 1024 x 1024 matrix product, the best of 5."""
    a = torch.randn(1024, 1024, device=device)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * 1024**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8,16,32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-sequential", type=int, default=8, help="trained alone per K")
    parser.add_argument("--widths", default="4-128,32-64", help="width ranges, low-high")
    parser.add_argument("--bf16", action="store_true", help="also time under bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = args.device
    ranges = [tuple(int(w) for w in r.split("-")) for r in args.widths.split(",")]
    modes = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    data = to_device(load_dataset(DataSpec(dataset="digits", validation=0.2), seed=0), device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu, 1 thread"
    warm = configs(1, seed=99)[0]
    train(warm, data)  # warm-up (first optimizer, first kernels)
    train_packed([warm, warm], data)
    peak = peak_gflops(device)
    n_in, n_out = data.X_train.shape[1], data.n_outputs
    n_train, n_val = data.X_train.shape[0], data.X_val.shape[0]
    for mode, widths, k in (
        (mode, widths, int(k)) for mode in modes for widths in ranges for k in args.sizes.split(",")
    ):
        precision = (
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
            if mode == "bf16"
            else contextlib.nullcontext()
        )
        with precision:
            group = configs(k, seed=k, widths=widths)
            before = os.getloadavg()[0]
            # The same configurations one by one (at most n_sequential of them) ...
            alone = group[: args.n_sequential]
            started = time.perf_counter()
            for config in alone:
                train(config, data, objective="val_accuracy")
            sequential = (time.perf_counter() - started) / len(alone)
            # ... and all k as one fused model.
            started = time.perf_counter()
            results = train_packed(group, data, objective="val_accuracy")
            fused = (time.perf_counter() - started) / k
            scores = [r.metrics["val_accuracy"] for r in results if not isinstance(r, Exception)]
            # ... and as `--pack` trains them on one core: split into sub-groups of
            # similar widths (packing.split_by_width), a sub-group of one fused alone.
            parts = split_by_width(group, n_in, n_out, device)
            started = time.perf_counter()
            for part in parts:
                train_packed([group[i] for i in part], data, objective="val_accuracy")
            bucketed_total = time.perf_counter() - started
            bucketed = bucketed_total / k
            gflop = matmul_gflop(group, n_train, n_val, n_in, n_out)
            row = {
                "device": name,
                "precision": mode,
                "widths": f"{widths[0]}..{widths[1]}",
                "k": k,
                "sequential_s_per_trial": round(sequential, 4),
                "fused_s_per_trial": round(fused, 4),
                "speedup": round(sequential / fused, 2),
                "by_width_s_per_trial": round(bucketed, 4),
                "by_width_speedup": round(sequential / bucketed, 2),
                "by_width_groups": [len(p) for p in parts],
                "matmul_gflop": round(gflop, 2),
                "by_width_gflops": round(gflop / bucketed_total, 1),
                "peak_gflops": round(peak, 1),
                "best_val_accuracy": round(max(scores), 4) if scores else None,
                "load": round((before + os.getloadavg()[0]) / 2, 2),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
