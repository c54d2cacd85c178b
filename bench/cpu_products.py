"""The CPU decode step's 4-bit products: its own integer products against the baseline's.

Loads the model as the engine serves it on this CPU (the C++ decode step: bf16 with AVX512-VNNI
products on a bf16 CPU, fp32 with AVX2 products on any other), then times, in one process and
alternating:

- the C++ step's layers (`decode_layers`, every layer of one decode step, LM head excluded) with
  its own products (`linear_q4` or `linear_q4_avx2`, zero-point residuals inside each group's
  offset);
- each product of every layer once, in order (what a step reads), through the own products and
  through the baseline's: GPTQModel's AVX512 kernel in bf16 (on the carried-over build without
  the residuals, so a lower bound of its cost), the dense layers the loader dequantized in fp32;

for `--rows` rows decoding at position `--position`, the median of `--repeats` timings of
`--calls` calls each.

    python bench/cpu_products.py [--model embedded] [--rows 1,2,4,8] [--position 50]
        [--calls 30] [--repeats 7] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--position", type=int, default=50)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from core.model.batch import BatchModel
    from core.model.kernels import choose_runtime
    from core.model.loader import load_for_serving
    from core.model.source import resolve
    from core.settings import load

    torch.set_num_threads(args.threads)
    settings = load(None, environ={})
    resolved = resolve(args.model, settings.cache_dir)
    model, _, _ = load_for_serving(resolved.path, choose_runtime("cpu", "auto", "auto"))
    rows = [int(r) for r in args.rows.split(",")]
    batch = BatchModel(
        model, max(rows), args.position + 8, build_dir=settings.cache_dir / "compiled"
    )
    fast = batch.fast
    if fast is None or fast.native is None:
        print("no C++ step here (it needs AVX512-VNNI and bf16, or AVX2, FMA and F16C)")
        return 1
    native = fast.native
    module = native.module
    projections = [p for x in fast.layers for p in (x.qkv, x.o, x.gate_up, x.down)]
    fp32 = batch.dtype == torch.float32
    own = module.linear_q4_avx2 if fp32 else module.linear_q4
    baseline = "dense fp32" if fp32 else "GPTQModel's"
    if not fp32:
        kernels = torch.ops.gptqmodel_int4_qzero_group_scaled_cpu
        gemm = kernels.gemm_int4_qzero_group_scaled_cpu_forward

    def timed(fn: Any) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times.append((time.perf_counter() - started) / args.calls * 1e3)
        return statistics.median(times)

    results = []
    for n in rows:
        ids = torch.full((n,), 5)
        positions = torch.full((n,), args.position)
        cos, sin = fast.cos.index_select(0, positions), fast.sin.index_select(0, positions)

        def layers(n: int = n, ids: Any = ids, cos: Any = cos, sin: Any = sin) -> Any:
            return module.decode_layers(
                batch.embed(ids), native.norms, native.matrices, native.offsets,
                batch.cache.keys, batch.cache.values, cos, sin, list(range(n)),
                [args.position] * n, fast.heads, fast.kv_heads, fast.head_dim, native.eps,
                native.group, native.lora_a, native.lora_b, [], [],
            )  # fmt: skip

        inputs = [torch.randn(n, w.shape[1] * 2).to(batch.dtype) for w in native.matrices]

        def own_products(inputs: list[Any] = inputs) -> None:
            for x, w, pairs in zip(inputs, native.matrices, native.offsets, strict=True):
                own(x, w, pairs, native.group)

        def their_products(inputs: list[Any] = inputs) -> None:
            for x, p in zip(inputs, projections, strict=True):
                if fp32:
                    p(x)  # the dense layers' fused product
                else:
                    gemm(x, *p.packed, native.group, None)

        row: dict[str, Any] = {"rows": n}
        for _ in range(2):  # alternate, keep the last
            row["layers_own_ms"] = timed(layers)
            row["products_own_ms"] = timed(own_products)
            row["products_baseline_ms"] = timed(their_products)
        results.append(row)
        print(
            f"{n} rows: layers {row['layers_own_ms']:.3f} ms with its own products; the "
            f"{len(projections)} products alone {row['products_own_ms']:.3f} against "
            f"{row['products_baseline_ms']:.3f} ms through {baseline} "
            f"({row['products_baseline_ms'] / row['products_own_ms']:.2f}x)"
        )
    read = sum(
        w.numel() + pairs.numel() * 2
        for w, pairs in zip(native.matrices, native.offsets, strict=True)
    )
    print(f"bytes read by the own products per step: {read / 1e6:.1f} MB")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"dtype": str(batch.dtype), "results": results, "bytes": read}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
