"""Store fixtures: every store test runs on a real SQLite file, and on a real PostgreSQL too
when `LORACORD_TEST_POSTGRES_URL` is set (`.ci/postgres.sh` starts one and prints the URL).
The PostgreSQL database is emptied before each test; point the variable at a throwaway database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.store import QuoteStore

POSTGRES_URL = os.environ.get("LORACORD_TEST_POSTGRES_URL")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def _empty_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta = sa.MetaData()
            meta.reflect(conn)
            meta.drop_all(conn)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for an empty database, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'loracord.db'}"
    if not POSTGRES_URL:
        pytest.skip("LORACORD_TEST_POSTGRES_URL is not set")
    _empty_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[QuoteStore]:
    """An opened store on a fresh database, with a hand-driven clock."""
    with QuoteStore(db_url, max_chars=100, daily_cap=3, eval_percent=20, clock=clock) as s:
        yield s
