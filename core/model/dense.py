"""A GPTQ checkpoint read straight into a dense model, for training a small model on the CPU.

GPTQ stores each quantized linear layer `W [out, in]` as four tensors: `qweight [in * bits / 32,
out]` (int32 words, `32 / bits` codes each, lowest bits first, packed along `in`), `qzeros
[groups, out * bits / 32]` (the zero point of each group and output, packed along `out`),
`scales [groups, out]` and `g_idx [in]` (the group of each input channel). The weight is

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])

where the zero points are stored as they are (`checkpoint_format` "gptq_v2") or minus one (the
older "gptq" format, so one is added back), plus the layer's zero-point residual
`r[g_idx[i], o]` where the checkpoint has them (`core.model.residuals`). GPTQModel's trainable
kernels compute the first part on every call; the trainer wants it once. Reading it here, from
the safetensors file, skips loading the checkpoint through GPTQModel first: its kernels keep
their packed buffers and workspaces alive beside the dense copy (measured: +574 MiB on the
embedded model in bf16, where the dense weights are 256 MiB).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from core.errors import ModelError
from core.model.residuals import RESIDUALS_FILE

QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def _checkpoint_format(quant: dict[str, Any]) -> str:
    return str(quant.get("checkpoint_format") or quant.get("format") or "gptq")


def supported(quant: dict[str, Any]) -> bool:
    """Whether `dense_model` reads this `quantization_config` (bits that pack evenly into int32
    words, one of the two GPTQ checkpoint formats)."""
    fmt = _checkpoint_format(quant)
    return int(quant.get("bits", 0)) in (2, 4, 8) and fmt in ("gptq", "gptq_v2")


def v1_zeros(quant: dict[str, Any]) -> bool:
    """Whether the checkpoint stores its zero points minus one (the older "gptq" format)."""
    return _checkpoint_format(quant) == "gptq"


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files of weights (not its zero-point residuals)."""
    return [f for f in sorted(path.glob("*.safetensors")) if f.name != RESIDUALS_FILE]


def dense_parameters(path: Path, quant: dict[str, Any]) -> int:
    """How many weights the checkpoint's GPTQ layers hold once dense, from the files' headers
    alone (each `qweight [in * bits / 32, out]`)."""
    per_word = 32 // int(quant["bits"])
    total = 0
    for file in weight_files(path):
        with _Tensors(file) as f:
            for name in f.names:
                if name.endswith(".qweight"):
                    words, out = f.header[name]["shape"]
                    total += words * per_word * out
    return total


def unpack(packed: Any, bits: int, dim: int) -> Any:
    """Split int32 words into their `32 / bits` codes along `dim` (lowest bits first)."""
    import torch

    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:  # [words, n] -> [words * per_word, n]
        codes = (packed[:, None, :] >> shifts[None, :, None]) & mask
        return codes.reshape(packed.shape[0] * per_word, packed.shape[1])
    codes = (
        packed[:, :, None] >> shifts[None, None, :]
    ) & mask  # [m, words] -> [m, words * per_word]
    return codes.reshape(packed.shape[0], packed.shape[1] * per_word)


def codes(qweight: Any, qzeros: Any, scales: Any, bits: int, v1_zeros: bool) -> tuple[Any, Any]:
    """The layer's codes `q [in, out]` and zero points `z [groups, out]`, unpacked."""
    q = unpack(qweight, bits, dim=0)
    z = unpack(qzeros, bits, dim=1)[:, : scales.shape[1]]
    return q, z + 1 if v1_zeros else z


def dequantize(
    qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bits: int, v1_zeros: bool
) -> Any:
    """The fp32 weight `[out, in]` of one GPTQ linear layer (see the module's docstring)."""
    import torch

    q, z = codes(qweight, qzeros, scales, bits, v1_zeros)
    groups = g_idx.long()
    weight = (q - z[groups]).to(torch.float32) * scales[groups].to(torch.float32)
    return weight.t()


def dense_model(path: Path, quant: dict[str, Any], dtype: Any) -> Any:
    """The checkpoint at `path` as a plain transformers model in `dtype` on the CPU: each GPTQ
    layer dequantized in fp32 and rounded once to `dtype`, the other weights cast to it.

    Raises `ModelError` for a checkpoint this cannot read (the caller then loads it through
    GPTQModel)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not supported(quant):
        raise ModelError(f"cannot read a {quant.get('bits')}-bit checkpoint densely")
    bits = int(quant["bits"])
    old_zeros = v1_zeros(quant)
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path} has no safetensors weights")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # no memory for weights about to be replaced
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, Any] = {}
    try:
        residuals: dict[str, Any] = {}
        if (path / RESIDUALS_FILE).is_file():
            with _Tensors(path / RESIDUALS_FILE) as f:
                residuals = {name: f.read(name) for name in f.names}
        for file in files:
            with _Tensors(file) as f:
                for name in sorted(f.names):
                    if name.endswith(QUANT_SUFFIXES):
                        if not name.endswith(".qweight"):
                            continue
                        prefix = name[: -len(".qweight")]
                        parts = [f.read(prefix + s) for s in QUANT_SUFFIXES]
                        weight = dequantize(*parts, bits=bits, v1_zeros=old_zeros)
                        residual = residuals.pop(prefix, None)
                        if residual is not None:  # [groups, out] by input channel's group
                            weight = weight + residual.float()[parts[3].long()].t()
                        state[prefix + ".weight"] = weight.to(dtype).contiguous()
                    else:
                        state[name] = f.read(name).to(dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"the model's weights in {path} cannot be read: {e}") from None
    if residuals:
        raise ModelError(f"{RESIDUALS_FILE} in {path} names layers it does not have")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    state.clear()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    # Rotary frequencies and the like are buffers computed from the config, not weights.
    buffers = dict(model.named_buffers())
    missing = [m for m in missing if m not in buffers]
    if missing or unexpected:
        raise ModelError(
            f"the weights in {path} do not fit its config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    for name, buffer in buffers.items():
        if buffer.is_meta:
            raise ModelError(f"the model's buffer {name} was not initialised")
    model.eval()
    return model


class _Tensors:
    """A safetensors file read one tensor at a time with plain reads.

    `safe_open` maps the whole file, and the pages it touches count as resident until it is
    closed: reading a tensor into its own buffer keeps only that tensor in memory."""

    DTYPES: ClassVar[dict[str, str]] = {
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I32": "int32",
    }

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self) -> _Tensors:
        self.handle = open(self.file, "rb")  # closed by __exit__
        size = int.from_bytes(self.handle.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            raise ValueError(f"{self.file.name} has no safetensors header")
        self.header: dict[str, Any] = json.loads(self.handle.read(size))
        self.header.pop("__metadata__", None)
        self.base = 8 + size
        self.names = set(self.header)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def read(self, name: str) -> Any:
        import torch

        entry = self.header[name]
        dtype = getattr(torch, self.DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=dtype)
        if tensor.numel() * tensor.element_size() != end - begin:
            raise ValueError(f"{name} in {self.file.name} does not match its shape")
        self.handle.seek(self.base + begin)
        view = memoryview(tensor.view(torch.uint8).numpy()).cast("B") if end > begin else b""
        if end > begin and self.handle.readinto(view) != end - begin:
            raise ValueError(f"{self.file.name} is truncated")
        return tensor
