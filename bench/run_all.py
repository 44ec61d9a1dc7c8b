"""``make bench``: run the benchmark scripts of bench/, print their figures and record
them (with the machine, the date and the load) in bench/results/latest.json.

    python bench/run_all.py              # everything (about 30-60 min on 2 busy cores)
    python bench/run_all.py --quick      # smaller runs of every script
    python bench/run_all.py --skip-slow  # only the fast ones (help time, fused throughput)
    python bench/run_all.py --only fused,help_time

Where torch sees a GPU it also runs the CUDA benchmarks (fused_cuda, sequential_cuda);
elsewhere they are skipped with a line that says so.

BENCHMARKS.md is written by hand from these figures: it records what was measured, how
and under which load, which a script cannot judge.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (arguments, arguments with --quick, slow?)
SCRIPTS: dict[str, tuple[list[str], list[str], bool]] = {
    "help_time": (["--runs", "20"], ["--runs", "5"], False),
    "fused": ([], ["--sizes", "1,8"], False),
    "sequential": (
        ["--n-trials", "64", "--rounds", "2", "--one-process"],
        ["--n-trials", "8"],
        True,
    ),
    "bookkeeping": (["--n-trials", "1000"], ["--n-trials", "100"], True),
    "checkpoints": ([], ["--repeats", "2"], True),
    "workers": ([], ["--trials", "10", "--storages", "sqlite"], True),
    "quality": ([], ["--budget", "20", "iris"], True),
}
# Run as well where torch sees a GPU: name -> (script, arguments, with --quick, slow?)
CUDA_SCRIPTS: dict[str, tuple[str, list[str], list[str], bool]] = {
    "fused_cuda": (
        "fused",
        ["--device", "cuda", "--sizes", "1,4,8,16,32,64,128", "--bf16"],
        ["--device", "cuda", "--sizes", "1,32"],
        False,
    ),
    "sequential_cuda": (
        "sequential",
        ["--device", "cuda", "--n-trials", "64", "--pack", "8,32"],
        ["--device", "cuda", "--n-trials", "8"],
        True,
    ),
}


def machine() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(name: str, args: list[str], script_name: str | None = None) -> dict[str, object]:
    script = HERE / f"{script_name or name}.py"
    cmd = [sys.executable, str(script), *args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
    return {
        "script": name,
        "command": " ".join(["python", f"bench/{script_name or name}.py", *args]),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "output": done.stdout.splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs of every script")
    parser.add_argument("--skip-slow", action="store_true", help="only the fast scripts")
    parser.add_argument("--only", help="comma list of script names")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    known = {*SCRIPTS, *CUDA_SCRIPTS}
    wanted = set(args.only.split(",")) if args.only else known
    unknown = wanted - known
    if unknown:
        raise SystemExit(
            f"unknown script(s): {', '.join(sorted(unknown))}; known: {', '.join(SCRIPTS)}"
        )
    record: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "runs": [],
    }
    runs: list[dict[str, object]] = []
    for name, (full, quick, slow) in SCRIPTS.items():
        if name not in wanted or (slow and args.skip_slow):
            continue
        if not (HERE / f"{name}.py").exists():
            print(f"== {name}: bench/{name}.py not found, skipped", flush=True)
            continue
        runs.append(run(name, quick if args.quick else full))
    gpu = "gpu" in record["machine"]  # type: ignore[operator]
    for name, (script, full, quick, slow) in CUDA_SCRIPTS.items():
        if name not in wanted or (slow and args.skip_slow):
            continue
        if not gpu:
            print(f"== {name}: no CUDA GPU here, skipped", flush=True)
            continue
        runs.append(run(name, quick if args.quick else full, script))
    record["runs"] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded in {args.out}")
    if any(r["returncode"] for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
