"""Serving speed: the engine's decode step, fast path against plain path, and against the peers.

Loads a GPTQ checkpoint as the engine serves it, then, in one process:
- batch-1 decode: `--prompt` tokens prefilled, then `--tokens` greedy tokens (EOS ignored, so
  random-weight models decode as far as real ones), each step the engine's `BatchModel.step`
  and its sampler (`core.model.sampling.choose`), through the plain path (the baseline), the
  fast path, and on a GPU the fast path without CUDA graphs; time to first token is the
  prompt's prefill plus its first choice;
- with `--adapters N`: one row on an adapter (what one member asking in a channel gets), N
  rows decoding together on one adapter, then each row on its own adapter (N distinct,
  resident in slots), on the path serving uses;
- on a CPU, llama.cpp (`llama-cpp-python`, when installed) on the embedded model's GGUF, same
  thread count, same prompt length, the same number of greedy tokens;
- the bandwidth bound of batch-1 decode, `--bandwidth` GB/s over the checkpoint's bytes.

    python bench/serving.py [--model M] [--device cpu|cuda] [--kernel K] [--prompt 32]
        [--tokens 128] [--runs 3] [--adapters 0] [--bandwidth 4800] [--llama-cpp auto|off|GGUF]
        [--json F] [--pdl on|off] [--fused-norms on|off] [--norm-split BLOCK,WARPS|off]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = (
    "Give me a short quote about courage, and then explain in a few sentences why it matters "
    "to the people who hear it, where it comes from, and what it asks of us today."
)


def _prompt_ids(tokenizer: Any, length: int) -> list[int]:
    ids = list(tokenizer(TEXT)["input_ids"])
    while len(ids) < length:
        ids += ids
    return ids[:length]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=0.0, help="memory GB/s, for the bound")
    parser.add_argument("--llama-cpp", default="auto")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--gemv-table",
        default=None,
        help="CUDA: GEMV configurations per shape from `bench/gptq_gemm.py --json` (its one-row "
        "results) in place of the committed table, to serve with a fresh sweep's winners",
    )
    parser.add_argument(
        "--pdl",
        choices=("on", "off"),
        help="CUDA, Triton step: launch its kernels as programmatic dependent launches or not "
        "(default: `triton_step.PDL`, on; Hopper and later)",
    )
    parser.add_argument(
        "--attention-splits",
        type=int,
        default=None,
        help="CUDA, Triton step: the most spans one row's attention is cut into (1: one kernel, "
        "no split), in place of the committed default",
    )
    parser.add_argument(
        "--fused-norms",
        choices=("on", "off"),
        help="CUDA, Triton step: at one row, the norms between layers in the GEMVs, or as "
        "kernels of their own (default: `triton_step.FUSED_NORMS`, off)",
    )
    parser.add_argument(
        "--adapter-kernels",
        choices=("on", "off"),
        help="CUDA, Triton step: one row on one adapter gets its terms from the kernels, or "
        "from torch's products (default: `triton_step.ADAPTER_KERNELS`, on)",
    )
    parser.add_argument(
        "--norm-split",
        default=None,
        help="CUDA, Triton step: a norm kernel's row cut into slices, as BLOCK,WARPS (e.g. "
        "256,2), or off: one program a row (default: `triton_step.NORM_SPLIT`)",
    )
    args = parser.parse_args()

    import torch

    from core.model.batch import BatchModel
    from core.model.kernels import choose_runtime
    from core.model.loader import describe, load_for_serving
    from core.model.requests import GenerationParams
    from core.model.sampling import RowSampler, SeenTokens, choose
    from core.model.scheduler import Segment
    from core.model.source import resolve
    from core.settings import load

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if (
        args.attention_splits is not None
        or args.pdl
        or args.fused_norms
        or args.adapter_kernels
        or args.norm_split
    ):
        from core.model import triton_step

        if args.attention_splits is not None:
            triton_step.MAX_ATTENTION_SPLITS = args.attention_splits
        if args.pdl is not None:
            triton_step.PDL = args.pdl == "on"
        if args.fused_norms is not None:
            triton_step.FUSED_NORMS = args.fused_norms == "on"
        if args.adapter_kernels is not None:
            triton_step.ADAPTER_KERNELS = args.adapter_kernels == "on"
        if args.norm_split is not None:
            split = None if args.norm_split == "off" else args.norm_split.split(",")
            triton_step.NORM_SPLIT = None if split is None else (int(split[0]), int(split[1]))
    if args.gemv_table:
        from core.model import gptq_triton as gt

        for row in json.loads(Path(args.gemv_table).read_text())["results"]:
            if row["rows"] == 1 and row["kernel"] == "gemv":
                gt.GEMV_TABLE[f"{row['K']}x{row['N']}"] = gt.GemvConfig(**row["config"])
    settings = load(None, environ={})
    resolved = resolve(args.model, settings.cache_dir)
    runtime = choose_runtime(args.device, args.dtype, args.kernel)
    model, tokenizer, seconds = load_for_serving(resolved.path, runtime)
    info = describe(resolved.name, resolved.path, model, runtime, seconds)
    rows = max(1, args.adapters)
    context = args.prompt + args.tokens + 8
    started = time.perf_counter()
    batch = BatchModel(
        model, rows, context, adapter_slots=max(1, args.adapters), adapter_max_rank=16
    )
    setup_s = time.perf_counter() - started
    cuda = batch.device.type == "cuda"
    vocab = int(model.config.vocab_size)
    seen = SeenTokens(rows, vocab, batch.device)
    greedy = RowSampler.for_params(GenerationParams(temperature=0.0), batch.device)
    prompt = _prompt_ids(tokenizer, args.prompt)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def decode(path: str, slots: list[int]) -> dict[str, float]:
        """One run: prefill every row, then `--tokens` steps of all rows together."""
        n = len(slots)
        sync()
        started = time.perf_counter()
        firsts = []
        for row, slot in enumerate(slots):
            seen.reset(row, prompt)
            logits = batch.plain_step([Segment(row, 0, prompt, True, slot)])
            firsts += choose(logits, [greedy], [row], seen)
            if row == 0:
                ttft = time.perf_counter() - started
        last = firsts
        sync()
        started = time.perf_counter()
        for i in range(args.tokens - 1):
            segments = [
                Segment(row, args.prompt + i, [last[row]], True, slot)
                for row, slot in enumerate(slots)
            ]
            logits = batch.plain_step(segments) if path == "plain" else batch.step(segments)
            last = choose(logits, [greedy] * n, list(range(n)), seen)
        sync()
        seconds = time.perf_counter() - started
        return {
            "tokens_per_s": n * (args.tokens - 1) / seconds,
            "ms_per_step": seconds / (args.tokens - 1) * 1e3,
            "ttft_s": ttft,
        }

    def agreement(slots: list[int]) -> dict[str, float]:
        """Teacher-forced: the plain path's greedy tokens fed through the serving path; the
        share of steps where both pick the same next token, and whether all logits are finite."""
        runs: dict[str, list[torch.Tensor]] = {}
        fed: list[list[int]] = []
        for path in ("plain", "fast"):
            picks = []
            for row, slot in enumerate(slots):
                batch.plain_step([Segment(row, 0, prompt, True, slot)])
            for i in range(args.tokens - 1):
                if path == "plain":
                    tokens = picks[-1].tolist() if picks else [prompt[-1]] * len(slots)
                    fed.append(tokens)
                segments = [
                    Segment(row, args.prompt + i, [fed[i][row]], True, slot)
                    for row, slot in enumerate(slots)
                ]
                logits = batch.plain_step(segments) if path == "plain" else batch.step(segments)
                if not bool(logits.isfinite().all()):
                    print(f"  {path} path: logits not finite at step {i}", file=sys.stderr)
                    return {"agreement": 0.0, "finite": 0.0}
                picks.append(logits.argmax(-1).cpu())
            runs[path] = picks
        pairs = zip(runs["plain"], runs["fast"], strict=True)
        same = [bool(a == b) for p, f in pairs for a, b in zip(p, f, strict=True)]
        return {"agreement": sum(same) / len(same), "finite": 1.0}

    def median(path: str, slots: list[int]) -> dict[str, float]:
        sync()
        started = time.perf_counter()
        decode(path, slots)  # warm-up (compiles, captures the CUDA graphs of these buckets)
        warm_up = time.perf_counter() - started
        runs = [decode(path, slots) for _ in range(args.runs)]
        out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        out["warm_up_s"] = warm_up
        print(f"  ({path}, {len(slots)} rows: {out})", file=sys.stderr, flush=True)
        return out

    result: dict[str, Any] = {
        "model": info.name,
        "kernel": info.kernel,
        "dtype": info.dtype,
        "device": info.device,
        "machine": _machine(cuda, torch),
        "decode_path": batch.decode_path,
        "fast_setup_s": round(setup_s, 2),
        "prompt_tokens": args.prompt,
        "answer_tokens": args.tokens,
    }
    one = [0]
    result["plain"] = median("plain", one)
    if cuda and batch.graphs is not None:  # the fast step without its graphs
        graphs, batch.graphs = batch.graphs, None
        result["fast_eager"] = median("fast", one)
        batch.graphs = graphs
    if batch.fast is not None and batch.fast.native is not None:  # ... without its C++ step
        native, batch.fast.native = batch.fast.native, None
        result["fast_eager"] = median("fast", one)
        batch.fast.native = native
        result["native_build_s"] = round(batch.fast.build_seconds, 1)
    fast = batch.fast
    if cuda and fast is not None and fast.triton is not None and batch.graphs is not None:
        # ... with the Triton products but the eager step's other kernels
        layers, fast.triton = fast.triton, None
        batch.graphs.reset()  # the graphs captured so far ran the Triton step
        result["fast_triton_products_only"] = median("fast", one)
        fast.triton = layers
        batch.graphs.reset()
    result["fast"] = median("fast", one)
    result["fast_agreement"] = agreement(one)
    result["fast_over_plain"] = result["fast"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    result["paths"] = dict(batch.paths)
    checkpoint = sum(p.stat().st_size for p in Path(resolved.path).glob("*.safetensors"))
    result["checkpoint_bytes"] = checkpoint
    if args.bandwidth:
        bound = args.bandwidth * 1e9 / checkpoint
        result["bandwidth_bound_tokens_per_s"] = bound
        result["fast_share_of_bound"] = result["fast"]["tokens_per_s"] / bound

    if args.adapters:
        result["adapters"] = _adapters(args, batch, resolved.path, median, agreement)
    peer = _llama_cpp(args, resolved, len(prompt))
    if peer:
        result["llama_cpp"] = peer
        result["fast_over_llama_cpp"] = result["fast"]["tokens_per_s"] / peer["tokens_per_s"]
        result["ttft_over_llama_cpp_prefill"] = result["fast"]["ttft_s"] / peer["prefill_s"]
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def _adapters(
    args: argparse.Namespace, batch: Any, model_dir: Path, median: Any, agreement: Any
) -> dict:
    from core.adapters import BaseShapes, inspect_adapter
    from core.model.lora import read_weights
    from tests.adapter_kit import write_adapter

    shapes = BaseShapes.of_model(Path(model_dir))
    n = args.adapters
    with tempfile.TemporaryDirectory() as root:
        for i in range(n):
            folder = write_adapter(Path(root) / f"a{i}", shapes, seed=i + 1, rank=8)
            batch.lora.load(i + 1, read_weights(inspect_adapter(folder, shapes, 16)))
    row_on_one = median("fast", [1])  # what one member asking in a channel gets
    on_one = median("fast", [1] * n)
    distinct = median("fast", list(range(1, n + 1)))
    return {
        "rows": n,
        "one_row_on_an_adapter": row_on_one,
        "agreement_one_row": agreement([1]),
        "agreement_distinct": agreement(list(range(1, n + 1))),
        "one_adapter": on_one,
        "distinct_adapters": distinct,
        "distinct_over_one": distinct["tokens_per_s"] / on_one["tokens_per_s"],
        "paths": dict(batch.paths),
    }


def _llama_cpp(args: argparse.Namespace, resolved: Any, prompt_tokens: int) -> dict | None:
    if args.llama_cpp == "off" or args.device != "cpu":
        return None
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed; skipped", file=sys.stderr)
        return None
    gguf = Path(args.llama_cpp) if args.llama_cpp != "auto" else None
    if gguf is None:
        from core.model.build import gguf_path

        if not resolved.name.startswith("SmolLM2-135M-Instruct"):
            print("llama.cpp: no GGUF for this model (--llama-cpp PATH); skipped", file=sys.stderr)
            return None
        gguf = gguf_path()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.prompt + args.tokens + 8,
        verbose=False,
    )
    ids = llm.tokenize(TEXT.encode())
    while len(ids) < prompt_tokens:
        ids += ids
    ids = ids[:prompt_tokens]

    def run() -> dict[str, float]:
        llm.reset()
        started = time.perf_counter()
        for produced, _token in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), 1):
            if produced == 1:
                first = time.perf_counter()
            if produced == args.tokens:
                break
        seconds = time.perf_counter() - first
        return {
            "tokens_per_s": (args.tokens - 1) / seconds,
            "ms_per_step": seconds / (args.tokens - 1) * 1e3,
            "prefill_s": first - started,
        }

    run()
    runs = [run() for _ in range(args.runs)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["version"] = llama_cpp.__version__
    out["gguf"] = gguf.name
    return out


def _machine(cuda: bool, torch: Any) -> str:
    if cuda:
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()}, {torch.get_num_threads()} threads"


def _print(result: dict[str, Any]) -> None:
    print(
        f"{result['model']} ({result['kernel']}, {result['dtype']}, {result['device']}, "
        f"{result['machine']}); decode path {result['decode_path']}"
    )
    for key in ("plain", "fast_eager", "fast"):
        if key in result:
            r = result[key]
            print(
                f"  {key:10s} {r['tokens_per_s']:8.1f} tok/s  {r['ms_per_step']:7.2f} ms/step  "
                f"TTFT {r['ttft_s'] * 1e3:7.1f} ms"
            )
    print(
        f"  fast / plain {result['fast_over_plain']:.2f}x; teacher-forced agreement with plain "
        f"{result['fast_agreement']['agreement']:.1%}"
        + ("" if result["fast_agreement"]["finite"] else " (NOT FINITE)")
    )
    if "bandwidth_bound_tokens_per_s" in result:
        print(
            f"  bound {result['bandwidth_bound_tokens_per_s']:.0f} tok/s "
            f"({result['checkpoint_bytes'] / 1e9:.2f} GB); fast is "
            f"{result['fast_share_of_bound']:.1%} of it"
        )
    if "adapters" in result:
        a = result["adapters"]
        r = a["one_row_on_an_adapter"]
        print(
            f"  1 row on an adapter {r['tokens_per_s']:8.1f} tok/s  {r['ms_per_step']:7.2f} "
            f"ms/step ({r['tokens_per_s'] / result['fast']['tokens_per_s']:.2f}x the base); "
            f"agreement with plain {a['agreement_one_row']['agreement']:.1%}"
            + ("" if a["agreement_one_row"]["finite"] else " (NOT FINITE)")
        )
        print(
            f"  {a['rows']} rows: one adapter {a['one_adapter']['tokens_per_s']:.1f} tok/s, "
            f"{a['rows']} distinct {a['distinct_adapters']['tokens_per_s']:.1f} tok/s "
            f"({a['distinct_over_one']:.2f}x); agreement with plain "
            f"{a['agreement_distinct']['agreement']:.1%}"
            + ("" if a["agreement_distinct"]["finite"] else " (NOT FINITE)")
        )
    if "llama_cpp" in result:
        p = result["llama_cpp"]
        print(
            f"  llama.cpp  {p['tokens_per_s']:8.1f} tok/s  {p['ms_per_step']:7.2f} ms/step  "
            f"prefill {p['prefill_s'] * 1e3:7.1f} ms; engine / llama.cpp "
            f"{result['fast_over_llama_cpp']:.2f}x, TTFT / its prefill "
            f"{result['ttft_over_llama_cpp_prefill']:.2f}x"
        )


if __name__ == "__main__":
    raise SystemExit(main())
