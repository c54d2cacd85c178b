"""Database failures as one clear line, and bounded retries for writers that meet a busy database.

Every public store method runs through `StoreBase._read` or `StoreBase._write`, which use this
module: a writer that finds the database locked by another process waits with backoff for a few
seconds, then fails with a `StoreError` that says what was not done. Messages never carry SQL,
parameters (quote text) or passwords: the DBAPI's own text is shown only for connection failures,
first line only, where it names the host and the reason.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from core.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLite's texts for a lock another connection holds; PostgreSQL's SQLSTATEs for the same
# (serialization failure, deadlock, lock not available).
_BUSY_TEXTS = ("database is locked", "database is busy", "database table is locked")
_BUSY_STATES = {"40001", "40P01", "55P03"}
_READ_ONLY = ("readonly database", "read-only", "read only")
_DAMAGED = ("malformed", "not a database", "disk image", "file is encrypted")
_DISK = ("disk i/o error", "database or disk is full", "no space left")
_CONNECT = (
    "connection",
    "could not connect",
    "could not translate host",
    "password authentication",
    "does not exist",
    "timeout expired",
    "invalid port",
)


def _dbapi_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc)


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` says another connection holds a lock we need (worth waiting for)."""
    if not isinstance(exc, DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _BUSY_STATES:
        return True
    text = _dbapi_text(exc).lower()
    return any(t in text for t in _BUSY_TEXTS)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:197] + "..."


def describe(exc: BaseException, where: str, consequence: str | None) -> StoreError:
    """One clear `StoreError` for a database failure at `where` (a path or a password-less URL)."""
    text = _dbapi_text(exc).lower()
    tail = f"; {consequence}" if consequence else ""
    if is_busy(exc):
        message = (
            f"the database {where} stayed locked by another process (a long import or a stuck "
            f"writer){tail}; try again in a moment"
        )
    elif any(t in text for t in _READ_ONLY):
        message = f"the database {where} is read-only (check the file's permissions){tail}"
    elif any(t in text for t in _DAMAGED):
        message = (
            f"the database {where} is damaged ({_first_line(_dbapi_text(exc))}): restore it from "
            f"a backup, or move it away to start an empty one{tail}"
        )
    elif any(t in text for t in _DISK):
        message = f"cannot write the database {where}: the disk is full or failing{tail}"
    elif "unable to open database file" in text:
        message = f"cannot open the database {where} (check the path and its permissions){tail}"
    elif getattr(exc, "connection_invalidated", False) or (
        exc.__class__.__name__ == "OperationalError" and any(t in text for t in _CONNECT)
    ):
        message = f"cannot connect to the database {where}: {_first_line(_dbapi_text(exc))}{tail}"
    else:
        kind = type(getattr(exc, "orig", None) or exc).__name__
        message = f"the database {where} refused the operation ({kind}){tail}"
    return StoreError(message)


def retry_busy(
    attempt: Callable[[], T],
    *,
    seconds: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`attempt()`, run again with backoff while the database is busy, for about `seconds`."""
    deadline = clock() + seconds
    delay = 0.02
    while True:
        try:
            return attempt()
        except SQLAlchemyError as e:
            if not is_busy(e) or clock() + delay >= deadline:
                raise
            log.debug("database busy, retrying in %.2f s", delay)
        # Jitter keeps writers that met the same lock from retrying in lockstep; the pause
        # never runs past the deadline.
        sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, deadline - clock())))
        delay = min(delay * 2, 0.5)
