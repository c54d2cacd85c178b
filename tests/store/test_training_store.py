"""The store's side of training: the one-at-a-time lock with its lease, run records, the
channels a nightly run looks at, and which trained-on quotes are gone."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from core.store import ChannelRef, NewQuote, QuoteStore
from tests.store.conftest import FakeClock

GENERAL = ChannelRef.console("general")
RANDOM = ChannelRef.console("random")
LEASE = 60.0


def test_one_holder_at_a_time_and_a_dead_holders_lease_expires(
    store: QuoteStore, clock: FakeClock
) -> None:
    assert store.acquire_training_lock("bot", LEASE, GENERAL) is None
    run = store.start_run(GENERAL, holder="bot", trigger="manual", adapter="general")
    held = store.acquire_training_lock("cli", LEASE)
    assert held is not None and held.holder == "bot"
    assert held.channel == GENERAL and held.run_id == run.id
    # renewing keeps it; the same holder taking it again is a renewal too
    clock.advance(seconds=50)
    assert store.renew_training_lock("bot", LEASE)
    clock.advance(seconds=50)
    assert store.acquire_training_lock("cli", LEASE) is not None
    # the bot dies (no more renewals): once the lease ends, the CLI takes over
    clock.advance(seconds=LEASE + 1)
    assert store.training_lock_holder() is None
    assert store.acquire_training_lock("cli", LEASE) is None
    assert not store.renew_training_lock("bot", LEASE)
    interrupted = store.run(run.id)
    assert interrupted is not None and interrupted.status == "interrupted"
    assert interrupted.finished_at == clock.now
    store.release_training_lock("bot")  # not the holder: nothing happens
    holder = store.training_lock_holder()
    assert holder is not None and holder.holder == "cli"
    store.release_training_lock("cli")
    assert store.training_lock_holder() is None


def test_a_run_needs_the_lock_and_is_finished_once(store: QuoteStore) -> None:
    with pytest.raises(RuntimeError):
        store.start_run(GENERAL, holder="nobody", trigger="cli", adapter=None)
    assert store.acquire_training_lock("cli", LEASE) is None
    run = store.start_run(GENERAL, holder="cli", trigger="cli", adapter="general", requested_by="x")
    assert run.status == "running" and run.finished_at is None
    done = store.update_run(
        run.id, status="promoted", version="v1", quote_ids=[3, 1, 2], new_loss=1.5
    )
    assert done.status == "promoted" and done.finished_at is not None
    assert done.quote_ids == (1, 2, 3) and done.version == "v1" and done.new_loss == 1.5
    with pytest.raises(ValueError):
        store.update_run(run.id, status="exploded")
    with pytest.raises(ValueError):
        store.update_run(run.id, holder="someone else")
    assert [r.id for r in store.runs(GENERAL)] == [run.id]
    assert store.runs(RANDOM) == []


def test_auto_train_channels_come_stalest_first_with_their_new_quotes(
    store: QuoteStore, clock: FakeClock
) -> None:
    store.import_quotes(GENERAL, [NewQuote("one"), NewQuote("two")])
    store.import_quotes(RANDOM, [NewQuote("three")])
    assert store.auto_train_channels() == []
    store.set_auto_train(GENERAL, True)
    store.set_auto_train(RANDOM, True)
    store.mark_trained(GENERAL, clock.now)
    clock.advance(minutes=1)
    store.import_quotes(GENERAL, [NewQuote("four")])
    # never trained first (all its quotes are new), then the longest untrained
    assert [(s.channel, n) for s, n in store.auto_train_channels()] == [
        ("random", 1),
        ("general", 1),
    ]
    store.mark_trained(RANDOM, clock.now)
    assert [s.channel for s, _ in store.auto_train_channels()] == ["general", "random"]


def test_quotes_removed_or_edited_since_a_training_are_found(
    store: QuoteStore, clock: FakeClock
) -> None:
    store.import_quotes(GENERAL, [NewQuote("kept"), NewQuote("forgotten"), NewQuote("edited")])
    store.set_collecting(GENERAL, True)
    store.add(GENERAL, "from a message", source="reaction", message_id="77", added_by="1")
    ids = {q.text: q.id for q in store.list_quotes(GENERAL)}
    as_of = clock.now
    clock.advance(minutes=1)
    store.forget_quote(ids["forgotten"])
    store.edit_by_message(77, "said otherwise")
    assert store.unchanged_quote_ids(list(ids.values()), as_of) == {ids["kept"], ids["edited"]}
    # a training after the edit saw the new text: nothing changed since then
    assert store.unchanged_quote_ids([ids["from a message"]], clock.now) == {ids["from a message"]}


def test_the_channels_adapter_is_recorded(store: QuoteStore) -> None:
    assert store.channel_state(GENERAL).train_adapter is None
    store.set_train_adapter(GENERAL, "general")
    assert store.channel_state(GENERAL).train_adapter == "general"
    assert store.channels_training("general") == [GENERAL]


def _take(url: str, holder: str, queue: multiprocessing.Queue[bool]) -> None:
    with QuoteStore(url) as store:
        queue.put(store.acquire_training_lock(holder, 600.0) is None)


def test_processes_racing_for_the_lock_get_one_winner(db_url: str) -> None:
    with QuoteStore(db_url):
        pass  # migrate once before the race
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[bool] = ctx.Queue()
    workers = [ctx.Process(target=_take, args=(db_url, f"p{i}", queue)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    won = [queue.get(timeout=5) for _ in workers]
    assert won.count(True) == 1


def test_a_lock_taken_between_the_read_and_the_write_is_not_stolen(
    db_url: str, clock: FakeClock
) -> None:
    """The interleaving behind a rare double win on PostgreSQL (read committed): B reads "no
    lock", A takes it and commits, then B writes. B must see A's lock, not delete it and win
    too. Driven by a hook on B's first write to the lock table. SQLite serialises writers, so
    that interleaving cannot happen there."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite's writers are serialised: B's read and write cannot be split")
    with QuoteStore(db_url, clock=clock) as a, QuoteStore(db_url, clock=clock) as b:
        fired: list[bool] = []

        def between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            verb = statement.lstrip().split()[0].upper()
            if not fired and verb in ("DELETE", "INSERT") and "training_lock" in statement:
                fired.append(True)
                assert a.acquire_training_lock("a", LEASE) is None  # A commits first

        sa.event.listen(b.engine, "before_cursor_execute", between)
        try:
            holder = b.acquire_training_lock("b", LEASE)
        finally:
            sa.event.remove(b.engine, "before_cursor_execute", between)
        assert fired
        assert holder is not None and holder.holder == "a"
        current = a.training_lock_holder()
        assert current is not None and current.holder == "a"


def test_a_lease_is_timed_by_the_store_clock(store: QuoteStore, clock: FakeClock) -> None:
    assert store.acquire_training_lock("bot", LEASE) is None
    holder = store.training_lock_holder()
    assert holder is not None
    assert holder.expires_at - holder.acquired_at == timedelta(seconds=LEASE)
