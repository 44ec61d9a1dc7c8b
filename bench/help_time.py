"""``automl --help`` start-up time (whole process), and whether it imports torch.

    python bench/help_time.py [--runs 20]

Prints median and best wall seconds over the runs (hyperfine-style, without hyperfine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("automl")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "automl.cli", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from automl.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print(
        json.dumps(
            {
                "command": " ".join(cmd[-2:]),
                "runs": args.runs,
                "median_s": round(statistics.median(times), 3),
                "best_s": round(min(times), 3),
                "imports_torch": probe.stderr.strip().splitlines()[-1] == "True",
                "load": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
