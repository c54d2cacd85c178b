"""The serving process's share of a GPU, so the nightly trainer always finds its own.

The bot and its trainer child are two processes on one GPU. Each takes a fixed share of the
device's memory (`gpu_memory_fraction` and `training.gpu_memory_fraction`, which settings refuse
to let add up to more than the whole). For the bot:

- the share is set as PyTorch's per-process limit before the model loads, so no later growth
  (a long prompt's activations, a new CUDA graph) can take the trainer's memory: past the
  limit an allocation fails inside the bot, never in the trainer;
- what the engine allocates once (weights, KV cache, adapter slots) is checked against it
  before the cache is allocated, with room left for a step's own work, and a plan that does not
  fit is refused in one line that says what fits.

CUDA's own context (a few hundred MiB per process) and libraries' workspaces are outside
PyTorch's allocator, which is why the two shares default to 0.45 and 0.5, not to 1.0 together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.adapters import SERVED_TARGETS, BaseShapes
from core.errors import ModelError

MIB = 1 << 20
GIB = 1 << 30
# Kept free within the share for what a step allocates and frees (activations of a prompt
# chunk, logits, CUDA graph pools): a tenth of the share, at least this much.
MIN_WORK_BYTES = 512 * MIB


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@dataclass(frozen=True)
class ServingMemory:
    """What the engine allocates once on its device, in bytes."""

    weights: int
    kv_cache: int
    adapter_slots: int
    rows: int
    context: int
    slots: int

    @classmethod
    def plan(
        cls,
        shapes: BaseShapes,
        weights: int,
        *,
        rows: int,
        context: int,
        slots: int,
        max_rank: int,
        element_size: int,
    ) -> ServingMemory:
        """The sizes `BatchModel` will allocate for a model of these shapes: a key and a value
        per token (each as wide as k_proj's output) in every layer and row, and A and B.T of
        every served projection in each slot plus the base model's empty one."""
        kv_width = shapes.modules["k_proj"][1]  # kv_heads * head_dim
        kv_cache = 2 * shapes.layers * rows * context * kv_width * element_size
        lora = 0
        if slots > 0:
            widths = sum(sum(shapes.modules[target]) for target in SERVED_TARGETS)
            lora = (slots + 1) * shapes.layers * max_rank * widths * element_size
        return cls(weights, kv_cache, lora, rows, context, slots)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.adapter_slots


@dataclass(frozen=True)
class GpuBudget:
    """`fraction` of a device of `device_bytes`."""

    device_bytes: int
    fraction: float

    @property
    def limit(self) -> int:
        return int(self.device_bytes * self.fraction)

    @property
    def work(self) -> int:
        """Room kept for a step's own allocations."""
        return max(self.limit // 10, MIN_WORK_BYTES)

    def check(self, plan: ServingMemory) -> None:
        """Raise `ModelError` when `plan` and a step's work do not fit the budget, saying how
        many rows would."""
        if plan.total + self.work <= self.limit:
            return
        where = (
            f"the bot's GPU budget, {_size(self.limit)} (gpu_memory_fraction {self.fraction:g} "
            f"of {_size(self.device_bytes)})"
        )
        what = (
            f"the weights ({_size(plan.weights)}), a KV cache of {plan.rows} rows x "
            f"{plan.context} tokens ({_size(plan.kv_cache)}), {plan.slots} adapter slots "
            f"({_size(plan.adapter_slots)}) and {_size(self.work)} for a step's work"
        )
        room = self.limit - self.work - plan.weights - plan.adapter_slots
        per_row = plan.kv_cache // max(plan.rows, 1)
        fit = room // per_row if per_row else 0
        if fit >= 1:
            advice = (
                f"set batch_rows to {min(fit, plan.rows - 1)} or lower max_context_tokens, "
                "or raise gpu_memory_fraction (with training.gpu_memory_fraction, at most 1)"
            )
        else:
            advice = (
                "raise gpu_memory_fraction (with training.gpu_memory_fraction, at most 1), "
                "lower adapter_slots, or serve a smaller model"
            )
        raise ModelError(f"{where} does not hold {what}: {advice}")


def apply_gpu_budget(fraction: float, device: Any = None) -> GpuBudget:
    """Set `fraction` as this process's limit on the current CUDA device and return it."""
    import torch

    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return GpuBudget(total, fraction)
