"""Load a GPTQ checkpoint for serving with the right kernel, dtype and device, and describe it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError, first_line
from core.model import q4_cpu
from core.model.kernels import Runtime, cuda_serving_order, triton_takes
from core.model.residuals import attach as attach_residuals
from core.model.residuals import fold as fold_residual
from core.model.source import read_quantization

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What `loracord model info` prints: where the model is and how it runs."""

    name: str
    path: str
    bits: int
    group_size: int
    kernel: str
    dtype: str
    device: str
    size_bytes: int
    context_tokens: int
    load_seconds: float
    weights_sha256: str
    rows: int = 0  # requests decoded together (the engine's KV cache rows)
    kv_cache_bytes: int = 0  # memory of that cache: rows x context_tokens
    adapter_slots: int = 0  # LoRA adapters resident at once
    adapter_max_rank: int = 0  # the highest LoRA rank they may have
    decode_path: str = ""  # how decode steps run: "fast (...)" or "plain"
    gpu_budget_bytes: int = 0  # on a GPU: the bot's share of its memory (0: no limit, a CPU)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Capacity:
    """How much an engine serves at once: rows decoding together, tokens each row may hold
    (prompt plus answer), and the memory their KV cache takes."""

    rows: int
    context_tokens: int
    kv_cache_bytes: int


def weights_sha256(folder: Path) -> str:
    """sha256 over the checkpoint's safetensors files (builds differ between machines).

    A loracord build records it in its manifest; other checkpoints are hashed here, once per
    load (seconds for a 7B model).
    """
    manifest = folder / "loracord-build.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("weights_sha256")
        if recorded:
            return str(recorded)
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def folder_size(path: Path) -> int:
    """Bytes of the checkpoint's weight and config files."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quant_layers(model: Any) -> list[Any]:
    """The model's GPTQ linear layers (GPTQModel QuantLinear subclasses)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return [m for m in model.modules() if isinstance(m, BaseQuantLinear)]


def load_for_serving(path: Path, runtime: Runtime) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds) loaded from a GPTQ folder, ready for inference."""
    import torch
    from transformers import AutoTokenizer

    quant = read_quantization(path)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer from {path}: {first_line(e)}") from e
    kernels = _kernels_for(runtime, quant)
    for index, kernel in enumerate(kernels):
        try:
            model = _load_with_kernel(path, runtime, kernel, int(quant["bits"]))
            attach_residuals(model, path)
            if _auto_chose_triton(runtime, kernel):
                _keep_only_if_triton_serves(model)
            break
        except (OSError, ValueError, RuntimeError, ImportError, NotImplementedError) as e:
            model = None  # (a model loaded and refused leaves the GPU before the next loads)
            if index + 1 == len(kernels):
                raise ModelError(f"could not load the model from {path}: {first_line(e)}") from e
            log.warning(
                "kernel %s cannot serve %s (%s); trying %s",
                kernel,
                path.name,
                first_line(e),
                kernels[index + 1],
            )
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    if not quant_layers(model):
        raise ModelError(f"{path} loaded without any GPTQ layers; is it really quantized?")
    torch.set_grad_enabled(False)
    _dequantize_once_if_small(model, runtime)
    _int8_lm_head_on_cpu(model, runtime)
    return model, tokenizer, time.monotonic() - started


def _auto_chose_triton(runtime: Runtime, kernel: str) -> bool:
    """Whether `kernel = "auto"` on CUDA loaded `torch` for loracord's Triton kernels (the
    first of its order for the checkpoints they take; `kernel = "torch"` set by hand is kept
    whatever serves it)."""
    return runtime.device == "cuda" and bool(runtime.fallbacks) and kernel == "torch"


def _keep_only_if_triton_serves(model: Any) -> None:
    """Raise (so that the loader tries the next kernel) when loracord's Triton kernels would
    not serve every GPTQ layer of a model `auto` loaded with the `torch` kernel for them: a
    layer they do not take (a bias, say), or kernels that fail their check on this GPU. Left
    alone, those layers would run GPTQModel's generic kernel, many times slower than Marlin or
    ExLlamaV2."""
    from core.model.fast import triton_refusal

    refusal = triton_refusal(quant_layers(model))
    if refusal is None:
        return
    raise RuntimeError(f"loracord's Triton kernels would not serve it: {refusal}")


def _int8_lm_head_on_cpu(model: Any, runtime: Runtime) -> None:
    """On a CPU the LM head is the largest single read of a decode step: SmolLM2's 49,152 x
    576 is 57 MB per token in bf16 (~5 ms of a ~20 ms step on 2 cores) and 113 MB in fp32
    (8.5 ms on the AVX2-only 2-core CPU). In int8 with a scale per row it reads a quarter to a
    half of that (bf16: measured 5.7 -> 2.5 ms), and the embedded build's top-1 agreement with
    fp32 moved 83.6% -> 83.3% (KL 0.1080 -> 0.1083, BENCHMARKS.md). The embedding keeps its own
    weight; the gate scores the model as served, with this head."""
    import torch

    from core.model.fast import Int8Linear

    head = getattr(model, "lm_head", None)
    if runtime.device != "cpu" or runtime.dtype not in (torch.bfloat16, torch.float32):
        return
    if type(head) is torch.nn.Linear and head.bias is None:
        model.lm_head = Int8Linear(head.weight)


# fp32 weights the CPU path may hold instead of dequantizing on every call (a 135M model's
# linears take ~0.4 GiB; a 7B model's would take 26 GiB and stays quantized).
DENSE_FP32_BUDGET_BYTES = 2 * 2**30


def _dequantize_once_if_small(model: Any, runtime: Runtime) -> None:
    """On a CPU in fp32 the generic `torch` kernel dequantizes every weight on every forward
    (and recompiles that for each new input shape): 0.35-0.55 s per token on the embedded
    model. When the dense weights fit `DENSE_FP32_BUDGET_BYTES`, dequantize them once: the
    same weights the kernel computes with, at dense-matmul speed (computed in fp32 from the codes,
    where GPTQModel's dequantize rounds them to fp16). Each dense layer also keeps its
    4-bit codes (`core.model.q4_cpu`, ~1/6 of the dense bytes), which decode steps read through
    the C++ step (`core.model.fast`): a token's step then reads 5 bits per weight, not 32."""
    import torch

    if runtime.device != "cpu" or runtime.dtype != torch.float32:
        return
    layers = [m for m in quant_layers(model) if type(m).__name__ == "TorchLinear"]
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in layers)
    if not layers or dense_bytes > DENSE_FP32_BUDGET_BYTES:
        return
    names = {id(m): name for name, m in model.named_modules()}
    packed = 0
    for layer in layers:
        q4 = None
        if q4_cpu.reads(layer):  # the weight from the codes in fp32, residual included
            codes, scales, offsets = q4_cpu.parts(layer)
            weight = q4_cpu.dense(codes, scales, offsets, int(layer.group_size))  # [out, in]
            if q4_cpu.takes(layer) and q4_cpu.cpu_runs_it():  # for the C++ decode step
                q4 = q4_cpu.pack(codes, scales, offsets, int(layer.group_size))
        else:
            weight = type(layer).dequantize_weight(layer).to(torch.float32)  # [in, out], eager
            weight = fold_residual(layer, weight).t()  # the whole weight, [out, in]
        dense = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        dense.__dict__["loracord_dequantized"] = True  # a plain flag, not a submodule
        if q4 is not None:
            dense.__dict__["loracord_q4"] = q4
            packed += q4.packed.nbytes + q4.scale_offsets.nbytes
        dense.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        if layer.bias is not None:
            dense.bias = torch.nn.Parameter(layer.bias.float().clone(), requires_grad=False)
        parent_name, _, child = names[id(layer)].rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
    log.info(
        "fp32 on CPU: %d GPTQ linears dequantized once (%.0f MiB), their codes kept (%.0f MiB)",
        len(layers),
        dense_bytes / 2**20,
        packed / 2**20,
    )


def _kernels_for(runtime: Runtime, quant: dict[str, Any]) -> tuple[str, ...]:
    """The runtime's kernels, without those that load this checkpoint but compute it wrong.

    GPTQModel 7.7's `torch_fused` (torch's int4 matmul, the fp32 CPU kernel) ignores the zero
    points of an asymmetric checkpoint: the embedded build served through it agreed with fp32
    on 0% of tokens, against 84% through the generic `torch` kernel (BENCHMARKS.md).
    """
    kernels = (runtime.kernel, *runtime.fallbacks)
    symmetric = quant.get("sym", True) is not False
    if not symmetric and "torch_fused" in kernels:
        log.info("asymmetric checkpoint: serving with the torch kernel instead of torch_fused")
        kernels = tuple("torch" if k == "torch_fused" else k for k in kernels)
    if runtime.device == "cuda" and runtime.fallbacks:  # `auto`: the table, by checkpoint
        kernels = cuda_serving_order(symmetric, triton_takes(quant))
    return kernels


def _load_with_kernel(path: Path, runtime: Runtime, kernel: str, bits: int) -> Any:
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs: dict[str, Any] = {}
    if kernel != "auto":
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=kernel)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=runtime.dtype, device_map=runtime.device, **kwargs
    )


def describe(
    name: str,
    path: Path,
    model: Any,
    runtime: Runtime,
    seconds: float,
    max_context_tokens: int | None = None,
) -> ModelInfo:
    """Facts about a loaded model, read from the model itself rather than the settings.

    `context_tokens` is what is served: the model's own window, lowered to the
    `max_context_tokens` setting when that is smaller (prompts are fitted to it).
    """
    window = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
    served = min(window, max_context_tokens) if max_context_tokens else window
    quant = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    layers = quant_layers(model)
    kernel = type(layers[0]).__name__ if layers else "none"
    if not layers and any(getattr(m, "loracord_dequantized", False) for m in model.modules()):
        kernel = "TorchLinear, dequantized once (fp32)"
    return ModelInfo(
        name=name,
        path=str(path),
        bits=int(quant.get("bits", 0)),
        group_size=int(quant.get("group_size", -1)),
        kernel=kernel,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(runtime.device),
        size_bytes=folder_size(path),
        context_tokens=served,
        load_seconds=round(seconds, 2),
        weights_sha256=weights_sha256(path),
    )
