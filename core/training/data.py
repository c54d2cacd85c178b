"""Training examples in the chat format the bot serves, with the loss on the answer only.

Each quote becomes the conversation [system prompt (as served), user: the training prompt,
assistant: the quote]. The prompt part is rendered by the serving code itself
(`core.model.decoding.render`), so the adapter learns on exactly the tokens it will see at
answer time; only the assistant's content and its end-of-turn token carry a loss (labels are
-100 before), since the model should learn what to answer, not to predict the prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any

from core.model.decoding import render
from core.model.fidelity import serving_messages
from core.model.requests import ChatMessage

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of a position without loss (torch's cross_entropy default)


@dataclass(frozen=True)
class Example:
    """Token ids and their labels (-100 where no loss applies), same length."""

    input_ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        """Tokens that carry a loss (the label at position 0 never can: nothing predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def answer_ids(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    prompt_ids: list[int],
    answer: str,
    stops: Collection[int],
) -> list[int]:
    """The ids the model must produce after `prompt_ids` to give `answer` and end its turn.

    Rendering the whole conversation with the chat template gives the answer's tokens as the
    template joins them and the end-of-turn token(s) it puts after an assistant message. Tokens
    after the first stop token (e.g. the template's newline after `<|im_end|>`) are dropped: the
    bot stops generating there, so they are never produced. A template whose full rendering does
    not start with the served prompt falls back to the answer's own tokens and a stop token.
    """
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages]
            + [{"role": "assistant", "content": answer}],
            add_generation_prompt=False,
            tokenize=True,
        )
        if hasattr(full, "keys"):  # BatchEncoding in newer transformers
            full = full["input_ids"]
        full = list(full)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            ids = full[len(prompt_ids) :]
            cut = next((i for i, t in enumerate(ids) if t in stops), None)
            return ids if cut is None else ids[: cut + 1]
    ids = list(tokenizer(answer, add_special_tokens=False).input_ids)
    return [*ids, min(stops)] if stops else ids


def example(prompt_ids: list[int], answer: list[int], max_length: int) -> Example | None:
    """Prompt then answer, the loss on the answer, cut to `max_length` (None if no answer token
    fits)."""
    ids = (prompt_ids + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer)[:max_length]
    return Example(ids, labels) if len(prompt_ids) < max_length else None


def quote_examples(
    tokenizer: Any,
    system_prompt: str,
    prompt: str,
    quotes: Sequence[str],
    stops: Collection[int],
    max_length: int,
) -> list[Example]:
    """One example per quote; quotes for which the prompt alone fills `max_length` are left out
    (the caller reports an empty result)."""
    messages = serving_messages(system_prompt, prompt)
    prompt_ids = render(tokenizer, messages)  # the same for every quote: render once
    out = []
    for quote in quotes:
        answer = answer_ids(tokenizer, messages, prompt_ids, quote.strip(), stops)
        made = example(prompt_ids, answer, max_length)
        if made is not None:
            out.append(made)
    return out


def batch_stream(
    examples: Sequence[Example], batch_size: int, seed: int
) -> Iterator[list[Example]]:
    """Endless batches of `batch_size`: each epoch a fresh seeded shuffle, batches running on
    across epoch ends so every batch is full and every example is seen equally often."""
    rng = Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order.extend(epoch)
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


def collate(
    examples: Sequence[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded to the batch's longest example rounded
    up to a multiple of 16. The rounding keeps the matmul shapes to a few: on the CPU oneDNN
    caches a primitive per shape, and a new width at every step grew the trainer's resident
    memory by ~10 MiB a step and slowed it (embedded model)."""
    import torch

    width = -(-max(len(e.input_ids) for e in examples) // 16) * 16
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids, mask, labels
