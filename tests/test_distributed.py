"""Workers on one machine (--workers N), many processes on PostgreSQL / MariaDB, and the
gRPC storage proxy. Real processes and real servers; database tests skip (not fail) only
when the server does not answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from automl import workers
from automl.cli import app
from automl.storage import open_storage
from automl.studies import worker_seed
from automl.workers import automl_command

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

# Long enough (150 epochs of iris) that a worker is almost always inside a trial.
SLOW_SPACE = """\
name: slow
data: {dataset: iris, validation: 0.3}
model: mlp
train: {epochs: 150, patience: 0}
objective: val_accuracy
study: {sampler: random, pruner: none, seed: 2}
space:
  optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-1, log: true}}}
  loss: cross_entropy
  batch_size: [16, 32]
  hidden_units: {low: 8, high: 32, log: true}
"""


def cmd(*args: str) -> list[str]:
    return [*automl_command(), *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``automl ARGS`` in a process of its own, its output captured."""
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout)


def trials_of(url: str, study: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials()


def states(trials: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def assert_whole(trials: list[Any], *, low: int, high: int) -> None:
    """Between low and high finished trials, unique numbers, nothing left RUNNING."""
    counts = states(trials)
    finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    assert low <= finished <= high, counts
    assert counts.get("RUNNING", 0) == 0, counts
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sorted(numbers) == list(range(len(numbers)))


@pytest.fixture
def pg_url() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is unreachable")
    name = f"automl_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def mysql_url() -> Iterator[str]:
    pymysql = pytest.importorskip("pymysql")
    try:
        admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3)
    except pymysql.err.OperationalError:
        pytest.skip("MariaDB/MySQL at 127.0.0.1:3306 is unreachable")
    name = f"automl_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("n_trials", "n_workers", "expected"),
    [(20, 2, [10, 10]), (7, 3, [3, 2, 2]), (2, 4, [1, 1]), (1, 1, [1])],
)
def test_split_trials_shares_the_budget(n_trials: int, n_workers: int, expected: list[int]) -> None:
    assert workers.split_trials(n_trials, n_workers) == expected


@pytest.mark.parametrize(
    ("n_workers", "cores", "expected"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (4, 16, 4), (3, 16, 5)]
)
def test_threads_per_worker_fill_the_cores(n_workers: int, cores: int, expected: int) -> None:
    assert workers.threads_per_worker(n_workers, cores) == expected


def test_worker_env_sets_threads_index_and_spreads_gpus() -> None:
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "16"}
    envs = [workers.worker_env(i, 3, base=base, gpus=["0", "1"], cores=8) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"2"}
    assert {e["AUTOML_NUM_THREADS"] for e in envs} == {"2"}
    assert [e[workers.WORKER_INDEX_ENV] for e in envs] == ["0", "1", "2"]
    assert envs[0]["PATH"] == "/bin"
    # Machine 2 of several, 3 workers each: workers 6, 7, 8 (distinct seeds everywhere).
    machine = dict(base, AUTOML_WORKER_INDEX="2")
    assert [workers.worker_env(i, 3, base=machine)[workers.WORKER_INDEX_ENV] for i in range(3)] == [
        "6",
        "7",
        "8",
    ]
    # One GPU (or none): every worker shares it, CUDA_VISIBLE_DEVICES untouched.
    assert "CUDA_VISIBLE_DEVICES" not in workers.worker_env(1, 2, base=base, gpus=["0"])


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"CUDA_VISIBLE_DEVICES": "2,3"}, ["2", "3"]), ({"CUDA_VISIBLE_DEVICES": ""}, [])],
)
def test_visible_gpus_reads_cuda_visible_devices(env: dict[str, str], expected: list[str]) -> None:
    assert workers.visible_gpus(env) == expected


@pytest.mark.parametrize(
    ("codes", "signalled", "expected"),
    [
        ([0, 0, 0], None, 0),
        ([0, 2, 1], None, 2),  # the first failure in exit order
        ([1, 0], None, 1),
        ([0, -9], None, 1),  # a worker killed by a signal is a failed worker
        ([0, 143], signal.SIGTERM, 143),
        ([130, 130], signal.SIGINT, 130),
    ],
)
def test_combine_exit_codes(codes: list[int], signalled: int | None, expected: int) -> None:
    assert workers.combine_exit_codes(codes, signalled=signalled) == expected


def test_worker_seed_gives_each_worker_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOML_WORKER_INDEX", raising=False)
    assert worker_seed(5) == 5
    monkeypatch.setenv("AUTOML_WORKER_INDEX", "0")
    assert worker_seed(5) == 5
    monkeypatch.setenv("AUTOML_WORKER_INDEX", "2")
    assert worker_seed(5) == 5 + 2 * 7919
    assert worker_seed(None) is None


def test_resumed_runs_do_not_repeat_the_first_trials(tiny_space: Path, storage_url: str) -> None:
    """Cron runs and late workers load the study with its seed: without mixing in the
    trial count, run 2 proposed exactly run 1's points again."""
    runner = CliRunner()
    for _ in range(2):
        ran = runner.invoke(
            app, ["run", str(tiny_space), "--storage", storage_url, "--n-trials", "2"]
        )
        assert ran.exit_code == 0, ran.output
    trials = trials_of(storage_url, "tiny")
    assert len(trials) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4


# --------------------------------------------------------------------------- the CLI wiring


def test_run_workers_passes_the_command_line_and_splits_the_budget(
    monkeypatch: pytest.MonkeyPatch, tiny_space: Path, storage_url: str
) -> None:
    seen: dict[str, Any] = {}

    def fake_run_workers(args: list[str], **kwargs: Any) -> workers.WorkersResult:
        seen["args"], seen["kwargs"] = args, kwargs
        from automl.studies import RunSummary

        summary = RunSummary(study_name="tiny", storage=storage_url, n_complete=5)
        summary.stop_reason = "ran 5 trial(s) (3 workers)"
        return workers.WorkersResult(
            summary=summary,
            workers=[
                workers.WorkerResult(i, code, {"n_complete": 2}) for i, code in enumerate((0, 2, 0))
            ],
            exit_code=2,
        )

    monkeypatch.setattr(workers, "run_workers", fake_run_workers)
    result = CliRunner().invoke(
        app,
        [
            *("run", str(tiny_space), "--storage", storage_url, "--workers", "3"),
            *("--n-trials", "5", "--seed", "3", "--param", "dropout=0..0.3", "--device", "cpu"),
            "--json",
        ],
    )
    assert result.exit_code == 2, result.output
    args = seen["args"]
    assert args[:2] == ["run", str(tiny_space)]
    assert args[args.index("--seed") + 1] == "3"
    assert args[args.index("--param") + 1] == "dropout=0..0.3"
    assert args[args.index("--device") + 1] == "cpu"
    assert args[-2:] == ["--study", "tiny"]
    for parent_only in ("--workers", "--json", "--n-trials", "--storage"):
        assert parent_only not in args
    assert seen["kwargs"]["n_workers"] == 3
    assert seen["kwargs"]["n_trials"] == 5
    assert seen["kwargs"]["storage_url"] == storage_url
    doc = json.loads(result.stdout)
    assert [w["exit_code"] for w in doc["workers"]] == [0, 2, 0]
    # The parent created the study once, before any worker.
    assert trials_of(storage_url, "tiny") == []


def test_workers_with_bad_data_fail_before_writing_anything(
    tmp_path: Path, storage_url: str
) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text("data: {path: missing.csv, target: y}\nspace: {optimizer: adam, loss: mse}\n")
    result = CliRunner().invoke(
        app, ["run", str(space), "--storage", storage_url, "--workers", "2", "--n-trials", "2"]
    )
    assert result.exit_code == 2, result.output
    assert "missing.csv" in result.output
    from automl.studies import list_studies

    assert list_studies(storage_url) == []


# --------------------------------------------------------------------------- real workers


def test_two_workers_on_sqlite_reach_until_with_distinct_first_trials(
    tiny_space: Path, storage_url: str
) -> None:
    proc = run_cli(
        *("run", str(tiny_space), "--storage", storage_url),
        *("--workers", "2", "--until", "5", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [w["exit_code"] for w in doc["workers"]] == [0, 0]
    # How the 5 short trials split between the workers depends on which starts first (one
    # may take them all), so only the whole is checked.
    trials = trials_of(storage_url, "tiny")
    assert_whole(trials, low=5, high=6)
    assert doc["n_complete"] + doc["n_pruned"] == len(trials)
    # Each worker samples from its own seed stream: no two trials are the same point (with
    # one seed, worker 1's k-th trial would repeat worker 0's k-th).
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)
    # Nothing left to do: the cron form returns at once without starting workers.
    again = run_cli(
        *("run", str(tiny_space), "--storage", storage_url),
        *("--workers", "2", "--until", "5", "--json"),
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "already holds" in json.loads(again.stdout)["stop_reason"]
    assert len(trials_of(storage_url, "tiny")) == len(trials)


def test_workers_sharing_n_trials_report_what_they_ran_together(
    tiny_space: Path, storage_url: str
) -> None:
    proc = run_cli(
        *("run", str(tiny_space), "--storage", storage_url),
        *("--workers", "2", "--n-trials", "5", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(trials_of(storage_url, "tiny")) == 5
    assert doc["stop_reason"] == "ran 5 trial(s) (2 workers)"


def wait_for(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def count_states(url: str, study: str) -> dict[str, int]:
    try:
        return states(trials_of(url, study))
    except Exception:  # the study is not there yet
        return {}


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_every_worker_cleanly(tmp_path: Path, storage_url: str) -> None:
    space = tmp_path / "slow.yaml"
    # Trials of a few seconds, so the signal finds both workers inside one.
    space.write_text(SLOW_SPACE.replace("epochs: 150", "epochs: 1500"))
    proc = subprocess.Popen(
        cmd(
            *("run", str(space), "--storage", storage_url),
            *("--workers", "2", "--n-trials", "200", "--json"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: count_states(storage_url, "slow").get("RUNNING", 0) == 2,
            timeout=120,
            what="both workers inside a trial",
        )
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    doc = json.loads(out)
    assert [w["exit_code"] for w in doc["workers"]] == [143, 143]
    counts = count_states(storage_url, "slow")
    assert counts.get("RUNNING", 0) == 0, counts
    # Each worker's interrupted trial is recorded failed and queued again (a worker whose
    # trial happened to end as the signal came has none).
    assert 1 <= counts.get("FAIL", 0) <= 2, counts
    assert counts.get("WAITING", 0) == counts.get("FAIL", 0), counts


# --------------------------------------------------------------------------- PostgreSQL


def test_every_command_works_on_postgresql(tiny_space: Path, pg_url: str) -> None:
    runner = CliRunner()
    ran = runner.invoke(app, ["run", str(tiny_space), "--storage", pg_url, "--n-trials", "2"])
    assert ran.exit_code == 0, ran.output
    listed = runner.invoke(app, ["studies", "--storage", pg_url, "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["n_trials"]) == ("tiny", 2)
    shown = runner.invoke(app, ["show", "tiny", "--storage", pg_url, "--json"])
    assert len(json.loads(shown.stdout)) == 2
    best = runner.invoke(app, ["best", "tiny", "--storage", pg_url, "--json"])
    assert json.loads(best.stdout)["value"] == max(t.value for t in trials_of(pg_url, "tiny"))
    exported = runner.invoke(app, ["export", "tiny", "--format", "csv", "--storage", pg_url])
    assert exported.exit_code == 0 and len(exported.stdout.strip().splitlines()) == 3
    deleted = runner.invoke(app, ["delete", "tiny", "--yes", "--storage", pg_url])
    assert deleted.exit_code == 0, deleted.output
    gone = runner.invoke(app, ["show", "tiny", "--storage", pg_url])
    assert gone.exit_code == 2


def start_workers(
    space: Path, url: str, n: int, *, until: int, env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    """``n`` independent ``automl run`` processes: what ``n`` machines would run."""
    return [
        subprocess.Popen(
            cmd("run", str(space), "--storage", url, "--until", str(until), "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **(env or {})),
        )
        for _ in range(n)
    ]


@pytest.mark.slow
def test_three_processes_on_postgresql_share_one_study(tiny_space: Path, pg_url: str) -> None:
    procs = start_workers(tiny_space, pg_url, 3, until=12)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    assert_whole(trials_of(pg_url, "tiny"), low=12, high=14)


@pytest.mark.slow
def test_a_worker_killed_on_postgresql_is_recovered_by_the_others(
    tmp_path: Path, pg_url: str
) -> None:
    space = tmp_path / "slow.yaml"
    # Trials of about a second each, so the two survivors are still asking for trials
    # well after the killed one's heartbeat grace (3 s) has passed.
    space.write_text(SLOW_SPACE.replace("epochs: 150", "epochs: 500"))
    env = {"AUTOML_HEARTBEAT_INTERVAL": "1", "AUTOML_GRACE_PERIOD": "3"}
    procs = start_workers(space, pg_url, 3, until=12, env=env)
    try:
        wait_for(
            lambda: count_states(pg_url, "slow").get("RUNNING", 0) == 3,
            timeout=180,
            what="three workers inside a trial",
        )
        procs[0].send_signal(signal.SIGKILL)
        outputs = [p.communicate(timeout=300) for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == -signal.SIGKILL
    assert [p.returncode for p in procs[1:]] == [0, 0], [err for _, err in outputs]
    trials = trials_of(pg_url, "slow")
    assert_whole(trials, low=12, high=14)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, states(trials)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1
    assert retries[0].params == failed[0].params
    assert retries[0].state.name in ("COMPLETE", "PRUNED")


# --------------------------------------------------------------------------- MariaDB / MySQL


@pytest.mark.slow
def test_two_workers_on_mariadb(tiny_space: Path, mysql_url: str) -> None:
    proc = run_cli(
        *("run", str(tiny_space), "--storage", mysql_url),
        *("--workers", "2", "--until", "6", "--json"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert_whole(trials_of(mysql_url, "tiny"), low=6, high=7)


# --------------------------------------------------------------------------- gRPC proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_workers_through_the_grpc_proxy(tiny_space: Path, tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    db = f"sqlite:///{tmp_path / 'behind-proxy.db'}"
    port = free_port()
    proxy = subprocess.Popen(
        cmd("proxy", "--storage", db, "--host", "127.0.0.1", "--port", str(port)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=60, what="the proxy to listen")
        run = run_cli(
            *("run", str(tiny_space), "--storage", f"grpc://127.0.0.1:{port}"),
            *("--workers", "2", "--until", "6", "--json"),
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert [w["exit_code"] for w in json.loads(run.stdout)["workers"]] == [0, 0]
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    # What the workers wrote through the proxy is in the database behind it.
    assert_whole(trials_of(db, "tiny"), low=6, high=7)


@pytest.mark.parametrize("backend", ["sqlite", "pg_url", "mysql_url"])
def test_a_new_database_is_stamped_as_alembic_stamps_it(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """automl stamps a database Optuna has just created without importing Alembic
    (0.4 s of a first run); Alembic and unpatched Optuna read that stamp as the head."""
    import sys

    from conftest import imported_by

    url = (
        f"sqlite:///{tmp_path / 'new.db'}"
        if backend == "sqlite"
        else request.getfixturevalue(backend)
    )
    code = f"from automl.storage import open_storage\nopen_storage({url!r})\n"
    assert imported_by(code, ("alembic", "mako"), tmp_path) == []
    check = (
        "import optuna\n"
        f"manager = optuna.storages.RDBStorage({url!r})._version_manager\n"
        "current, head = manager.get_current_version(), manager.get_head_version()\n"
        "assert current == head, (current, head)\n"
        "import alembic\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
