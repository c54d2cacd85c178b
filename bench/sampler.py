"""The sampler's cost per token on a CPU: the bot's default sampling against the whole sort.

Loads the model as the engine serves it, decodes `--tokens` greedy steps of a prompt through
the served step and keeps each step's logits (real distributions, not random ones). Then, in
one process and alternating, times `core.model.sampling.choose` over those logits for 1 and 4
rows with the bot's default settings (temperature 0.2, top-p 0.9, repetition penalty 1.2,
seeded) and with greedy decoding:

- as served (top-p over the top candidates, the penalty on the seen tokens only);
- the baseline: the whole vocabulary sorted and the penalty over every logit (what the
  sampler did before, and still does on a GPU).

It also checks that both pick the same tokens with the same seeds.

    python bench/sampler.py [--model embedded] [--tokens 48] [--rounds 3] [--json F]
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

PROMPT = "Tell me a short story about a lighthouse keeper and a storm."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from core.model import sampling
    from core.model.batch import BatchModel
    from core.model.kernels import choose_runtime
    from core.model.loader import load_for_serving
    from core.model.requests import GenerationParams
    from core.model.scheduler import Segment
    from core.model.source import resolve
    from core.settings import load

    torch.set_num_threads(args.threads)
    settings = load(None, environ={})
    resolved = resolve(args.model, settings.cache_dir)
    model, tokenizer, _ = load_for_serving(resolved.path, choose_runtime("cpu", "auto", "auto"))
    prompt = list(tokenizer(PROMPT)["input_ids"])
    batch = BatchModel(model, 1, len(prompt) + args.tokens + 8)
    vocab = int(model.config.vocab_size)
    with torch.inference_mode():
        logits = batch.step([Segment(0, 0, prompt, True)])
        steps, seen_ids, step_seconds = [], list(prompt), []
        for i in range(args.tokens):
            token = int(logits[0].argmax())
            steps.append(logits.clone())
            seen_ids.append(token)
            started = time.perf_counter()
            logits = batch.step([Segment(0, len(prompt) + i, [token], True)])
            step_seconds.append(time.perf_counter() - started)
    step_ms = statistics.median(step_seconds) * 1e3

    def dense_penalty(logits: Any, hit: Any, penalty: Any) -> Any:
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(hit, penalised, logits)

    served = (sampling.NUCLEUS_CANDIDATES, sampling._penalise)
    baseline = ((), dense_penalty)

    def run(way: tuple[Any, Any], params: GenerationParams, rows: int) -> tuple[float, list]:
        sampling.NUCLEUS_CANDIDATES, sampling._penalise = way
        seen = sampling.SeenTokens(rows, vocab, "cpu")
        samplers = []
        for row in range(rows):
            seen.reset(row, seen_ids[: len(prompt)])
            sampler = sampling.RowSampler.for_params(params, "cpu")
            if sampler.generator is not None:
                sampler.generator.manual_seed(row)
            samplers.append(sampler)
        picks = []
        started = time.perf_counter()
        for step in steps:
            picks.append(sampling.choose(step.expand(rows, -1), samplers, list(range(rows)), seen))
        return (time.perf_counter() - started) / len(steps) * 1e3, picks

    settings_default = GenerationParams(temperature=0.2, top_p=0.9, repetition_penalty=1.2)
    results = []
    for name, params in (
        ("default", settings_default),
        ("greedy", GenerationParams(temperature=0.0)),
    ):
        for rows in (1, 4):
            times: dict[str, list[float]] = {"served": [], "baseline": []}
            same = True
            for _ in range(args.rounds):
                ms, picks = run(served, params, rows)
                times["served"].append(ms)
                base_ms, base_picks = run(baseline, params, rows)
                times["baseline"].append(base_ms)
                same = same and picks == base_picks
            row = {
                "sampling": name,
                "rows": rows,
                "served_ms": statistics.median(times["served"]),
                "baseline_ms": statistics.median(times["baseline"]),
                "same_tokens": same,
            }
            results.append(row)
            print(
                f"{name:8s} {rows} row(s): {row['served_ms']:.3f} ms a step as served, "
                f"{row['baseline_ms']:.3f} ms with the whole sort "
                f"({row['baseline_ms'] / row['served_ms']:.1f}x); same tokens: {same}"
            )
    sampling.NUCLEUS_CANDIDATES, sampling._penalise = served
    print(f"one served decode step (1 row) for comparison: {step_ms:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "step_ms": step_ms}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
