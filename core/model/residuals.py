"""Zero-point residuals: the part of a group's offset that an integer zero point cannot hold.

A GPTQ layer computes each weight as `scale * (code - zero)`, one scale and one integer zero per
group of inputs and output. Formats that keep a real-valued offset per block (GGUF's Q4_1 is
`d * code + m`) have the same 16 steps, but their offset `m` is seldom a whole number of steps:
rounding it to the nearest integer zero moves every weight of the block by the same amount, up
to half a step, which is as large as the rounding error of quantizing afresh. The difference is
kept instead, one real number per group and output: `weight = scale * (code - zero) +
residual`. Since a residual is shared by the group's inputs, it costs one product of the
inputs' group sums with a `[groups, out]` matrix (1/group of the layer's multiply-adds):

    y = x @ W_gptq + group_sums(x) @ residual

`core.model.q4_1` writes them beside a checkpoint (`RESIDUALS_FILE`); `attach` gives each layer
its matrix and a forward hook that adds the term, so every path that calls the layer (the plain
step, `generate`, PEFT training through its base layer) computes the full weight. The fused
paths of the fast step read `residual_of` and add the same term themselves; paths that hold a
layer's weights dense fold it in (`fold`). loracord's Triton kernels refuse such layers (their
fp16-pair GEMV holds zero points to whole numbers). A checkpoint without the file loads as
before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError

log = logging.getLogger(__name__)

RESIDUALS_FILE = "zero-residuals.safetensors"
_ATTRIBUTE = "loracord_residual"


def group_sums(x: torch.Tensor, group: int) -> torch.Tensor:
    """`[..., in]` -> `[..., in / group]` in fp32: each group of inputs summed."""
    return x.float().unflatten(-1, (-1, group)).sum(-1)


def correction(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The residuals' share of `x @ W`, fp32 `[..., out]` (`residual` is `[groups, out]`)."""
    group = x.shape[-1] // residual.shape[0]
    return group_sums(x, group) @ residual


def residual_of(module: Any) -> torch.Tensor | None:
    """The fp32 `[groups, out]` residual `attach` gave a layer, or None."""
    return getattr(module, _ATTRIBUTE, None)


def _add_residual(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    residual = residual_of(module)
    if residual is None:  # (folded away, e.g. into dense weights)
        return output
    return output + correction(args[0], residual).to(output.dtype)


def attach(model: Any, folder: Path) -> int:
    """Give each GPTQ layer of `model` its residuals from `folder` (none: nothing to do).

    Returns how many layers got one. A file that does not fit the model is refused in one line:
    serving without it would silently give different weights than the checkpoint's own."""
    path = folder / RESIDUALS_FILE
    if not path.is_file():
        return 0
    from safetensors import SafetensorError, safe_open

    from core.model.loader import quant_layers

    names = {id(m): name for name, m in model.named_modules()}
    layers = {names[id(m)]: m for m in quant_layers(model)}
    try:
        with safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            unknown = sorted(keys - set(layers))
            if unknown:
                raise ModelError(f"{path.name} names layers the model does not have: {unknown[:3]}")
            for name in sorted(keys):
                module = layers[name]
                residual = handle.get_tensor(name).to(torch.float32)
                groups = int(module.in_features) // int(module.group_size)
                if tuple(residual.shape) != (groups, int(module.out_features)):
                    raise ModelError(
                        f"{path.name}: {name} is {tuple(residual.shape)}, the layer needs "
                        f"{(groups, int(module.out_features))}"
                    )
                device = module.qweight.device
                if not hasattr(module, _ATTRIBUTE):  # one hook, however often attached
                    module.register_forward_hook(_add_residual)
                setattr(module, _ATTRIBUTE, residual.to(device))
    except (OSError, SafetensorError) as e:
        raise ModelError(f"could not read {path}: {e}") from e
    log.info("zero-point residuals for %d GPTQ layers", len(keys))
    return len(keys)


def fold(module: Any, weight: torch.Tensor) -> torch.Tensor:
    """A GPTQ layer's dequantized weight `[in, out]` made whole: plus its residual, each input
    channel its group's row, which is then detached (the dense copy holds it; a hook would add it
    twice). Unchanged for a layer without one."""
    residual = detach(module)
    if residual is None:
        return weight
    return weight.float() + residual[module.g_idx.long()]


def detach(module: Any) -> torch.Tensor | None:
    """Take a layer's residual away (its forward then computes the integer-zero weight alone)
    and return it: for paths that fold it into their own weights."""
    residual = residual_of(module)
    if residual is not None:
        setattr(module, _ATTRIBUTE, None)
    return residual
