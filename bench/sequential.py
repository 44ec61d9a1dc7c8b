"""Whole-process time per trial: the Optuna-example reference against ``automl run``
(sequential, and ``--pack K``) on the same space, data, epochs and storage kind.

Each round runs the reference, then automl, then automl --pack, back to back, as fresh
processes on fresh SQLite files, so load from elsewhere affects them alike. The figure
is wall time of the whole process (imports, data, study, trials) divided by the trials.

    python bench/sequential.py --n-trials 30 --rounds 1 --pack 8
    python bench/sequential.py --n-trials 64 --device cuda   # both on a GPU
    python bench/sequential.py --n-trials 64 --pack 8 --pack-workers 2

``--pack-workers W`` also times ``automl run --pack K --workers W`` for each K: the
reference runs with torch's default threads, as many as the cores, so W = the cores
compares core for core. ``automl run --pack K`` itself trains a pack's pieces on every
core (helper processes, automl/pack_pool.py); ``--one-process`` also times it with
``AUTOML_PACK_PROCESSES=1``, on one core.

Prints one JSON line per run and a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from automl.pack_pool import PROCESSES_ENV
from automl.workers import automl_command

HERE = Path(__file__).resolve().parent
SPACE = HERE / "space_reference.yaml"


def load() -> float:
    return os.getloadavg()[0]


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def best_of(url: str, study: str) -> tuple[float, int, int]:
    """Best value, number of trials, and epochs trained in all (pruning differs)."""
    s = optuna.load_study(study_name=study, storage=url)
    epochs = sum(len(t.intermediate_values) for t in s.trials)
    return s.best_value, len(s.trials), epochs


def run_round(
    n_trials: int,
    packs: list[int],
    folder: Path,
    index: int,
    device: str = "cpu",
    pack_workers: int = 0,
    one_process: bool = False,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    # The reference as written (torch's default threads), and with one thread like automl.
    for name, extra in (("reference", []), ("reference, 1 thread", ["--threads", "1"])):
        ref_url = f"sqlite:///{folder / f'reference{index}_{len(rows)}.db'}"
        before = load()
        seconds, _ = timed(
            [
                sys.executable,
                str(HERE / "reference_optuna.py"),
                "--n-trials",
                str(n_trials),
                "--storage",
                ref_url,
                "--study",
                "reference",
                "--device",
                device,
                *extra,
            ],
            folder,
        )
        best, n, epochs = best_of(ref_url, "reference")
        rows.append(_row(name, n, epochs, seconds, best, before))
    runs: list[tuple[str, list[str], dict[str, str]]] = [
        ("automl", [], {}),
        *((f"automl --pack {k}", ["--pack", str(k)], {}) for k in packs),
    ]
    if one_process:
        runs += [
            (f"automl --pack {k}, one process", ["--pack", str(k)], {PROCESSES_ENV: "1"})
            for k in packs
        ]
    if pack_workers > 1:
        runs += [
            (
                f"automl --pack {k} --workers {pack_workers}",
                ["--pack", str(k), "--workers", str(pack_workers)],
                {},
            )
            for k in packs
        ]
    for name, extra, env in runs:
        url = f"sqlite:///{folder / f'automl{index}_{len(rows)}.db'}"
        before = load()
        seconds, _ = timed(
            [
                *automl_command(),
                "run",
                str(SPACE),
                "--n-trials",
                str(n_trials),
                "--storage",
                url,
                "--study",
                "bench",
                "--device",
                device,
                "--json",
                *extra,
            ],
            folder,
            env,
        )
        best, n, epochs = best_of(url, "bench")
        rows.append(_row(name, n, epochs, seconds, best, before))
    return rows


def _row(
    name: str, n: int, epochs: int, seconds: float, best: float, before: float
) -> dict[str, object]:
    return {
        "run": name,
        "n_trials": n,
        "epochs_trained": epochs,
        "seconds": round(seconds, 2),
        "s_per_trial": round(seconds / n, 3),
        "best_val_accuracy": round(best, 4),
        "load_before": round(before, 2),
        "load_after": round(load(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pack", default="8", help="K of --pack, or several: 8,32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both searches")
    parser.add_argument(
        "--pack-workers", type=int, default=0, help="also time --pack K with --workers W"
    )
    parser.add_argument(
        "--one-process", action="store_true", help="also time --pack K on one process"
    )
    args = parser.parse_args()
    per_run: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            packs = [int(k) for k in str(args.pack).split(",")]
            rows = run_round(
                args.n_trials,
                packs,
                Path(tmp),
                index,
                args.device,
                args.pack_workers,
                args.one_process,
            )
            for row in rows:
                print(json.dumps(row), flush=True)
                per_run.setdefault(str(row["run"]), []).append(row)
    ref = statistics.median(float(r["s_per_trial"]) for r in per_run["reference"])  # type: ignore[arg-type]
    summary: dict[str, object] = {
        "summary": "sequential",
        "device": args.device,
        "reference_s_per_trial": ref,
    }
    references = [float(r["s_per_trial"]) for r in per_run["reference"]]  # type: ignore[arg-type]
    for name, rows in per_run.items():
        mine = statistics.median(float(r["s_per_trial"]) for r in rows)  # type: ignore[arg-type]
        summary[f"{name} / reference"] = round(mine / ref, 3)
        # Each round against its own reference run, minutes apart at most: this
        # machine's speed drifts by a third from one minute to the next.
        paired = [
            round(float(r["s_per_trial"]) / base, 3)  # type: ignore[arg-type]
            for r, base in zip(rows, references, strict=True)
        ]
        summary[f"{name} / reference, by round"] = paired
        summary[f"{name} best"] = max(float(r["best_val_accuracy"]) for r in rows)  # type: ignore[arg-type]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
