"""Saving quotes: one row per quote whatever the path, merged duplicates, the channel switch,
the daily cap, and the text rules (unicode, long, empty)."""

from __future__ import annotations

import re
import threading

import pytest

from core.errors import CollectionDisabled, EmptyQuote, QuoteCapReached
from core.store import ChannelRef, NewQuote, QuoteStore
from tests.store.conftest import FakeClock

GENERAL = ChannelRef.discord(111, 222)
OTHER = ChannelRef.discord(111, 333)


@pytest.fixture
def enabled(store: QuoteStore) -> QuoteStore:
    store.set_collecting(GENERAL, True)
    store.set_collecting(OTHER, True)
    return store


@pytest.mark.parametrize("source", ["reaction", "menu"])
def test_message_save_stores_one_row_and_a_second_save_merges(
    enabled: QuoteStore, source: str
) -> None:
    first = enabled.add(
        GENERAL,
        "the cake is a lie",
        source=source,
        message_id="900",
        author_id="7",
        author_name="Ann",
        added_by="8",
    )
    again = enabled.add(
        GENERAL,
        "the cake is a lie",
        source=source,
        message_id="900",
        author_id="7",
        author_name="Ann",
        added_by="9",
    )
    assert first.created and not again.created
    assert again.quote.id == first.quote.id
    assert enabled.count(GENERAL) == 1
    stored = enabled.by_message(900)
    assert stored is not None
    assert (stored.text, stored.author_name, stored.source) == ("the cake is a lie", "Ann", source)


def test_command_save_stores_one_row_and_a_second_save_merges(enabled: QuoteStore) -> None:
    first = enabled.add(GENERAL, "typed by hand", source="command", added_by="8")
    again = enabled.add(GENERAL, "typed by hand", source="command", added_by="8")
    assert first.created and not again.created
    assert enabled.count(GENERAL) == 1


def test_import_stores_once_and_reports_duplicates(store: QuoteStore) -> None:
    items = [NewQuote("one", "A"), NewQuote("two", "B"), NewQuote("ONE ", "A")]
    first = store.import_quotes(GENERAL, items)
    again = store.import_quotes(GENERAL, items)
    assert (first.added, first.duplicates) == (2, 1)
    assert (again.added, again.duplicates) == (0, 3)
    assert [q.source for q in store.list_quotes(GENERAL)] == ["import", "import"]


def test_same_text_after_whitespace_and_case_is_merged_per_channel(enabled: QuoteStore) -> None:
    a = enabled.add(GENERAL, "Hello   World\n", source="command")
    b = enabled.add(GENERAL, "  hello world", source="menu", message_id="5")
    c = enabled.add(OTHER, "hello world", source="command")
    assert not b.created and b.quote.id == a.quote.id
    assert c.created, "another channel keeps its own copy"
    assert enabled.count(GENERAL) == 1 and enabled.count(OTHER) == 1


def test_collection_is_refused_in_a_disabled_channel(store: QuoteStore) -> None:
    with pytest.raises(CollectionDisabled, match="/quote enable"):
        store.add(GENERAL, "not yet", source="reaction", message_id="1")
    assert store.count(GENERAL) == 0
    store.set_collecting(GENERAL, True)
    assert store.add(GENERAL, "not yet", source="reaction", message_id="1").created
    store.set_collecting(GENERAL, False)
    with pytest.raises(CollectionDisabled):
        store.add(GENERAL, "off again", source="command")
    assert store.add(GENERAL, "the operator may", source="command", operator=True).created
    assert store.count(GENERAL) == 2


def test_daily_cap_per_member_and_channel(enabled: QuoteStore, clock: FakeClock) -> None:
    for n in range(3):
        enabled.add(GENERAL, f"quote {n}", source="command", added_by="8")
    assert not enabled.add(GENERAL, "quote 0", source="command", added_by="8").created
    with pytest.raises(QuoteCapReached, match="24 hours"):
        enabled.add(GENERAL, "one too many", source="command", added_by="8")
    assert enabled.add(GENERAL, "someone else", source="command", added_by="9").created
    assert enabled.add(OTHER, "another channel", source="command", added_by="8").created
    clock.advance(hours=24, seconds=1)
    assert enabled.add(GENERAL, "next day", source="command", added_by="8").created
    assert enabled.count(GENERAL) == 5


def test_unicode_and_emoji_round_trip(enabled: QuoteStore) -> None:
    text = "Ça va? 今日は 🙂🚀 — «quoted» \u200d👩‍💻"
    saved = enabled.add(GENERAL, text, source="command", author_name="Zoë 🌸")
    (stored,) = enabled.list_quotes(GENERAL)
    assert stored.text == text and stored.author_name == "Zoë 🌸"
    assert saved.quote == stored
    assert not enabled.add(GENERAL, text.upper(), source="command").created


def test_long_text_is_cut_with_a_notice(enabled: QuoteStore) -> None:
    text = "🙂" * 30 + " " + "word " * 60
    result = enabled.add(GENERAL, text, source="command")
    assert len(result.quote.text) <= 100
    assert text.startswith(result.quote.text)
    assert result.notices and "cut to" in result.notices[0]
    report = enabled.import_quotes(OTHER, [NewQuote("x" * 500)])
    assert report.added == 1 and "cut to 100" in report.notices[0]
    assert len(enabled.list_quotes(OTHER)[0].text) == 100


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_text_is_refused(enabled: QuoteStore, text: str) -> None:
    with pytest.raises(EmptyQuote, match="needs text"):
        enabled.add(GENERAL, text, source="command")
    with pytest.raises(EmptyQuote):
        enabled.import_quotes(GENERAL, [NewQuote("fine"), NewQuote(text)])
    assert enabled.count(GENERAL) == 0, "a failed import adds nothing"


def test_random_and_list_by_member(enabled: QuoteStore) -> None:
    assert enabled.random(GENERAL) is None
    enabled.add(GENERAL, "by seven", source="command", author_id="7")
    enabled.add(GENERAL, "by eight", source="command", author_id="8")
    assert [q.text for q in enabled.list_quotes(GENERAL, author_id=7)] == ["by seven"]
    picked = {enabled.random(GENERAL).text for _ in range(40)}  # type: ignore[union-attr]
    assert picked == {"by seven", "by eight"}


def test_concurrent_saves_of_one_message_store_one_row(enabled: QuoteStore) -> None:
    barrier = threading.Barrier(6)
    created: list[bool] = []
    errors: list[BaseException] = []

    def star(member: int) -> None:
        barrier.wait()
        try:
            result = enabled.add(
                GENERAL, "starred at once", source="reaction", message_id="77", added_by=str(member)
            )
            created.append(result.created)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=star, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(created) == [False] * 5 + [True]
    assert enabled.count(GENERAL) == 1


def test_invisible_characters_neither_make_a_quote_nor_dodge_duplicates(
    enabled: QuoteStore,
) -> None:
    with pytest.raises(EmptyQuote, match=r"^a quote needs text: this one is empty or only"):
        enabled.add(GENERAL, "\u200b\u200c\u200d\u2060\ufeff", source="command")
    first = enabled.add(GENERAL, "Hello world", source="command")
    for twin in ("Hel\u200blo world", "ＨＥＬＬＯ\u00a0world", "hello\u2060 \u200d world"):
        again = enabled.add(GENERAL, twin, source="command")
        assert (again.created, again.quote.id) == (False, first.quote.id), twin
    emoji = "family: 👨\u200d👩\u200d👧"
    assert enabled.add(GENERAL, emoji, source="command").quote.text == emoji, "stored as written"


def test_the_store_refuses_names_that_are_not_valid(store: QuoteStore) -> None:
    from core.errors import InvalidName

    for ref, shown in (
        (ChannelRef("console", "../../etc/passwd"), "'../../etc/passwd' is not a channel name"),
        (ChannelRef("../x", "222"), "'../x' is not a server"),
        (ChannelRef("console", "General"), "'General' is not a name as stored"),
    ):
        with pytest.raises(InvalidName, match=f"^{re.escape(shown)}"):
            store.add(ref, "hi", source="command", operator=True)
        with pytest.raises(InvalidName, match=f"^{re.escape(shown)}"):
            store.set_collecting(ref, True)
    assert store.find_channel("222") == []
