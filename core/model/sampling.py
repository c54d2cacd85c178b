"""Next-token choice for a batch where every row has its own sampling parameters.

Each row brings its temperature, top-p, repetition penalty and its own random generator, so a
seeded answer draws the same random numbers whoever else shares the batch. The work is
vectorised over rows; the only host sync is the final `tolist()` of the chosen ids.

Sampling is inverse-CDF: one uniform number per sampled row, from that row's generator,
against the cumulative top-p mass. It picks a token with exactly the probability that
`torch.multinomial` would, with one random number per row instead of a batch-wide draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.model.requests import GenerationParams


@dataclass
class RowSampler:
    """One row's sampling parameters and random state."""

    params: GenerationParams
    generator: torch.Generator | None

    @classmethod
    def for_params(cls, params: GenerationParams, device: torch.device | str) -> RowSampler:
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        return cls(params, generator)


class SeenTokens:
    """Which token ids each row's prompt and answer hold, for the repetition penalty:
    a `[rows, vocab]` mask on the model's device, updated in place."""

    def __init__(self, rows: int, vocab: int, device: torch.device | str) -> None:
        self.mask = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def reset(self, row: int, ids: list[int]) -> None:
        self.mask[row].zero_()
        if ids:
            self.mask[row, torch.tensor(ids, device=self.mask.device)] = True

    def add(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        self.mask[rows, ids] = True


def choose(
    logits: torch.Tensor,
    samplers: list[RowSampler],
    rows: list[int],
    seen: SeenTokens,
) -> list[int]:
    """The next token of each row: `logits[i]` belongs to `rows[i]`, sampled by `samplers[i]`.

    The repetition penalty is CTRL's, as transformers applies it: the logit of a token already
    in the row's prompt or answer is divided by the penalty when positive and multiplied when
    negative. Temperature 0 is greedy.
    """
    device = logits.device
    penalties = [s.params.repetition_penalty for s in samplers]
    if all(p == 1.0 for p in penalties) and all(s.params.temperature == 0 for s in samplers):
        # Greedy rows without a penalty: the argmax of the logits as they are (widening to
        # fp32 changes no value, so not the token) and no seen-token update, which only the
        # penalty reads; a decode step then costs one small kernel and the sync after it.
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    logits = logits.float()
    rows_t = torch.tensor(rows, device=device)
    if any(p != 1.0 for p in penalties):
        penalty = torch.tensor(penalties, device=device)[:, None]
        logits = _penalise(logits, seen.mask.index_select(0, rows_t), penalty)
    sampled = [i for i, s in enumerate(samplers) if s.params.temperature > 0]
    if len(sampled) < len(samplers):
        chosen = logits.argmax(dim=-1)
    else:  # every row is sampled below
        chosen = torch.empty(len(samplers), dtype=torch.long, device=device)
    if sampled:
        index = torch.tensor(sampled, device=device)
        temperature = torch.tensor(
            [samplers[i].params.temperature for i in sampled], device=device
        )[:, None]
        top_p = torch.tensor([samplers[i].params.top_p for i in sampled], device=device)[:, None]
        probs = torch.softmax(logits.index_select(0, index) / temperature, dim=-1)
        sorted_probs, order = _descending(probs, top_p)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_probs = sorted_probs.masked_fill((cumulative - sorted_probs) > top_p, 0.0)
        cumulative = sorted_probs.cumsum(dim=-1)
        draws = torch.cat(
            [torch.rand(1, generator=samplers[i].generator, device=device) for i in sampled]
        )
        target = draws[:, None] * cumulative[:, -1:]
        pick = torch.searchsorted(cumulative, target, right=True)
        # a draw that rounds up to the whole mass stays on the nucleus's last token
        pick = torch.minimum(pick, (sorted_probs > 0).sum(dim=-1, keepdim=True) - 1)
        chosen[index] = order.gather(-1, pick).squeeze(-1)
    seen.add(rows_t, chosen)
    return [int(t) for t in chosen.tolist()]


def _penalise(logits: torch.Tensor, hit: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`logits` with CTRL's penalty on the tokens in `hit` (`[rows, vocab]`, per-row `penalty`
    `[rows, 1]`). On a CPU only those tokens (a few hundred) are read and written: two passes
    of `torch.where` over every logit took ~0.9 ms for 4 rows on 2 cores. On a GPU, where
    finding them would cost a sync, every logit."""
    if logits.device.type == "cpu":
        rows, tokens = hit.nonzero(as_tuple=True)
        values = logits[rows, tokens]
        factor = penalty.view(-1)[rows]
        penalised = torch.where(values > 0, values / factor, values * factor)
        return logits.index_put((rows, tokens), penalised)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(hit, penalised, logits)


# Tokens sorted before the nucleus is cut, on a CPU: the most probable ones only, when they hold
# every sampled row's nucleus (at the temperatures the bot serves, nearly always the first
# number), else the next number, else the whole vocabulary.
NUCLEUS_CANDIDATES = (64, 1024)


def _descending(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs` in descending order with their token ids (equal probabilities by ascending id,
    so the order does not depend on the sort), as far as the nucleus needs.

    Sorting the whole vocabulary (49,152 on the embedded model: ~6 ms) took longer than a
    decode step on a 2-core CPU. On a CPU the top candidates are taken first (`topk`, ~0.2 ms
    for 64). When each row's nucleus ends inside them, with its last probability above every
    token left out (so no token outside ties with one inside), the nucleus and its order are
    the whole sort's, and so is the pick. Else more candidates, then the whole sort, which a
    GPU always takes (there the sort is cheap and the check would cost a sync).
    """
    if probs.device.type == "cpu":
        for k in NUCLEUS_CANDIDATES:
            if k >= probs.shape[-1]:
                break
            values, order = probs.topk(k, dim=-1)
            order, by_id = order.sort(dim=-1)  # ascending ids, then stably by probability
            values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
            order = order.gather(-1, by_value)
            inside = ((values.cumsum(dim=-1) - values) <= top_p).sum(dim=-1, keepdim=True)
            last = values.gather(-1, (inside - 1).clamp(min=0))
            if bool(((inside < k) & (last > values[:, -1:])).all()):
                return values, order
    return probs.sort(dim=-1, descending=True, stable=True)
