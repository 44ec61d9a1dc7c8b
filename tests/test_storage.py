"""Storage URLs: SQLite, the journal file, gRPC, SQLAlchemy URLs with missing drivers,
concurrent opening of a new database, and the proxy command's own errors."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import imported_by
from typer.testing import CliRunner

from automl import storage, studies
from automl.cli import app
from automl.errors import StorageError


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("journal:runs/j.log", "runs/j.log"),
        ("journal:///abs/j.log", "/abs/j.log"),
        ("runs/j.log", "runs/j.log"),
        ("runs/j.jsonl", "runs/j.jsonl"),
        ("sqlite:///runs/x.db", None),
        ("postgresql+psycopg://u@h/db.log", None),  # a URL, whatever its last letters
    ],
)
def test_journal_paths(url: str, path: str | None) -> None:
    assert studies._journal_path(url) == path


def test_a_journal_file_is_a_storage_for_every_command(tiny_space: Path) -> None:
    runner = CliRunner()
    ran = runner.invoke(
        app, ["run", str(tiny_space), "--storage", "journal:j.log", "--n-trials", "2"]
    )
    assert ran.exit_code == 0, ran.output
    from optuna.storages import JournalStorage

    assert isinstance(studies.open_storage("j.log"), JournalStorage)
    # The same file by its plain .log path.
    listed = runner.invoke(app, ["studies", "--storage", "j.log", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(r["name"], r["n_trials"]) for r in json.loads(listed.stdout)] == [("tiny", 2)]
    best = runner.invoke(app, ["best", "tiny", "--storage", "journal:j.log", "--json"])
    assert best.exit_code == 0 and json.loads(best.stdout)["number"] in (0, 1)


def test_a_file_that_is_not_a_whole_journal_is_refused_untouched(tiny_space: Path) -> None:
    runner = CliRunner()
    Path("app.log").write_text("my app's own log line\n")
    base = ["run", str(tiny_space), "--n-trials", "1", "--storage"]
    refused = runner.invoke(app, [*base, "app.log"])
    assert refused.exit_code == 2
    assert "app.log: is not an Optuna journal file" in refused.stderr
    assert Path("app.log").read_text() == "my app's own log line\n"
    assert runner.invoke(app, [*base, "j.log"]).exit_code == 0
    whole = Path("j.log").read_bytes()
    Path("j.log").write_bytes(whole[:-20])  # a process killed mid-record
    cut = runner.invoke(app, [*base, "j.log"])
    assert cut.exit_code == 2
    keep = whole.rstrip(b"\n").rfind(b"\n") + 1
    assert "its last record is cut off" in cut.stderr
    assert f"truncate -s {keep} j.log" in " ".join(cut.stderr.split())
    assert Path("j.log").read_bytes() == whole[:-20]  # nothing glued onto the cut record
    Path("j.log").write_bytes(whole[:keep])  # as the message says
    assert runner.invoke(app, [*base, "j.log"]).exit_code == 0
    empty = runner.invoke(app, [*base, "journal:"])
    assert empty.exit_code == 2 and "no file name" in empty.stderr


def test_reading_a_missing_journal_creates_nothing() -> None:
    runner = CliRunner()
    assert (
        json.loads(runner.invoke(app, ["studies", "--storage", "none.log", "--json"]).stdout) == []
    )
    shown = runner.invoke(app, ["show", "x", "--storage", "journal:none.log"])
    assert shown.exit_code == 2
    assert not Path("none.log").exists()


@pytest.mark.parametrize("url", ["grpc://", "grpc://host", "grpc://host:port", "grpc://:13000"])
def test_malformed_grpc_urls_are_bad_input(url: str) -> None:
    with pytest.raises(StorageError, match=r"grpc://HOST:PORT") as info:
        studies.open_storage(url)
    assert info.value.exit_code == 2


def test_an_unreachable_grpc_proxy_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc")
    monkeypatch.setattr(storage, "GRPC_READY_TIMEOUT", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    result = CliRunner().invoke(app, ["studies", "--storage", f"grpc://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert "automl proxy" in result.output


@pytest.mark.parametrize(
    ("module", "url", "hint"),
    [
        ("psycopg", "postgresql+psycopg://postgres@127.0.0.1:5432/x", "automl[postgres]"),
        ("pymysql", "mysql+pymysql://root@127.0.0.1:3306/x", "automl[mysql]"),
    ],
)
def test_a_missing_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, url: str, hint: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    result = CliRunner().invoke(app, ["studies", "--storage", url])
    assert result.exit_code == 2, result.output
    assert hint in result.output
    assert module in result.output


def test_a_bare_mysql_url_points_to_pymysql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    result = CliRunner().invoke(app, ["studies", "--storage", "mysql://root@127.0.0.1/x"])
    assert result.exit_code == 2
    assert "mysql+pymysql://" in result.output


def test_passwords_stay_out_of_storage_errors() -> None:
    # Port 9 (discard) refuses at once; the error names the URL without the password.
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:9/x"
    pytest.importorskip("psycopg")
    result = CliRunner().invoke(app, ["studies", "--storage", url])
    assert result.exit_code == 1, result.output
    assert "s3cret" not in result.output
    assert "postgres:***@127.0.0.1" in result.output


def _open_and_write(url: str, barrier: object, results: object) -> None:
    import optuna

    barrier.wait()  # type: ignore[attr-defined]
    try:
        storage = studies.open_storage(url)
        study = optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
        for _ in range(3):
            trial = study.ask()
            study.tell(trial, trial.suggest_float("x", 0, 1))
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Overlapping cron runs or --workers on a new file race to create Optuna's tables;
    measured before the retry: about 2 of 4 processes failed ("table studies already
    exists", "UNIQUE constraint failed: alembic_version")."""
    import optuna

    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(url, barrier, results)) for _ in "abcd"]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["ok"] * 4
        study = optuna.load_study(study_name="race", storage=studies.open_storage(url))
        assert len(study.trials) == 12


def test_a_sqlite_file_is_read_by_hand_only_before_sqlite_opens_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Closing a descriptor of the file drops this process's SQLite locks (the cause of
    "database disk image is malformed" with --workers), so the header check runs once."""
    import optuna

    url = f"sqlite:///{tmp_path / 'once.db'}"
    optuna.create_study(study_name="s", storage=studies.open_storage(url))
    calls: list[Path] = []
    monkeypatch.setattr(storage, "_check_sqlite_file", calls.append)
    for _ in range(3):
        studies.open_storage(url)
    assert calls == []
    fresh = tmp_path / "made-elsewhere.db"
    fresh.write_bytes(Path(tmp_path / "once.db").read_bytes())
    studies.open_storage(f"sqlite:///{fresh}")
    studies.open_storage(f"sqlite:///{fresh}")
    assert calls == [fresh]


def test_the_proxy_refuses_a_journal_file() -> None:
    result = CliRunner().invoke(app, ["proxy", "--storage", "journal:j.log"])
    assert result.exit_code == 2
    assert "journal" in result.output


def test_the_proxy_says_when_its_port_is_taken(storage_url: str) -> None:
    pytest.importorskip("grpc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["proxy", "--storage", storage_url, "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert "--port" in result.output


# --------------------------------------------------------------------------- schema check


def test_the_quick_schema_check_knows_alembics_head() -> None:
    """The newest schema read off the migration scripts is Alembic's own head."""
    from types import SimpleNamespace

    import alembic.script
    from optuna.storages._rdb import storage as rdb

    storage._install_quick_schema_check()
    quick = rdb._VersionManager
    optunas = quick.__mro__[1]  # Optuna's own _VersionManager
    config = optunas._create_alembic_config(SimpleNamespace(url="sqlite://"))
    head = alembic.script.ScriptDirectory.from_config(config).get_current_head()
    assert quick.get_head_version(SimpleNamespace()) == head
    folder = Path(rdb.__file__).parent / "alembic" / "versions"
    assert storage._alembic_head(folder) == head
    assert storage._alembic_head(folder / "missing") is None


def test_an_existing_study_opens_without_alembic(storage_url: str, tmp_path: Path) -> None:
    import optuna

    optuna.create_study(study_name="q", storage=storage.open_storage(storage_url))
    code = (
        "import optuna\n"
        "from automl.storage import open_storage\n"
        f"s = open_storage({storage_url!r}, create=False)\n"
        "optuna.load_study(study_name='q', storage=s).optimize(lambda t: 1.0, n_trials=2)\n"
    )
    assert imported_by(code, ("alembic", "mako"), tmp_path) == []
    # ... and Optuna's own, unpatched check still accepts the file.
    optuna_cli = [sys.executable, "-c", "import sys; from optuna.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*optuna_cli, "studies", "--storage", storage_url, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert [s["name"] for s in json.loads(done.stdout)] == ["q"]


def test_an_older_schema_still_asks_for_an_upgrade(storage_url: str, tmp_path: Path) -> None:
    import sqlite3

    import optuna

    optuna.create_study(study_name="q", storage=storage.open_storage(storage_url))
    storage.close_storages()
    path = storage_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    code = f"from automl.storage import open_storage\nopen_storage({storage_url!r})\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "optuna storage upgrade" in done.stderr, done.stderr[-2000:]
