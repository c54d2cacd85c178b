"""Many LoRA adapters served in the same batches, on the real embedded GPTQ model (CPU, fp32).

The adapters here have random, non-zero B (a fresh PEFT adapter equals the base model and would
let a broken per-row LoRA pass), so the first test shows that each changes the answer. Then, in
fp32, every answer must be exactly the answer its adapter gives alone, whatever shares the
batch: other adapters, the base model, requests arriving mid-decode, more adapters than slots,
and a new version loaded while requests stream.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.adapters import BaseShapes
from core.app import App, build
from core.errors import AdapterError
from core.model.engine import LocalEngine
from core.model.requests import AdapterRef, GenerationParams, GenerationRequest, ResponseStream
from tests.adapter_kit import write_adapter
from tests.conftest import make_settings

PROMPTS = [
    "Give me a short quote about courage.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Tell me a joke about computers.",
]
TOKENS = 16
STRENGTH = 0.05
SLOTS = 2


def greedy(n: int = TOKENS) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[App]:
    settings = make_settings(
        tmp_path_factory.mktemp("lora-serving"),
        dtype="float32",
        batch_rows=8,
        max_context_tokens=384,
        queue_size=32,
        adapter_slots=SLOTS,
        adapter_cache_size=2,
    )
    application = build(settings)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(application.start())
    yield application
    loop.run_until_complete(application.close())
    loop.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    """Four adapters for the served model (more than the engine's slots)."""
    root = tmp_path_factory.mktemp("lora-folders")
    shapes = BaseShapes.of_model(embedded_model_dir)
    return {
        name: write_adapter(root / name, shapes, seed=seed, strength=STRENGTH)
        for seed, name in enumerate(("a", "b", "c", "d"), start=1)
    }


def _engine(app: App) -> LocalEngine:
    assert isinstance(app.engine, LocalEngine)
    return app.engine


async def _loaded(app: App, folders: dict[str, Path], *names: str) -> list[AdapterRef]:
    refs = []
    for name in names:
        ref = AdapterRef(name, "v1")
        await app.engine.load_adapter(ref, folders[name])
        refs.append(ref)
    return refs


async def _submit(app: App, prompt: str, ref: AdapterRef | None, n: int = TOKENS) -> ResponseStream:
    return await app.engine.submit(GenerationRequest.from_prompt(prompt, greedy(n), ref))


async def _alone(app: App, prompt: str, ref: AdapterRef | None, n: int = TOKENS) -> str:
    return await (await _submit(app, prompt, ref, n)).text()


async def test_each_adapter_changes_the_answer(app: App, folders: dict[str, Path]) -> None:
    a, b = await _loaded(app, folders, "a", "b")
    base, with_a, with_b = [[await _alone(app, p, ref) for p in PROMPTS] for ref in (None, a, b)]
    assert all(base) and all(with_a) and all(with_b)
    # Over the prompts, each adapter answers unlike the base model and unlike the other.
    assert with_a != base and with_b != base and with_a != with_b, (base, with_a, with_b)


async def test_a_mixed_batch_answers_each_row_as_alone(app: App, folders: dict[str, Path]) -> None:
    a, b = await _loaded(app, folders, "a", "b")
    cases = [(p, ref) for p in PROMPTS[:3] for ref in (None, a, b)]
    alone = [await _alone(app, p, ref) for p, ref in cases]
    streams = [await _submit(app, p, ref) for p, ref in cases]  # 9 requests, 8 rows: one waits
    together = await asyncio.gather(*(s.text() for s in streams))
    assert together == alone
    assert [s.adapter for s in streams] == [ref for _, ref in cases]


async def test_requests_joining_mid_decode_match_alone(app: App, folders: dict[str, Path]) -> None:
    a, b = await _loaded(app, folders, "a", "b")
    long_alone = await _alone(app, PROMPTS[2], a, 40)
    joiners = [(PROMPTS[0], b), (PROMPTS[3], None), (PROMPTS[1], a)]
    joiners_alone = [await _alone(app, p, ref) for p, ref in joiners]
    first = await _submit(app, PROMPTS[2], a, 40)
    pieces = []
    async for piece in first:  # a few tokens in, the others arrive
        pieces.append(piece)
        if len(pieces) == 4:
            break
    later = [await _submit(app, p, ref) for p, ref in joiners]
    assert await first.text() == long_alone  # text() includes the pieces already read
    assert [await s.text() for s in later] == joiners_alone


async def test_more_adapters_than_slots_all_answer_right(
    app: App, folders: dict[str, Path]
) -> None:
    refs = await _loaded(app, folders, "a", "b", "c", "d")
    assert len(refs) > SLOTS
    alone = [await _alone(app, PROMPTS[0], ref) for ref in refs]
    assert len(set(alone)) == len(refs)  # four different adapters
    streams = [await _submit(app, PROMPTS[0], ref) for ref in (*refs, None, *refs)]
    texts = await asyncio.gather(*(s.text() for s in streams))
    assert texts[:4] == alone and texts[5:] == alone
    statuses = app.engine.adapters()
    assert sum(s.slot is not None for s in statuses) <= SLOTS
    assert {s.ref for s in statuses} >= set(refs)


async def test_unknown_adapter_is_refused_before_it_queues(app: App) -> None:
    with pytest.raises(AdapterError, match="ghost@v1 is not loaded"):
        await _submit(app, PROMPTS[0], AdapterRef("ghost", "v1"))


async def test_bad_adapters_are_refused_and_the_old_one_keeps_answering(
    app: App, folders: dict[str, Path], tmp_path: Path
) -> None:
    (a,) = await _loaded(app, folders, "a")
    before = await _alone(app, PROMPTS[1], a)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["b"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    # NaN values in an intact file: found on the device after the copy into a free slot.
    not_finite = tmp_path / "nan"
    shutil.copytree(folders["b"], not_finite)
    data = bytearray((not_finite / "adapter_model.safetensors").read_bytes())
    data[-4096:] = b"\xff" * 4096  # all-ones bytes are NaN as fp32
    (not_finite / "adapter_model.safetensors").write_bytes(bytes(data))
    other = BaseShapes(
        "llama", 30, {t: (640, 640) for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
    )
    mismatched = write_adapter(tmp_path / "other", other, seed=9)
    too_big = write_adapter(
        tmp_path / "big", BaseShapes.of_model(Path(app.engine.info.path)), seed=9, rank=32
    )
    for folder, why in (
        (corrupt, "corrupt"),
        (not_finite, "not finite"),
        (mismatched, "does not fit the served model"),
        (too_big, "rank is 32, above"),
        (tmp_path / "missing", "no adapter_config.json"),
    ):
        with pytest.raises(AdapterError, match=why):
            await app.engine.load_adapter(AdapterRef("a", "v2"), folder)
    assert AdapterRef("a", "v2") not in {s.ref for s in app.engine.adapters()}
    assert await _alone(app, PROMPTS[1], a) == before
    # The slot the NaN adapter was copied into was given back.
    assert not _engine(app)._filling
    assert (await app.engine.load_adapter(AdapterRef("b", "v1"), folders["b"])).slot is not None


async def test_a_hot_load_mid_stream_loses_nothing_and_mixes_no_versions(
    app: App, folders: dict[str, Path]
) -> None:
    v1 = AdapterRef("hot", "v1")
    v2 = AdapterRef("hot", "v2")
    await app.engine.load_adapter(v1, folders["c"])
    expected = {v1: await _alone(app, PROMPTS[3], v1, 12)}
    streams: list[ResponseStream] = []
    current = v1
    load: asyncio.Task[object] | None = None
    for i in range(12):
        streams.append(await _submit(app, PROMPTS[3], current, 12))
        if i == 4:  # load v2 while six requests are decoding, then send the rest to it
            load = asyncio.create_task(app.engine.load_adapter(v2, folders["d"]))
        if load is not None and load.done():
            current = v2
        await asyncio.sleep(0.05)
    assert load is not None
    await load
    streams.append(await _submit(app, PROMPTS[3], v2, 12))
    await app.engine.unload_adapter(v1)  # v1's requests still finish on v1
    texts = await asyncio.gather(*(s.text() for s in streams))
    expected[v2] = await _alone(app, PROMPTS[3], v2, 12)
    assert expected[v1] != expected[v2]
    assert all(s.finish_reason in ("stop", "length") for s in streams)
    for stream, text in zip(streams, texts, strict=True):
        assert stream.adapter is not None
        assert text == expected[stream.adapter]
    assert {s.adapter for s in streams} == {v1, v2}
    with pytest.raises(AdapterError):  # unloaded: no new request takes it
        await _submit(app, PROMPTS[3], v1)
    await asyncio.sleep(0.2)
    assert v1 not in {s.ref for s in app.engine.adapters()}
