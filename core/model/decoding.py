"""Token-level pieces of generation: prompt rendering and fitting, sampling, detokenizing.

Nothing here owns a thread or knows about queues; the engine's worker calls these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import PromptError
from core.model.requests import ChatMessage

# Room the chat template needs around a message, so a cut message still fits after rendering.
_TEMPLATE_SLACK = 16


@dataclass
class FittedPrompt:
    """Prompt token ids that fit the context, and what had to be cut to get there."""

    input_ids: list[int]
    notices: list[str]


def render(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of the chat-templated conversation, ending with the assistant's turn."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    # Base models without a template: plain text turns.
    text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
    return list(tokenizer(text).input_ids)


def fit_prompt(tokenizer: Any, messages: Sequence[ChatMessage], budget: int) -> FittedPrompt:
    """Render `messages` within `budget` tokens: drop the oldest turns, then cut the front."""
    if budget < _TEMPLATE_SLACK * 2:
        raise PromptError("the context window is too small for any prompt at this max_tokens")
    system = [m for m in messages if m.role == "system"][:1]
    turns = [m for m in messages if m.role != "system"]
    notices: list[str] = []
    ids = render(tokenizer, [*system, *turns])
    dropped = 0
    while len(ids) > budget and len(turns) > 1:
        turns.pop(0)
        dropped += 1
        ids = render(tokenizer, [*system, *turns])
    if dropped:
        notices.append(
            f"The {dropped} oldest message(s) of the conversation did not fit and were left out."
        )
    if len(ids) > budget:
        last = turns[-1]
        overhead = len(render(tokenizer, [*system, ChatMessage(last.role, "")]))
        keep = budget - overhead - _TEMPLATE_SLACK
        if keep <= 0:
            raise PromptError("the system prompt alone fills the context window")
        content_ids = tokenizer(last.content, add_special_tokens=False).input_ids
        cut = len(content_ids) - keep
        text = tokenizer.decode(content_ids[cut:], skip_special_tokens=True)
        turns[-1] = ChatMessage(last.role, text)
        ids = render(tokenizer, [*system, *turns])
        while len(ids) > budget:  # decode/encode round trips can grow by a token or two
            text = text[max(1, len(text) // 50) :]
            turns[-1] = ChatMessage(last.role, text)
            ids = render(tokenizer, [*system, *turns])
        notices.append(
            f"The prompt was too long for the model's context; its first ~{cut} tokens were cut."
        )
    return FittedPrompt(ids, notices)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: logits of tokens already in the
    prompt or answer (`seen`, ids [batch, n]) are divided by `penalty` when positive and
    multiplied when negative, so a repeated token always loses probability."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def pick_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (one per row) from last-position logits [batch, vocab]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        sorted_probs[(cumulative - sorted_probs) > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into new text pieces, never splitting a character."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece
