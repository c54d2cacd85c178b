"""What bounds the one-row 4-bit GEMV: the served kernel with parts of its work taken away.

    python3 bench/gemv_limits.py [--cold] [--json F]          (CUDA)
    TRITON_INTERPRET=1 python3 bench/gemv_limits.py --check   (CPU: the correct variants)

A copy of the served fp16-pair GEMV (`core.model.gptq_triton._gemv`) with switches, each timed
at the best of a small sweep on a 7B model's four products (as `bench/gptq_gemm.py` times
them). The diagnostic variants compute wrong results on purpose; they answer where the time
goes:

- `copy`: the served arithmetic as a copy of the kernel. Every variant's shares of K are summed
  in fp32 by one more kernel; the served time (`gt.matmul`) also casts that sum to fp16, one
  small kernel more, so `copy` is the like-for-like baseline of the others;
- `loads`: the same loads, almost no arithmetic (the bytes are xor-ed together): the bound of
  the access pattern itself;
- `no-sz`: scales and zero points of the first group reused for every group (no per-group
  load and layout change of them);
- `no-x`: x of the first group reused for every group;

and ways to run the same arithmetic that could be faster (results checked):

- `unroll2`: two groups per loop step, both groups' loads issued before either is summed
  (twice the bytes in flight per warp, no loop-carried buffer);
- `packed-sz`: scale and 1024 + zero point as one int32 per group and output (two fp16),
  one load and one layout change per group instead of two and three;
- `scale-late`: the scale applied once per int32 of weights instead of once per pair
  (`HALF2_DOT_LATE`: 18 instructions for eight weights instead of 21);
- `two-tiles`, `two-tiles-late`: each program takes two tiles of columns over the same rows, so
  each thread's x pairs serve twice the weights.

(`scale-late` and the two tiles won on an H100 and are now the served kernel's `late` and
`tiles` options, chosen per shape by `bench/gptq_gemm.py --rows 1`.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from core.model import gptq_triton as gt
from core.model.gptq_triton import _half2_dot, _pair

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_group(x_ptr, w_ptrs, s_ptr, z_ptr, sz_ptr, g, n, n_ok, stride_w, stride_s,
                GROUP: tl.constexpr, PACKED: tl.constexpr):  # fmt: skip
    P: tl.constexpr = GROUP // 8
    packed = tl.arange(0, P)
    w = tl.load(w_ptrs + g * P * stride_w, mask=n_ok[None, :], other=0)
    if PACKED:
        sz = tl.load(sz_ptr + g * stride_s + n, mask=n_ok, other=0)
        s = sz
        z = sz
    else:
        s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.int16, bitcast=True)
        z = tl.load(z_ptr + g * stride_s + n, mask=n_ok, other=0).to(tl.int16, bitcast=True)
        s = s.to(tl.int32)
        z = z.to(tl.int32)
    at = x_ptr + g * (GROUP // 2) + packed * 4
    return w, s, z, tl.load(at), tl.load(at + 1), tl.load(at + 2), tl.load(at + 3)


@triton.jit
def _sum_group(w, s, z, a, b, c, d, PACKED: tl.constexpr, LATE: tl.constexpr, ASM: tl.constexpr):
    x04 = (a & 0xFFFF) | (c << 16)
    x15 = ((a >> 16) & 0xFFFF) | (c & -65536)
    x26 = (b & 0xFFFF) | (d << 16)
    x37 = ((b >> 16) & 0xFFFF) | (d & -65536)
    if PACKED:
        s2 = (s & 0xFFFF) | (s << 16)  # the scale's fp16 twice
        z1024 = (z & -65536) | ((z >> 16) & 0xFFFF)  # 1024 + z twice
        zh = ((z >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        z64 = _pair((960.0 - zh.to(tl.float32)).to(tl.float16))  # -(z + 64) twice
    else:
        zf = z.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        s2 = _pair(s.to(tl.int16).to(tl.float16, bitcast=True))
        z1024 = _pair((zf + 1024.0).to(tl.float16))
        z64 = _pair((-(zf + 64.0)).to(tl.float16))
    zero = tl.zeros(w.shape, dtype=tl.int32)
    if LATE:
        zf = z.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        sf = s.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return _half2_dot(
            w,
            _pair((-(64.0 + zf * 0.0625)).to(tl.float16))[None, :] + zero,
            _pair((-(4.0 + zf * 0.0625)).to(tl.float16))[None, :] + zero,
            _pair((sf * 16.0).to(tl.float16))[None, :] + zero,
            x04[:, None] + zero, x15[:, None] + zero, x26[:, None] + zero, x37[:, None] + zero,
            True, ASM,
        )  # fmt: skip
    return _half2_dot(
        w, z1024[None, :] + zero, z64[None, :] + zero, s2[None, :] + zero,
        x04[:, None] + zero, x15[:, None] + zero, x26[:, None] + zero, x37[:, None] + zero,
        False, ASM,
    )  # fmt: skip


@triton.jit
def _probe(
    x_ptr, w_ptr, s_ptr, z_ptr, sz_ptr, out_ptr, N, K, stride_w, stride_s, groups_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORK: tl.constexpr, SZ_EACH: tl.constexpr,
    X_EACH: tl.constexpr, UNROLL: tl.constexpr, PACKED: tl.constexpr, LATE: tl.constexpr,
    TILES: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N * TILES + tl.arange(0, BLOCK_N)
    n_ok = n < N
    P: tl.constexpr = GROUP // 8
    packed = tl.arange(0, P)
    w_ptrs = w_ptr + packed[:, None] * stride_w + n[None, :]
    acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    bits = tl.zeros((P, BLOCK_N), dtype=tl.int32)
    if TILES == 2:  # a second tile of columns, with the same rows (and x) as the first
        nb = n + BLOCK_N
        nb_ok = nb < N
        acc_b = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    first = pid_k * groups_per_split
    last = tl.minimum(first + groups_per_split, K // GROUP)
    _w0, s0, z0, a0, b0, c0, d0 = _load_group(
        x_ptr, w_ptrs, s_ptr, z_ptr, sz_ptr, first, n, n_ok, stride_w, stride_s, GROUP, PACKED
    )
    for g in range(first, last, UNROLL):
        w, s, z, a, b, c, d = _load_group(
            x_ptr, w_ptrs, s_ptr, z_ptr, sz_ptr, g, n, n_ok, stride_w, stride_s, GROUP, PACKED
        )
        if UNROLL == 2:
            w2, s2, z2, a2, b2, c2, d2 = _load_group(
                x_ptr, w_ptrs, s_ptr, z_ptr, sz_ptr, g + 1, n, n_ok, stride_w, stride_s,
                GROUP, PACKED,
            )  # fmt: skip
        if TILES == 2:
            wb, sb, zb, _a, _b, _c, _d = _load_group(
                x_ptr, w_ptrs + BLOCK_N, s_ptr, z_ptr, sz_ptr, g, nb, nb_ok, stride_w, stride_s,
                GROUP, PACKED,
            )  # fmt: skip
        if not SZ_EACH:
            s, z = s0, z0
        if not X_EACH:
            a, b, c, d = a0, b0, c0, d0
        if WORK:
            acc += _sum_group(w, s, z, a, b, c, d, PACKED, LATE, ASM)
            if UNROLL == 2:
                acc += _sum_group(w2, s2, z2, a2, b2, c2, d2, PACKED, LATE, ASM)
            if TILES == 2:
                acc_b += _sum_group(wb, sb, zb, a, b, c, d, PACKED, LATE, ASM)
        else:
            bits ^= w ^ (s ^ z)[None, :] ^ (a ^ b ^ c ^ d)[:, None]
    if not WORK:
        acc += bits.to(tl.float32)
    tl.store(out_ptr + pid_k * N + n, tl.sum(acc, axis=0), mask=n_ok)
    if TILES == 2:
        tl.store(out_ptr + pid_k * N + nb, tl.sum(acc_b, axis=0), mask=nb_ok)


# name: (WORK, SZ_EACH, X_EACH, UNROLL, PACKED, LATE, TILES, checked)
VARIANTS = {
    "copy": (1, 1, 1, 1, 0, 0, 1, True),
    "loads": (0, 1, 1, 1, 0, 0, 1, False),
    "no-sz": (1, 0, 1, 1, 0, 0, 1, False),
    "no-x": (1, 1, 0, 1, 0, 0, 1, False),
    "unroll2": (1, 1, 1, 2, 0, 0, 1, True),
    "packed-sz": (1, 1, 1, 1, 1, 0, 1, True),
    "packed-unroll2": (1, 1, 1, 2, 1, 0, 1, True),
    "scale-late": (1, 1, 1, 1, 0, 1, 1, True),
    "two-tiles": (1, 1, 1, 1, 0, 0, 2, True),
    "two-tiles-late": (1, 1, 1, 1, 0, 1, 2, True),
}


def packed_sz(w: gt.GptqWeights) -> torch.Tensor:
    """`[G, N]` int32: the scale's fp16 in the low half, 1024 + the zero point's in the high."""
    lo = w.scales.half().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = (w.zeros.float() + 1024).half().view(torch.int16).to(torch.int32) & 0xFFFF
    return (lo | (hi << 16)).contiguous()


def run(x, w: gt.GptqWeights, sz, variant: str, block_n: int, split: int, warps: int):
    work, sz_each, x_each, unroll, packed, late, tiles, _ = VARIANTS[variant]
    groups = w.in_features // w.group
    shares, per = gt._shares(groups, split)
    if per % unroll or (groups - (shares - 1) * per) % unroll:
        raise ValueError("every share's groups must divide by the unroll")
    out = torch.empty((shares, w.out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(w.out_features, block_n * tiles), shares)
    _probe[grid](
        x.view(torch.int32), w.qweight, w.scales, w.zeros, sz, out, w.out_features,
        w.in_features, w.qweight.stride(0), w.scales.stride(0), per,
        GROUP=w.group, BLOCK_N=block_n, WORK=work, SZ_EACH=sz_each, X_EACH=x_each,
        UNROLL=unroll, PACKED=packed, LATE=late, TILES=tiles, ASM=not INTERPRETED,
        num_warps=warps,
    )  # fmt: skip
    return out.sum(0)


def check() -> None:
    """The variants that compute the product, against the dequantized matrix, on the CPU."""
    torch.manual_seed(0)
    for k, n, group in [(512, 96, 128), (256, 64, 32)]:
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32)
        scales = (torch.rand(k // group, n) * 0.02 + 0.001).half()
        zeros = torch.randint(0, 17, (k // group, n)).half()
        w = gt.GptqWeights(qweight, scales, zeros, group)
        x = torch.randn(1, k).half()
        want = (x.float() @ gt.dequantize(w))[0]
        for variant, spec in VARIANTS.items():
            if not spec[-1]:
                continue
            got = run(x, w, packed_sz(w), variant, 32, 2, 4)
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 2e-3, (variant, error)
            print(f"{variant}: error {error:.1e}")
    print("variants agree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cold", action="store_true", help="no matrix read from the L2 cache")
    args = parser.parse_args()
    if args.check or INTERPRETED:
        check()
        return
    from bench.gptq_gemm import SHAPES, card, cycle, fastest, graph_time, random_weights

    torch.manual_seed(0)
    limit = card()
    results = []
    for name, (k, n) in SHAPES.items():
        w = random_weights(k, n)
        next_w, copies = cycle(w, args.cold)
        calls = max(20, copies)
        with_sz = [(c, packed_sz(c)) for c in [next_w() for _ in range(copies)]]
        next_pair = itertools.cycle(with_sz).__next__
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        want = (x.float() @ gt.dequantize(w))[0]
        served = gt.gemv_config_for(w)
        base = graph_time(
            lambda x=x, nw=next_w, cfg=served: gt.matmul(x, nw(), gemv_config=cfg), calls
        )
        tb_s = w.nbytes / base / 1e12
        print(f"{name} {k}x{n}: served {base * 1e6:.1f} us ({tb_s:.2f} TB/s) {served}")
        for variant in args.variants.split(","):
            sweep = itertools.product([variant], (32, 64, 128), (2, 4, 8), (2, 4))
            best = fastest(
                sweep,
                lambda cfg, x=x, np=next_pair: run(x, *np(), *cfg),
                want,
                5e-3 if VARIANTS[variant][-1] else None,
                calls,
            )
            if best is None:
                continue
            seconds, cfg, _error = best
            row = {
                "shape": name, "variant": variant, "block_n": cfg[1], "split": cfg[2],
                "warps": cfg[3], "us": seconds * 1e6, "served_us": base * 1e6,
                "tb_s": w.nbytes / seconds / 1e12,
            }  # fmt: skip
            results.append(row)
            print(
                f"  {variant:14s} {seconds * 1e6:6.1f} us {row['tb_s']:.2f} TB/s, "
                f"x{seconds / base:.2f} of served  bn={cfg[1]} split={cfg[2]} warps={cfg[3]}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"copy_tb_s": limit / 1e12, "results": results}, indent=1))


if __name__ == "__main__":
    main()
