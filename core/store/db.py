"""Opening the database: the engine for a URL (SQLite in WAL mode by default) and migrations.

`open_engine` makes the engine; `migrate` brings the schema to the newest revision with
Alembic, inside one transaction, so a database is either fully upgraded or left as it was.
Several processes may open a new database at once (the bot and a CLI command): migrations are
serialised across processes by a lock file beside a SQLite file, and by an advisory lock on
PostgreSQL, so exactly one of them creates the schema and the others find it done.

On SQLite, loracord emits its own BEGIN: writers take the write lock when they start
(`BEGIN IMMEDIATE`, through `writer(engine)`), so two writers queue on SQLite's busy timeout
instead of failing half-way when one of them tries to upgrade a read transaction.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from core.errors import StoreError
from core.store.guard import describe, retry_busy

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

DB_FILE = "loracord.db"
BUSY_SECONDS = 5.0
WRITE = "loracord_write"
"""Execution option that marks a connection as a writer (SQLite: `BEGIN IMMEDIATE`)."""
# Any 64-bit constant works; it only has to be the same in every loracord process.
_PG_MIGRATION_LOCK = 0x6C6F7261636F7264


def default_url(data_dir: Path) -> str:
    """The SQLite file in `data_dir` (the default `database_url`)."""
    return f"sqlite:///{data_dir / DB_FILE}"


def where(url: sa.URL) -> str:
    """How errors name the database: the SQLite file's path, or the URL without its password."""
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _sqlite_listeners(engine: Engine, busy_ms: int) -> None:
    def connect(dbapi_connection: Any, _record: Any) -> None:
        # No implicit BEGIN from the driver: `begin` below emits ours (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The timeout first: switching a new file to WAL needs a lock another opener may hold.
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # A forgotten quote's bytes are overwritten with zeros, not left in free pages.
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    def begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    sa.event.listen(engine, "connect", connect)
    sa.event.listen(engine, "begin", begin)


def open_engine(url: str, *, busy_seconds: float = 5.0) -> Engine:
    """An engine for `url`; for a SQLite file, its folder is created and WAL mode is on."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as e:
        raise StoreError(
            "database_url is not a database URL (expected sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/NAME)"
        ) from e
    kwargs: dict[str, Any] = {}
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        # A `file:` URI (uri=true) names its file itself: no folder to make from it.
        if parsed.database and parsed.database != ":memory:" and "uri" not in parsed.query:
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the folder {folder}: {e.strerror}") from e
        kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, SQLAlchemyError, ValueError, TypeError) as e:
        raise StoreError(
            f"cannot use database {where(parsed)}: {type(e).__name__} (check database_url)"
        ) from e
    if sqlite:
        _sqlite_listeners(engine, int(busy_seconds * 1000))
    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, whose transactions start as writers (see the module docstring)."""
    return engine.execution_options(**{WRITE: True})


def alembic_config() -> Config:
    """The Alembic configuration of the migrations shipped inside this package."""
    from alembic.config import Config  # alembic costs ~0.4 s to import: only when migrating

    config = Config()
    location = resources.files("core.store") / "migrations"
    config.set_main_option("script_location", str(location))
    return config


def head_revision() -> str:
    """The newest schema revision this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    """Hold `<db file>.lock` (SQLite files only): one process migrates at a time."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    path = Path(database).expanduser().with_name(Path(database).name + ".lock")
    try:
        handle = path.open("a")
    except OSError as e:
        # A read-only folder: nothing can be migrated there anyway; reading needs no lock.
        log.debug("no lock file %s (%s); opening without it", path, e.strerror)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (default: the newest) in one transaction."""
    from alembic import command

    # The first connection to a new SQLite file switches it to WAL, which needs the file to
    # itself: under the lock too, so openers queue instead of finding it busy.
    with _file_lock(engine):
        before = current_revision_safe(engine)
        if revision == "head" and before == head_revision():
            return  # the common case, and the only one that works on a read-only file
        config = alembic_config()
        try:
            with writer(engine).begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        except SQLAlchemyError as e:
            log.debug("migration failed", exc_info=True)
            raise describe(e, where(engine.url), "its schema was not upgraded") from e
    after = current_revision_safe(engine)
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def current_revision_safe(engine: Engine) -> str | None:
    """`current_revision`, with connection failures turned into a clear `StoreError`."""
    try:
        return retry_busy(lambda: current_revision(engine), seconds=BUSY_SECONDS)
    except SQLAlchemyError as e:
        log.debug("cannot read the schema revision", exc_info=True)
        raise describe(e, where(engine.url), None) from e
