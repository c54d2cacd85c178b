"""Experiment: distil the fp32 model into a built GPTQ checkpoint by tuning its scales.

The 4-bit codes and zero points of a GPTQ checkpoint are integers, but its scales (one per group
of 32 inputs and output) and the model's norm weights are floats. This tunes them end to end:
each quantized linear computes `W = s[g] * exp(theta[g]) * (q - z[g])` with `theta` trainable
(initialised to 0, so step 0 is the build as it is), the norms are trainable as they are, and
Adam lowers KL(fp32 || candidate) over every position of the build's own calibration text (the
fp32 model's greedy answers to the calibration chat prompts plus quotes, packed into 256-token
chunks; never the measurement prompts). The candidate is then scored by the build's gate
(`core.model.gate.check`: teacher-forced top-1 agreement and KL against fp32 on the 64
measurement prompts, 16-token exact answers, quote perplexity), computed in fp32.

    python bench/tune_scales.py [--steps 40] [--lr 1e-3] [--no-norms] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tunable(folder: Path) -> tuple[Any, list[Any]]:
    """The checkpoint as an fp32 model whose quantized linears have trainable log-scales."""
    import torch

    from core.model.dense import QUANT_SUFFIXES, _Tensors, codes, dense_model, v1_zeros
    from core.model.source import read_quantization

    quant = read_quantization(folder)
    bits = int(quant["bits"])
    model = dense_model(folder, quant, torch.float32)

    class ScaledLinear(torch.nn.Module):
        def __init__(self, q: Any, z: Any, scales: Any, g_idx: Any) -> None:
            super().__init__()
            self.register_buffer("codes", (q - z[g_idx.long()]).float())  # [in, out]
            self.register_buffer("scales", scales.float())
            self.register_buffer("g_idx", g_idx.long())
            self.theta = torch.nn.Parameter(torch.zeros_like(self.scales))

        def forward(self, x: Any) -> Any:
            return x @ ((self.scales * self.theta.exp())[self.g_idx] * self.codes)

    model.requires_grad_(False)
    thetas = []
    for file in sorted(folder.glob("*.safetensors")):
        with _Tensors(file) as f:
            for name in sorted(n for n in f.names if n.endswith(".qweight")):
                prefix = name[: -len(".qweight")]
                qweight, qzeros, scales, g_idx = (f.read(prefix + s) for s in QUANT_SUFFIXES)
                q, z = codes(qweight, qzeros, scales, bits, v1_zeros(quant))
                layer = ScaledLinear(q, z, scales, g_idx)
                parent, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
                thetas.append(layer.theta)
    return model, thetas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4, help="256-token chunks per step")
    parser.add_argument("--no-norms", action="store_true", help="tune the scales only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from core.model.build import dequantized_dir, find_embedded
    from core.model.calibration import chat_answers, pack, quote_corpus
    from core.model.gate import check, load_reference
    from core.model.requests import CUSTOM_SYSTEM_PROMPT_EXAMPLE, DEFAULT_SYSTEM_PROMPT
    from core.settings import load

    settings = load(None, environ={})
    fp_dir = dequantized_dir(settings.cache_dir)
    built = find_embedded(settings.cache_dir)
    if built is None:
        print("bench: build the model first (loracord model build)", file=sys.stderr)
        return 1
    reference, tokenizer = load_reference(fp_dir)
    reference.requires_grad_(False)
    model, params = tunable(built)
    if not args.no_norms:
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        for p in norms:
            p.requires_grad_(True)
        params += norms
    results: dict[str, Any] = {"model": str(built), "tuned_values": sum(p.numel() for p in params)}

    def score(tag: str) -> None:
        started = time.perf_counter()
        model.eval()
        gate = check(fp_dir, model, reference, tokenizer, DEFAULT_SYSTEM_PROMPT)
        results[tag] = gate.as_dict()
        print(f"{tag}: {gate.summary()} ({time.perf_counter() - started:.0f} s)", flush=True)

    score("before")
    sequences = chat_answers(
        fp_dir, reference, tokenizer, (DEFAULT_SYSTEM_PROMPT, CUSTOM_SYSTEM_PROMPT_EXAMPLE), 48, 1.0
    )
    eos = tokenizer.eos_token or ""
    sequences += [
        tokenizer(q + eos, add_special_tokens=False).input_ids for q in quote_corpus()[0][:128]
    ]
    sequences.sort(key=lambda s: hashlib.sha256(str(s).encode()).hexdigest())
    chunks = pack(sequences, 256)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    started = time.perf_counter()
    losses = []
    for step in range(args.steps):
        first = (step * args.batch) % len(chunks)
        batch = torch.tensor((chunks + chunks)[first : first + args.batch])
        with torch.no_grad():
            teacher = reference(input_ids=batch).logits.log_softmax(-1)
        model.train()
        student = model(input_ids=batch).logits.log_softmax(-1)
        loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if step % 5 == 0:
            print(f"step {step}: KL {loss.item():.4f}", file=sys.stderr, flush=True)
    results["tuning_seconds"] = round(time.perf_counter() - started, 1)
    results["losses"] = losses
    score("after")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
