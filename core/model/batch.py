"""One engine step for many sequences: a preallocated KV cache and a batched forward pass.

The Hugging Face model keeps its weights, quantized linears, norms and rotary embedding; this
module only replaces the loop around them. A step takes a flat list of tokens from several
rows (one token for each row that is decoding, a chunk of prompt for each row being
prefilled), runs every linear layer once over all of them, writes each token's keys and values
into its row of the cache at its own position, and attends per row. Rows of different lengths
decode together because each attends only up to its own length (vLLM's flattened-token layout,
without paging: each row owns `context` tokens of the cache).

Each token may carry its own LoRA adapter (its segment's `slot`): `core.model.lora` adds the
low-rank terms after the attention projections, and a step with no adapter runs exactly as
before.

Serves the Llama family (Llama, Mistral, Qwen2, Qwen3 and their fine-tunes), the architectures
GPTQ checkpoints are mostly made from; another architecture is refused at load with its name.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from core.adapters import BaseShapes
from core.errors import ModelError
from core.model.fast import CudaGraphs, FastDecode, decode_attention, rms_norm
from core.model.loader import Capacity
from core.model.lora import LoraSlots
from core.model.scheduler import Segment

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class KVCache:
    """Keys and values of every layer, `[rows, kv_heads, context, head_dim]` each, allocated
    once. Rows are handed out and taken back by the scheduler; nothing here grows."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        context: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (rows, kv_heads, context, head_dim)
        # Zeros, not empty: masked positions are multiplied by 0 and must not hold NaN.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = rows
        self.context = context

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BatchModel:
    """Runs a loaded Llama-family model one step at a time over a bounded KV cache."""

    def __init__(
        self,
        model: Any,
        rows: int,
        context: int,
        *,
        adapter_slots: int = 0,
        adapter_max_rank: int = 16,
        fast: bool = True,
        native: bool = True,
        build_dir: Path | None = None,
    ) -> None:
        config = model.config
        kind = getattr(config, "model_type", "?")
        inner: Any = getattr(model, "model", None)
        if kind not in SUPPORTED_ARCHITECTURES or not all(
            hasattr(inner, name) for name in ("layers", "embed_tokens", "norm", "rotary_emb")
        ):
            raise ModelError(
                f"this model's architecture ({kind}) is not served; loracord serves the Llama "
                f"family: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        # Both paths normalise through the same function, so a row that moves between them
        # (a decode step beside a prompt chunk, then alone) sees the same rounding.
        self.norm = rms_norm(inner.norm)
        self.norm_module = inner.norm
        self._norms = [
            (rms_norm(layer.input_layernorm), rms_norm(layer.post_attention_layernorm))
            for layer in self.layers
        ]
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            context = min(context, int(window))  # within the window, sliding changes nothing
        self.device = model.device
        self.dtype = model.dtype
        # On a CPU, attention runs in fp32: bf16 matmuls of these small shapes cost ~3x more
        # than fp32 ones (one decode step of the embedded model: 26 ms in bf16, 20 in fp32).
        self.attention_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        # On a CPU the cache holds fp32 too, so attention reads it without a cast every step
        # (twice the bytes: 0.7 GiB for the embedded model's 8 rows x 2048 tokens).
        self.cache = KVCache(
            len(self.layers),
            rows,
            self.kv_heads,
            context,
            self.head_dim,
            self.attention_dtype,
            self.device,
        )
        self.capacity = Capacity(rows, context, self.cache.nbytes)
        # Adapter slots 1..adapter_slots (0 is the base model), allocated once like the cache.
        self.lora = (
            LoraSlots(
                BaseShapes.from_config(config.to_dict()),
                adapter_slots,
                adapter_max_rank,
                # fp32 on a CPU, like attention: small bf16 products are slower there, and
                # the slots of a small model are small.
                self.attention_dtype,
                self.device,
            )
            if adapter_slots > 0
            else None
        )
        # Decode-only steps (every row feeds one token: the steady state of serving) go through
        # `core.model.fast`; on a GPU replayed from CUDA graphs. `paths` counts the steps each
        # path ran, so a fallback is visible.
        # (native=False: the eager fast step alone, without the C++ or Triton step)
        self.fast = FastDecode(self, native=native, build_dir=build_dir) if fast else None
        self.graphs = (
            CudaGraphs(self.fast) if self.fast is not None and self.device.type == "cuda" else None
        )
        self.paths: Counter[str] = Counter()
        if self.graphs is not None:
            # Capture and check the smallest bucket now, so `decode_path` says from the start
            # whether graphs serve (a dummy token on row 0, free before any request).
            self.graphs.step([Segment(0, 0, [0], True)])

    @property
    def decode_path(self) -> str:
        """How decode steps run: "plain", or "fast (<kinds>)" with ", CUDA graphs" when they
        serve."""
        if self.fast is None:
            return "plain"
        graphs = self.graphs is not None and self.graphs.failed is None
        return f"fast ({self.fast.kind}{', CUDA graphs' if graphs else ''})"

    def step(self, segments: list[Segment]) -> torch.Tensor:
        """Feed every segment; returns logits `[n, vocab]`, one row per segment that wants them,
        in order.

        Decoding rows (one token, logits wanted) take the fast path whenever there is one. Without
        CUDA graphs that holds in a step that reads a prompt chunk beside them too: the chunk
        then runs through the plain path on its own (rows never interact), so a row decodes
        through the same arithmetic whatever shares its step, and in fp32 answers exactly as it
        would alone (the C++ CPU step's int16 activations differ from the plain path's dense
        products in the last digits, enough to flip a near-tie). A graph writes a dummy token
        into each row of its bucket that it does not decode, which could be the chunk's row:
        with graphs such a step runs through the plain path whole."""
        if self.fast is None or not segments:
            self.paths["plain"] += 1
            return self.plain_step(segments)
        decoding = [len(s.tokens) == 1 and s.wants_logits for s in segments]
        if all(decoding):
            return self._decode(segments)
        if not any(decoding) or self.graphs is not None:
            self.paths["plain"] += 1
            return self.plain_step(segments)
        rest = self.plain_step([s for s, d in zip(segments, decoding, strict=True) if not d])
        self.paths["plain"] += 1
        fast = self._decode([s for s, d in zip(segments, decoding, strict=True) if d])
        # back in the segments' order: each decoding row has logits, a chunk only when it ends
        picks: list[torch.Tensor] = []
        fast_at = rest_at = 0
        for s, d in zip(segments, decoding, strict=True):
            if d:
                picks.append(fast[fast_at])
                fast_at += 1
            elif s.wants_logits:
                picks.append(rest[rest_at].to(fast.dtype))
                rest_at += 1
        return torch.stack(picks)

    def _decode(self, segments: list[Segment]) -> torch.Tensor:
        """Logits of decoding rows through CUDA graphs, else the fast step."""
        assert self.fast is not None
        if self.graphs is not None:
            logits = self.graphs.step(segments)
            if logits is not None:
                self.paths["graph"] += 1
                return logits
        self.paths["fast"] += 1
        return self.fast.step(segments)

    @torch.inference_mode()
    def plain_step(self, segments: list[Segment]) -> torch.Tensor:
        """`step` through the model's own modules, for any mix of prompt chunks and decoding."""
        device = self.device
        ids: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        for s in segments:
            ids += s.tokens
            rows += [s.row] * len(s.tokens)
            positions += range(s.start, s.start + len(s.tokens))
        total = len(ids)
        ids_t = torch.tensor(ids, device=device)
        rows_t = torch.tensor(rows, device=device)
        pos_t = torch.tensor(positions, device=device)
        hidden = self.embed(ids_t)[None]  # [1, T, hidden]
        cos, sin = self.rotary(hidden, position_ids=pos_t[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
        plan = _AttentionPlan(segments, device)
        single = (segments[0].row, segments[0].start) if len(segments) == 1 else None
        lora = None  # the base model alone: not a single extra operation
        if self.lora is not None and any(s.slot for s in segments):
            lora = self.lora.plan([s.slot for s in segments for _ in s.tokens])
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            attn_norm, mlp_norm = self._norms[index]
            x = attn_norm(hidden)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if lora is not None:
                q = lora.add(index, "q_proj", x, q)
                k = lora.add(index, "k_proj", x, k)
                v = lora.add(index, "v_proj", x, v)
            q = q.view(total, self.heads, self.head_dim)
            k = k.view(total, self.kv_heads, self.head_dim)
            v = v.view(total, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.cache.keys[index], self.cache.values[index]
            if single is not None:  # one row: a plain slice copy, cheaper than a scatter
                row, start = single
                keys[row, :, start : start + total] = k.transpose(0, 1)
                values[row, :, start : start + total] = v.transpose(0, 1)
            else:
                keys[rows_t, :, pos_t] = k.to(keys.dtype)
                values[rows_t, :, pos_t] = v.to(values.dtype)
            out = self._attend(q, keys, values, plan)
            out = out.view(1, total, self.heads * self.head_dim)
            o = attn.o_proj(out)
            if lora is not None:
                o = lora.add(index, "o_proj", out, o)
            hidden = hidden + o
            hidden = hidden + layer.mlp(mlp_norm(hidden))
        if not plan.logits_at:
            return torch.empty(0, device=device)
        last = hidden[0, torch.tensor(plan.logits_at, device=device)]
        return self.lm_head(self.norm(last))

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: _AttentionPlan
    ) -> torch.Tensor:
        """Attention of every token over its row's cache up to its own position."""
        dtype = self.attention_dtype
        q = q.to(dtype)
        out = torch.empty_like(q)
        if plan.decode_index is not None:
            n = len(plan.decode_rows)
            span = plan.decode_span
            if plan.decode_prefix:  # rows 0..n-1 in order: a view, nothing copied
                k_rows, v_rows = keys[:n, :, :span], values[:n, :, :span]
            else:
                k_rows = keys[:, :, :span].index_select(0, plan.decode_rows_t)
                v_rows = values[:, :, :span].index_select(0, plan.decode_rows_t)
            k_rows, v_rows = k_rows.to(dtype), v_rows.to(dtype)
            # the fast path's call, so a row rounds alike on either path
            decoded = decode_attention(
                q[plan.decode_index], k_rows, v_rows, plan.decode_mask, self.kv_heads, self.scaling
            )
            out[plan.decode_index] = decoded.view(n, self.heads, self.head_dim)
        for first, count, row, start in plan.prefills:
            span = start + count
            qp = q[first : first + count].view(count, self.kv_heads, self.groups, self.head_dim)
            qp = qp.permute(1, 2, 0, 3)  # [kv, groups, count, head_dim]
            k_row = keys[row, :, :span].unsqueeze(1).to(dtype)  # [kv, 1, span, head_dim]
            v_row = values[row, :, :span].unsqueeze(1).to(dtype)
            scores = (qp @ k_row.transpose(-1, -2)) * self.scaling  # [kv, groups, count, span]
            causal = (
                torch.arange(span, device=q.device)[None, :]
                <= (torch.arange(start, span, device=q.device)[:, None])
            )
            scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
            out[first : first + count] = (
                (probs @ v_row).permute(2, 0, 1, 3).reshape(count, self.heads, self.head_dim)
            )
        return out.to(self.dtype)


class _AttentionPlan:
    """Where each segment's tokens sit in the flat step, computed once per step."""

    def __init__(self, segments: list[Segment], device: torch.device) -> None:
        self.logits_at: list[int] = []
        self.prefills: list[tuple[int, int, int, int]] = []  # (first token, count, row, start)
        decode_tokens: list[int] = []
        self.decode_rows: list[int] = []
        decode_positions: list[int] = []
        first = 0
        for s in segments:
            count = len(s.tokens)
            if count == 1:
                decode_tokens.append(first)
                self.decode_rows.append(s.row)
                decode_positions.append(s.start)
            else:
                self.prefills.append((first, count, s.row, s.start))
            first += count
            if s.wants_logits:
                self.logits_at.append(first - 1)
        self.decode_index: torch.Tensor | None = None
        if decode_tokens:
            self.decode_index = torch.tensor(decode_tokens, device=device)
            self.decode_rows_t = torch.tensor(self.decode_rows, device=device)
            self.decode_prefix = self.decode_rows == list(range(len(self.decode_rows)))
            self.decode_span = max(decode_positions) + 1
            ends = torch.tensor(decode_positions, device=device)
            mask = torch.arange(self.decode_span, device=device)[None, :] <= ends[:, None]
            self.decode_mask = mask[:, None, None, :]  # [n, 1, 1, span]
