"""The decode loop for one request: prefill, then one token at a time into its stream.

Runs on the engine's worker thread. Greedy decoding here gives the same tokens as
`model.generate(do_sample=False)` on the same model and prompt (the tests check it in fp32).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.model.decoding import IncrementalDetokenizer, fit_prompt, penalize_repeats, pick_next
from core.model.requests import ResponseStream

log = logging.getLogger(__name__)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def generate_into(model: Any, tokenizer: Any, stream: ResponseStream, context_tokens: int) -> None:
    """Generate the answer for `stream`'s request, pushing text pieces as they decode."""
    from transformers import DynamicCache

    params = stream.request.params
    max_new = min(params.max_new_tokens, max(1, context_tokens - 32))
    if max_new < params.max_new_tokens:
        stream._notice(f"max_tokens was lowered to {max_new} to fit the context window.")
    fitted = fit_prompt(tokenizer, stream.request.messages, context_tokens - max_new)
    for notice in fitted.notices:
        stream._notice(notice)
    stream.prompt_tokens = len(fitted.input_ids)
    device = model.device
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    stops = stop_token_ids(model, tokenizer)
    detok = IncrementalDetokenizer(tokenizer)
    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([fitted.input_ids], device=device)
    seen = input_ids
    with torch.inference_mode():
        for step in range(max_new):
            out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            logits = penalize_repeats(out.logits[:, -1, :], seen, params.repetition_penalty)
            token = pick_next(logits, params.temperature, params.top_p, generator)
            token_id = int(token[0])
            if token_id in stops:
                stream._finish("stop")
                return
            stream.completion_tokens = step + 1
            if not stream._push(detok.add(token_id)):
                stream._finish("cancelled")
                return
            input_ids = token.view(1, 1)
            seen = torch.cat([seen, input_ids], dim=1)
    stream._finish("length")
