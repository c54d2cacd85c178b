"""The engine against the real embedded GPTQ model on CPU: tokens, template, streaming, queue."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.app import App, build
from core.errors import EngineBusy, EngineClosed, ModelError, PromptError
from core.model.decoding import render
from core.model.engine import LocalEngine
from core.model.fidelity import serving_messages
from core.model.kernels import choose_runtime
from core.model.requests import AdapterRef, ChatMessage, GenerationParams, GenerationRequest
from core.model.source import ResolvedModel
from tests.conftest import make_settings

PROMPT = "Give me a short quote about courage."
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def fp32_app(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path):
    app = build(make_settings(tmp_path_factory.mktemp("fp32"), dtype="float32"))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.start())
    yield app
    loop.run_until_complete(app.close())
    loop.close()


async def test_greedy_tokens_equal_plain_generate_fp32(fp32_app: App) -> None:
    engine = fp32_app.engine
    stream = await engine.submit(GenerationRequest.from_prompt(PROMPT, GREEDY))
    answer = await stream.text()

    messages = serving_messages(fp32_app.settings.system_prompt, PROMPT)
    tokenizer = await engine.run_on_model(lambda _model, tokenizer: tokenizer)
    prompt_ids = render(tokenizer, messages)
    assert stream.prompt_tokens == len(prompt_ids)

    def reference(model: Any, tokenizer: Any) -> list[int]:
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False
        )
        return list(out[0, len(prompt_ids) :].tolist())

    new_ids = await engine.run_on_model(reference)
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    assert stream.completion_tokens == len(new_ids)
    assert answer == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(answer.split()) >= 3, answer


async def test_chat_template_is_applied(session_app: App) -> None:
    tokenizer = await session_app.engine.run_on_model(lambda _model, tokenizer: tokenizer)
    text = tokenizer.decode(render(tokenizer, [ChatMessage("user", "hello there")]))
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nhello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


async def test_answer_is_coherent_and_stops_at_eos(session_app: App) -> None:
    params = GenerationParams(max_new_tokens=120, temperature=0.0)
    stream = await session_app.engine.submit(
        GenerationRequest.from_prompt("What is the capital of France? Answer in one word.", params)
    )
    answer = await stream.text()
    # Whether answers are right is measured over 64 prompts (tests/test_gate.py); here: the
    # answer ends at the model's end-of-turn token, which never reaches the text.
    assert answer.strip()
    assert stream.finish_reason == "stop", answer
    assert stream.completion_tokens < 120
    assert "<|im_end|>" not in answer


async def _answer(app: App, params: GenerationParams, prompt: str = PROMPT) -> str:
    stream = await app.engine.submit(GenerationRequest.from_prompt(prompt, params))
    text = await stream.text()
    assert stream.completion_tokens <= params.max_new_tokens
    return text


async def test_sampling_is_seeded_temperature_matters_and_zero_is_greedy(
    session_app: App,
) -> None:
    def sampled(seed: int | None) -> GenerationParams:
        return GenerationParams(max_new_tokens=12, temperature=0.9, seed=seed)

    seeded = [await _answer(session_app, sampled(7)) for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed: the same answer
    others = {await _answer(session_app, sampled(seed)) for seed in (8, 9, 10)}
    assert others - {seeded[0]}, "other seeds gave the same answer: is temperature ignored?"

    greedy = GenerationParams(max_new_tokens=12, temperature=0.0)
    at_zero = {
        await _answer(session_app, GenerationParams(12, 0.0, seed=seed)) for seed in (7, 8, None)
    }
    assert at_zero == {await _answer(session_app, greedy)}  # temperature 0 ignores the seed


async def _rendered(app: App, prompt: str) -> list[int]:
    """The prompt's token ids as the engine renders them (with the system prompt, if any)."""
    system = app.settings.system_prompt
    turns = [ChatMessage("system", system)] if system else []
    tokenizer = await app.engine.run_on_model(lambda _model, tokenizer: tokenizer)
    return render(tokenizer, [*turns, ChatMessage("user", prompt)])


async def test_repetition_penalty_equals_transformers_generate_fp32(fp32_app: App) -> None:
    engine = fp32_app.engine
    prompt = "List the days of the week, then list them again."
    prompt_ids = await _rendered(fp32_app, prompt)
    penalized = GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.3)
    stream = await engine.submit(GenerationRequest.from_prompt(prompt, penalized))
    answer = await stream.text()

    def reference(penalty: float) -> Callable[[Any, Any], list[int]]:
        def run(model: Any, tokenizer: Any) -> list[int]:
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=penalized.max_new_tokens,
                do_sample=False,
                repetition_penalty=penalty,
            )
            ids: list[int] = out[0, len(prompt_ids) :].tolist()
            eos = tokenizer.eos_token_id
            return ids[: ids.index(eos)] if eos in ids else ids

        return run

    expected = await engine.run_on_model(reference(1.3))  # the model belongs to the worker
    tokenizer = await engine.run_on_model(lambda _model, tokenizer: tokenizer)
    assert stream.completion_tokens == len(expected)
    assert answer == tokenizer.decode(expected, skip_special_tokens=True)
    assert expected != await engine.run_on_model(reference(1.0))  # the penalty changed it


async def test_event_loop_keeps_running_between_pieces(session_app: App) -> None:
    """Another coroutine makes progress while the answer streams (order, not timing)."""
    events: list[str] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            events.append("tick")
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    stream = await session_app.engine.submit(
        GenerationRequest.from_prompt(PROMPT, GenerationParams(max_new_tokens=16, temperature=0))
    )
    async for _piece in stream:
        events.append("piece")
    done.set()
    await task
    pieces = [i for i, e in enumerate(events) if e == "piece"]
    assert len(pieces) >= 5
    between = [events[a + 1 : b].count("tick") for a, b in itertools.pairwise(pieces)]
    assert sum(1 for n in between if n > 0) >= len(between) // 2, between


async def test_empty_prompt_is_refused(session_app: App) -> None:
    for prompt in ("", "   \n "):
        with pytest.raises(PromptError, match="empty"):
            await session_app.engine.submit(GenerationRequest.from_prompt(prompt))


async def test_long_prompt_is_cut_from_the_front_with_a_notice(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    app = build(make_settings(tmp_path, max_context_tokens=128))
    await app.start()
    try:
        prompt = " ".join(f"word{i}" for i in range(400)) + " Say hi."
        stream = await app.engine.submit(
            GenerationRequest.from_prompt(prompt, GenerationParams(max_new_tokens=8, temperature=0))
        )
        await stream.text()
        info = app.engine.info
        assert info is not None  # what `model info` reports: the window served, not the model's
        window = await app.engine.run_on_model(
            lambda model, _tokenizer: model.config.max_position_embeddings
        )
        assert info.context_tokens == 128 < window
        assert app.engine.capacity is not None
        assert app.engine.capacity.context_tokens == 128
        assert stream.prompt_tokens <= 128 - 8
        assert any("too long" in n for n in stream.notices)
        assert stream.completion_tokens >= 1
    finally:
        await app.close()


async def test_max_tokens_is_capped(tmp_path: Path, embedded_model_dir: Path) -> None:
    app = build(make_settings(tmp_path, max_new_tokens=4, max_new_tokens_cap=6))
    await app.start()
    # No stop token: the answer runs to its cap whatever the build answers (a build that
    # answered "One, two." would otherwise end before the cap and prove nothing).
    app.engine._stops = set()
    try:
        stream = await app.engine.submit(
            GenerationRequest.from_prompt(
                "Count from one to fifty in words.",
                GenerationParams(max_new_tokens=500, temperature=0),
            )
        )
        await stream.text()
        assert stream.completion_tokens == 6
        assert stream.finish_reason == "length"
        assert any("capped at 6" in n for n in stream.notices)
    finally:
        await app.close()


async def test_queue_positions_busy_error_and_cancel(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    app = build(make_settings(tmp_path, queue_size=2, batch_rows=1))
    await app.start()
    try:
        long = GenerationParams(max_new_tokens=200, temperature=0)
        ask = "Write a long story about a dragon."
        running = await app.engine.submit(GenerationRequest.from_prompt(ask, long))
        await anext(running)  # the first piece: it is generating now
        assert running.queue_position == 0
        first = await app.engine.submit(GenerationRequest.from_prompt(ask, long))
        second = await app.engine.submit(GenerationRequest.from_prompt(ask, long))
        assert (first.queue_position, second.queue_position) == (1, 2)
        with pytest.raises(EngineBusy, match="busy"):
            await app.engine.submit(GenerationRequest.from_prompt(ask, long))

        first.cancel()  # dropped from the queue without generating
        assert second.queue_position == 1  # a cancelled request holds no place...
        third = await app.engine.submit(GenerationRequest.from_prompt(ask, long))  # ...nor room
        assert third.queue_position == 2
        third.cancel()
        running.cancel()  # Stop: ends the running answer early
        assert await running.text() != ""
        assert running.finish_reason == "cancelled"
        assert running.completion_tokens < 200
        assert await first.text() == ""
        assert first.finish_reason == "cancelled"
        second.cancel()
        await second.text()
        assert second.queue_position is None
    finally:
        await app.close()
    with pytest.raises(EngineClosed):
        await app.engine.submit(GenerationRequest.from_prompt("hi"))


async def test_close_tells_waiting_requests(tmp_path: Path, embedded_model_dir: Path) -> None:
    app = build(make_settings(tmp_path, batch_rows=1))
    await app.start()
    long = GenerationParams(max_new_tokens=60, temperature=0)
    running = await app.engine.submit(GenerationRequest.from_prompt("Tell me a story.", long))
    waiting = await app.engine.submit(GenerationRequest.from_prompt("And another.", long))
    await anext(running)
    running.cancel()
    await app.close()
    with pytest.raises(EngineClosed, match="shutting down"):
        await waiting.text()


def _locate_after(gate: threading.Event, error: Exception) -> Callable[[], ResolvedModel]:
    """A model location that takes as long as the test wants (a first build), then fails."""

    def locate() -> ResolvedModel:
        gate.wait()
        raise error

    return locate


def _engine(locate: Callable[[], ResolvedModel]) -> LocalEngine:
    return LocalEngine(locate, choose_runtime("cpu", "auto", "auto"), threads=1)


async def test_submit_to_an_engine_never_started_is_refused() -> None:
    engine = _engine(_locate_after(threading.Event(), OSError("unused")))
    with pytest.raises(EngineClosed, match="the model was never started"):
        await engine.submit(GenerationRequest.from_prompt("hi"))
    with pytest.raises(EngineClosed, match="the model was never started"):
        await engine.call(lambda: 1)
    with pytest.raises(EngineClosed, match="the model was never started"):  # not a hang
        await asyncio.wait_for(engine.load_adapter(AdapterRef("a", "v1"), Path("/nowhere")), 5)


async def test_a_failed_load_answers_every_request_with_its_error() -> None:
    gate = threading.Event()
    engine = _engine(_locate_after(gate, OSError("no space left on device")))
    starting = asyncio.ensure_future(engine.start())
    await asyncio.sleep(0)  # let start() hand the load to the worker
    waiting = await engine.submit(GenerationRequest.from_prompt("asked while loading"))
    call = asyncio.ensure_future(engine.call(lambda: 1))
    await asyncio.sleep(0)
    gate.set()

    load_error = "could not load the model: no space left on device"
    with pytest.raises(ModelError, match=load_error):
        await starting
    with pytest.raises(ModelError, match=load_error):  # not accepted-and-never-answered
        await asyncio.wait_for(waiting.text(), 30)
    assert waiting.finish_reason == "error"
    with pytest.raises(ModelError, match=load_error):
        await asyncio.wait_for(call, 30)
    for _ in range(engine.queue_size + 1):  # later requests: the load error, never "busy"
        with pytest.raises(ModelError, match=load_error):
            await engine.submit(GenerationRequest.from_prompt("and now?"))
    await asyncio.wait_for(engine.close(), 30)


async def test_close_while_the_model_loads_does_not_wait_for_the_load() -> None:
    gate = threading.Event()  # never set before close: a build that takes minutes
    engine = _engine(_locate_after(gate, OSError("interrupted")))
    starting = asyncio.ensure_future(engine.start())
    await asyncio.sleep(0)
    waiting = await engine.submit(GenerationRequest.from_prompt("asked while loading"))
    try:
        await asyncio.wait_for(engine.close(), 10)
        assert engine._thread is not None and engine._thread.is_alive()  # left to finish alone
        assert engine._thread.daemon
        with pytest.raises(EngineClosed, match="shutting down"):
            await starting
        with pytest.raises(EngineClosed, match="shutting down"):
            await asyncio.wait_for(waiting.text(), 10)
        with pytest.raises(EngineClosed, match="shutting down"):
            await engine.submit(GenerationRequest.from_prompt("still there?"))
    finally:
        gate.set()


async def test_a_request_with_nothing_ahead_is_not_queued(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    """Places count the requests ahead of the free rows; none means starting, even before the
    worker picks it up (here it is busy elsewhere: a call on its thread)."""
    app = build(make_settings(tmp_path, batch_rows=1))
    await app.start()
    engine = app.engine
    gate = threading.Event()
    busy = asyncio.ensure_future(engine.call(gate.wait))
    await asyncio.sleep(0)  # the call reaches the worker before the questions do
    params = GenerationParams(max_new_tokens=4, temperature=0)
    try:
        first = await engine.submit(GenerationRequest.from_prompt("Hi!", params))
        second = await engine.submit(GenerationRequest.from_prompt("Hello!", params))
        assert (first.queue_position, second.queue_position) == (0, 1)
        first.cancel()  # a cancelled request is no longer ahead of anyone
        assert second.queue_position == 0
    finally:
        gate.set()
    await busy
    assert await first.text() == "" and first.finish_reason == "cancelled"
    assert await second.text() != ""
    assert second.queue_position is None
    await app.close()


async def test_the_python_surface(
    tmp_path: Path, embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names scripts use, exactly as documented in the README."""
    import core.app
    import core.settings
    from core.model.requests import GenerationParams as Params
    from core.model.requests import GenerationRequest as Request
    from tests.conftest import CACHE_DIR

    for name in [k for k in os.environ if k.startswith("LORACORD_")]:
        monkeypatch.delenv(name)
    settings = core.settings.load(
        path=None, cache_dir=CACHE_DIR, data_dir=tmp_path / "data", batch_rows=2
    )
    app = core.app.build(settings)
    await app.start()
    try:
        request = Request.from_prompt("Say hello.", Params(max_new_tokens=8, temperature=0.0))
        stream = await app.engine.submit(request)
        assert (await stream.text()).strip()
        assert 1 <= stream.completion_tokens <= 8
        assert stream.finish_reason in ("stop", "length")
        stopped = await app.engine.submit(Request.from_prompt("Tell me a long story.", Params(64)))
        stopped.cancel()
        await stopped.text()
        assert stopped.finish_reason == "cancelled"
        assert app.engine.capacity is not None and app.engine.capacity.rows == 2
    finally:
        await app.close()
