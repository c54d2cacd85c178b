"""/quote, the "Save as quote" menu and star reactions, end to end on SimCord (no model needed).

Each path stores exactly one row; a second save does not duplicate it; a disabled channel
refuses; a deleted message removes its quote and an edit updates it; forget is scoped to the
caller; a malformed import names its line and adds nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import discord
import pytest
from fake_engines import ScriptedEngine

import plugins.quotes.cog
from core.discord import NotAdmin
from core.errors import CollectionDisabled, QuoteImportError
from core.store import ChannelRef

QUOTES = {"plugins": ["quotes"], "message_content_intent": True}


@pytest.fixture
async def h(make_offline_harness):
    return await make_offline_harness(ScriptedEngine(), discord=QUOTES)


def _ref(h) -> ChannelRef:
    return ChannelRef.discord(h.guild.id, h.channel.id)


async def _quotes(h):
    return await h.bot.app.store.list_quotes(_ref(h))


async def _enable(h) -> None:
    result = await h.slash(h.admin, "quote enable")
    assert result.ephemeral and "on here" in result.response.content


async def test_a_star_saves_once_and_a_removed_star_keeps_it(h) -> None:
    message = await h.alice.send(h.channel, "Stars are just suns far away")
    await h.bob.react(message, "⭐")
    await h.env.settle()
    assert await _quotes(h) == [], "collection is off by default"
    await h.bob.unreact(message, "⭐")
    await _enable(h)

    await h.bob.react(message, "⭐")
    await h.admin.react(message, "⭐")
    await h.env.settle()
    (quote,) = await _quotes(h)
    assert (quote.text, quote.source, quote.author_id) == (
        "Stars are just suns far away",
        "reaction",
        str(h.alice.id),
    )
    assert quote.added_by == str(h.bob.id)
    await h.bob.unreact(message, "⭐")
    await h.admin.unreact(message, "⭐")
    await h.env.settle()
    assert len(await _quotes(h)) == 1


async def test_the_message_menu_saves_once_and_refuses_when_disabled(h) -> None:
    message = await h.alice.send(h.channel, "Menus are underrated")
    refused = await h.bob.context_menu(h.channel, "Save as quote", message)
    assert refused.ephemeral and "/quote enable" in refused.response.content
    await _enable(h)
    saved = await h.bob.context_menu(h.channel, "Save as quote", message)
    assert "Saved as quote #" in saved.response.content
    again = await h.alice.context_menu(h.channel, "Save as quote", message)
    assert "Already saved" in again.response.content
    (quote,) = await _quotes(h)
    assert (quote.source, quote.message_id) == ("menu", str(message.id))
    # the refusal went through the error handler, as it should
    assert [type(e) for e in h.command_errors()] == [CollectionDisabled]


async def test_deleting_or_editing_the_message_follows_the_quote(h) -> None:
    await _enable(h)
    kept = await h.alice.send(h.channel, "first words")
    gone = await h.alice.send(h.channel, "regrettable words")
    for message in (kept, gone):
        await h.bob.context_menu(h.channel, "Save as quote", message)
    await h.alice.edit(kept, "better words")
    await h.alice.delete(gone)
    await h.env.settle()
    assert [q.text for q in await _quotes(h)] == ["better words"]


async def test_slash_add_list_random_and_emoji(h) -> None:
    await _enable(h)
    added = await h.slash(h.alice, "quote add", text="Ship it 🚀", author=h.bob)
    assert added.ephemeral and "Saved as quote #" in added.response.content
    again = await h.slash(h.alice, "quote add", text="  ship IT 🚀 ")
    assert "Already saved" in again.response.content
    listed = await h.slash(h.alice, "quote list")
    assert "Ship it 🚀" in listed.response.content and "bob" in listed.response.content
    shown = await h.slash(h.alice, "quote random")
    assert not shown.ephemeral and "Ship it 🚀" in shown.response.content
    (quote,) = await _quotes(h)
    assert (quote.source, quote.author_id) == ("command", str(h.bob.id))


async def test_forget_removes_only_the_callers_quotes(h) -> None:
    await _enable(h)
    for member, text in ((h.alice, "alice one"), (h.alice, "alice two"), (h.bob, "bob's")):
        message = await member.send(h.channel, text)
        await h.admin.context_menu(h.channel, "Save as quote", message)
    refused = await h.slash(h.bob, "quote forget", member=h.alice)
    assert refused.ephemeral and "for admins" in refused.response.content
    assert [type(e) for e in h.command_errors()] == [NotAdmin]
    done = await h.slash(h.alice, "quote forget")
    assert "Removed 2 quotes" in done.response.content
    assert [q.text for q in await _quotes(h)] == ["bob's"]


async def test_import_is_all_or_nothing_and_admin_only(h) -> None:
    good = json.dumps([{"quote": "one", "author": "A"}, {"text": "two", "from": "B"}]).encode()
    bad = b'{"quote": "fine"}\n{"quote": broken}\n'
    refused = await h.slash(h.alice, "quote import", file=("q.json", good))
    assert "for admins" in refused.response.content
    failed = await h.slash(h.admin, "quote import", file=("q.jsonl", bad))
    assert "line 2" in h.response_text(failed) and "nothing was imported" in h.response_text(failed)
    assert await _quotes(h) == []
    done = await h.slash(h.admin, "quote import", file=("q.json", good))
    assert "Imported 2 quotes (0 duplicates skipped)" in h.response_text(done)
    assert [q.source for q in await _quotes(h)] == ["import", "import"]
    errors = h.command_errors()
    assert [type(e) for e in errors] == [NotAdmin, QuoteImportError]
    assert str(errors[1]).startswith("cannot import q.jsonl, line 2: invalid JSON")


async def test_import_parses_off_the_event_loop(h, monkeypatch) -> None:
    threads: list[threading.Thread] = []
    parse = plugins.quotes.cog.parse

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return parse(*args, **kwargs)

    monkeypatch.setattr(plugins.quotes.cog, "parse", spy)
    done = await h.slash(h.admin, "quote import", file=("q.txt", b"one\ntwo\n"))
    assert "Imported 2 quotes" in h.response_text(done)
    assert threads and threads[0] is not threading.main_thread()


def _spy_fetches(monkeypatch, fails: Exception | None = None) -> list[int]:
    fetched: list[int] = []
    fetch = discord.abc.Messageable.fetch_message

    async def spy(self, message_id: int):
        fetched.append(message_id)
        if fails is not None:
            raise fails
        return await fetch(self, message_id)

    monkeypatch.setattr(discord.abc.Messageable, "fetch_message", spy)
    return fetched


async def test_a_star_where_quotes_are_off_fetches_nothing(h, monkeypatch) -> None:
    message = await h.alice.send(h.channel, "not collected here")
    fetched = _spy_fetches(monkeypatch)
    await h.bob.react(message, "⭐")
    await h.env.settle()
    assert fetched == [] and await _quotes(h) == []
    await _enable(h)
    await h.admin.react(message, "⭐")
    await h.env.settle()
    assert fetched == [message.id] and len(await _quotes(h)) == 1


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [(discord.NotFound, 404, "Unknown Message"), (discord.Forbidden, 403, "Missing Access")],
)
async def test_a_starred_message_that_cannot_be_read_is_skipped(
    h, monkeypatch, caplog, error, status: int, reason: str
) -> None:
    await _enable(h)
    message = await h.alice.send(h.channel, "gone before the bot looks")
    response = SimpleNamespace(status=status, reason=reason)
    fetched = _spy_fetches(monkeypatch, error(response, {"message": reason, "code": 0}))
    with caplog.at_level(logging.INFO, logger="plugins.quotes.collect"):
        await h.bob.react(message, "⭐")
        await h.env.settle()
    assert fetched == [message.id] and await _quotes(h) == []
    assert f"starred message {message.id} in " in caplog.text and reason in caplog.text
