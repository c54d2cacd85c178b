"""Every way an answer can end stops the model and the Stop button (real model, on SimCord).

A deleted message, Discord failing with a 5xx, an interaction token that expired while the
question waited, the consuming task being cancelled: none may leave the engine generating to
its token cap for nobody, or a Stop view registered. And a model that failed to load is named.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fake_engines import ScriptedEngine
from simbot import FakeClock

from core.app import App
from core.discord import AnswerBoard, StopView, StreamedReply
from core.discord.streaming import CURSOR
from core.errors import ModelError
from core.model.engine import LocalEngine
from core.model.kernels import choose_runtime
from core.model.requests import GenerationParams, GenerationRequest
from core.model.source import ResolvedModel

STORY = "Tell me a very long story about a dragon."
CAP = 400
# Tokens the worker may still produce between the bot stopping and the engine seeing it.
FAR_BELOW_CAP = 100


async def _ended_in_the_engine(stream: Any) -> None:
    """Read what the bot left unread, up to the engine's end of the answer."""
    await asyncio.wait_for(stream.text(), 120)


async def test_deleting_the_answer_stops_the_model_and_its_view(make_harness) -> None:
    h = await make_harness(clock=FakeClock(step=1.0))  # every piece is rendered at once
    watched = h.watch_answers()
    h.probe.hold = True
    result = await h.ask(h.alice, STORY, max_tokens=CAP)
    message = result.response.message

    h.env.backend.delete_message(message.channel.id, message.id)
    await watched[0].wait()
    stream = h.probe.last.stream
    await _ended_in_the_engine(stream)

    assert watched[0].error is None  # not a bug: nobody is left to tell
    assert watched[0].answer.lost is not None and watched[0].answer.lost.status == 404
    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens < FAR_BELOW_CAP
    assert watched[0].view.is_finished()
    assert not h.bot.answers.answers
    assert message.id not in h.bot.conversations  # a deleted answer is not continued


async def test_a_discord_server_error_stops_the_model_and_its_view(make_harness) -> None:
    h = await make_harness(clock=FakeClock(step=1.0))
    watched = h.watch_answers()
    h.probe.hold = True
    await h.ask(h.alice, STORY, max_tokens=CAP)

    h.env.inject_error("PATCH", "/webhooks/*/messages/@original", status=503, times=None)
    await watched[0].wait()
    stream = h.probe.last.stream
    await _ended_in_the_engine(stream)

    assert watched[0].answer.lost is not None and watched[0].answer.lost.status == 503
    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens < FAR_BELOW_CAP
    assert watched[0].view.is_finished()


async def test_expired_tokens_behind_a_long_queue_stop_the_model(
    make_harness, one_row_engine
) -> None:
    h = await make_harness(one_row_engine, clock=FakeClock(step=1.0))
    watched = h.watch_answers()
    h.probe.hold = True
    await h.ask(h.alice, STORY, max_tokens=CAP)
    waiting = await h.ask(h.bob, "And one about the sea?", max_tokens=CAP)
    assert "in line" in waiting.response.content

    await h.env.advance_time(16 * 60)  # interaction tokens last 15 minutes
    for entry in watched:
        await entry.wait()
    running, queued = (record.stream for record in h.probe.submitted)
    for stream in (running, queued):
        await _ended_in_the_engine(stream)
        assert stream.finish_reason == "cancelled"
    assert running.completion_tokens < FAR_BELOW_CAP
    assert queued.completion_tokens < FAR_BELOW_CAP
    assert [entry.answer.lost.status for entry in watched] == [404, 404]  # Unknown Webhook
    assert all(entry.view.is_finished() for entry in watched)


class _Message:
    """A posted message for a `StreamedReply` outside Discord; tells when text streams."""

    def __init__(self, streaming: asyncio.Event) -> None:
        self.id = 1
        self.streaming = streaming

    async def edit(self, *, content: str, **_fields: Any) -> None:
        if content.endswith(CURSOR):
            self.streaming.set()


async def test_cancelling_the_answer_task_cancels_the_stream(session_app: App) -> None:
    streaming = asyncio.Event()
    message = _Message(streaming)

    async def post_first(content: str, _view: Any) -> _Message:
        if content.endswith(CURSOR):
            streaming.set()
        return message

    async def post_more(_content: str) -> _Message:
        return message

    view = StopView(asker_id=1)
    reply = StreamedReply(post_first, post_more, view=view)
    board = AnswerBoard()
    params = GenerationParams(max_new_tokens=CAP, temperature=0.0)
    stream = await session_app.engine.submit(GenerationRequest.from_prompt(STORY, params))
    task = asyncio.create_task(board.run(stream, reply))
    await asyncio.wait_for(streaming.wait(), 120)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _ended_in_the_engine(stream)

    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens < FAR_BELOW_CAP
    assert view.is_finished()
    assert not board.answers


async def test_stop_view_ends_with_a_normal_answer(make_offline_harness) -> None:
    h = await make_offline_harness(ScriptedEngine(["all ", "done"]))
    watched = h.watch_answers()
    result = await h.ask(h.alice, "hi")
    assert result.response.content == "all done"
    assert watched[0].answer.lost is None
    assert watched[0].view.is_finished()


async def test_ask_after_a_failed_model_load_names_the_load_error(make_offline_harness) -> None:
    gate = threading.Event()
    gate.set()

    def locate() -> ResolvedModel:
        raise ModelError("model 'nowhere/gptq' was not found in the local cache")

    engine = LocalEngine(locate, choose_runtime("cpu", "auto", "auto"), threads=1)
    with pytest.raises(ModelError, match="not found"):
        await engine.start()
    h = await make_offline_harness(engine)

    result = await h.ask(h.alice, "hi")

    text = h.response_text(result)
    assert "model 'nowhere/gptq' was not found in the local cache" in text
    assert "busy" not in text
    assert [type(e).__name__ for e in h.command_errors()] == ["ModelError"]
    await engine.close()
