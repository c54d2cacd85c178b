"""The CUDA decode step's Triton kernels, checked on the CPU through Triton's interpreter
against the torch code they replace (`core.model.gptq_triton`, `core.model.triton_step`).

The interpreter runs each program of a kernel with numpy, so the arithmetic (unpacking,
zero points, scales, shares of K, rotation, cache writes, online softmax) is checked here in
CI; speed and the compiled code are checked on a GPU (`tests/gpu`). It must be switched on
before the kernels are defined, so the checks run in a child process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_compute_what_the_torch_code_does() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all kernels agree" in done.stdout


def test_the_products_read_the_zero_points_gptqmodels_torch_kernel_uses(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    """The Triton products multiply by the matrix GPTQModel's `torch` kernel multiplies by, for
    a GPTQ v2 checkpoint (asymmetric, as the embedded model and transformers' builds are: its
    modules still report format 1) and a v1 one (converted when it loads). Read as v1 (as the
    flag says), every zero point of a v2 checkpoint was one step off: the embedded model's
    products by up to half their largest value, and a random v2 model answered one token over
    and over on a GPU."""
    import torch

    from core.model import gptq_triton as gt
    from core.model.fast import torch_kernel_weights
    from core.model.kernels import Runtime
    from core.model.loader import load_for_serving

    for v2 in (True, False):
        folder = _random_model(embedded_model_dir, tmp_path / f"v2-{v2}", v2=v2)
        model, _tokenizer, _ = load_for_serving(folder, Runtime("cpu", torch.float16, "torch"))
        modules = [m for m in model.modules() if type(m).__name__ == "TorchLinear"]
        assert len(modules) == 14, folder
        torch.manual_seed(0)
        for m in modules:
            x = torch.randn(2, m.in_features, dtype=torch.float16)
            with torch.no_grad():
                want = m(x).float()
            got = x.float() @ gt.dequantize(torch_kernel_weights(m))
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 2e-3, (v2, error)


def _random_model(tokenizer_dir: Path, work: Path, *, v2: bool = False) -> Path:
    """A 2-layer Llama-shaped GPTQ checkpoint with random weights (`bench/random_gptq.py`:
    grouped-query heads; symmetric in the v1 format, or asymmetric in the v2 one)."""
    import json
    import shutil

    base, folder = work / "base", work / "model"
    base.mkdir(parents=True)
    config = json.loads((tokenizer_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("head_dim", None)
    config.update(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    (base / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, base / name)
    script = ROOT / "bench" / "random_gptq.py"
    command = [sys.executable, str(script), str(base), str(folder)]
    subprocess.run(command + (["--v2"] if v2 else []), check=True)
    return folder


@pytest.mark.parametrize("bench", ["gemv_variants.py", "gemv_limits.py"])
def test_the_benchmarked_gemv_variants_compute_the_product(bench: str) -> None:
    """The GEMV variants the GPU benchmarks time (`bench/`), those meant to be correct, against
    the dequantized matrix: a faster variant is only worth adopting if it computes the product."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "variants agree" in done.stdout


def _hopper(kernel, args: dict[str, object], warps: int, pdl: bool) -> dict[str, str]:
    """`kernel` compiled for sm_90 by Triton's own compiler, offline (no GPU): its stages' text
    ("ttir", "ptx", ...). `args` gives each argument's type ("*fp16", "i32", ...) or, for a
    constexpr, its value."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: v if isinstance(v, str) else "constexpr" for n, v in args.items()}
    constants = {n: v for n, v in args.items() if not isinstance(v, str)}
    signature["PDL"], constants["PDL"] = "constexpr", pdl
    source = ASTSource(kernel, signature, constants, {})
    options = {"num_warps": warps, "launch_pdl": pdl}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm


def _before_the_wait(ttir: str) -> tuple[list[set[str]], bool]:
    """From a kernel's Triton IR: for each load before `griddepcontrol.wait`, the kernel
    arguments its address is made from; and whether anything is stored before the wait."""
    lines = ttir[ttir.index("tt.func") :].splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    made_from: dict[str, list[str]] = {}
    for line in lines[:wait]:
        left, _, right = line.partition(" = ")
        if left.strip().startswith("%"):
            made_from[left.strip().split(":")[0]] = re.findall(r"%[\w.]+", right.split(" : ")[0])

    def arguments(name: str) -> set[str]:
        if name not in made_from:  # an argument of the kernel
            return {name[1:]}
        return set().union(*(arguments(o) for o in made_from[name]))

    loads = [
        arguments(re.findall(r"%[\w.]+", line.split("tt.load", 1)[1])[0])
        for line in lines[:wait]
        if "tt.load " in line
    ]
    return loads, any("tt.store" in line for line in lines[:wait])


def test_the_step_kernels_as_dependent_launches_compile_for_hopper_and_wait_first() -> None:
    """Programmatic dependent launch (`triton_step.PDL`) lets a kernel start while the one
    before it still runs; that is only correct if every kernel waits (`griddepcontrol.wait`)
    before it reads what an earlier kernel wrote or writes anything. No Hopper GPU here, so
    each kernel is compiled for sm_90 offline: with PDL, only the weights (the GEMV's, the
    norm's) are read before the wait, traced back to the kernel's arguments in its Triton IR,
    and in the PTX nothing is stored before it; without PDL there is no such instruction."""
    from core.model import gptq_triton as gt
    from core.model import triton_step as ts

    gemv = {
        "x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp32",
        "N": "i32", "K": "i32", "stride_w": "i32", "stride_s": "i32", "groups_per_split": "i32",
        "nw_ptr": "*i32", "norm_sums_ptr": "*fp32", "norm_blocks": "i32",
        "eps": "fp32", "res_ptr": "*fp16", "res_sums_ptr": "*fp32", "res_count_ptr": "*i32",
        "slot_ptr": "*i64", "low_ptr": "*fp32", "lora_b_ptr": "*fp16", "rank": "i32",
        "GROUP": 128, "BLOCK_N": 32, "HALF2": True, "ASM": True, "STAGES": 1, "LATE": True,
        "TILES": 2, "NORM": False, "NORM_P2": 1, "RESIDUAL": False, "LORA_R": 0,
    }  # fmt: skip
    norm = {
        "hidden_ptr": "*fp16", "delta_ptr": "*fp32", "weight_ptr": "*fp16", "out_ptr": "*fp16",
        "H": "i32", "delta_share_stride": "i32", "eps": "fp32", "SHARES": 8, "BLOCK": 4096,
    }  # fmt: skip
    norm_split = {
        "hidden_ptr": "*fp16", "delta_ptr": "*fp32", "weight_ptr": "*fp16", "out_ptr": "*fp16",
        "sums_ptr": "*fp32", "count_ptr": "*i32", "H": "i32", "delta_share_stride": "i32",
        "eps": "fp32", "SHARES": 8, "BLOCK": 256, "SPLIT": 16,
    }  # fmt: skip
    silu = {
        "gate_up_ptr": "*fp32", "share_stride": "i32", "out_ptr": "*fp16", "INNER": "i32",
        "SHARES": 4, "BLOCK": 128,
    }  # fmt: skip
    rope = {
        "qkv_ptr": "*fp32", "qkv_share_stride": "i32", "cos_ptr": "*fp16", "sin_ptr": "*fp16",
        "pos_ptr": "*i64", "row_ptr": "*i64", "k_ptr": "*fp16", "v_ptr": "*fp16",
        "q_ptr": "*fp16", "cache_row_stride": "i32", "cache_head_stride": "i32",
        "slot_ptr": "*i64", "low_ptr": "*fp32", "bq_ptr": "*fp16", "bk_ptr": "*fp16",
        "bv_ptr": "*fp16", "rank": "i32", "HEADS": 32, "KV_HEADS": 32, "D": 128, "SHARES": 8,
        "LORA_R": 0,
    }  # fmt: skip
    shrink = {
        "x_ptr": "*fp16", "nw_ptr": "*fp16", "sums_ptr": "*fp32", "norm_blocks": "i32",
        "eps": "fp32", "slot_ptr": "*i64", "a0_ptr": "*fp16", "a1_ptr": "*fp16",
        "a2_ptr": "*fp16", "low_ptr": "*fp32", "K": "i32", "rank": "i32", "TARGETS": 3,
        "BLOCK_K": 1024, "NORM": True, "NORM_P2": 128,
    }  # fmt: skip
    attention = {
        "q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "pos_ptr": "*i64", "row_ptr": "*i64",
        "out_ptr": "*fp16", "scaling": "fp32", "cache_row_stride": "i32",
        "cache_head_stride": "i32", "HEADS": 32, "GROUPS": 1, "GROUPS_P2": 1, "D": 128,
        "BLOCK_S": 64,
    }  # fmt: skip
    spans = {**attention, "part_ptr": "*fp32", "lse_ptr": "*fp32", "SPLITS": 8}
    spans = {n: spans[n] for n in ts._attention_split.arg_names if n in spans}
    combine = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*fp16", "HEADS": 32, "D": 128}
    dense = {
        "x_ptr": "*fp16", "w_ptr": "*fp16", "out_ptr": "*fp16", "N": "i32", "K": "i32",
        "stride_w": "i32", "BLOCK_N": 8, "BLOCK_K": 512,
    }  # fmt: skip
    weights = {"w_ptr", "s_ptr", "z_ptr"}
    kernels = {  # name: (kernel, arguments, warps, what it may read before the wait)
        "gemv": (gt._gemv, gemv, 2, weights),
        "gemv, fp32": (
            gt._gemv,
            {**gemv, "x_ptr": "*fp32", "HALF2": False, "TILES": 1},
            2,
            weights,
        ),
        "gemv, norm in, residual out": (
            gt._gemv,
            {**gemv, "NORM": True, "NORM_P2": 128, "RESIDUAL": True},
            2,
            weights,
        ),
        "gemv, residual and adapter out": (
            gt._gemv,
            {**gemv, "RESIDUAL": True, "LORA_R": 16},
            2,
            weights,
        ),
        "gemv, adapter's term on share 0": (gt._gemv, {**gemv, "LORA_R": 16}, 2, weights),
        "lora_shrink": (ts._lora_shrink, shrink, 4, set()),
        "lora_shrink, x as it is": (
            ts._lora_shrink,
            {**shrink, "NORM": False, "NORM_P2": 1},
            4,
            set(),
        ),
        "rope_write, adapter": (ts._rope_write, {**rope, "LORA_R": 16}, 1, set()),
        "add_rms_norm": (ts._add_rms_norm, norm, 8, {"weight_ptr"}),
        "add_rms_norm_split": (ts._add_rms_norm_split, norm_split, 2, {"weight_ptr"}),
        "silu_mul": (ts._silu_mul, silu, 4, set()),
        "rope_write": (ts._rope_write, rope, 1, set()),
        "decode_attention": (ts._decode_attention, attention, 4, set()),
        "attention_split": (ts._attention_split, spans, 4, set()),
        "attention_combine": (ts._attention_combine, {**combine, "SPLITS": 8}, 1, set()),
        "dense_gemv": (ts._dense_gemv, dense, 4, {"w_ptr"}),
    }
    for name, (kernel, args, warps, early) in kernels.items():
        assert "griddepcontrol" not in _hopper(kernel, args, warps, pdl=False)["ptx"], name
        stages = _hopper(kernel, args, warps, pdl=True)
        pointers = {n for n, v in args.items() if isinstance(v, str) and v.startswith("*")}
        loads, stored = _before_the_wait(stages["ttir"])
        loads = [made_from & pointers for made_from in loads]
        assert not stored, name
        assert all(made_from <= early for made_from in loads), (name, loads)
        assert bool(loads) == bool(early), (name, loads)  # (the weights are read early)
        ptx = stages["ptx"]
        ptx = ptx[ptx.index(".visible .entry") :]
        wait = ptx.index("griddepcontrol.wait")
        assert wait < ptx.index("griddepcontrol.launch_dependents"), name
        assert "st.global" not in ptx[:wait], name
        print(f"{name}: {len(loads)} loads before the wait, from {sorted(set().union(*loads))}")


def test_the_triton_step_decodes_what_the_plain_path_does(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    """The whole decode step as served on CUDA (`core.model.triton_step`), here through the
    interpreter: a 2-layer Llama-shaped GPTQ model with random weights (grouped-query heads,
    fp16, GPTQModel's `torch` kernel), two rows at different positions, one on an adapter, fed
    the same tokens through the plain path and the Triton step; then with the attention cut
    into spans. Checks the glue between the kernels (shares of K, LoRA terms, norms, the
    activation, cache writes) that the kernel checks above do not."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "step", str(embedded_model_dir), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the Triton step agrees" in done.stdout, done.stdout[-3000:]
    print(done.stdout[-300:])


def _check_whole_step(torch, tokenizer_dir: Path, work: Path) -> None:

    from core.adapters import BaseShapes, inspect_adapter
    from core.model import triton_step as ts
    from core.model.batch import BatchModel
    from core.model.fast import triton_refusal
    from core.model.kernels import Runtime
    from core.model.loader import load_for_serving, quant_layers
    from core.model.lora import read_weights
    from core.model.scheduler import Segment
    from tests.adapter_kit import write_adapter

    folder = _random_model(tokenizer_dir, work)
    model, _tokenizer, _ = load_for_serving(folder, Runtime("cpu", torch.float16, "torch"))
    # what `auto` asks on CUDA before it keeps the `torch` kernel: every layer taken
    layers = quant_layers(model)
    assert triton_refusal(layers) is None
    layers[3].bias = torch.zeros(layers[3].out_features, dtype=torch.float16)
    assert "TorchLinear layers here (it has a bias)" in triton_refusal(layers)
    layers[3].bias = None
    # zero-point residuals (the embedded build's): the fp16-pair GEMV cannot fold them in
    groups = layers[3].in_features // layers[3].group_size
    layers[3].loracord_residual = torch.zeros(groups, layers[3].out_features)
    assert "(it has zero-point residuals)" in triton_refusal(layers)
    layers[3].loracord_residual = None
    batch = BatchModel(model, 2, 32, adapter_slots=2, adapter_max_rank=8)
    assert "Triton step" in batch.decode_path, batch.decode_path
    shapes = BaseShapes.of_model(folder)
    adapter = write_adapter(work / "adapter", shapes, seed=3, strength=0.5)
    batch.lora.load(1, read_weights(inspect_adapter(adapter, shapes, 8)))
    rows = [(0, list(range(1, 5)), 0), (1, list(range(5, 14)), 1)]  # (row, prompt, slot)

    def forced(path: str):
        for row, ids, slot in rows:
            batch.plain_step([Segment(row, 0, ids, True, slot)])
        logits = []
        for i in range(3):
            segments = [Segment(r, len(ids) + i, [100 + 7 * i + r], True, s) for r, ids, s in rows]
            step = batch.plain_step if path == "plain" else batch.step
            logits.append(step(segments).float())
        return torch.stack(logits)  # [steps, rows, vocab]

    plain = forced("plain")
    before = batch.paths["fast"]
    served = forced("served")
    assert batch.paths["fast"] - before == 3  # every step ran through the fast path
    spread = float((plain.amax(-1) - plain.amin(-1)).mean())
    error = float((plain - served).abs().max()) / spread
    # (random weights give near-flat logits: their order is not compared, their values are)
    assert bool(served.isfinite().all()) and error < 0.01, error
    print(f"served: max |difference| / logit range {error:.2e}")
    batch.fast.triton.sms = 64  # as on a GPU: few rows cut their attention into spans
    ts.MAX_ATTENTION_SPLITS = 4
    assert batch.fast.triton.attention_splits(2) == 4
    split = forced("served")
    error = float((plain - split).abs().max()) / spread
    assert bool(split.isfinite().all()) and error < 0.01, error
    print(f"attention in 4 spans: {error:.2e}")
    # one row on the base: the norms between layers ride on the GEMVs (no norm kernel in a
    # layer, `FUSED_NORMS`), against the same step with the norm kernels and the plain path
    rows = rows[:1]
    rows[0] = (0, rows[0][1], 0)
    ts.FUSED_NORMS = True  # (off by default: slower on an H100)
    layers = batch.fast.triton
    assert layers.fusable
    calls = []
    norm = layers._norm
    layers._norm = lambda *args: calls.append(1) or norm(*args)
    plain = forced("plain")
    fused = forced("served")
    assert len(calls) == 3 * 2  # the first and the final norm of each step only
    ts.FUSED_NORMS = False
    kernels = forced("served")
    ts.FUSED_NORMS = True
    assert len(calls) == 6 + 3 * 5  # every norm of each step
    spread = float((plain.amax(-1) - plain.amin(-1)).mean())
    error = float((plain - fused).abs().max()) / spread
    assert bool(fused.isfinite().all()) and error < 0.01, error
    same = float((kernels - fused).abs().max()) / spread
    assert same < 1e-3, same
    print(f"one row, norms on the GEMVs: {error:.2e} (against the norm kernels: {same:.2e})")
    # one row on an adapter: its terms added by the kernels (`ADAPTER_KERNELS`: x times A in
    # `_lora_shrink`, times B in the rotation's kernel and in o's GEMV), no adapter product of
    # torch's; on the norm kernels (as served) and with the norms on the GEMVs
    rows[0] = (0, rows[0][1], 1)
    shrinks = []
    shrink = layers._shrink
    layers._shrink = lambda *args: shrinks.append(1) or shrink(*args)
    plain = forced("plain")
    spread = float((plain.amax(-1) - plain.amin(-1)).mean())
    ts.FUSED_NORMS = False
    assert ts.ADAPTER_KERNELS  # (on by default)
    on_adapter = forced("served")
    assert len(shrinks) == 3 * 2 * 2  # q/k/v and o in each layer of each step
    error = float((plain - on_adapter).abs().max()) / spread
    assert bool(on_adapter.isfinite().all()) and error < 0.01, error
    moved = float((on_adapter - kernels).abs().max()) / spread
    assert moved > 10 * error, (moved, error)  # (the adapter changes the logits)
    ts.FUSED_NORMS = True
    fused_adapter = forced("served")
    assert len(shrinks) == 2 * 3 * 2 * 2
    fused_error = float((plain - fused_adapter).abs().max()) / spread
    assert bool(fused_adapter.isfinite().all()) and fused_error < 0.01, fused_error
    ts.FUSED_NORMS = ts.ADAPTER_KERNELS = False  # the same row with torch's adapter products
    torch_terms = float((plain - forced("served")).abs().max()) / spread
    assert len(shrinks) == 2 * 3 * 2 * 2  # (no shrink: torch's products)
    ts.ADAPTER_KERNELS = True
    assert max(error, fused_error) < 3 * torch_terms + 1e-3, (error, fused_error, torch_terms)
    print(
        f"one row on an adapter, its terms in the kernels: {error:.2e}, with the norms on the "
        f"GEMVs {fused_error:.2e} (torch's: {torch_terms:.2e})"
    )
    print("the Triton step agrees with the plain path")


def _random_gptq(k: int, n: int, group: int, torch):
    from core.model import gptq_triton as gt

    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    packed = torch.zeros(k // 8, n, dtype=torch.int32)
    for j in range(8):
        packed |= q[j::8] << (4 * j)
    scales = (torch.rand(k // group, n) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 17, (k // group, n), dtype=torch.int32)  # (16: any value works)
    return gt.GptqWeights(packed, scales, zeros.half(), group), q


def _check_products(torch) -> None:
    from core.model import gptq_triton as gt

    torch.manual_seed(0)
    for k, n, group in [(256, 96, 128), (512, 64, 64), (256, 160, 32)]:
        w, q = _random_gptq(k, n, group, torch)
        assert torch.equal(gt.unpack_weight(w.qweight), q)
        dense = gt.dequantize(w)
        for rows in (1, 3, 8, 20):  # the GEMV at one row, the GEMM above
            x = torch.randn(rows, k).half()
            want = x.float() @ dense
            for cfg in (
                gt.GemvConfig(32, 1, 4),
                gt.GemvConfig(64, 4, 4, stages=3),
                gt.GemvConfig(32, 2, 4, late=True),
                gt.GemvConfig(32, 4, 2, tiles=2),  # (160 columns: the last tile half masked)
                gt.GemvConfig(64, 2, 4, late=True, tiles=2),
            ):
                got = gt.matmul(x, w, gemv_config=cfg, gemm_config=gt.GemmConfig(16, 32, 64, 2))
                error = float((got.float() - want).abs().max() / want.abs().max())
                assert got.dtype == torch.float16 and got.shape == (rows, n)
                assert error < 2e-3, (k, n, group, rows, cfg, error)
        # a view of some columns (a module's share of a fused q/k/v) gives its columns
        part = w.columns(32, 64)
        for rows in (1, 2):
            x = torch.randn(rows, k).half()
            got = gt.matmul(x, part).float()
            want = x.float() @ dense[:, 32:64]
            assert float((got - want).abs().max() / want.abs().max()) < 2e-3
        # fp32 activations take the exact fp32 way (fp16 ones the fp16 pairs above)
        x = torch.randn(1, k)
        want = x @ dense
        for cfg in (gt.GemvConfig(32, 2, 4, stages=2), gt.GemvConfig(32, 2, 4, tiles=2)):
            got = gt.matmul(x, w, gemv_config=cfg)
            assert got.dtype == torch.float32
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5, cfg
        # a row that starts mid-pair is read the fp32 way too
        x = torch.randn(1, k + 1).half()[:, 1:]
        got = gt.matmul(x, w, gemv_config=gt.GemvConfig(32, 2, 4)).float()
        want = x.float() @ dense
        assert float((got - want).abs().max() / want.abs().max()) < 2e-3
        # one row only: more rows go to the GEMM
        with pytest.raises(ValueError, match="one contiguous row"):
            gt.gemv(torch.randn(2, k).half(), w, torch.empty(1, 2, n), gt.GemvConfig(32, 1, 4))
        with pytest.raises(ValueError, match="1 or 2 tiles"):
            gt.gemv(torch.randn(1, k).half(), w, torch.empty(1, 1, n), gt.GemvConfig(tiles=3))
    # the check a model's first matrix passes before any module is switched to the kernels
    w, _ = _random_gptq(256, 64, 64, torch)
    assert gt.self_check(w) is None
    real = gt.matmul
    try:
        gt.matmul = lambda x, w: real(x, w) * 1.1  # a kernel that computes wrong
        assert "off by" in gt.self_check(w)

        def broken(x, w):
            raise RuntimeError("PassManager::run failed\nmore")

        gt.matmul = broken  # a kernel this GPU cannot compile
        assert gt.self_check(w) == "RuntimeError: PassManager::run failed"
    finally:
        gt.matmul = real
    # zero points unpack as they are stored, lowest bits first, cut to the outputs
    zeros = torch.randint(0, 16, (2, 16), dtype=torch.int32)
    packed = torch.zeros(2, 2, dtype=torch.int32)
    for j in range(8):
        packed |= zeros[:, j::8] << (4 * j)
    assert torch.equal(gt.unpack_zeros(packed, 16), zeros)
    assert torch.equal(gt.unpack_zeros(packed, 13), zeros[:, :13])
    with pytest.raises(ValueError, match="not supported"):
        gt.GptqWeights(
            torch.zeros(72, 8, dtype=torch.int32), torch.ones(1, 8), torch.ones(1, 8), -1
        )


def _check_step_kernels(torch) -> None:
    from core.model import triton_step as ts
    from core.model.fast import decode_attention

    torch.manual_seed(1)
    # residual add of two shares, then the norm
    hidden = torch.randn(3, 96).half()
    delta = torch.randn(2, 3, 96)
    weight = torch.rand(96).half() + 0.5
    out = torch.empty_like(hidden)
    want_hidden = (hidden.float() + delta.sum(0)).half()
    want = torch.rms_norm(want_hidden.float(), (96,), None, 1e-5).half() * weight
    ts._add_rms_norm[(3,)](
        hidden, delta, weight, out, 96, delta.stride(0), 1e-5, SHARES=2, BLOCK=128
    )
    assert torch.equal(hidden, want_hidden)
    assert float((out.float() - want.float()).abs().max()) < 1e-2

    # the MLP's activation from 3 shares of the gate/up product, 2 rows, 100 wide (2 blocks)
    gate_up = torch.randn(3, 2, 200)
    act = torch.empty(2, 100).half()
    ts._silu_mul[(2, 2)](gate_up, gate_up.stride(0), act, 100, SHARES=3, BLOCK=64)
    summed = gate_up.sum(0).half()
    want = torch.nn.functional.silu(summed[:, :100]) * summed[:, 100:]
    assert float((act.float() - want.float()).abs().max()) < 1e-2

    # one row times a dense fp16 weight (the one-row LM head): 100 rows of w (the last of
    # 7 programs partly masked), K = 256 in two steps of 128
    x = torch.randn(1, 256).half()
    w = torch.randn(100, 256).half()
    got = torch.empty(1, 100).half()
    ts._dense_gemv[(7,)](x, w, got, 100, 256, w.stride(0), BLOCK_N=16, BLOCK_K=128)
    want = x.float() @ w.float().T
    assert float((got.float() - want).abs().max()) < 2e-3 * float(want.abs().max())

    # rotation and cache writes: 2 tokens of rows 3 and 1, 4 heads over 2 kv heads
    heads, kv_heads, dim, context = 4, 2, 16, 12
    qkv = torch.randn(1, 2, (heads + 2 * kv_heads) * dim).half()
    angles = torch.rand(context, dim // 2) * 3
    cos = torch.cat((angles.cos(), angles.cos()), -1).half()
    sin = torch.cat((-angles.sin(), angles.sin()), -1).half()  # signed as FastDecode keeps it
    positions, rows = torch.tensor([5, 0]), torch.tensor([3, 1])
    keys = torch.zeros(4, kv_heads, context, dim).half()
    values = torch.zeros_like(keys)
    q = torch.empty(2, heads * dim).half()
    ts._rope_write[(2, heads + 2 * kv_heads)](
        qkv, qkv.stride(0), cos, sin, positions, rows, keys, values, q,
        keys.stride(0), keys.stride(1), positions, positions, q, q, q, 0,
        HEADS=heads, KV_HEADS=kv_heads, D=dim, SHARES=1,
    )  # fmt: skip
    flat = qkv[0].float().view(2, heads + 2 * kv_heads, dim)
    qk = flat[:, : heads + kv_heads]
    c, s = cos.float()[positions][:, None], sin.float()[positions][:, None]
    rotated = qk * c + qk.roll(dim // 2, -1) * s
    assert float((q.float().view(2, heads, dim) - rotated[:, :heads]).abs().max()) < 1e-2
    for t in range(2):
        row, pos = int(rows[t]), int(positions[t])
        got_k = keys[row, :, pos].float()
        assert float((got_k - rotated[t, heads:]).abs().max()) < 1e-2
        assert torch.equal(values[row, :, pos], flat[t, heads + kv_heads :].half())
    assert int((keys != 0).any(-1).sum()) == 2 * kv_heads  # nothing else was written

    # an adapter's terms (one token, slot 2 of 3, rank 3 in slots of rank 4): x times A of
    # q, k and v (`_lora_shrink`, x the norm made from the residual stream), then low times B
    # added before the rotation
    rank, slot = 4, torch.tensor([2])
    width = heads * dim
    hidden = torch.randn(1, width).half()
    norm_w = (torch.rand(width) + 0.5).half()
    sums = (hidden.float() ** 2).view(4, -1).sum(1)  # (as 4 blocks' sums of squares)
    outs = (width, kv_heads * dim, kv_heads * dim)
    a = [torch.randn(3, rank, width).half() for _ in outs]
    b = [torch.randn(3, rank, n).half() * 0.1 for n in outs]
    for m in (*a, *b):
        m[:, 3:] = 0  # (rank 3, padded)
    low = torch.empty(3, rank)
    ts._lora_shrink[(rank,)](
        hidden, norm_w, sums, 4, 1e-5, slot, *a, low, width, rank,
        TARGETS=3, BLOCK_K=32, NORM=True, NORM_P2=4,
    )  # fmt: skip
    normed = torch.rms_norm(hidden.float(), (width,), None, 1e-5).half() * norm_w
    want_low = torch.stack([normed.float()[0] @ m[2].float().T for m in a])
    assert float((low - want_low).abs().max()) < 1e-2 * float(want_low.abs().max())
    one = qkv[:, :1].contiguous()
    keys, values = torch.zeros_like(keys), torch.zeros_like(values)
    q1 = torch.empty(1, width).half()
    ts._rope_write[(1, heads + 2 * kv_heads)](
        one, one.stride(0), cos, sin, positions, rows, keys, values, q1,
        keys.stride(0), keys.stride(1), slot, low, *b, rank,
        HEADS=heads, KV_HEADS=kv_heads, D=dim, SHARES=1, LORA_R=rank,
    )  # fmt: skip
    terms = torch.cat([low[i] @ m[2].float() for i, m in enumerate(b)])
    flat = (one[0].float() + terms).half().float().view(1, heads + 2 * kv_heads, dim)
    c, s = c[:1], s[:1]
    rotated = flat[:, :heads] * c + flat[:, :heads].roll(dim // 2, -1) * s
    assert float((q1.float().view(1, heads, dim) - rotated).abs().max()) < 1e-2
    k_cache = keys[rows[0], :, positions[0]].float()
    k_want = (
        flat[0, heads : heads + kv_heads] * c[0]
        + flat[0, heads : heads + kv_heads].roll(dim // 2, -1) * s[0]
    )
    assert float((k_cache - k_want).abs().max()) < 1e-2
    assert torch.equal(values[rows[0], :, positions[0]].float(), flat[0, heads + kv_heads :])

    # attention of each token over its own row up to its own position
    keys = torch.randn(4, kv_heads, context, dim).half()
    values = torch.randn_like(keys)
    q = torch.randn(2, heads * dim).half()
    out = torch.empty_like(q)
    ts._decode_attention[(2, kv_heads)](
        q, keys, values, positions, rows, out, 0.25, keys.stride(0), keys.stride(1),
        HEADS=heads, GROUPS=2, GROUPS_P2=2, D=dim, BLOCK_S=4,
    )  # fmt: skip

    def attention_error(q, out, rows, positions, t: int) -> float:
        """Token t's output against the torch attention over its row up to its position."""
        row, pos = int(rows[t]), int(positions[t])
        want = decode_attention(
            q[t : t + 1].float().view(1, heads, dim),
            keys[row : row + 1, :, : pos + 1].float(),
            values[row : row + 1, :, : pos + 1].float(),
            None,
            kv_heads,
            0.25,
        )
        return float((out[t].float() - want[0]).abs().max())

    for t in range(2):
        assert attention_error(q, out, rows, positions, t) < 1e-2, t

    # the same attention cut into spans, then combined: positions 0 (two spans empty), 5 and 11
    # (several blocks a span), in 2 and 4 spans
    positions, rows = torch.tensor([0, 5, 11]), torch.tensor([3, 1, 0])
    q = torch.randn(3, heads * dim).half()
    for splits in (2, 4):
        part = torch.empty(3, heads, splits, dim)
        lse = torch.empty(3, heads, splits)
        out = torch.empty_like(q)
        ts._attention_split[(3, kv_heads, splits)](
            q, keys, values, positions, rows, part, lse, 0.25, keys.stride(0), keys.stride(1),
            HEADS=heads, GROUPS=2, GROUPS_P2=2, D=dim, BLOCK_S=4, SPLITS=splits,
        )  # fmt: skip
        ts._attention_combine[(3, heads)](part, lse, out, HEADS=heads, D=dim, SPLITS=splits)
        assert bool(torch.isinf(lse[0, :, 1:]).all())  # position 0: only the first span is used
        for t in range(3):
            assert attention_error(q, out, rows, positions, t) < 1e-2, (splits, t)


if __name__ == "__main__":
    import torch

    if sys.argv[1:2] == ["step"]:
        _check_whole_step(torch, Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        _check_products(torch)
        _check_step_kernels(torch)
        print("all kernels agree")
