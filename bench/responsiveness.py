"""Responsiveness while training: `/ask`'s time to first token and the event loop's lag, idle
against while a real training runs beside the bot.

One process, the app built as the bot builds it (`build(load(...))`, `await app.start()`), a
console channel holding `--quotes` imported quotes. In order:

1. **idle**: `--requests` short `/ask`-like questions, one after the other (`--gap` apart),
   through `app.channels.submit` exactly as the `/ask` command submits them; time to first
   token = submit to the first text piece of the stream (the answer is then cancelled).
2. **training**: `app.trainer.train(TrainRequest(channel, "cli"))` as a task: the real runner,
   the real trainer child (`python -m core.training`, `training.threads` threads). Once the
   child reports its first optimizer step, the same questions again, for as long as it trains.

Throughout, a task measures the event loop's lag: how late `asyncio.sleep(--tick)` wakes up,
tagged with what the trainer is doing then (idle, loading the model, training, evaluating...).
A slash command's deferral (`interaction.response.defer`) is an HTTP call started from the
event loop as soon as it handles the interaction, so the loop's lag bounds the delay the
machine adds to it (Discord's own round trip comes on top and is not measured here).

The knobs the bot has: `--threads` (the engine's CPU threads, setting `threads`),
`--train-threads` (setting `training.threads`, default half the cores) and `--nice N`, which
renices the trainer child (all its threads) as soon as it starts: the runner has no such
setting, so this measures what one would give.

    python bench/responsiveness.py [--requests 12] [--quotes 30] [--steps 30] [--threads N]
        [--train-threads N] [--nice N] [--model M] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batching import machine

QUESTIONS = (
    "Give me a short quote about courage.",
    "What is the capital of France?",
    "Say something nice about Mondays.",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
    "Give me one tip to sleep better.",
)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (no interpolation: with few samples it is a real sample)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else None,
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


class LoopLag:
    """How late each `asyncio.sleep(tick)` wakes, per phase of the trainer.

    The phase is read when the tick ends, from the runner's progress (`app.trainer.current`),
    so the samples split into idle, loading the model, training, evaluating and so on."""

    def __init__(self, app: Any, tick: float) -> None:
        self.app = app
        self.tick = tick
        self.samples: dict[str, list[float]] = {}
        self.task: asyncio.Task[None] | None = None

    def phase(self) -> str:
        current = self.app.trainer.current
        if current is None:
            return "idle"
        return "training" if current.phase == "training" else str(current.phase)

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick)
            lag = time.perf_counter() - started - self.tick
            self.samples.setdefault(self.phase(), []).append(max(0.0, lag))

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="bench-loop-lag")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def time_to_first_token(app: Any, channel: Any, question: str, params: Any) -> float:
    """Submit one question as `/ask` does; seconds to its first text piece."""
    from core.model.requests import ChatMessage

    started = time.perf_counter()
    stream, _ = await app.channels.submit(channel, (ChatMessage("user", question),), params)
    first = None
    async for piece in stream:
        if piece:
            first = time.perf_counter()
            break
    stream.cancel()
    await stream.text()
    if first is None:
        raise RuntimeError(f"no text came back for {question!r}")
    return first - started


def renice_tree(pid: int, value: int) -> int:
    """Set the nice value of every thread of `pid` (Linux's setpriority on a pid changes that
    one thread only); threads started later inherit it from their creator. Returns how many
    threads were changed."""
    tasks = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    done = 0
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpriority(os.PRIO_PROCESS, tid, value)
            done += 1
    return done


async def watch_child(app: Any, nice: int | None, seen: dict[str, Any]) -> None:
    """Renice the trainer child as soon as it exists (and again as it starts threads)."""
    while True:
        child = app.trainer._child
        if child is not None and child.returncode is None:
            seen["pid"] = child.pid
            if nice is not None:
                seen["threads_reniced"] = renice_tree(child.pid, nice)
        await asyncio.sleep(0.2)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core import settings as settings_module
    from core.app import build
    from core.model.requests import GenerationParams
    from core.store import ChannelRef, NewQuote
    from core.training.runner import TrainRequest, trainer_threads

    training: dict[str, Any] = {"steps": args.steps, "nightly": False}
    if args.train_threads:
        training["threads"] = args.train_threads
    overrides: dict[str, Any] = {
        "data_dir": tempfile.mkdtemp(prefix="loracord-bench-resp-"),
        "adapters_dir": tempfile.mkdtemp(prefix="loracord-bench-resp-adapters-"),
        "training": training,
        "quotes": {"eval_percent": 20},
    }
    if args.threads:
        overrides["threads"] = args.threads
    if args.model:
        overrides["model"] = args.model
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACORD_")}
    settings = settings_module.load(None, environ=env, **overrides)
    app = build(settings)
    with contextlib.redirect_stdout(sys.stderr):
        info = await app.start()
    channel = ChannelRef.console("bench")
    await app.store.import_quotes(channel, [NewQuote(q) for q in quotes(args.quotes)])
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    lag = LoopLag(app, args.tick)
    results: dict[str, Any] = {}
    try:
        for question in QUESTIONS[:2]:  # warm-up: first-call costs are no one's latency
            await time_to_first_token(app, channel, question, params)
        lag.start()
        idle = []
        for i in range(args.requests):
            idle.append(await time_to_first_token(app, channel, QUESTIONS[i % 6], params))
            await asyncio.sleep(args.gap)
        seen: dict[str, Any] = {}
        watcher = asyncio.create_task(watch_child(app, args.nice, seen))
        run = asyncio.create_task(app.trainer.train(TrainRequest(channel, "cli")))
        while not run.done():
            current = app.trainer.current
            if current is not None and current.phase == "training" and current.step >= 1:
                break
            await asyncio.sleep(0.1)
        busy = []
        steps_seen = []
        while not run.done() and len(busy) < args.requests:
            current = app.trainer.current
            if current is None or current.phase != "training":
                break
            busy.append(await time_to_first_token(app, channel, QUESTIONS[len(busy) % 6], params))
            steps_seen.append(current.step)
            await asyncio.sleep(args.gap)
        outcome = await run
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await asyncio.sleep(1.0)  # a few idle ticks after the run
    finally:
        await lag.stop()
        await app.close()
    idle_s, busy_s = summary(idle), summary(busy)
    results = {
        "machine": machine("cpu"),
        "model": {"name": info.name, "kernel": info.kernel, "dtype": info.dtype},
        "engine_threads": settings.threads or os.cpu_count(),
        "trainer_threads": trainer_threads(settings.training),
        "trainer_nice": args.nice,
        "trainer_threads_reniced": seen.get("threads_reniced"),
        "max_new_tokens": args.max_new_tokens,
        "ttft_idle_s": idle_s,
        "ttft_training_s": busy_s,
        "ttft_ratio_median": (
            busy_s["median"] / idle_s["median"] if busy and idle_s["median"] else None
        ),
        "ttft_ratio_p95": busy_s["p95"] / idle_s["p95"] if busy and idle_s["p95"] else None,
        "training_steps_during_requests": [min(steps_seen), max(steps_seen)] if busy else None,
        "loop_lag_s": {phase: summary(v) for phase, v in lag.samples.items()},
        "training": {
            "status": outcome.status,
            "reason": outcome.reason,
            "steps": outcome.steps,
            "tokens_per_s": outcome.tokens_per_s,
            "seconds": outcome.seconds,
        },
        "ttft_idle_all_s": idle,
        "ttft_training_all_s": busy,
        "torch": torch.__version__,
    }
    return results


def quotes(n: int) -> list[str]:
    """The first `n` quotes of the `inspirational-quotes` package (installed in the venv)."""
    import inspirational_quotes

    path = Path(inspirational_quotes.__file__).with_name("quotes.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [str(r["text"]).strip() for r in rows if str(r.get("text", "")).strip()][:n]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f} ms"


def print_table(r: dict[str, Any]) -> None:
    print(
        f"machine: {r['machine']}; engine {r['engine_threads']} threads, trainer "
        f"{r['trainer_threads']} thread(s), trainer nice {r['trainer_nice']}"
    )
    print("| time to first token | n | median | p95 | max |")
    print("|---|---|---|---|---|")
    for name, key in (("idle", "ttft_idle_s"), ("while training", "ttft_training_s")):
        s = r[key]
        print(f"| {name} | {s['n']} | {_ms(s['median'])} | {_ms(s['p95'])} | {_ms(s['max'])} |")
    ratio_m, ratio_p = r["ttft_ratio_median"], r["ttft_ratio_p95"]
    if ratio_m is not None:
        print(f"| **training / idle** | | **{ratio_m:.2f}x** | **{ratio_p:.2f}x** | |")
    print("| event-loop lag, by trainer phase | ticks | median | p95 | max |")
    print("|---|---|---|---|---|")
    for phase, s in r["loop_lag_s"].items():
        print(f"| {phase} | {s['n']} | {_ms(s['median'])} | {_ms(s['p95'])} | {_ms(s['max'])} |")
    t = r["training"]
    print(f"training: {t['status']} ({t['reason']}), {t['tokens_per_s']} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="questions per phase")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between questions")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--quotes", type=int, default=30, help="quotes in the trained channel")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (setting)")
    parser.add_argument("--train-threads", type=int, default=None, help="training.threads")
    parser.add_argument("--nice", type=int, default=None, help="renice the trainer child")
    parser.add_argument("--tick", type=float, default=0.05, help="loop-lag probe interval")
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    print_table(result)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all_s")}))


if __name__ == "__main__":
    main()
