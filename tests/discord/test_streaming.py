"""Streamed replies through the real /ask plugin: splitting, mentions, throttled edits.

These use a scripted engine: the small model cannot be made to write 4,000 characters or
`@everyone` on demand, and what is tested here is what the bot does with any model output.
"""

from __future__ import annotations

import discord
from fake_engines import ScriptedEngine
from simbot import answer_of

from core.discord import MESSAGE_LIMIT, split_message


def _long_answer() -> list[str]:
    lines = [f"Line {i}: " + " ".join(["word"] * 30) for i in range(40)]  # ~6,400 characters
    text = "\n".join(lines)
    return [text[i : i + 7] for i in range(0, len(text), 7)]


async def test_long_answer_is_split_at_line_boundaries(make_offline_harness) -> None:
    pieces = _long_answer()
    full = "".join(pieces)
    h = await make_offline_harness(ScriptedEngine(pieces))

    result = await h.ask(h.alice, "write a lot")

    messages = h.messages_of(result)
    assert len(messages) >= 4
    assert all(len(m.content) <= MESSAGE_LIMIT for m in messages)
    parts = [answer_of(m.content) for m in messages]
    assert all(part.startswith("Line ") for part in parts)  # cut at line starts, not mid-line
    assert "\n".join(parts) == full
    assert not any(m.components for m in messages)  # the Stop button is gone at the end


async def test_model_output_never_pings(make_offline_harness) -> None:
    engine = ScriptedEngine()
    h = await make_offline_harness(engine)
    role = h.guild.create_role("Mods", mentionable=True)
    text = f"@everyone @here <@{h.bob.id}> <@&{role.id}> hello"
    engine.scripts = [[text[:10], text[10:]]]

    result = await h.ask(h.alice, "ping everyone")

    message = result.response.message
    assert answer_of(message.content) == text
    assert h.pings(message) == (False, [], [])
    # Control: the same text with mentions allowed does ping here (the bot may mention all).
    control = await h.bot.get_channel(h.channel.id).send(
        text, allowed_mentions=discord.AllowedMentions.all()
    )
    await h.env.settle()
    assert h.pings(control) == (True, [h.bob.id], [role.id])


def test_split_message_prefers_lines_then_words() -> None:
    assert split_message("a" * 10 + "\n" + "b" * 5, limit=12) == ["a" * 10, "b" * 5]
    assert split_message("aaa bbb ccc", limit=8) == ["aaa bbb", "ccc"]
    assert split_message("x" * 25, limit=10) == ["x" * 10, "x" * 10, "x" * 5]


async def test_reply_chain_is_read_from_discord_after_a_restart(make_offline_harness) -> None:
    engine = ScriptedEngine(["First answer."], ["Second answer."], ["Third."])
    h = await make_offline_harness(engine, discord={"message_content_intent": True})
    first = await h.ask(h.alice, "A question no message shows")
    await h.restart()  # the bot forgets its answers: the chain must come from Discord

    await h.alice.send(h.channel, "Tell me more.", reply_to=first.response.message)
    second = h.channel.last_message
    await h.restart()
    await h.bob.send(h.channel, "And then?", reply_to=second)

    turns = [(m.role, m.content) for m in h.probe.last.request.messages]
    assert turns == [
        ("assistant", "First answer."),
        ("user", "Tell me more."),
        ("assistant", "Second answer."),
        ("user", "And then?"),
    ]
    assert h.channel.last_message.content == "Third."
