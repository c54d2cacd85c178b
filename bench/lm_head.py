"""The CPU LM head alone: torch's int8 kernel against the C++ VNNI one, for 1 to 16 rows.

The embedded model's head shape (49,152 x 576), int8 with a scale per row, random weights (the
speed does not depend on them); each kernel timed over `--calls` calls after 3 warm-ups, in one
process, with the error of each against the exact fp32 product of the same int8 matrix.

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
    module = native_module(load(None, environ={}).cache_dir / "compiled")
    if not module.has_vnni():
        print("this CPU has no AVX512-VNNI: the C++ head is not built", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    head = Int8Linear((torch.randn(args.vocab, args.width) * 0.05).to(torch.bfloat16))
    exact_weight = head.weight_int8.float() * head.scale.float()[:, None]

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        started = time.perf_counter()
        for _ in range(args.calls):
            fn()
        return (time.perf_counter() - started) / args.calls * 1e3

    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.width, dtype=torch.bfloat16)
        exact = x.float() @ exact_weight.T
        ours = module.lm_head_int8(x, head.weight_int8, head._scale_f32)
        theirs = torch._weight_int8pack_mm(x, head.weight_int8, head.scale).float()
        row = {
            "rows": rows,
            "torch_int8_ms": timed(
                lambda: torch._weight_int8pack_mm(x, head.weight_int8, head.scale)  # noqa: B023
            ),
            "vnni_ms": timed(
                lambda: module.lm_head_int8(x, head.weight_int8, head._scale_f32)  # noqa: B023
            ),
            "torch_int8_mean_error": float((theirs - exact).abs().mean()),
            "vnni_mean_error": float((ours - exact).abs().mean()),
        }
        row["speedup"] = row["torch_int8_ms"] / row["vnni_ms"]
        results.append(row)
        print(
            f"{rows:3d} rows: torch int8 {row['torch_int8_ms']:.2f} ms, VNNI "
            f"{row['vnni_ms']:.2f} ms ({row['speedup']:.2f}x); mean error vs exact "
            f"{row['torch_int8_mean_error']:.2e} / {row['vnni_mean_error']:.2e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
