"""Storage URLs: resolving, masking passwords, opening any storage Optuna accepts
(SQLite tuned for several processes, PostgreSQL/MySQL, journal files, the gRPC proxy)."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import StorageError, UsageError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

log = logging.getLogger(__name__)

# Heartbeats and their retry callback are marked experimental in Optuna; every command
# that opens a storage uses them on purpose (the dashboard printed the warnings).
warnings.filterwarnings("ignore", message=r".*experimental feature.*")
warnings.filterwarnings("ignore", message=r".* is experimental \(supported from")

DEFAULT_STORAGE = "sqlite:///studies/automl.db"
# Heartbeats: a live trial writes one every HEARTBEAT_INTERVAL seconds; a trial silent for
# GRACE_PERIOD seconds is taken as dead. The grace is six intervals so a busy machine or a
# slow database write never fails a live trial (Optuna issue #4234).
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 180
MAX_RETRY = 2
SQLITE_TIMEOUT = 60  # seconds a writer waits for a lock before giving up
CONNECT_TIMEOUT = 10  # seconds to reach a database server


# --------------------------------------------------------------------------- storage


def resolve_storage_url(url: str | None) -> str:
    """``--storage``, else ``AUTOML_STORAGE``, else the SQLite file under ./studies."""
    return url or os.environ.get("AUTOML_STORAGE") or DEFAULT_STORAGE


_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?=@)")
# libpq and friends also take the password as a query parameter: ...?password=s3cret
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;\s](?:password|passwd|pwd)=)(?P<pw>[^&\s]*)", re.I)


def mask_url(text: str) -> str:
    """Hide passwords in any URL inside ``text``: ``user:***@host``, ``?password=***``."""
    text = _PASSWORD.sub(lambda m: m.group("head") + "***", text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + "***", text)


def _heartbeat_settings() -> tuple[int, int]:
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < 1:
            raise UsageError(f"{name} must be a positive whole number of seconds, got {raw!r}")
        return int(raw)

    interval = read("AUTOML_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = read(
        "AUTOML_GRACE_PERIOD",
        max(GRACE_PERIOD, 2 * interval)
        if "AUTOML_HEARTBEAT_INTERVAL" not in os.environ
        else 6 * interval,
    )
    return interval, grace


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:"):
        return None
    path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url.removeprefix("journal:").removeprefix("//")
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return url
    return None


def _check_journal(path: Path, *, settle: float = 0.2) -> None:
    """Refuse (before anything is appended to it) a file that is not an Optuna journal,
    and a journal whose last record was cut off (a process killed mid-write, a full
    disk): a record appended to that line would glue onto it and break the whole file."""
    import json

    try:
        size = path.stat().st_size
    except OSError:
        return  # a new journal
    if size == 0:
        return
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise StorageError(
            f"{path}: is not an Optuna journal file (its first line is not a journal "
            "record); name a new file or the study's own journal",
            bad_input=True,
        )
    for attempt in range(2):
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - (1 << 20)))
            tail = fh.read()
            end = fh.tell()
        if tail.endswith(b"\n"):
            return
        if attempt == 0:
            time.sleep(settle)  # another process may be writing that record right now
    start = end - len(tail)
    fix = "cut the partial last line off"
    if b"\n" in tail or start == 0:
        keep = start + tail.rfind(b"\n") + 1
        fix += f" with `truncate -s {keep} {path}`"
    raise StorageError(
        f"{path}: its last record is cut off (a process was killed while writing it, or "
        f"the disk filled up); the records before it are whole: {fix} and run again",
        bad_input=True,
    )


def open_storage(url: str, *, create: bool = True) -> BaseStorage:
    """Open any storage Optuna accepts: SQLAlchemy URLs, ``journal:FILE`` or ``*.log``
    (Optuna's JournalFileBackend), and ``grpc://host:port`` (Optuna's storage proxy).

    With ``create=False`` a missing SQLite or journal file is an error rather than
    created (reading commands never create storage)."""
    masked = mask_url(url)
    journal = _journal_path(url)
    if journal is not None:
        if not journal.strip():
            raise StorageError(
                f"malformed storage URL '{masked}': no file name; use journal:FILE.log",
                bad_input=True,
            )
        if not create and not Path(journal).exists():
            raise StorageError(f"no journal file at {journal}; run a study first", bad_input=True)
        if Path(journal).is_dir():
            raise StorageError(f"{journal}: is a folder, not a journal file", bad_input=True)
        _check_journal(Path(journal))
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        _make_parent(Path(journal))
        return JournalStorage(JournalFileBackend(journal))
    if url.startswith("grpc://"):
        host, _, port = url.removeprefix("grpc://").rstrip("/").partition(":")
        if not host or not port.isdigit():
            raise StorageError(
                f"malformed gRPC storage URL '{masked}'; use grpc://HOST:PORT", bad_input=True
            )
        try:
            from optuna.storages import GrpcStorageProxy

            proxy = GrpcStorageProxy(host=host, port=int(port))
            proxy.wait_server_ready(timeout=GRPC_READY_TIMEOUT)
            return proxy
        except ModuleNotFoundError as exc:
            raise StorageError(
                f"gRPC storage needs '{exc.name}'; pip install 'automl[grpc]'", bad_input=True
            ) from None
        except Exception as exc:  # grpc raises its own types
            raise StorageError(
                f"cannot reach the gRPC storage proxy at {masked} ({type(exc).__name__}); "
                "start it with `automl proxy --storage URL --host HOST --port PORT`"
            ) from None
    if "://" not in url:
        raise StorageError(
            f"malformed storage URL '{masked}'; use e.g. sqlite:///studies/automl.db, "
            "postgresql+psycopg://user@host/db, journal:FILE.log or grpc://host:port",
            bad_input=True,
        )
    sqlite = _sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        if sqlite is None:
            raise StorageError(
                f"'{masked}' is an in-memory database: it keeps nothing after the run, and "
                "workers and later commands cannot see it; use sqlite:///FILE.db",
                bad_input=True,
            )
        if sqlite is not None:
            if sqlite.exists():
                if _first_open(sqlite):
                    _check_sqlite_file(sqlite)
                _OPENED_SQLITE.add(str(sqlite.resolve()))
            elif not create:
                raise StorageError(
                    f"no study storage at {sqlite}; run a study first", bad_input=True
                )
            else:
                _make_parent(sqlite)
                _OPENED_SQLITE.add(str(sqlite.resolve()))
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if url.startswith(("postgresql", "mysql", "mariadb")) and "connect_timeout" not in url:
            # An unreachable server fails in seconds, not after the OS's TCP timeout.
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        if url.startswith(("mysql", "mariadb")) and "read_timeout" not in url:
            _check_mysql_greets(url, masked)
    interval, grace = _heartbeat_settings()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    _install_quick_schema_check()

    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            storage = RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY, inherit_intermediate_values=True
                ),
            )
            break
        except ModuleNotFoundError as exc:
            raise _driver_error(exc, masked) from None
        except Exception as exc:
            # Workers (or overlapping cron runs) opening a new database at once race to
            # create Optuna's tables; the loser sees "already exists" and simply retries.
            if attempt < SCHEMA_RACE_RETRIES and _is_schema_race(exc):
                log.debug("storage schema race (%s), retrying", root_cause(exc))
                time.sleep(0.2 * (attempt + 1))
                continue
            raise _storage_error(exc, masked) from None
    if sqlite is not None:
        _tune_sqlite(storage)
    _ENGINES.add(storage.engine)
    return storage


def _install_quick_schema_check() -> None:
    """Optuna checks a database's schema version through Alembic on every open: 0.3 s of
    imports (Alembic, Mako) and a parse of its migration scripts, a tenth of a short run.
    The check is kept, done quicker: the stored version is read with one query and the
    newest one known from the scripts' ``revision``/``down_revision`` lines. A database
    Optuna has just created is stamped with that head the way Alembic stamps it (its
    ``alembic_version`` table, one row). Anything else (an older schema, an unreadable
    table, scripts that do not parse, a stamp that fails) goes through Optuna's own
    Alembic path, unchanged."""
    from optuna.storages._rdb import storage as rdb

    base = rdb._VersionManager
    if getattr(base, "quick", False):
        return
    head = _alembic_head(Path(rdb.__file__).parent / "alembic" / "versions")

    class QuickVersionManager(base):  # type: ignore[misc, valid-type]
        quick = True

        def _init_alembic(self) -> None:
            if self._stamped() is None and not self._stamp_new():
                super()._init_alembic()

        def _stamp_new(self) -> bool:
            """Stamp a database of the current schema with the head revision, as
            ``alembic stamp`` does; False where Alembic should do it."""
            from sqlalchemy import text

            if head is None or not self._is_alembic_supported():
                return False
            try:
                with self.engine.begin() as connection:
                    connection.execute(text(ALEMBIC_VERSION_TABLE))
                    count = connection.execute(text("SELECT COUNT(*) FROM alembic_version"))
                    if count.scalar() == 0:
                        connection.execute(
                            text("INSERT INTO alembic_version (version_num) VALUES (:v)"),
                            {"v": head},
                        )
            except Exception:  # e.g. another process stamped it first: read what is there
                log.debug("quick stamp failed; reading the stamp", exc_info=True)
            return self._stamped() == head

        def get_current_version(self) -> str:
            return self._stamped() or super().get_current_version()

        def get_head_version(self) -> str:
            return head or super().get_head_version()

        def _stamped(self) -> str | None:
            from sqlalchemy import text

            try:
                with self.engine.connect() as connection:
                    rows = connection.execute(
                        text("SELECT version_num FROM alembic_version")
                    ).fetchall()
            except Exception:  # no table yet, or something Alembic will report
                return None
            return str(rows[0][0]) if len(rows) == 1 else None

    rdb._VersionManager = QuickVersionManager  # type: ignore[misc]


# Alembic's own version table (alembic.runtime.migration), created as it creates it.
ALEMBIC_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)


def _alembic_head(folder: Path) -> str | None:
    """The one revision no migration script names as its ``down_revision``; None when the
    scripts do not say so plainly."""
    revisions: set[str] = set()
    downs: set[str] = set()
    try:
        scripts = [p.read_text(encoding="utf-8") for p in folder.glob("*.py")]
    except OSError:
        return None
    for text in scripts:
        rev = re.search(r"^revision\s*=\s*[\"']([^\"']+)[\"']\s*$", text, re.M)
        down = re.search(r"^down_revision\s*=\s*(?:[\"']([^\"']+)[\"']|None)\s*$", text, re.M)
        if rev is None or down is None:
            return None
        revisions.add(rev[1])
        if down[1]:
            downs.add(down[1])
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


# The engines this process opened and still uses.
_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()


def close_storages() -> None:
    """Close every database connection this process opened. The last connection to a
    SQLite file folds its write-ahead log back into the file, so the ``.db`` alone holds
    every trial (it is what a user copies); ``cli.entry`` calls this before it exits."""
    import gc

    gc.collect()  # storages dropped in a reference cycle close their connections here
    for engine in list(_ENGINES):
        try:
            engine.dispose()
        except Exception as exc:  # closing is best effort: the data is committed
            log.debug("closing %s: %s", mask_url(str(engine.url)), exc)


SCHEMA_RACE_RETRIES = 8
GRPC_READY_TIMEOUT = 10  # seconds to wait for `automl proxy` to answer
_SCHEMA_RACE = (
    "already exists",  # SQLite, PostgreSQL, MySQL: CREATE TABLE lost the race
    "unique constraint failed: alembic_version",  # SQLite: version row lost the race
    "duplicate key value",  # PostgreSQL: pg_type / alembic_version row
    "duplicate entry",  # MySQL
    "database is locked",
)


def _is_schema_race(exc: BaseException) -> bool:
    text = root_cause(exc).lower()
    return any(marker in text for marker in _SCHEMA_RACE)


def _check_mysql_greets(url: str, masked: str) -> None:
    """A MySQL server speaks first. PyMySQL's connect_timeout covers only the TCP connect,
    so a port that accepts but never answers (a wrong port, an HTTP server) would hang
    forever; wait for the greeting ourselves, CONNECT_TIMEOUT seconds at most."""
    import socket

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return  # RDBStorage reports a malformed URL itself
    if not parsed.host or "unix_socket" in parsed.query:
        return
    try:
        with socket.create_connection(
            (parsed.host, parsed.port or 3306), timeout=CONNECT_TIMEOUT
        ) as sock:
            sock.recv(1)
    except TimeoutError:
        raise StorageError(
            f"cannot open the storage {masked}: the server accepted the connection but sent "
            f"nothing in {CONNECT_TIMEOUT} s; is that port a MySQL server?"
        ) from None
    except OSError:
        return  # refused, unknown host, ...: the driver says it in its own words


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, ...
        raise StorageError(
            f"cannot create the folder {path.parent} for the storage: {exc.strerror}; "
            "point --storage elsewhere",
            bad_input=True,
        ) from None


def _driver_error(exc: ModuleNotFoundError, masked: str) -> StorageError:
    # mysql:// means MySQLdb to SQLAlchemy (and postgresql:// psycopg2 before 2.1); the
    # extras install PyMySQL and psycopg 3, so name both ways out.
    installs = {
        "psycopg": "pip install 'automl[postgres]'",
        "psycopg2": "use postgresql+psycopg://... with pip install 'automl[postgres]', "
        "or pip install psycopg2-binary",
        "pymysql": "pip install 'automl[mysql]'",
        "MySQLdb": "use mysql+pymysql://... with pip install 'automl[mysql]', "
        "or pip install mysqlclient",
    }
    name = exc.name or "the database driver"
    install = installs.get(name.split(".")[0], f"pip install {name}")
    return StorageError(
        f"the database driver '{name}' for {masked} is not installed; {install}", bad_input=True
    )


# Storage URL schemes people write, and the one SQLAlchemy knows.
SCHEME_FIXES = {
    "postgres": "postgresql+psycopg",
    "pg": "postgresql+psycopg",
    "psql": "postgresql+psycopg",
    "pgsql": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "psycopg": "postgresql+psycopg",
    "maria": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "mysql": "mysql+pymysql",
    "sqlite3": "sqlite",
    "file": "sqlite",
}


def _scheme_hint(masked: str) -> str:
    """Advice for a URL whose dialect SQLAlchemy cannot load."""
    scheme = masked.split("://", 1)[0].lower()
    dialect = scheme.split("+", 1)[0]
    fix = SCHEME_FIXES.get(dialect)
    if fix is not None and fix != scheme:
        return f"; did you mean {fix}://...?"
    return (
        "; use sqlite:///FILE.db, postgresql+psycopg://user@host/db, "
        "mysql+pymysql://user@host/db, journal:FILE.log or grpc://host:port"
    )


def _storage_error(exc: BaseException, masked: str) -> StorageError:
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ModuleNotFoundError):
        return _driver_error(cause, masked)
    text = mask_url(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
    kind = type(cause).__name__
    if kind in ("ArgumentError", "NoSuchModuleError"):
        return StorageError(
            f"malformed storage URL '{masked}': {text}{_scheme_hint(masked)}", bad_input=True
        )
    if "file is not a database" in text or "malformed" in text:
        return StorageError(
            f"{masked} is not a valid SQLite database ({text}); it was left untouched, "
            "point --storage elsewhere",
            bad_input=True,
        )
    return StorageError(
        f"cannot open the storage {masked}: {text}; check the URL and that the database is "
        "reachable"
    )


def _storage_exceptions() -> tuple[type[BaseException], ...]:
    """What a database that went away, filled up or turned read-only raises."""
    import sqlite3

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, optuna.exceptions.StorageInternalError, sqlite3.Error)


def root_cause(exc: BaseException) -> str:
    """The innermost cause's first line, masked: the driver's own words say it best
    (SQLAlchemy and Optuna wrap them in generic ones)."""
    cause = exc
    for _ in range(5):
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    text = (str(cause).strip().splitlines() or [""])[0] or type(cause).__name__
    return mask_url(text)[:300]


_OPENED_SQLITE: set[str] = set()


def _first_open(path: Path) -> bool:
    """True until this process has opened ``path`` with SQLite. Plain file I/O on a SQLite file is
    only safe before SQLite itself has it open here: closing *any* descriptor of a file
    drops every POSIX lock this process holds on it, SQLite's included, and other
    processes then read a half-written WAL ("database disk image is malformed"; see
    sqlite.org/howtocorrupt.html, 2.2). Seen with --workers: the parent re-opened the file
    while its first connections were still pooled."""
    return str(path.resolve()) not in _OPENED_SQLITE


def _check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not SQLite, without ever writing to it."""
    try:
        with path.open("rb") as fh:
            header = fh.read(16)
    except OSError as exc:
        raise StorageError(
            f"cannot read the storage file {path}: {exc.strerror}", bad_input=True
        ) from None
    if header and header != b"SQLite format 3\x00":
        raise StorageError(
            f"{path} is not a SQLite database (corrupt or another format); it was left "
            "untouched, point --storage elsewhere",
            bad_input=True,
        )


def _tune_sqlite(storage: Any) -> None:
    """WAL lets readers and one writer work at once; NORMAL sync is safe with WAL."""
    from sqlalchemy import event, text

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _pragmas(conn: Any, _record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_TIMEOUT * 1000}")
        cur.close()

    try:
        with engine.connect() as conn:
            conn.execute(text("PRAGMA journal_mode=WAL"))
    except Exception as exc:  # a read-only file keeps its journal mode
        log.debug("could not switch SQLite to WAL: %s", exc)
    engine.dispose()
