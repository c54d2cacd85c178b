"""The engine on a CUDA GPU: a fast serving kernel, and the same greedy tokens as `generate`.

Skips cleanly without CUDA (the `gpu` marker, see tests/conftest.py). The model is GPTQ-quantized
on the GPU once per cache dir, with the embedded recipe (4-bit, group size 32) and the same
calibration quotes:
- from the embedded model's fp32 weights when they are in the cache (a GPU box that has built the
  embedded model);
- else from the folder named by LORACORD_TEST_GPU_BASE (SmolLM2's config and tokenizer), with
  seeded random weights when it holds none. The remote GPU machine gets only files under 64 MiB,
  so that is how it runs there; kernel choice and token equality do not depend on the values.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.app import App, build
from core.errors import ModelError
from core.model.build import Recipe, dequantized_dir, quote_corpus
from core.model.decoding import render
from core.model.fidelity import serving_messages
from core.model.requests import AdapterRef, ChatMessage, GenerationParams, GenerationRequest
from tests.conftest import CACHE_DIR, make_settings

pytestmark = pytest.mark.gpu

PROMPT = "Give me a short quote about courage."
# GPTQModel 7.7's classes: TorchLinear (serving through loracord's Triton kernels), ExllamaV2Linear,
# MarlinLinear
SERVING_KERNELS = ("Torch", "ExllamaV2", "Marlin")


def _base_folder() -> Path:
    named = os.environ.get("LORACORD_TEST_GPU_BASE")
    if named:
        return Path(named)
    return dequantized_dir(CACHE_DIR)


def quantize_on_gpu(base: Path, final: Path, calibration: int = 128) -> Path:
    """GPTQ-quantize `base` on CUDA into `final` (reused when it is already there)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    if (final / "config.json").is_file():
        return final
    recipe = Recipe()
    tokenizer = AutoTokenizer.from_pretrained(base)
    work = Path(tempfile.mkdtemp(prefix=".tmp-gpu-", dir=final.parent))
    try:
        source = base
        if not any(base.glob("*.safetensors")):
            torch.manual_seed(0)
            config = AutoConfig.from_pretrained(base)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
            source = work / "fp"
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
            del model
        config = GPTQConfig(
            bits=recipe.bits,
            group_size=recipe.group_size,
            desc_act=recipe.desc_act,
            sym=recipe.sym,
            damp_percent=recipe.damp_percent,
            dataset=quote_corpus()[0][:calibration],
            tokenizer=tokenizer,
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=config, dtype=torch.float16, device_map="cuda"
        )
        out = work / "gptq"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        for key in ("dataset", "tokenizer"):
            cfg["quantization_config"].pop(key, None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        del model
        torch.cuda.empty_cache()
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture(scope="module")
def cuda_model_dir() -> Path:
    base = _base_folder()
    if not (base / "config.json").is_file():
        pytest.skip(f"no model to quantize on the GPU: {base} has no config.json")
    weights = "real" if any(base.glob("*.safetensors")) else "random"
    final = CACHE_DIR / "models" / f"gpu-test-{base.name}-{weights}-g{Recipe().group_size}"
    final.parent.mkdir(parents=True, exist_ok=True)
    return quantize_on_gpu(base, final)


def running_app(settings: Any) -> Iterator[App]:
    """The app started on its own event loop for a module's tests, closed after them."""
    app = build(settings)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.start())
    yield app
    loop.run_until_complete(app.close())
    loop.close()


@pytest.fixture(scope="module")
def cuda_app(tmp_path_factory: pytest.TempPathFactory, cuda_model_dir: Path) -> Iterator[App]:
    settings = make_settings(
        tmp_path_factory.mktemp("cuda"), model=str(cuda_model_dir), device="cuda"
    )
    yield from running_app(settings)


async def test_serves_with_a_fast_cuda_kernel(cuda_app: App) -> None:
    info = cuda_app.engine.info
    assert info is not None
    assert info.device == "cuda"
    assert info.dtype == "float16"
    assert info.bits == 4
    assert info.kernel.startswith(SERVING_KERNELS), info.kernel
    if info.kernel.startswith("Torch"):  # only with loracord's Triton kernels
        assert "Triton step" in info.decode_path, info.decode_path
    model = await cuda_app.engine.run_on_model(lambda model, _tokenizer: model)
    layer = next(m for m in model.modules() if hasattr(m, "qweight"))
    assert layer.qweight.device.type == "cuda"


async def test_greedy_tokens_equal_plain_generate_cuda(cuda_app: App) -> None:
    """The engine's plain path (the model's own modules) equals `generate` token for token;
    the fast path is held to the plain one by the next test."""
    engine = cuda_app.engine
    batch = engine._batch
    fast = batch.fast
    params = GenerationParams(max_new_tokens=24, temperature=0.0)

    def plain(on: bool) -> None:
        batch.fast = None if on else fast

    await engine.run_on_model(lambda _m, _t: plain(True))
    try:
        stream = await engine.submit(GenerationRequest.from_prompt(PROMPT, params))
        answer = await stream.text()
    finally:
        await engine.run_on_model(lambda _m, _t: plain(False))

    messages = serving_messages(cuda_app.settings.system_prompt, PROMPT)
    tokenizer = await engine.run_on_model(lambda _model, tokenizer: tokenizer)
    prompt_ids = render(tokenizer, messages)

    def reference(model: Any, _tokenizer: Any) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids], device="cuda"),
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
            )
        return list(out[0, len(prompt_ids) :].tolist())

    new_ids = await engine.run_on_model(reference)  # the model belongs to the engine's thread
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    assert stream.completion_tokens == len(new_ids)
    assert answer == tokenizer.decode(new_ids, skip_special_tokens=True)


async def load_test_adapters(
    engine: Any, refs: list[AdapterRef], tmp_path: Path, seed: int
) -> list[int]:
    """Small random adapters for the served model, loaded into slots; their slot numbers."""
    from core.adapters import BaseShapes
    from tests.adapter_kit import write_adapter

    shapes = BaseShapes.of_model(Path(engine.info.path))
    slots = []
    for i, ref in enumerate(refs):
        folder = write_adapter(tmp_path / ref.name, shapes, seed=i + seed, strength=0.1)
        status = await engine.load_adapter(ref, folder)
        assert status.slot is not None
        slots.append(status.slot)
    return slots


def forced_tokens(tokenizer: Any, seed: int) -> tuple[list[int], list[int]]:
    """The served prompt's tokens and 24 seeded answer tokens to feed (teacher forcing)."""
    ids = render(tokenizer, serving_messages(None, PROMPT))
    generator = torch.Generator().manual_seed(seed)
    return ids, [int(t) for t in torch.randint(100, 1000, (24,), generator=generator)]


def teacher_forced(
    batch: Any, ids: list[int], answer: list[int], rows: list[tuple[int, int]], path: str
) -> torch.Tensor:
    """Logits `[steps, rows, vocab]` of `rows` (row, adapter slot) fed the prompt, then each
    answer token, through the plain step (`path == "plain"`) or the serving step."""
    from core.model.scheduler import Segment

    for row, slot in rows:
        batch.plain_step([Segment(row, 0, ids, True, slot)])
    logits = []
    for i, token in enumerate(answer):
        segments = [Segment(r, len(ids) + i, [token], True, s) for r, s in rows]
        out = batch.plain_step(segments) if path == "plain" else batch.step(segments)
        logits.append(out.float().cpu())
    return torch.stack(logits)


async def test_decode_replays_cuda_graphs_that_match_the_plain_path(
    cuda_app: App, tmp_path: Path
) -> None:
    """Serving decodes through CUDA graphs where the kernel can be captured (GPTQModel's
    ExLlamaV2 launches on the legacy default stream and cannot: the capture check must refuse
    it, naming it), and the serving step computes what the plain step computes: fed the same
    tokens (teacher forcing), rows on the base and on two adapters pick the same next token at
    >= 90% of positions and their logits differ by < 5% of their range (fp16 kernels are not
    bit-reproducible, and random weights give near-flat logits)."""
    engine = cuda_app.engine
    info = engine.info
    batch = engine._batch
    assert info is not None and batch.graphs is not None
    captured = batch.graphs.failed is None
    if captured:
        assert "CUDA graphs" in info.decode_path, info.decode_path
    else:
        assert "ExllamaV2" in info.kernel and "ExllamaV2" in batch.graphs.failed
        assert info.decode_path == "fast (modules)", info.decode_path
    path = "graph" if captured else "fast"
    before = batch.paths[path]
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    await (await engine.submit(GenerationRequest.from_prompt(PROMPT, params))).text()
    assert batch.paths[path] > before
    refs = [AdapterRef("ga", "v1"), AdapterRef("gb", "v1")]
    slots = [0, *await load_test_adapters(engine, refs, tmp_path, seed=7)]

    def compare(_model: Any, tokenizer: Any) -> tuple[float, float, int]:
        ids, answer = forced_tokens(tokenizer, seed=1)
        rows = list(enumerate(slots))
        plain, graph = (
            teacher_forced(batch, ids, answer, rows, path) for path in ("plain", "graph")
        )
        agree = float((plain.argmax(-1) == graph.argmax(-1)).float().mean())
        spread = float(plain.amax(-1).sub(plain.amin(-1)).mean())
        return agree, float((plain - graph).abs().max()) / spread, batch.paths[path]

    steps_before = batch.paths[path]
    agree, error, steps_after = await engine.run_on_model(compare)
    print(f"{path} vs plain: top-1 agreement {agree:.3f}, max |diff| / logit range {error:.4f}")
    assert steps_after - steps_before == 24
    assert agree >= 0.9 and error < 0.05, (agree, error)
    for ref in refs:
        await engine.unload_adapter(ref)


async def test_concurrent_requests_decode_together_on_cuda(cuda_app: App) -> None:
    """Questions submitted at once decode in one batch and each finishes properly.

    Exact equality with the answers alone is checked in fp32 on CPU (tests/test_batching.py).
    Here it cannot be: ExLlamaV2's kernels are not bit-reproducible from call to call (measured
    on an H200: the same input through one layer gave different fp16 outputs on later calls;
    identical prefills differed by up to 0.006 in the logits), and the model here may have
    random weights, whose near-flat distributions turn such differences into other samples.
    Greedy answers, whose top token has a margin, repeat; sampling really samples."""
    engine = cuda_app.engine
    prompts = [f"{PROMPT} #{i}" for i in range(6)]

    def request(i: int, temperature: float) -> GenerationRequest:
        params = GenerationParams(max_new_tokens=16, temperature=temperature, seed=100 + i)
        return GenerationRequest.from_prompt(prompts[i], params)

    greedy = [await (await engine.submit(request(i, 0.0))).text() for i in range(2)]
    assert [await (await engine.submit(request(i, 0.0))).text() for i in range(2)] == greedy

    streams = [await engine.submit(request(i, 0.7 if i % 2 else 0.0)) for i in range(6)]
    together = await asyncio.gather(*(s.text() for s in streams))
    assert all(s.finish_reason in ("stop", "length") for s in streams)
    assert all(1 <= s.completion_tokens <= 16 for s in streams)
    assert all(text.strip() for text in together)
    sampled = [await (await engine.submit(request(i, 0.9))).text() for i in range(2)]
    assert sampled != greedy, "sampled answers equal the greedy ones: is temperature ignored?"


def test_auto_on_cuda_has_fallbacks_in_float16() -> None:
    """`auto` resolves to a kernel with fallbacks; the loader orders them per checkpoint
    (tests/test_fast.py checks the table)."""
    from core.model.kernels import choose_runtime

    runtime = choose_runtime("cuda", "auto", "auto")
    assert (runtime.kernel, *runtime.fallbacks) == ("exllama_v2", "marlin", "auto")
    assert runtime.dtype == torch.float16


def test_auto_loads_the_next_kernel_when_the_triton_kernels_would_not_serve(
    cuda_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` keeps the `torch` kernel only for loracord's Triton kernels; when they would not
    serve every layer (here refused on purpose, as for a layer with a bias) the loader loads the
    next kernel of its order on the GPU, and the model serves through it (ExLlamaV2 for this
    asymmetric model: no Marlin build)."""
    from core.model import fast
    from core.model.kernels import choose_runtime
    from core.model.loader import describe, load_for_serving

    monkeypatch.setattr(fast, "triton_refusal", lambda layers: "refused for this test")
    runtime = choose_runtime("cuda", "auto", "auto")
    model, _tokenizer, seconds = load_for_serving(cuda_model_dir, runtime)
    info = describe("gpu-test", cuda_model_dir, model, runtime, seconds)
    assert info.kernel.startswith(("ExllamaV2", "Marlin")), info.kernel
    del model
    torch.cuda.empty_cache()


def test_zero_point_residuals_are_served_on_cuda(cuda_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint with zero-point residuals (as the embedded build has) under `auto`: the
    Triton kernels refuse it (their GEMV cannot fold them in), the next kernel serves it, and
    the residual term is in every path: the served logits, plain and through the fast step's
    CUDA graphs, match the checkpoint's whole weights read densely in fp32 on the CPU, and
    differ from them without the residuals by far more."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.model.batch import BatchModel
    from core.model.dense import dense_model
    from core.model.kernels import choose_runtime
    from core.model.loader import describe, load_for_serving
    from core.model.residuals import RESIDUALS_FILE
    from core.model.scheduler import Segment
    from core.model.source import read_quantization

    folder = tmp_path / "with-residuals"
    folder.mkdir()
    for file in cuda_model_dir.iterdir():
        if file.is_file():
            (folder / file.name).symlink_to(file)
    gen = torch.Generator().manual_seed(0)
    residuals = {}
    with safe_open(str(cuda_model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (not a dict)
            if name.endswith(".scales"):  # up to half a step, as a rounded offset leaves
                scales = f.get_tensor(name).float()
                noise = torch.rand(scales.shape, generator=gen) - 0.5
                residuals[name.removesuffix(".scales")] = (scales * noise).contiguous()
    save_file(residuals, str(folder / RESIDUALS_FILE))

    runtime = choose_runtime("cuda", "auto", "auto")
    model, tokenizer, seconds = load_for_serving(folder, runtime)
    info = describe("gpu-test", folder, model, runtime, seconds)
    assert info.kernel.startswith(("ExllamaV2", "Marlin")), info.kernel
    quant = read_quantization(folder)
    whole = dense_model(folder, quant, torch.float32)
    without = dense_model(cuda_model_dir, quant, torch.float32)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    with torch.no_grad():
        want = whole(torch.tensor([ids])).logits[0, -1]
        apart = float((without(torch.tensor([ids])).logits[0, -1] - want).abs().max())
        plain = model(torch.tensor([ids], device="cuda")).logits[0, -1].float().cpu()
    batch = BatchModel(model, 2, 64)
    assert batch.fast is not None, batch.decode_path  # (graphs where the kernel is captured)
    batch.plain_step([Segment(0, 0, ids[:-1], True)])
    for _ in range(2):  # the first step captures the graph, the second replays it
        stepped = batch.step([Segment(0, len(ids) - 1, ids[-1:], True)]).float().cpu()[0]
    for got in (plain, stepped):
        error = float((got - want).abs().max())
        assert error < 0.25 * apart, (error, apart)
    print(
        f"residuals on CUDA ({info.kernel}, {batch.decode_path}): error {error:.3f}, "
        f"without them {apart:.3f}"
    )
    del model, batch
    torch.cuda.empty_cache()


async def test_adapters_in_one_batch_on_cuda(cuda_app: App, tmp_path: Path) -> None:
    """Rows on the base model and on two adapters decode together on the GPU; the slots' LoRA
    term equals an fp32 reference computed on the CPU from the same files."""
    from core.adapters import BaseShapes, inspect_adapter
    from core.model.engine import LocalEngine
    from core.model.lora import read_weights
    from core.model.requests import AdapterRef
    from tests.adapter_kit import write_adapter

    engine = cuda_app.engine
    assert isinstance(engine, LocalEngine) and engine.info is not None
    shapes = BaseShapes.of_model(Path(engine.info.path))
    refs = [AdapterRef("a", "v1"), AdapterRef("b", "v1")]
    folders = [write_adapter(tmp_path / r.name, shapes, seed=i + 1) for i, r in enumerate(refs)]
    for ref, folder in zip(refs, folders, strict=True):
        status = await engine.load_adapter(ref, folder)
        assert status.slot is not None

    def lora_term(_model: Any, _tokenizer: Any) -> tuple[float, float]:
        assert engine._batch is not None and engine._batch.lora is not None
        slots = [engine._adapters[r].slot for r in refs]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, shapes.modules["q_proj"][0], generator=gen)
        token_slots = [0, slots[0], slots[1], slots[0]]
        plan = engine._batch.lora.plan(token_slots)
        assert plan is not None
        y = torch.zeros(4, shapes.modules["q_proj"][1], dtype=torch.float16, device="cuda")
        got = plan.add(0, "q_proj", x.to("cuda", torch.float16), y).float().cpu()
        expected = torch.zeros_like(got)
        for row, folder in ((1, folders[0]), (2, folders[1]), (3, folders[0])):
            w = read_weights(inspect_adapter(folder, shapes, 16))
            a, b = w.tensors[(0, "q_proj")]
            expected[row] = w.scale * (x[row] @ a.T) @ b.T
        return float((got - expected).abs().max()), float(expected.abs().max())

    error, scale = await engine.run_on_model(lora_term)
    assert scale > 0.05 and error < 0.01 * scale + 1e-3, (error, scale)

    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    cases = [None, *refs, None, *refs]
    streams = [
        await engine.submit(GenerationRequest.from_prompt(PROMPT, params, ref)) for ref in cases
    ]
    texts = await asyncio.gather(*(s.text() for s in streams))
    assert [s.adapter for s in streams] == cases
    assert all(s.finish_reason in ("stop", "length") for s in streams)
    assert texts[1] != texts[0] or texts[2] != texts[0], "the adapters changed nothing"


async def test_a_channel_trains_on_cuda_beside_the_engine_and_is_served(cuda_app: App) -> None:
    """The trainer child on the same GPU as the serving engine (the `torch` kernel, its memory
    share capped): the loss falls, the version is promoted and hot-loaded, and the channel's
    answers come from it."""
    from core.store import ChannelRef, NewQuote
    from core.training.runner import TrainRequest

    channel = ChannelRef.console("gpu-zorb")
    words = ("zorblat", "quimble", "frondish", "glavering", "snorkwise")
    quotes = [
        f"The {words[n % 5]} {words[(n * 3 + 1) % 5]}s at dawn, {n} times." for n in range(40)
    ]

    await cuda_app.store.import_quotes(channel, [NewQuote(q) for q in quotes])
    seen: list[float] = []

    def progress(p: Any) -> None:
        if p.phase == "training" and p.loss is not None:
            seen.append(p.loss)

    trainer = cuda_app.trainer
    # The remote GPU machine's model has random weights: a higher rate shows learning sooner.
    trainer.training = trainer.training.model_copy(update={"learning_rate": 1e-3})
    outcome = await trainer.train(TrainRequest(channel, "cli", steps=30), progress)
    print(outcome.summary(), outcome.as_dict())
    assert outcome.status in ("promoted", "kept"), outcome.reason
    assert outcome.new_loss is not None and outcome.base_loss is not None
    assert outcome.new_loss < outcome.base_loss, outcome.summary()
    assert sum(seen[-3:]) / 3 < sum(seen[:3]) / 3, seen  # the train loss falls
    if outcome.promoted:
        ref = AdapterRef(outcome.adapter or "", outcome.version or "")
        assert any(s.ref == ref for s in cuda_app.engine.adapters())
        stream, served = await cuda_app.channels.submit(
            channel, (ChatMessage("user", PROMPT),), GenerationParams(max_new_tokens=8)
        )
        await stream.text()
        assert served.adapter == ref


async def test_the_bot_stays_within_its_share_of_the_gpu(cuda_app: App, tmp_path: Path) -> None:
    """The bot's share (`gpu_memory_fraction`) is PyTorch's limit for the process from before
    the weights load: answering (prompts, decode steps, the CUDA graphs they capture) reserves
    no more than it. A plan that cannot fit is refused at start, in one line with what fits."""
    info = cuda_app.engine.info
    assert info is not None
    total = torch.cuda.get_device_properties(0).total_memory
    share = cuda_app.settings.gpu_memory_fraction
    assert info.gpu_budget_bytes == int(total * share)
    torch.cuda.reset_peak_memory_stats()
    streams = [
        await cuda_app.engine.submit(
            GenerationRequest.from_prompt(
                f"{PROMPT} ({i})", GenerationParams(max_new_tokens=24, temperature=0.0)
            )
        )
        for i in range(4)
    ]
    await asyncio.gather(*(s.text() for s in streams))
    peak = torch.cuda.max_memory_reserved()
    print(
        f"peak reserved {peak / 2**20:.0f} MiB of a {info.gpu_budget_bytes / 2**20:.0f} MiB share"
    )
    assert peak <= info.gpu_budget_bytes

    # 256 rows x 8192 tokens of this model's cache is ~23 GiB; a share of what this process
    # already holds (the shared app stays loaded) plus 2 GiB loads the model but cannot hold it.
    # The limit is per process: the shared app's own share is restored afterwards.
    torch.cuda.empty_cache()
    fraction = round((torch.cuda.memory_reserved() + 2 * 2**30) / total, 3)
    settings = make_settings(
        tmp_path,
        model=cuda_app.settings.model,
        device="cuda",
        gpu_memory_fraction=fraction,
        batch_rows=256,
        max_context_tokens=8192,
    )
    small = build(settings)
    try:
        with pytest.raises(ModelError) as caught:
            await small.start()
        message = str(caught.value)
        assert f"gpu_memory_fraction {fraction:g}" in message, message
        assert "set batch_rows to" in message, message
        assert "\n" not in message
    finally:
        await small.close()
        torch.cuda.set_per_process_memory_fraction(share)
