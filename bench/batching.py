"""Continuous batching: throughput of N concurrent requests against the same requests one at a time.

One process, one model, loaded through the real app (`build(load(None, **overrides))`):

- **old path**: the previous engine's one-request loop (a `DynamicCache`, one
  `model(input_ids=..., cache=..., logits_to_keep=1)` call per token, greedy), re-implemented here
  and run on the engine's worker thread with the engine's own model (`run_on_model`), on the
  same prompts rendered as served. Gives single-request decode tok/s (prefill excluded) and
  end-to-end tok/s.
- **one at a time**: the new engine, one request submitted after the other ends.
- **N concurrent**: N requests submitted at once, for each N of `--concurrency`. Aggregate
  tok/s is completion tokens over the wall time from the first submit to the last token; the
  speedup divides it by the one-at-a-time rate of the same requests. Time to first token and
  inter-token latency (gaps between text pieces arriving on each stream, as a caller sees them)
  are measured under that load. Engine steps are timed on the worker: the step's wall time and
  its forward call's (on CUDA the forward ends with a blocking host-to-device copy, which waits
  for the GPU, so it is not launch time alone: `--profile` gives the kernel time).

Greedy everywhere (temperature 0, no repetition penalty unless `--repetition-penalty`), so the
same work is done by each path. The engine stops at end-of-sequence, so the prompts ask for long
answers and the tables report the tokens actually generated. `batch_rows` and `queue_size` are
set to the largest N, `max_context_tokens` to `--context` (1024).

    python bench/batching.py [--concurrency 1,4,8,16] [--max-new-tokens 64] [--json PATH]
        [--model PATH] [--device cpu|cuda] [--dtype D] [--kernel K] [--old-prompts K]
        [--profile N --profile-out PATH]

`--profile N` ends with N concurrent requests (16 tokens) under torch.profiler, started and
stopped on the engine's worker thread, and writes the top operators to `--profile-out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Prompts that ask for long answers, so most answers run to --max-new-tokens.
PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "List twenty fun facts about octopuses.",
    "Describe a typical day in the life of a medieval blacksmith.",
    "Write a detailed recipe for homemade bread, explaining every step.",
    "Explain the causes of the French Revolution in detail.",
    "Give me a ten-step plan to learn to play the guitar, with advice for each step.",
    "Write a letter to a friend describing your summer holiday by the sea.",
    "Explain how the internet works to a curious ten-year-old.",
    "Describe the water cycle in detail, from the ocean to the clouds and back.",
    "Write a poem of at least eight verses about autumn in the mountains.",
    "Compare cats and dogs as pets, with the pros and cons of each.",
    "Explain how to train for a first marathon, week by week.",
    "Tell me the history of the Roman Empire from its founding to its fall.",
    "Write a product description for a solar-powered backpack, listing all its features.",
    "Explain what photosynthesis is and why it matters, in detail.",
    "Describe how to plan a birthday party for twenty people, from invitations to cleanup.",
    "Write a short play in which two robots argue about the weather.",
    "Explain the rules of chess to a complete beginner.",
    "Describe the solar system, planet by planet.",
)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _pct(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not xs:
        return None
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# -- timing of engine steps, on the worker thread -------------------------------------------------
@dataclass
class StepClock:
    """Wall time of each engine step and of its forward call, recorded on the worker."""

    steps: list[tuple[float, float, int, int]] = field(default_factory=list)
    tokens: dict[int, list[float]] = field(default_factory=dict)  # per stream, on the worker
    _forward: list[float] = field(default_factory=list)
    _last_shape: tuple[int, int] = (0, 0)  # decode rows, prefill tokens of the last forward
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, engine: Any) -> None:
        batch = engine._batch
        plain_forward, plain_step = batch.step, engine._step

        def forward(segments: list[Any]) -> Any:
            started = time.perf_counter()
            out = plain_forward(segments)
            decode = sum(1 for s in segments if len(s.tokens) == 1)
            self._forward.append(time.perf_counter() - started)
            self._last_shape = (decode, sum(len(s.tokens) for s in segments) - decode)
            return out

        def step() -> None:
            self._forward.clear()
            self._last_shape = (0, 0)
            started = time.perf_counter()
            plain_step()
            took = time.perf_counter() - started
            with self.lock:
                if self._forward:
                    self.steps.append((took, self._forward[0], *self._last_shape))

        plain_deliver = engine._deliver

        def deliver(sequence: Any, token: int) -> None:
            self.tokens.setdefault(id(sequence.sink._shared), []).append(time.perf_counter())
            plain_deliver(sequence, token)

        batch.step = forward
        engine._step = step
        engine._deliver = deliver

    def take(self) -> list[tuple[float, float, int, int]]:
        with self.lock:
            steps, self.steps = self.steps, []
        self.tokens.clear()
        return steps


def _step_summary(steps: list[tuple[float, float, int, int]]) -> dict[str, Any]:
    decode_only = [s for s in steps if s[3] == 0]
    return {
        "steps": len(steps),
        "step_ms_mean": _r(_mean([s[0] * 1e3 for s in steps]), 2),
        "forward_host_ms_mean": _r(_mean([s[1] * 1e3 for s in steps]), 2),
        "decode_step_ms_mean": _r(_mean([s[0] * 1e3 for s in decode_only]), 2),
        "decode_forward_host_ms_mean": _r(_mean([s[1] * 1e3 for s in decode_only]), 2),
        "decode_rows_mean": _r(_mean([float(s[2]) for s in steps]), 2),
        "prefill_steps": len(steps) - len(decode_only),
    }


# -- the old one-request path ---------------------------------------------------------------------
def old_generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    system_prompt: str | None,
    max_new_tokens: int,
    context_tokens: int,
    penalty: float,
) -> dict[str, Any]:
    """The previous engine's `generate_into`, greedy: prefill, then one token per forward
    over a DynamicCache, each token detokenized as it was streamed."""
    import torch
    from transformers import DynamicCache

    from core.model.decoding import IncrementalDetokenizer, render, stop_token_ids
    from core.model.fidelity import serving_messages

    started = time.perf_counter()
    ids = render(tokenizer, serving_messages(system_prompt, prompt))
    max_new = min(max_new_tokens, max(1, context_tokens - 32))
    stops = stop_token_ids(model, tokenizer)
    detok = IncrementalDetokenizer(tokenizer)
    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([ids], device=model.device)
    seen = input_ids
    first = None
    generated = 0
    with torch.inference_mode():
        for _ in range(max_new):
            out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            if penalty != 1.0:
                picked = logits.gather(-1, seen)
                picked = torch.where(picked > 0, picked / penalty, picked * penalty)
                logits = logits.scatter(-1, seen, picked)
            token = logits.argmax(dim=-1)
            token_id = int(token[0])
            if first is None:
                first = time.perf_counter()
            if token_id in stops:
                break
            generated += 1
            detok.add(token_id)
            input_ids = token.view(1, 1)
            seen = torch.cat([seen, input_ids], dim=1)
    end = time.perf_counter()
    assert first is not None
    return {
        "prompt_tokens": len(ids),
        "tokens": generated,
        "ttft_s": first - started,
        "decode_s": end - first,
        "total_s": end - started,
    }


# -- the engine ----------------------------------------------------------------------------------
async def _consume(stream: Any, t0: float, clock: StepClock) -> dict[str, Any]:
    times = []
    async for piece in stream:
        if piece:
            times.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # When each token was chosen, on the worker (includes tokens whose text is empty).
    produced = clock.tokens.pop(id(stream._shared), [])
    return {
        "worker_ttft_s": (produced[0] - t0) if produced else None,
        "worker_gaps": [b - a for a, b in itertools.pairwise(produced)],
        "tokens": stream.completion_tokens,
        "prompt_tokens": stream.prompt_tokens,
        "finish": stream.finish_reason,
        "ttft_s": (times[0] - t0) if times else None,
        "decode_s": (end - times[0]) if times else None,
        "total_s": end - t0,
        "end": end,
        "gaps": gaps,
    }


async def run_requests(
    engine: Any, prompts: list[str], params: Any, clock: StepClock
) -> dict[str, Any]:
    """Submit every prompt at once; per-stream results and the wall time to the last token."""
    from core.model.requests import GenerationRequest

    t0 = time.perf_counter()
    streams = await asyncio.gather(
        *(engine.submit(GenerationRequest.from_prompt(p, params)) for p in prompts)
    )
    results = await asyncio.gather(*(_consume(s, t0, clock) for s in streams))
    return {"wall_s": max(r["end"] for r in results) - t0, "streams": results}


def _load_summary(run: dict[str, Any]) -> dict[str, Any]:
    streams = run["streams"]
    tokens = sum(s["tokens"] for s in streams)
    ttft = [s["ttft_s"] for s in streams if s["ttft_s"] is not None]
    gaps = [g for s in streams for g in s["gaps"]]
    wttft = [s["worker_ttft_s"] for s in streams if s["worker_ttft_s"] is not None]
    wgaps = [g for s in streams for g in s["worker_gaps"]]
    return {
        "requests": len(streams),
        "tokens": tokens,
        "min_tokens": min(s["tokens"] for s in streams),
        "wall_s": _r(run["wall_s"], 3),
        "tok_s": _r(tokens / run["wall_s"], 2),
        "ttft_mean_s": _r(_mean(ttft)),
        "ttft_p90_s": _r(_pct(ttft, 90)),
        "itl_mean_ms": _r(_mean([g * 1e3 for g in gaps]), 2),
        "itl_p90_ms": _r(_pct([g * 1e3 for g in gaps], 90), 2),
        "worker_ttft_mean_s": _r(_mean(wttft)),
        "worker_itl_mean_ms": _r(_mean([g * 1e3 for g in wgaps]), 2),
        "worker_itl_p90_ms": _r(_pct([g * 1e3 for g in wgaps], 90), 2),
    }


def _single_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted rates over single requests: decode excludes the first token's time."""
    if not rows:
        return {
            "requests": 0,
            "tokens": 0,
            "ttft_mean_s": None,
            "decode_tok_s": None,
            "end_to_end_tok_s": None,
        }
    decode_tokens = sum(max(0, r["tokens"] - 1) for r in rows)
    decode_s = sum(r["decode_s"] for r in rows if r["decode_s"])
    tokens = sum(r["tokens"] for r in rows)
    return {
        "requests": len(rows),
        "tokens": tokens,
        "ttft_mean_s": _r(_mean([r["ttft_s"] for r in rows if r["ttft_s"] is not None])),
        "decode_tok_s": _r(decode_tokens / decode_s, 2) if decode_s else None,
        "end_to_end_tok_s": _r(tokens / sum(r["total_s"] for r in rows), 2),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core import settings as settings_module
    from core.app import build
    from core.model.requests import GenerationParams, GenerationRequest

    levels = sorted({int(n) for n in args.concurrency.split(",")})
    top = max(levels)
    overrides: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "kernel": args.kernel,
        "batch_rows": top,
        "queue_size": max(16, top),
        "max_context_tokens": args.context,
        "data_dir": tempfile.mkdtemp(prefix="loracord-bench-"),
    }
    if args.model:
        overrides["model"] = args.model
    if args.prefill_tokens_per_step:
        overrides["prefill_tokens_per_step"] = args.prefill_tokens_per_step
    settings = settings_module.load(None, **overrides)
    app = build(settings)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel prints its banner on stdout
        info = await app.start()
    load_s = time.perf_counter() - started
    engine = app.engine
    clock = StepClock()
    clock.install(engine)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0,
        repetition_penalty=args.repetition_penalty,
    )
    distinct = list(PROMPTS[: min(top, len(PROMPTS))])
    context = engine.context_tokens

    def old(prompt: str, tokens: int) -> Any:
        return engine.run_on_model(
            lambda model, tok: old_generate(
                model,
                tok,
                prompt,
                settings.system_prompt,
                tokens,
                context,
                args.repetition_penalty,
            )
        )

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        # Warm-up: both paths, and one batch of the largest size, a few tokens each.
        warm = GenerationParams(max_new_tokens=16, temperature=0.0)
        await old(PROMPTS[-1], 16)
        await (await engine.submit(GenerationRequest.from_prompt(PROMPTS[-1], warm))).text()
        await run_requests(engine, [PROMPTS[i % len(PROMPTS)] for i in range(top)], warm, clock)
        clock.take()
        log(f"loaded in {load_s:.1f} s; warm")

        # Single requests, old path and engine interleaved prompt by prompt (drift hits both).
        old_rows: list[dict[str, Any]] = []
        seq_rows: list[dict[str, Any]] = []
        for i, prompt in enumerate(distinct):
            if i < args.old_prompts:
                old_rows.append(await old(prompt, args.max_new_tokens))
            run = await run_requests(engine, [prompt], params, clock)
            seq_rows.append(run["streams"][0])
            log(
                f"single {i}: engine {seq_rows[-1]['tokens']} tok in "
                f"{seq_rows[-1]['total_s']:.2f} s"
                + (
                    f"; old {old_rows[-1]['tokens']} tok in {old_rows[-1]['total_s']:.2f} s"
                    if i < args.old_prompts
                    else ""
                )
            )
        seq_steps = _step_summary(clock.take())
        n_old = len(old_rows)
        single = {
            "prompts_compared": n_old,
            "old_path": _single_summary(old_rows),
            "engine_same_prompts": _single_summary(seq_rows[:n_old]),
            "engine_all_prompts": _single_summary(seq_rows),
            "engine_steps": seq_steps,
        }
        o, e = single["old_path"], single["engine_same_prompts"]
        if o["decode_tok_s"] and e["decode_tok_s"]:
            single["decode_ratio_engine_vs_old"] = _r(e["decode_tok_s"] / o["decode_tok_s"], 3)
        if o["end_to_end_tok_s"] and e["end_to_end_tok_s"]:
            single["end_to_end_ratio_engine_vs_old"] = _r(
                e["end_to_end_tok_s"] / o["end_to_end_tok_s"], 3
            )

        # N at once, against the same N requests one at a time.
        loads = []
        for n in levels:
            chosen = [i % len(distinct) for i in range(n)]
            run = await run_requests(engine, [distinct[i] for i in chosen], params, clock)
            row = {"concurrency": n, **_load_summary(run), **_step_summary(clock.take())}
            seq_tokens = sum(seq_rows[i]["tokens"] for i in chosen)
            seq_time = sum(seq_rows[i]["total_s"] for i in chosen)
            row["one_at_a_time_tok_s"] = _r(seq_tokens / seq_time, 2)
            row["speedup"] = _r(row["tok_s"] / row["one_at_a_time_tok_s"], 2)
            if old_rows:
                row["speedup_vs_old_path"] = _r(row["tok_s"] / o["end_to_end_tok_s"], 2)
            loads.append(row)
            log(f"N={n}: {row['tok_s']} tok/s, speedup {row['speedup']}x")

        profile = None
        if args.profile:
            profile = await _profile(engine, args, params, clock)
    finally:
        await app.close()

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(args.device),
        "model": info.name,
        "kernel": info.kernel,
        "dtype": info.dtype,
        "device": info.device,
        "load_s": round(load_s, 1),
        "rows": info.rows,
        "context_tokens": info.context_tokens,
        "kv_cache_mib": round((info.kv_cache_bytes or 0) / 2**20),
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "prefill_tokens_per_step": engine.prefill_tokens_per_step,
        "threads": torch.get_num_threads(),
        "single": single,
        "concurrent": loads,
        "profile": profile,
    }


async def _profile(engine: Any, args: argparse.Namespace, params: Any, clock: StepClock) -> Any:
    """N concurrent requests under torch.profiler on the worker thread; top operators to a file."""
    import dataclasses

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = args.device == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities)
    short = dataclasses.replace(params, max_new_tokens=16)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.profile)]
    await run_requests(engine, prompts, short, clock)  # this shape's warm-up
    clock.take()
    await engine.call(prof.start)
    t0 = time.perf_counter()
    await run_requests(engine, prompts, short, clock)
    wall = time.perf_counter() - t0
    await engine.call(prof.stop)
    steps = _step_summary(clock.take())
    events = prof.key_averages()

    # Kernel time: the device's own events (the operator rows repeat it).
    busy = None
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    parts = [
        f"{args.profile} concurrent requests x 16 tokens; wall {wall:.3f} s; {steps}",
        f"host CPU (sum of operator self time, all threads) {host:.3f} s",
    ]
    if cuda:
        parts.append(f"GPU busy (sum of kernel time) {busy:.3f} s = {busy / wall:.0%} of wall")
        parts.append(events.table(sort_by="self_device_time_total", row_limit=30))
    parts.append(events.table(sort_by="self_cpu_time_total", row_limit=30))
    Path(args.profile_out).write_text("\n\n".join(parts) + "\n")
    return {
        "requests": args.profile,
        "wall_s": round(wall, 3),
        "gpu_busy_s": _r(busy, 3),
        "host_op_cpu_s": _r(host, 3),
        "steps": steps,
        "table": args.profile_out,
    }


def machine(device: str) -> str:
    """The machine in words, for a benchmark's record (CPU model, cores, torch, GPU)."""
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{platform.machine()}, {os.cpu_count()} cores, {cpu}; torch {torch.__version__}"
    if device == "cuda":
        text += f"; {torch.cuda.get_device_name(0)}"
    return text


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    s = result["single"]
    lines = [
        f"{result['model']} ({result['kernel']}, {result['dtype']}, {result['device']}); "
        f"{result['rows']} rows x {result['context_tokens']} tokens; up to "
        f"{result['max_new_tokens']} greedy tokens; {result['machine']}",
        "",
        "| single request | requests | tokens | TTFT mean | decode tok/s | end-to-end tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (
        ("old path (DynamicCache loop)", "old_path"),
        ("engine, same prompts", "engine_same_prompts"),
        ("engine, all prompts", "engine_all_prompts"),
    ):
        r = s[key]
        lines.append(
            f"| {name} | {r['requests']} | {r['tokens']} | {_f(r['ttft_mean_s'], '.3f')} s | "
            f"{_f(r['decode_tok_s'], '.1f')} | {_f(r['end_to_end_tok_s'], '.1f')} |"
        )
    lines.append(
        f"| **engine / old** | | | | **{_f(s.get('decode_ratio_engine_vs_old'), '.2f')}x** | "
        f"{_f(s.get('end_to_end_ratio_engine_vs_old'), '.2f')}x |"
    )
    lines += [
        "",
        "| concurrent | tokens (min/request) | wall s | tok/s | one at a time tok/s | speedup "
        "| TTFT mean / p90 | ITL mean / p90 | ms/step (decode) | forward ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["concurrent"]:
        if r["itl_mean_ms"] is None:  # no text pieces (a random model's special tokens)
            r = {**r, **{k: r["worker_" + k] for k in ("itl_mean_ms", "itl_p90_ms")}}
        lines.append(
            f"| {r['concurrency']} | {r['tokens']} ({r['min_tokens']}) | {r['wall_s']:.2f} | "
            f"{r['tok_s']:.1f} | {r['one_at_a_time_tok_s']:.1f} | **{r['speedup']:.2f}x** | "
            f"{_f(r['ttft_mean_s'], '.3f')} / {_f(r['ttft_p90_s'], '.3f')} s | "
            f"{_f(r['itl_mean_ms'], '.1f')} / {_f(r['itl_p90_ms'], '.1f')} ms | "
            f"{_f(r['decode_step_ms_mean'], '.1f')} | "
            f"{_f(r['decode_forward_host_ms_mean'], '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="a GPTQ folder (default: the embedded model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernel", default="auto", help="the engine's `kernel` setting")
    parser.add_argument("--context", type=int, default=1024, help="max_context_tokens")
    parser.add_argument("--prefill-tokens-per-step", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--old-prompts",
        type=int,
        default=len(PROMPTS),
        help="how many prompts the old path answers (it is slow on big models)",
    )
    parser.add_argument("--profile", type=int, default=0, help="profile N concurrent requests")
    parser.add_argument("--profile-out", default="batching-profile.txt")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = asyncio.run(bench(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
