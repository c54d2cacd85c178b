"""The CPU LM head alone: torch's int8 kernel against the C++ one, for 1 to 16 rows.

The embedded model's head shape (49,152 x 576), int8 with a scale per row, random weights (the
speed does not depend on them); each kernel timed over `--calls` calls after 3 warm-ups, in one
process, with the error of each against the exact fp32 product of the same int8 matrix. The
activations are those the engine serves here: bf16 on a bf16 CPU (the C++ head with
AVX512-VNNI), fp32 elsewhere (the C++ head with AVX2; there the baseline is the fp32 head the
engine served before, `F.linear` on the fp32 matrix).

    python bench/lm_head.py [--rows 1,4,16] [--calls 30] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from core.model.fast import Int8Linear, native_module
    from core.settings import load

    torch.set_num_threads(args.threads)
    from core.model.kernels import cpu_supports_bf16

    module = native_module(load(None, environ={}).cache_dir / "compiled")
    if not (module.has_vnni() or module.has_avx2()):
        print("this CPU has neither AVX512-VNNI nor AVX2: no C++ head", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    torch.manual_seed(0)
    head = Int8Linear((torch.randn(args.vocab, args.width) * 0.05).to(dtype))
    exact_weight = head.weight_int8.float() * head.scale.float()[:, None]
    if dtype == torch.float32:  # the fp32 head served before
        name = "fp32"

        def baseline(x: Any) -> Any:
            return torch.nn.functional.linear(x, exact_weight)

    else:
        name = "torch int8"

        def baseline(x: Any) -> Any:
            return torch._weight_int8pack_mm(x, head.weight_int8, head.scale)

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        started = time.perf_counter()
        for _ in range(args.calls):
            fn()
        return (time.perf_counter() - started) / args.calls * 1e3

    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.width, dtype=dtype)
        exact = x.float() @ exact_weight.T
        ours = module.lm_head_int8(x, head.weight_int8, head._scale_f32)
        theirs = baseline(x).float()
        row = {
            "rows": rows,
            "dtype": str(dtype),
            "baseline": name,
            "baseline_ms": timed(lambda: baseline(x)),  # noqa: B023
            "cpp_ms": timed(
                lambda: module.lm_head_int8(x, head.weight_int8, head._scale_f32)  # noqa: B023
            ),
            "baseline_mean_error": float((theirs - exact).abs().mean()),
            "cpp_mean_error": float((ours - exact).abs().mean()),
        }
        row["speedup"] = row["baseline_ms"] / row["cpp_ms"]
        results.append(row)
        print(
            f"{rows:3d} rows: {name} {row['baseline_ms']:.2f} ms, C++ "
            f"{row['cpp_ms']:.2f} ms ({row['speedup']:.2f}x); mean error vs exact "
            f"{row['baseline_mean_error']:.2e} / {row['cpp_mean_error']:.2e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
