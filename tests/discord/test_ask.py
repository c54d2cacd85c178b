"""/ask end to end on SimCord with the real embedded model (small token budgets)."""

from __future__ import annotations

import asyncio
import threading

from simbot import FakeClock, answer_of

from core.app import build
from core.discord.streaming import CURSOR
from core.errors import LoracordError
from core.model.requests import AdapterRef, ChatMessage, GenerationRequest
from core.store import ChannelRef
from plugins.ask.cog import DM_REFUSED
from tests.adapter_kit import write_adapter
from tests.conftest import make_settings


async def _direct(h, prompt: str, max_tokens: int) -> str:
    """What the model says to `prompt`, asked directly (greedy, so the same as via Discord)."""
    # The settings' sampling (repetition penalty included), as every front uses it.
    params = h.bot.settings.generation_params(max_new_tokens=max_tokens, temperature=0.0)
    stream = await h.probe.engine.submit(GenerationRequest.from_prompt(prompt, params))
    return (await stream.text()).strip()


async def test_ask_streams_and_ends_with_the_models_text(make_harness) -> None:
    h = await make_harness(clock=FakeClock(step=0.5))  # 1 s interval: an edit every 2nd piece
    prompt = "Name three colors."

    result = await h.ask(h.alice, prompt, temperature=0.0, max_tokens=24)

    assert h.callback_types() == [5]  # deferred at once
    final = answer_of(result.response.content)
    assert final == await _direct(h, prompt, 24)
    assert not result.response.components  # Stop button removed at the end
    edits = h.original_edits()
    streaming = [e for e in edits if e.endswith(CURSOR)]
    assert streaming, f"no intermediate edits: {edits}"
    assert all(final.startswith(e[: -len(CURSOR)].strip()) for e in streaming)
    pieces = h.probe.last.stream.completion_tokens
    assert len(streaming) <= pieces // 2 + 1  # throttled: at most one edit per interval
    assert h.probe.last.request.params.max_new_tokens == 24


async def test_reply_to_an_answer_carries_the_earlier_turns(make_harness) -> None:
    h = await make_harness(
        max_new_tokens=12, discord={"message_content_intent": True, "reply_chain_limit": 8}
    )
    first = await h.ask(h.alice, "My name is Ada. Greet me.", temperature=0.0, max_tokens=12)
    answer = answer_of(first.response.content)

    await h.alice.send(h.channel, "What is my name?", reply_to=first.response.message)

    request = h.probe.last.request
    turns = [(m.role, m.content) for m in request.messages if m.role != "system"]
    assert turns == [
        ("user", "My name is Ada. Greet me."),
        ("assistant", answer),
        ("user", "What is my name?"),
    ]
    reply = h.channel.last_message
    assert reply.author.id == h.bot.user.id
    assert reply.reference and reply.reference.message_id is not None
    assert answer_of(reply.content) == (await h.probe.last.stream.text()).strip()


async def test_reply_chain_is_bounded_by_the_setting(make_harness) -> None:
    h = await make_harness(
        max_new_tokens=6, discord={"message_content_intent": True, "reply_chain_limit": 2}
    )
    first = await h.ask(h.alice, "Hello there.", temperature=0.0, max_tokens=6)
    await h.alice.send(h.channel, "And again?", reply_to=first.response.message)
    messages = [m for m in h.probe.last.request.messages if m.role != "system"]
    assert len(messages) == 2
    assert messages[-1] == ChatMessage("user", "And again?")


async def test_stop_ends_a_generation(make_harness) -> None:
    h = await make_harness()
    h.probe.hold = True  # the verb returns while the answer streams

    result = await h.ask(h.alice, "Tell me a very long story about a dragon.", max_tokens=400)
    original = result.response.message
    assert original.components  # the Stop button

    refused = await h.bob.click(original, label="Stop")
    assert refused.ephemeral and "Only the person who asked" in refused.response.content
    await h.alice.click(original, label="Stop")
    await h.answers_done()

    stream = h.probe.last.stream
    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens < 400
    final = h.messages_of(result)[-1]
    assert final.content.endswith("Stopped.")
    assert not result.response.components


async def test_queue_place_is_shown_while_waiting(make_harness, one_row_engine) -> None:
    h = await make_harness(one_row_engine)
    h.probe.hold = True
    await h.ask(h.alice, "Count to fifty.", max_tokens=40)
    waiting = await h.ask(h.bob, "Hi!", max_tokens=4)
    assert "in line" in waiting.response.content  # bob waits behind alice
    await h.answers_done()
    assert "in line" not in waiting.response.content
    assert answer_of(waiting.response.content)


async def test_no_queue_place_when_nothing_is_ahead(make_harness) -> None:
    h = await make_harness()
    gate = threading.Event()
    busy = asyncio.ensure_future(h.probe.engine.call(gate.wait))  # the worker is not generating
    await asyncio.sleep(0)
    h.probe.hold = True
    try:
        result = await h.ask(h.alice, "Hi!", max_tokens=4)  # shown while the worker is away
    finally:
        gate.set()
    await busy
    await h.answers_done()
    assert answer_of(result.response.content)
    edits = h.original_edits()
    assert edits[0] == "\N{THINKING FACE} Thinking\N{HORIZONTAL ELLIPSIS}"
    assert not [e for e in edits if "in line" in e], edits


async def test_max_tokens_is_capped_by_the_setting(
    make_harness, tmp_path, embedded_model_dir
) -> None:
    capped = build(make_settings(tmp_path / "capped", max_new_tokens=8, max_new_tokens_cap=8))
    await capped.start()  # the cap is the engine's: one place, with its notice
    try:
        h = await make_harness(capped.engine, max_new_tokens=8, max_new_tokens_cap=8)
        result = await h.ask(h.alice, "Count from one to a hundred in words.", max_tokens=500)
        assert h.probe.last.request.params.max_new_tokens == 500  # as asked
        assert h.probe.last.stream.completion_tokens <= 8
        assert "capped at 8" in result.response.content
    finally:
        await capped.close()


async def test_cooldown_says_when_to_retry(make_harness) -> None:
    h = await make_harness(discord={"cooldown_seconds": 30})
    await h.ask(h.alice, "Hi!", max_tokens=4)
    second = await h.ask(h.alice, "Hi again!", max_tokens=4)
    assert second.ephemeral and "again in 30 s" in second.response.content
    assert [type(e).__name__ for e in h.command_errors()] == ["CommandOnCooldown"]
    assert len(h.probe.submitted) == 1
    h.clock.advance(30)
    third = await h.ask(h.alice, "Hi a third time!", max_tokens=4)
    assert not third.ephemeral and len(h.probe.submitted) == 2


def _import_adapter(h, tmp_path, name: str, seed: int) -> AdapterRef:
    """Import an adapter (v1, promoted) for the harness's server."""
    shapes, fingerprint = h.bot.app.channels.base
    folder = write_adapter(tmp_path / f"src-{name}", shapes, seed=seed, strength=0.05)
    server = str(h.guild.id)
    version = h.bot.app.registry.import_folder(folder, name, server, shapes, fingerprint)
    return AdapterRef(name, version.version)


async def test_a_thread_uses_its_parent_channel(make_harness, tmp_path) -> None:
    h = await make_harness()
    ref = _import_adapter(h, tmp_path, "ask-thread", seed=21)
    await h.bot.app.channels.switch(ChannelRef.discord(h.guild.id, h.channel.id), ref.name)

    await h.slash(h.alice, "ask", channel=h.thread(), prompt="Hi!", max_tokens=4)
    assert h.probe.last.request.adapter == ref
    other = h.guild.create_text_channel("random")
    await h.slash(h.alice, "ask", channel=other, prompt="Hi!", max_tokens=4)
    assert h.probe.last.request.adapter is None  # the binding is #general's alone


async def test_dms_follow_the_dm_policy(make_harness, tmp_path) -> None:
    h = await make_harness(discord={"dm_policy": "refuse"})
    user = h.alice.user
    refused = await h.slash(user, "ask", prompt="Hi!", max_tokens=4)
    assert refused.ephemeral and refused.response.content == DM_REFUSED
    assert [(type(e), str(e)) for e in h.command_errors()] == [(LoracordError, DM_REFUSED)]
    assert not h.probe.submitted

    ref = _import_adapter(h, tmp_path, "ask-dm", seed=22)
    await h.bot.app.channels.switch(ChannelRef.discord(h.guild.id, h.channel.id), ref.name)
    h.reconfigure(dm_policy="base")
    answered = await h.slash(user, "ask", prompt="Hi!", max_tokens=4)
    assert not answered.ephemeral and answer_of(answered.response.content)
    assert h.probe.last.request.adapter is None  # a DM has no channel: the base model answers
    await h.ask(h.alice, "Hi!", max_tokens=4)  # control: a server channel gets its adapter
    assert h.probe.last.request.adapter == ref


async def test_shutdown_ends_answers_in_flight_with_a_message(make_harness) -> None:
    h = await make_harness()
    h.probe.hold = True
    result = await h.ask(h.alice, "Tell me a long story.", max_tokens=300)

    await h.bot.answers.shutdown()
    await h.answers_done()

    assert h.messages_of(result)[-1].content.endswith("the bot is shutting down.")
    refused = await h.ask(h.bob, "Anyone there?", max_tokens=4)
    closing = "the bot is shutting down; ask again when it is back"
    assert refused.ephemeral and refused.response.content == closing
    assert [(type(e), str(e)) for e in h.command_errors()] == [(LoracordError, closing)]


async def test_mentioning_the_bot_asks_when_enabled(make_harness) -> None:
    h = await make_harness(max_new_tokens=12, discord={"answer_on_mention": True})
    await h.alice.send(h.channel, f"<@{h.bot.user.id}> Say hi.")
    assert h.probe.last.request.messages[-1] == ChatMessage("user", "Say hi.")
    reply = h.channel.last_message
    assert reply.author.id == h.bot.user.id
    assert answer_of(reply.content) == (await h.probe.last.stream.text()).strip()
