"""Calibration text for the embedded GPTQ build: what the bot serves, plus real quotes.

GPTQ fits each layer's 4-bit weights to the activations it sees during calibration, so the
text must look like what the model will serve. Quotes alone keep quote perplexity close to the
original and still break chat (a system prompt then triggers nonsense), so calibration is mostly
chat-formatted conversations: the disjoint calibration prompts (`data/chat_calibration.json`)
under the bot's default system prompt and under the template's own, each answered by the
full-precision model itself (no outside data needed), together with the quotes. The texts are
tokenized and packed end to end into equal chunks, so batches need no padding (padding would
leak into the layer statistics). A fixed share of the quotes is held out of calibration for the
quality check. This module knows nothing about serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.model.fidelity import calibration_prompts, greedy_answers, render_prompts

log = logging.getLogger(__name__)

QUOTES_PACKAGE = "inspirational_quotes"
HELDOUT_PERCENT = 38  # of the 326 quotes, ~120 never reach calibration


def package_file(package: str, name: str, install_hint: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate
    raise ModelError(f"package {package!r} has no {name}; reinstall it: {install_hint}")


def _is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def _format_quote(text: str, author: str) -> str:
    author = author.strip()
    return f"\u201c{text.strip()}\u201d \u2014 {author}" if author else text.strip()


def quote_corpus() -> tuple[list[str], list[str]]:
    """(calibration, held-out) quote texts from `inspirational-quotes`, split by a stable hash."""
    path = package_file(QUOTES_PACKAGE, "quotes.json", "run `pip install inspirational-quotes`")
    rows = json.loads(path.read_text(encoding="utf-8"))
    calibration: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for row in rows:
        text = str(row.get("text", "")).strip()
        if not text or text in seen:
            continue
        seen.add(text)
        formatted = _format_quote(text, str(row.get("from", "")))
        (heldout if _is_heldout(text) else calibration).append(formatted)
    return calibration, heldout


def chat_answers(
    fp_dir: Path,
    model: Any,
    tokenizer: Any,
    system_prompts: tuple[str | None, ...],
    answer_tokens: int,
    repetition_penalty: float,
) -> list[list[int]]:
    """Token ids of whole conversations (prompt as served + the model's own greedy answer).

    The calibration prompts are dealt round-robin over `system_prompts`. Answers are cached
    beside the full-precision model, keyed by everything that shapes them, so a retried
    recipe does not generate them again.
    """
    prompts = calibration_prompts()

    def conversations() -> list[list[int]]:
        rendered: list[list[int]] = []
        for index, system in enumerate(system_prompts):
            share = list(prompts[index :: len(system_prompts)])
            rendered.extend(render_prompts(tokenizer, system, share))
        log.info("answering %d calibration prompts with the full-precision model", len(rendered))
        answers = greedy_answers(
            model, tokenizer, rendered, answer_tokens, repetition_penalty=repetition_penalty
        )
        return [p + a for p, a in zip(rendered, answers, strict=True)]

    key = [prompts, system_prompts, answer_tokens, repetition_penalty]
    return cached_token_lists(fp_dir, "chat-answers", key, conversations)


def cached_json(folder: Path, prefix: str, key: object, compute: Callable[[], Any]) -> Any:
    """A JSON value kept in `folder`, named by a hash of `key`; computed when absent.

    Written to a temporary file and renamed, so a killed process never leaves half a file; a
    damaged file is computed again, and a folder that cannot be written only means no cache.
    """
    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:12]
    cache_file = folder / f"{prefix}-{digest}.json"
    try:
        return json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    value = compute()
    tmp = cache_file.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(value), encoding="utf-8")
        tmp.replace(cache_file)
    except OSError:
        log.debug("could not cache %s in %s", prefix, folder)
    return value


def cached_token_lists(
    folder: Path, prefix: str, key: object, compute: Callable[[], list[list[int]]]
) -> list[list[int]]:
    """Token lists kept as JSON in `folder` (see `cached_json`)."""
    return [list(map(int, row)) for row in cached_json(folder, prefix, key, compute)]


def pack(sequences: list[list[int]], chunk_tokens: int) -> list[list[int]]:
    """Concatenate token sequences and cut them into equal chunks (the last partial one dropped
    unless it is the only one)."""
    flat = [t for seq in sequences for t in seq]
    chunks = [flat[i : i + chunk_tokens] for i in range(0, len(flat), chunk_tokens)]
    if len(chunks) > 1 and len(chunks[-1]) < chunk_tokens:
        chunks.pop()
    return chunks


def as_dataset(chunks: list[list[int]]) -> list[dict[str, Any]]:
    """Pre-tokenized calibration rows in the form the GPTQ quantizer takes."""
    import torch

    return [
        {
            "input_ids": torch.tensor([chunk], dtype=torch.long),
            "attention_mask": torch.ones((1, len(chunk)), dtype=torch.long),
        }
        for chunk in chunks
    ]
