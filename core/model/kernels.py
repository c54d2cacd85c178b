"""Which GPTQ kernel, dtype and device serve a model here. Knows nothing about loading.

Measured on this project's 2-core CPU: transformers' default fp16 runs 2.8-3.5 tok/s; bf16 with the
AVX512-BF16 kernel that GPTQModel's `auto` picks runs ~8x faster. On CUDA, ExLlamaV2 and
Marlin are the fast serving kernels; only `torch` trains correctly there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Names accepted by the `kernel` setting: GPTQModel backend names, plus `auto`.
KNOWN_KERNELS: tuple[str, ...] = (
    "auto",
    "marlin",
    "exllama_v2",
    "triton",
    "torch",
    "torch_fused",
    "torch_int8",
    "gptq_torch_aten",
    "gptq_torch_cpu_avx512",
)

# The CUDA kernel `auto` means, from measurements (BENCHMARKS.md, "Serving speed"), by
# checkpoint. First (`AUTO_PREFERS_TRITON`) loracord's own Triton kernels, served
# through GPTQModel's `torch` kernel (which keeps the checkpoint's 4-bit layout) for the
# checkpoints they take (`triton_takes`):
# on one H100, the 7B-shaped checkpoint (g128, symmetric) decoded 354.7 tok/s at batch 1 with
# them against 201.8 with Marlin, both replayed from CUDA graphs, and they compile in seconds
# where Marlin compiles for ~3.7 minutes on a fresh machine. Then, eagerly ExLlamaV2 was the
# faster (H100: 135 vs 126 tok/s at batch 1 on a 7B-wide model, 1.6x on SmolLM2's 576-wide
# layers, which Marlin pads on every call), but GPTQModel's ExLlamaV2 launches on CUDA's legacy
# default stream and cannot be captured in a CUDA graph, while Marlin can: on the H200's
# 7B-shaped checkpoint the fast decode step ran 212.4 tok/s with Marlin in graphs against 34-50
# with ExLlamaV2 eagerly.
#
# | checkpoint                | measured (batch 1)                         | order               |
# |---------------------------|--------------------------------------------|---------------------|
# | 4-bit, no act-order, g32+ | H100: Triton 354.7, Marlin 201.8 (graphs)  | torch, then below   |
# | symmetric (most on hubs)  | H200: Marlin + graphs 212, ExLlamaV2 37    | marlin, exllama_v2  |
# | asymmetric (the embedded) | Marlin refuses it                          | exllama_v2, marlin  |
#
# A `kernel` setting other than "auto" overrides the table.
_CUDA_SERVING_ORDER = {
    True: ("marlin", "exllama_v2", "auto"),  # symmetric
    False: ("exllama_v2", "marlin", "auto"),  # asymmetric, and before the checkpoint is read
}


def triton_takes(quant: dict[str, object]) -> bool:
    """Whether loracord's Triton GPTQ kernels (`core.model.gptq_triton`, served through the
    `torch` kernel) take a checkpoint with this quantization config: 4 bits, no act-order,
    groups the kernels take (`gptq_triton.supported_group`); and whether Triton is installed."""
    from core.model import gptq_triton as gt

    try:
        bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", 128) or -1)
    except (TypeError, ValueError):
        return False
    return (
        gt.available()
        and bits == 4
        and not quant.get("desc_act", False)
        and gt.supported_group(group, group)  # (K is not known here: any K the group divides)
    )


# Whether `auto` puts the Triton kernels first. They decode 1.76x as fast as Marlin on one H100,
# and the whole `tests/gpu` (`test_triton_step.py`, and `test_cuda_engine.py`: a SmolLM2-shaped
# v2 checkpoint, adapters in one batch, concurrent requests, training beside serving) passed
# through them on an H100 (BENCHMARKS.md). False gives the CUDA kernels' order below.
AUTO_PREFERS_TRITON = True


def cuda_serving_order(symmetric: bool, triton: bool = False) -> tuple[str, ...]:
    """The kernels `kernel = "auto"` tries on CUDA for a checkpoint, in order: `torch` (with
    loracord's Triton kernels) first when they take the checkpoint (`triton_takes`) and
    `AUTO_PREFERS_TRITON` is on."""
    order = _CUDA_SERVING_ORDER[symmetric]
    return ("torch", *order) if triton and AUTO_PREFERS_TRITON else order


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: a torch device, a dtype and a GPTQModel backend name."""

    device: str
    dtype: torch.dtype
    kernel: str
    fallbacks: tuple[str, ...] = ()  # tried in order when `kernel` cannot load this checkpoint


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags, as /proc/cpuinfo lists them (none where it cannot be
    read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith("flags")]
    except OSError:
        return frozenset()
    return frozenset(flag for line in lines for flag in line.split()[2:])


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_runtime(device: str = "auto", dtype: str = "auto", kernel: str = "auto") -> Runtime:
    """Resolve the `device`, `dtype` and `kernel` settings into a concrete runtime."""
    import torch

    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if device == "cuda" and not _cuda_available():
        from core.errors import ModelError

        raise ModelError("device = 'cuda' but torch sees no CUDA GPU; set device = 'cpu' or 'auto'")
    if dtype == "auto":
        cpu_dtype = "bfloat16" if cpu_supports_bf16() else "float32"
        dtype = "float16" if device == "cuda" else cpu_dtype
    torch_dtype = getattr(torch, dtype)
    if kernel == "auto" and device == "cuda":
        # Neither kernel takes every group size / layout: fall back in order.
        first, *rest = cuda_serving_order(False)
        return Runtime(device, torch_dtype, first, tuple(rest))
    if kernel == "auto" and torch_dtype == torch.float32:
        # GPTQModel's auto pick on CPU (AVX512-BF16) dequantizes every call in fp32.
        kernel = "torch_fused"
    return Runtime(device=device, dtype=torch_dtype, kernel=kernel)
