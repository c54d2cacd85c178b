"""Schema versions: a database holding data at revision 0001 upgrades with nothing lost, and the
async facade and the app open the same database."""

from __future__ import annotations

import threading
from datetime import datetime

import sqlalchemy as sa

from core.store import AsyncQuoteStore, ChannelRef, QuoteStore
from core.store import db as store_db


def _fill_revision_1(url: str) -> None:
    engine = store_db.open_engine(url)
    try:
        store_db.migrate(engine, "0001")
        assert store_db.current_revision(engine) == "0001"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO channels (id, server, channel, collecting, auto_train, "
                    "needs_retrain, last_trained_at, created_at) VALUES "
                    "(1, 'console', 'general', true, false, false, :t, :t)"
                ),
                {"t": datetime(2025, 5, 1, 10, 0)},
            )
            for n, text in enumerate(["kept one 🙂", "kept two"], 1):
                conn.execute(
                    sa.text(
                        "INSERT INTO quotes (id, channel_id, message_id, author_id, author_name, "
                        "text, text_key, source, added_at, added_by) VALUES "
                        "(:id, 1, :msg, '7', 'Ann', :text, :key, 'menu', :t, '8')"
                    ),
                    {
                        "id": n,
                        "msg": str(500 + n),
                        "text": text,
                        "key": f"old-key-{n}",
                        "t": datetime(2025, 4, 1, 9, n),
                    },
                )
    finally:
        engine.dispose()


def test_a_revision_1_database_upgrades_with_nothing_lost(db_url: str) -> None:
    _fill_revision_1(db_url)
    general = ChannelRef.console("general")
    with QuoteStore(db_url) as store:
        assert store_db.current_revision(store.engine) == store_db.head_revision() == "0006"
        quotes = store.list_quotes(general)
        assert [(q.id, q.text, q.author_name, q.message_id) for q in quotes] == [
            (1, "kept one 🙂", "Ann", "501"),
            (2, "kept two", "Ann", "502"),
        ]
        assert quotes[0].added_at.isoformat() == "2025-04-01T09:01:00+00:00"
        assert quotes[0].tags == () and quotes[0].edited_at is None
        assert store.channel_state(general).collecting
        # the new columns work on the old rows
        assert store.edit_by_message(501, "kept, edited").edited_at is not None  # type: ignore[union-attr]
        assert store.channel_state(general).needs_retrain, "trained 2025-05-01, after it was added"
    with QuoteStore(db_url) as again:
        assert again.count(general) == 2, "opening an up-to-date database changes nothing"


def test_fresh_database_is_at_head_and_sqlite_uses_wal(db_url: str) -> None:
    with QuoteStore(db_url) as store:
        assert store_db.current_revision(store.engine) == store_db.head_revision()
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


async def test_async_store_runs_calls_off_the_event_loop(db_url: str, monkeypatch) -> None:
    store = AsyncQuoteStore(QuoteStore(db_url))
    await store.open()
    seen: list[threading.Thread] = []
    original = store.sync.add

    def spy(*args, **kwargs):
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(store.sync, "add", spy)
    try:
        ref = ChannelRef.discord(1, 2)
        await store.set_collecting(ref, True)
        result = await store.add(ref, "async hello", source="command")
        assert result.created and (await store.count(ref)) == 1
        assert seen and seen[0] is not threading.main_thread()
    finally:
        await store.close()


def test_app_builds_a_store_from_settings(tmp_path) -> None:
    from core.app import build
    from tests.conftest import make_settings

    app = build(make_settings(tmp_path))
    assert isinstance(app.store, AsyncQuoteStore)
    assert app.store.sync.url == f"sqlite:///{tmp_path / 'data' / 'loracord.db'}"
