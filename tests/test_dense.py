"""A GPTQ checkpoint read straight into dense layers (core/model/dense.py), for the trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.errors import ModelError
from core.model.dense import dense_model, dequantize, unpack
from core.model.source import read_quantization


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[in, out] codes -> [in * bits / 32, out] int32 words, lowest bits first (GPTQ qweight)."""
    per = 32 // bits
    words = torch.zeros(codes.shape[0] // per, codes.shape[1], dtype=torch.int64)
    for k in range(per):
        words |= codes[k::per].long() << (bits * k)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # as signed int32


def _pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[groups, out] codes -> [groups, out * bits / 32] int32 words (GPTQ qzeros)."""
    return _pack_rows(codes.t().contiguous(), bits).t().contiguous()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("v1", [False, True])
def test_dequantize_follows_the_gptq_formula(bits: int, v1: bool) -> None:
    """Random codes, zero points and scales, an act-order g_idx: W = s[g] * (q - z[g])."""
    gen = torch.Generator().manual_seed(bits)
    n_in, n_out, group = 64, 48, 16
    top = 2**bits
    q = torch.randint(0, top, (n_in, n_out), generator=gen)
    z = torch.randint(1, top, (n_in // group, n_out), generator=gen)
    scales = (torch.rand(n_in // group, n_out, generator=gen) + 0.1).half()
    g_idx = (torch.arange(n_in) // group)[torch.randperm(n_in, generator=gen)].int()
    stored_z = z - 1 if v1 else z
    assert torch.equal(unpack(_pack_rows(q, bits), bits, dim=0), q.int())
    weight = dequantize(
        _pack_rows(q, bits), _pack_cols(stored_z, bits), scales, g_idx, bits, v1_zeros=v1
    )
    want = (scales.float()[g_idx.long()] * (q - z[g_idx.long()]).float()).t()
    assert weight.shape == (n_out, n_in)
    assert torch.equal(weight, want)


def test_the_embedded_model_reads_as_gptqmodel_dequantizes_it(embedded_model_dir: Path) -> None:
    """Layer for layer the same weights as GPTQModel's trainable kernel computes (which rounds
    its product to the fp16 of the scales: agreement within fp16's precision) plus the layer's
    zero-point residual, and the same next-token logits."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    from core.model.loader import quant_layers
    from core.model.residuals import attach, residual_of

    quant = read_quantization(embedded_model_dir)
    dense = dense_model(embedded_model_dir, quant, torch.float32)
    kernel = AutoModelForCausalLM.from_pretrained(
        embedded_model_dir,
        quantization_config=GPTQConfig(bits=int(quant["bits"]), backend="auto_trainable"),
        dtype=torch.float32,
        device_map="cpu",
    )
    assert attach(kernel, embedded_model_dir) == 7 * kernel.config.num_hidden_layers
    kernel.train()  # the kernel's training format is what it dequantizes
    names = {id(m): name for name, m in kernel.named_modules()}
    layers = quant_layers(kernel)
    assert len(layers) == 7 * kernel.config.num_hidden_layers
    for layer in layers:
        residual = residual_of(layer)[layer.g_idx.long()]  # [in, out]
        theirs = (layer.dequantize_weight(num_itr=1).float() + residual).t()
        mine = dense.get_submodule(names[id(layer)]).weight
        assert not isinstance(dense.get_submodule(names[id(layer)]), type(layer))
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # tied, as in the config
    kernel.eval()
    ids = torch.tensor([[1, 504, 3458, 314, 2593, 30]])
    with torch.no_grad():
        a, b = dense(ids).logits, kernel(ids).logits
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    torch.testing.assert_close(a, b, rtol=0, atol=0.05)


def test_a_truncated_checkpoint_is_one_clear_error(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(embedded_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"cannot be read: .*truncated"):
        dense_model(broken, read_quantization(broken), torch.bfloat16)


def test_the_trainer_loads_a_small_model_densely_on_the_cpu(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    """No GPTQ layer is left for the trainer to dequantize on every call, and nothing is
    upcast: the base in its compute dtype, only the LoRA weights in fp32."""
    from core.model.loader import quant_layers
    from core.training.protocol import Quote, Recipe, TrainJob
    from core.training.recipe import load

    quotes = tuple(Quote(i, f"quote {i}", "t") for i in range(4))
    job = TrainJob(
        model_dir=str(embedded_model_dir),
        out_dir=str(tmp_path / "out"),
        train=quotes,
        eval=quotes[:1],
        recipe=Recipe(steps=1),
        dtype="bfloat16",
    )
    loaded = load(job)
    assert quant_layers(loaded.model) == []
    trainable = {p.dtype for p in loaded.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in loaded.model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32}
    assert frozen == {torch.bfloat16}
    assert loaded.model.get_base_model().is_gradient_checkpointing
