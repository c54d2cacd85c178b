"""Many LoRA adapters in one batch over one shared base model (the Punica / S-LoRA idea).

A LoRA adapter changes a linear layer `y = x @ W.T` into `y + scale * (x @ A.T) @ B.T`, with
`A [rank, in]` and `B [out, rank]` small. Merging `B @ A` into `W` would make the base serve one
adapter at a time (and W here is 4-bit GPTQ); keeping them apart lets every token pick its own
adapter: the base matmul runs once over the whole batch, then each token adds its adapter's
low-rank term. Punica calls the per-token gather "BGMV"; S-LoRA keeps many adapters resident in
preallocated slots and loads them in and out without disturbing the batch.

Here the slots are `LoraSlots`: for every layer and attention projection one A buffer
`[slots + 1, max_rank, in]` and one buffer of B transposed, `[slots + 1, max_rank, out]`,
allocated once, B held already multiplied by its adapter's scale. Both read as one matrix of
every slot's rows (`[(slots + 1) * max_rank, in]` and `[(slots + 1) * max_rank, out]`), which
lets a CUDA graph apply any mix of adapters with two plain products (`core.model.fast`). Slot 0
is "no adapter" and stays zero; ranks below `max_rank` are zero-padded, so every adapter
computes with the same shapes and loading one is a plain copy. `LoraSlots.plan` looks at the
step's per-token slots once: all on slot 0 gives None (the base path pays nothing), all on one
slot gives two plain matmuls per projection, a mix gives plain matmuls for prompt chunks (SGMV's
case) and the gathered batched matmul for decoding rows (vLLM's torch fallback for BGMV), where
tokens on slot 0 get exactly 0 added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.adapters import SERVED_TARGETS, AdapterSpec, BaseShapes
from core.errors import AdapterError, first_line


@dataclass
class AdapterWeights:
    """An adapter's matrices read into memory: (layer, target) -> (A [rank, in], B [out, rank]),
    fp32 on the CPU, ready to be copied into a slot."""

    rank: int
    scale: float
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.tensors.values() for t in pair)

    def check_finite(self) -> None:
        """Raise `AdapterError` naming the first layer that holds NaN or infinite values."""
        matrices = [m for pair in self.tensors.values() for m in pair]
        _refuse_unless_finite(list(self.tensors), matrices)


def _refuse_unless_finite(keys: list[tuple[int, str]], matrices: list[torch.Tensor]) -> None:
    """Raise `AdapterError` unless every matrix (A and B of each key in turn) is finite.

    The largest magnitude of a matrix is finite iff all of its values are (NaN propagates):
    on a GPU one multi-tensor kernel for them all; on a CPU, where that kernel is slow, each
    matrix's smallest and largest value, without a temporary the size of the matrix."""
    if not matrices:
        return
    if matrices[0].device.type == "cuda":
        peaks = torch.stack(torch._foreach_norm(matrices, float("inf")))
    else:
        peaks = torch.stack([torch.stack(torch.aminmax(m)) for m in matrices]).abs().amax(1)
    finite = peaks.isfinite()
    if not bool(finite.all()):
        layer, target = keys[int((~finite).nonzero()[0]) // 2]
        raise AdapterError(
            f"the adapter's weights cannot be read: layer {layer} {target} holds values that "
            "are not finite"
        )


def read_weights(spec: AdapterSpec, *, check: bool = True) -> AdapterWeights:
    """The matrices `spec` names, read from its safetensors file. Touches no model (it runs off
    the engine's thread). Raises `AdapterError` (one line) when they cannot be read or (with
    `check`) are not finite numbers; without it, the caller checks them (`LoraSlots.load`
    can, on the device, after copying into an empty slot).

    A hot-load runs this beside a busy worker thread, where every call into torch may wait for
    the interpreter lock: the file is read in one call, and the matrices are not touched
    unless they must be converted to fp32 (PEFT saves fp32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        everything = load_file(str(spec.weights_file))
        tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, (a_name, b_name) in spec.tensors.items():
            a, b = everything[a_name], everything[b_name]
            if (
                len(a.shape) != 2
                or len(b.shape) != 2
                or spec.rank != a.shape[0]
                or spec.rank != b.shape[1]
            ):
                raise ValueError(
                    f"layer {key[0]} {key[1]} has A {list(a.shape)} and B {list(b.shape)}, "
                    f"not rank {spec.rank}"
                )
            if a.dtype != torch.float32 or b.dtype != torch.float32:
                a, b = a.to(torch.float32), b.to(torch.float32)
            tensors[key] = (a, b)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise AdapterError(f"the adapter's weights cannot be read: {first_line(e)}") from None
    weights = AdapterWeights(spec.rank, spec.scale, tensors)
    if check:
        weights.check_finite()
    return weights


class LoraSlots:
    """Preallocated adapter slots on the model's device: 1..`slots` hold adapters, 0 is none."""

    def __init__(
        self,
        shapes: BaseShapes,
        slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"LoraSlots needs slots >= 1 and max_rank >= 1 ({slots}, {max_rank})")
        self.slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [slots + 1, max_rank, in]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # B.T: [slots + 1, max_rank, out]
        for layer in range(shapes.layers):
            for target in SERVED_TARGETS:
                fan_in, fan_out = shapes.modules[target]
                self.a[layer, target] = torch.zeros(
                    slots + 1, max_rank, fan_in, dtype=dtype, device=self.device
                )
                self.b[layer, target] = torch.zeros(
                    slots + 1, max_rank, fan_out, dtype=dtype, device=self.device
                )
        self._slot_views: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # Each slot's rank (0: empty): its rows past it are zero, and the CPU's C++ step skips
        # them (`core.model.fast`). Set after a load's copy, so it never covers rows not yet
        # written; the other paths compute every slot at `max_rank`.
        self.ranks = [0] * (slots + 1)

    @property
    def nbytes(self) -> int:
        buffers = (*self.a.values(), *self.b.values())
        return sum(t.numel() * t.element_size() for t in buffers)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.slots:
            raise ValueError(f"adapter slot {slot} is not one of 1..{self.slots}")

    def load(self, slot: int, weights: AdapterWeights, *, verify: bool = False) -> None:
        """Copy an adapter into `slot` (what it lacks is zeroed). Its shapes are checked before
        anything is copied, so an adapter refused for them leaves the slot as it was. With
        `verify` (for weights read without `check`, into an empty slot) its values are checked
        after the copy, on the device, in one batched reduction: NaN or infinite values empty
        the slot again and raise `AdapterError`."""
        self._check_slot(slot)
        if weights.rank > self.max_rank:
            raise AdapterError(
                f"the adapter's rank is {weights.rank}, above the adapter slots' rank "
                f"{self.max_rank}"
            )
        for key, (a, b) in weights.tensors.items():
            if key not in self.a:
                raise AdapterError(f"the adapter has layer {key[0]} {key[1]}, which is not served")
            want_a = (weights.rank, self.a[key].shape[2])
            want_b = (self.b[key].shape[2], weights.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(
                    f"the adapter does not fit the served model: layer {key[0]} {key[1]} has "
                    f"A {list(a.shape)} and B {list(b.shape)}"
                )
        # A few batched calls instead of several per matrix: a hot-load copies from a thread
        # beside the busy worker, where each call into torch can wait for the interpreter lock.
        a_whole, b_whole = self._views(slot, self.max_rank)
        if weights.rank < self.max_rank or len(weights.tensors) < len(self.a):
            torch._foreach_zero_(a_whole + b_whole)  # padding and the layers it lacks
        a_part, b_part = self._views(slot, weights.rank)
        into: list[torch.Tensor] = []
        scaled: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        copied: list[tuple[int, str]] = []
        for index, key in enumerate(self.a):
            pair = weights.tensors.get(key)
            if pair is not None:
                copied.append(key)
                into += (a_part[index], b_part[index])
                scaled.append(b_part[index])
                sources += (pair[0], pair[1].T)
        torch._foreach_copy_(into, sources)
        if verify:
            try:
                _refuse_unless_finite(copied, into)
            except AdapterError:
                self.clear(slot)
                raise
        torch._foreach_mul_(scaled, weights.scale)  # B held pre-scaled: no scaling per step
        self.ranks[slot] = weights.rank

    def _views(self, slot: int, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first `rank` rows of A and of B.T of slot `slot`, for every projection in the
        order of `self.a` (views, made once per slot and rank)."""
        views = self._slot_views.get((slot, rank))
        if views is None:
            views = self._slot_views[slot, rank] = (
                [a[slot, :rank] for a in self.a.values()],
                [b[slot, :rank] for b in self.b.values()],
            )
        return views

    def clear(self, slot: int) -> None:
        """Empty `slot`: tokens on it then compute exactly the base model."""
        self._check_slot(slot)
        a_whole, b_whole = self._views(slot, self.max_rank)
        torch._foreach_zero_(a_whole + b_whole)
        self.ranks[slot] = 0

    def plan(self, token_slots: list[int]) -> LoraStep | None:
        """How one step applies the adapters, given each token's slot; None when every token
        is on slot 0.

        Tokens are laid out segment by segment, so a prompt chunk is a run of one slot: runs of
        two or more tokens get two plain matrix products each (the SGMV case), and the single
        tokens of decoding rows on different slots one gathered batched product (BGMV). On a
        GPU more than two runs join the gathered product instead (fewer kernel launches)."""
        distinct = set(token_slots)
        if not distinct or distinct == {0}:
            return None
        if min(distinct) < 0 or max(distinct) > self.slots:
            raise ValueError(f"adapter slots {sorted(distinct)} are not all within 0..{self.slots}")
        if len(distinct) == 1:
            return LoraStep(self, single=token_slots[0])
        runs: list[tuple[int, int, int]] = []  # (start, end, slot) of multi-token runs
        singles: list[int] = []  # positions of lone tokens on an adapter
        start = 0
        for end in range(1, len(token_slots) + 1):
            if end < len(token_slots) and token_slots[end] == token_slots[start]:
                continue
            slot = token_slots[start]
            if slot and end - start > 1:
                runs.append((start, end, slot))
            elif slot:
                singles.append(start)
            start = end
        if self.device.type == "cuda" and len(runs) > 2:
            # On a GPU every product is a kernel launch, and launches are what a step costs:
            # many prompt chunks go through the one gathered product with the decoding rows.
            singles = [i for i, slot in enumerate(token_slots) if slot]
            runs = []
        gather = None
        if singles:
            index = torch.tensor(singles, device=self.device)
            gather = (index, torch.tensor([token_slots[i] for i in singles], device=self.device))
        # Every token gathered, in order (decoding rows on adapters, the common mixed step):
        # the gathered products cover the step, with nothing to scatter.
        covers_all = len(singles) == len(token_slots)
        return LoraStep(self, runs=runs, gather=gather, covers_all=covers_all)


class LoraStep:
    """The LoRA terms of one engine step, applied projection by projection."""

    def __init__(
        self,
        slots: LoraSlots,
        single: int | None = None,
        runs: list[tuple[int, int, int]] | None = None,
        gather: tuple[torch.Tensor, torch.Tensor] | None = None,
        covers_all: bool = False,
    ) -> None:
        self.slots = slots
        self.single = single
        self.runs = runs or []
        self.gather = gather
        self.covers_all = covers_all

    def add(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y + scale[s_t] * (x_t @ A[s_t].T) @ B[s_t].T` for every token t on slot s_t.
        `x` is `[T, in]` or `[1, T, in]`, `y` the projection's output of the same leading shape."""
        delta = self.delta(layer, target, x.reshape(-1, x.shape[-1]))
        return y + delta.view(y.shape).to(y.dtype)

    def delta(self, layer: int, target: str, flat: torch.Tensor) -> torch.Tensor:
        """The LoRA term alone, `[T, out]` in the slots' dtype, for the inputs `flat [T, in]`."""
        slots = self.slots
        a_slots, bt_slots = slots.a[layer, target], slots.b[layer, target]
        flat = flat.to(slots.dtype)
        if self.single is not None:  # one adapter for the whole step: two plain matmuls
            s = self.single
            return (flat @ a_slots[s].T) @ bt_slots[s]  # [T, max_rank] then [T, out]
        if self.covers_all:  # every token gathered: shrink, then expand, nothing to scatter
            assert self.gather is not None
            which = self.gather[1]
            a = a_slots.index_select(0, which)  # [T, max_rank, in]
            bt = bt_slots.index_select(0, which)  # [T, max_rank, out]
            low = torch.bmm(a, flat[:, :, None])  # [T, max_rank, 1]
            return torch.bmm(low.transpose(1, 2), bt)[:, 0]
        delta = flat.new_zeros(flat.shape[0], bt_slots.shape[2])  # slot-0 tokens add exactly 0
        for start, end, s in self.runs:  # a prompt chunk: plain matmuls with its slot
            delta[start:end] = (flat[start:end] @ a_slots[s].T) @ bt_slots[s]
        if self.gather is not None:  # decoding rows: per-token gather, shrink, then expand
            index, which = self.gather
            a = a_slots.index_select(0, which)  # [n, max_rank, in]
            bt = bt_slots.index_select(0, which)  # [n, max_rank, out]
            low = torch.bmm(a, flat.index_select(0, index)[:, :, None])
            delta.index_copy_(0, index, torch.bmm(low.transpose(1, 2), bt)[:, 0])
        return delta
