"""What members get: answer quality of the embedded model per system prompt and sampling.

For each system prompt and repetition penalty, the measurement prompts (core/model/data/
chat_eval.json) are answered as the bot serves them (chat template, system prompt) by the
fp32 model the build came from and by the GPTQ build as this CPU serves it. Reported per
model: loop rate (answers that reach the token cap while repeating an n-gram) and accuracy on
the keyed facts (fp32 greedy; the build greedy and sampled with the model authors' temperature
0.2 and top-p 0.9, fixed seed); per GPTQ build against fp32: teacher-forced top-1 agreement,
mean KL per token, and greedy answers equal to fp32's over their first 16 tokens. The defaults
in core are chosen from this table.

    python bench/answers.py [--cap 128] [--penalties 1.0,1.1,1.2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.model import fidelity
from core.model.requests import DEFAULT_SYSTEM_PROMPT

CANDIDATES = {
    "loracord (old default)": (
        "You are loracord, a friendly assistant in a Discord server. Answer briefly and helpfully."
    ),
    "template default": "",
    "helpful": "You are a helpful assistant.",
    "discord brief": "You are a helpful assistant in a Discord chat. Answer briefly.",
    "friendly short": "You are a friendly and helpful assistant. Answer in one or two sentences.",
    "current default": DEFAULT_SYSTEM_PROMPT,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=128, help="answer token cap (loops reach it)")
    parser.add_argument("--penalties", default="1.0,1.1,1.2")
    parser.add_argument("--prompts", default=",".join(CANDIDATES), help="candidate names")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from core.model.build import dequantized_dir, find_embedded
    from core.model.gate import load_reference
    from core.model.kernels import choose_runtime
    from core.model.loader import load_for_serving
    from core.settings import load

    settings = load(None, environ={})
    fp_dir = dequantized_dir(settings.cache_dir)
    gptq_dir = find_embedded(settings.cache_dir)
    if gptq_dir is None:
        print("bench: build the model first (loracord model build)", file=sys.stderr)
        return 1
    torch.set_num_threads(settings.threads or torch.get_num_threads())
    reference, tokenizer = load_reference(fp_dir)
    runtime = choose_runtime("cpu", "auto", "auto")
    gptq, _, _ = load_for_serving(gptq_dir, runtime)
    models = {"fp32": reference, f"gptq ({runtime.dtype})": gptq}
    prompts = fidelity.eval_prompts()
    texts = [p.text for p in prompts]
    rows = []
    for name in args.prompts.split(","):
        system = CANDIDATES[name]
        rendered = fidelity.render_prompts(tokenizer, system, texts)
        ref_answers = fidelity.greedy_answers(reference, tokenizer, rendered, 48)
        match = fidelity.measure(reference, gptq, tokenizer, system, ref_answers)
        for rp in (float(x) for x in args.penalties.split(",")):
            for label, model in models.items():
                # fp32 greedy shows what the prompt itself does; the build as served is what
                # members get, greedy and with the default sampling.
                for mode in ("greedy",) if label == "fp32" else ("greedy", "sampled"):
                    started = time.monotonic()
                    torch.manual_seed(0)
                    answers = fidelity.greedy_answers(
                        model,
                        tokenizer,
                        rendered,
                        args.cap,
                        repetition_penalty=rp,
                        sampling=None if mode == "greedy" else (0.2, 0.9),
                    )
                    decoded = fidelity.answer_texts(tokenizer, answers)
                    q = fidelity.answer_quality(prompts, answers, decoded, args.cap)
                    row = {
                        "system_prompt": name,
                        "repetition_penalty": rp,
                        "model": label,
                        "mode": mode,
                        "loop_rate": round(q.loop_rate, 3),
                        "fact_accuracy": round(q.fact_accuracy, 3),
                        "capital_of_france": decoded[0][:60],
                        "seconds": round(time.monotonic() - started, 1),
                        **({"fidelity": match.as_dict()} if label != "fp32" else {}),
                    }
                    rows.append(row)
                    print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        print("| system prompt | rep. penalty | model | mode | loop rate | facts right |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['system_prompt']} | {r['repetition_penalty']} | {r['model']} | "
                f"{r['mode']} | {r['loop_rate']:.0%} | {r['fact_accuracy']:.0%} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
