"""Held-out perplexity: how much quantization (or an adapter) costs on real text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over `texts`, each scored on its own (no cross-text context)."""
    import torch

    total_nll = 0.0
    total_tokens = 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = [tokenizer(t).input_ids for t in texts[start : start + batch_size]]
            rows = [r for r in rows if len(r) >= 2]
            if not rows:
                continue
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # right padding: positions of real tokens are unchanged
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            labels = ids[:, 1:].clone()
            labels[mask[:, 1:] == 0] = -100
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels.reshape(-1).to(device),
                ignore_index=-100,
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("no text long enough to score")
    return math.exp(total_nll / total_tokens)
