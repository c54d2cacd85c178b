"""Token-level pieces of generation: prompt rendering and fitting, sampling, detokenizing.

Nothing here owns a thread or knows about queues; the engine's worker calls these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


class IncrementalDetokenizer:
    """Turns a growing list of token ids into new text pieces, never splitting a character.

    Each token decodes a short window (the tokens since the last emitted piece and a few before
    them, for context such as a leading space), not the whole answer again: the work per token
    stays constant however long the answer grows. The pieces joined equal decoding the answer
    at once.
    """

    _CONTEXT = 4  # tokens of already-emitted text kept for context

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for the next token
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._CONTEXT)
        return now[len(before) :]


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
