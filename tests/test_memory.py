"""The bot's share of a GPU (core/model/memory.py): what the engine allocates once is planned to
the byte, a plan that does not fit is refused with what would fit, and the bot's and the
trainer's shares cannot add up to more than the whole GPU. The CUDA half (the per-process limit
really holding) is in tests/gpu/test_cuda_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from core.adapters import BaseShapes
from core.errors import ModelError, SettingsError
from core.model.batch import KVCache
from core.model.lora import LoraSlots
from core.model.memory import GIB, GpuBudget, ServingMemory
from core.settings import load

# SmolLM2-135M's shape (grouped-query attention) and a Llama-2-7B's (one KV head per head).
SMALL = LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)
LLAMA_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
SHAPES_7B = BaseShapes.from_config(LLAMA_7B.to_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_plan_is_what_the_engine_allocates(dtype: torch.dtype) -> None:
    plan = ServingMemory.plan(
        BaseShapes.from_config(SMALL.to_dict()),
        0,
        rows=3,
        context=96,
        slots=2,
        max_rank=8,
        element_size=dtype.itemsize,
    )
    cache = KVCache(30, 3, 3, 96, 64, dtype, "cpu")
    slots = LoraSlots(BaseShapes.from_config(SMALL.to_dict()), 2, 8, dtype, "cpu")
    assert (plan.kv_cache, plan.adapter_slots) == (cache.nbytes, slots.nbytes)


def test_a_7b_model_fits_a_fair_share_of_an_h200() -> None:
    # 3.9 GB of 4-bit weights, 8 rows x 4096 tokens of fp16 cache (16 GiB), 4 slots of rank 16.
    plan = ServingMemory.plan(
        SHAPES_7B, 3_900_000_000, rows=8, context=4096, slots=4, max_rank=16, element_size=2
    )
    assert plan.kv_cache == 16 * GIB
    GpuBudget(139 * GIB, 0.45).check(plan)  # 62.6 GiB: fits


def test_a_plan_too_big_is_refused_with_the_rows_that_fit() -> None:
    plan = ServingMemory.plan(
        SHAPES_7B, 3_900_000_000, rows=64, context=4096, slots=4, max_rank=16, element_size=2
    )
    budget = GpuBudget(80 * GIB, 0.45)  # 36 GiB; 64 rows of 2 GiB do not fit
    with pytest.raises(ModelError) as caught:
        budget.check(plan)
    message = str(caught.value)
    assert "gpu_memory_fraction 0.45 of 80.0 GiB" in message and "\n" not in message
    fit = int(message.split("set batch_rows to ")[1].split()[0])
    # The rows it names fit, and one more would not.
    GpuBudget(80 * GIB, 0.45).check(
        ServingMemory.plan(
            SHAPES_7B, 3_900_000_000, rows=fit, context=4096, slots=4, max_rank=16, element_size=2
        )
    )
    with pytest.raises(ModelError):
        budget.check(
            ServingMemory.plan(
                SHAPES_7B,
                3_900_000_000,
                rows=fit + 1,
                context=4096,
                slots=4,
                max_rank=16,
                element_size=2,
            )
        )


def test_weights_beyond_the_share_are_refused_without_a_row_count() -> None:
    plan = ServingMemory.plan(
        SHAPES_7B, 3_900_000_000, rows=1, context=512, slots=1, max_rank=8, element_size=2
    )
    with pytest.raises(ModelError, match="serve a smaller model") as caught:
        GpuBudget(8 * GIB, 0.3).check(plan)  # 2.4 GiB: less than the weights
    assert "batch_rows to" not in str(caught.value)


def test_the_bot_and_the_trainer_cannot_share_more_than_the_gpu(tmp_path: Path) -> None:
    env = {"LORACORD_DATA_DIR": str(tmp_path)}
    assert load(None, environ=env).gpu_memory_fraction + 0.5 <= 1.0  # the defaults fit
    with pytest.raises(SettingsError) as caught:
        load(None, environ={**env, "LORACORD_GPU_MEMORY_FRACTION": "0.6"})
    message = str(caught.value)
    assert "gpu_memory_fraction (0.6" in message
    assert "training.gpu_memory_fraction (0.5" in message
    # Moving the trainer's share makes room.
    settings = load(
        None,
        environ={**env, "LORACORD_GPU_MEMORY_FRACTION": "0.6"},
        training={"gpu_memory_fraction": 0.4},
    )
    assert (settings.gpu_memory_fraction, settings.training.gpu_memory_fraction) == (0.6, 0.4)
