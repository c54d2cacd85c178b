"""How closely a quantized model answers like its full-precision original, on chat as served.

The measure behind the embedded build's quality gate and `bench/answers.py`: a fixed set of
chat prompts (`data/chat_eval.json`: questions of fact with answer keys, requests for quotes,
instructions, small talk; never used for calibration), rendered exactly as the engine renders
them, system prompt included. The reference model's greedy answers are the reference; a
candidate model is scored by teacher-forced next-token top-1 agreement and mean KL per token on
those answers, by how many of its own greedy answers match the reference over their first
tokens, and, for any model on its own, by its loop rate and its accuracy on the keyed facts.
This module knows nothing about building or serving; it takes loaded models.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from core.model.decoding import render
from core.model.requests import ChatMessage, with_system_prompt

CATEGORIES = ("facts", "quotes", "instructions", "smalltalk")


@dataclass(frozen=True)
class EvalPrompt:
    """One measurement prompt; `keys` are accepted answers for a question of fact."""

    category: str
    text: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fidelity:
    """A candidate model against the reference, on the measurement set."""

    top1_agreement: float
    mean_kl: float
    exact_prefix_matches: int
    prompts: int
    prefix_tokens: int
    scored_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class AnswerQuality:
    """What members would notice on their own: answers that loop, facts answered right."""

    loop_rate: float
    fact_accuracy: float
    answers: int


def _load_json(name: str) -> Any:
    return json.loads(resources.files("core.model").joinpath("data", name).read_text("utf-8"))


@cache
def eval_prompts() -> tuple[EvalPrompt, ...]:
    """The committed measurement set, facts first."""
    data = _load_json("chat_eval.json")
    prompts = [EvalPrompt("facts", f["prompt"], tuple(f["keys"])) for f in data["facts"]]
    for category in CATEGORIES[1:]:
        prompts.extend(EvalPrompt(category, text) for text in data[category])
    return tuple(prompts)


@cache
def calibration_prompts() -> tuple[str, ...]:
    """Chat prompts for calibration, disjoint from the measurement set."""
    return tuple(_load_json("chat_calibration.json")["prompts"])


def serving_messages(system_prompt: str | None, prompt: str) -> list[ChatMessage]:
    """The messages the engine sends for a one-turn `/ask` with this system prompt."""
    return list(with_system_prompt(system_prompt, [ChatMessage("user", prompt)]))


def render_prompts(
    tokenizer: Any, system_prompt: str | None, prompts: Sequence[str]
) -> list[list[int]]:
    """Token ids of each prompt as served, ending with the assistant's turn."""
    return [render(tokenizer, serving_messages(system_prompt, p)) for p in prompts]


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    from core.model.decoding import stop_token_ids

    return stop_token_ids(model, tokenizer)


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    repetition_penalty: float = 1.0,
    sampling: tuple[float, float] | None = None,
    batch_size: int = 32,
) -> list[list[int]]:
    """Answer token ids for each prompt (ending with the stop token when one came), batched.

    Greedy unless `sampling` gives (temperature, top_p); seed torch first for repeatable samples.
    """
    import torch

    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    answers: list[list[int]] = []
    device = next(model.parameters()).device
    sample: dict[str, Any] = {"do_sample": False}
    if sampling is not None:
        sample = {"do_sample": True, "temperature": sampling[0], "top_p": sampling[1]}
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as generate() expects
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                repetition_penalty=repetition_penalty,
                pad_token_id=pad,
                eos_token_id=sorted(stops),
                **sample,
            )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:cut] + ([row[cut]] if cut < len(row) else []))
    return answers


def _strip_stop(answer: list[int], stops: set[int]) -> list[int]:
    return answer[:-1] if answer and answer[-1] in stops else answer


def answer_texts(tokenizer: Any, answers: Sequence[list[int]]) -> list[str]:
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]


def looped(answer: list[int], max_new_tokens: int, n: int = 4, repeats: int = 3) -> bool:
    """An answer that ran to the token cap while repeating itself (some n-gram `repeats` times)."""
    if len(answer) < max_new_tokens:
        return False
    grams = Counter(tuple(answer[i : i + n]) for i in range(len(answer) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def answer_quality(
    prompts: Sequence[EvalPrompt], answers: Sequence[list[int]], texts: Sequence[str], cap: int
) -> AnswerQuality:
    """Loop rate over all answers, accuracy over the keyed facts."""
    loops = sum(looped(a, cap) for a in answers)
    facts = [(p, t) for p, t in zip(prompts, texts, strict=True) if p.keys]
    right = sum(any(k.lower() in t.lower() for k in p.keys) for p, t in facts)
    return AnswerQuality(
        loop_rate=loops / max(1, len(answers)),
        fact_accuracy=right / max(1, len(facts)),
        answers=len(answers),
    )


def _logits_batches(
    model: Any, sequences: Sequence[list[int]], pad: int, batch_size: int
) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: real positions are unchanged
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out.append(logits.float().log_softmax(-1).cpu())
    return out


def teacher_forced(
    reference: Any,
    candidate: Any,
    prompts: Sequence[list[int]],
    answers: Sequence[list[int]],
    pad: int,
    batch_size: int = 16,
) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(reference || candidate), tokens) over the answer positions."""
    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    ref = _logits_batches(reference, sequences, pad, batch_size)
    cand = _logits_batches(candidate, sequences, pad, batch_size)
    agree = 0
    kl = 0.0
    tokens = 0
    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        batch, row = divmod(index, batch_size)
        # Positions whose next token is an answer token (the stop token included).
        span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
        r = ref[batch][row, span]
        c = cand[batch][row, span]
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
        kl += float((r.exp() * (r - c)).sum())
        tokens += r.shape[0]
    return agree / max(1, tokens), kl / max(1, tokens), tokens


def measure(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    system_prompt: str | None,
    reference_answers: Sequence[list[int]] | None = None,
    *,
    answer_tokens: int = 48,
    prefix_tokens: int = 16,
) -> Fidelity:
    """Score `candidate` against `reference` on the measurement set, as the bot serves it."""
    texts = [p.text for p in eval_prompts()]
    prompts = render_prompts(tokenizer, system_prompt, texts)
    if reference_answers is None:
        reference_answers = greedy_answers(reference, tokenizer, prompts, answer_tokens)
    stops = _stop_ids(reference, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    agreement, kl, scored = teacher_forced(reference, candidate, prompts, reference_answers, pad)
    own = greedy_answers(candidate, tokenizer, prompts, prefix_tokens)
    matches = sum(
        _strip_stop(mine, stops)[:prefix_tokens] == _strip_stop(ref, stops)[:prefix_tokens]
        for mine, ref in zip(own, reference_answers, strict=True)
    )
    return Fidelity(
        top1_agreement=agreement,
        mean_kl=kl,
        exact_prefix_matches=matches,
        prompts=len(prompts),
        prefix_tokens=prefix_tokens,
        scored_tokens=scored,
    )
