"""Where one decode step of the engine's model goes: wall time, device time, and the top ops.

Loads a GPTQ checkpoint as the engine serves it, fills `--rows` rows with a `--prompt`-token
prompt each, then times `--steps` decode steps of all rows (one token each), the engine's
`BatchModel.step` alone (no scheduler, no sampling). Then one more run of steps under
`torch.profiler`: the ops with the most self time, on the device (CUDA) or the CPU. On a GPU the
ratio of kernel time to wall time says whether a step is bound by the device or by the host
(Python and launches); on a CPU the table says which ops the time goes to.

    python bench/profile_step.py [--model M] [--device cpu|cuda] [--kernel K] [--rows 1]
        [--steps 32] [--path plain|fast|graphs] [--json F]
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
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--path",
        default="fast",
        choices=("plain", "fast", "graphs"),
        help="plain: the model's own modules; fast: the fast step run eagerly (every kernel "
        "visible to the profiler); graphs: as served on a GPU (CUDA graphs replayed)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.model.batch import BatchModel
    from core.model.kernels import choose_runtime
    from core.model.loader import describe, load_for_serving
    from core.model.scheduler import Segment
    from core.model.source import resolve
    from core.settings import load

    settings = load(None, environ={})
    resolved = resolve(args.model, settings.cache_dir)
    runtime = choose_runtime(args.device, args.dtype, args.kernel)
    model, _, seconds = load_for_serving(resolved.path, runtime)
    info = describe(resolved.name, resolved.path, model, runtime, seconds)
    context = args.prompt + 2 * args.steps + 8
    batch = BatchModel(model, args.rows, context, fast=args.path != "plain")
    cuda = model.device.type == "cuda"
    if args.path != "graphs":
        batch.graphs = None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for row in range(args.rows):  # prefill, one row at a time
        batch.step([Segment(row, 0, [1 + (i % 100) for i in range(args.prompt)], True)])
    position = args.prompt

    def steps(n: int) -> None:
        nonlocal position
        for _ in range(n):
            batch.step([Segment(r, position, [42], True) for r in range(args.rows)])
            position += 1

    steps(4)  # warm up
    sync()
    started = time.perf_counter()
    steps(args.steps)
    sync()
    wall = (time.perf_counter() - started) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        steps(args.steps)
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:  # the kernels themselves: an op's entry repeats its kernels' time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
    device_us = sum(getattr(e, key) for e in events) / args.steps
    launches = sum(e.count for e in events) / args.steps
    result: dict[str, Any] = {
        "model": info.name,
        "kernel": info.kernel,
        "dtype": info.dtype,
        "device": info.device,
        "rows": args.rows,
        "path": batch.decode_path if args.path != "plain" else "plain",
        "step_ms": round(wall * 1e3, 3),
        "tokens_per_s": round(args.rows / wall, 1),
        ("kernel_ms_per_step" if cuda else "op_self_ms_per_step"): round(device_us / 1e3, 3),
        "top": [
            {
                "op": e.key[:120],
                "calls_per_step": round(e.count / args.steps, 1),
                "ms_per_step": round(getattr(e, key) / args.steps / 1e3, 3),
            }
            for e in top
        ],
    }
    if cuda:
        result["kernels_per_step"] = round(launches, 1)
        result["device_busy_share"] = round(device_us / 1e3 / (wall * 1e3), 3)
    print(
        f"{info.name} ({info.kernel}, {info.dtype}, {info.device}), {args.rows} rows: "
        f"{result['step_ms']} ms per step, {result['tokens_per_s']} tokens/s"
    )
    for row in result["top"]:
        print(f"  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:6.1f} calls  {row['op']}")
    if cuda:
        print(
            f"{result['kernels_per_step']} kernels per step, busy "
            f"{result['device_busy_share']:.0%} of the step"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
