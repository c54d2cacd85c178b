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
  row the kernel is bound by its arithmetic per weight, not by memory (BENCHMARKS.md), so that
  arithmetic is kept short. With fp16 activations (CUDA's serving dtype) each int32 of weights
  is one block of inline PTX computing in fp16 pairs, as Marlin and ExLlama do: `lop3` makes
  two values at once into fp16 `1024 + q`, then pairwise (q - z), times the scale, times x,
  and the pair's sum leaves as fp32 (`HALF2_DOT`, 21 instructions for eight weights; with
  `late`, the scale once per int32, 18). With `tiles` = 2 each thread's x pairs serve two
  tiles of columns. Which of these runs, per shape, is measured (`GEMV_TABLE`). Otherwise
  fp32, three per weight: a nibble at bit 4p masked in place and or-ed with 0x4B000000 reads
  as `2^23 + q 16^p` exactly (one `lop3`), one subtraction of `2^23 + z 16^p` gives
  `(q - z) 16^p`, one multiply-add with x pre-scaled by `16^-p`. Neither converts an integer
  (conversions run at a quarter of the rate); the group's scale multiplies once per output.
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
from core.model.dense import unpack

try:  # Triton comes with CUDA builds of torch; without it the kernels are not offered
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

try:  # programmatic dependent launch (Hopper and later; Triton 3.4 and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton version
    gdc_launch_dependents = gdc_wait = None


# Triton's interpreter (`TRITON_INTERPRET=1`, the CPU check of these kernels) runs no PTX: the
# GEMV's one inline instruction is then written as Triton operations.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None


def pdl_available(device: torch.device) -> bool:
    """Whether kernels can be launched as programmatic dependent launches on `device`: a
    Hopper or later GPU and a Triton with grid dependency control (not the interpreter)."""
    return (
        gdc_wait is not None
        and not INTERPRETED
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def serves(device: torch.device) -> bool:
    """Whether the kernels run on `device`: CUDA, or any device under the interpreter (which
    checks the whole Triton path on a CPU in CI)."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


@dataclass(frozen=True)
class GemvConfig:
    """How `_gemv` splits a product: outputs per program, K shares, warps, and how many
    groups of weights each program has in flight (`stages` > 1: Triton's loop pipeliner copies
    the next groups' tiles asynchronously into shared memory while the current one is summed;
    1: each group is loaded, then summed); with fp16 activations, where the scale is applied
    (`late`), and how many column tiles share each thread's x pairs (`tiles`)."""

    block_n: int = 128
    split: int = 4
    warps: int = 4
    stages: int = 1
    late: bool = False  # fp16 pairs: the scale once per int32 of weights (`HALF2_DOT_LATE`)
    tiles: int = 1  # tiles of `block_n` columns per program, over the same rows (and x)

    def __post_init__(self) -> None:
        if self.tiles not in (1, 2):
            raise ValueError(f"a GEMV program takes 1 or 2 tiles of columns, not {self.tiles}")


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


def unpack_zeros(qzeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """GPTQ's packed zero points `[G, N/8]` int32 as the `[G, N]` integers they store (what
    GPTQModel's `torch` kernel computes with: the v2 format, z itself)."""
    return unpack(qzeros, 4, dim=1)[:, :out_features]


def unpack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """`qweight [K/8, N]` as the integers `[K, N]` (for tests and references)."""
    return unpack(qweight, 4, dim=0)


def dequantize(w: GptqWeights) -> torch.Tensor:
    """The dense `[K, N]` fp32 matrix the kernels multiply by (the reference)."""
    q = unpack_weight(w.qweight).float()
    rows = torch.arange(w.in_features, device=q.device) // w.group
    return (q - w.zeros.float()[rows]) * w.scales.float()[rows]


if triton is not None:
    # The four `lop3`s both blocks below begin with (`_nibble_pairs` as Triton operations): from
    # the int32 $1, fp16 pairs t0 = 1024 + q of values (0, 4), t2 = of (2, 6), and t1, t3 =
    # 1024 + 16 q of (1, 5) and (3, 7), left in place.
    NIBBLE_PAIRS = """
    lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
    shr.u32 w8, $1, 8;
    lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;"""
    # The two halves of the fp16 pair `a` leave as one fp32, $0.
    PAIR_SUM = """
    mov.b32 {lo, hi}, a;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 $0, flo, fhi;
    }
    """
    # One int32 of `qweight` (eight 4-bit values of consecutive k) times its eight inputs, in
    # fp16 pairs as Marlin and ExLlama compute: `lop3` puts two values into the mantissas of
    # an fp16 pair read as 1024 + q (or 1024 + 16 q for the odd ones, left in place), one pair
    # operation subtracts 1024 + z (q - z exactly), one multiplies by the scale (the weight
    # GPTQModel's own kernel multiplies by, rounded to fp16), and four multiply-adds take the
    # products with x; the two halves of the sum leave as one fp32. $1 = the int32, $2 = 1024 + z
    # twice, $3 = -(64 + z) twice, $4 = the scale twice, $5..$8 = x pairs (0, 4), (1, 5),
    # (2, 6), (3, 7).
    HALF2_DOT = tl.constexpr(
        """
    {
    .reg .b32 t0, t1, t2, t3, w8, a, c16;
    .reg .b16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 c16, 0x2C002C00;"""
        + NIBBLE_PAIRS
        + """
    sub.f16x2 t0, t0, $2;
    fma.rn.f16x2 t1, t1, c16, $3;
    sub.f16x2 t2, t2, $2;
    fma.rn.f16x2 t3, t3, c16, $3;
    mul.rn.f16x2 t0, t0, $4;
    mul.rn.f16x2 t1, t1, $4;
    mul.rn.f16x2 t2, t2, $4;
    mul.rn.f16x2 t3, t3, $4;
    mul.rn.f16x2 a, t0, $5;
    fma.rn.f16x2 a, t1, $6, a;
    fma.rn.f16x2 a, t2, $7, a;
    fma.rn.f16x2 a, t3, $8, a;"""
        + PAIR_SUM
    )

    # `HALF2_DOT` with the scale applied once per int32 instead of once per weight pair: each
    # value is made into (q - z) / 16, exactly in fp16 (one multiply-add of 1024 + q by 1/16, or
    # of 1024 + 16 q by 1/256, plus -(64 + z/16) or -(4 + z/16), both exact), the four products
    # with x are summed in fp16 pairs (at most 4 * 15/16 |x|: no overflow below |x| = 17,000),
    # and the sum is multiplied by 16 s once: 18 instructions for eight weights instead of 21.
    # The products are rounded at other places than GPTQModel's (which rounds (q - z) s to
    # fp16 first), as closely. $2 = -(64 + z/16) twice, $3 = -(4 + z/16) twice, $4 = 16 s
    # twice, $5..$8 = x pairs.
    HALF2_DOT_LATE = tl.constexpr(
        """
    {
    .reg .b32 t0, t1, t2, t3, w8, a, c16, c256;
    .reg .b16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 c16, 0x2C002C00;
    mov.b32 c256, 0x1C001C00;"""
        + NIBBLE_PAIRS
        + """
    fma.rn.f16x2 t0, t0, c16, $2;
    fma.rn.f16x2 t1, t1, c256, $3;
    fma.rn.f16x2 t2, t2, c16, $2;
    fma.rn.f16x2 t3, t3, c256, $3;
    mul.rn.f16x2 a, t0, $5;
    fma.rn.f16x2 a, t1, $6, a;
    fma.rn.f16x2 a, t2, $7, a;
    fma.rn.f16x2 a, t3, $8, a;
    mul.rn.f16x2 a, a, $4;"""
        + PAIR_SUM
    )

    @triton.jit
    def _pair(h):
        """An fp16 tensor as int32 fp16 pairs holding it twice."""
        bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return bits | (bits << 16)

    @triton.jit
    def _lane(v, HI: tl.constexpr):
        """One half of int32 fp16 pairs as fp16."""
        bits = ((v >> 16) if HI else v) & 0xFFFF
        return bits.to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _nibble_pairs(w):
        """What `HALF2_DOT`'s four `lop3`s make of one int32 of weights, as Triton operations:
        fp16 pairs 1024 + q of values (0, 4) and (2, 6), 1024 + 16 q of (1, 5) and (3, 7)."""
        t0 = (w & 0x000F000F) | 0x64006400
        t1 = (w & 0x00F000F0) | 0x64006400
        t2 = ((w >> 8) & 0x000F000F) | 0x64006400
        t3 = ((w >> 8) & 0x00F000F0) | 0x64006400
        return t0, t1, t2, t3

    @triton.jit
    def _half2_dot(w, a2, b2, s2, x04, x15, x26, x37, LATE: tl.constexpr, ASM: tl.constexpr):
        """`HALF2_DOT` (a2 = 1024 + z, b2 = -(64 + z), s2 = the scale) or, with `LATE`,
        `HALF2_DOT_LATE` (a2 = -(64 + z/16), b2 = -(4 + z/16), s2 = 16 s), each an fp16 pair, on
        tensors of one shape; without `ASM` the same steps in Triton's own operations, for the
        interpreter that checks the kernels on a CPU (no PTX there)."""
        if ASM:
            return tl.inline_asm_elementwise(
                HALF2_DOT_LATE if LATE else HALF2_DOT,
                "=f,r,r,r,r,r,r,r,r",
                [w, a2, b2, s2, x04, x15, x26, x37],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        t0, t1, t2, t3 = _nibble_pairs(w)
        out = tl.zeros(w.shape, dtype=tl.float32)
        for hi in tl.static_range(2):
            a, b, s = _lane(a2, hi), _lane(b2, hi), _lane(s2, hi)
            if LATE:  # (q - z) / 16, the products with x summed, then times 16 s
                d0, d2 = _lane(t0, hi) * 0.0625 + a, _lane(t2, hi) * 0.0625 + a
                d1, d3 = _lane(t1, hi) * 0.00390625 + b, _lane(t3, hi) * 0.00390625 + b
            else:  # (q - z) s, then the products with x summed
                d0, d2 = (_lane(t0, hi) - a) * s, (_lane(t2, hi) - a) * s
                d1, d3 = (_lane(t1, hi) * 0.0625 + b) * s, (_lane(t3, hi) * 0.0625 + b) * s
            sum_ = d0 * _lane(x04, hi) + d1 * _lane(x15, hi)
            sum_ = sum_ + d2 * _lane(x26, hi) + d3 * _lane(x37, hi)
            if LATE:
                sum_ = sum_ * s
            out += sum_.to(tl.float32)
        return out

    @triton.jit
    def _x_pairs(x_ptr, g, GROUP: tl.constexpr):
        """Group `g`'s x, read as int32 pairs (k, k + 1), as the pairs (k, k + 4) that each
        int32's eight weights take: a = (0, 1), b = (2, 3), c = (4, 5), d = (6, 7) give
        (0, 4), (1, 5), (2, 6), (3, 7), each `[GROUP/8]`."""
        at = x_ptr + g * (GROUP // 2) + tl.arange(0, GROUP // 8) * 4
        return _interleave(tl.load(at), tl.load(at + 1), tl.load(at + 2), tl.load(at + 3))

    @triton.jit
    def _interleave(a, b, c, d):
        """The pairs (0, 1), (2, 3), (4, 5), (6, 7) as (0, 4), (1, 5), (2, 6), (3, 7)."""
        x04 = (a & 0xFFFF) | (c << 16)
        x15 = ((a >> 16) & 0xFFFF) | (c & -65536)
        x26 = (b & 0xFFFF) | (d << 16)
        x37 = ((b >> 16) & 0xFFFF) | (d & -65536)
        return x04, x15, x26, x37

    @triton.jit
    def _normed(v, wv, r):
        """int32 fp16 pairs `v` of the residual stream as the norm's output: each value times
        `r` (1 / the row's RMS) rounded to fp16, times its weight from the pairs `wv`, as
        `triton_step._add_rms_norm` computes it."""
        lo = (_lane(v, False).to(tl.float32) * r).to(tl.float16) * _lane(wv, False)
        hi = (_lane(v, True).to(tl.float32) * r).to(tl.float16) * _lane(wv, True)
        lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _normed_x_pairs(x_ptr, nw_ptr, r, g, GROUP: tl.constexpr):
        """`_x_pairs` of the norm's output, computed from the residual stream `x_ptr` and the
        norm's weight `nw_ptr` (both as int32 fp16 pairs) with `r` = 1 / the row's RMS."""
        at = g * (GROUP // 2) + tl.arange(0, GROUP // 8) * 4
        a = _normed(tl.load(x_ptr + at), tl.load(nw_ptr + at), r)
        b = _normed(tl.load(x_ptr + at + 1), tl.load(nw_ptr + at + 1), r)
        c = _normed(tl.load(x_ptr + at + 2), tl.load(nw_ptr + at + 2), r)
        d = _normed(tl.load(x_ptr + at + 3), tl.load(nw_ptr + at + 3), r)
        return _interleave(a, b, c, d)

    @triton.jit
    def _half2_group(w, s, z, x04, x15, x26, x37, LATE: tl.constexpr, ASM: tl.constexpr):
        """One group's products in fp16 pairs, `[GROUP/8, BLOCK_N]` fp32: `w` its int32s, `s`
        and `z` (fp32) its columns' scales and zero points, the x pairs from `_x_pairs`."""
        zero = tl.zeros(w.shape, dtype=tl.int32)  # (the asm's operands have one shape)
        xs = x04[:, None] + zero, x15[:, None] + zero, x26[:, None] + zero, x37[:, None] + zero
        if LATE:
            z64 = _pair((-(64.0 + z * 0.0625)).to(tl.float16))[None, :] + zero
            z4 = _pair((-(4.0 + z * 0.0625)).to(tl.float16))[None, :] + zero
            s16 = _pair((s.to(tl.float32) * 16.0).to(tl.float16))[None, :] + zero
            return _half2_dot(w, z64, z4, s16, xs[0], xs[1], xs[2], xs[3], LATE, ASM)
        z1024 = _pair((z + 1024.0).to(tl.float16))[None, :] + zero
        z64 = _pair((-(z + 64.0)).to(tl.float16))[None, :] + zero
        s2 = _pair(s.to(tl.float16))[None, :] + zero
        return _half2_dot(w, z1024, z64, s2, xs[0], xs[1], xs[2], xs[3], LATE, ASM)

    @triton.jit
    def _fp32_group(x_ptr, w, s, z, g, GROUP: tl.constexpr, ASM: tl.constexpr):
        """One group's products in fp32, `[GROUP/8, BLOCK_N]`, three instructions a weight."""
        packed = tl.arange(0, GROUP // 8)
        words = (w, w >> 16)  # nibbles 0-3 in place, 4-7 in the low half of the second
        part = tl.zeros(w.shape, dtype=tl.float32)
        for half in tl.static_range(2):
            for p in tl.static_range(4):
                # The nibble at bit 4p, masked in place, is 2^23 + q 16^p as fp32; minus
                # 2^23 + z 16^p it is (q - z) 16^p exactly; x is scaled by 16^-p.
                at = x_ptr + g * GROUP + packed * 8 + 4 * half + p
                xj = tl.load(at).to(tl.float32)  # [GROUP/8]
                v = _nibbles(words[half], 15 << (4 * p), ASM)
                d = v - (z * (1 << (4 * p)) + 8388608.0)[None, :]
                part += (xj * (1.0 / (1 << (4 * p))))[:, None] * d
        return part * s.to(tl.float32)[None, :]

    @triton.jit
    def _nibbles(w, mask, ASM: tl.constexpr):
        """`(w & mask) | 0x4B000000` read as fp32: 2^23 + the masked bits, exactly. With
        `ASM`, one `lop3` instruction (the compiler otherwise emits an and and an or); without
        it the same value in Triton's own operations, for the interpreter."""
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
    def _wait_if(PDL: tl.constexpr):
        """In a kernel launched as a programmatic dependent launch (it may start while the
        kernel before it still runs): wait until the kernels before have finished and their
        writes are visible, then let the next kernel launch. Every kernel of the decode step
        waits before it reads what an earlier one wrote or writes anything, so none overtakes
        another."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _tile_loads(w_ptrs, s_ptr, z_ptr, g, n, n_ok, stride_w, stride_s, P: tl.constexpr):
        """Group g's int32s of weights `[P, BLOCK_N]`, scales and zero points (fp32) of the
        columns `n`."""
        w = tl.load(w_ptrs + g * P * stride_w, mask=n_ok[None, :], other=0)
        s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0)
        z = tl.load(z_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.float32)
        return w, s, z

    @triton.jit
    def _gemv_loads(
        w_ptrs, s_ptr, z_ptr, g, n, n_ok, nb, nb_ok, stride_w, stride_s,
        P: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
    ):  # fmt: skip
        """`_tile_loads` of group g for the first tile of columns and, with two tiles, the
        second (else the first's again, unused)."""
        w, s, z = _tile_loads(w_ptrs, s_ptr, z_ptr, g, n, n_ok, stride_w, stride_s, P)
        wb, sb, zb = w, s, z
        if TILES == 2:
            wb, sb, zb = _tile_loads(
                w_ptrs + BLOCK_N, s_ptr, z_ptr, g, nb, nb_ok, stride_w, stride_s, P
            )
        return w, s, z, wb, sb, zb

    @triton.jit
    def _gemv_products(
        acc, acc_b, x_ptr, nw_ptr, r, g, w, s, z, wb, sb, zb,
        GROUP: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr, LATE: tl.constexpr,
        TILES: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        """`acc` (and with two tiles `acc_b`) plus group g's products with x (with `NORM`, x
        is the norm's output, made from the residual stream: `_normed_x_pairs`)."""
        if HALF2:
            if NORM:
                x04, x15, x26, x37 = _normed_x_pairs(x_ptr, nw_ptr, r, g, GROUP)
            else:
                x04, x15, x26, x37 = _x_pairs(x_ptr, g, GROUP)
            acc += _half2_group(w, s, z, x04, x15, x26, x37, LATE, ASM)
            if TILES == 2:
                acc_b += _half2_group(wb, sb, zb, x04, x15, x26, x37, LATE, ASM)
        else:
            acc += _fp32_group(x_ptr, w, s, z, g, GROUP, ASM)
            if TILES == 2:
                acc_b += _fp32_group(x_ptr, wb, sb, zb, g, GROUP, ASM)
        return acc, acc_b

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
        nw_ptr,
        norm_sums_ptr,
        norm_blocks,
        eps,
        res_ptr,
        res_sums_ptr,
        res_count_ptr,
        slot_ptr,
        low_ptr,
        lora_b_ptr,
        rank,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HALF2: tl.constexpr,
        ASM: tl.constexpr,
        STAGES: tl.constexpr,
        LATE: tl.constexpr,
        TILES: tl.constexpr,
        NORM: tl.constexpr = False,
        NORM_P2: tl.constexpr = 1,
        RESIDUAL: tl.constexpr = False,
        LORA_R: tl.constexpr = 0,
        PDL: tl.constexpr = False,
    ):
        """One row. With `HALF2` (fp16 activations) x comes as int32 pairs and each int32 of
        weights is one `_half2_dot`; otherwise fp32 arithmetic, three
        instructions a weight. With `TILES` = 2 a program takes two tiles of `BLOCK_N` columns
        over the same rows, so each thread's x pairs serve twice the weights. With `PDL`
        (launched as a programmatic dependent launch) the first group's weights, which no
        earlier kernel writes, are read while the kernel before (which writes x) still runs.

        The decode step's RMS norms can ride on its GEMVs instead of running as kernels of
        their own. With `RESIDUAL` this GEMV's output is added to the residual stream
        `res_ptr [N]` (fp16): the last program to finish each block of columns (counted in
        `res_count_ptr`, zero before the launch) adds the shares of K to the stream in share
        order, stores it, and writes the block's sum of squares to `res_sums_ptr`. With `NORM`
        (fp16 pairs only) x is that stream, and each program makes the norm's output from it
        as it reads it: 1 / RMS from the `norm_blocks` sums of squares at `norm_sums_ptr`
        (summed in one order, so every program gets the same number), times the norm's weight
        `nw_ptr`. With `LORA_R` (> 0) the output gets an adapter's term: its `rank` inputs
        `low_ptr` (x times A, `_lora_shrink`) times B.T `[slots, rank, N]` at `lora_b_ptr`, of
        the slot `slot_ptr` holds (`_lora_expand`); added to the stream with `RESIDUAL`, else
        to the first share of K."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N * TILES + tl.arange(0, BLOCK_N)
        n_ok = n < N
        nb = n + BLOCK_N  # (the second tile's columns, with TILES = 2)
        nb_ok = nb < N
        P: tl.constexpr = GROUP // 8  # int32 rows of one group
        w_ptrs = w_ptr + tl.arange(0, P)[:, None] * stride_w + n[None, :]
        # Products accumulate elementwise in [GROUP/8, BLOCK_N] and are summed over K once
        # at the end: a sum per group would shuffle between threads eight times a group.
        acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((P, BLOCK_N), dtype=tl.float32)
        first = pid_k * groups_per_split
        last = tl.minimum(first + groups_per_split, K // GROUP)
        r = 1.0
        if PDL:  # the first group's weights before the wait for x (written by the kernel before)
            w, s, z, wb, sb, zb = _gemv_loads(
                w_ptrs, s_ptr, z_ptr, first, n, n_ok, nb, nb_ok, stride_w, stride_s, P, BLOCK_N,
                TILES,
            )  # fmt: skip
            _wait_if(PDL)
            if NORM:
                r = _inverse_rms(norm_sums_ptr, norm_blocks, K, eps, NORM_P2)
            acc, acc_b = _gemv_products(
                acc, acc_b, x_ptr, nw_ptr, r, first, w, s, z, wb, sb, zb, GROUP, HALF2, ASM,
                LATE, TILES, NORM,
            )  # fmt: skip
            first += 1
        elif NORM:
            r = _inverse_rms(norm_sums_ptr, norm_blocks, K, eps, NORM_P2)
        for g in tl.range(first, last, num_stages=STAGES):
            w, s, z, wb, sb, zb = _gemv_loads(
                w_ptrs, s_ptr, z_ptr, g, n, n_ok, nb, nb_ok, stride_w, stride_s, P, BLOCK_N, TILES
            )
            acc, acc_b = _gemv_products(
                acc, acc_b, x_ptr, nw_ptr, r, g, w, s, z, wb, sb, zb, GROUP, HALF2, ASM, LATE,
                TILES, NORM,
            )  # fmt: skip
        col = tl.sum(acc, axis=0)
        if LORA_R > 0 and not RESIDUAL:  # the adapter's term, on the first share of K
            col = _on_first_share(
                col, pid_k, slot_ptr, low_ptr, lora_b_ptr, rank, n, n_ok, N, LORA_R
            )
        tl.store(out_ptr + pid_k * N + n, col, mask=n_ok)
        if TILES == 2:
            col_b = tl.sum(acc_b, axis=0)
            if LORA_R > 0 and not RESIDUAL:
                col_b = _on_first_share(
                    col_b, pid_k, slot_ptr, low_ptr, lora_b_ptr, rank, nb, nb_ok, N, LORA_R
                )  # fmt: skip
            tl.store(out_ptr + pid_k * N + nb, col_b, mask=nb_ok)
        if RESIDUAL:
            tl.debug_barrier()  # (every thread's share stored before the block's count rises)
            shares = tl.num_programs(1)
            arrived = tl.atomic_add(res_count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == shares - 1:  # the block's last share: add them all to the stream
                squares = _add_shares(
                    out_ptr, res_ptr, n, n_ok, N, shares, slot_ptr, low_ptr, lora_b_ptr, rank,
                    LORA_R,
                )  # fmt: skip
                if TILES == 2:
                    squares += _add_shares(
                        out_ptr, res_ptr, nb, nb_ok, N, shares, slot_ptr, low_ptr, lora_b_ptr,
                        rank, LORA_R,
                    )  # fmt: skip
                tl.store(res_sums_ptr + pid_n, squares)

    @triton.jit
    def _inverse_rms(sums_ptr, blocks, H, eps, P2: tl.constexpr):
        """1 / the RMS of a row of `H` from its blocks' sums of squares (`_add_shares`)."""
        at = tl.arange(0, P2)
        sums = tl.load(sums_ptr + at, mask=at < blocks, other=0.0, cache_modifier=".cg")
        return tl.rsqrt(tl.sum(sums, axis=0) / H + eps)

    @triton.jit
    def _lora_expand(slot_ptr, low_ptr, b_ptr, rank, cols, ok, width, R: tl.constexpr):
        """An adapter's term for the output columns `cols`, fp32: its `rank` inputs `low_ptr`
        (fp32) times B.T `[slots, rank, width]` of the slot at `slot_ptr`."""
        r = tl.arange(0, R)
        r_ok = r < rank
        slot = tl.load(slot_ptr).to(tl.int64)
        low = tl.load(low_ptr + r, mask=r_ok, other=0.0)
        at = b_ptr + (slot * rank + r[:, None]) * width + cols[None, :]
        b = tl.load(at, mask=r_ok[:, None] & ok[None, :], other=0.0)
        return tl.sum(low[:, None] * b.to(tl.float32), axis=0)

    @triton.jit
    def _on_first_share(
        col, pid_k, slot_ptr, low_ptr, b_ptr, rank, cols, ok, width, R: tl.constexpr
    ):
        """`col` (a share of K of the output columns `cols`) plus, in the first share only,
        the adapter's term for them (`_lora_expand`)."""
        if pid_k == 0:
            col += _lora_expand(slot_ptr, low_ptr, b_ptr, rank, cols, ok, width, R)
        return col

    @triton.jit
    def _add_shares(
        out_ptr, res_ptr, n, n_ok, N, shares, slot_ptr, low_ptr, lora_b_ptr, rank,
        LORA_R: tl.constexpr,
    ):  # fmt: skip
        """The residual stream's columns `n` plus every share of K of them (in share order, as
        `triton_step._add_rms_norm` adds them) and with `LORA_R` an adapter's term, stored in
        its dtype; returns their sum of squares."""
        x = tl.load(res_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        for share in range(0, shares):
            x += tl.load(out_ptr + share * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
        if LORA_R > 0:
            x += _lora_expand(slot_ptr, low_ptr, lora_b_ptr, rank, n, n_ok, N, LORA_R)
        x16 = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + n, x16, mask=n_ok)
        x = x16.to(tl.float32)
        return tl.sum(x * x, axis=0)

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


# The fastest GEMV configuration per (K, N) of a 7B model at one row (fp16 activations, the
# fp16-pair arithmetic), from a sweep of 72 (K split 2-8 ways) on an H100 with every call
# reading its matrix from memory, not from the L2 cache, as a served step does
# (`bench/gptq_gemm.py --rows 1 --cold`, BENCHMARKS.md); other shapes get `gemv_config_for`'s
# rule. Served, this table decoded a 7B model 1.08-1.10x as fast as the previous one, chosen by
# a sweep that read one matrix again and again (mostly from L2): 377.4-390.5 against
# 349.5-356.5 tokens/s, the two alternating in each of two leases.
GEMV_TABLE: dict[str, GemvConfig] = {
    "4096x12288": GemvConfig(block_n=32, split=8, warps=2, late=True, tiles=2),  # q/k/v, 16.5 us
    "4096x4096": GemvConfig(block_n=32, split=8, warps=4),  # o, 10.4 us
    "4096x22016": GemvConfig(block_n=32, split=4, warps=2, late=True, tiles=2),  # gate/up, 25.3 us
    "11008x4096": GemvConfig(block_n=32, split=8, warps=4),  # down, 17.0 us
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


@dataclass(frozen=True)
class NormIn:
    """A GEMV's x as an RMS norm's output made as it is read (`_gemv`'s `NORM`): the residual
    stream `hidden [1, K]` (fp16), the norm's `weight [K]` and `eps`, and the sums of squares
    `sums [blocks]` that a `ResidualOut` GEMV wrote."""

    hidden: torch.Tensor
    weight: torch.Tensor
    eps: float
    sums: torch.Tensor


@dataclass(frozen=True)
class LoraTerm:
    """An adapter's term for a GEMV's outputs: `low [rank]` (fp32, x times A), times B.T
    `[slots, rank, N]` of the slot the one-element `slot` tensor holds (on the device, so a
    replayed CUDA graph serves whichever adapter the step's input names)."""

    slot: torch.Tensor
    low: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class ResidualOut:
    """Where a GEMV adds its output (`_gemv`'s `RESIDUAL`): the residual stream `hidden [1, N]`
    (fp16), one sum of squares per program's block of columns into `sums`, counting the
    block's shares in `counts` (int32, zero before the launch; both at least `blocks` long);
    with `lora`, an adapter's term added too."""

    hidden: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    lora: LoraTerm | None = None


def gemv_blocks(w: GptqWeights, cfg: GemvConfig) -> int:
    """The blocks of columns `_gemv` cuts `w`'s outputs into under `cfg` (one per program)."""
    return triton.cdiv(w.out_features, cfg.block_n * cfg.tiles)


def gemv(
    x: torch.Tensor | None,
    w: GptqWeights,
    out: torch.Tensor,
    cfg: GemvConfig,
    pdl: bool = False,
    norm: NormIn | None = None,
    residual: ResidualOut | None = None,
    lora: LoraTerm | None = None,
) -> None:
    """`_gemv` of one row `x [1, K]` into `out [split, 1, N]` (fp32 when split > 1: the caller
    sums the shares); with `pdl` as a programmatic dependent launch (`pdl_available`), which
    reads its first weights while the kernel before it finishes. With `norm` (x None) the row
    is that norm's output, made as it is read; with `residual` the GEMV also adds its output
    to that residual stream (see `_gemv`). With `lora` (or `residual.lora`) an adapter's term
    is added to the output."""
    split, per = gemv_shares(w, cfg)
    n = w.out_features
    blocks = gemv_blocks(w, cfg)
    fp16 = w.scales.dtype == torch.float16
    if norm is not None:
        x = norm.hidden
        if not fp16 or x.dtype != torch.float16 or x.shape[1] % 2 or norm.weight.dtype != x.dtype:
            raise ValueError("a GEMV makes a norm's output only from fp16 pairs")
    if x is None or x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError("the GEMV takes one contiguous row")
    if residual is not None and (
        split == 1
        or residual.hidden.shape != (1, n)
        or not residual.hidden.is_contiguous()
        or residual.counts.dtype != torch.int32
        or min(residual.sums.numel(), residual.counts.numel()) < blocks
    ):
        raise ValueError("a GEMV adds to a residual stream from fp32 shares, one count a block")
    half2 = x.dtype == torch.float16 and fp16
    if half2 and x.storage_offset() % 2 == 0 and x.shape[1] % 2 == 0:
        x = x.view(torch.int32)  # read as pairs (a row that starts mid-pair takes the fp32 way)
    elif norm is not None:
        raise ValueError("a GEMV makes a norm's output only from a row of whole fp16 pairs")
    else:
        half2 = False
    nw, norm_sums, norm_blocks, eps = out, out, 0, 0.0  # (unread without NORM)
    if norm is not None:
        nw, norm_sums, eps = norm.weight.view(torch.int32), norm.sums, norm.eps
        norm_blocks = norm.sums.numel()
    hidden, sums, counts = (out, out, out) if residual is None else (
        residual.hidden, residual.sums, residual.counts
    )  # fmt: skip
    if residual is not None and residual.lora is not None:
        if lora is not None:
            raise ValueError("one adapter's term per GEMV")
        lora = residual.lora
    slot, low, b, rank = out, out, out, 0  # (unread without LORA_R)
    if lora is not None:
        slot, low, b, rank = lora.slot, lora.low, lora.b, lora.b.shape[1]
        if b.shape[2] != n or low.numel() < rank or not b.is_contiguous():
            raise ValueError("an adapter's term needs B.T [slots, rank, N] and rank inputs")
    _gemv[(blocks, split)](
        x, w.qweight, w.scales, w.zeros, out, n, w.in_features, w.qweight.stride(0),
        w.scales.stride(0), per, nw, norm_sums, norm_blocks, eps, hidden, sums, counts,
        slot, low, b, rank,
        GROUP=w.group, BLOCK_N=cfg.block_n, HALF2=half2, ASM=not INTERPRETED, STAGES=cfg.stages,
        LATE=cfg.late, TILES=cfg.tiles, NORM=norm is not None,
        NORM_P2=power_of_two(norm_blocks), RESIDUAL=residual is not None,
        LORA_R=power_of_two(rank) if rank else 0, PDL=pdl, num_warps=cfg.warps,
        **launch_options(pdl),
    )  # fmt: skip


def power_of_two(n: int) -> int:
    """The smallest power of two at least `n` (1 for 0)."""
    return 1 << max(0, int(n) - 1).bit_length()


def launch_options(pdl: bool) -> dict[str, bool]:
    """A kernel launch's options for `pdl` (none without it: the interpreter takes none)."""
    return {"launch_pdl": True} if pdl else {}


def matmul(
    x: torch.Tensor,
    w: GptqWeights,
    *,
    gemv_config: GemvConfig | None = None,
    gemm_config: GemmConfig | None = None,
    gemv_rows: int = GEMV_ROWS,
    pdl: bool = False,
) -> torch.Tensor:
    """`x [M, K] @ W` -> `[M, N]` in x's dtype; the GEMV for one row (when `gemv_rows` is
    not 0; with `pdl` as a programmatic dependent launch), else the GEMM."""
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
        gemv(x, w, partial, cfg, pdl)
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
