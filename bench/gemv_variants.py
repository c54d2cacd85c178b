"""Ways to write the one-row 4-bit GEMV, timed against each other on a 7B model's four shapes.

    python3 bench/gemv_variants.py [--json F]          (CUDA)
    TRITON_INTERPRET=1 python3 bench/gemv_variants.py --check   (CPU: results only)

At one row the 4-bit GEMV is bound by its instructions per weight, not by memory. Variants,
each swept over block sizes, shares of K and warps:

- `shift` (mode 0): the first served arithmetic (~4 instructions per weight: shift, mask,
  subtract, multiply-add).
- `mask` (mode 1): no shift per value. A nibble at bit 4p (p < 4) masked in place and or-ed
  with 0x4B000000 reads as 2^23 + q 16^p, so subtracting 2^23 + z 16^p (one vector per p per
  group) gives (q - z) 16^p exactly, and x is pre-scaled by 16^-p (exact). The upper four
  nibbles take one shift by 16 per int32. ~3 instructions per weight.
- `half2` (mode 2): inline PTX as Marlin and ExLlama do, two weights per instruction: 1024 + q
  in fp16 pairs by `lop3`, (q - z) s rounded to fp16 (the values GPTQModel's own kernel
  multiplies by), products summed in fp16 pairs over an int32's eight weights, then fp32.

The served kernel (`core.model.gptq_triton._gemv`) is timed first with the committed table's
configuration: for fp16 activations it is `half2` with x read as int32 pairs, for others `mask`
with its and-or as one inline `lop3`. (Loading the next group's tile before computing on the
current one was tried too: 2-4% slower on an H200, so it is not a variant here.)
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
from core.model.gptq_triton import HALF2_DOT


@triton.jit
def _pair(a, b):
    """Two fp16 tensors as one int32 tensor of fp16 pairs (a low, b high)."""
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo | (hi << 16)


@triton.jit
def _gemv_variant(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    stride_w,
    stride_s,
    groups,
    groups_per_split,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,
):
    P: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    packed = tl.arange(0, P)
    w_ptrs = w_ptr + packed[:, None] * stride_w + n[None, :]
    first = pid_k * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    for g in range(first, last):
        w = tl.load(w_ptrs + g * P * stride_w, mask=n_ok[None, :], other=0)
        s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0)
        z = tl.load(z_ptr + g * stride_s + n, mask=n_ok, other=0)
        xg = x_ptr + g * GROUP + packed * 8
        if MODE == 0:
            zf = z.to(tl.float32) + 8388608.0
            part = tl.zeros((P, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                q = (((w >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
                xj = tl.load(xg + j).to(tl.float32)
                part += xj[:, None] * (q - zf[None, :])
            acc += part * s.to(tl.float32)[None, :]
        elif MODE == 1:
            zf = z.to(tl.float32)
            hi = w >> 16
            part = tl.zeros((P, BLOCK_N), dtype=tl.float32)
            for half in tl.static_range(2):
                src = w if half == 0 else hi
                for p in tl.static_range(4):
                    v = ((src & (15 << (4 * p))) | 0x4B000000).to(tl.float32, bitcast=True)
                    d = v - (zf * (1 << (4 * p)) + 8388608.0)[None, :]  # (q - z) 16^p, exact
                    xj = tl.load(xg + 4 * half + p).to(tl.float32) * (1.0 / (1 << (4 * p)))
                    part += xj[:, None] * d
            acc += part * s.to(tl.float32)[None, :]
        else:
            zh = z.to(tl.float32)
            z1024 = _pair((zh + 1024.0).to(tl.float16), (zh + 1024.0).to(tl.float16))
            z64 = _pair((-(zh + 64.0)).to(tl.float16), (-(zh + 64.0)).to(tl.float16))
            s2 = _pair(s.to(tl.float16), s.to(tl.float16))
            x04 = _pair(tl.load(xg + 0).to(tl.float16), tl.load(xg + 4).to(tl.float16))
            x15 = _pair(tl.load(xg + 1).to(tl.float16), tl.load(xg + 5).to(tl.float16))
            x26 = _pair(tl.load(xg + 2).to(tl.float16), tl.load(xg + 6).to(tl.float16))
            x37 = _pair(tl.load(xg + 3).to(tl.float16), tl.load(xg + 7).to(tl.float16))
            zero = tl.zeros((P, BLOCK_N), dtype=tl.int32)
            acc += tl.inline_asm_elementwise(
                HALF2_DOT,
                "=f,r,r,r,r,r,r,r,r",
                [
                    w,
                    z1024[None, :] + zero,
                    z64[None, :] + zero,
                    s2[None, :] + zero,
                    x04[:, None] + zero,
                    x15[:, None] + zero,
                    x26[:, None] + zero,
                    x37[:, None] + zero,
                ],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
    tl.store(out_ptr + pid_k * N + n, tl.sum(acc, axis=0), mask=n_ok)


MODES = {"shift": 0, "mask": 1, "half2": 2}


def run(x, w: gt.GptqWeights, mode: str, block_n: int, split: int, warps: int):
    groups = w.in_features // w.group
    shares, per = gt._shares(groups, split)
    out = torch.empty((shares, w.out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(w.out_features, block_n), shares)
    _gemv_variant[grid](
        x, w.qweight, w.scales, w.zeros, out, w.out_features, w.qweight.stride(0),
        w.scales.stride(0), groups, per,
        GROUP=w.group, BLOCK_N=block_n, MODE=MODES[mode], num_warps=warps,
    )  # fmt: skip
    return out.sum(0)


def check() -> None:
    """Every variant but half2 (inline PTX does not run in the interpreter) against the
    dequantized matrix, on the CPU."""
    torch.manual_seed(0)
    for k, n, group in [(512, 96, 128), (256, 64, 32)]:
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32)
        scales = (torch.rand(k // group, n) * 0.02 + 0.001).half()
        zeros = torch.randint(0, 17, (k // group, n)).half()
        w = gt.GptqWeights(qweight, scales, zeros, group)
        x = torch.randn(1, k).half()
        want = (x.float() @ gt.dequantize(w))[0]
        for mode, split in itertools.product(("shift", "mask"), (1, 3)):
            got = run(x, w, mode, 32, split, 4)
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 1e-5, (mode, split, error)
            print(f"{mode} split={split}: error {error:.1e}")
    print("variants agree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--modes", default="shift,mask,half2")
    args = parser.parse_args()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1":
        check()
        return
    from bench.gptq_gemm import SHAPES, card, fastest, graph_time, random_weights

    torch.manual_seed(0)
    limit = card()
    results = []
    for name, (k, n) in SHAPES.items():
        w = random_weights(k, n)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        want = (x.float() @ gt.dequantize(w))[0]
        served = gt.gemv_config_for(w)
        base = graph_time(lambda x=x, w=w, cfg=served: gt.matmul(x, w, gemv_config=cfg))
        print(
            f"{name} {k}x{n}: served GEMV {base * 1e6:.1f} us ({w.nbytes / base / 1e12:.2f} TB/s)"
            f" {served}"
        )
        for mode in args.modes.split(","):
            sweep = itertools.product([mode], (32, 64, 128, 256), (2, 4, 8), (4, 8))
            best = fastest(
                sweep,
                lambda cfg, x=x, w=w: run(x, w, *cfg),
                want,
                5e-3 if mode == "half2" else 1e-4,
            )
            if best is None:
                continue
            seconds, cfg, error = best
            row = {
                "shape": name, "mode": mode, "block_n": cfg[1], "split": cfg[2],
                "warps": cfg[3], "us": seconds * 1e6, "served_us": base * 1e6,
                "tb_s": w.nbytes / seconds / 1e12, "error": error,
            }  # fmt: skip
            results.append(row)
            print(
                f"  {mode:6s} {seconds * 1e6:6.1f} us {row['tb_s']:.2f} TB/s, served x"
                f"{seconds / base:.2f} time  bn={cfg[1]} split={cfg[2]} warps={cfg[3]} "
                f"err={error:.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"copy_tb_s": limit / 1e12, "results": results}, indent=1))


if __name__ == "__main__":
    main()
