"""Workers benchmark: trials per minute with 1 and 2 workers on SQLite, PostgreSQL (and
the journal file), plus a lock stress test, counting "database is locked" errors.

    .venv/bin/python bench/workers.py                  # the throughput table
    .venv/bin/python bench/workers.py --stress 4,8     # many tiny trials, many workers

Each cell runs `automl run SPACE --workers N --n-trials T --json` as a real process on a
fresh storage and reports: wall-clock trials/minute for the whole command (process
starts included) and steady trials/minute (first trial start to last trial end), plus the
lock errors seen (in stderr and in failed trials' reasons) and the exit code. PostgreSQL
cells are skipped when 127.0.0.1:5432 does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from automl.workers import automl_command

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

# Small CPU-bound MLPs on digits: a few hundred ms a trial, so storage traffic matters.
SPACE = """\
name: bench-workers
data: {dataset: digits, validation: 0.2}
model: mlp
train: {epochs: 5, patience: 0}
objective: val_accuracy
study: {sampler: tpe, pruner: none, seed: 0}
space:
  optimizer:
    adam: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}}
    sgd: {lr: {low: 1.0e-3, high: 0.5, log: true}, momentum: {low: 0.0, high: 0.9}}
  loss: cross_entropy
  batch_size: [32, 64, 128]
  hidden_units: {low: 16, high: 256, log: true}
  n_layers: {low: 1, high: 3}
  dropout: {low: 0.0, high: 0.3}
"""

# The stress space: one epoch on iris, so workers hit the storage as often as they can.
STRESS_SPACE = """\
name: bench-stress
data: {dataset: iris, validation: 0.3}
model: mlp
train: {epochs: 1, patience: 0}
objective: val_accuracy
study: {sampler: random, pruner: none, seed: 0}
space:
  optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-1, log: true}}}
  loss: cross_entropy
  batch_size: [16, 32]
  hidden_units: {low: 8, high: 32, log: true}
"""


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Postgres:
    """A throwaway database on the local server."""

    def __init__(self) -> None:
        self.name = f"bench_workers_{uuid.uuid4().hex[:8]}"

    @staticmethod
    def available() -> bool:
        try:
            import psycopg

            psycopg.connect(PG_ADMIN).close()
            return True
        except Exception:
            return False

    def __enter__(self) -> str:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"

    def __exit__(self, *exc: object) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def storage_trials(url: str, study: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from automl.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(deepcopy=False)


def run_cell(
    space: Path, url: str, *, workers: int, n_trials: int, study: str, threads: int | None = None
) -> dict:
    cmd = [
        *automl_command(),
        "run",
        str(space),
        "--study",
        study,
        "--n-trials",
        str(n_trials),
        "--json",
    ]
    cmd += ["--storage", url, "--device", "cpu"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    from automl.workers import threads_per_worker

    env = dict(os.environ, AUTOML_STORAGE=url)
    # --workers N gives each child cores // N threads; a single process gets what this
    # cell asks (default: all the cores, as --workers 1 would have).
    threads = threads if threads is not None else threads_per_worker(workers)
    if workers == 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    load_before = load()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=space.parent)
    wall = time.perf_counter() - started
    trials = storage_trials(url, study)
    finished = [t for t in trials if t.state.is_finished()]
    locked_stderr = proc.stderr.lower().count("database is locked")
    locked_trials = sum(
        "locked" in str(t.user_attrs.get("fail_reason", "")).lower() for t in trials
    )
    steady = 0.0
    if len(finished) > 1:
        first = min(t.datetime_start for t in finished)
        last = max(t.datetime_complete for t in finished)
        steady = (last - first).total_seconds()
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        doc = {}
    best = (doc.get("best") or {}).get("value")
    return {
        "workers": workers,
        "threads": threads,
        "trials": len(finished),
        "failed": sum(t.state.name == "FAIL" for t in trials),
        "running_left": sum(t.state.name == "RUNNING" for t in trials),
        "wall_s": round(wall, 1),
        "trials_per_min": round(len(finished) / wall * 60, 1),
        "steady_trials_per_min": round(len(finished) / steady * 60, 1) if steady else None,
        "lock_errors": locked_stderr + locked_trials,
        "exit_code": proc.returncode,
        "best": best,
        "load_before": load_before,
        "load_after": load(),
        "stderr_tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else [],
    }


def storages(tmp: Path, kinds: list[str]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for kind in kinds:
        if kind == "sqlite":
            out.append(("sqlite", lambda i: f"sqlite:///{tmp / f'bench{i}.db'}"))
        elif kind == "journal":
            out.append(("journal", lambda i: f"journal:{tmp / f'bench{i}.log'}"))
        elif kind == "postgres":
            if Postgres.available():
                out.append(("postgres", None))
            else:
                print("postgres: 127.0.0.1:5432 unreachable, skipped", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="trials per cell")
    parser.add_argument(
        "--workers",
        default="1,1t1,2",
        help="comma list of worker counts; 1t1 = one worker with one torch thread",
    )
    parser.add_argument("--storages", default="sqlite,postgres", help="sqlite,postgres,journal")
    parser.add_argument(
        "--stress", default="", help="worker counts for the SQLite lock stress test, e.g. 4,8"
    )
    parser.add_argument("--stress-trials", type=int, default=120)
    args = parser.parse_args()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        space = tmp / "space.yaml"
        space.write_text(SPACE)
        cells = [w.partition("t") for w in args.workers.split(",") if w]
        for kind, make in storages(tmp, args.storages.split(",")):
            for i, (n_text, _, t_text) in enumerate(cells):
                n, threads = int(n_text), int(t_text) if t_text else None
                cell = {"workers": n, "n_trials": args.trials, "study": "b", "threads": threads}
                if kind == "postgres":
                    with Postgres() as url:
                        row = run_cell(space, url, **cell)  # type: ignore[arg-type]
                else:
                    url = make(f"{n}_{i}")  # type: ignore[operator]
                    row = run_cell(space, url, **cell)  # type: ignore[arg-type]
                row["storage"] = kind
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.stress:
            stress = tmp / "stress.yaml"
            stress.write_text(STRESS_SPACE)
            for n in (int(w) for w in args.stress.split(",") if w):
                url = f"sqlite:///{tmp / f'stress{n}.db'}"
                row = run_cell(stress, url, workers=n, n_trials=args.stress_trials, study="s")
                row["storage"] = "sqlite-stress"
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(
        "| storage | workers | threads each | finished | failed | wall s | trials/min "
        "| steady trials/min | lock errors | exit | load before -> after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['storage']} | {r['workers']} | {r['threads']} | {r['trials']} | {r['failed']} "
            f"| {r['wall_s']} "
            f"| {r['trials_per_min']} | {r['steady_trials_per_min']} | {r['lock_errors']} "
            f"| {r['exit_code']} | {r['load_before']} -> {r['load_after']} |"
        )


if __name__ == "__main__":
    main()
