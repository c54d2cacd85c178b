"""Channel -> adapter bindings: resolution (channel, server default, base), upserts from several
processes, the stamp a running bot polls, and the migration that adds them. Each test runs on
SQLite and (with `LORACORD_TEST_POSTGRES_URL`) on PostgreSQL."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from core.errors import InvalidName, LoracordError
from core.store import (
    AsyncQuoteStore,
    Binding,
    BoundChannel,
    ChannelRef,
    QuoteStore,
    ServerDefault,
)
from core.store import db as store_db
from core.store.bindings import adapter_checked
from tests.store.conftest import FakeClock

GENERAL = ChannelRef.console("general")
RANDOM = ChannelRef.console("random")
MEMES = ChannelRef.console("memes")
ELSEWHERE = ChannelRef.discord(111, 222)
NONE = Binding(None, None, "none")


def test_a_channel_resolves_to_its_own_binding_else_the_server_default_else_base(
    store: QuoteStore,
) -> None:
    assert store.binding(GENERAL) == NONE
    assert store.set_server_default("console", "poet") == Binding("poet", None, "server")
    assert store.binding(GENERAL) == Binding("poet", None, "server")
    assert store.bind(GENERAL, "bard", by="42") == Binding("bard", None, "channel")
    assert store.binding(GENERAL) == Binding("bard", None, "channel")
    assert store.binding(RANDOM) == Binding("poet", None, "server"), "the default still applies"
    assert store.binding(ELSEWHERE) == NONE, "another server's default is its own"


def test_an_explicit_base_binding_overrides_the_server_default(store: QuoteStore) -> None:
    store.set_server_default("console", "poet", "v2")
    assert store.bind(GENERAL, None) == Binding(None, None, "channel")
    assert store.binding(GENERAL) == Binding(None, None, "channel")
    assert store.binding(RANDOM) == Binding("poet", "v2", "server")
    store.set_server_default("console", None)
    assert store.binding(RANDOM) == Binding(None, None, "server"), "a base default is explicit"


def test_switching_one_channel_changes_no_other(store: QuoteStore) -> None:
    for ref, name in ((GENERAL, "poet"), (RANDOM, "bard"), (MEMES, "poet"), (ELSEWHERE, "poet")):
        store.bind(ref, name)
    before = {b.channel_ref: b.binding for b in store.bindings()}
    store.bind(RANDOM, "jester", "v4")
    after = {b.channel_ref: b.binding for b in store.bindings()}
    assert after.pop(RANDOM) == Binding("jester", "v4", "channel")
    before.pop(RANDOM)
    assert after == before


def test_unbind_returns_a_channel_to_the_server_default(store: QuoteStore) -> None:
    store.set_server_default("console", "poet")
    store.bind(GENERAL, None)
    store.unbind(GENERAL)
    assert store.binding(GENERAL) == Binding("poet", None, "server")
    store.unbind(GENERAL)  # nothing left to drop: still fine
    store.clear_server_default("console")
    assert store.binding(GENERAL) == NONE
    assert store.bindings() == []


def test_a_pinned_version_is_kept_until_the_channel_is_bound_again(store: QuoteStore) -> None:
    store.bind(GENERAL, "poet", "v3")
    assert store.binding(GENERAL) == Binding("poet", "v3", "channel")
    store.set_server_default("console", "poet", "v7")
    assert store.binding(GENERAL).version == "v3"
    store.bind(GENERAL, "poet")
    assert store.binding(GENERAL) == Binding("poet", None, "channel"), "follows promoted again"


def test_listings_name_channels_defaults_and_who_changed_them(
    store: QuoteStore, clock: FakeClock
) -> None:
    store.bind(RANDOM, "poet", by="cli")
    store.bind(GENERAL, "poet", "v1", by="1" * 40)
    store.bind(ELSEWHERE, "bard")
    store.bind(MEMES, None)
    store.set_server_default("111", "poet")
    store.set_server_default("console", "bard", "v2", by="7")
    listed = store.bindings()
    assert [(b.server, b.channel, b.adapter, b.version) for b in listed] == [
        ("111", None, "poet", None),
        ("111", "222", "bard", None),
        ("console", None, "bard", "v2"),
        ("console", "general", "poet", "v1"),
        ("console", "memes", None, None),
        ("console", "random", "poet", None),
    ]
    assert listed[0].channel_ref is None and listed[1].channel_ref == ELSEWHERE
    assert listed[3].updated_by == "1" * 32, "cut to the column's 32 characters"
    assert listed[3].updated_at == clock.now
    assert store.bindings("111") == listed[:2]
    assert store.server_defaults() == [
        ServerDefault("111", "poet", None),
        ServerDefault("console", "bard", "v2"),
    ]
    assert store.channels_using("poet") == [GENERAL, RANDOM]
    assert store.channels_using("nobody") == []
    assert store.servers_defaulting_to("poet") == ["111"]
    assert store.servers_defaulting_to("bard") == ["console"]


@pytest.mark.parametrize(
    ("ref", "adapter", "version", "complaint"),
    [
        (GENERAL, "base", None, "'base' is the base model"),
        (GENERAL, "Poet", None, "not an adapter name"),
        (GENERAL, "../../etc", None, "not an adapter name"),
        (GENERAL, "", None, "not an adapter name"),
        (GENERAL, "a" * 65, None, "not an adapter name"),
        (GENERAL, "poet\u200b", None, "not an adapter name"),
        (GENERAL, "poet\nx", None, "not an adapter name"),
        (GENERAL, "poet", "3", "not an adapter version"),
        (GENERAL, "poet", "V3", "not an adapter version"),
        (GENERAL, "poet", "v1234567890", "not an adapter version"),
        (GENERAL, "poet", "v0", "not an adapter version"),
        (GENERAL, "poet", "v01", "not an adapter version"),
        (GENERAL, "poet", " v1", "not an adapter version"),
        (GENERAL, None, "v1", "the base model has no versions"),
        (ChannelRef("console", "General"), "poet", None, "not a name as stored"),
        (ChannelRef("console", "*"), "poet", None, "not a channel name"),
        (ChannelRef("guild", "general"), "poet", None, "not a server"),
    ],
)
def test_bad_names_are_refused_with_one_line_and_nothing_written(
    store: QuoteStore, ref: ChannelRef, adapter: str | None, version: str | None, complaint: str
) -> None:
    stamp = store.bindings_stamp()
    with pytest.raises(InvalidName) as caught:
        store.bind(ref, adapter, version)
    message = str(caught.value)
    assert complaint in message and "\n" not in message
    if ref == GENERAL:
        with pytest.raises(InvalidName):
            store.set_server_default("console", adapter, version)
    assert store.bindings() == [] and store.bindings_stamp() == stamp


@pytest.mark.parametrize(
    "name", ["poet", "a", "0-x_y", "a" * 64, "a" * 65, "base", "Poet", " poet", "-x", "é", ""]
)
def test_the_store_accepts_exactly_the_adapter_names_the_registry_makes(name: str) -> None:
    import core.adapters

    registry_name = getattr(core.adapters, "adapter_name", None)
    if registry_name is None:
        pytest.skip("core.adapters has no adapter_name yet")
    try:
        made = registry_name(name) == name
    except LoracordError:
        made = False
    try:
        stored = adapter_checked(name) == name
    except InvalidName:
        stored = False
    assert stored == made


def test_bad_servers_and_adapter_names_are_refused_on_every_path(store: QuoteStore) -> None:
    for call in (
        lambda: store.set_server_default("Console", "poet"),
        lambda: store.set_server_default("*", "poet"),
        lambda: store.clear_server_default("guild"),
        lambda: store.bindings("x"),
        lambda: store.unbind(ChannelRef("console", "*")),
        lambda: store.binding(ChannelRef("console", "#general")),
        lambda: store.channels_using("base"),
        lambda: store.servers_defaulting_to("Poet"),
    ):
        with pytest.raises(InvalidName):
            call()
    assert store.bindings_stamp() == (0, "")


def test_the_stamp_changes_after_every_kind_of_write(store: QuoteStore, clock: FakeClock) -> None:
    # The clock stands still: the stamp must not depend on time moving between writes.
    writes = [
        lambda: store.bind(GENERAL, "poet"),
        lambda: store.bind(GENERAL, "poet"),  # the same binding again is still a write
        lambda: store.bind(GENERAL, "poet", "v2"),
        lambda: store.bind(RANDOM, None),
        lambda: store.set_server_default("console", "bard"),
        lambda: store.set_server_default("console", None),
        lambda: store.unbind(RANDOM),
        lambda: store.clear_server_default("console"),
        lambda: store.unbind(GENERAL),
    ]
    stamps = [store.bindings_stamp()]
    for write in writes:
        write()
        stamps.append(store.bindings_stamp())
    assert len(set(stamps)) == len(stamps), stamps
    assert stamps[0] == (0, "") and stamps[-1] == (len(writes), "")
    assert stamps[1][1] == clock.now.isoformat()


def test_mark_retrain_sets_and_clears_the_flag(store: QuoteStore) -> None:
    assert store.mark_retrain(GENERAL).needs_retrain
    assert store.retrain_needed() == [GENERAL]
    assert not store.mark_retrain(GENERAL, False).needs_retrain
    assert store.retrain_needed() == []


async def test_the_async_store_binds_off_the_event_loop(db_url: str) -> None:
    store = await AsyncQuoteStore(QuoteStore(db_url)).open()
    try:
        await store.set_server_default("console", "poet", by="7")
        assert await store.bind(GENERAL, "bard", "v1") == Binding("bard", "v1", "channel")
        assert await store.binding(GENERAL) == Binding("bard", "v1", "channel")
        listed = await store.bindings("console")
        assert all(isinstance(b, BoundChannel) for b in listed) and len(listed) == 2
        assert await store.server_defaults() == [ServerDefault("console", "poet", None)]
        assert await store.channels_using("bard") == [GENERAL]
        assert await store.servers_defaulting_to("poet") == ["console"]
        await store.unbind(GENERAL)
        await store.clear_server_default("console")
        assert await store.binding(GENERAL) == NONE
        assert (await store.bindings_stamp())[0] == 4
        assert (await store.mark_retrain(GENERAL)).needs_retrain
    finally:
        await store.close()


WORKERS = 4
ROUNDS = 10


def _bind_often(url: str, barrier: Any, worker: int) -> None:
    with QuoteStore(url, busy_seconds=60) as store:
        barrier.wait()
        for n in range(ROUNDS):
            store.bind(GENERAL, f"worker-{worker}", f"v{n + 1}", by=str(worker))
            store.set_server_default("console", f"worker-{worker}")


def test_processes_binding_one_channel_at_once_leave_one_row_and_no_error(db_url: str) -> None:
    QuoteStore(db_url).open().close()  # the schema first: this test is about the upserts
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_bind_often, args=(db_url, barrier, n)) for n in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * WORKERS, "a worker failed: see its stderr"
    with QuoteStore(db_url) as store:
        listed = store.bindings()
        assert [(b.server, b.channel) for b in listed] == [
            ("console", None),
            ("console", "general"),
        ]
        channel_row = listed[1]
        assert channel_row.adapter == f"worker-{channel_row.updated_by}"
        assert channel_row.version == f"v{ROUNDS}", "each worker's last bind pins its last version"
        assert store.bindings_stamp()[0] == WORKERS * ROUNDS * 2, "every write counted once"


def _fill_revision_4(url: str) -> None:
    engine = store_db.open_engine(url)
    try:
        store_db.migrate(engine, "0004")
        assert store_db.current_revision(engine) == "0004"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO channels (id, server, channel, collecting, auto_train, "
                    "needs_retrain, last_trained_at, created_at) VALUES "
                    "(1, 'console', 'general', true, true, false, NULL, :t), "
                    "(2, '111', '222', false, false, true, NULL, :t)"
                ),
                {"t": datetime(2025, 5, 1, 10, 0)},
            )
            for n in range(1, 6):
                conn.execute(
                    sa.text(
                        "INSERT INTO quotes (id, channel_id, message_id, author_id, author_name, "
                        "text, text_key, source, added_at, added_by, tags) VALUES "
                        "(:id, :ch, :msg, '7', 'Ann', :text, :key, 'menu', :t, '8', '')"
                    ),
                    {
                        "id": n,
                        "ch": 1 if n <= 3 else 2,
                        "msg": str(900 + n),
                        "text": f"quote {n} ✨",
                        "key": f"key-{n}",
                        "t": datetime(2025, 4, 1, 9, n),
                    },
                )
    finally:
        engine.dispose()


def test_a_revision_4_database_upgrades_keeping_every_quote(db_url: str) -> None:
    _fill_revision_4(db_url)
    with QuoteStore(db_url) as store:
        assert store_db.current_revision(store.engine) == store_db.head_revision() == "0006"
        assert [q.text for q in store.list_quotes(GENERAL)] == [f"quote {n} ✨" for n in (1, 2, 3)]
        assert [q.id for q in store.list_quotes(ELSEWHERE)] == [4, 5]
        assert store.channel_state(GENERAL).auto_train
        assert store.channel_state(ELSEWHERE).needs_retrain
        # no binding yet: every channel answers from the base model, and the new tables work
        assert store.binding(GENERAL) == NONE and store.bindings() == []
        assert store.bindings_stamp() == (0, "")
        store.bind(GENERAL, "poet")
        assert store.binding(GENERAL) == Binding("poet", None, "channel")
        assert store.bindings_stamp()[0] == 1
