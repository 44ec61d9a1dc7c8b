"""What per-epoch checkpoints cost: the same training with and without them.

    .venv/bin/python bench/checkpoints.py [--epochs 20] [--repeats 5]

Prints the median seconds per epoch of each, the overhead per epoch, and the size of one
checkpoint, for a small and a larger MLP on digits (CPU)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from automl.checkpoints import Checkpointer
    from automl.data import load_dataset, to_device
    from automl.spaces import TrialConfig, parse_space
    from automl.training import train

    torch.set_num_threads(1)
    space = parse_space({"data": {"dataset": "digits"}, "objective": "val_accuracy"})
    data = to_device(load_dataset(space.data, seed=0), "cpu", model="mlp")
    for hidden, layers in ((32, 1), (512, 3)):
        config = TrialConfig(
            epochs=args.epochs, hidden_units=hidden, n_layers=layers, batch_size=64, seed=1
        )
        plain, saved = [], []
        size = 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            train(config, data)
            plain.append((time.perf_counter() - started) / args.epochs)
            with tempfile.TemporaryDirectory() as tmp:
                ck = Checkpointer(Path(tmp), 0)
                started = time.perf_counter()
                train(config, data, checkpoint=ck)
                saved.append((time.perf_counter() - started) / args.epochs)
                size = ck.path.stat().st_size
        a, b = statistics.median(plain), statistics.median(saved)
        print(
            f"mlp {layers}x{hidden}: {a * 1e3:.1f} ms/epoch plain, {b * 1e3:.1f} ms/epoch "
            f"with checkpoints (+{(b - a) * 1e3:.1f} ms, {100 * (b - a) / a:+.0f}%), "
            f"checkpoint {size / 1024:.0f} KiB"
        )


if __name__ == "__main__":
    main()
