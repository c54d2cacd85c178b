"""Held-out perplexity: how much quantization (or an adapter) costs on real text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """exp(mean next-token NLL) over `texts`, each scored on its own (no cross-text context)."""
    import torch

    total_nll = 0.0
    total_tokens = 0
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += ids.shape[1] - 1
    if total_tokens == 0:
        raise ValueError("no text long enough to score")
    return math.exp(total_nll / total_tokens)
