"""The decode step on CUDA as nine Triton kernels per layer, for GPTQ checkpoints.

Captured in a CUDA graph, the eager fast step of a 7B model on an H200 was still ~1,000 small
kernels: per layer a norm, three q/k/v products and a concatenation, five for the rotation,
two cache writes, a dozen for the attention, two for the residuals, three for the MLP's
activation (BENCHMARKS.md, "Profile of one decode step"). Even replayed from a graph each
costs ~2 us, as much as reading the layer's weights. Here a layer is:

1. `_add_rms_norm`: the residual stream gets the previous product (summing the GEMV's shares
   of K), then the norm of the result;
2. the q/k/v GEMV (`gptq_triton`);
3. `_rope_write`: rotation of q and k from the table, k and v written into the cache at each
   row's position, q out;
4. `_decode_attention`: each row's query over its cache up to its own position (online
   softmax over blocks of positions, so the span needs no bucket); with few rows the positions
   can be cut into spans, one program each (`_attention_split`), and `_attention_combine`
   weighs the spans' outputs by their log-sum-exps (flash-decoding), so a long cache is read by
   many SMs instead of one per KV head (up to `MAX_ATTENTION_SPLITS` spans);
5. the o GEMV; 6. `_add_rms_norm`; 7. the gate/up GEMV;
8. `_silu_mul`: the MLP's activation from the gate/up GEMV's shares; 9. the down GEMV.

After the last layer's norm, one row's LM head is `_dense_gemv` (`LM_HEAD_GEMV`), more rows
the model's own (cuBLAS).

One row on one adapter gets its terms from the kernels (`ADAPTER_KERNELS`): `_lora_shrink`
(x times A), added times B by `_rope_write` (q, k, v) and by o's GEMV. Steps 1 and 6 can also
run inside the GEMVs around them at one row (`FUSED_NORMS`, off: measured slower): o and down
add their shares to the residual stream in their last program per block of columns and leave
the blocks' sums of squares, and q/k/v and gate/up make the norm from the stream as they read
it (`gptq_triton._gemv`'s `RESIDUAL` and `NORM`).

The arithmetic is the fast step's: norms and the softmax in fp32, products accumulated in fp32,
values rounded to the model's dtype where the plain path rounds them. Otherwise the LoRA terms
of other adapter steps (q, k, v and o) are added between the kernels by `core.model.lora`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from core.model import gptq_triton as gt

if TYPE_CHECKING:
    from core.model.fast import Delta, FastDecode
    from core.model.lora import LoraSlots

triton, tl = gt.triton, gt.tl


if triton is not None:
    _wait_if = gt._wait_if  # (before a dependent launch reads or writes: see there)

    @triton.jit
    def _add_to_stream(
        hidden_ptr, delta_ptr, delta_share_stride, row, H, h, ok, SHARES: tl.constexpr
    ):  # fmt: skip
        """Columns `h` of the residual stream's `row` plus the `SHARES` shares of a product
        (none: as it is), stored in the stream's dtype; returned in fp32 as stored."""
        x = tl.load(hidden_ptr + row * H + h, mask=ok, other=0.0).to(tl.float32)
        if SHARES > 0:
            for s in tl.static_range(SHARES):
                d = tl.load(delta_ptr + s * delta_share_stride + row * H + h, mask=ok, other=0.0)
                x += d.to(tl.float32)
            x16 = x.to(hidden_ptr.dtype.element_ty)
            tl.store(hidden_ptr + row * H + h, x16, mask=ok)
            x = x16.to(tl.float32)
        return x

    @triton.jit
    def _add_rms_norm(
        hidden_ptr,
        delta_ptr,
        weight_ptr,
        out_ptr,
        H,
        delta_share_stride,
        eps,
        SHARES: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        row = tl.program_id(0)
        h = tl.arange(0, BLOCK)
        ok = h < H
        if PDL:  # (the norm's weight, which no kernel writes, is read before the wait)
            w = tl.load(weight_ptr + h, mask=ok, other=0.0)
            _wait_if(PDL)
        x = _add_to_stream(hidden_ptr, delta_ptr, delta_share_stride, row, H, h, ok, SHARES)
        variance = tl.sum(x * x, axis=0) / H
        y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
        if not PDL:
            w = tl.load(weight_ptr + h, mask=ok, other=0.0)
        tl.store(out_ptr + row * H + h, y * w, mask=ok)

    @triton.jit
    def _add_rms_norm_split(
        hidden_ptr,
        delta_ptr,
        weight_ptr,
        out_ptr,
        sums_ptr,
        count_ptr,
        H,
        delta_share_stride,
        eps,
        SHARES: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """`_add_rms_norm` with each row cut into `SPLIT` slices of `BLOCK`, one program each
        (one program reading every share of a whole row is the step's slowest small kernel).
        A program adds its slice, stores it, writes its slice's sum of squares to
        `sums [rows, SPLIT]` and counts itself in `count [rows]` (zero before the launch); once
        the row's count is `SPLIT` it adds the row's sums in slice order (the same numbers
        whichever program finishes last) and scales its slice. The programs of a row wait for
        each other, so they must all be resident at once: a handful of small programs, and
        never under Triton's interpreter, which runs programs one after the other."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        h = part * BLOCK + tl.arange(0, BLOCK)
        ok = h < H
        w = tl.load(weight_ptr + h, mask=ok, other=0.0)  # (no kernel writes it)
        _wait_if(PDL)
        x = _add_to_stream(hidden_ptr, delta_ptr, delta_share_stride, row, H, h, ok, SHARES)
        tl.store(sums_ptr + row * SPLIT + part, tl.sum(x * x, axis=0))
        tl.debug_barrier()  # (every thread's store before the count is raised)
        tl.atomic_add(count_ptr + row, 1, sem="release", scope="gpu")
        done = tl.atomic_add(count_ptr + row, 0, sem="acquire", scope="gpu")
        while done < SPLIT:
            done = tl.atomic_add(count_ptr + row, 0, sem="acquire", scope="gpu")
        sums = tl.load(sums_ptr + row * SPLIT + tl.arange(0, SPLIT), cache_modifier=".cg")
        variance = tl.sum(sums, axis=0) / H
        y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * H + h, y * w, mask=ok)

    @triton.jit
    def _silu_mul(
        gate_up_ptr,
        share_stride,
        out_ptr,
        INNER,
        SHARES: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """The MLP's `silu(gate) * up` from the gate/up GEMV's shares of K, rounded where the
        plain path rounds (the projections, the activation) to the model's dtype."""
        _wait_if(PDL)
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < INNER
        base = gate_up_ptr + row * 2 * INNER + i
        gate = tl.zeros((BLOCK,), dtype=tl.float32)
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SHARES):
            gate += tl.load(base + s * share_stride, mask=ok, other=0.0).to(tl.float32)
            up += tl.load(base + s * share_stride + INNER, mask=ok, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        tl.store(out_ptr + row * INNER + i, act * up.to(dtype), mask=ok)

    @triton.jit
    def _rope_write(
        qkv_ptr,
        qkv_share_stride,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        row_ptr,
        k_ptr,
        v_ptr,
        q_ptr,
        cache_row_stride,
        cache_head_stride,
        slot_ptr,
        low_ptr,
        bq_ptr,
        bk_ptr,
        bv_ptr,
        rank,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        D: tl.constexpr,
        SHARES: tl.constexpr,
        LORA_R: tl.constexpr = 0,
        PDL: tl.constexpr = False,
    ):
        """Token t's head `head` of q, k or v from the q/k/v product's shares: q and k rotated,
        k and v written into the cache, q out. With `LORA_R` (one row) an adapter's term is
        added first: `low_ptr [3, rank]` (x times A of q, k, v, `_lora_shrink`) times B.T of
        the slot at `slot_ptr` (`gptq_triton._lora_expand`)."""
        _wait_if(PDL)
        t = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, D)
        base = qkv_ptr + t * (HEADS + 2 * KV_HEADS) * D + head * D
        x = tl.zeros((D,), dtype=tl.float32)
        partner = tl.zeros((D,), dtype=tl.float32)
        rolled = (d + D // 2) % D
        for s in tl.static_range(SHARES):
            x += tl.load(base + s * qkv_share_stride + d).to(tl.float32)
            partner += tl.load(base + s * qkv_share_stride + rolled).to(tl.float32)
        if LORA_R > 0:
            every = d < D
            if head < HEADS:
                b_ptr, width, col, low = bq_ptr, HEADS * D, head * D, low_ptr
            elif head < HEADS + KV_HEADS:
                b_ptr, width, col, low = bk_ptr, KV_HEADS * D, (head - HEADS) * D, low_ptr + rank
            else:
                col = (head - HEADS - KV_HEADS) * D
                b_ptr, width, low = bv_ptr, KV_HEADS * D, low_ptr + 2 * rank
            x += gt._lora_expand(slot_ptr, low, b_ptr, rank, col + d, every, width, LORA_R)
            partner += gt._lora_expand(
                slot_ptr, low, b_ptr, rank, col + rolled, every, width, LORA_R
            )
        if SHARES > 1 or LORA_R > 0:  # the plain path rounds the projection before rotating
            x = x.to(q_ptr.dtype.element_ty).to(tl.float32)
            partner = partner.to(q_ptr.dtype.element_ty).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        row = tl.load(row_ptr + t)
        if head < HEADS + KV_HEADS:  # q and k rotate: x cos + roll(x, D/2) (signed sin)
            x = x * tl.load(cos_ptr + pos * D + d).to(tl.float32) + partner * tl.load(
                sin_ptr + pos * D + d
            ).to(tl.float32)
        if head < HEADS:
            tl.store(q_ptr + t * HEADS * D + head * D + d, x.to(q_ptr.dtype.element_ty))
        elif head < HEADS + KV_HEADS:
            at = k_ptr + row * cache_row_stride + (head - HEADS) * cache_head_stride + pos * D
            tl.store(at + d, x.to(k_ptr.dtype.element_ty))
        else:
            kv = head - HEADS - KV_HEADS
            at = v_ptr + row * cache_row_stride + kv * cache_head_stride + pos * D
            tl.store(at + d, x.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _lora_shrink(
        x_ptr,
        nw_ptr,
        sums_ptr,
        norm_blocks,
        eps,
        slot_ptr,
        a0_ptr,
        a1_ptr,
        a2_ptr,
        low_ptr,
        K,
        rank,
        TARGETS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NORM: tl.constexpr,
        NORM_P2: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """One row's x times A of an adapter, for `TARGETS` (1 or 3) projections that read the
        same x: `low [TARGETS, rank]` (fp32), rank r in program r. A is `[slots, rank, K]` per
        target, of the slot at `slot_ptr`. With `NORM`, x is an RMS norm's output made from
        the residual stream `x_ptr` as the GEMVs make it (`gptq_triton._gemv`'s `NORM`)."""
        r = tl.program_id(0)
        _wait_if(PDL)
        slot = tl.load(slot_ptr).to(tl.int64)
        row = (slot * rank + r) * K
        inv = 1.0
        if NORM:
            inv = gt._inverse_rms(sums_ptr, norm_blocks, K, eps, NORM_P2)
        acc0 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = k < K
            x = tl.load(x_ptr + k, mask=ok, other=0.0)
            if NORM:  # (as `gptq_triton._normed`)
                x = (x.to(tl.float32) * inv).to(tl.float16) * tl.load(nw_ptr + k, mask=ok)
            x = x.to(tl.float32)
            acc0 += x * tl.load(a0_ptr + row + k, mask=ok, other=0.0).to(tl.float32)
            if TARGETS == 3:
                acc1 += x * tl.load(a1_ptr + row + k, mask=ok, other=0.0).to(tl.float32)
                acc2 += x * tl.load(a2_ptr + row + k, mask=ok, other=0.0).to(tl.float32)
        tl.store(low_ptr + r, tl.sum(acc0, axis=0))
        if TARGETS == 3:
            tl.store(low_ptr + rank + r, tl.sum(acc1, axis=0))
            tl.store(low_ptr + 2 * rank + r, tl.sum(acc2, axis=0))

    @triton.jit
    def _attend(
        q_ptr,
        k_ptr,
        v_ptr,
        t,
        kv,
        row,
        first,
        stop,
        scaling,
        cache_row_stride,
        cache_head_stride,
        HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """Token t's queries of KV head `kv` over cache positions `[first, stop)` of `row`:
        online softmax over blocks of positions. Returns (running max, sum of weights,
        weighted sum of values `[GROUPS_P2, D]`), unnormalized; the sum is 0 for an empty
        span."""
        g = tl.arange(0, GROUPS_P2)
        d = tl.arange(0, D)
        heads = kv * GROUPS + g
        q = tl.load(
            q_ptr + t * HEADS * D + heads[:, None] * D + d[None, :], mask=(g < GROUPS)[:, None]
        )
        q = q.to(tl.float32) * scaling
        best = tl.full((GROUPS_P2,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GROUPS_P2,), dtype=tl.float32)
        acc = tl.zeros((GROUPS_P2, D), dtype=tl.float32)
        keys = k_ptr + row * cache_row_stride + kv * cache_head_stride
        values = v_ptr + row * cache_row_stride + kv * cache_head_stride
        for start in range(first, stop, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            s_ok = s < stop
            k = tl.load(keys + s[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
            # (v is loaded with k, before the scores: its latency overlaps theirs)
            v = tl.load(values + s[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [G, S]
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            p = tl.exp(scores - new_best[:, None])
            alpha = tl.exp(best - new_best)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            best = new_best
        return best, total, acc

    @triton.jit
    def _decode_attention(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        row_ptr,
        out_ptr,
        scaling,
        cache_row_stride,
        cache_head_stride,
        HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        _wait_if(PDL)
        t = tl.program_id(0)
        kv = tl.program_id(1)
        pos = tl.load(pos_ptr + t)
        row = tl.load(row_ptr + t)
        _best, total, acc = _attend(
            q_ptr, k_ptr, v_ptr, t, kv, row, 0, pos + 1, scaling, cache_row_stride,
            cache_head_stride, HEADS, GROUPS, GROUPS_P2, D, BLOCK_S,
        )  # fmt: skip
        g = tl.arange(0, GROUPS_P2)
        d = tl.arange(0, D)
        heads = kv * GROUPS + g
        at = out_ptr + t * HEADS * D + heads[:, None] * D + d[None, :]
        out = acc / total[:, None]
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=(g < GROUPS)[:, None])

    @triton.jit
    def _attention_split(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        row_ptr,
        part_ptr,
        lse_ptr,
        scaling,
        cache_row_stride,
        cache_head_stride,
        HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """`_decode_attention` over one of `SPLITS` equal spans of each row's positions (the
        span is cut at run time from the row's position, so the grid stays fixed under CUDA
        graphs): its normalized output `part [T, HEADS, SPLITS, D]` and its log-sum-exp
        `lse [T, HEADS, SPLITS]` (-inf for an empty span), for `_attention_combine`."""
        _wait_if(PDL)
        t = tl.program_id(0)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(pos_ptr + t)
        row = tl.load(row_ptr + t)
        per = tl.cdiv(pos + 1, SPLITS)
        first = split * per
        best, total, acc = _attend(
            q_ptr, k_ptr, v_ptr, t, kv, row, first, tl.minimum(first + per, pos + 1), scaling,
            cache_row_stride, cache_head_stride, HEADS, GROUPS, GROUPS_P2, D, BLOCK_S,
        )  # fmt: skip
        empty = total == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
        lse = tl.where(empty, float("-inf"), best + tl.log(tl.where(empty, 1.0, total)))
        g = tl.arange(0, GROUPS_P2)
        d = tl.arange(0, D)
        at = (t * HEADS + kv * GROUPS + g) * SPLITS + split
        tl.store(part_ptr + at[:, None] * D + d[None, :], out, mask=(g < GROUPS)[:, None])
        tl.store(lse_ptr + at, lse, mask=g < GROUPS)

    @triton.jit
    def _attention_combine(
        part_ptr, lse_ptr, out_ptr, HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One head's output from its `SPLITS` spans, weighted by their share of the softmax
        (in split order, so a replayed step gives the same numbers)."""
        _wait_if(PDL)
        t = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        base = (t * HEADS + head) * SPLITS + splits
        lse = tl.load(lse_ptr + base)
        weight = tl.exp(lse - tl.max(lse, axis=0))  # the first span is never empty
        part = tl.load(part_ptr + base[:, None] * D + d[None, :])
        out = tl.sum(weight[:, None] * part, axis=0) / tl.sum(weight, axis=0)
        tl.store(out_ptr + t * HEADS * D + head * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _dense_gemv(
        x_ptr, w_ptr, out_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One row `x [K]` times a dense `w [N, K]` (an `nn.Linear`'s weight, rows along K):
        `out [N]` in out's dtype, accumulated in fp32. Each program takes `BLOCK_N` rows of w
        and sums their products elementwise over K, once at the end. With `PDL` its first
        tile of w, which no kernel writes, is read before the wait for x."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + n[:, None] * stride_w + k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        start = 0
        if PDL:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            _wait_if(PDL)
            acc += w.to(tl.float32) * tl.load(x_ptr + k).to(tl.float32)[None, :]
            start = BLOCK_K
        for k0 in range(start, K, BLOCK_K):
            w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
            acc += w.to(tl.float32) * tl.load(x_ptr + k0 + k).to(tl.float32)[None, :]
        tl.store(out_ptr + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)


# The most spans one row's attention is cut into (`TritonLayers.attention_splits`; 1: one
# kernel, no split). 8 served a 2,000-token prompt 1.74x as fast as 1 on an H100 (7B shape,
# `bench/serving.py --attention-splits 1` and `8`, BENCHMARKS.md).
MAX_ATTENTION_SPLITS = 8

# Whether the step's kernels are launched as programmatic dependent launches (Hopper and later,
# `gptq_triton.pdl_available`): each may start while the one before it finishes, and a GEMV
# reads its first weights before it waits. On an H100 (7B shape, one row, alternating in one
# lease) 390.4 and 393.5 tok/s against 385.4 and 385.2 without, the logits exactly equal
# (`bench/serving.py --pdl on|off`, BENCHMARKS.md); the kernels compile either way
# (`tests/test_triton_kernels.py`), and GPUs before Hopper launch them plainly.
PDL = True

# One row's LM head (an fp16 `nn.Linear` without bias) as `_dense_gemv` (block_n, block_k,
# warps), or None: torch's product (cuBLAS) as for more rows. On an H100 (7B shape, vocabulary
# 49,152: 403 MB) cuBLAS read it in 136.8-145.3 us, `_dense_gemv` (8, 512, 4) in 128.1-131.7;
# served, 0.4-0.6% more tokens/s (BENCHMARKS.md, 2026-12-06, fifth session).
LM_HEAD_GEMV: tuple[int, int, int] | None = (8, 512, 4)


# Whether one row's norms between layers ride on the GEMVs around them (`gptq_triton._gemv`'s
# `RESIDUAL` and `NORM`): o and down add their output to the residual stream and leave its sums
# of squares, and the next GEMV makes the norm from the stream as it reads it, so a layer runs
# no norm kernel. More rows, mixed adapters or bf16 keep the norm kernels. Off: slower on an
# H100 (7B shape, one row: 373.0-374.1 tokens/s against 401.7-402.5 with the norm kernels,
# BENCHMARKS.md, 2026-12-07): the GEMVs' longer tails cost more than the 63 kernels it saves.
FUSED_NORMS = False

# Whether one row on one adapter gets the adapter's terms from the kernels: `_lora_shrink`
# (x times A for q/k/v and for o), added times B by `_rope_write` (q, k, v) and by o's GEMV
# (to its first share of K), 2 small kernels a layer in place of torch's 24 (gathers, products,
# sums, casts). One member asking in a channel with an adapter is the bot's common case. On an
# H100 (7B shape) such a row decodes at 354.6-354.8 tokens/s (0.88x the base), against 195.0
# (0.49x) with torch's products (BENCHMARKS.md, 2026-12-07).
ADAPTER_KERNELS = True

# The norms as `_add_rms_norm_split` (slices of `NORM_SPLIT[0]` per row, `NORM_SPLIT[1]` warps
# each) on a GPU, or None: one program per row (`_add_rms_norm`, also the interpreter's).
# Off: timed on an H100 only with the norms on the GEMVs (two norm kernels a step), where it
# changed nothing (373.0 tokens/s against 373.0-374.1); not yet with every norm a kernel.
NORM_SPLIT: tuple[int, int] | None = None


class TritonLayers:
    """Every layer of a decode step as Triton kernels (see the module's docstring).

    Applies on CUDA (and on a CPU under Triton's interpreter, for tests) to Llama-family models
    whose projections all run as GPTQ Triton products (`Projection.kind == "triton"`), with
    RMSNorms and SiLU, no per-head norms (Qwen3), no biases, and a head size that is a power
    of two."""

    def __init__(self, fast: FastDecode) -> None:
        batch = fast.batch
        self.fast = fast
        self.eps = float(batch.layers[0].input_layernorm.variance_epsilon)
        self.attn_norms = [hf.input_layernorm.weight for hf in batch.layers]
        self.mlp_norms = [hf.post_attention_layernorm.weight for hf in batch.layers]
        self.final_norm = batch.norm_module.weight
        self.weights = [
            (lay.qkv.triton, lay.o.triton, lay.gate_up.triton, lay.down.triton)
            for lay in fast.layers
        ]
        first = self.weights[0]
        self.configs = tuple(gt.gemv_config_for(w) for w in first)
        self.groups = fast.heads // fast.kv_heads
        cuda = batch.device.type == "cuda"
        self.pdl = PDL and gt.pdl_available(batch.device)
        o_cfg, down_cfg = self.configs[1], self.configs[3]
        self.fusable = all(
            w.scales.dtype == torch.float16 for layer in self.weights for w in layer
        ) and all(n.dtype == torch.float16 for n in self.attn_norms + self.mlp_norms)
        self.fusable &= all(  # (o and down add up their shares: more than one)
            gt.gemv_shares(w, cfg)[0] > 1
            for layer in self.weights
            for w, cfg in ((layer[1], o_cfg), (layer[3], down_cfg))
        )
        # (one sum of squares per block of columns of o's and down's GEMVs)
        self.residual_blocks = max(
            gt.gemv_blocks(first[1], o_cfg), gt.gemv_blocks(first[3], down_cfg)
        )
        self.sms = (
            torch.cuda.get_device_properties(batch.device).multi_processor_count if cuda else 1
        )

    def attention_splits(self, count: int) -> int:
        """Spans each row's positions are cut into for the attention: one program per row and
        KV head reads a long cache with one SM's share of the memory bandwidth, so few rows are
        split until the programs fill the GPU twice over (a power of two, at most
        `MAX_ATTENTION_SPLITS`); 1 (one kernel, no combine) when the rows alone fill it."""
        programs, splits = count * self.fast.kv_heads, 1
        while splits < MAX_ATTENTION_SPLITS and programs * splits < 2 * self.sms:
            splits *= 2
        return splits

    @staticmethod
    def applies(fast: FastDecode) -> bool:
        batch = fast.batch
        return (
            gt.serves(batch.device)
            and fast.head_dim & (fast.head_dim - 1) == 0
            and fast.heads % fast.kv_heads == 0
            and all(
                type(hf.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
                and hasattr(hf.input_layernorm, "variance_epsilon")
                and hasattr(hf.post_attention_layernorm, "variance_epsilon")
                and getattr(hf.input_layernorm, "weight", None) is not None
                and getattr(hf.post_attention_layernorm, "weight", None) is not None
                for hf in batch.layers
            )
            and getattr(batch.norm_module, "weight", None) is not None
            and hasattr(batch.norm_module, "variance_epsilon")
            and all(
                p.kind == "triton" and p.bias is None
                for layer in fast.layers
                for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
            )
            and all(layer.q_norm is None for layer in fast.layers)
        )

    def _project(
        self,
        x: torch.Tensor | gt.NormIn,
        w: gt.GptqWeights,
        cfg: gt.GemvConfig,
        residual: gt.ResidualOut | None = None,
        lora: gt.LoraTerm | None = None,
    ) -> torch.Tensor:
        """`[shares, M, N]`: the GEMV's shares of K (summed by the next kernel), or one share
        from the GEMM above its rows. x may be a norm the GEMV makes as it reads it, the GEMV
        may add its output to a residual stream (`_fuses_norms`), and an adapter's term to
        its output (`lora`, one row)."""
        if isinstance(x, gt.NormIn) or x.shape[0] <= gt.GEMV_ROWS:
            row = x.hidden if isinstance(x, gt.NormIn) else x
            out = gt.partials(row, gt.gemv_shares(w, cfg)[0], w.out_features)
            if isinstance(x, gt.NormIn):
                gt.gemv(None, w, out, cfg, self.pdl, norm=x, residual=residual, lora=lora)
            else:
                gt.gemv(x, w, out, cfg, self.pdl, residual=residual, lora=lora)
            return out
        if lora is not None:
            raise ValueError("an adapter's term rides on one row's GEMV only")
        return gt.matmul(x, w)[None]

    def _fuses_norms(
        self,
        count: int,
        delta: Delta | None,
        hidden: torch.Tensor,
        adapter: tuple[torch.Tensor, LoraSlots] | None,
    ) -> bool:
        """Whether this step's norms between layers ride on the GEMVs (`FUSED_NORMS`): one row
        (the GEMV's), fp16 throughout, o and down in shares of K (the last share adds them
        up), and no adapter or one whose terms the kernels add (`adapter`)."""
        return (
            FUSED_NORMS
            and count == 1
            and gt.GEMV_ROWS >= 1
            and (delta is None or self._adds_adapter(count, delta, adapter, fuse=True))
            and hidden.dtype == torch.float16
            and hidden.shape[1] % 2 == 0
            and self.fusable
        )

    @staticmethod
    def _adds_adapter(
        count: int,
        delta: Delta | None,
        adapter: tuple[torch.Tensor, LoraSlots] | None,
        fuse: bool,
    ) -> bool:
        """Whether this step's adapter terms come from the kernels (`ADAPTER_KERNELS`, or
        with the norms on the GEMVs): one row (the GEMV's) on one adapter in fp16 or fp32."""
        return (
            delta is not None
            and adapter is not None
            and (fuse or ADAPTER_KERNELS)
            and count == 1
            and gt.GEMV_ROWS >= 1
            and adapter[1].dtype in (torch.float16, torch.float32)
        )

    def _shrink(
        self,
        x: torch.Tensor | gt.NormIn,
        slot: torch.Tensor,
        a: list[torch.Tensor],
        low: torch.Tensor,
    ) -> None:
        """`low [targets, rank]` = x times A of the slot's adapter for 1 or 3 projections
        (`_lora_shrink`); x as it is, or a norm made from the residual stream."""
        rank, k = a[0].shape[1], a[0].shape[2]
        norm = x if isinstance(x, gt.NormIn) else None
        row = x.hidden if norm is not None else x
        nw, sums, blocks, eps = (row, low, 0, 0.0) if norm is None else (
            norm.weight, norm.sums, norm.sums.numel(), norm.eps
        )  # fmt: skip
        targets = a + [a[0]] * (3 - len(a))
        _lora_shrink[(rank,)](
            row, nw, sums, blocks, eps, slot, *targets, low, k, rank, TARGETS=len(a),
            BLOCK_K=min(1024, gt.power_of_two(k)), NORM=norm is not None,
            NORM_P2=gt.power_of_two(blocks), PDL=self.pdl, num_warps=4,
            **gt.launch_options(self.pdl),
        )  # fmt: skip

    def _activation(self, gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """silu(gate) * up `[M, inner]` from the gate/up product's shares `[shares, M, 2 inner]`."""
        rows, inner = gate_up.shape[1], gate_up.shape[2] // 2
        out = torch.empty((rows, inner), dtype=dtype, device=gate_up.device)
        block = 128  # many programs: each reads every share of its block (8 for a 7B MLP)
        _silu_mul[(rows, triton.cdiv(inner, block))](
            gate_up, gate_up.stride(0), out, inner, SHARES=gate_up.shape[0], BLOCK=block,
            PDL=self.pdl, num_warps=4, **gt.launch_options(self.pdl),
        )  # fmt: skip
        return out

    def _norm(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The residual stream plus `delta`'s shares, and its norm times `weight`: with
        `counts` (this norm's sums `[rows, slices]` and zeroed counts `[rows]`) as
        `_add_rms_norm_split`, else `_add_rms_norm`."""
        out = torch.empty_like(hidden)
        rows, width = hidden.shape
        shares = 0 if delta is None else delta.shape[0]
        stride = 0 if delta is None else delta.stride(0)
        if counts is not None and NORM_SPLIT is not None:
            block, warps = NORM_SPLIT
            sums, count = counts
            _add_rms_norm_split[(rows, sums.shape[1])](
                hidden, hidden if delta is None else delta, weight, out, sums, count, width,
                stride, self.eps, SHARES=shares, BLOCK=block, SPLIT=sums.shape[1], PDL=self.pdl,
                num_warps=warps, **gt.launch_options(self.pdl),
            )  # fmt: skip
            return out
        _add_rms_norm[(rows,)](
            hidden, hidden if delta is None else delta, weight, out, width, stride, self.eps,
            SHARES=shares, BLOCK=gt.power_of_two(width), PDL=self.pdl, num_warps=8,
            **gt.launch_options(self.pdl),
        )  # fmt: skip
        return out

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        delta: Delta | None,
        adapter: tuple[torch.Tensor, LoraSlots] | None = None,
    ) -> torch.Tensor:
        """Logits `[T, vocab]` for T tokens, token i of cache row `rows[i]` at `positions[i]`,
        with the adapter terms `delta` adds. For one row on one adapter, `adapter` (the slot as
        a one-element tensor on the device, and the slots) lets the kernels add its terms."""
        fast = self.fast
        batch = fast.batch
        cache = batch.cache
        heads, kv_heads, head_dim = fast.heads, fast.kv_heads, fast.head_dim
        count = ids.shape[0]
        q_width, k_width = heads * head_dim, kv_heads * head_dim
        qkv_cfg, o_cfg, gate_up_cfg, down_cfg = self.configs
        pdl, launch = self.pdl, gt.launch_options(self.pdl)
        hidden = batch.embed(ids).contiguous()  # [T, hidden], updated in place below
        fuse = self._fuses_norms(count, delta, hidden, adapter)
        lora = None  # (slot, slots, low of q/k/v, low of o) when the kernels add the terms
        if adapter is not None and self._adds_adapter(count, delta, adapter, fuse):
            slot, slots = adapter
            rank = slots.max_rank
            lows = torch.empty((4, rank), dtype=torch.float32, device=hidden.device)
            lora = slot, slots, lows[:3], lows[3]
        layers = len(self.weights)
        norms = self._norm_counts(count, hidden.shape[1], hidden.device, 2 if fuse else None)
        if fuse:  # each o and down GEMV's sums of squares and counts (see `_fuses_norms`)
            sums = torch.empty(
                (2 * layers, self.residual_blocks), dtype=torch.float32, device=hidden.device
            )
            counts = torch.zeros(sums.shape, dtype=torch.int32, device=hidden.device)
        x: torch.Tensor | gt.NormIn = self._norm(hidden, None, self.attn_norms[0], next(norms))
        q = torch.empty((count, q_width), dtype=hidden.dtype, device=hidden.device)
        attended = torch.empty_like(q)
        keys0 = cache.keys[0]
        group_p2 = gt.power_of_two(self.groups)
        block_s = max(16, 64 // group_p2)
        splits = self.attention_splits(count)
        if splits > 1:  # the spans' outputs and log-sum-exps, reused by every layer
            part = torch.empty((count, heads, splits, head_dim), device=q.device)
            lse = torch.empty((count, heads, splits), device=q.device)
        for index, (qkv_w, o_w, gate_up_w, down_w) in enumerate(self.weights):
            rope_lora: tuple = (positions, positions, q, q, q, 0)  # (unread without LORA_R)
            if lora is not None:  # x times A now; rope adds low times B
                slot, slots, low, low_o = lora
                a = [slots.a[index, t] for t in ("q_proj", "k_proj", "v_proj")]
                self._shrink(x, slot, a, low)
                b = [slots.b[index, t] for t in ("q_proj", "k_proj", "v_proj")]
                rope_lora = (slot, low, *b, slots.max_rank)
            qkv = self._project(x, qkv_w, qkv_cfg)
            if delta is not None and lora is None:
                qkv = gt.summed(qkv, torch.float32)
                qkv[:, :q_width] += delta(index, "q_proj", x)
                qkv[:, q_width : q_width + k_width] += delta(index, "k_proj", x)
                qkv[:, q_width + k_width :] += delta(index, "v_proj", x)
                qkv = qkv.to(hidden.dtype)[None]
            keys, values = cache.keys[index], cache.values[index]
            _rope_write[(count, heads + 2 * kv_heads)](
                qkv, qkv.stride(0), fast.cos, fast.sin, positions, rows, keys, values, q,
                keys.stride(0), keys.stride(1), *rope_lora,
                HEADS=heads, KV_HEADS=kv_heads, D=head_dim, SHARES=qkv.shape[0],
                LORA_R=0 if lora is None else gt.power_of_two(rope_lora[-1]), PDL=pdl,
                num_warps=1, **launch,
            )  # fmt: skip
            if splits == 1:
                _decode_attention[(count, kv_heads)](
                    q, keys, values, positions, rows, attended, batch.scaling,
                    keys0.stride(0), keys0.stride(1),
                    HEADS=heads, GROUPS=self.groups, GROUPS_P2=group_p2, D=head_dim,
                    BLOCK_S=block_s, PDL=pdl, num_warps=4, **launch,
                )  # fmt: skip
            else:
                _attention_split[(count, kv_heads, splits)](
                    q, keys, values, positions, rows, part, lse, batch.scaling,
                    keys0.stride(0), keys0.stride(1),
                    HEADS=heads, GROUPS=self.groups, GROUPS_P2=group_p2, D=head_dim,
                    BLOCK_S=block_s, SPLITS=splits, PDL=pdl, num_warps=4, **launch,
                )  # fmt: skip
                _attention_combine[(count, heads)](
                    part, lse, attended, HEADS=heads, D=head_dim, SPLITS=splits, PDL=pdl,
                    num_warps=1, **launch,
                )  # fmt: skip
            last = index + 1 == layers
            term = None
            if lora is not None:  # the adapter's term for o, added by o's GEMV
                slot, slots, _low, low_o = lora
                self._shrink(attended, slot, [slots.a[index, "o_proj"]], low_o[None])
                term = gt.LoraTerm(slot, low_o, slots.b[index, "o_proj"])
            if fuse:  # o adds itself to the stream; gate/up makes the norm from it
                o_out = gt.ResidualOut(hidden, sums[2 * index], counts[2 * index], term)
                self._project(attended, o_w, o_cfg, o_out)
                x = gt.NormIn(hidden, self.mlp_norms[index], self.eps, sums[2 * index])
            else:
                o = self._project(attended, o_w, o_cfg, lora=term)
                if delta is not None and lora is None:
                    o = gt.summed(o, torch.float32)
                    o = (o + delta(index, "o_proj", attended)).to(hidden.dtype)[None]
                x = self._norm(hidden, o, self.mlp_norms[index], next(norms))
            gate_up = self._project(x, gate_up_w, gate_up_cfg)
            activation = self._activation(gate_up, hidden.dtype)
            if fuse and not last:  # down adds itself; the next q/k/v makes the norm
                down_out = gt.ResidualOut(hidden, sums[2 * index + 1], counts[2 * index + 1])
                self._project(activation, down_w, down_cfg, down_out)
                x = gt.NormIn(hidden, self.attn_norms[index + 1], self.eps, sums[2 * index + 1])
            else:
                down = self._project(activation, down_w, down_cfg)
                x = self._norm(
                    hidden, down, self.final_norm if last else self.attn_norms[index + 1],
                    next(norms),
                )  # fmt: skip
        return self._lm_head(x)

    def _norm_counts(self, rows: int, width: int, device: torch.device, norms: int | None):
        """For each of a step's `norms` kernels in turn (all of them when None), its sums and
        zeroed counts for `_add_rms_norm_split` (one zeroing for the whole step), or None
        (`NORM_SPLIT` off, not on a GPU, or more programs than surely fit on it at once: a
        row's programs wait for each other, so all of them must be resident)."""
        norms = 2 * len(self.weights) + 1 if norms is None else norms
        if NORM_SPLIT is None or device.type != "cuda" or gt.INTERPRETED:
            return iter([None] * norms)
        slices = gt.power_of_two(triton.cdiv(width, NORM_SPLIT[0]))
        if rows * slices > 4 * self.sms:
            return iter([None] * norms)
        sums = torch.empty((norms, rows, slices), dtype=torch.float32, device=device)
        counts = torch.zeros((norms, rows), dtype=torch.int32, device=device)
        return iter(list(zip(sums, counts, strict=True)))

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the final norm's output `x [T, hidden]`: one row through
        `_dense_gemv` (`LM_HEAD_GEMV`), more through the model's own LM head."""
        head = self.fast.batch.lm_head
        if (
            LM_HEAD_GEMV is None
            or x.shape[0] != 1
            or not isinstance(head, torch.nn.Linear)
            or head.bias is not None
            or head.weight.dtype != x.dtype
            or head.weight.stride(1) != 1
            or x.shape[1] % LM_HEAD_GEMV[1]
        ):
            return head(x)
        block_n, block_k, warps = LM_HEAD_GEMV
        n, k = head.weight.shape
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
        _dense_gemv[(triton.cdiv(n, block_n),)](
            x, head.weight, out, n, k, head.weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
            PDL=self.pdl, num_warps=warps, **gt.launch_options(self.pdl),
        )  # fmt: skip
        return out
