"""GPTQ 4-bit products on CUDA as Triton kernels: the GEMV that batch-1 decode is made of.

Decoding one token reads every weight once and does two flops with each, so a step's speed is
the speed at which the 4-bit weights stream from GPU memory. GPTQModel's CUDA kernels were
written for batched products: on an H200, a 7B-shaped model's decode step spent ~2.6 ms in its
224 products where reading their 3.2 GB at the card's 4.8 TB/s takes 0.7 ms (BENCHMARKS.md).

Two kernels read GPTQ's own layout, so the checkpoint is used as loaded (no repacking, nothing
held twice): `qweight [K/8, N]` int32 with eight 4-bit values of consecutive k per int32,
`scales [G, N]` and zero points `[G, N]` for groups of `group` consecutive k.

- `_gemv` (one row, decode): each program takes `block_n` outputs and a `1/split` share of
  K; a warp reads whole rows of `qweight` (contiguous along N), so loads are coalesced. At one
  row the kernel is bound by its arithmetic per weight, not by memory, so that arithmetic is
  three instructions: the 4-bit values become floats without a conversion instruction (a
  nibble at bit 4p masked in place and or-ed with 0x4B000000 reads as fp32 `2^23 + q 16^p`
  exactly: one `lop3`), one subtraction of `2^23 + z 16^p` gives `(q - z) 16^p`, and one
  multiply-add with x pre-scaled by `16^-p`. No shift per value (one per int32 for the upper
  four), no conversion (those run at a quarter of the rate). The group's scale multiplies
  the group's partial sum, once per output.
- `_gemm` (more rows, prompts): tiles of `qweight` unpacked to fp16 in registers the same way
  (`q | 0x6400` read as fp16 is `1024 + q`), then `tl.dot` on tensor cores.

Each program writes its share of K to `partial[split, M, N]` in fp32 and the shares are summed
after: the order of the sum is fixed, so a replayed step gives the same numbers every time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from core.errors import first_line

try:  # Triton comes with CUDA builds of torch; without it the kernels are not offered
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None


# Triton's interpreter (`TRITON_INTERPRET=1`, the CPU check of these kernels) runs no PTX: the
# GEMV's one inline instruction is then written as Triton operations.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None


@dataclass(frozen=True)
class GemvConfig:
    """How `_gemv` splits a product: outputs per program, K shares, warps."""

    block_n: int = 128
    split: int = 4
    warps: int = 4


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split: int = 1
    warps: int = 4
    stages: int = 3


class GptqWeights:
    """One 4-bit GPTQ matrix (or several concatenated along N) in the kernels' form.

    `zeros` are unpacked once to fp16 `[G, N]` (a quarter of `qweight`'s bytes over a group
    of 128: 1.6% more to read). Asymmetric and symmetric checkpoints are the same to the
    kernel; act-order checkpoints (a non-trivial `g_idx`) are left to GPTQModel's kernel by
    `core.model.fast.Projection`."""

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
    ) -> None:
        k8, n = qweight.shape
        self.in_features, self.out_features = k8 * 8, n
        self.group = group if group > 0 else self.in_features
        if not supported_group(self.group, self.in_features):
            raise ValueError(f"group {group} of {self.in_features} inputs is not supported")
        if scales.shape != (self.in_features // self.group, n) or zeros.shape != scales.shape:
            raise ValueError("scales and zero points must be [groups, out_features]")
        # Views of wider matrices are fine (a module's columns of a fused q/k/v): rows may be
        # strided, columns must be contiguous; scales and zero points share one row stride.
        zeros = zeros.to(scales.dtype)
        if qweight.stride(1) != 1:
            qweight = qweight.contiguous()
        if scales.stride(1) != 1 or zeros.stride() != scales.stride():
            scales, zeros = scales.contiguous(), zeros.contiguous()
        self.qweight, self.scales, self.zeros = qweight, scales, zeros

    def columns(self, start: int, stop: int) -> GptqWeights:
        """Outputs `start:stop` as a view (no copy)."""
        return GptqWeights(
            self.qweight[:, start:stop],
            self.scales[:, start:stop],
            self.zeros[:, start:stop],
            self.group,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    @staticmethod
    def concat(parts: list[GptqWeights]) -> GptqWeights:
        """Several matrices reading the same input (q/k/v, gate/up) as one: N concatenated."""
        if len(parts) == 1:
            return parts[0]
        group = parts[0].group
        if any(p.group != group or p.in_features != parts[0].in_features for p in parts):
            raise ValueError("only matrices with the same inputs and groups concatenate")
        return GptqWeights(
            torch.cat([p.qweight for p in parts], dim=1),
            torch.cat([p.scales for p in parts], dim=1),
            torch.cat([p.zeros for p in parts], dim=1),
            group,
        )


def supported_group(group: int, in_features: int) -> bool:
    """Groups the kernels take: a power of two from 32 up that divides K."""
    return group >= 32 and group & (group - 1) == 0 and in_features % group == 0


def unpack_zeros(qzeros: torch.Tensor, out_features: int, offset: int) -> torch.Tensor:
    """GPTQ's packed zero points `[G, N/8]` int32 as `[G, N]` integers; `offset` is 1 for
    the v1 format of checkpoints on disk (stored as z - 1), 0 for GPTQModel's v2."""
    shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
    z = (qzeros[:, :, None] >> shifts) & 15
    return (z.reshape(qzeros.shape[0], -1)[:, :out_features] + offset).to(torch.int32)


def unpack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """`qweight [K/8, N]` as the integers `[K, N]` (for tests and references)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight[:, None, :] >> shifts[None, :, None]) & 15
    return q.reshape(-1, qweight.shape[1])


def dequantize(w: GptqWeights) -> torch.Tensor:
    """The dense `[K, N]` fp32 matrix the kernels multiply by (the reference)."""
    q = unpack_weight(w.qweight).float()
    rows = torch.arange(w.in_features, device=q.device) // w.group
    return (q - w.zeros.float()[rows]) * w.scales.float()[rows]


if triton is not None:

    @triton.jit
    def _nibbles(w, mask, ASM: tl.constexpr):
        """`(w & mask) | 0x4B000000` read as fp32: 2^23 + the masked bits, exactly. With
        `ASM`, one `lop3` instruction (the compiler otherwise emits an and and an or: a third
        of the GEMV's arithmetic); without it the same value in Triton's own operations, for
        the interpreter that checks the kernels on a CPU."""
        if ASM:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, $2, 0x4B000000, 0xEA;",
                "=r,r,r",
                [w, tl.zeros_like(w) + mask],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        return ((w & mask) | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        N,
        K,
        stride_w,
        stride_s,
        groups_per_split,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ASM: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        packed = tl.arange(0, GROUP // 8)  # int32 rows of one group
        w_ptrs = w_ptr + packed[:, None] * stride_w + n[None, :]
        # Products accumulate elementwise in [GROUP/8, BLOCK_N] and are summed over K once
        # at the end: a sum per group would shuffle between threads eight times a group.
        acc = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
        first = pid_k * groups_per_split
        last = tl.minimum(first + groups_per_split, K // GROUP)
        for g in range(first, last):
            w = tl.load(w_ptrs + g * (GROUP // 8) * stride_w, mask=n_ok[None, :], other=0)
            s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.float32)
            words = (w, w >> 16)  # nibbles 0-3 in place, 4-7 in the low half of the second
            part = tl.zeros((GROUP // 8, BLOCK_N), dtype=tl.float32)
            for half in tl.static_range(2):
                for p in tl.static_range(4):
                    # The nibble at bit 4p, masked in place, is 2^23 + q 16^p as fp32; minus
                    # 2^23 + z 16^p it is (q - z) 16^p exactly, and x is scaled by 16^-p.
                    at = x_ptr + g * GROUP + packed * 8 + 4 * half + p
                    xj = tl.load(at).to(tl.float32)  # [GROUP/8]
                    v = _nibbles(words[half], 15 << (4 * p), ASM)
                    d = v - (z * (1 << (4 * p)) + 8388608.0)[None, :]
                    part += (xj * (1.0 / (1 << (4 * p))))[:, None] * d
            acc += part * s[None, :]
        tl.store(out_ptr + pid_k * N + n, tl.sum(acc, axis=0), mask=n_ok)

    @triton.jit
    def _gemm(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_w,
        stride_s,
        tiles_per_split,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < M
        n_ok = n < N
        packed = tl.arange(0, BLOCK_K // 8)
        ks = tl.arange(0, BLOCK_K)
        shifts = (tl.arange(0, 8) * 4)[None, :, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * tiles_per_split
        last = tl.minimum(first + tiles_per_split, K // BLOCK_K)
        for t in range(first, last):
            k0 = t * BLOCK_K
            x = tl.load(
                x_ptr + m[:, None] * stride_xm + (k0 + ks)[None, :], mask=m_ok[:, None], other=0.0
            ).to(tl.float16)
            w = tl.load(
                w_ptr + (k0 // 8 + packed)[:, None] * stride_w + n[None, :],
                mask=n_ok[None, :],
                other=0,
            )  # [BLOCK_K/8, BLOCK_N]
            q = (w[:, None, :] >> shifts) & 15  # [BLOCK_K/8, 8, BLOCK_N], k = 8 i + j
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            # 1024 + q as fp16, minus 1024 + z: exactly q - z
            q = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.float16) + 1024.0
            acc += tl.dot(x, q - z[None, :]).to(tl.float32) * s[None, :]
        tl.store(
            out_ptr + pid_k * M * N + m[:, None] * N + n[None, :],
            acc,
            mask=m_ok[:, None] & n_ok[None, :],
        )


# The GEMV serves one row; from 2 rows the GEMM (it beat a GEMV of up to 8 rows at 4 rows on
# every shape of the sweep).
GEMV_ROWS = 1


# The fastest GEMV configuration per (K, N) of a 7B model at one row, from a sweep of 48 on an
# H100 (`bench/gptq_gemm.py --rows 1`, BENCHMARKS.md); other shapes get `gemv_config_for`'s rule.
GEMV_TABLE: dict[str, GemvConfig] = {
    "4096x12288": GemvConfig(block_n=32, split=4, warps=2),  # q/k/v, 16.5 us
    "4096x4096": GemvConfig(block_n=32, split=8, warps=2),  # o, 9.0 us
    "4096x22016": GemvConfig(block_n=64, split=8, warps=4),  # gate/up, 29.8 us
    "11008x4096": GemvConfig(block_n=32, split=8, warps=2),  # down, 15.0 us
}


def gemv_config_for(w: GptqWeights) -> GemvConfig:
    """The GEMV configuration for a matrix: from the table when its shape is there, else
    small column blocks split 8 ways along K (the winners' pattern), fewer for short K."""
    key = f"{w.in_features}x{w.out_features}"
    if key in GEMV_TABLE:
        return GEMV_TABLE[key]
    groups = w.in_features // w.group
    return GemvConfig(block_n=32 if w.out_features >= 8192 else 64, split=min(8, groups))


def default_gemm(m: int, n: int) -> GemmConfig:
    """A GEMM tiling for M rows: small tiles split along K while few tiles cover M x N
    (batched decode), larger tiles for prompts. The decode tilings are the fastest of a sweep
    on an H100 for each of a 7B model's four products (`bench/gptq_gemm.py`, BENCHMARKS.md):
    at 4 rows (16, 64, 64, split 4) won on all four; at 32 rows (32, 128, 64, split 4) on q/k/v
    and within 10% of the best elsewhere."""
    if m <= 16:
        return GemmConfig(16, 64, 64, split=4)
    if m <= 32:
        return GemmConfig(32, 128, 64, split=4)
    if m <= 128:
        return GemmConfig(64, 64, 64, split=1)
    return GemmConfig(64, 128, 64, split=1, warps=4, stages=3)


def _shares(steps: int, split: int) -> tuple[int, int]:
    """(shares, loop steps per share) for `steps` steps along K split about `split` ways."""
    per = triton.cdiv(steps, max(1, min(split, steps)))
    return triton.cdiv(steps, per), per


def gemv_shares(w: GptqWeights, cfg: GemvConfig) -> tuple[int, int]:
    """(shares of K, groups per share) that `_gemv` runs for `w` under `cfg`."""
    return _shares(w.in_features // w.group, cfg.split)


def partials(x: torch.Tensor, shares: int, n: int) -> torch.Tensor:
    """The output of a kernel run in `shares` shares of K, `[shares, M, N]`: in x's dtype when
    there is one share (the result as it is), else fp32 shares to sum (`summed`)."""
    dtype = x.dtype if shares == 1 else torch.float32
    return torch.empty((shares, x.shape[0], n), dtype=dtype, device=x.device)


def summed(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[shares, M, N]` -> `[M, N]` in `dtype`, the shares added in a fixed order."""
    return (partial[0] if partial.shape[0] == 1 else partial.sum(0)).to(dtype)


def gemv(
    x: torch.Tensor,
    w: GptqWeights,
    out: torch.Tensor,
    cfg: GemvConfig,
) -> None:
    """`_gemv` of one row `x [1, K]` into `out [split, 1, N]` (fp32 when split > 1: the caller
    sums the shares)."""
    if x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError("the GEMV takes one contiguous row")
    split, per = gemv_shares(w, cfg)
    n = w.out_features
    grid = (triton.cdiv(n, cfg.block_n), split)
    _gemv[grid](
        x, w.qweight, w.scales, w.zeros, out, n, w.in_features, w.qweight.stride(0),
        w.scales.stride(0), per,
        GROUP=w.group, BLOCK_N=cfg.block_n, ASM=not INTERPRETED,
        num_warps=cfg.warps,
    )  # fmt: skip


def matmul(
    x: torch.Tensor,
    w: GptqWeights,
    *,
    gemv_config: GemvConfig | None = None,
    gemm_config: GemmConfig | None = None,
    gemv_rows: int = GEMV_ROWS,
) -> torch.Tensor:
    """`x [M, K] @ W` -> `[M, N]` in x's dtype; the GEMV for one row (when `gemv_rows` is
    not 0), else the GEMM."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    if k != w.in_features:
        raise ValueError(f"x has {k} features, the weight {w.in_features}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n = w.out_features
    if m <= min(gemv_rows, 1):
        cfg = gemv_config or gemv_config_for(w)
        partial = partials(x, gemv_shares(w, cfg)[0], n)
        gemv(x, w, partial, cfg)
    else:
        cfg2 = gemm_config or default_gemm(m, n)
        block_k = min(cfg2.block_k, w.group)
        split, per = _shares(k // block_k, cfg2.split)
        partial = partials(x, split, n)
        grid = (triton.cdiv(m, cfg2.block_m), triton.cdiv(n, cfg2.block_n), split)
        _gemm[grid](
            x, w.qweight, w.scales, w.zeros, partial, m, n, k, x.stride(0),
            w.qweight.stride(0), w.scales.stride(0), per,
            GROUP=w.group, BLOCK_M=cfg2.block_m, BLOCK_N=cfg2.block_n, BLOCK_K=block_k,
            num_warps=cfg2.warps, num_stages=cfg2.stages,
        )  # fmt: skip
    return summed(partial, x.dtype)


def self_check(w: GptqWeights) -> str | None:
    """Run both kernels once on `w` against the dequantized matrix: None when they agree,
    else why not (a compile error on this GPU, a wrong result). The first matrix of a model
    is checked before any module is switched to these kernels, so a GPU or Triton version
    they do not work on keeps GPTQModel's kernel instead of failing every request."""
    try:
        generator = torch.Generator(device=w.qweight.device).manual_seed(0)
        x = torch.randn((3, w.in_features), generator=generator, device=w.qweight.device).to(
            w.scales.dtype
        )
        want = x.float() @ dequantize(w)
        scale = float(want.abs().max()) or 1.0
        for rows in (1, 3):
            got = matmul(x[:rows], w).float()
            error = float((got - want[:rows]).abs().max()) / scale
            if not bool(got.isfinite().all()) or error > 1e-2:
                return f"{rows}-row product off by {error:.3g} of its largest value"
    except Exception as e:  # any failure means: do not serve through these kernels
        return f"{type(e).__name__}: {first_line(e)}"
    return None
