"""Opening the database: the engine for a URL (SQLite in WAL mode by default) and migrations.

`open_engine` makes the engine; `migrate` brings the schema to the newest revision with
Alembic, inside one transaction, so a database is either fully upgraded or left as it was.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from core.errors import StoreError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

DB_FILE = "loracord.db"


def default_url(data_dir: Path) -> str:
    """The SQLite file in `data_dir` (the default `database_url`)."""
    return f"sqlite:///{data_dir / DB_FILE}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the bot read while the CLI or the trainer writes; the timeout waits out a writer.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str) -> Engine:
    """An engine for `url`; for a SQLite file, its folder is created and WAL mode is on."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise StoreError(f"database_url {url!r} is not a database URL: {e}") from e
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, SQLAlchemyError) as e:
        raise StoreError(f"cannot use database {parsed.render_as_string()}: {e}") from e
    if parsed.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


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


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (default: the newest) in one transaction."""
    from alembic import command

    config = alembic_config()
    before = current_revision_safe(engine)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except SQLAlchemyError as e:
        where = engine.url.render_as_string()
        raise StoreError(f"could not open or upgrade the database {where}: {e}") from e
    after = current_revision_safe(engine)
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def current_revision_safe(engine: Engine) -> str | None:
    """`current_revision`, with connection failures turned into a clear `StoreError`."""
    try:
        return current_revision(engine)
    except SQLAlchemyError as e:
        where = engine.url.render_as_string()
        raise StoreError(
            f"cannot connect to the database {where}: {getattr(e, 'orig', None) or e}"
        ) from e
