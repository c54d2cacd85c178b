"""The sampler's shortcuts pick exactly what its whole computation picks."""

from __future__ import annotations

import pytest
import torch

from core.model import sampling
from core.model.requests import GenerationParams
from core.model.sampling import RowSampler, SeenTokens, choose

VOCAB = 49152


def _picks(logits: torch.Tensor, params: list[GenerationParams], seed: int) -> list[int]:
    """The tokens `choose` picks for rows seeded alike, with a fresh seen-token mask."""
    samplers = []
    for p in params:
        sampler = RowSampler.for_params(p, "cpu")
        if sampler.generator is not None:
            sampler.generator.manual_seed(seed)
        samplers.append(sampler)
    seen = SeenTokens(len(params), logits.shape[-1], "cpu")
    for row in range(len(params)):
        seen.reset(row, list(range(row, 2000, 13)))
    return choose(logits, samplers, list(range(len(params))), seen)


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
def test_the_top_candidates_pick_what_the_whole_sort_picks(
    monkeypatch: pytest.MonkeyPatch, scale: float
) -> None:
    """Sampling over the top 64 or 1,024 tokens (when they hold the nucleus) against sorting
    the whole vocabulary, for peaked and flat logits, several temperatures, top-p values and
    seeds, with and without a penalty: the same token every time. Flat logits at a high
    temperature leave the nucleus beyond the candidates, so they take the whole sort."""
    torch.manual_seed(int(scale))
    logits = (torch.randn(4, VOCAB) * scale).to(torch.bfloat16)
    params = [
        GenerationParams(temperature=0.2, top_p=0.9, repetition_penalty=1.2),
        GenerationParams(temperature=0.7, top_p=0.95),
        GenerationParams(temperature=1.5, top_p=0.5),
        GenerationParams(temperature=1.0, top_p=1.0),
    ]
    # each setting alone on all four rows (a batch takes the shortcut only when it holds for
    # every row), then all four settings in one batch
    batches = [[p] * 4 for p in params] + [params]
    shortcut = [[_picks(logits, b, seed) for seed in range(30)] for b in batches]
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", ())
    whole = [[_picks(logits, b, seed) for seed in range(30)] for b in batches]
    assert shortcut == whole
    assert len({tuple(p) for p in whole[1]}) > 1  # the draws did differ between seeds


def test_greedy_without_a_penalty_is_the_argmax_and_leaves_the_mask() -> None:
    """Greedy rows without a penalty: the argmax of the logits as given (bf16 here), and the
    seen-token mask, which only the penalty reads, is not touched."""
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB).to(torch.bfloat16)
    greedy = RowSampler.for_params(GenerationParams(temperature=0.0), "cpu")
    seen = SeenTokens(3, VOCAB, "cpu")
    assert choose(logits, [greedy] * 3, [0, 1, 2], seen) == logits.float().argmax(-1).tolist()
    assert not bool(seen.mask.any())
    penalised = RowSampler.for_params(
        GenerationParams(temperature=0.0, repetition_penalty=1.2), "cpu"
    )
    picked = choose(logits, [penalised] * 3, [0, 1, 2], seen)
    assert [bool(seen.mask[row, token]) for row, token in enumerate(picked)] == [True] * 3


def test_a_peaked_row_sorts_only_its_top_candidates_and_a_flat_one_the_whole_vocabulary() -> None:
    """The shortcut is taken where it holds (so the test above compares two computations), and
    not where the nucleus reaches past the candidates or top_p is 1."""
    torch.manual_seed(0)
    peaked = torch.softmax(torch.randn(2, VOCAB) * 8 / 0.2, dim=-1)
    flat = torch.softmax(torch.randn(2, VOCAB), dim=-1)
    top_p = torch.full((2, 1), 0.9)
    values, order = sampling._descending(peaked, top_p)
    assert values.shape == (2, sampling.NUCLEUS_CANDIDATES[0])
    assert torch.equal(order[:, 0], peaked.argmax(-1))
    assert sampling._descending(flat, top_p)[0].shape == (2, VOCAB)
    assert sampling._descending(peaked, torch.ones(2, 1))[0].shape == (2, VOCAB)


def test_the_penalty_touches_only_the_seen_tokens_and_equals_the_dense_formula() -> None:
    """CTRL's penalty on a CPU (only the seen tokens read and written) against the formula over
    every logit: equal, with each row's own penalty, and the caller's logits left as they
    were."""
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 4
    before = logits.clone()
    hit = torch.rand(3, VOCAB) < 0.01
    penalty = torch.tensor([[1.2], [1.0], [1.5]])
    got = sampling._penalise(logits, hit, penalty)
    dense = torch.where(hit, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    assert torch.equal(got, dense)
    assert torch.equal(logits, before)
    assert not torch.equal(got, logits)


@pytest.mark.parametrize("candidates", [(64, 1024), ()])
def test_a_draw_at_the_whole_mass_stays_in_the_nucleus(
    monkeypatch: pytest.MonkeyPatch, candidates: tuple[int, ...]
) -> None:
    """A uniform draw that rounds up to the nucleus's whole mass picks the nucleus's last token,
    never one past it (the least probable token of the vocabulary, or past the candidates)."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, [7, 70, 700]] = torch.tensor([5.0, 4.0, 3.0])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1))
    params = GenerationParams(temperature=1.0, top_p=0.9)
    picked = _picks(logits, [params], seed=0)
    assert picked[0] in (7, 70, 700)
