"""Continuous batching on the real embedded GPTQ model (CPU), and the scheduler/detokenizer units.

In fp32 the engine's batched forward must give exactly the tokens `model.generate` gives for
each prompt alone, whatever else shares the batch (rows, lengths, arrivals, cancels, queueing).
On the served bf16 path batched and alone agree within a stated tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.app import App, build
from core.model.decoding import IncrementalDetokenizer, render, stop_token_ids
from core.model.engine import LocalEngine
from core.model.fidelity import serving_messages
from core.model.requests import GenerationParams, GenerationRequest, ResponseStream, open_stream
from core.model.scheduler import Prepared, Scheduler, Segment, Sequence
from tests.conftest import make_settings

PROMPTS = [
    "Give me a short quote about courage.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three primary colors.",
    "How do I boil an egg?",
    "Name a famous painter and one of their works.",
    "Tell me a joke about computers.",
]
STORY = "Write a long story about a dragon who learns to bake bread."
# ~300 tokens: read in several 64-token chunks while a short prompt decodes.
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
LONG_PROMPT = (
    " ".join(
        f"Note {i}: the {COLORS[i % 6]} box on shelf {i % 7} holds {i * 3} marbles and a key."
        for i in range(1, 14)
    )
    + " Which box holds the most marbles? Answer briefly."
)
PREFILL_BUDGET = 64


def greedy(max_new_tokens: int = 24) -> GenerationParams:
    # repetition_penalty defaults to 1.0 in GenerationParams: plain greedy, as generate() does.
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)


def _started_app(app: App) -> Iterator[App]:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.start())
    yield app
    loop.run_until_complete(app.close())
    loop.close()


@pytest.fixture(scope="module")
def fp32_app(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[App]:
    """Eight rows, a small KV cache, and a small prefill budget so prompts arrive in chunks."""
    settings = make_settings(
        tmp_path_factory.mktemp("batch8"),
        dtype="float32",
        batch_rows=8,
        max_context_tokens=512,
        prefill_tokens_per_step=PREFILL_BUDGET,
        queue_size=16,
    )
    yield from _started_app(build(settings))


@pytest.fixture(scope="module")
def two_row_app(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path
) -> Iterator[App]:
    settings = make_settings(
        tmp_path_factory.mktemp("batch2"),
        dtype="float32",
        batch_rows=2,
        max_context_tokens=256,
        queue_size=16,
    )
    yield from _started_app(build(settings))


# Reference answers of the fp32 model (the same weights in every fp32 app), by prompt and length.
_REFERENCES: dict[tuple[str, int], list[int]] = {}


def _local(app: App) -> LocalEngine:
    assert isinstance(app.engine, LocalEngine)
    return app.engine


async def _tokenizer(app: App) -> Any:
    return await _local(app).run_on_model(lambda _model, tokenizer: tokenizer)


async def _reference(app: App, prompt: str, max_new_tokens: int) -> list[int]:
    """`model.generate` greedy on this prompt alone, cut at the first stop token."""
    key = (prompt, max_new_tokens)
    if key not in _REFERENCES:

        def run(model: Any, tokenizer: Any) -> list[int]:
            ids = render(tokenizer, serving_messages(app.settings.system_prompt, prompt))
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False
            )
            new: list[int] = out[0, len(ids) :].tolist()
            stops = stop_token_ids(model, tokenizer)
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            return new[:cut]

        _REFERENCES[key] = await _local(app).run_on_model(run)
    return _REFERENCES[key]


async def _submit(app: App, prompt: str, params: GenerationParams) -> ResponseStream:
    return await app.engine.submit(GenerationRequest.from_prompt(prompt, params))


async def _assert_matches_reference(app: App, stream: ResponseStream, text: str) -> None:
    """The streamed answer is exactly the prompt's alone-reference: text, length, reason."""
    prompt = stream.request.messages[-1].content
    n = stream.request.params.max_new_tokens
    expected = await _reference(app, prompt, n)
    tokenizer = await _tokenizer(app)
    assert (text, stream.completion_tokens) == (
        tokenizer.decode(expected, skip_special_tokens=True),
        len(expected),
    ), f"prompt {prompt!r}"
    assert stream.finish_reason == ("length" if len(expected) == n else "stop")


@contextlib.contextmanager
def _recording_steps(engine: LocalEngine) -> Iterator[list[list[Segment]]]:
    """Record the segments of every engine step (to show what a test really batched)."""
    batch = engine._batch
    assert batch is not None
    steps: list[list[Segment]] = []
    original = batch.step

    def step(segments: list[Segment]) -> torch.Tensor:
        steps.append(list(segments))
        return original(segments)

    batch.step = step  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        del batch.step  # the instance attribute goes; the class's method is back


def _decoding_rows(step: list[Segment]) -> int:
    return sum(1 for s in step if len(s.tokens) == 1)


# -- fp32: exact tokens ------------------------------------------------------------------------


async def test_every_row_of_a_full_batch_equals_generate_alone(fp32_app: App) -> None:
    with _recording_steps(_local(fp32_app)) as steps:
        streams = [await _submit(fp32_app, p, greedy()) for p in PROMPTS]
        texts = await asyncio.gather(*(s.text() for s in streams))
    # All eight decoded together at some step, and prompts were read in budgeted chunks.
    assert max(_decoding_rows(step) for step in steps) == len(PROMPTS)
    assert any(len(s.tokens) > 1 and s.start > 0 for step in steps for s in step)
    for stream, text in zip(streams, texts, strict=True):
        await _assert_matches_reference(fp32_app, stream, text)
    assert len({*texts}) == len(PROMPTS)  # no row answered another's prompt


async def test_a_request_arriving_mid_decode_equals_its_reference(fp32_app: App) -> None:
    first = await _submit(fp32_app, STORY, greedy(48))
    for _ in range(3):
        await anext(first)
    second = await _submit(fp32_app, PROMPTS[3], greedy())
    await anext(second)
    assert first.finish_reason is None  # the second joined while the first was decoding
    first_text, second_text = await asyncio.gather(first.text(), second.text())
    assert len(await _reference(fp32_app, STORY, 48)) > 20  # it really was mid-decode
    await _assert_matches_reference(fp32_app, first, first_text)
    await _assert_matches_reference(fp32_app, second, second_text)


async def test_short_and_long_prompts_together_equal_their_references(fp32_app: App) -> None:
    short = "Say hello to Anna."
    with _recording_steps(_local(fp32_app)) as steps:
        quick = await _submit(fp32_app, short, greedy())
        long = await _submit(fp32_app, LONG_PROMPT, greedy())
        quick_text, long_text = await asyncio.gather(quick.text(), long.text())
    assert 250 <= long.prompt_tokens <= 400, long.prompt_tokens
    assert long.prompt_tokens > 3 * PREFILL_BUDGET
    # Some step decoded the short row while a later chunk of the long prompt was read.
    assert any(
        _decoding_rows(step) >= 1 and any(len(s.tokens) > 1 and s.start > 0 for s in step)
        for step in steps
    )
    await _assert_matches_reference(fp32_app, quick, quick_text)
    await _assert_matches_reference(fp32_app, long, long_text)


async def _until_decoding(streams: list[ResponseStream]) -> None:
    """Wait until every stream has its first token: its prompt is read, it decodes."""
    async with asyncio.timeout(120):
        while any(s.completion_tokens == 0 and s.finish_reason is None for s in streams):
            await asyncio.sleep(0.01)


async def test_seeded_sample_is_the_same_alone_and_in_a_batch(fp32_app: App) -> None:
    """A seeded answer draws the same random numbers and decodes through the same arithmetic
    whoever shares its steps, so it is the same text alone and in a batch. Its prompt is read
    in one chunk both times (it arrives when the others already decode, within the prefill
    budget): a prompt read in other chunks rounds differently in fp32's last digits (the dense
    products block by the chunk's length), which can flip a sample."""
    seeded = GenerationParams(max_new_tokens=20, temperature=0.9, seed=1234)
    prompt = PROMPTS[0]
    alone = await _submit(fp32_app, prompt, seeded)
    alone_text = await alone.text()
    assert alone.prompt_tokens <= PREFILL_BUDGET

    def sampled(seed: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=20, temperature=0.9, seed=seed)

    others = [
        (PROMPTS[1], sampled(1)),
        (PROMPTS[2], greedy(20)),
        (prompt, sampled(2)),  # the same prompt, another seed, in the same batch
        (PROMPTS[4], greedy(20)),
    ]
    before = [await _submit(fp32_app, p, params) for p, params in others[:3]]
    await _until_decoding(before)
    batched = await _submit(fp32_app, prompt, seeded)  # not row 0 this time
    after = [await _submit(fp32_app, p, params) for p, params in others[3:]]
    texts = await asyncio.gather(batched.text(), *(s.text() for s in [*before, *after]))
    assert (texts[0], batched.completion_tokens) == (alone_text, alone.completion_tokens)
    assert alone_text.strip()
    for stream, text in zip([*before, *after], texts[1:], strict=True):
        if stream.request.params.temperature == 0:
            await _assert_matches_reference(fp32_app, stream, text)


# -- fp32, two rows: cancel and queueing -------------------------------------------------------


async def test_cancel_frees_the_row_and_the_others_finish_unchanged(two_row_app: App) -> None:
    engine = _local(two_row_app)
    assert engine.capacity is not None and engine.capacity.rows == 2
    assert len(await _reference(two_row_app, STORY, 48)) > 20  # still running at the cancel
    keep = await _submit(two_row_app, STORY, greedy(48))
    doomed = await _submit(two_row_app, PROMPTS[6], greedy(200))
    for _ in range(3):
        await anext(doomed)
    doomed.cancel()
    await doomed.text()
    assert doomed.finish_reason == "cancelled" and doomed.completion_tokens < 200
    assert keep.finish_reason is None
    assert engine._scheduler.free_rows == 1  # the cancelled row is back

    late = await _submit(two_row_app, PROMPTS[5], greedy())
    assert late.queue_position == 0  # the freed row takes it, nothing ahead
    await anext(late)
    assert keep.finish_reason is None  # it ran beside `keep`, in the freed row
    keep_text, late_text = await asyncio.gather(keep.text(), late.text())
    await _assert_matches_reference(two_row_app, keep, keep_text)
    await _assert_matches_reference(two_row_app, late, late_text)
    assert engine._scheduler.free_rows == engine.capacity.rows


async def test_requests_beyond_the_rows_wait_then_complete(two_row_app: App) -> None:
    engine = _local(two_row_app)
    prompts = PROMPTS[:4]
    streams = [await _submit(two_row_app, p, greedy(16)) for p in prompts]
    assert [s.queue_position for s in streams] == [0, 0, 1, 2]
    await anext(streams[0])
    await anext(streams[1])
    # Both rows decode: the other two are still waiting for one.
    assert streams[0].finish_reason is None and streams[1].finish_reason is None
    assert streams[2].queue_position == 1 and streams[3].queue_position == 2
    texts = await asyncio.gather(*(s.text() for s in streams))
    for stream, text in zip(streams, texts, strict=True):
        await _assert_matches_reference(two_row_app, stream, text)
        assert stream.queue_position is None
    assert engine._scheduler.free_rows == 2 and not engine._scheduler.waiting


async def test_an_admitted_request_is_not_reported_done_before_it_starts(
    two_row_app: App,
) -> None:
    """Between taking a row and `started`, a request is starting (0), not done (None)."""
    engine = _local(two_row_app)
    seen = engine._seen
    assert seen is not None
    entered, release = threading.Event(), threading.Event()
    original = seen.reset

    def held(row: int, ids: list[int]) -> None:  # the worker sets the row up here, in _start
        entered.set()
        release.wait(30)
        original(row, ids)

    seen.reset = held  # type: ignore[method-assign]
    try:
        stream = await _submit(two_row_app, PROMPTS[1], greedy(4))
        assert await asyncio.to_thread(entered.wait, 30)
        assert stream.finish_reason is None
        assert stream.queue_position == 0
    finally:
        release.set()
        del seen.reset
    await _assert_matches_reference(two_row_app, stream, await stream.text())
    assert stream.queue_position is None


# -- bf16, the served path: within a tolerance ---------------------------------------------------


async def test_bf16_batched_answers_agree_with_alone(session_app: App) -> None:
    """bf16 sums in another order when rows share a matmul, so a near-tie may flip a token.

    Tolerance: for every prompt the first 6 streamed pieces (one per token for this plain
    text) are identical alone and batched, and at least 5 of the 6 whole answers are identical.
    A batching bug (a row reading another's cache, a wrong position) breaks the first tokens.
    """
    prompts = PROMPTS[:6]
    params = greedy(16)

    async def pieces(stream: ResponseStream) -> list[str]:
        return [piece async for piece in stream]

    alone = [await pieces(await _submit(session_app, p, params)) for p in prompts]
    streams = [await _submit(session_app, p, params) for p in prompts]
    together = await asyncio.gather(*(pieces(s) for s in streams))
    first = [a[:6] == b[:6] for a, b in zip(alone, together, strict=True)]
    whole = [a == b for a, b in zip(alone, together, strict=True)]
    assert all(first), (alone, together)
    assert sum(whole) >= 5, (alone, together)
    assert all(len(a) >= 6 for a in alone), alone


# -- the cache stays bounded ---------------------------------------------------------------------


async def test_the_kv_cache_never_grows_over_100_requests(fp32_app: App) -> None:
    engine = _local(fp32_app)
    batch, capacity = engine._batch, engine.capacity
    assert batch is not None and capacity is not None
    rows = capacity.rows

    def snapshot() -> list[tuple[int, tuple[int, ...], int]]:
        tensors = [*batch.cache.keys, *batch.cache.values]
        return [(t.data_ptr(), tuple(t.shape), t.numel() * t.element_size()) for t in tensors]

    before, nbytes = snapshot(), batch.cache.nbytes
    assert before[0][1] == (rows, before[0][1][1], capacity.context_tokens, before[0][1][3])
    done = 0
    wave = rows + 4  # more than the rows: some wait for a row each wave
    while done < 100:
        count = min(wave, 100 - done)
        streams = [
            await _submit(fp32_app, f"{PROMPTS[i % 8]} ({done + i})", greedy(2 + (done + i) % 3))
            for i in range(count)
        ]
        await asyncio.gather(*(s.text() for s in streams))
        for stream in streams:
            assert stream.finish_reason in ("stop", "length")
            assert stream.completion_tokens <= stream.request.params.max_new_tokens
        done += count
    assert snapshot() == before
    assert batch.cache.nbytes == nbytes == capacity.kv_cache_bytes
    assert engine.capacity == capacity
    assert engine._scheduler.free_rows == rows and not engine._scheduler.running
    # Reused rows (stale keys past each new answer's length) still answer exactly.
    stream = await _submit(fp32_app, PROMPTS[1], greedy())
    await _assert_matches_reference(fp32_app, stream, await stream.text())


# -- units, no model -----------------------------------------------------------------------------


def _sequence(prompt_len: int) -> Sequence:
    _stream, sink = open_stream(GenerationRequest.from_prompt("unused"))
    return Sequence(sink, Prepared(list(range(100, 100 + prompt_len)), 8))


async def test_plan_decodes_first_then_chunks_within_the_budget() -> None:
    scheduler = Scheduler(4)
    a, b, c, d = (_sequence(n) for n in (5, 7, 100, 50))
    scheduler.waiting.extend([a, b, c, d])
    assert scheduler.admit() == [a, b, c, d]
    assert [s.row for s in (a, b, c, d)] == [0, 1, 2, 3]
    for s, token in ((a, 11), (b, 12)):  # a and b have read their prompts
        s.fed, s.next_token = len(s.prompt), token
    scheduler.running = [c, b, d, a]  # running order is arrival order, not row order

    def fed(plan: list[tuple[Sequence, Segment]]) -> None:
        for s, segment in plan:
            s.fed += len(segment.tokens)

    plan = scheduler.plan(64)
    assert [(s, seg.tokens, seg.start, seg.wants_logits) for s, seg in plan[:2]] == [
        (a, [11], 5, True),
        (b, [12], 7, True),
    ]  # every decoding row first, by row
    assert [(s, seg.start, len(seg.tokens), seg.wants_logits) for s, seg in plan[2:]] == [
        (c, 0, 64, False)
    ]  # the budget ends at c's chunk: d waits
    assert plan[2][1].tokens == c.prompt[:64]
    fed(plan)

    for s, token in ((a, 21), (b, 22)):
        s.next_token = token
    plan = scheduler.plan(64)
    assert [(s, seg.start, len(seg.tokens), seg.wants_logits) for s, seg in plan[2:]] == [
        (c, 64, 36, True),  # c's last chunk asks for logits
        (d, 0, 28, False),  # what is left of the budget
    ]
    assert sum(len(seg.tokens) for _, seg in plan[2:]) == 64
    fed(plan)

    # c decodes now too; a budget smaller than any chunk still advances one prompt, only one.
    for s, token in ((a, 31), (b, 32), (c, 33)):
        s.next_token = token
    plan = scheduler.plan(0)
    assert [(s, seg.row, seg.tokens) for s, seg in plan[:3]] == [
        (a, 0, [31]),
        (b, 1, [32]),
        (c, 2, [33]),
    ]
    assert len(plan) == 4 and plan[3][0] is d and plan[3][1].start == 28
    assert len(plan[3][1].tokens) >= 1

    scheduler.retire(b)
    scheduler.retire(a)
    assert scheduler.free_rows == 2
    e = _sequence(3)
    scheduler.waiting.append(e)
    assert scheduler.admit() == [e] and e.row == 0  # the lowest free row


MIXED_TEXT = (
    "Café déjà vu — naïve résumé! 🙂🚀👩‍💻 Ünïcödé test.\n"
    "日本語のテキストと中文文本，한국어 문장도 있습니다。\n"
    "Русский текст, ελληνικά, עברית ו-العربية: مرحبا بالعالم.\n"
    "def f(x):\n    return x ** 2  # 🐍 tabs\tand  double  spaces\n"
    "Emoji flags 🇫🇷🇯🇵, skin tones 👍🏽, family 👨‍👩‍👧‍👦, math ∑∫√∞ ≠ ≤ ≥, "
    "symbols €£¥ ©®™ and a last line without newline 🎉"
)


def test_incremental_detokenizer_pieces_join_to_decode(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    ids = tokenizer(MIXED_TEXT * 3, add_special_tokens=False).input_ids
    ids = [*ids[:40], tokenizer.eos_token_id, *ids[40:]]  # a special token is skipped too
    assert len(ids) > 300
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # no character split across pieces
    assert sum(1 for p in pieces if p) > len(ids) // 2  # it streams, not one piece at the end
