"""The fast decode step (`core.model.fast`) against the plain one, on the real embedded model.

In fp32 the two paths must choose the same greedy tokens, step after step, for one row, for
rows decoding together in and out of order, and with adapters mixed in the batch. On the served
bf16 path they round differently (one fused norm, another attention kernel), so there the
measure is teacher-forced: fed the same tokens, the two paths pick the same next token at
(nearly) every position. And the fast path must really be what serving runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.adapters import BaseShapes, inspect_adapter
from core.model import q4_cpu
from core.model.batch import BatchModel
from core.model.kernels import choose_runtime, cpu_flags, cpu_supports_bf16
from core.model.loader import load_for_serving
from core.model.lora import read_weights
from core.model.scheduler import Segment
from tests.adapter_kit import write_adapter
from tests.conftest import CACHE_DIR

# Where the engine builds the C++ step (the cache dir's `compiled/`): the tests load that build
# rather than compiling a second one (~40 s on 2 cores).
COMPILED = CACHE_DIR / "compiled"


def _has_vnni() -> bool:
    return "avx512_vnni" in cpu_flags()


def _has_avx2() -> bool:
    return q4_cpu.cpu_runs_it()  # what the fp32 C++ step is built with


# What the served bf16 CPU step is on this machine: the C++ step, with the VNNI LM head where
# the CPU has AVX512-VNNI (every AVX512-BF16 CPU so far does).
EXPECTED_NATIVE = "avx512, native" + (", VNNI head" if _has_vnni() else "")
# What the fp32 CPU step is: the dense layers' codes through the C++ step's AVX2 products (its
# LM head VNNI's where the build has it), on any CPU with AVX2.
EXPECTED_FP32 = (
    "dense, native" + (", VNNI head" if _has_vnni() else ", int8 head") if _has_avx2() else "dense"
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
STEPS = 12


@pytest.fixture(scope="module")
def loaded(embedded_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer, _ = load_for_serving(
        embedded_model_dir, choose_runtime("cpu", "float32", "auto")
    )
    yield model, tokenizer


@pytest.fixture(scope="module")
def batch(
    loaded: tuple[Any, Any], embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> BatchModel:
    batch = BatchModel(loaded[0], 4, 256, adapter_slots=2, adapter_max_rank=8, build_dir=COMPILED)
    shapes = BaseShapes.of_model(embedded_model_dir)
    root = tmp_path_factory.mktemp("fast-adapters")
    assert batch.lora is not None
    for slot in (1, 2):  # slot 2 holds rank 4 in the slots' 8 rows: the C++ step reads 4
        rank = 8 // slot
        folder = write_adapter(
            root / str(slot), shapes, seed=slot, rank=rank, alpha=4.0 * rank, strength=0.15
        )
        batch.lora.load(slot, read_weights(inspect_adapter(folder, shapes, 8)))
    assert batch.lora.ranks == [0, 8, 4]
    return batch


def _ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _greedy(
    batch: BatchModel,
    prompts: list[list[int]],
    rows: list[int],
    slots: list[int],
    fast: bool,
    decode_slots: list[int] | None = None,
) -> list[list[int]]:
    """Each prompt prefilled on its row (plain path), then STEPS greedy steps of all rows
    together, through `step` (fast) or `plain_step`, on `decode_slots` (default `slots`)."""
    tokens = []
    for ids, row, slot in zip(prompts, rows, slots, strict=True):
        logits = batch.plain_step([Segment(row, 0, ids, True, slot)])
        tokens.append([int(logits[0].argmax())])
    for i in range(STEPS):
        segments = [
            Segment(row, len(ids) + i, [out[-1]], True, slot)
            for ids, row, slot, out in zip(
                prompts, rows, decode_slots or slots, tokens, strict=True
            )
        ]
        logits = batch.step(segments) if fast else batch.plain_step(segments)
        for out, row_logits in zip(tokens, logits, strict=True):
            out.append(int(row_logits.argmax()))
    return tokens


@pytest.mark.parametrize(
    ("rows", "slots"),
    [
        ([0], [0]),  # one row: the slice-copy path
        ([2], [1]),  # one row, not the first, on an adapter
        ([0, 1, 2], [0, 0, 0]),  # rows packed from 0: the cache read as views
        ([3, 1], [0, 0]),  # out of order: the rows gathered
        ([0, 1, 2], [0, 1, 2]),  # base and two adapters in one step
        ([1, 2, 3], [2, 2, 2]),  # one adapter for every row
    ],
)
def test_fast_and_plain_paths_choose_the_same_greedy_tokens_in_fp32(
    batch: BatchModel, loaded: tuple[Any, Any], rows: list[int], slots: list[int]
) -> None:
    tokenizer = loaded[1]
    prompts = [_ids(tokenizer, text) for text in PROMPTS[: len(rows)]]
    before = batch.paths["fast"]
    plain = _greedy(batch, prompts, rows, slots, fast=False)
    fast = _greedy(batch, prompts, rows, slots, fast=True)
    assert batch.paths["fast"] - before == STEPS  # every decode step took the fast path
    assert fast == plain
    if any(slots):  # the adapters change the decoded tokens: the fast path had to apply them
        assert _greedy(batch, prompts, rows, slots, True, decode_slots=[0] * len(rows)) != fast


def test_projections_are_fused_over_shared_memory(batch: BatchModel) -> None:
    assert batch.fast is not None
    assert batch.decode_path == f"fast ({EXPECTED_FP32})"  # the C++ step, where it is built
    layer = batch.layers[0]
    fused = batch.fast.layers[0].qkv
    assert fused.kind == "dense" and fused.modules == [
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
    ]
    storage = {m.weight.untyped_storage().data_ptr() for m in fused.modules}
    assert len(storage) == 1  # the modules' weights are views of the fused weight: held once
    x = torch.randn(2, layer.self_attn.q_proj.in_features)
    expected = torch.cat([m(x) for m in fused.modules], dim=-1)
    assert torch.allclose(fused(x), expected, atol=1e-5)


def test_prompt_chunks_take_the_plain_path_and_decoding_rows_the_fast_one(
    batch: BatchModel,
) -> None:
    """A step that reads a prompt chunk beside decoding rows runs the chunk through the plain
    path and the rows through the fast one, each row's logits in the segments' order: the same
    logits as each part alone."""
    before = dict(batch.paths)
    batch.step([Segment(0, 0, [1, 2, 3], True)])  # a prompt chunk
    batch.step([Segment(0, 4, [5], False)])  # no logits wanted
    assert batch.paths["plain"] - before.get("plain", 0) == 2
    assert batch.paths["fast"] == before.get("fast", 0)
    batch.step([Segment(1, 0, [1, 2, 6], True), Segment(2, 0, [1, 2], False)])
    decode, ends = Segment(1, 3, [4], True), Segment(2, 2, [6, 7], True)
    chunks = [Segment(3, 0, [1], False), ends]
    expected = torch.cat([batch.step([decode]), batch.plain_step(chunks)])
    before = dict(batch.paths)
    mixed = batch.step([decode, *chunks])  # decode + two chunks
    assert batch.paths["plain"] - before["plain"] == 1 and batch.paths["fast"] - before["fast"] == 1
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize(("rows", "slots"), [([0], [0]), ([1], [2]), ([2, 0, 3], [1, 0, 2])])
def test_the_fp32_cpp_step_stays_within_its_rounding_of_the_plain_path(
    request: pytest.FixtureRequest, loaded: tuple[Any, Any], rows: list[int], slots: list[int]
) -> None:
    """Logit by logit, teacher-forced on the plain path's greedy tokens: the fp32 C++ step (its
    int16 activations, its own adapter terms) stays within 2e-3 of the logits' range of the
    plain path over 16 steps, rows together on different adapters, and each adapter moves the
    logits more than 10x that."""
    batch = _native_batch(request, "batch")
    prompts = [_ids(loaded[1], text) for text in PROMPTS[: len(rows)]]

    def forced(fast: bool, decode_slots: list[int], answers: list[list[int]]) -> torch.Tensor:
        first = [
            batch.plain_step([Segment(row, 0, ids, True, slot)])[0]
            for ids, row, slot in zip(prompts, rows, slots, strict=True)
        ]
        picks = [torch.stack(first)]
        for i in range(16):
            segments = [
                Segment(row, len(ids) + i, [answer[i]], True, slot)
                for ids, row, answer, slot in zip(prompts, rows, answers, decode_slots, strict=True)
            ]
            picks.append(batch.step(segments) if fast else batch.plain_step(segments))
        return torch.stack(picks).float()  # [steps, rows, vocab]

    answers = [[] for _ in rows]
    for ids, row, slot, answer in zip(prompts, rows, slots, answers, strict=True):
        logits = batch.plain_step([Segment(row, 0, ids, True, slot)])
        for i in range(16):
            answer.append(int(logits[0].argmax()))
            segment = Segment(row, len(ids) + i, [answer[-1]], True, slot)
            logits = batch.plain_step([segment])
    plain = forced(False, slots, answers)
    before = batch.paths["fast"]
    fast = forced(True, slots, answers)
    assert batch.paths["fast"] - before == 16
    error = float((fast - plain).abs().max())
    scale = float(plain.abs().max())
    print(f"rows {rows} slots {slots}: max |fast - plain| {error:.4f} of {scale:.1f}")
    assert error <= 2e-3 * scale, (error, scale)
    if any(slots):
        without = forced(True, [0] * len(rows), answers)
        assert float((without - plain).abs().max()) > 10 * error


def test_fast_decode_off_runs_the_plain_path(loaded: tuple[Any, Any]) -> None:
    plain = BatchModel(loaded[0], 1, 64, fast=False)
    assert plain.fast is None and plain.decode_path == "plain"
    plain.step([Segment(0, 0, [1, 2], True)])
    plain.step([Segment(0, 2, [3], True)])
    assert plain.paths == {"plain": 2}


async def test_the_engine_serves_through_the_fast_path(session_app: Any) -> None:
    """What the bot runs: the default settings decode through the fused step."""
    from core.model.requests import GenerationParams, GenerationRequest

    engine = session_app.engine
    info = await engine.start()
    assert info.decode_path.startswith("fast (")
    # The served CPU path runs the C++ step, built in cache_dir: on a bf16 CPU in bf16, on any
    # other CPU with AVX2 in fp32.
    if cpu_supports_bf16() or _has_avx2():
        expected = EXPECTED_NATIVE if cpu_supports_bf16() else EXPECTED_FP32
        assert info.decode_path == f"fast ({expected})"
        built = session_app.settings.cache_dir / "compiled"
        assert any(p.suffix == ".so" for p in built.rglob("*")), list(built.rglob("*"))
    batch = engine._batch
    before = batch.paths["fast"]
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    stream = await engine.submit(GenerationRequest.from_prompt("Say hello.", params))
    await stream.text()
    assert batch.paths["fast"] - before >= stream.completion_tokens - 1


@pytest.fixture(scope="module")
def served_model(embedded_model_dir: Path) -> Any:
    """The model loaded as a bf16 CPU serves it."""
    if not cpu_supports_bf16():
        pytest.skip("the served bf16 path needs a bf16 CPU")
    model, _, _ = load_for_serving(embedded_model_dir, choose_runtime("cpu", "bfloat16", "auto"))
    return model


@pytest.fixture(scope="module")
def served(
    served_model: Any, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> BatchModel:
    """The served model's batch (the C++ decode step when this CPU takes it), two adapters in
    its slots."""
    batch = BatchModel(
        served_model, 4, 256, adapter_slots=2, adapter_max_rank=8, build_dir=COMPILED
    )
    shapes = BaseShapes.of_model(embedded_model_dir)
    root = tmp_path_factory.mktemp("served-adapters")
    assert batch.lora is not None
    for slot in (1, 2):  # the same adapters as the fp32 `batch` fixture's
        rank = 8 // slot
        folder = write_adapter(
            root / str(slot), shapes, seed=slot, rank=rank, alpha=4.0 * rank, strength=0.15
        )
        batch.lora.load(slot, read_weights(inspect_adapter(folder, shapes, 8)))
    return batch


@pytest.mark.parametrize(
    ("rows", "slots"), [([0], [0]), ([2, 0, 3], [0, 0, 0]), ([1], [2]), ([2, 0, 3], [1, 0, 2])]
)
def test_served_bf16_fast_path_is_as_close_to_fp32_as_the_plain_path(
    served: BatchModel,
    batch: BatchModel,
    loaded: tuple[Any, Any],
    rows: list[int],
    slots: list[int],
) -> None:
    """The served bf16 step (C++ on this CPU) rounds differently from the plain bf16 path, so
    near-tied tokens may flip between them; what must hold is that it is as faithful. Fed the
    same tokens (the fp32 model's greedy answers, teacher-forced), with the same adapters: its
    logits stay as close to fp32's as the plain bf16 path's (mean max-difference within 1.5x),
    its top-1 agreement with fp32 where fp32 decides within 5 points of the plain path's, and
    rows decoding together (out of order, on different adapters) each read their own cache and
    adapter."""
    tokenizer = loaded[1]
    assert served.fast is not None and served.fast.kind == EXPECTED_NATIVE
    prompts = [_ids(tokenizer, text) for text in PROMPTS[: len(rows)]]
    answers = []
    for ids, row, slot in zip(prompts, rows, slots, strict=True):  # fp32 greedy answers
        logits = batch.plain_step([Segment(row, 0, ids, True, slot)])
        answer = [int(logits[0].argmax())]
        for i in range(23):
            logits = batch.plain_step([Segment(row, len(ids) + i, [answer[-1]], True, slot)])
            answer.append(int(logits[0].argmax()))
        answers.append(answer)

    def forced(model: BatchModel, fast: bool, decode_slots: list[int]) -> torch.Tensor:
        for ids, row, slot in zip(prompts, rows, slots, strict=True):
            model.plain_step([Segment(row, 0, ids, True, slot)])
        picks = []
        for i in range(23):
            segments = [
                Segment(row, len(ids) + i, [answer[i]], True, slot)
                for ids, row, answer, slot in zip(prompts, rows, answers, decode_slots, strict=True)
            ]
            step = model.step(segments) if fast else model.plain_step(segments)
            picks.append(step.float())
        return torch.stack(picks)  # [steps, rows, vocab]

    reference = forced(batch, False, slots)  # fp32
    before = served.paths["fast"]
    plain, got = forced(served, False, slots), forced(served, True, slots)
    assert served.paths["fast"] - before == 23

    def error(x: torch.Tensor) -> float:
        return float((x - reference).abs().amax(-1).mean())

    # Tokens fp32 itself barely prefers (its top two within half a logit; the random adapters
    # make many) flip with any rounding, the plain path's as well: measured on 3 rows x 23
    # steps, every disagreement of either path was one of them. Agreement is counted where
    # fp32 decides.
    top2 = reference.topk(2, dim=-1).values
    decided = top2[..., 0] - top2[..., 1] > 0.5

    def agreement(x: torch.Tensor) -> float:
        return float((x.argmax(-1) == reference.argmax(-1))[decided].float().mean())

    print(
        f"rows {rows} slots {slots}: error plain {error(plain):.3f} served {error(got):.3f}, "
        f"agreement plain {agreement(plain):.3f} served {agreement(got):.3f}"
    )
    assert error(got) <= 1.5 * error(plain), (error(got), error(plain))
    assert int(decided.sum()) >= decided.numel() // 3
    assert agreement(got) >= agreement(plain) - 0.05, (agreement(got), agreement(plain))
    if any(slots):  # the adapters move the served step's logits far more than rounding does
        without = forced(served, True, [0] * len(rows))
        assert error(without) > 3 * error(got), (error(without), error(got))


def test_cuda_auto_prefers_a_capturable_kernel_for_symmetric_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The committed table (core/model/kernels.py): loracord's Triton kernels (through `torch`)
    first for the checkpoints they take (`AUTO_PREFERS_TRITON`), then Marlin where it
    can serve (CUDA graphs capture it), ExLlamaV2 first for asymmetric checkpoints, which Marlin
    refuses; an explicit kernel is kept as set."""
    from core.model import kernels
    from core.model.kernels import Runtime
    from core.model.loader import _kernels_for

    auto = Runtime("cuda", torch.float16, "exllama_v2", ("marlin", "auto"))
    g128 = {"bits": 4, "group_size": 128, "desc_act": False}
    assert kernels.AUTO_PREFERS_TRITON  # (tests/gpu passed through them)
    assert _kernels_for(auto, {"sym": True, **g128}) == ("torch", "marlin", "exllama_v2", "auto")
    assert _kernels_for(auto, {"sym": False, **g128}) == ("torch", "exllama_v2", "marlin", "auto")
    monkeypatch.setattr(kernels, "AUTO_PREFERS_TRITON", False)
    assert _kernels_for(auto, {"sym": True, **g128}) == ("marlin", "exllama_v2", "auto")
    monkeypatch.setattr(kernels, "AUTO_PREFERS_TRITON", True)
    # act-order, 3 bits, groups the Triton kernels do not take: the CUDA kernels as before
    for other in ({"desc_act": True}, {"bits": 3}, {"group_size": 96}, {"group_size": -1}):
        quant = {"sym": True, **g128, **other}
        assert _kernels_for(auto, quant) == ("marlin", "exllama_v2", "auto"), other
    assert _kernels_for(auto, {"sym": False, **g128, "desc_act": True})[0] == "exllama_v2"
    chosen = Runtime("cuda", torch.float16, "exllama_v2")
    assert _kernels_for(chosen, {"sym": True}) == ("exllama_v2",)
    cpu = Runtime("cpu", torch.float32, "torch_fused")
    assert _kernels_for(cpu, {"sym": False}) == ("torch",)


def test_auto_on_cuda_loads_the_next_kernel_when_the_triton_kernels_would_not_serve(
    monkeypatch: pytest.MonkeyPatch, embedded_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` on CUDA loads the `torch` kernel first, for loracord's Triton kernels. When they
    would not serve every layer (a layer with a bias, a kernel that fails its check on the GPU;
    here: a CPU, where they do not run) the loader goes on to the next kernel of the order,
    with one warning, instead of leaving the model on GPTQModel's generic kernel. The CUDA
    runtime only names the order; every load here is made on the CPU."""
    import logging

    from core.model import fast, loader
    from core.model.kernels import Runtime

    calls: list[str] = []
    real = loader._load_with_kernel

    def load(path: Path, runtime: Runtime, kernel: str, bits: int) -> Any:
        calls.append(kernel)
        return real(path, Runtime("cpu", torch.float32, "torch"), "torch", bits)

    monkeypatch.setattr(loader, "_load_with_kernel", load)
    auto = Runtime("cuda", torch.float16, "exllama_v2", ("marlin", "auto"))
    with caplog.at_level(logging.WARNING, logger="core.model.loader"):
        load_for_serving(embedded_model_dir, auto)
    assert calls == ["torch", "exllama_v2"]  # (the embedded model is asymmetric)
    warned = [r.getMessage() for r in caplog.records]
    assert any(
        "kernel torch cannot serve" in m
        and "loracord's Triton kernels would not serve it: they do not take TorchLinear" in m
        and "trying exllama_v2" in m
        for m in warned
    ), warned
    # kernels that would serve every layer keep the `torch` kernel; a kernel set by hand is
    # kept whatever serves it
    calls.clear()
    monkeypatch.setattr(fast, "triton_refusal", lambda layers: None)
    load_for_serving(embedded_model_dir, auto)
    assert calls == ["torch"]
    calls.clear()
    monkeypatch.setattr(fast, "triton_refusal", lambda layers: "refused")
    load_for_serving(embedded_model_dir, Runtime("cuda", torch.float16, "torch"))
    assert calls == ["torch"]


def test_a_build_lock_left_by_a_killed_process_does_not_stall_the_next_load(
    served: BatchModel, served_model: Any
) -> None:
    """A killed build leaves its `lock` file behind; the next load must not wait on it (torch's
    builder holds an OS lock on the file, not the file's existence, as its older versions did:
    this holds loracord to that)."""
    import threading

    from core.model.fast import native_build_folder

    stale = native_build_folder(COMPILED) / "lock"
    stale.write_text("", encoding="utf-8")
    assert served.fast is not None and served.fast.native is not None  # built already
    result: list[BatchModel] = []
    loader = threading.Thread(
        target=lambda: result.append(BatchModel(served_model, 1, 64, build_dir=COMPILED)),
        daemon=True,
    )
    loader.start()
    loader.join(timeout=300)
    assert not loader.is_alive(), "the load waited on a stale build lock"
    assert result[0].fast is not None and result[0].fast.kind == EXPECTED_NATIVE


def _native_batch(request: pytest.FixtureRequest, name: str) -> BatchModel:
    """The fixture `name`'s batch, skipped where its C++ step is not built on this CPU."""
    if name == "served" and not (cpu_supports_bf16() and _has_vnni()):
        pytest.skip("the bf16 C++ step needs AVX512-BF16 and VNNI")
    if name == "batch" and not _has_avx2():
        pytest.skip("the fp32 C++ step needs AVX2, FMA and F16C")
    batch = request.getfixturevalue(name)
    assert batch.fast is not None and batch.fast.native is not None  # not silently off
    return batch


def _decode_layers(
    batch: BatchModel,
    hidden: torch.Tensor,
    row: int,
    position: int,
    rotation: int,
    offsets: list[torch.Tensor] | None = None,
    norms: list[torch.Tensor] | None = None,
    slots: list[int] | None = None,
    ranks: list[int] | None = None,
) -> Any:
    """The C++ step's layers for one token on `row` at `position`, rotated as position
    `rotation`, with the batch's own arguments unless given."""
    fast = batch.fast
    assert fast is not None and fast.native is not None and batch.lora is not None
    native = fast.native
    return native.module.decode_layers(
        hidden,
        native.norms if norms is None else norms,
        native.matrices,
        native.offsets if offsets is None else offsets,
        batch.cache.keys,
        batch.cache.values,
        fast.cos[rotation : rotation + 1],
        fast.sin[rotation : rotation + 1],
        [row],
        [position],
        fast.heads,
        fast.kv_heads,
        fast.head_dim,
        native.eps,
        native.group,
        native.lora_a,
        native.lora_b,
        slots or [],
        batch.lora.ranks if ranks is None else ranks,
    )


@pytest.mark.parametrize("name", ["batch", "served"])
def test_the_cpp_step_refuses_a_row_or_position_outside_the_cache(
    request: pytest.FixtureRequest, name: str
) -> None:
    """The C++ loops index the cache, the norms and the 4-bit products' offsets without checks:
    a bad row or position, norms or offsets of the wrong number, shape or type, a slot out of
    range, or adapter ranks of the wrong number or above the slots' rows, are refused first,
    for the bf16 and the fp32 step alike."""
    served = _native_batch(request, name)
    fast = served.fast
    assert fast is not None and fast.native is not None
    native = fast.native
    hidden = served.embed(torch.tensor([1]))
    assert len(native.offsets) == len(native.matrices) == 4 * len(served.layers)

    def call(
        row: int,
        position: int,
        offsets: list[torch.Tensor] | None = None,
        norms: list[torch.Tensor] | None = None,
        slots: list[int] | None = None,
        ranks: list[int] | None = None,
    ) -> Any:
        return _decode_layers(served, hidden, row, position, 0, offsets, norms, slots, ranks)

    for row, position in ((0, served.cache.context), (served.cache.rows, 0), (-1, 0)):
        with pytest.raises(RuntimeError, match="outside the cache"):
            call(row, position)
    with pytest.raises(RuntimeError, match="offsets of qkv, o, gate_up, down per layer"):
        call(0, 0, native.offsets[:-1])
    with pytest.raises(RuntimeError, match=r"fp16 scales and offsets \[groups, 2 out\]"):
        call(0, 0, [native.offsets[0][:, :-32].contiguous(), *native.offsets[1:]])
    with pytest.raises(RuntimeError, match=r"fp16 scales and offsets \[groups, 2 out\]"):
        call(0, 0, [native.offsets[0].float(), *native.offsets[1:]])
    with pytest.raises(RuntimeError, match="norms per layer"):
        call(0, 0, norms=native.norms[:-1])
    other = torch.float32 if hidden.dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="norm weights"):
        call(0, 0, norms=[native.norms[0].to(other), *native.norms[1:]])
    with pytest.raises(RuntimeError, match="slot out of range"):
        call(0, 0, slots=[3])
    with pytest.raises(RuntimeError, match="a rank per LoRA slot"):
        call(0, 0, slots=[1], ranks=[0, 8])
    with pytest.raises(RuntimeError, match="rank above its rows"):
        call(0, 0, slots=[1], ranks=[0, 9, 4])
    assert call(0, 0).shape == hidden.shape


@pytest.mark.parametrize("name", ["batch", "served"])
def test_the_cpp_step_reads_only_a_slots_own_rank(
    request: pytest.FixtureRequest, name: str
) -> None:
    """Slot 2 holds a rank-4 adapter in rank-8 slots: the C++ step reads its 4 rows and gives
    exactly what all 8 (the last 4 zero) give, and the adapter changes the step."""
    served = _native_batch(request, name)
    assert served.lora is not None and served.lora.ranks == [0, 8, 4]
    hidden = served.embed(torch.tensor([7]))

    def layers(slots: list[int], ranks: list[int]) -> torch.Tensor:
        return _decode_layers(served, hidden, 1, 3, 3, slots=slots, ranks=ranks)

    own = layers([2], [0, 8, 4])
    assert torch.equal(own, layers([2], [0, 8, 8]))
    assert not torch.equal(own, layers([], []))


def _q4_layer(out: int, inputs: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    """A random 4-bit matrix in GPTQModel's AVX512 layout (`pack_hf_int4`), with scales, zero
    points and zero-point residuals as the scales and offsets `linear_q4` takes (fp16, 16
    scales then 16 offsets per group and 16 outputs), and the exact fp32 weight."""
    from gptqmodel.nn_modules.qlinear.torch_cpu_avx512 import pack_hf_int4

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inputs), generator=g, dtype=torch.uint8)
    groups = inputs // group
    scales = (torch.rand(groups, out, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (groups, out), generator=g)
    residual = (torch.rand(groups, out, generator=g) - 0.5) * scales.float()
    offsets = (residual - scales.float() * zeros).half()
    index = torch.arange(inputs) // group
    weight = codes.float() * scales.float()[index].T + offsets.float()[index].T
    pair = torch.stack((scales.view(groups, -1, 16), offsets.view(groups, -1, 16)), 2)
    return {
        "qweight": pack_hf_int4(codes),
        "scale_offsets": pair.reshape(groups, 2 * out).contiguous(),
        "weight": weight,
    }


@pytest.mark.parametrize(
    ("out", "inputs", "group"), [(96, 576, 32), (64, 1536, 512), (32, 256, 128)]
)
def test_the_cpp_4bit_product_is_closer_to_the_exact_one_than_bf16(
    served: BatchModel, out: int, inputs: int, group: int
) -> None:
    """`linear_q4` (int16 activations x 4-bit codes, VNNI integer sums, the offset per group)
    against the exact fp32 product of the same weights, for 1 to 6 rows (every register
    blocking: two blocks of one row, four, two and one rows), an odd number of output blocks,
    and a group longer than its int32 sums (512): within the bf16 rounding of its output, as
    close as the same product computed in bf16 would be at best. Bad inputs are refused."""
    if not _has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    fast = served.fast
    assert fast is not None and fast.native is not None
    module = fast.native.module
    layer = _q4_layer(out, inputs, group, seed=out + inputs)
    torch.manual_seed(0)
    for rows in range(1, 7):
        x = (torch.randn(rows, inputs) * torch.rand(rows, 1) * 4).to(torch.bfloat16)
        exact = x.float() @ layer["weight"].T
        got = module.linear_q4(x, layer["qweight"], layer["scale_offsets"], group)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
        bf16_step = exact.abs().clamp_min(1e-3) * 2**-8  # bf16's spacing around each value
        assert bool(((got.float() - exact).abs() <= bf16_step + 1e-3 * exact.abs().max()).all())
    x = torch.randn(1, inputs).to(torch.bfloat16)
    pairs = layer["scale_offsets"]
    with pytest.raises(RuntimeError, match="fp16 scales and offsets"):
        module.linear_q4(x, layer["qweight"], pairs.float(), group)
    with pytest.raises(RuntimeError, match="fp16 scales and offsets"):
        module.linear_q4(x, layer["qweight"], pairs[:, :-16].contiguous(), group)
    with pytest.raises(RuntimeError, match="qweight"):
        module.linear_q4(x[:, :-2], layer["qweight"], pairs, group)
    with pytest.raises(RuntimeError, match="groups of a multiple of 4"):
        module.linear_q4(x, layer["qweight"], pairs, 6)


def test_the_vnni_lm_head_is_at_least_as_exact_as_torchs_int8_one(served: BatchModel) -> None:
    """The C++ LM head (int16 activations x int8 weights, integer products, fp32 logits)
    against the exact product of the same int8 matrix in fp32, beside torch's int8 kernel (bf16
    activations and logits): on the real model's normed embeddings it is closer, and it picks
    the same top token. Bad inputs are refused before any unchecked loop."""
    from core.model.fast import Int8Linear

    head = served.lm_head
    assert isinstance(head, Int8Linear)
    if not _has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    assert head.native is not None  # switched on when the C++ step was built
    torch.manual_seed(0)
    hidden = served.norm(served.embed(torch.randint(0, 49152, (24,))) * 8).to(torch.bfloat16)
    exact = hidden.float() @ (head.weight_int8.float() * head.scale.float()[:, None]).T
    native = head(hidden).float()
    torch_int8 = torch._weight_int8pack_mm(hidden, head.weight_int8, head.scale).float()
    assert head(hidden).dtype == torch.float32
    native_error = (native - exact).abs().mean()
    torch_error = (torch_int8 - exact).abs().mean()
    assert native_error <= torch_error / 4, (native_error, torch_error)
    assert bool((native.argmax(-1) == exact.argmax(-1)).all())
    module = head.native
    with pytest.raises(RuntimeError, match="int8 weight"):
        module.lm_head_int8(hidden, head.weight_int8.float(), head._scale_f32)
    with pytest.raises(RuntimeError, match="k % 32"):
        module.lm_head_int8(
            hidden[:, :100], head.weight_int8[:, :100].contiguous(), head._scale_f32
        )


def _q4_matrix(
    out: int, inputs: int, group: int, seed: int
) -> tuple[q4_cpu.Q4Matrix, torch.Tensor, torch.Tensor]:
    """A random 4-bit matrix in loracord's layout, its codes, and the exact fp32 weight."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inputs), generator=g, dtype=torch.uint8)
    groups = inputs // group
    scales = (torch.rand(groups, out, generator=g) * 0.02 + 0.001).half().float()
    zeros = torch.randint(0, 16, (groups, out), generator=g)
    residual = (torch.rand(groups, out, generator=g) - 0.5) * scales
    offsets = (residual - scales * zeros).half().float()  # as fp16 holds them
    index = torch.arange(inputs) // group
    weight = codes.float() * scales[index].T + offsets[index].T
    return q4_cpu.pack(codes, scales, offsets, group), codes, weight


def test_the_q4_layout_holds_codes_scales_and_offsets_exactly() -> None:
    q, codes, weight = _q4_matrix(48, 128, 32, seed=1)
    assert q.packed.shape == (48, 64) and q.packed.dtype == torch.uint8
    assert q.scale_offsets.shape == (4, 96) and q.scale_offsets.dtype == torch.float16
    assert torch.equal(q.codes(), codes) and torch.equal(q.weight(), weight)
    other, _, other_weight = _q4_matrix(32, 128, 32, seed=2)
    both = q4_cpu.Q4Matrix.concat([q, other])  # blocks of 16 outputs stay whole
    assert torch.equal(both.weight(), torch.cat([weight, other_weight]))
    with pytest.raises(ValueError, match="does not fit the layout"):
        q4_cpu.pack(codes[:40], torch.ones(4, 40), torch.zeros(4, 40), 32)
    with pytest.raises(ValueError, match="same inputs and group size"):
        q4_cpu.Q4Matrix.concat([q, _q4_matrix(16, 128, 64, seed=3)[0]])


def test_the_codes_kept_beside_the_dense_layers_are_their_weights(loaded: tuple[Any, Any]) -> None:
    """On a CPU in fp32 the loader dequantizes every GPTQ layer once and keeps its codes for the
    C++ step: code times scale plus offset is the dense layer's weight, every layer, within the
    fp16 rounding of the offsets (a fraction of a percent of a quantization step)."""
    if not _has_avx2():
        pytest.skip("the codes are kept on a CPU with AVX2, FMA and F16C")
    model = loaded[0]
    dense = [m for m in model.modules() if getattr(m, "loracord_dequantized", False)]
    assert len(dense) == 7 * model.config.num_hidden_layers
    for module in dense:
        q4 = module.__dict__["loracord_q4"]
        weight = module.weight
        step = q4.scale_offsets.float().view(q4.scale_offsets.shape[0], -1, 2, 16)[:, :, 0]
        assert float((q4.weight() - weight).abs().max()) <= 0.01 * float(step.max())


@pytest.mark.parametrize(
    ("out", "inputs", "group"), [(96, 576, 32), (80, 1536, 512), (16, 256, 128)]
)
def test_the_avx2_4bit_product_is_the_exact_one_within_its_int16_rounding(
    request: pytest.FixtureRequest, out: int, inputs: int, group: int
) -> None:
    """`linear_q4_avx2` (fp32 x quantized to int16 per group, 4-bit codes, integer sums, the
    offset per group) against the exact product of the same weights, for 1 to 6 rows (every
    register blocking), an odd number of blocks of 16 outputs, and a group longer than its
    int32 sums (512): within 1e-4 of the output's range, an error the int16 steps of x bound.
    Bad inputs are refused."""
    batch = _native_batch(request, "batch")
    assert batch.fast is not None and batch.fast.native is not None
    module = batch.fast.native.module
    q, _, weight = _q4_matrix(out, inputs, group, seed=out + inputs)
    torch.manual_seed(0)
    for rows in range(1, 7):
        x = torch.randn(rows, inputs) * torch.rand(rows, 1) * 4
        exact = (x.double() @ weight.double().T).float()
        got = module.linear_q4_avx2(x, q.packed, q.scale_offsets, group)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        error = float((got - exact).abs().max())
        assert error <= 1e-4 * float(exact.abs().max()), (rows, error)
    x = torch.randn(1, inputs)
    pairs = q.scale_offsets
    with pytest.raises(RuntimeError, match="fp32"):
        module.linear_q4_avx2(x.bfloat16(), q.packed, pairs, group)
    with pytest.raises(RuntimeError, match="fp16 scales and offsets"):
        module.linear_q4_avx2(x, q.packed, pairs.float(), group)
    with pytest.raises(RuntimeError, match="fp16 scales and offsets"):
        module.linear_q4_avx2(x, q.packed, pairs[:, :-16].contiguous(), group)
    with pytest.raises(RuntimeError, match="qweight"):
        module.linear_q4_avx2(x[:, :-2], q.packed, pairs, group)
    with pytest.raises(RuntimeError, match="groups of a multiple of 4"):
        module.linear_q4_avx2(x, q.packed, pairs, 6)


def test_the_fp32_int8_lm_head_is_the_int8_product(batch: BatchModel) -> None:
    """The fp32 LM head (int8 weights, one scale per row) before and after the C++ step takes it
    over: the slices of W converted to fp32 give the exact product, the C++ head (x in int16)
    the same within 1e-4 of the logits' range and the same top token."""
    from core.model.fast import Int8Linear

    head = batch.lm_head
    assert isinstance(head, Int8Linear)  # the loader's, in fp32 as in bf16
    torch.manual_seed(0)
    hidden = batch.norm(batch.embed(torch.randint(0, 49152, (24,))) * 8)
    assert hidden.dtype == torch.float32
    weight = head.weight_int8.double() * head.scale.double()[:, None]
    exact = (hidden.double() @ weight.T).float()
    native, head.native = head.native, None
    try:
        sliced = head(hidden)
    finally:
        head.native = native
    assert sliced.dtype == torch.float32
    assert float((sliced - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    if not _has_avx2():
        return
    assert head.native is not None  # switched on when the C++ step was built
    got = head(hidden)
    assert float((got - exact).abs().max()) <= 1e-4 * float(exact.abs().max())
    assert bool((got.argmax(-1) == exact.argmax(-1)).all())
