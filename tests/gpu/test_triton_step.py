"""The Triton decode step on CUDA (`core.model.triton_step`): active when the checkpoint is
served through GPTQModel's `torch` kernel, computing what GPTQModel's own kernel and the
engine's plain path compute, and replayed from CUDA graphs.

Uses the GPU test model of `test_cuda_engine.py` (SmolLM2's shape, group size 32: 9 heads
over 3 KV heads, so grouped-query attention is covered), or the GPTQ checkpoint named by
LORACORD_TEST_GPU_MODEL (the 7B-shaped random checkpoint of the benchmarks, which skips
quantizing on the GPU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.app import App
from core.model.requests import AdapterRef, GenerationParams, GenerationRequest
from tests.conftest import make_settings
from tests.gpu.test_cuda_engine import (  # noqa: F401 (cuda_model_dir: a fixture)
    PROMPT,
    cuda_model_dir,
    forced_tokens,
    load_test_adapters,
    running_app,
    teacher_forced,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def triton_app(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[App]:
    named = os.environ.get("LORACORD_TEST_GPU_MODEL")
    model = Path(named) if named else request.getfixturevalue("cuda_model_dir")
    settings = make_settings(
        tmp_path_factory.mktemp("triton"), model=str(model), device="cuda", kernel="torch"
    )
    yield from running_app(settings)


async def test_the_triton_step_serves(triton_app: App) -> None:
    engine = triton_app.engine
    info = engine.info
    batch = engine._batch
    assert info is not None and batch.fast is not None
    assert batch.fast.triton is not None, info.decode_path
    assert "Triton step" in info.decode_path and "CUDA graphs" in info.decode_path
    before = batch.paths["graph"]
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    stream = await engine.submit(GenerationRequest.from_prompt(PROMPT, params))
    text = await stream.text()
    assert text.strip() and stream.completion_tokens >= 1
    assert batch.paths["graph"] > before
    assert batch.graphs is not None and batch.graphs.failed is None


@pytest.fixture(scope="module")
def small_triton_app(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[App]:
    """The SmolLM2-shaped test model through the Triton path: quantized by transformers, so a
    GPTQ v2 checkpoint (asymmetric, group size 32) where the 7B one is v1 and symmetric."""
    model = request.getfixturevalue("cuda_model_dir")
    settings = make_settings(
        tmp_path_factory.mktemp("triton-small"), model=str(model), device="cuda", kernel="torch"
    )
    yield from running_app(settings)


async def _products_against_gptqmodel(app: App) -> list[tuple[str, int, float]]:
    def compare(model: Any, _tokenizer: Any) -> list[tuple[str, int, float]]:
        errors = []
        layer = model.model.layers[0]
        for name in ("self_attn.v_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)
            for rows in (1, 5, 40):
                x = torch.randn(rows, module.in_features, device="cuda", dtype=torch.float16)
                ours = module(x).float()  # the module now serves through our kernels
                theirs = type(module).forward(module, x).float()
                errors.append((name, rows, float((ours - theirs).abs().max() / theirs.abs().max())))
        return errors

    return await app.engine.run_on_model(compare)


async def test_the_products_equal_gptqmodels_own_kernel(triton_app: App) -> None:
    """Each projection through the Triton GEMV (1-8 rows) and GEMM (more rows) against
    GPTQModel's `torch` kernel on the same module: the same product within fp16 rounding."""
    errors = await _products_against_gptqmodel(triton_app)
    print("Triton vs GPTQModel torch kernel, max error / max value:", errors)
    assert all(error < 5e-3 for _name, _rows, error in errors), errors


async def test_the_products_equal_gptqmodels_own_kernel_on_a_v2_checkpoint(
    small_triton_app: App,
) -> None:
    """As above on a GPTQ v2 checkpoint, whose zero points were once read one step off."""
    assert "Triton step" in small_triton_app.engine.info.decode_path
    errors = await _products_against_gptqmodel(small_triton_app)
    print("v2 checkpoint: Triton vs GPTQModel torch kernel, max error / max value:", errors)
    assert all(error < 5e-3 for _name, _rows, error in errors), errors


async def test_the_triton_step_matches_the_plain_path(triton_app: App, tmp_path: Path) -> None:
    """Teacher-forced: rows on the base and on two adapters, 24 tokens; the graph-replayed
    Triton step picks the plain path's next token at >= 90% of positions, logits within 5%."""
    engine = triton_app.engine
    batch = engine._batch
    refs = [AdapterRef("ta", "v1"), AdapterRef("tb", "v1")]
    slots = [0, *await load_test_adapters(engine, refs, tmp_path, seed=3)]

    def compare(_model: Any, tokenizer: Any) -> tuple[float, float]:
        ids, answer = forced_tokens(tokenizer, seed=2)
        rows = list(enumerate(slots))
        runs = {path: teacher_forced(batch, ids, answer, rows, path) for path in ("plain", "graph")}
        runs["single"] = teacher_forced(batch, ids, answer, [(0, slots[1])], "single")
        plain, graph = runs["plain"], runs["graph"]
        agree = float((plain.argmax(-1) == graph.argmax(-1)).float().mean())
        spread = float(plain.amax(-1).sub(plain.amin(-1)).mean())
        error = float((plain - graph).abs().max()) / spread
        # one row on one adapter (the "one adapter" graph) equals that row in the mixed batch
        single = float((runs["single"][:, 0] - plain[:, 1]).abs().max()) / spread
        return agree, max(error, single)

    agree, error = await engine.run_on_model(compare)
    print(
        f"Triton step vs plain: top-1 agreement {agree:.3f}, max |diff| / logit range {error:.4f}"
    )
    assert agree >= 0.9 and error < 0.05, (agree, error)
    for ref in refs:
        await engine.unload_adapter(ref)


async def test_dependent_launches_give_the_same_step(
    triton_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `triton_step.PDL` (Hopper and later; on by default) each of the step's kernels may
    start while the one before it finishes, reading only weights until it waits. Done right,
    nothing changes but the time: the graph-replayed step gives exactly the logits it gives
    without, for two rows decoding together. Skipped where the GPU or Triton cannot launch so."""
    from core.model import gptq_triton as gt
    from core.model import triton_step as ts

    engine = triton_app.engine
    batch = engine._batch
    if not gt.pdl_available(batch.device):
        pytest.skip("no programmatic dependent launch on this GPU or Triton")

    def compare(_model: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids, answer = forced_tokens(tokenizer, seed=4)
        rows = [(0, 0), (1, 0)]
        fast = batch.fast
        served = fast.triton
        try:
            steps = {}
            for pdl in (False, True):
                monkeypatch.setattr(ts, "PDL", pdl)
                fast.triton = ts.TritonLayers(fast)
                batch.graphs.reset()  # (the graphs captured so far launch the other way)
                assert fast.triton.pdl == pdl
                steps[pdl] = teacher_forced(batch, ids, answer, rows, "graph")
            without, with_pdl = steps[False], steps[True]
        finally:
            fast.triton = served
            batch.graphs.reset()
        return without, with_pdl

    without, with_pdl = await engine.run_on_model(compare)
    difference = float((without - with_pdl).abs().max())
    print(f"dependent launches: max |difference| of the logits {difference}")
    assert torch.equal(without, with_pdl), difference


async def test_an_adapters_terms_and_norms_in_the_kernels_give_torchs_step(
    triton_app: App, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One row, graph-replayed and teacher-forced, on the base and on an adapter: with the
    adapter's terms added by the kernels (`triton_step.ADAPTER_KERNELS`, as served) and also
    with the norms on the GEMVs (`FUSED_NORMS`: o and down add themselves to the residual
    stream, the next GEMV makes the norm as it reads it), the same next tokens as the norm
    kernels with torch's adapter products, logits within fp16's rounding; and with dependent
    launches on and off exactly the same logits (the GEMVs' counts and sums race with
    nothing)."""
    from core.model import triton_step as ts

    engine = triton_app.engine
    batch = engine._batch
    ref = AdapterRef("in-kernels", "v1")
    (slot,) = await load_test_adapters(engine, [ref], tmp_path, seed=6)
    served = batch.fast.triton
    pdl = served.pdl
    torchs = (False, False, pdl)  # (norms on the GEMVs, adapter kernels, dependent launches)
    variants = [torchs, (False, True, pdl), (False, True, False)]
    if served.fusable:  # (else o's or down's GEMV runs in one share of K)
        variants += [(True, True, pdl), (True, True, False)]

    def compare(_model: Any, tokenizer: Any) -> dict[tuple, torch.Tensor]:
        ids, answer = forced_tokens(tokenizer, seed=5)
        fast = batch.fast
        steps = {}
        try:
            for variant in variants:
                fused, in_kernels, launches = variant
                monkeypatch.setattr(ts, "FUSED_NORMS", fused)
                monkeypatch.setattr(ts, "ADAPTER_KERNELS", in_kernels)
                monkeypatch.setattr(ts, "PDL", launches)
                fast.triton = ts.TritonLayers(fast)
                batch.graphs.reset()
                for on in (0, slot):
                    steps[on, *variant] = teacher_forced(batch, ids, answer, [(0, on)], "graph")
        finally:
            fast.triton = served
            batch.graphs.reset()
        return steps

    steps = await engine.run_on_model(compare)
    errors = []
    for on in (0, slot):
        reference = steps[on, *torchs]
        spread = float(reference.amax(-1).sub(reference.amin(-1)).mean())
        for variant in variants[1:]:
            got = steps[on, *variant]
            agree = float((reference.argmax(-1) == got.argmax(-1)).float().mean())
            error = float((reference - got).abs().max()) / spread
            print(
                f"slot {on}, {variant} against torch's terms and the norm kernels: "
                f"agreement {agree:.3f}, {error:.4f}"
            )
            assert agree >= 0.9 and error < 0.02, (on, variant, agree, error)
            errors.append(error)
            fused, in_kernels, launches = variant
            if launches:
                assert torch.equal(steps[on, fused, in_kernels, False], got), (on, variant)
    moved = float((steps[slot, False, True, pdl] - steps[0, False, True, pdl]).abs().max())
    assert moved / spread > 3 * max(errors) and moved > 0, (moved, errors)  # (the terms)
    await engine.unload_adapter(ref)


@pytest.mark.parametrize("width", [576, 4096])
@pytest.mark.parametrize("rows", [1, 32])
def test_the_split_norm_computes_the_one_program_norm(width: int, rows: int) -> None:
    """`_add_rms_norm_split` (a row's slices in programs that wait for each other's sums) gives
    the residual stream exactly as `_add_rms_norm` and its norm within fp16's rounding (only
    the order of the sum of squares differs), for a width with a masked slice (576: 3 of 4)
    and many rows at once, replayed twice from a CUDA graph with the same result."""
    from core.model import gptq_triton as gt
    from core.model import triton_step as ts

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    hidden = torch.randn(rows, width, device="cuda").half()
    delta = torch.randn(8, rows, width, device="cuda")
    weight = (torch.rand(width, device="cuda") + 0.5).half()
    block, warps = ts.NORM_SPLIT or (256, 2)  # (off by default)
    slices = gt.power_of_two(-(-width // block))

    def split() -> tuple[torch.Tensor, torch.Tensor]:
        h, out = hidden.clone(), torch.empty_like(hidden)
        sums = torch.empty(rows, slices, device="cuda")
        count = torch.zeros(rows, dtype=torch.int32, device="cuda")
        ts._add_rms_norm_split[(rows, slices)](
            h, delta, weight, out, sums, count, width, delta.stride(0), 1e-5,
            SHARES=8, BLOCK=block, SPLIT=slices, num_warps=warps,
        )  # fmt: skip
        return h, out

    want_h, want = hidden.clone(), torch.empty_like(hidden)
    ts._add_rms_norm[(rows,)](
        want_h, delta, weight, want, width, delta.stride(0), 1e-5,
        SHARES=8, BLOCK=gt.power_of_two(width), num_warps=8,
    )  # fmt: skip
    got_h, got = split()
    assert torch.equal(got_h, want_h)
    assert float((got.float() - want.float()).abs().max()) <= 2e-3 * float(want.abs().max())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed_h, replayed = split()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed_h, got_h) and torch.equal(replayed, got)
