"""The 4-bit GPTQ products of a 7B decode step on CUDA: loracord's Triton kernels against the
fp16 dense product (cuBLAS) that reads four times the bytes, per shape and row count.

    python3 bench/gptq_gemm.py [--rows 1,2,4,8,16,32] [--cold] [--shapes qkv,o,gate_up,down]
        [--stages 1] [--blocks 32,64,128] [--splits 2,4,8,16] [--warps 2,4] [--json F]

Random packed weights in GPTQ's layout (g128) of Llama-2-7B's four products per layer
(q/k/v and gate/up fused, as the fast decode step runs them). Each configuration in a small
sweep is timed as 20 calls captured in one CUDA graph (as a served step replays them), the
median of 5 replays; the result is checked against the dequantized matrix. Effective bandwidth
is the 4-bit matrix's bytes (weights, scales, zero points) over the time; the card's own limit
is printed beside it from a plain device-to-device copy. With `--cold` (as a served step reads
them) each call takes the next of enough copies of the matrix that none is still in the L2
cache; without it, one matrix again and again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from core.model import gptq_triton as gt

SHAPES = {  # name: (K, N) of Llama-2-7B, fused as the decode step runs them
    "qkv": (4096, 3 * 4096),
    "o": (4096, 4096),
    "gate_up": (4096, 2 * 11008),
    "down": (11008, 4096),
}


def random_weights(k: int, n: int, group: int = 128) -> gt.GptqWeights:
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // group, n, device="cuda") * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (k // group, n), device="cuda").half()
    return gt.GptqWeights(qweight, scales, zeros, group)


def cold_copies(nbytes: int, least: int = 256 * 1024**2) -> int:
    """How many copies of an `nbytes` matrix to cycle through so that no call finds its
    matrix in the L2 cache (50 MB on an H100 or H200): at least `least` bytes in all. A
    decode step reads each matrix once, so a benchmark that calls one matrix again and again
    times reads that a served step never gets from L2 (an H100's holds all of `o`)."""
    return max(1, -(-least // nbytes))


def cycle(w: gt.GptqWeights | torch.Tensor, cold: bool):
    """(a function giving the next of the copies of `w` to call, the number of copies): with
    `cold`, `cold_copies` clones of it (the same products, other memory), else `w` itself."""

    def clone():
        if isinstance(w, torch.Tensor):
            return w.clone()
        return gt.GptqWeights(w.qweight.clone(), w.scales.clone(), w.zeros.clone(), w.group)

    copies = [w] + ([clone() for _ in range(cold_copies(w.nbytes) - 1)] if cold else [])
    return itertools.cycle(copies).__next__, len(copies)


def graph_time(fn, calls: int = 20, replays: int = 5) -> float:
    """Seconds per call of `fn`, captured `calls` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = graph_time(lambda: b.copy_(a), calls=5)
    return 2 * a.numel() / seconds


def fastest(
    configs, run, want: torch.Tensor, tolerance: float | None, calls: int = 20, ranking=None
):
    """The fastest of `configs` for `run(cfg)` (timed as `graph_time` times it) as `(seconds,
    cfg, error)`, or None when none ran. A configuration the compiler refuses, or (with a
    `tolerance`) one whose result is further from `want` than that, is named on stderr and
    skipped. With a `ranking` list, every `(seconds, cfg)` that ran is appended to it."""
    best = None
    for cfg in configs:
        try:
            got = run(cfg)
            seconds = graph_time(lambda cfg=cfg: run(cfg), calls)
        except Exception as e:  # registers, shared memory
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        error = float((got - want).abs().max() / want.abs().max())
        if tolerance is not None and error > tolerance:
            print(f"  {cfg}: wrong ({error:.2e})", file=sys.stderr)
            continue
        if ranking is not None:
            ranking.append((seconds, cfg))
        if best is None or seconds < best[0]:
            best = (seconds, cfg, error)
    return best


def card() -> float:
    """The card's device-to-device copy bandwidth (bytes/s), printed with its name."""
    limit = copy_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"{name}: device copy {limit / 1e12:.2f} TB/s, triton {gt.triton.__version__}")
    return limit


def configs(
    rows: int,
    stages: tuple[int, ...] = (1,),
    blocks: tuple[int, ...] = (32, 64, 128),
    splits: tuple[int, ...] = (2, 4, 8, 16),
    warps: tuple[int, ...] = (2, 4),
) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if rows == 1:  # the GEMV only: the GEMM lost to it at one row on every shape before
        # (stages > 1 won nowhere in the served step on an H100: `--stages 1,2,3,4` to retry)
        sweep = itertools.product(blocks, splits, warps, stages, (False, True), (1, 2))
        for block_n, split, warp, stage, late, tiles in sweep:
            cfg = gt.GemvConfig(block_n, split, warp, stage, late=late, tiles=tiles)
            out.append(("gemv", cfg))
        return out
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    sweep = itertools.product((64, 128), (64, 128), (1, 2, 4), (3, 4))
    for block_n, block_k, split, stages in sweep:
        out.append(("gemm", gt.GemmConfig(block_m, block_n, block_k, split, 4, stages)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stages", default="1", help="the GEMV's pipeline stages to sweep")
    parser.add_argument("--blocks", default="32,64,128", help="the GEMV's block_n to sweep")
    parser.add_argument("--splits", default="2,4,8,16", help="the GEMV's K splits to sweep")
    parser.add_argument("--warps", default="2,4", help="the GEMV's warps to sweep")
    parser.add_argument("--top", type=int, default=0, help="print the N fastest per shape")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="which of " + ", ".join(SHAPES))
    parser.add_argument("--cold", action="store_true", help="no matrix read from the L2 cache")
    parser.add_argument(
        "--pdl", action="store_true", help="GEMVs as programmatic dependent launches (Hopper)"
    )
    args = parser.parse_args()
    stages = tuple(int(s) for s in args.stages.split(","))
    space = {
        name: tuple(int(v) for v in getattr(args, name).split(","))
        for name in ("blocks", "splits", "warps")
    }
    torch.manual_seed(0)
    limit = card()
    results = []
    for name, (k, n) in SHAPES.items():
        if name not in args.shapes.split(","):
            continue
        w = random_weights(k, n)
        dense = gt.dequantize(w).half()
        next_w, copies = cycle(w, args.cold)
        next_dense, _ = cycle(dense, args.cold)  # (fewer copies than of the 4-bit matrix)
        calls = max(20, copies)

        def product(kind_cfg, x, nw=next_w):
            kind, cfg = kind_cfg
            if kind == "gemv":
                return gt.matmul(x, nw(), gemv_config=cfg, pdl=args.pdl).float()
            return gt.matmul(x, nw(), gemm_config=cfg, gemv_rows=0).float()

        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ dense.float()
            cublas = graph_time(lambda x=x, nd=next_dense: x @ nd(), calls)
            ranking: list = []
            best = fastest(
                configs(rows, stages, **space),
                lambda kind_cfg, x=x: product(kind_cfg, x),
                ref,
                2e-3,
                calls,
                ranking,
            )
            for seconds, (_, cfg) in sorted(ranking, key=lambda r: r[0])[: args.top]:
                print(f"  {name} rows {rows}: {seconds * 1e6:7.1f} us  {cfg}", flush=True)
            if best is None:
                print(f"{name} rows {rows}: no configuration ran", file=sys.stderr)
                continue
            seconds, (kind, cfg), error = best
            row = {
                "shape": name, "K": k, "N": n, "rows": rows, "kernel": kind, "config": cfg.__dict__,
                "us": seconds * 1e6, "cublas_fp16_us": cublas * 1e6, "speedup": cublas / seconds,
                "tb_s": w.nbytes / seconds / 1e12, "of_copy": w.nbytes / seconds / limit,
                "error": error,
            }  # fmt: skip
            results.append(row)
            print(
                f"{name:8s} {k:5d}x{n:5d} rows {rows:3d}: {kind} {seconds * 1e6:7.1f} us "
                f"({row['tb_s']:.2f} TB/s, {row['of_copy']:.0%} of copy), cuBLAS fp16 "
                f"{cublas * 1e6:7.1f} us -> {row['speedup']:.2f}x  {cfg}",
                flush=True,
            )
    if args.json:
        out = {"copy_tb_s": limit / 1e12, "cold": args.cold, "results": results}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
