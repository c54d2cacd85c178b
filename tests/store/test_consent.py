"""Consent: deleted and edited messages, `/quote forget`, export, and marking for retraining."""

from __future__ import annotations

import pytest

from core.errors import QuoteNotFound
from core.store import ChannelRef, QuoteStore
from tests.store.conftest import FakeClock

GENERAL = ChannelRef.discord(111, 222)
RANDOM = ChannelRef.discord(111, 333)
ELSEWHERE = ChannelRef.discord(999, 444)


def _save(store: QuoteStore, ref: ChannelRef, text: str, author: str, message: str | None = None):
    return store.add(
        ref,
        text,
        source="menu" if message else "command",
        author_id=author,
        author_name=f"user{author}",
        message_id=message,
        operator=True,
    ).quote


def test_deleting_the_message_removes_its_quote(store: QuoteStore) -> None:
    _save(store, GENERAL, "going away", "7", message="500")
    _save(store, GENERAL, "staying", "7", message="501")
    assert store.delete_by_message(500).removed == 1
    assert [q.text for q in store.list_quotes(GENERAL)] == ["staying"]
    assert store.delete_by_message(500).removed == 0, "a message never saved is a no-op"


def test_editing_the_message_updates_its_quote(store: QuoteStore, clock: FakeClock) -> None:
    saved = _save(store, GENERAL, "first draft", "7", message="500")
    clock.advance(minutes=5)
    edited = store.edit_by_message(500, "second  draft")
    assert edited is not None and edited.id == saved.id
    assert edited.text == "second  draft" and edited.edited_at == clock.now
    assert [q.text for q in store.list_quotes(GENERAL)] == ["second  draft"]
    # The duplicate check follows the new text, not the old.
    assert _save(store, GENERAL, "first draft", "8").id != saved.id
    assert store.add(GENERAL, "SECOND DRAFT", source="command", operator=True).created is False
    assert store.edit_by_message(404, "no such quote") is None


def test_editing_into_a_copy_merges_and_editing_to_nothing_removes(store: QuoteStore) -> None:
    kept = _save(store, GENERAL, "the original", "7")
    _save(store, GENERAL, "a copy soon", "8", message="600")
    merged = store.edit_by_message(600, "The Original")
    assert merged is not None and merged.id == kept.id
    assert store.count(GENERAL) == 1
    _save(store, GENERAL, "to be blanked", "8", message="601")
    assert store.edit_by_message(601, "   ") is None
    assert store.by_message(601) is None and store.count(GENERAL) == 1


def test_forget_removes_only_the_members_quotes_in_that_server(store: QuoteStore) -> None:
    _save(store, GENERAL, "mine 1", "7")
    _save(store, RANDOM, "mine 2", "7")
    _save(store, GENERAL, "theirs", "8")
    _save(store, ELSEWHERE, "mine, other server", "7")
    result = store.forget_member("111", 7)
    assert result.removed == 2
    assert [q.text for q in store.list_quotes(GENERAL)] == ["theirs"]
    assert store.list_quotes(RANDOM) == []
    assert [q.text for q in store.list_quotes(ELSEWHERE)] == ["mine, other server"]


def test_forget_marks_a_channel_trained_on_the_quote(store: QuoteStore, clock: FakeClock) -> None:
    _save(store, GENERAL, "trained on", "7")
    _save(store, RANDOM, "also trained on, by someone else", "8")
    store.mark_trained(GENERAL, clock.now)
    store.mark_trained(RANDOM, clock.now)
    clock.advance(hours=1)
    _save(store, RANDOM, "new since training", "7")
    result = store.forget_member("111", "7")
    assert result.removed == 2
    assert result.marked_for_retraining == (GENERAL,)
    assert store.channel_state(GENERAL).needs_retrain
    assert not store.channel_state(RANDOM).needs_retrain, "its trained-on quote is still there"
    assert store.retrain_needed() == [GENERAL]
    store.mark_trained(GENERAL, clock.now)
    assert not store.channel_state(GENERAL).needs_retrain


def test_a_channel_never_trained_is_not_marked(store: QuoteStore) -> None:
    _save(store, GENERAL, "never trained", "7", message="1")
    assert store.delete_by_message(1).marked_for_retraining == ()
    assert not store.channel_state(GENERAL).needs_retrain


def test_deleting_or_editing_a_trained_on_message_marks(
    store: QuoteStore, clock: FakeClock
) -> None:
    _save(store, GENERAL, "edit me", "7", message="1")
    _save(store, RANDOM, "delete me", "7", message="2")
    store.mark_trained(GENERAL, clock.now)
    store.mark_trained(RANDOM, clock.now)
    store.edit_by_message(1, "edited")
    assert store.delete_by_message(2).marked_for_retraining == (RANDOM,)
    assert store.channel_state(GENERAL).needs_retrain
    assert store.channel_state(RANDOM).needs_retrain


def test_forget_one_quote_by_id_within_a_server(store: QuoteStore, clock: FakeClock) -> None:
    here = _save(store, GENERAL, "here", "7")
    there = _save(store, ELSEWHERE, "there", "7")
    store.mark_trained(GENERAL, clock.now)
    with pytest.raises(QuoteNotFound, match=f"#{there.id}"):
        store.forget_quote(there.id, server="111")
    assert store.get(there.id) is not None
    assert store.forget_quote(here.id, server="111").marked_for_retraining == (GENERAL,)
    assert store.get(here.id) is None


def test_export_has_every_quote_of_the_member(store: QuoteStore) -> None:
    _save(store, GENERAL, "a", "7")
    _save(store, ELSEWHERE, "b", "7")
    _save(store, GENERAL, "c", "8")
    exported = store.export_member(7)
    assert [(q.text, q.server) for q in exported] == [("a", "111"), ("b", "999")]
    assert exported[0].as_dict()["author"] == "user7"
