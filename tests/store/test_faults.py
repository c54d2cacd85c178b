"""Faults: a locked, read-only or damaged database, and a server that is not there, each end in
one clear `StoreError` line without SQL, quote text or passwords; a busy database is waited out
for a bounded time; a forgotten quote is gone from the file and its log, not only from queries.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from core.errors import StoreError
from core.store import ChannelRef, QuoteStore
from core.store.guard import retry_busy

GENERAL = ChannelRef.console("general")
SECRET = "zebra-violet-4711 said this"


def _no_leak(message: str) -> None:
    for leaked in ("SQL", "INSERT", "SELECT", SECRET, "\n", "Traceback"):
        assert leaked not in message, message


def _add(store: QuoteStore, text: str = SECRET, **kwargs: str) -> int:
    return store.add(GENERAL, text, source="command", operator=True, **kwargs).quote.id


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "loracord.db"


def _busy() -> OperationalError:
    return OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))


def test_retry_backs_off_while_busy_and_gives_up_at_its_deadline() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    def always_busy() -> None:
        raise _busy()

    with pytest.raises(OperationalError):
        retry_busy(always_busy, seconds=3.0, sleep=sleep, clock=lambda: now[0])
    assert 1.5 <= now[0] <= 3.0 and len(slept) >= 5
    assert max(slept) <= 0.75, "backoff is capped"

    calls = []

    def busy_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _busy()
        return "saved"

    assert retry_busy(busy_twice, seconds=3.0, sleep=sleep, clock=lambda: now[0]) == "saved"
    with pytest.raises(OperationalError, match="no such table"):
        retry_busy(
            lambda: (_ for _ in ()).throw(
                OperationalError("x", {}, sqlite3.OperationalError("no such table: quotes"))
            ),
            seconds=3.0,
            sleep=sleep,
        )


def test_a_writer_locked_out_for_good_says_the_quote_was_not_saved(path: Path) -> None:
    with QuoteStore(f"sqlite:///{path}", busy_seconds=0.3) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's stuck writer
        try:
            with pytest.raises(StoreError) as caught:
                _add(store)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert str(caught.value) == (
            f"the database {path} stayed locked by another process (a long import or a stuck "
            "writer); the quote was NOT saved; try again in a moment"
        )
        assert store.count(GENERAL) == 0
        assert _add(store) == 1, "once the lock is gone, writes go through"


REMOVALS = {
    "forget_quote": lambda store, quote_id: store.forget_quote(quote_id),
    "forget_member": lambda store, quote_id: store.forget_member("console", "7"),
    "delete_by_message": lambda store, quote_id: store.delete_by_message(99),
    "edit_by_message": lambda store, quote_id: store.edit_by_message(99, "harmless now"),
}


@pytest.mark.parametrize("removal", list(REMOVALS))
def test_removed_text_is_gone_from_the_file_and_its_log(path: Path, removal: str) -> None:
    with QuoteStore(f"sqlite:///{path}") as store:
        _add(store, "a quote that stays")
        quote_id = _add(store, author_id="7", message_id="99")
        reader = sqlite3.connect(path)  # another process holding the database open
        try:
            assert reader.execute("SELECT count(*) FROM quotes").fetchone() == (2,)
            files = [path, path.with_name(path.name + "-wal")]
            assert any(SECRET.encode() in f.read_bytes() for f in files if f.exists())
            REMOVALS[removal](store, quote_id)
            for file in files:
                if file.exists():
                    assert SECRET.encode() not in file.read_bytes(), file.name
            assert reader.execute("SELECT count(*) FROM quotes").fetchone() == (
                2 if removal == "edit_by_message" else 1,
            )
        finally:
            reader.close()


def test_a_file_that_is_not_a_database_is_one_clear_line(path: Path) -> None:
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(StoreError) as caught:
        QuoteStore(f"sqlite:///{path}").open()
    assert str(caught.value) == (
        f"the database {path} is damaged (file is not a database): restore it from a backup, "
        "or move it away to start an empty one"
    )


def test_damaged_pages_are_one_clear_line(path: Path) -> None:
    with QuoteStore(f"sqlite:///{path}") as store:
        for n in range(200):
            _add(store, f"quote number {n} " + "words " * 40)
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page : len(data) - page] = b"\xa5" * (len(data) - 3 * page)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught, QuoteStore(f"sqlite:///{path}") as store:
        store.list_quotes(GENERAL)
    message = str(caught.value)
    assert message.startswith(f"the database {path} is damaged (database disk image is malformed)")
    _no_leak(message)


def test_a_read_only_database_refuses_writes_in_one_line(path: Path) -> None:
    with QuoteStore(f"sqlite:///{path}") as store:
        _add(store, "already here")
    # Read-only the way SQLite sees a file without write permission (the tests may run as root,
    # whom file permissions do not stop).
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with QuoteStore(read_only) as store:
        assert [q.text for q in store.list_quotes(GENERAL)] == ["already here"]
        with pytest.raises(StoreError) as caught:
            _add(store)
    assert str(caught.value) == (
        f"the database file:{path} is read-only (check the file's permissions); "
        "the quote was NOT saved"
    )


def test_a_server_that_is_not_there_is_one_line_without_the_password() -> None:
    url = "postgresql+psycopg://loracord:hunter2secret@127.0.0.1:1/loracord"
    with pytest.raises(StoreError) as caught:
        QuoteStore(url).open()
    message = str(caught.value)
    assert message.startswith(
        "cannot connect to the database postgresql+psycopg://loracord:***@127.0.0.1:1/loracord: "
    )
    assert "hunter2secret" not in message and "\n" not in message


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u:hunter2secret@host:99x/db", "not a url hunter2secret"]
)
def test_a_malformed_database_url_is_one_line_without_the_password(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        QuoteStore(url).open()
    assert str(caught.value) == (
        "database_url is not a database URL (expected sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST:PORT/NAME)"
    )
