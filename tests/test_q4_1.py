"""The embedded build carries the GGUF's Q4_1 blocks over to GPTQ exactly, and every path that
computes with a layer adds its zero-point residual."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import ModelError
from core.model import build, q4_1, residuals
from tests.conftest import cache_beside


def _q4_1_bytes(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Encode `[rows, blocks]` steps and offsets and `[rows, blocks * 32]` codes as ggml's Q4_1
    does: per block fp16 d, fp16 m, then byte j = code j | code (j + 16) << 4."""
    rows, blocks = d.shape
    out = np.zeros((rows, blocks, 20), dtype=np.uint8)
    out[:, :, 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[:, :, 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    c = codes.reshape(rows, blocks, 32).astype(np.uint8)
    out[:, :, 4:] = c[:, :, :16] | (c[:, :, 16:] << 4)
    return out.reshape(rows, blocks * 20)


def test_blocks_decode_and_carry_over_exactly() -> None:
    rng = np.random.default_rng(0)
    rows, inputs = 16, 96
    d = rng.uniform(0.001, 0.05, (rows, inputs // 32))
    m = rng.uniform(-0.4, 0.1, d.shape)
    d[0, 0] = 0.0  # a block of equal weights
    m[1, 0] = 0.3  # all weights positive: the integer zero clamps at 0, the residual keeps it
    m[2, 1] = -2.0  # all negative, below 15 steps: clamps at 15
    d, m = (a.astype(np.float16).astype(np.float32) for a in (d, m))  # as a GGUF holds them
    codes = rng.integers(0, 16, (rows, inputs)).astype(np.uint8)

    got_codes, got_d, got_m = q4_1.decode_blocks(_q4_1_bytes(d, m, codes), inputs)
    assert np.array_equal(got_codes, codes) and np.array_equal(got_d, d)
    assert np.array_equal(got_m, m)

    expected = np.repeat(d, 32, axis=1) * codes + np.repeat(m, 32, axis=1)
    tensors, residual = q4_1.to_gptq(codes, d, m)
    assert tensors["qweight"].shape == (inputs // 8, rows) and residual.shape == (3, rows)
    packed = tensors["qzeros"].view(torch.uint32).to(torch.int64)
    zeros = ((packed[:, :, None] >> (torch.arange(8) * 4)) & 15).flatten(1)  # [groups, out]
    assert int(zeros[0, 1]) == 0 and residual[0, 1] > 0  # row 1's clamped zero
    assert int(zeros[1, 2]) == 15 and residual[1, 2] < 0  # row 2's
    weight = q4_1.dequantize(tensors, residual)
    assert torch.allclose(weight, torch.from_numpy(expected), rtol=0, atol=1e-6)
    # the integer zero takes all it can: what is left is at most half a step
    fits = (d > 0) & (-m / np.where(d > 0, d, 1) >= 0) & (-m / np.where(d > 0, d, 1) <= 15)
    left = residual.numpy().T[fits] / d[fits]
    assert np.abs(left).max() <= 0.5 + 1e-6


def test_row_order_is_the_one_transformers_gives_q_and_k() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for name, heads, rows in (("blk.0.attn_q.weight", 9, 576), ("blk.0.attn_k.weight", 3, 192)):
        index = np.arange(rows, dtype=np.float32)[:, None]
        theirs = processor.process(index, name).weights[:, 0].astype(np.int64)
        assert np.array_equal(q4_1.unpermute_rows(rows, heads), theirs)


def test_the_embedded_build_holds_the_reference_weights_exactly(
    embedded_model_dir: Path, dequantized_model_dir: Path
) -> None:
    manifest = json.loads((embedded_model_dir / "loracord-build.json").read_text())
    assert manifest["recipe"]["method"] == "q4_1"
    assert manifest["carried"] == {"layers": 210, "max_relative_error": 0.0}
    with (
        safe_open(str(embedded_model_dir / "model.safetensors"), "pt") as built,
        safe_open(str(embedded_model_dir / residuals.RESIDUALS_FILE), "pt") as kept,
        safe_open(str(dequantized_model_dir / "model.safetensors"), "pt") as fp32,
    ):
        names = list(kept.keys())
        assert len(names) == 210
        for name in names[:: len(names) // 12]:  # a dozen layers, every kind among them
            layer = {k: built.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales")}
            layer["g_idx"] = built.get_tensor(f"{name}.g_idx")
            weight = q4_1.dequantize(layer, kept.get_tensor(name))
            assert torch.equal(weight, fp32.get_tensor(f"{name}.weight")), name


def test_a_gguf_laid_out_otherwise_is_refused_in_one_line(
    dequantized_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows in the GGUF's own order (no un-permuting) no longer match the reference."""
    monkeypatch.setattr(q4_1, "unpermute_rows", lambda rows, heads: np.arange(rows))
    with pytest.raises(ModelError, match="does not carry over exactly") as refused:
        q4_1.write_checkpoint(build.gguf_path(), dequantized_model_dir, tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()  # nothing written before every layer checked


class _Layer(torch.nn.Module):
    """Stands in for a GPTQ layer: `x @ W` with W from `base` (in x out)."""

    def __init__(self, base: torch.Tensor, group: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.shape
        self.group_size = group
        self.qweight = torch.zeros(1, dtype=torch.int32)
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base


def test_attach_adds_the_residual_term_and_refuses_a_file_that_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 8)
    residual = torch.randn(2, 8)
    model = torch.nn.Sequential()
    model.add_module("proj", _Layer(base, 32))
    layers = lambda m: [x for x in m.modules() if isinstance(x, _Layer)]  # noqa: E731
    monkeypatch.setattr("core.model.loader.quant_layers", layers)
    assert residuals.attach(model, tmp_path) == 0  # no file: the checkpoint as it is

    save_file({"proj": residual}, str(tmp_path / residuals.RESIDUALS_FILE))
    assert residuals.attach(model, tmp_path) == 1
    x = torch.randn(3, 64)
    whole = base + residual.repeat_interleave(32, dim=0)
    assert torch.allclose(model.proj(x), x @ whole, atol=1e-5)
    assert torch.allclose(residuals.detach(model.proj), residual)
    assert torch.allclose(model.proj(x), x @ base, atol=1e-5)  # folded elsewhere: no term

    for bad, message in (
        ({"nothing.here": residual}, "names layers the model does not have"),
        ({"proj": torch.randn(3, 8)}, r"proj is \(3, 8\), the layer needs \(2, 8\)"),
    ):
        save_file(bad, str(tmp_path / residuals.RESIDUALS_FILE))
        with pytest.raises(ModelError, match=message):
            residuals.attach(model, tmp_path)
    (tmp_path / residuals.RESIDUALS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="could not read"):
        residuals.attach(model, tmp_path)


def test_a_carry_over_that_cannot_be_made_ends_the_build_in_one_line(
    dequantized_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = cache_beside(dequantized_model_dir, tmp_path)

    def other_layout(gguf: Path, fp_dir: Path, folder: Path) -> None:
        raise ModelError("blk.0.attn_q.weight is Q8_0, not Q4_1")

    monkeypatch.setattr(q4_1, "write_checkpoint", other_layout)
    with pytest.raises(ModelError) as refused:
        build.ensure_embedded(cache)
    message = str(refused.value)
    assert "could not be built to quality" in message and "\n" not in message
    assert "recipe 1: blk.0.attn_q.weight is Q8_0, not Q4_1" in message
    left = sorted(p.name for p in (cache / "models").iterdir() if not p.name.startswith("."))
    failure = build._failure_file(cache, build.recipes()).name
    assert left == sorted([build.dequantized_dir(cache).name, failure])
