"""4-bit matrices in the layout the C++ step's fp32 products read (`linear_q4_avx2`).

On a CPU without bf16 the model serves in fp32 and the loader dequantizes each GPTQ layer once
into a dense fp32 layer (`core.model.loader`): prompts run as dense products, but a decode step
then reads 32 bits per weight. Decode steps instead read the 4-bit codes, packed here once at
load from the GPTQ tensors, with integer products (`decode_cpu.cpp`): 4 bits per weight plus an
fp16 scale and offset per group of inputs and output, 5 bits in all for groups of 32.

The layout: `packed [out, in / 2]` uint8 whose flat order is `[out / 16, in / 2, 8, 2]`: for
each block of 16 outputs and each pair of inputs (2h, 2h + 1), byte (k, e) holds output k's
code for input 2h + e in its low nibble and output k + 8's in its high nibble, so that one
16-byte load widened to int16 holds 32 weights as `vpmaddwd`'s pairs. `scale_offsets [groups,
2 out]` fp16: for each group and 16 outputs their 16 scales then their 16 offsets, the weight
being `scale * code + offset` (`offset = residual - scale * zero`, which for the embedded build
is the GGUF's own fp16 offset, exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.model.kernels import cpu_flags
from core.model.residuals import residual_of

BLOCK = 16  # outputs per block of the layout


def cpu_runs_it() -> bool:
    """Whether this CPU has what the C++ step's fp32 products are built with (AVX2, FMA and
    F16C): elsewhere (an ARM CPU, an x86 one older than 2013) the codes are not kept."""
    return {"avx2", "fma", "f16c"} <= cpu_flags()


@dataclass(frozen=True)
class Q4Matrix:
    """One 4-bit matrix (or several sharing their input, concatenated along the outputs)."""

    packed: torch.Tensor  # uint8 [out, in / 2], flat order [out / 16, in / 2, 8, 2]
    scale_offsets: torch.Tensor  # fp16 [groups, 2 out]
    group: int

    @property
    def in_features(self) -> int:
        return int(self.packed.shape[1]) * 2

    @staticmethod
    def concat(parts: list[Q4Matrix]) -> Q4Matrix:
        """Matrices reading the same input as one (blocks of 16 outputs stay whole)."""
        if len(parts) == 1:
            return parts[0]
        if len({(p.group, p.in_features) for p in parts}) != 1:
            raise ValueError("matrices of one product need the same inputs and group size")
        return Q4Matrix(
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scale_offsets for p in parts], dim=1),
            parts[0].group,
        )

    def codes(self) -> torch.Tensor:
        """The codes `[out, in]` uint8 (for tests and references)."""
        out, pairs = self.packed.shape
        blocks = self.packed.view(out // BLOCK, pairs, BLOCK // 2, 2)  # [block, pair, k, e]
        low, high = blocks & 15, blocks >> 4
        halves = torch.stack((low, high), 1)  # [block, half, pair, k, e]
        return halves.permute(0, 1, 3, 2, 4).reshape(out, 2 * pairs)

    def weight(self) -> torch.Tensor:
        """The dense fp32 matrix `[out, in]` the products multiply by."""
        groups = self.scale_offsets.shape[0]
        pairs = self.scale_offsets.float().view(groups, -1, 2, BLOCK)
        scales = pairs[:, :, 0].reshape(groups, -1)  # [groups, out]
        offsets = pairs[:, :, 1].reshape(groups, -1)
        return dense(self.codes(), scales, offsets, self.group)


def pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> Q4Matrix:
    """`codes [out, in]` (0-15), `scales` and `offsets [groups, out]` as a `Q4Matrix`."""
    out, inputs = codes.shape
    if out % BLOCK or inputs % 2 or group % 4 or inputs % group:
        raise ValueError(f"a {out} x {inputs} matrix in groups of {group} does not fit the layout")
    blocks = codes.to(torch.uint8).view(out // BLOCK, 2, BLOCK // 2, inputs // 2, 2)
    byte = blocks[:, 0] | (blocks[:, 1] << 4)  # [block, k, pair, e]
    packed = byte.permute(0, 2, 1, 3).contiguous().view(out, inputs // 2)
    return Q4Matrix(packed, scale_offsets(scales, offsets), group)


def scale_offsets(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`scales` and `offsets [groups, out]` as both C++ products read them: fp16 `[groups,
    2 out]`, for each group and 16 outputs their 16 scales then their 16 offsets (one 64-byte
    line per group of a block)."""
    groups = scales.shape[0]
    pair = torch.stack(
        (scales.float().view(groups, -1, BLOCK), offsets.float().view(groups, -1, BLOCK)), 2
    )
    return pair.reshape(groups, -1).to(torch.float16).contiguous()


def reads(module: Any) -> bool:
    """Whether `parts` reads a GPTQModel `torch`-kernel layer (GPTQ's own layout): 4 bits in
    int32 words, groups along consecutive inputs (no act-order)."""
    from core.model.fast import _trivial_g_idx

    group = int(getattr(module, "group_size", -1))
    return (
        int(getattr(module, "bits", 0)) == 4
        and getattr(module, "qweight", None) is not None
        and module.qweight.dtype == torch.int32
        and group > 0
        and int(module.in_features) % group == 0
        and _trivial_g_idx(module)
    )


def takes(module: Any) -> bool:
    """Whether such a layer also packs into this layout: whole blocks of outputs, groups of a
    multiple of 4 inputs, no bias (the C++ step adds none)."""
    return (
        reads(module)
        and getattr(module, "bias", None) is None
        and int(module.group_size) % 4 == 0
        and int(module.out_features) % BLOCK == 0
    )


def parts(module: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A `reads` layer's codes `[out, in]` and its fp32 scales and offsets `[groups, out]`
    (`offset = residual - scale * zero`, its zero points in GPTQ's v2 format, as GPTQModel's
    kernel computes with them, and its zero-point residual when it has one)."""
    from core.model import gptq_triton as gt

    out = int(module.out_features)
    codes = gt.unpack_weight(module.qweight)[: int(module.in_features), :out].T  # [out, in]
    zeros = gt.unpack_zeros(module.qzeros, out).float()
    scales = module.scales.float()
    offsets = -scales * zeros
    residual = residual_of(module)
    if residual is not None:
        offsets = offsets + residual
    return codes, scales, offsets


def dense(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int
) -> torch.Tensor:
    """The fp32 weight `[out, in]` of `parts`: `scale * code + offset`, each product exact in
    fp32 (an fp16 scale times a 4-bit code), one rounding in the sum. GPTQModel's own dequantize
    computes in the scales' fp16 and was up to 1e-3 off the embedded model's fp32 weights; this
    gives them exactly."""
    index = torch.arange(codes.shape[1], device=codes.device) // group
    return codes.float() * scales.T[:, index] + offsets.T[:, index]
