"""The embedded model's Q4_1 blocks, written as a GPTQ checkpoint without loss.

The bundled GGUF stores every linear layer as Q4_1: blocks of 32 inputs of one output row, each
an fp16 step `d`, an fp16 offset `m` and 32 four-bit codes, `w = d * code + m`. GPTQ with groups
of 32 along the inputs has the same blocks, the same 16 steps and fp16 scales, so codes and
steps carry over exactly; only the offset differs, since a GPTQ zero point is an integer number
of steps. The nearest integer zero takes most of it and the rest is kept as a zero-point
residual per group and output (`core.model.residuals`). The checkpoint then holds exactly the
weights of the fp32 model the GGUF dequantizes to, which is the quality reference: re-quantizing
those already-4-bit weights with GPTQ lost 14-16% of the reference's next-token choices on chat
(BENCHMARKS.md, "Quality of the embedded build"), carrying them over loses only what serving in
bf16 loses.

`write_checkpoint` checks the result against the fp32 checkpoint tensor by tensor and refuses
to write one that differs, so a GGUF laid out otherwise (another block type, another row order)
ends the build in one line rather than serving other weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ModelError
from core.model.residuals import RESIDUALS_FILE

GROUP = 32  # Q4_1's block
_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of codes
# GGUF tensor name -> the Hugging Face Llama module it is the weight of
_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def decode_blocks(raw: np.ndarray, inputs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor's bytes `[rows, blocks * 20]` -> (codes uint8 `[rows, inputs]`, d and m
    float32 `[rows, blocks]`). In a block the first 16 weights are the low nibbles of its 16
    code bytes, the last 16 the high nibbles."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, inputs // GROUP, _BLOCK_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[:, :, 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, inputs)
    return codes, d, m


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """The row order of a q or k projection as Hugging Face keeps it, in terms of the GGUF's:
    llama.cpp interleaves each head's two rotary halves, transformers undoes that on load."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def to_gptq(
    codes: np.ndarray, d: np.ndarray, m: np.ndarray
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Q4_1 blocks of a `[out, in]` weight -> GPTQ v2 tensors (asymmetric, groups of 32) and
    the fp32 residual `[groups, out]` with `w = scale * (code - zero) + residual`."""
    out, inputs = codes.shape
    flat = d == 0  # a block of equal weights: any step, the offset all in the residual
    scale = np.where(flat, np.float32(1.0), d).astype(np.float16)
    zero = np.where(flat, 0, np.clip(np.rint(-m / np.where(flat, 1, d)), 0, 15)).astype(np.int64)
    residual = (m + scale.astype(np.float32) * zero).astype(np.float32)  # [out, groups]
    codes = np.where(np.repeat(flat, GROUP, axis=1), 0, codes).astype(np.int64)
    shifts = np.arange(8, dtype=np.int64) * 4
    qweight = (codes.T.reshape(inputs // 8, 8, out) << shifts[None, :, None]).sum(axis=1)
    qzeros = (zero.T.reshape(inputs // GROUP, out // 8, 8) << shifts[None, None, :]).sum(axis=2)
    tensors = {
        "qweight": torch.from_numpy(np.ascontiguousarray(qweight.astype(np.uint32)).view(np.int32)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros.astype(np.uint32)).view(np.int32)),
        "scales": torch.from_numpy(scale.T.copy()),
        "g_idx": torch.arange(inputs, dtype=torch.int32) // GROUP,
    }
    return tensors, torch.from_numpy(np.ascontiguousarray(residual.T))


def dequantize(tensors: dict[str, torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    """The `[out, in]` fp32 weight a checkpoint written by `to_gptq` holds (for the check): the
    GPTQ part as the trainer reads it (`core.model.dense`), plus the residual."""
    from core.model.dense import dequantize as gptq_weight

    t = tensors
    weight = gptq_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, v1_zeros=False)
    return weight + residual[tensors["g_idx"].long()].T


def write_checkpoint(gguf: Path, fp_dir: Path, folder: Path) -> dict[str, Any]:
    """Write the GPTQ checkpoint of `gguf`'s Q4_1 layers into `folder` (fp_dir: the fp32 model
    dequantized from the same file, whose other tensors, config and tokenizer it takes).
    Returns facts for the build manifest; raises ModelError if any layer would differ."""
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((fp_dir / "config.json").read_text(encoding="utf-8"))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    reader = GGUFReader(str(gguf))
    tensors: dict[str, torch.Tensor] = {}
    residuals: dict[str, torch.Tensor] = {}
    worst = 0.0
    with safe_open(str(fp_dir / "model.safetensors"), "pt") as fp32:
        reference = {name: fp32.get_tensor(name) for name in fp32.keys()}  # noqa: SIM118 (not a dict)
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LINEARS:
            continue
        name = f"model.layers.{parts[1]}.{_LINEARS[parts[2]]}"
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            raise ModelError(f"{tensor.name} is {tensor.tensor_type.name}, not Q4_1")
        inputs = int(tensor.shape[0])
        codes, d, m = decode_blocks(np.asarray(tensor.data), inputs)
        if parts[2] in heads:
            order = unpermute_rows(codes.shape[0], int(heads[parts[2]]))
            codes, d, m = codes[order], d[order], m[order]
        layer, residual = to_gptq(codes, d, m)
        expected = reference.pop(f"{name}.weight", None)
        if expected is None:
            raise ModelError(f"the fp32 model has no {name}.weight")
        error = float((dequantize(layer, residual) - expected.float()).abs().max())
        worst = max(worst, error / max(float(expected.abs().max()), 1e-30))
        if worst > 1e-5:
            raise ModelError(
                f"{tensor.name} does not carry over exactly (max error {error:.3g}); "
                "the GGUF's layout is not the one expected"
            )
        tensors.update({f"{name}.{key}": value for key, value in layer.items()})
        residuals[name] = residual
    left = [name for name in reference if name.endswith("_proj.weight")]
    if not residuals or left:
        raise ModelError(f"the GGUF has no Q4_1 weights for {left[:3] or 'any layer'}")
    tensors.update({name: value.contiguous() for name, value in reference.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_file(residuals, str(folder / RESIDUALS_FILE), metadata={"format": "pt"})
    for name in _FILES:
        if (fp_dir / name).is_file():
            shutil.copyfile(fp_dir / name, folder / name)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "true_sequential": True,
        "meta": {"quantizer": ["loracord:q4_1"]},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"layers": len(residuals), "max_relative_error": worst}
