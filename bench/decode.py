"""Decode speed of the embedded model on CPU: loracord's engine against the seed-style load.

Both run in this one process on the same GPTQ checkpoint, prompt ("Give me a short quote about
courage.", chat template) and 40 greedy tokens, so their ratio holds even on a busy machine.
The seed-style baseline is transformers' defaults as the seed write-up loads a GPTQ model:
`from_pretrained(path, dtype=float16, device_map="auto")`, then `generate` with a streamer.

    python bench/decode.py [--runs 3] [--tokens 40] [--json] [--model M] [--device cpu|cuda]

`--model` takes any `model` setting (default: the embedded model); `--device cuda` measures
the same pair on a GPU, where the engine serves with Marlin or ExLlamaV2.

Prints a table (and JSON with --json) with time to first token and decode tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Give me a short quote about courage."
LLAMA_CPP_TOK_S = 75.0  # llama.cpp, same GGUF, 2 threads, measured on this machine kind: 72-77


def _summary(samples: list[tuple[float, float, int]]) -> dict[str, float]:
    ttft = [s[0] for s in samples]
    rates = [(s[2] - 1) / s[1] for s in samples if s[2] > 1]
    return {
        "ttft_s": round(statistics.median(ttft), 4),
        "decode_tok_s": round(statistics.median(rates), 2),
        "tokens": samples[-1][2],
    }


async def bench_engine(settings: Any, runs: int, tokens: int) -> dict[str, Any]:
    """(TTFT, decode seconds, tokens) per run through loracord's engine."""
    from core.app import build
    from core.model.requests import GenerationParams, GenerationRequest

    app = build(settings)
    info = await app.start()
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    samples = []
    try:
        for run in range(runs + 1):
            started = time.perf_counter()
            stream = await app.engine.submit(GenerationRequest.from_prompt(PROMPT, params))
            first = None
            async for _ in stream:
                first = first or time.perf_counter()
            end = time.perf_counter()
            if run and first:  # run 0 warms up
                samples.append((first - started, end - first, stream.completion_tokens))
    finally:
        await app.close()
    return {"kernel": info.kernel, "dtype": info.dtype, **_summary(samples)}


def bench_seed_style(path: Path, runs: int, tokens: int) -> dict[str, Any]:
    """The same measurement for transformers' defaults (fp16, auto kernel)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    ids = ids.to("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="auto")
        model.generate(ids, max_new_tokens=2, do_sample=False)
    except (ValueError, RuntimeError) as e:
        # With the CUDA build of torch installed, GPTQModel's fp16 auto pick on a CPU-only
        # machine is the Triton kernel, which cannot run here; the seed's load then uses the
        # generic torch kernel, as transformers does without triton.
        print(
            f"seed-style auto kernel failed ({str(e).splitlines()[0]}); using 'torch'",
            file=sys.stderr,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float16,
            device_map="auto",
            quantization_config=GPTQConfig(bits=4, backend="torch"),
        )

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    samples = []
    for run in range(runs + 1):
        clock = Clock()
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, streamer=clock)
        end = time.perf_counter()
        generated = out.shape[1] - ids.shape[1]
        first = clock.times[1]  # times[0] is the prompt itself
        if run:
            samples.append((first - started, end - first, generated))
    layer = next(m for m in model.modules() if hasattr(m, "qweight"))
    return {
        "kernel": type(layer).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        **_summary(samples),
    }


def _machine(device: str) -> str:
    import torch

    text = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}"
    if device == "cuda":
        text += f"; {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="a `model` setting (default: embedded)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--kernel", default="auto", help="the engine's `kernel` setting")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from core import settings as settings_module

    overrides: dict[str, Any] = {"device": args.device, "kernel": args.kernel}
    if args.model:
        overrides["model"] = args.model
    settings = settings_module.load(None, **overrides)
    from core.app import locate_model

    # GPTQModel prints its banner and kernel choices on stdout; keep stdout for the results.
    with contextlib.redirect_stdout(sys.stderr):
        engine = asyncio.run(bench_engine(settings, args.runs, args.tokens))
        seed = bench_seed_style(locate_model(settings).path, args.runs, args.tokens)
    result = {
        "machine": _machine(args.device),
        "prompt": PROMPT,
        "tokens": args.tokens,
        "engine": engine,
        "seed_style": seed,
        "speedup_vs_seed_style": round(engine["decode_tok_s"] / seed["decode_tok_s"], 2),
        "ttft_speedup_vs_seed_style": round(seed["ttft_s"] / engine["ttft_s"], 2),
    }
    if args.device == "cpu":
        result["ratio_to_llama_cpp"] = round(engine["decode_tok_s"] / LLAMA_CPP_TOK_S, 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'':<12}{'kernel':<26}{'dtype':<10}{'TTFT s':>8}{'tok/s':>8}")
    for name in ("engine", "seed_style"):
        r = result[name]
        print(
            f"{name:<12}{r['kernel']:<26}{r['dtype']:<10}{r['ttft_s']:>8.3f}{r['decode_tok_s']:>8.1f}"
        )
    line = (
        f"engine / seed-style decode: {result['speedup_vs_seed_style']}x; "
        f"TTFT {result['ttft_speedup_vs_seed_style']}x"
    )
    if "ratio_to_llama_cpp" in result:
        ratio = result["ratio_to_llama_cpp"]
        line += f"; engine / llama.cpp ({LLAMA_CPP_TOK_S:.0f} tok/s): {ratio}"
    print(line)


if __name__ == "__main__":
    main()
