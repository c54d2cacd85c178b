"""The decode step made fast: what a step costs when every row feeds one token.

The plain path (`BatchModel.step`) calls each layer's Hugging Face modules as they are: per
layer three separate q/k/v products and two for gate/up, each through the kernel's Python
wrapper, a norm of seven operations, rotary embedding from a table rebuilt every step, and an
attention of a dozen small operations. On the 2-core CPU the embedded model spent about half of
a 1-row step outside its matrix products; on a GPU a 7B step was 87% host time (BENCHMARKS.md).

`FastDecode` runs the same arithmetic for the steady state of serving, rows decoding one token
each (prompt chunks stay on the plain path; `BatchModel.step` splits a step that has both):

- linears that read the same input run as one product: q/k/v and gate/up, their packed 4-bit
  weights (the AVX512 CPU kernel) or dense weights concatenated once at start, the modules
  keeping views of the fused weights so nothing is held twice;
- each norm is one `torch.rms_norm`; q and k are rotated together from a precomputed table;
- attention is one call per layer over each row's cache (`decode_attention`, which the plain
  path's decoding rows share);
- on a GPU, `CudaGraphs` captures the whole step as a CUDA graph per bucket of rows, cached
  span and adapter mix, and replays it: one launch instead of ~1,500 per step.

The fast and the plain path compute the same function: `tests/test_fast.py` checks that they
choose the same greedy tokens in fp32, with and without adapters (and the C++ CPU step, whose
products take int16 activations, logit by logit within 2e-3 of the logits' range).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.errors import first_line
from core.model import q4_cpu
from core.model.residuals import correction, residual_of
from core.model.scheduler import Segment

if TYPE_CHECKING:
    from core.model.batch import BatchModel
    from core.model.lora import LoraStep

log = logging.getLogger(__name__)


class Projection:
    """Linear layers that read the same input, as one `[T, sum(out)]` product where their
    kernel allows it (`kind` says which: "avx512" or "dense" fused, else "modules", each
    called in turn)."""

    def __init__(self, modules: list[Any]) -> None:
        self.modules = modules
        self.sizes = [int(m.out_features) for m in modules]
        self.kind = "modules"
        self.packed: tuple[torch.Tensor, ...] = ()
        # fp32 zero-point residuals `[groups, sum(out)]` the fused product adds itself
        # (`core.model.residuals`); None when the checkpoint has none or the product holds them
        self.residual: torch.Tensor | None = None
        self.triton: Any = None  # GptqWeights of the fused Triton product
        # the 4-bit codes of dense layers dequantized once (`core.model.q4_cpu`), for the C++ step
        self.q4: Any = None
        self.group = 0
        self.bias: torch.Tensor | None = None
        self._call: Callable[[torch.Tensor], torch.Tensor] = self._each
        biases = [getattr(m, "bias", None) for m in modules]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            return  # a bias on some of them only: keep them apart
        if all(type(m) is torch.nn.Linear for m in modules):
            self._fuse_dense()
        elif all(type(m).__name__ == "TorchCpuAvx512Linear" for m in modules):
            self._fuse_avx512()
        elif all(type(m).__name__ == "TorchLinear" for m in modules):
            self._fuse_triton()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)

    def _each(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _share(self, name: str, fused: torch.Tensor, parameter: bool) -> None:
        """Point each module's `name` at its rows of `fused`: the plain path keeps working on
        the same memory."""
        start = 0
        for module, size in zip(self.modules, self.sizes, strict=True):
            part = fused[start : start + size]
            if parameter:
                setattr(module, name, torch.nn.Parameter(part, requires_grad=False))
            else:
                setattr(module, name, part)
            start += size

    def _fuse_dense(self) -> None:
        weight = self.modules[0].weight
        bias = self.modules[0].bias
        if len(self.modules) > 1:
            weight = torch.cat([m.weight for m in self.modules])
            self._share("weight", weight, parameter=True)
            if bias is not None:
                bias = torch.cat([m.bias for m in self.modules])
                self._share("bias", bias, parameter=True)
        self.kind = "dense"
        self._call = lambda x: F.linear(x, weight, bias)
        codes = [m.__dict__.get("loracord_q4") for m in self.modules]
        if bias is None and all(c is not None for c in codes):
            try:
                self.q4 = q4_cpu.Q4Matrix.concat(codes)
            except ValueError:
                return
            self.group = self.q4.group

    def _fuse_avx512(self) -> None:
        first = self.modules[0]
        kernel = type(first).gemm_int4_qzero_group_scaled_cpu_kernel
        group = int(first.group_size)
        if kernel is None or not all(
            getattr(m, "linear_mode", None) == "inference"
            and getattr(m, "_cpu_transformed", False)
            and m._ret_idx_is_identity()
            and int(m.group_size) == group
            for m in self.modules
        ):
            return
        # The kernel's packed layout keeps each block of 32 output rows together, so packed
        # weights concatenate along the output dimension; scales and zero points are
        # `[groups, out]`, concatenated along their second dimension (small, copied).
        qweight = first.qweight
        qzeros, scales, bias = first.qzeros, first.scales, first.bias
        if len(self.modules) > 1:
            qweight = torch.cat([m.qweight for m in self.modules])
            self._share("qweight", qweight, parameter=False)
            qzeros = torch.cat([m.qzeros for m in self.modules], dim=1)
            scales = torch.cat([m.scales for m in self.modules], dim=1)
            if bias is not None:
                bias = torch.cat([m.bias for m in self.modules])
        self.bias = bias
        self.kind = "avx512"
        self.packed = (qweight, qzeros, scales)  # for the C++ step
        self.group = group
        self.residual = self._residuals()
        residual = self.residual
        if residual is None:
            self._call = lambda x: kernel(x.contiguous(), qweight, qzeros, scales, group, bias)
            return

        def call(x: torch.Tensor) -> torch.Tensor:
            out = kernel(x.contiguous(), qweight, qzeros, scales, group, bias)
            return out + correction(x, residual).to(out.dtype)  # as the modules' hooks add it

        self._call = call

    def _residuals(self) -> torch.Tensor | None:
        """The modules' zero-point residuals side by side (zeros for a module without), or
        None when none has any."""
        found = [residual_of(m) for m in self.modules]
        if all(r is None for r in found):
            return None
        groups = next(r for r in found if r is not None).shape[0]
        parts = [
            r if r is not None else torch.zeros(groups, size, device=self.modules[0].qweight.device)
            for r, size in zip(found, self.sizes, strict=True)
        ]
        return torch.cat(parts, dim=1).contiguous()

    def _fuse_triton(self) -> None:
        """GPTQModel's `torch` kernel on CUDA keeps the checkpoint's layout, which the Triton
        products read as it is (`core.model.gptq_triton`): q/k/v and gate/up are concatenated
        along their outputs, each module keeps a view of its columns and is served by the
        same kernels (the plain path's prompts included), so nothing is held twice and the
        kernel never dequantizes a whole matrix per call."""
        from core.model import gptq_triton as gt

        if not all(triton_takes_module(m) for m in self.modules):
            return
        fused = gt.GptqWeights.concat([torch_kernel_weights(m) for m in self.modules])
        device = str(fused.qweight.device)
        checked = device in _TRITON_CHECKED  # the first matrix of a model, once per device
        problem = triton_check(fused)
        if problem is not None:
            if not checked:
                log.warning(
                    "the Triton GPTQ kernels are off, serving through GPTQModel's: %s", problem
                )
            return
        start = 0
        for module, size in zip(self.modules, self.sizes, strict=True):
            view = fused.columns(start, start + size)
            if len(self.modules) > 1:
                module.qweight = view.qweight
                module.scales = view.scales
            module.forward = _triton_forward(view, module.out_features)
            start += size
        self.triton = fused
        self.group = fused.group
        self.kind = "triton"
        self._call = lambda x: gt.matmul(x, fused)


def torch_kernel_weights(module: Any) -> Any:
    """The matrix GPTQModel's `torch` kernel (`TorchLinear`) multiplies by, as `GptqWeights`.

    That kernel computes with its zero points as they are in memory (GPTQ's v2 format, z
    itself): a v1 checkpoint (stored as z - 1) is converted when it loads, and a checkpoint
    saved as v2 is read as it is, but then the module's format flag (`qzero_format()`) keeps
    its default of 1. So the flag is not read: trusting it took one step off every zero point
    of v2 checkpoints (the embedded model's format)."""
    from core.model import gptq_triton as gt

    zeros = gt.unpack_zeros(module.qzeros, int(module.out_features)).to(module.scales.dtype)
    return gt.GptqWeights(module.qweight, module.scales, zeros, int(module.group_size))


# Device -> None when the Triton products passed their check there, else why they did not.
_TRITON_CHECKED: dict[str, str | None] = {}


def triton_takes_module(module: Any) -> bool:
    """Whether loracord's Triton kernels serve this GPTQModel `torch`-kernel module: on a
    device they run on, 4 bits, no bias, a group size they take, no act-order, no zero-point
    residuals (`core.model.residuals`: the fp16-pair GEMV subtracts its zero points at a
    magnitude where fp16 holds whole numbers only, so it cannot fold them in)."""
    from core.model import gptq_triton as gt

    return (
        gt.serves(module.qweight.device)
        and int(module.bits) == 4
        and module.qweight.dtype == torch.int32
        and getattr(module, "bias", None) is None
        and gt.supported_group(int(module.group_size), int(module.in_features))
        and _trivial_g_idx(module)
        and residual_of(module) is None
    )


def triton_check(weights: Any) -> str | None:
    """`gptq_triton.self_check` once per device (the first matrix asked about): None when the
    Triton kernels compute right there, else why not (a kernel this GPU or Triton version does
    not compile, a wrong product)."""
    from core.model import gptq_triton as gt

    device = str(weights.qweight.device)
    if device not in _TRITON_CHECKED:
        _TRITON_CHECKED[device] = gt.self_check(weights)
    return _TRITON_CHECKED[device]


def triton_refusal(layers: list[Any]) -> str | None:
    """Why loracord's Triton kernels would not serve every one of a model's GPTQ layers (one
    they do not take, or kernels that fail their check on this device), or None when they
    would. `kernel = "auto"` on CUDA then loads the next kernel of its order instead of leaving
    those layers to GPTQModel's generic kernel, which dequantizes a whole matrix per call."""
    if not layers:
        return "no GPTQ layers"
    for layer in layers:
        if not triton_takes_module(layer):
            if getattr(layer, "bias", None) is not None:
                why = "it has a bias"
            elif residual_of(layer) is not None:
                why = "it has zero-point residuals"
            else:
                why = "its device, bits, group size or act-order"
            return f"they do not take {type(layer).__name__} layers here ({why})"
    return triton_check(torch_kernel_weights(layers[0]))


def _trivial_g_idx(module: Any) -> bool:
    """True when the checkpoint's groups are consecutive runs of K (no act-order)."""
    g_idx = getattr(module, "g_idx", None)
    if g_idx is None:
        return True
    group = int(module.group_size)
    expected = torch.arange(g_idx.shape[0], device=g_idx.device) // group
    return bool(torch.equal(g_idx.to(expected.dtype), expected))


def _triton_forward(weights: Any, out_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from core.model import gptq_triton as gt

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return gt.matmul(flat, weights).view(*x.shape[:-1], out_features)

    return forward


class Int8Linear(torch.nn.Module):
    """`x @ W.T` with W in int8 and one scale per output row: a half of bf16's bytes, a quarter
    of fp32's. Serves the LM head on a CPU (`core.model.loader`).

    Once the C++ decode step is built (`use_native`), through its `lm_head_int8`: each row of x
    quantized to int16 with one scale (finer than bf16), then integer dot products (AVX512-VNNI
    or AVX2), so reading W is the whole cost (with VNNI 2.1x faster than torch's int8 kernel for
    one row on the 2-core CPU; at 4-8 rows register-blocked, 1.4-1.6x faster than it was and
    about torch's speed: BENCHMARKS.md). Before that, bf16 activations go through
    `torch._weight_int8pack_mm`, and fp32 ones through dense products of W's rows converted a
    slice at a time (torch's int8 kernel takes 13 ms a row in fp32 on an AVX2 CPU, this 6.6 ms
    for one row and about fp32's own speed for many). Every path of the engine (plain, eager,
    C++) calls this one module, so they keep choosing the same tokens."""

    SLICE = 4096  # rows of W converted to fp32 at a time (9 MiB for SmolLM2's head)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.weight_int8: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.native: Any = None
        self._scale_f32 = self.scale.float()

    def use_native(self, module: Any) -> bool:
        """Serve through `module.lm_head_int8` when that build has it; True if it does."""
        built = module.has_vnni() or module.has_avx2()
        if not (built and self.in_features % 32 == 0 and self.in_features <= 16384):
            return False
        self.native = module
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if self.native is not None:
            out = self.native.lm_head_int8(flat, self.weight_int8, self._scale_f32)
        elif flat.dtype == torch.float32:
            out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)
            for start in range(0, self.out_features, self.SLICE):
                rows = self.weight_int8[start : start + self.SLICE].float()
                out[:, start : start + self.SLICE] = flat @ rows.T
            out *= self._scale_f32
        else:
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return out.view(*x.shape[:-1], self.out_features)


def rms_norm(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """An RMSNorm module as one `torch.rms_norm` call (seven operations in the module), or the
    module itself when it is not the Llama family's plain RMSNorm."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if weight is None or eps is None or type(module).__name__ not in _RMS_NORMS:
        return module
    shape = (int(weight.shape[0]),)
    return lambda x: torch.rms_norm(x, shape, weight, eps)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


@dataclass
class _Layer:
    attn_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Projection
    q_norm: Any
    k_norm: Any
    o: Projection
    mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Projection
    down: Projection
    act: Callable[[torch.Tensor], torch.Tensor]


class _NativeLayers:
    """Every layer of a decode step in one C++ call (`decode_cpu.cpp`) on a CPU: its small work
    (norms, rotation, cache writes, attention, residuals, SiLU) as loops, its 4-bit products its
    own integer products on the codes, x quantized to int16 per group:
    - a bf16 model (a CPU with AVX512-BF16): AVX512-VNNI products on GPTQModel's AVX512 layout,
      as its `TorchCpuAvx512Linear` layers hold it;
    - an fp32 model (a CPU without bf16): AVX2 products on the codes the loader kept beside the
      dense layers it dequantized once (`core.model.q4_cpu`).

    Eagerly a 1-row step of the embedded model runs ~35 small torch operations per layer, a
    few microseconds of dispatch each on 2 cores: 13-17 ms a step, against 3.9-5.0 here
    (BENCHMARKS.md). torch.compile of the same work measured no faster
    (its guards and wrappers cost ~100 us per call). The extension is built at first use
    (~35 s on 2 cores) into `build_dir` (the cache dir's `compiled/` when the engine loads),
    one build per CPU kind since it is compiled for this CPU."""

    SOURCE = Path(__file__).with_name("decode_cpu.cpp")

    def __init__(self, fast: FastDecode, build_dir: Path | None) -> None:
        batch = fast.batch
        self.module = native_module(build_dir)
        self.eps = float(batch.layers[0].input_layernorm.variance_epsilon)
        self.group = fast.layers[0].qkv.group
        # LoRA slots (static buffers) of q, k, v, o of every layer, in the order the C++ wants
        self.lora_a: list[torch.Tensor] = []
        self.lora_b: list[torch.Tensor] = []
        if batch.lora is not None:
            for index in range(len(batch.layers)):
                for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    self.lora_a.append(batch.lora.a[index, target])
                    self.lora_b.append(batch.lora.b[index, target])
        # The 4-bit products of qkv, o, gate_up and down of every layer: their codes, and each
        # group's scales and offsets `residual - scale * zero` in fp16, so that the zero-point
        # residuals cost nothing extra.
        projections = [p for x in fast.layers for p in (x.qkv, x.o, x.gate_up, x.down)]
        if batch.dtype == torch.float32:
            if not self.module.has_avx2():
                raise RuntimeError("its fp32 products need AVX2, FMA and F16C")
            self.matrices = [p.q4.packed for p in projections]
            self.offsets = [p.q4.scale_offsets for p in projections]
        else:
            if not self.module.has_vnni():
                raise RuntimeError("its bf16 products need AVX512-VNNI")
            self.matrices = [p.packed[0] for p in projections]
            self.offsets = [_scale_offsets(p) for p in projections]
        self.norms = [
            w
            for hf in batch.layers
            for w in (hf.input_layernorm.weight, hf.post_attention_layernorm.weight)
        ]

    @staticmethod
    def applies(fast: FastDecode) -> bool:
        batch = fast.batch
        group = fast.layers[0].qkv.group
        projections = [p for x in fast.layers for p in (x.qkv, x.o, x.gate_up, x.down)]
        if batch.dtype == torch.bfloat16:  # GPTQModel's AVX512 layers, fused
            products = all(p.kind == "avx512" and p.bias is None for p in projections)
        else:  # dense layers with their codes kept
            products = batch.dtype == torch.float32 and all(p.q4 is not None for p in projections)
        return (
            batch.device.type == "cpu"
            and products
            and all(p.group == group for p in projections)
            and batch.cache.keys[0].dtype == torch.float32
            and fast.head_dim <= 512
            and fast.heads % fast.kv_heads == 0
            and all(
                type(hf.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
                and type(hf.input_layernorm).__name__ in _RMS_NORMS
                and type(hf.post_attention_layernorm).__name__ in _RMS_NORMS
                and hf.input_layernorm.weight.dtype == batch.dtype
                and hf.post_attention_layernorm.weight.dtype == batch.dtype
                for hf in batch.layers
            )
            and all(layer.q_norm is None for layer in fast.layers)
            and (batch.lora is None or batch.lora.dtype == torch.float32)
        )

    def forward(
        self, fast: FastDecode, ids: torch.Tensor, positions: torch.Tensor, segments: list[Segment]
    ) -> torch.Tensor:
        batch = fast.batch
        hidden = self.module.decode_layers(
            batch.embed(ids),
            self.norms,
            self.matrices,
            self.offsets,
            batch.cache.keys,
            batch.cache.values,
            fast.cos.index_select(0, positions),
            fast.sin.index_select(0, positions),
            [s.row for s in segments],
            [s.start for s in segments],
            fast.heads,
            fast.kv_heads,
            fast.head_dim,
            self.eps,
            self.group,
            self.lora_a,
            self.lora_b,
            [s.slot for s in segments] if any(s.slot for s in segments) else [],
            batch.lora.ranks if batch.lora is not None else [],
        )
        return batch.lm_head(fast.norm(hidden))


def _scale_offsets(p: Projection) -> torch.Tensor:
    """A fused AVX512 product's scales and offsets as `linear_q4` reads them: fp16 `[groups,
    2 out]`, for each group and 16 outputs their 16 scales then their 16 offsets, the offset
    being `residual - scale * zero` so that the weight is `scale * code + offset`. The scales
    are the checkpoint's fp16 ones again; the offset is, for the carried-over build, the GGUF's
    own fp16 offset, and for a plain GPTQ checkpoint `-scale * zero` rounded to fp16 (within
    1/2048 of it, a fraction of a percent of one quantization step)."""
    _, qzeros, scales = p.packed
    offsets = -scales.float() * qzeros.float()
    if p.residual is not None:
        offsets = offsets + p.residual
    return q4_cpu.scale_offsets(scales, offsets)


def native_module(build_dir: Path | None) -> Any:
    """The C++ extension (`decode_cpu.cpp`: the decode step and the VNNI LM head), built for
    this CPU under `build_dir` (the temp dir when None) at first use, loaded from there after."""
    from torch.utils.cpp_extension import load

    folder = native_build_folder(build_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # Processes loading at once (the CLI beside the bot) build once: torch's builder holds an OS
    # lock on `folder/lock` while it builds, which the kernel releases if the builder is killed,
    # so a stopped build never stalls the next load.
    return load(
        name=folder.name,
        sources=[str(_NativeLayers.SOURCE)],
        # -fopenmp: `at::parallel_for` is an inline OpenMP region, serial without it (the
        # extension then shares torch's own libgomp, already loaded); `omp simd` vectorises
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=False,
    )


def native_build_folder(build_dir: Path | None) -> Path:
    """Where `native_module` builds for this CPU kind (its name is the extension's name)."""
    digest = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:10]
    root = build_dir if build_dir is not None else Path(tempfile.gettempdir()) / "loracord"
    return root / f"loracord_decode_cpu_{digest}"


def _cpu_flags() -> str:
    """This CPU's model name and instruction-set flags (the build depends on them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("flags", "model name"))]
    except OSError:
        return "unknown"
    return "".join(sorted(set(lines)))


# How a step's tokens reach the cache and read it: `(layer, k, v)` writes, `(layer, q)` attends
# and returns `[T, heads * head_dim]`.
Write = Callable[[int, torch.Tensor, torch.Tensor], None]
Attend = Callable[[int, torch.Tensor], torch.Tensor]
# The LoRA term of `(layer, target, x)`, or None for no adapter on this step.
Delta = Callable[[int, str, torch.Tensor], torch.Tensor]


class FastDecode:
    """Decode steps of a `BatchModel`: one token per row, the same numbers as its plain path."""

    def __init__(
        self, batch: BatchModel, *, native: bool = True, build_dir: Path | None = None
    ) -> None:
        self.batch = batch
        self.device = batch.device
        self.heads, self.kv_heads, self.head_dim = batch.heads, batch.kv_heads, batch.head_dim
        self._settle_kernels()
        self.layers = [self._layer(layer) for layer in batch.layers]
        self.norm = batch.norm
        context = batch.cache.context
        # Rotary table for every position, from the model's own rotary module (each position's
        # angles are computed alone, so a row of the table equals what the plain path gets).
        probe = torch.zeros(1, 1, dtype=batch.dtype, device=self.device)
        positions = torch.arange(context, device=self.device)[None]
        with torch.inference_mode():
            cos, sin = batch.rotary(probe, position_ids=positions)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()  # [context, head_dim]
        # rotate_half(x) * sin == roll(x, half) * [-sin_low, sin_high]
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).contiguous()
        kinds = {p.kind for layer in self.layers for p in (layer.qkv, layer.gate_up)}
        self.kind = "+".join(sorted(kinds))
        self.native: _NativeLayers | None = None
        self.triton: Any = None  # core.model.triton_step.TritonLayers on CUDA
        self.build_seconds = 0.0
        if native and _NativeLayers.applies(self):
            self._build_native(build_dir)
        if native:
            from core.model.triton_step import TritonLayers

            if TritonLayers.applies(self):
                if build_dir is not None:  # Triton's compiled kernels beside the C++ build
                    os.environ.setdefault("TRITON_CACHE_DIR", str(build_dir / "triton"))
                self._use_triton_step(TritonLayers(self))

    def _use_triton_step(self, layers: Any) -> None:
        """Serve through the Triton step after it gives the eager step's logits on row 0 (free
        before any request); an error (a kernel this GPU cannot compile) or a different result
        leaves the eager step, with one warning."""
        probe = [Segment(0, 0, [1], True)]
        try:
            eager = self.step(probe).float()
            self.triton = layers
            got = self.step(probe).float()
            error = float((got - eager).abs().max())
            if not bool(got.isfinite().all()) or error > 0.05 * float(eager.abs().max()):
                raise RuntimeError(f"its logits differ from the eager step's by {error:.3g}")
        except Exception as e:
            self.triton = None
            log.warning("the Triton decode step is off, decoding eagerly: %s", first_line(e))
            return
        self.kind += ", Triton step" + (" (dependent launches)" if layers.pdl else "")

    def _build_native(self, build_dir: Path | None) -> None:
        """Build (or load the cached build of) the C++ step and check it once against the
        eager step on row 0 (free before any request). A failure (no compiler, a different
        result) leaves the eager step serving, with one warning."""
        started = time.monotonic()
        head = self.batch.lm_head
        try:
            native = _NativeLayers(self, build_dir)
            probe = [Segment(0, 0, [1], True)]
            before = self.step(probe).float()
            if isinstance(head, Int8Linear) and head.use_native(native.module):
                # The C++ head against torch's products of the same int8 matrix: the same logits
                # within rounding.
                eager = self.step(probe).float()
                error = float((eager - before).abs().max())
                if error > 0.02 * float(before.abs().max()):
                    raise RuntimeError(f"its LM head differs from torch's int8 one by {error:.3g}")
            else:
                eager = before
            self.native = native
            got = self.step(probe).float()
            error = float((got - eager).abs().max())
            if not bool(got.isfinite().all()) or error > 0.05 * float(eager.abs().max()):
                raise RuntimeError(f"its logits differ from the eager step's by {error:.3g}")
        except Exception as e:
            self.native = None
            if isinstance(head, Int8Linear):
                head.native = None
            log.warning("the C++ decode step is off, decoding eagerly: %s", first_line(e))
            return
        self.build_seconds = time.monotonic() - started
        self.kind += ", native"
        if isinstance(head, Int8Linear) and head.native is not None:
            self.kind += ", VNNI head" if head.native.has_vnni() else ", int8 head"
        log.info("C++ decode step ready in %.1f s", self.build_seconds)

    def _settle_kernels(self) -> None:
        """Run each quantized linear once: some kernels repack their weights on their first
        call (GPTQModel's CPU kernels), which must happen before the weights are fused."""
        batch = self.batch
        with torch.inference_mode():
            for layer in batch.layers:
                for module in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.self_attn.o_proj,
                    layer.mlp.gate_proj,
                    layer.mlp.up_proj,
                    layer.mlp.down_proj,
                ):
                    # (the torch kernel repacks nothing; its first call would compile)
                    if type(module) is not torch.nn.Linear and (
                        type(module).__name__ != "TorchLinear"
                    ):
                        module(
                            torch.zeros(
                                1, module.in_features, dtype=batch.dtype, device=self.device
                            )
                        )

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            attn_norm=rms_norm(layer.input_layernorm),
            qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            o=Projection([attn.o_proj]),
            mlp_norm=rms_norm(layer.post_attention_layernorm),
            gate_up=Projection([mlp.gate_proj, mlp.up_proj]),
            down=Projection([mlp.down_proj]),
            act=mlp.act_fn,
        )

    # --- one step -------------------------------------------------------------------------

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        write: Write,
        attend: Attend,
        delta: Delta | None,
    ) -> torch.Tensor:
        """Logits `[T, vocab]` for T tokens, one per row, at `positions`."""
        batch = self.batch
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        count = ids.shape[0]
        q_width, k_width = heads * head_dim, kv_heads * head_dim
        cos = self.cos.index_select(0, positions)[:, None]  # [T, 1, head_dim]
        sin = self.sin.index_select(0, positions)[:, None]
        half = head_dim // 2
        hidden = batch.embed(ids)  # [T, hidden]
        for index, layer in enumerate(self.layers):
            x = layer.attn_norm(hidden)
            qkv = layer.qkv(x)
            if delta is not None:
                qkv[:, :q_width] += delta(index, "q_proj", x).to(qkv.dtype)
                qkv[:, q_width : q_width + k_width] += delta(index, "k_proj", x).to(qkv.dtype)
                qkv[:, q_width + k_width :] += delta(index, "v_proj", x).to(qkv.dtype)
            v = qkv[:, q_width + k_width :].view(count, kv_heads, head_dim)
            if layer.q_norm is not None:  # Qwen3 normalises each head before the rotation
                q = layer.q_norm(qkv[:, :q_width].view(count, heads, head_dim))
                k = layer.k_norm(
                    qkv[:, q_width : q_width + k_width].view(count, kv_heads, head_dim)
                )
                qk = torch.cat((q, k), dim=1)
            else:
                qk = qkv[:, : q_width + k_width].view(count, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            write(index, qk[:, heads:], v)
            out = attend(index, qk[:, :heads])  # [T, heads * head_dim]
            o = layer.o(out)
            if delta is not None:
                o = o + delta(index, "o_proj", out).to(o.dtype)
            hidden = hidden + o
            gate_up = layer.gate_up(layer.mlp_norm(hidden))
            inner = gate_up.shape[-1] // 2
            hidden = hidden + layer.down(layer.act(gate_up[:, :inner]) * gate_up[:, inner:])
        return batch.lm_head(self.norm(hidden))

    def step(self, segments: list[Segment]) -> torch.Tensor:
        """Logits `[n, vocab]` for n decoding segments (one token each), eagerly."""
        batch = self.batch
        device = self.device
        cache = batch.cache
        n = len(segments)
        rows = [s.row for s in segments]
        starts = [s.start for s in segments]
        ids = torch.tensor([s.tokens[0] for s in segments], device=device)
        positions = torch.tensor(starts, device=device)
        if self.native is not None:  # the C++ step: every layer in one call
            with torch.inference_mode():
                return self.native.forward(self, ids, positions, segments)
        span = max(starts) + 1
        lora: LoraStep | None = None
        if batch.lora is not None and any(s.slot for s in segments):
            lora = batch.lora.plan([s.slot for s in segments])
        if self.triton is not None:  # nine Triton kernels per layer
            with torch.inference_mode():
                rows_t = torch.tensor(rows, device=device)
                adapter = None
                if lora is not None and lora.single is not None:
                    adapter = (torch.tensor([lora.single], device=device), lora.slots)
                delta = lora.delta if lora else None
                return self.triton.forward(ids, positions, rows_t, delta, adapter)

        if n == 1:  # one row: slice copies, and no mask (the span ends at its token)
            row, start = rows[0], starts[0]

            def write(index: int, k: torch.Tensor, v: torch.Tensor) -> None:
                cache.keys[index][row, :, start] = k[0]
                cache.values[index][row, :, start] = v[0]

            def attend(index: int, q: torch.Tensor) -> torch.Tensor:
                keys = cache.keys[index][row : row + 1, :, :span]
                values = cache.values[index][row : row + 1, :, :span]
                out = decode_attention(q, keys, values, None, self.kv_heads, batch.scaling)
                return out.to(batch.dtype)

        else:
            rows_t = torch.tensor(rows, device=device)
            prefix = rows == list(range(n))
            mask = (torch.arange(span, device=device)[None, :] <= positions[:, None])[:, None, None]

            def write(index: int, k: torch.Tensor, v: torch.Tensor) -> None:
                cache.keys[index][rows_t, :, positions] = k.to(cache.keys[index].dtype)
                cache.values[index][rows_t, :, positions] = v.to(cache.values[index].dtype)

            def attend(index: int, q: torch.Tensor) -> torch.Tensor:
                keys, values = cache.keys[index], cache.values[index]
                if prefix:  # rows 0..n-1 in order: views, nothing copied
                    keys, values = keys[:n, :, :span], values[:n, :, :span]
                else:
                    keys = keys[:, :, :span].index_select(0, rows_t)
                    values = values[:, :, :span].index_select(0, rows_t)
                out = decode_attention(q, keys, values, mask, self.kv_heads, batch.scaling)
                return out.to(batch.dtype)

        with torch.inference_mode():
            return self.forward(ids, positions, write, attend, lora.delta if lora else None)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    kv_heads: int,
    scaling: float,
) -> torch.Tensor:
    """Attention of one new token per row, for the plain, fast and graph steps alike: `q [B,
    heads, head_dim]` over `keys`/`values [B, kv_heads, span, head_dim]` where `mask [B, 1, 1,
    span]` (None: every position); returns `[B, heads * head_dim]` in the cache's dtype.

    On a CPU one `scaled_dot_product_attention` (its fp32 kernel is ~4x faster than the
    products for these shapes). On a GPU plain products: inside a CUDA graph their launches
    cost nothing, and they leave no choice of fused kernel to the library at capture time."""
    rows, heads, head_dim = q.shape
    q = q.to(keys.dtype)
    if q.device.type == "cpu":
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, enable_gqa=kv_heads != heads
        )
        return out.reshape(rows, heads * head_dim)
    if mask is None:
        mask = torch.ones(rows, 1, 1, keys.shape[2], dtype=torch.bool, device=q.device)
    grouped = q.view(rows, kv_heads, heads // kv_heads, head_dim)
    scores = (grouped @ keys.transpose(-1, -2)) * scaling  # [B, kv_heads, groups, span]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return (probs @ values).view(rows, heads * head_dim)


def _bucket(value: int, buckets: list[int]) -> int:
    for size in buckets:
        if value <= size:
            return size
    return buckets[-1]


def _powers_of_two(low: int, high: int) -> list[int]:
    sizes = []
    size = low
    while size < high:
        sizes.append(size)
        size *= 2
    sizes.append(high)
    return sizes


class CudaGraphs:
    """Decode steps replayed from CUDA graphs, captured on first use per bucket.

    A graph works on fixed tensors, so a step is computed over rows `0..B-1` (B the bucket
    above the highest row decoding), attends over the first `span` positions of the cache (the
    bucket above the longest row), and takes one of three adapter forms: none, one adapter for
    all rows, or any mix (then every slot's A and B.T as one matrix each, with each row's slot
    picked by a one-hot mask: two plain products that read every adapter once). Rows inside the
    bucket that are not decoding are free (a decode-only step runs every running row); their
    dummy token writes position 0 of a free row, which its next prompt overwrites before any
    read. Capture runs once per bucket (tens of milliseconds on a 7B model); a failed capture
    turns graphs off with one warning, and steps continue eagerly."""

    def __init__(self, fast: FastDecode) -> None:
        self.fast = fast
        batch = fast.batch
        device = fast.device
        rows, context = batch.cache.rows, batch.cache.context
        self.row_buckets = _powers_of_two(1, rows)
        self.span_buckets = _powers_of_two(min(64, context), context)
        # Each row's token, position and adapter slot: the graphs' inputs, filled every step
        # with one copy from pinned memory. A bucket of B rows reads the first 3 * B values as
        # `[3, B]`, so what is copied is always contiguous on both sides.
        self.inputs = torch.zeros(3 * rows, dtype=torch.long, device=device)
        self._host = torch.zeros(3 * rows, dtype=torch.long).pin_memory()
        self._host_values = self._host.numpy()  # the same memory, written without dispatch
        self._graphs: dict[tuple[int, int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.failed: str | None = None
        self.captures = 0

    def reset(self) -> None:
        """Drop every captured graph, and their memory pool with them: a later capture must
        not name a pool that no graph holds (PyTorch asserts on it). For measurements that
        change what a step runs."""
        self._graphs.clear()
        self._pool = None

    def step(self, segments: list[Segment]) -> torch.Tensor | None:
        """Logits `[n, vocab]` for the segments, or None when graphs are off."""
        if self.failed is not None:
            return None
        rows = [s.row for s in segments]
        top = max(rows) + 1
        count = _bucket(top, self.row_buckets)
        span = _bucket(max(s.start for s in segments) + 1, self.span_buckets)
        slots = {s.slot for s in segments}
        lora = self.fast.batch.lora
        if slots == {0} or lora is None:
            mode = "none"
        elif len(slots) == 1:
            mode = "one"
        else:
            mode = "mixed"
        # token, position and slot of each row, written straight into the pinned buffer (the
        # previous step's copy from it has finished: its tokens were read back since)
        values = self._host_values[: 3 * count]
        values.fill(0)
        for s in segments:
            values[s.row], values[count + s.row], values[2 * count + s.row] = (
                s.tokens[0], s.start, s.slot,
            )  # fmt: skip
        if mode == "one":  # the free rows compute with the same adapter: harmless
            values[2 * count :] = segments[0].slot
        self.inputs[: 3 * count].copy_(self._host[: 3 * count], non_blocking=True)
        key = (count, span, mode)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                self.failed = first_line(e)
                log.warning("CUDA graphs are off, decoding eagerly: %s", self.failed)
                torch.cuda.synchronize()
                return None
        graph, logits = entry
        graph.replay()
        if rows == list(range(len(rows))):
            return logits[: len(rows)]
        return logits[rows]

    def _run(self, key: tuple[int, int, str]) -> torch.Tensor:
        count, span, mode = key
        fast = self.fast
        batch = fast.batch
        cache = batch.cache
        ids, positions, slots = self.inputs[: 3 * count].view(3, count)
        rows = torch.arange(count, device=fast.device)
        mask = (torch.arange(span, device=fast.device)[None, :] <= positions[:, None])[
            :, None, None
        ]

        def write(index: int, k: torch.Tensor, v: torch.Tensor) -> None:
            cache.keys[index][rows, :, positions] = k.to(cache.keys[index].dtype)
            cache.values[index][rows, :, positions] = v.to(cache.values[index].dtype)

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            keys = cache.keys[index][:count, :, :span]
            values = cache.values[index][:count, :, :span]
            out = decode_attention(q, keys, values, mask, fast.kv_heads, batch.scaling)
            return out.to(batch.dtype)

        delta = None
        lora = batch.lora
        if mode != "none" and lora is not None:
            if mode == "one":
                first = slots[:1]

                def delta(index: int, target: str, x: torch.Tensor) -> torch.Tensor:
                    a = lora.a[index, target].index_select(0, first)[0]  # [max_rank, in]
                    bt = lora.b[index, target].index_select(0, first)[0]  # [max_rank, out]
                    return (x.to(lora.dtype) @ a.T) @ bt

            else:
                width = lora.slots + 1
                # Each row's slot as a one-hot column (not `F.one_hot`, which checks its input
                # on the host and so cannot be captured).
                every = torch.arange(width, device=fast.device)
                pick = (slots[:, None] == every).to(lora.dtype)[:, :, None]  # [B, width, 1]

                def delta(index: int, target: str, x: torch.Tensor) -> torch.Tensor:
                    a = lora.a[index, target]  # [slots + 1, max_rank, in]
                    bt = lora.b[index, target]  # [slots + 1, max_rank, out]
                    low = x.to(lora.dtype) @ a.view(-1, a.shape[-1]).T  # every slot at once
                    low = (low.view(count, width, -1) * pick).view(count, -1)
                    return low @ bt.view(-1, bt.shape[-1])

        if fast.triton is not None:  # (one adapter: its slot on the device, for the kernels)
            adapter = (slots[:1], lora) if mode == "one" and lora is not None else None
            return fast.triton.forward(ids, positions, rows, delta, adapter)
        return fast.forward(ids, positions, write, attend, delta)

    def _capture(self, key: tuple[int, int, str]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (lazy initialisations happen outside the graph), capture, then check.

        The warm-up computes the real step eagerly; the new graph is replayed once on the same
        inputs and must give the same logits. A kernel that launches on CUDA's legacy default
        stream instead of the current one (GPTQModel's ExLlamaV2 does) is left out of the
        graph without an error, and its replay computes garbage: the check turns that into a
        `RuntimeError` naming the kernel. The replay's cache writes are undone by the caller,
        which runs the step again eagerly."""
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eager = self._run(key).float()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a hot-load copying on its own thread must not break the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._run(key)
            graph.replay()
            finite = eager.isfinite()
            error = float((logits.float() - eager).abs().where(finite, 0).max())
            scale = float(eager.abs().where(finite, 0).max())
            if not bool((logits.isfinite() == finite).all()) or error > 0.05 * scale + 1e-3:
                kernels = sorted({type(m).__name__ for m in self.fast.batch.layers[0].modules()})
                raise RuntimeError(
                    f"a replayed step differs from the eager one (max difference {error:.3g} "
                    f"of {scale:.3g}): a kernel here is not captured by CUDA graphs "
                    f"({', '.join(k for k in kernels if 'Linear' in k)})"
                )
        self._pool = graph.pool()
        self._graphs[key] = (graph, logits)
        self.captures += 1
        return graph, logits
