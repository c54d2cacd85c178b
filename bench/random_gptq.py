"""Write a GPTQ 4-bit checkpoint of any Llama-family shape with random packed weights.

For speed measurements on a machine that cannot receive a real model (the GPU machine gets at
most 64 MiB): the shape comes from a folder's `config.json` (e.g. SmolLM2-135M-Instruct's, with
its tokenizer files beside it, which are copied), the weights are random `qweight`, `qzeros`,
`scales` and `g_idx` tensors of the right shapes, no act-order: symmetric in GPTQ's v1 format
(zero points stored minus one), or with `--v2` asymmetric in the v2 format (random zero points
stored as they are, as transformers and loracord's build write them). Seconds, no calibration;
the values are meaningless.

    python bench/random_gptq.py BASE_DIR OUT_DIR [--group-size 32] [--v2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="a folder with config.json and tokenizer files")
    parser.add_argument("out", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--v2", action="store_true", help="asymmetric, GPTQ v2 format")
    args = parser.parse_args()
    cfg = json.loads((args.base / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    vocab, layers, group = cfg["vocab_size"], cfg["num_hidden_layers"], args.group_size
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}

    def qlinear(prefix: str, k: int, n: int) -> None:
        t[f"{prefix}.qweight"] = torch.randint(
            -(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=g
        )
        if args.v2:  # any zero point 0..15, stored as it is
            zeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), generator=g)
            t[f"{prefix}.qzeros"] = zeros.to(torch.int32)
        else:  # 8 for every group, stored as 7
            t[f"{prefix}.qzeros"] = torch.full((k // group, n // 8), 0x77777777, dtype=torch.int32)
        t[f"{prefix}.scales"] = (torch.rand((k // group, n), generator=g) * 0.002 + 0.001).half()
        t[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // group

    t["model.embed_tokens.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).half()
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).half()
    t["model.norm.weight"] = torch.ones(hidden).half()
    for i in range(layers):
        p = f"model.layers.{i}"
        qlinear(f"{p}.self_attn.q_proj", hidden, heads * head_dim)
        qlinear(f"{p}.self_attn.k_proj", hidden, kv_heads * head_dim)
        qlinear(f"{p}.self_attn.v_proj", hidden, kv_heads * head_dim)
        qlinear(f"{p}.self_attn.o_proj", heads * head_dim, hidden)
        qlinear(f"{p}.mlp.gate_proj", hidden, inter)
        qlinear(f"{p}.mlp.up_proj", hidden, inter)
        qlinear(f"{p}.mlp.down_proj", inter, hidden)
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden).half()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden).half()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": False,
        "sym": not args.v2,
        "checkpoint_format": "gptq_v2" if args.v2 else "gptq",
    }
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in args.base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, args.out)
    size = sum(v.numel() * v.element_size() for v in t.values()) / 1e9
    print(f"{args.out}: {layers} layers, width {hidden}, g{group}, {size:.2f} GB")


if __name__ == "__main__":
    main()
