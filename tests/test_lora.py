"""LoRA adapter slots on the real embedded GPTQ model (CPU, fp32).

The engine's per-token LoRA must compute what PEFT computes for the same adapter on the same
model, whatever else shares the batch: rows on the base, on other adapters, prefilling or
decoding. The test adapters have random non-zero A and B (`tests/adapter_kit.py`); the first
test checks that they really move the model, so a LoRA path that adds nothing cannot pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.adapters import WEIGHTS_FILE, AdapterSpec, BaseShapes, inspect_adapter
from core.errors import AdapterError
from core.model.batch import BatchModel
from core.model.kernels import choose_runtime
from core.model.loader import load_for_serving
from core.model.lora import LoraSlots, read_weights
from core.model.scheduler import Segment
from tests.adapter_kit import write_adapter

MAX_RANK = 8
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def loaded(embedded_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer, _seconds = load_for_serving(
        embedded_model_dir, choose_runtime("cpu", "float32", "auto")
    )
    yield model, tokenizer


@pytest.fixture(scope="module")
def batch(loaded: tuple[Any, Any]) -> BatchModel:
    """The batched forward's own LoRA arithmetic, held to PEFT's in fp32: the plain path and
    the eager fast step. The C++ CPU step (not built here) computes its products from int16
    activations, within 1e-4 of each output's range; tests/test_fast.py holds its adapter
    terms to the plain path."""
    return BatchModel(loaded[0], 4, 256, adapter_slots=3, adapter_max_rank=MAX_RANK, native=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    shapes = BaseShapes.of_model(embedded_model_dir)
    return {
        "a": write_adapter(root / "a", shapes, seed=1),
        "b": write_adapter(root / "b", shapes, seed=2),
        "rank4": write_adapter(root / "rank4", shapes, seed=3, rank=4),
        "rslora": write_adapter(root / "rslora", shapes, seed=4, config={"use_rslora": True}),
        # q and v of the first layers only: what an adapter lacks computes as the base
        "partial": write_adapter(
            root / "partial",
            shapes,
            seed=5,
            targets=("q_proj", "v_proj"),
            layers=range(4),
            config={"layers_to_transform": [0, 1, 2, 3]},
        ),
    }


def _spec(folder: Path, model_dir: Path) -> AdapterSpec:
    return inspect_adapter(folder, BaseShapes.of_model(model_dir), MAX_RANK)


def _ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _every_position(batch: BatchModel, ids: list[int], slot: int, row: int = 0) -> torch.Tensor:
    """Logits after every prompt token `[n, vocab]`: the first three tokens read as one prefill
    chunk, then the rest one per step (both paths of the batched forward)."""
    first = [batch.step([Segment(row, 0, ids[: i + 1], True, slot)]) for i in range(3)]
    rest = [batch.step([Segment(row, i, [ids[i]], True, slot)]) for i in range(3, len(ids))]
    return torch.cat([*first, *rest])


def _alone(
    batch: BatchModel, ids: list[int], slot: int, row: int = 3
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits of each step for one prompt run by itself."""
    logits = [batch.step([Segment(row, 0, ids, True, slot)])[0]]
    tokens: list[int] = []
    for i in range(DECODE_STEPS):
        tokens.append(int(logits[-1].argmax()))
        logits.append(batch.step([Segment(row, len(ids) + i, [tokens[-1]], True, slot)])[0])
    return tokens, logits


def _peft_logits(model: Any, folder: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, with the adapter): the Hugging Face forward's logits for every prompt position,
    without and through PEFT. PEFT replaces the projections in place; they are put back and
    checked to compute the base again."""
    from peft import PeftModel

    inputs = torch.tensor([ids])
    with torch.inference_mode():
        base = model(inputs).logits[0].float()
        wrapped = PeftModel.from_pretrained(model, str(folder))
        try:
            theirs = wrapped(inputs).logits[0].float()
        finally:
            wrapped.unload()
        assert torch.equal(model(inputs).logits[0].float(), base)
    return base, theirs


def test_a_test_adapter_really_changes_the_model(
    batch: BatchModel,
    loaded: tuple[Any, Any],
    adapters: dict[str, Path],
    embedded_model_dir: Path,
) -> None:
    assert batch.lora is not None
    ids = _ids(loaded[1], PROMPTS[0])
    batch.lora.load(1, read_weights(_spec(adapters["a"], embedded_model_dir)))
    base_tokens, base_logits = _alone(batch, ids, 0)
    tokens, logits = _alone(batch, ids, 1)
    assert (logits[0] - base_logits[0]).abs().max() > 1.0
    # Not whether the greedy tokens change (a decided answer keeps them; the carried-over
    # build's did for this prompt), but how far each next-token distribution moved.
    kl = [
        float(
            torch.nn.functional.kl_div(
                a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"
            )
        )
        for a, b in zip(logits, base_logits, strict=True)
    ]
    print(
        f"KL(base || adapter) per step: {[round(k, 3) for k in kl]}; "
        f"tokens {tokens} / {base_tokens}"
    )
    assert sum(kl) / len(kl) > 0.01, kl


@pytest.mark.parametrize("name", ["a", "rank4", "rslora", "partial"])
def test_logits_match_peft(
    batch: BatchModel,
    loaded: tuple[Any, Any],
    adapters: dict[str, Path],
    embedded_model_dir: Path,
    name: str,
) -> None:
    assert batch.lora is not None
    model, tokenizer = loaded
    spec = _spec(adapters[name], embedded_model_dir)
    if name == "rslora":
        assert spec.scale == pytest.approx(32 / 8**0.5)  # alpha / sqrt(r), not alpha / r
    ids = _ids(tokenizer, PROMPTS[1])
    batch.lora.load(2, read_weights(spec))
    ours = _every_position(batch, ids, 2)
    prefill = batch.step([Segment(0, 0, ids, True, 2)])  # the whole prompt as one chunk
    base, theirs = _peft_logits(model, adapters[name], ids)
    diff = max((ours - theirs).abs().max().item(), (prefill[0] - theirs[-1]).abs().max().item())
    print(f"{name}: max |ours - PEFT| = {diff:.2e}")
    assert diff < 1e-3
    assert (theirs - base).abs().max() > 100 * diff  # and the adapter moved the logits


def test_mixed_slots_in_one_step_match_each_alone(
    batch: BatchModel,
    loaded: tuple[Any, Any],
    adapters: dict[str, Path],
    embedded_model_dir: Path,
) -> None:
    lora = batch.lora
    assert lora is not None
    lora.load(1, read_weights(_spec(adapters["a"], embedded_model_dir)))
    lora.load(2, read_weights(_spec(adapters["b"], embedded_model_dir)))
    slots = [0, 1, 2]
    prompts = [_ids(loaded[1], text) for text in PROMPTS]
    alone = [_alone(batch, ids, slot) for ids, slot in zip(prompts, slots, strict=True)]
    assert len({tuple(tokens) for tokens, _ in alone}) == 3

    # Three prefills on three slots in one step, then decoding together.
    out = batch.step([Segment(row, 0, prompts[row], True, slots[row]) for row in range(3)])
    for row in range(3):
        assert (out[row] - alone[row][1][0]).abs().max() < 1e-4
    for i in range(DECODE_STEPS):
        out = batch.step(
            [
                Segment(row, len(prompts[row]) + i, [alone[row][0][i]], True, slots[row])
                for row in range(3)
            ]
        )
        for row in range(3):
            assert (out[row] - alone[row][1][i + 1]).abs().max() < 1e-4, (row, i)

    # Rows 0 (base) and 1 (adapter a) decode while row 2 (adapter b) reads its prompt in two
    # chunks alongside them.
    out = batch.step([Segment(row, 0, prompts[row], True, slots[row]) for row in (0, 1)])
    for row in (0, 1):
        assert (out[row] - alone[row][1][0]).abs().max() < 1e-4
    cut = len(prompts[2]) // 2
    chunks = [(0, prompts[2][:cut], False), (cut, prompts[2][cut:], True)]
    for i, (start, chunk, last) in enumerate(chunks):
        decode = [
            Segment(row, len(prompts[row]) + i, [alone[row][0][i]], True, slots[row])
            for row in (0, 1)
        ]
        out = batch.step([*decode, Segment(2, start, chunk, last, 2)])
        for row in (0, 1):
            assert (out[row] - alone[row][1][i + 1]).abs().max() < 1e-4, (row, i)
    assert (out[2] - alone[2][1][0]).abs().max() < 1e-4


def test_clearing_a_slot_gives_the_base_back_exactly(
    batch: BatchModel,
    loaded: tuple[Any, Any],
    adapters: dict[str, Path],
    embedded_model_dir: Path,
) -> None:
    lora = batch.lora
    assert lora is not None
    ids = _ids(loaded[1], PROMPTS[2])
    base = batch.step([Segment(0, 0, ids, True, 0)])
    lora.load(3, read_weights(_spec(adapters["b"], embedded_model_dir)))
    assert not torch.equal(batch.step([Segment(0, 0, ids, True, 3)]), base)
    lora.clear(3)
    assert torch.equal(batch.step([Segment(0, 0, ids, True, 3)]), base)
    # Next to another adapter (the gathered path) too: the cleared slot's rows add exactly 0.
    lora.load(1, read_weights(_spec(adapters["a"], embedded_model_dir)))
    on_base = batch.step([Segment(0, 0, ids, True, 0), Segment(1, 0, ids, True, 1)])
    cleared = batch.step([Segment(0, 0, ids, True, 3), Segment(1, 0, ids, True, 1)])
    assert torch.equal(cleared, on_base)


def test_slots_are_preallocated_and_load_only_copies(
    embedded_model_dir: Path, adapters: dict[str, Path]
) -> None:
    shapes = BaseShapes.of_model(embedded_model_dir)
    slots = LoraSlots(shapes, 2, MAX_RANK, torch.float32, "cpu")
    before = {key: t.data_ptr() for key, t in slots.a.items()}
    weights = read_weights(_spec(adapters["rank4"], embedded_model_dir))
    assert weights.rank == 4 and weights.nbytes > 0
    slots.load(1, weights)
    assert {key: t.data_ptr() for key, t in slots.a.items()} == before
    a, b = weights.tensors[0, "q_proj"]
    assert torch.equal(slots.a[0, "q_proj"][1, :4], a)
    assert torch.equal(slots.b[0, "q_proj"][1, :4], (b * weights.scale).T)  # B.T, pre-scaled
    assert not slots.a[0, "q_proj"][1, 4:].any() and not slots.a[0, "q_proj"][0].any()
    assert slots.ranks == [0, 4, 0]  # the rows the CPU's C++ step reads of each slot
    assert slots.plan([0, 0, 0]) is None
    with pytest.raises(ValueError):
        slots.load(3, weights)
    too_big = read_weights(_spec(adapters["a"], embedded_model_dir))
    with pytest.raises(AdapterError, match="rank"):
        LoraSlots(shapes, 1, 4, torch.float32, "cpu").load(1, too_big)
    slots.load(2, too_big)
    assert slots.ranks == [0, 4, too_big.rank]
    slots.clear(1)
    assert slots.ranks == [0, 0, too_big.rank]


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_corrupt_weights_are_refused_with_one_line(
    tmp_path: Path, embedded_model_dir: Path, damage: str
) -> None:
    folder = write_adapter(tmp_path / "x", BaseShapes.of_model(embedded_model_dir), seed=6)
    spec = _spec(folder, embedded_model_dir)  # checked while intact
    file = folder / WEIGHTS_FILE
    data = bytearray(file.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:  # all-ones bytes are NaN as fp32: the header still reads, the numbers do not
        data[-4096:] = b"\xff" * 4096
    file.write_bytes(bytes(data))
    with pytest.raises(AdapterError) as caught:
        read_weights(spec)
    message = str(caught.value)
    assert message.startswith("the adapter's weights cannot be read: ")
    assert "\n" not in message
    if damage == "nan":  # read unchecked, it is refused after the copy and the slot emptied
        slots = LoraSlots(BaseShapes.of_model(embedded_model_dir), 1, 8, torch.float32, "cpu")
        with pytest.raises(AdapterError, match="not finite"):
            slots.load(1, read_weights(spec, check=False), verify=True)
        assert all(not bool(t[1].any()) for t in (*slots.a.values(), *slots.b.values()))
