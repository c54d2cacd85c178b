"""Many adapters in one batch: N requests on N different adapters, against the same N requests
on one adapter, and against serving them one at a time with PEFT's `set_adapter` switching;
plus the hot-load latency of one adapter.

One process, one model loaded through the real app. The adapters are random LoRA adapters of
the seed recipe's shape (r=8, alpha=32, q/k/v/o; B not zero, so they change the answers),
written in PEFT's format for the served model.

- **N distinct**: N requests submitted at once, request i on adapter i (`adapter_slots` = N, so
  every adapter is resident; their loads happen before the clock starts).
- **one adapter**: the same N requests all on adapter 0.
- **PEFT switching**: the engine's own model (on its worker thread, between steps) wrapped by
  `PeftModel` with the same N adapters; each request alone: `set_adapter(name)`, then
  `generate` (greedy, the same prompt and token budget). What serving many adapters looks like
  without per-row LoRA. Run on at most `--peft-requests` requests (it is slow), rates compared.
- **hot-load**: `engine.load_adapter` of a new version while requests decode, timed from the
  call to the slot being ready (the worker copied it between two steps), and the time from then
  to the first token of a request on it.

Greedy, fixed answer budgets (`--max-new-tokens`); rates count the tokens actually generated.

    python bench/adapters.py [--concurrency 8,32] [--max-new-tokens 32] [--model PATH]
        [--device cpu|cuda] [--dtype D] [--kernel K] [--peft-requests 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "List twenty fun facts about octopuses.",
    "Describe a typical day in the life of a medieval blacksmith.",
    "Write a detailed recipe for homemade bread, explaining every step.",
    "Explain the causes of the French Revolution in detail.",
    "Describe the water cycle to a curious ten-year-old, at length.",
    "Write a letter from a sailor to his family, describing a storm.",
)


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


async def _run(engine: Any, prompts: list[str], refs: list[Any], params: Any) -> dict[str, Any]:
    from core.model.requests import GenerationRequest

    t0 = time.perf_counter()
    streams = [
        await engine.submit(GenerationRequest.from_prompt(p, params, ref))
        for p, ref in zip(prompts, refs, strict=True)
    ]
    await asyncio.gather(*(s.text() for s in streams))
    wall = time.perf_counter() - t0
    tokens = sum(s.completion_tokens for s in streams)
    return {
        "requests": len(streams),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
    }


def _peft_switching(
    model: Any,
    tokenizer: Any,
    folders: list[Path],
    prompts: list[str],
    max_new: int,
    system_prompt: str | None,
) -> dict[str, Any]:
    """One request at a time through PEFT, switching adapters with `set_adapter` (worker)."""
    import torch
    from peft import PeftModel

    from core.model.decoding import render
    from core.model.fidelity import serving_messages

    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="a0")
    try:
        for i, folder in enumerate(folders[1:], start=1):
            peft.load_adapter(str(folder), adapter_name=f"a{i}")
        tokens = 0
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            peft.set_adapter(f"a{i % len(folders)}")
            ids = torch.tensor(
                [render(tokenizer, serving_messages(system_prompt, prompt))], device=model.device
            )
            with torch.inference_mode():
                out = peft.generate(ids, max_new_tokens=max_new, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
        wall = time.perf_counter() - t0
    finally:
        peft.unload()  # the LoRA layers come out: the model is the engine's again
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
    }


async def _hot_load(engine: Any, folder: Path, params: Any, busy_refs: list[Any]) -> dict[str, Any]:
    """Load a new version while requests decode; time to the slot being ready, then to the
    first token of a request on it. The slot must be free: the busy requests use others."""
    from core.model.requests import AdapterRef, GenerationRequest

    busy = [
        await engine.submit(GenerationRequest.from_prompt(PROMPTS[0], params, ref))
        for ref in busy_refs
    ]
    await asyncio.sleep(0.2)  # they are decoding
    ref = AdapterRef("hot", "v2")
    t0 = time.perf_counter()
    status = await engine.load_adapter(ref, folder)
    ready = time.perf_counter()
    stream = await engine.submit(GenerationRequest.from_prompt(PROMPTS[1], params, ref))
    async for piece in stream:
        if piece:
            break
    first = time.perf_counter()
    stream.cancel()
    await stream.text()
    # The load's first part alone, under the same load: reading and checking the files.
    started = time.perf_counter()
    await asyncio.to_thread(engine._read_adapter, folder)
    read_s = time.perf_counter() - started
    for s in busy:
        s.cancel()
    await asyncio.gather(*(s.text() for s in busy))
    await engine.unload_adapter(ref)
    return {
        "load_ms": round((ready - t0) * 1e3, 2),
        "read_ms": round(read_s * 1e3, 2),
        "slot": status.slot,
        "first_token_after_load_ms": round((first - ready) * 1e3, 2),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core import settings as settings_module
    from core.adapters import BaseShapes
    from core.app import build
    from core.model.requests import AdapterRef, GenerationParams
    from tests.adapter_kit import write_adapter

    levels = sorted({int(n) for n in args.concurrency.split(",")})
    top = max(levels)
    overrides: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "kernel": args.kernel,
        "batch_rows": top,
        "queue_size": 2 * top + 8,
        "max_context_tokens": args.context,
        "adapter_slots": top + 1,
        "adapter_cache_size": top + 2,
        "data_dir": tempfile.mkdtemp(prefix="loracord-bench-"),
    }
    if args.model:
        overrides["model"] = args.model
    settings = settings_module.load(None, **overrides)
    app = build(settings)
    with contextlib.redirect_stdout(sys.stderr):
        info = await app.start()
    engine = app.engine
    shapes = BaseShapes.of_model(Path(info.path))
    root = Path(tempfile.mkdtemp(prefix="loracord-bench-adapters-"))
    folders = [
        write_adapter(root / f"a{i}", shapes, seed=i + 1, strength=0.02) for i in range(top + 1)
    ]
    refs = [AdapterRef(f"a{i}", "v1") for i in range(top)]
    for ref, folder in zip(refs, folders, strict=False):
        await engine.load_adapter(ref, folder)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"model: {info.name} ({info.kernel}, {info.dtype}, {info.device})", file=sys.stderr)

    await _run(engine, _prompts(2), refs[:2], GenerationParams(max_new_tokens=4, temperature=0.0))
    results: dict[str, Any] = {"levels": {}}
    for n in [] if args.hot_load_only else levels:
        prompts = _prompts(n)
        rounds = []
        for _ in range(args.repeats):
            distinct = await _run(engine, prompts, refs[:n], params)
            one = await _run(engine, prompts, [refs[0]] * n, params)
            base = await _run(engine, prompts, [None] * n, params)
            rounds.append((distinct, one, base))

        def med(i: int, rounds: list[Any] = rounds) -> float:
            return statistics.median(r[i]["tok_s"] for r in rounds)

        row = {
            "distinct_tok_s": med(0),
            "one_adapter_tok_s": med(1),
            "base_tok_s": med(2),
            "rounds": rounds,
        }
        row["distinct_vs_one"] = round(row["distinct_tok_s"] / row["one_adapter_tok_s"], 3)
        k = min(n, args.peft_requests)
        if k:
            chosen, asked = folders[:n], prompts[:k]
            peft = await engine.run_on_model(
                lambda model, tokenizer, chosen=chosen, asked=asked: _peft_switching(
                    model, tokenizer, chosen, asked, args.max_new_tokens, settings.system_prompt
                )
            )
            row["peft_switching"] = peft
            row["distinct_vs_peft"] = round(row["distinct_tok_s"] / peft["tok_s"], 2)
        results["levels"][n] = row
        print(
            f"N={n}: {json.dumps({k: v for k, v in row.items() if k != 'rounds'})}", file=sys.stderr
        )
    loads = [await _hot_load(engine, folders[top], params, refs[:2]) for _ in range(args.hot_loads)]
    results["hot_load"] = {
        "runs": loads,
        "load_ms_median": statistics.median(x["load_ms"] for x in loads),
        "read_ms_median": statistics.median(x["read_ms"] for x in loads),
        "first_token_after_load_ms_median": statistics.median(
            x["first_token_after_load_ms"] for x in loads
        ),
    }
    results["machine"] = _machine(info.device, torch)
    results["model"] = {
        "name": info.name,
        "kernel": info.kernel,
        "dtype": info.dtype,
        "device": info.device,
        "path": info.path,
    }
    results["settings"] = {
        "max_new_tokens": args.max_new_tokens,
        "context": args.context,
        "adapter_rank": 8,
        "targets": "q,k,v,o",
    }
    await app.close()
    return results


def _machine(device: str, torch: Any) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-requests", type=int, default=8)
    parser.add_argument("--hot-loads", type=int, default=5)
    parser.add_argument(
        "--hot-load-only", action="store_true", help="measure only the hot-load latency"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
