"""Training data: the seed's columns, untokenized, and a split that never moves a quote."""

from __future__ import annotations

import pytest

from core.store import ChannelRef, NewQuote, QuoteStore, split_of
from tests.store.conftest import FakeClock

GENERAL = ChannelRef.console("general")


def test_dataset_has_the_seed_columns(store: QuoteStore) -> None:
    store.import_quotes(GENERAL, [NewQuote("Be yourself.", "Oscar Wilde"), NewQuote("No author")])
    data = store.to_dataset(GENERAL)
    assert data.column_names == ["quote", "author", "id"]
    ids = [q.id for q in store.list_quotes(GENERAL)]
    assert data.to_list() == [
        {"quote": "Be yourself.", "author": "Oscar Wilde", "id": ids[0]},
        {"quote": "No author", "author": "", "id": ids[1]},
    ]


def test_adding_quotes_never_moves_a_quote_between_splits(store: QuoteStore) -> None:
    store.import_quotes(GENERAL, [NewQuote(f"early quote {n}") for n in range(40)])
    before = {s: set(store.to_dataset(GENERAL, s)["quote"]) for s in ("train", "eval")}
    assert before["train"] and before["eval"], "20% eval of 40 quotes is not empty"
    store.import_quotes(GENERAL, [NewQuote(f"later quote {n}") for n in range(300)])
    after = {s: set(store.to_dataset(GENERAL, s)["quote"]) for s in ("train", "eval")}
    assert before["train"] <= after["train"] and before["eval"] <= after["eval"]
    assert not after["train"] & after["eval"]
    assert len(after["train"]) + len(after["eval"]) == 340
    assert 0.1 < len(after["eval"]) / 340 < 0.3


@pytest.mark.parametrize("percent", [0, 10, 50])
def test_split_depends_on_the_normalized_text_only(percent: int) -> None:
    texts = [f"text number {n}" for n in range(200)]
    splits = [split_of(t, percent) for t in texts]
    assert splits == [split_of("  " + t.upper() + " ", percent) for t in texts]
    if percent == 0:
        assert set(splits) == {"train"}
    else:
        assert "eval" in splits and "train" in splits


def test_new_since(store: QuoteStore, clock: FakeClock) -> None:
    store.import_quotes(GENERAL, [NewQuote("old")])
    mark = clock.now
    clock.advance(minutes=1)
    store.import_quotes(GENERAL, [NewQuote("new")])
    assert [q.text for q in store.new_since(GENERAL, mark)] == ["new"]
    assert len(store.new_since(GENERAL, None)) == 2
