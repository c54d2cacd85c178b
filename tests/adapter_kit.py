"""Adapter folders for tests, written in PEFT's own format.

PEFT initialises B to zero, so a fresh adapter answers exactly like the base model and would let
a broken per-row LoRA pass. These adapters have random A and B, scaled so that the model's
answers change but stay fluent; `tests/test_lora.py` checks that PEFT itself reads them and
gives the same logits as the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.adapters import CONFIG_FILE, SERVED_TARGETS, WEIGHTS_FILE, BaseShapes


def write_adapter(
    folder: Path,
    shapes: BaseShapes,
    *,
    seed: int,
    rank: int = 8,
    alpha: float = 32.0,
    strength: float = 0.02,
    targets: tuple[str, ...] = SERVED_TARGETS,
    layers: range | None = None,
    config: dict[str, object] | None = None,
) -> Path:
    """A PEFT LoRA folder for `shapes` with random A and B (B scaled by `strength`)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers if layers is not None else range(shapes.layers):
        for target in targets:
            fan_in, fan_out = shapes.modules.get(target, (shapes.modules["q_proj"][0],) * 2)
            block = "self_attn" if target in SERVED_TARGETS else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) * strength
            )
    save_file(tensors, str(folder / WEIGHTS_FILE))
    values: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    values.update(config or {})
    (folder / CONFIG_FILE).write_text(json.dumps(values), encoding="utf-8")
    return folder
