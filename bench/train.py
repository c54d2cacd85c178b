"""Training speed: our trainer child against the seed recipe, on the same quotes and step budget.

Each side runs in a fresh process of its own, so its peak memory (peak RSS on CPU, the CUDA
allocator's peak on a GPU) is its own and model loading stays out of the timed part:

- **ours**: the real trainer child, `python -m core.training --job JOB --progress-fd N`, with a
  job as the runner writes it (chat-formatted examples: the served system prompt, the user turn
  `training.prompt`, the quote as the answer, the loss on the answer), `batch_size` 4,
  `grad_accum` 1.
- **seed**: `--side seed` of this script: the seed write-up's recipe as written
  (`from_pretrained` with `GPTQConfig(bits=4, backend=...)`, `gradient_checkpointing_enable`,
  `prepare_model_for_kbit_training`, LoRA r=8/alpha=32/dropout 0.05 on q/k/v/o, raw quotes
  through `tokenizer(s["quote"])` and `datasets`, HF `Trainer` with batch 1 x accumulation 4,
  warmup 2, lr 2e-4, `DataCollatorForLanguageModeling(mlm=False)`, fp16 on CUDA). Two changes
  forced by the stack: `optim="adamw_torch"` (transformers 5 dropped `adamw_hf`; the same
  algorithm) and, on CPU, fp16 off.

Both sides take the same number of optimizer steps with 4 examples per step. The first
`--warmup` steps are not timed (first-call allocations, lazy initialisation); the time is from
the end of the last warm-up step to the end of the last step, as each side's process sees it
(the seed: `on_step_end` of a `TrainerCallback`; ours: the arrival of its `step` events, which
it writes right after each optimizer step). Tokens are real (non-padding) tokens only: the
seed's counted as its Trainer trains on them; ours recomputed here from the same job with the
trainer's own data code (`quote_examples`, `batch_stream`), checked against the rate the child
reports for each step. Ours reads the prompt as well as the quote, so it processes more tokens
per quote: the table gives quotes/s beside tokens/s, and quotes/s is the like-for-like number.

Peak memory on CPU is the process's peak RSS (VmHWM) at the end of its last step (ours is read
from /proc while the child runs; the child's own `result` figure, which also covers its
evaluation afterwards, is in the JSON). On CUDA the seed's is `torch.cuda.max_memory_allocated`
at its last step; ours is the child's `result` figure, which includes its evaluation.

    python bench/train.py [--model PATH] [--device cpu|cuda] [--steps 12] [--warmup 2]
        [--quotes 48] [--synthetic] [--threads N] [--order seed,ours,ours-quantized]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batching import machine  # noqa: E402

EXAMPLES_PER_STEP = 4  # seed: batch 1 x accumulation 4; ours: batch 4 x accumulation 1
EVAL_QUOTES = 4  # ours needs held-out quotes to finish its run; its evaluation is not timed
WORDS = ("zorble", "quindle", "snarp", "florp", "wibbet", "grommish", "plindle", "vorb")


# ---- the data ---------------------------------------------------------------------------------
def synthetic_quotes(n: int) -> list[str]:
    """Quotes in an invented style (made-up words), as the trainer's tests use."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i * 3 + 1) % 8], WORDS[(i * 5 + 2) % 8]
        out.append(f"Zorp zorp! The {a} {b}s the {c}, zorp zorp number {i}.")
    return out


def package_quotes(n: int) -> list[str]:
    """The first `n` quotes of the `inspirational-quotes` package (installed in the venv)."""
    import inspirational_quotes

    path = Path(inspirational_quotes.__file__).with_name("quotes.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [str(r["text"]).strip() for r in rows if str(r.get("text", "")).strip()]
    if len(texts) < n:
        raise SystemExit(f"the package holds {len(texts)} quotes, fewer than {n}")
    return texts[:n]


# ---- the seed recipe (run as `--side seed` in its own process) --------------------------------
def run_seed(args: argparse.Namespace) -> dict[str, Any]:
    """The seed recipe's training, timed by a callback; returns the side's measurements."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        GPTQConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    quotes = json.loads(Path(args.quotes_file).read_text(encoding="utf-8"))["train"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=GPTQConfig(bits=4, backend="torch" if cuda else "auto_trainable"),
        device_map=args.device,
    )
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model)
    model.config.use_cache = False
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    data = Dataset.from_dict({"quote": quotes}).map(
        lambda s: tokenizer(s["quote"]), batched=True, remove_columns=["quote"]
    )

    class CountingTrainer(Trainer):  # type: ignore[misc]
        """The recipe's Trainer, counting the real tokens of the micro-batches it trains on
        (counted here, not in the collator: accelerate's loader collates one batch ahead)."""

        tokens = 0
        examples = 0

        def training_step(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            CountingTrainer.tokens += int(inputs["attention_mask"].sum())
            CountingTrainer.examples += int(inputs["input_ids"].shape[0])
            return super().training_step(model, inputs, *a, **k)

    class Clock(TrainerCallback):  # type: ignore[misc]
        """Each optimizer step's end time and the tokens trained on up to it."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []
            self.peak = 0
            self.rss: int | None = None

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.tokens.append(CountingTrainer.tokens)
            if len(self.ends) == args.steps:
                self.peak = _own_peak(args.device)
                self.rss = _proc_status("self", "VmRSS")

        def on_log(self, *a: Any, logs: dict[str, Any] | None = None, **k: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    out_dir = tempfile.mkdtemp(prefix="loracord-bench-seed-")
    training_args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        warmup_steps=2,
        max_steps=args.steps,
        learning_rate=2e-4,
        fp16=cuda,
        logging_steps=1,
        optim="adamw_torch",
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = CountingTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[clock],
    )
    trainer.train()
    w = args.warmup
    seconds = clock.ends[-1] - clock.ends[w - 1] if w else clock.ends[-1] - clock.ends[0]
    tokens = clock.tokens[-1] - (clock.tokens[w - 1] if w else 0)
    timed_steps = args.steps - w
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype)
    return {
        "side": "seed",
        "timed_steps": timed_steps,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_all_steps": clock.tokens[-1],
        "examples": CountingTrainer.examples,
        "peak_memory_bytes": clock.peak,
        "rss_at_end_bytes": clock.rss,
        "losses": clock.losses,
        "model_dtype": dtype.removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def _own_peak(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _proc_status(pid: int | str, key: str) -> int | None:
    """A running process's VmHWM (peak RSS so far) or VmRSS (now) in bytes, from /proc (None
    where there is no /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _env(threads: int | None, *, runner: bool) -> dict[str, str]:
    """Ours runs in the environment the runner gives its trainer child; the seed recipe as a
    script is run: the same threads, nothing else changed."""
    from core.training.runner import child_env

    if runner:
        return child_env(threads)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def seed_side(args: argparse.Namespace, model: Path, folder: Path) -> dict[str, Any]:
    """Run `--side seed` in a fresh interpreter and read what it measured."""
    result = folder / "seed.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        "seed",
        "--model",
        str(model),
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--quotes-file",
        str(folder / "quotes.json"),
        "--result",
        str(result),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    with open(folder / "seed.log", "wb") as log:
        code = subprocess.run(
            command,
            cwd=ROOT,
            env=_env(args.threads, runner=False),
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    if code != 0:
        tail = (folder / "seed.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"the seed side failed (exit {code}):\n{tail}")
    return dict(json.loads(result.read_text(encoding="utf-8")))


# ---- ours: the real trainer child -----------------------------------------------------------
def _step_tokens(job: Any) -> list[int]:
    """Real tokens of each optimizer step of `job`, recomputed with the trainer's own data code
    (the same examples, the same seeded batch order)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from core.model.decoding import stop_token_ids
    from core.training.data import batch_stream, quote_examples

    tok = AutoTokenizer.from_pretrained(job.model_dir)
    try:
        generation = GenerationConfig.from_pretrained(job.model_dir)
    except OSError:
        generation = SimpleNamespace(eos_token_id=None)
    stops = stop_token_ids(SimpleNamespace(generation_config=generation), tok)
    recipe = job.recipe
    examples = quote_examples(
        tok,
        job.system_prompt,
        job.prompt,
        [q.quote for q in job.train],
        stops,
        recipe.max_length,
    )
    batches = batch_stream(examples, recipe.batch_size, recipe.seed)
    return [
        sum(len(e.input_ids) for _ in range(recipe.grad_accum) for e in next(batches))
        for _ in range(recipe.steps)
    ]


# `--order ...,ours-quantized`: the child with its dense-once dequantization turned off (every
# GPTQ layer stays quantized and dequantizes on each call, as a model over the budget does).
QUANTIZED_CHILD = (
    "import sys; import core.training.recipe as r; r.DENSE_BUDGET_BYTES = -1; "
    "from core.training.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def ours_side(
    args: argparse.Namespace, model: Path, folder: Path, *, dense: bool = True
) -> dict[str, Any]:
    """Run the trainer child on a job like the runner's; time its step events as they arrive."""
    from core.training.protocol import Quote, Recipe, TrainJob, parse_event

    quotes = json.loads((folder / "quotes.json").read_text(encoding="utf-8"))
    job = TrainJob(
        model_dir=str(model),
        out_dir=str(folder / ("adapter" if dense else "adapter-quantized")),
        train=tuple(Quote(i, q, "bench") for i, q in enumerate(quotes["train"])),
        eval=tuple(Quote(10_000 + i, q, "bench") for i, q in enumerate(quotes["eval"])),
        recipe=Recipe(steps=args.steps, batch_size=EXAMPLES_PER_STEP, grad_accum=1),
        device=args.device,
        threads=args.threads,
        gpu_memory_fraction=0.9,
        general_prompts=4,  # its evaluation after training is not timed: keep it short
    )
    tokens = _step_tokens(job)
    name = "ours" if dense else "ours-quantized"
    job_file = folder / f"{name}-job.json"
    job_file.write_text(job.to_json(), encoding="utf-8")
    read, write = os.pipe()
    entry = ["-m", "core.training"] if dense else ["-c", QUANTIZED_CHILD]
    with open(folder / f"{name}.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, *entry, "--job", str(job_file), "--progress-fd", str(write)],
            cwd=ROOT,
            env=_env(args.threads, runner=True),
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write,),
        )
    os.close(write)
    arrivals: list[float] = []
    rates: list[float] = []
    result: dict[str, Any] | None = None
    start: dict[str, Any] = {}
    peak_at_end: int | None = None
    rss_at_end: int | None = None
    with os.fdopen(read, "rb") as progress:
        for line in progress:
            now = time.perf_counter()
            event = parse_event(line.decode("utf-8"))
            if event["event"] == "step":
                arrivals.append(now)
                rates.append(float(event["tokens_per_s"]))
                if event["step"] == args.steps:
                    peak_at_end = _proc_status(child.pid, "VmHWM")
                    rss_at_end = _proc_status(child.pid, "VmRSS")
            elif event["event"] == "start":
                start = event
            elif event["event"] == "result":
                result = event
            elif event["event"] == "error":
                raise SystemExit(f"the trainer child failed: {event['message']}")
    code = child.wait()
    if code != 0 or result is None:
        tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"the trainer child failed (exit {code}):\n{tail}")
    w = args.warmup
    seconds = arrivals[-1] - arrivals[w - 1] if w else arrivals[-1] - arrivals[0]
    timed = tokens[w:]
    # The child's own clock for the same steps (tokens / its reported rate): a check that the
    # token counts here are the child's, and how much the events' delivery adds (should be ~0).
    child_seconds = sum(t / r for t, r in zip(timed, rates[w:], strict=True))
    peak = result["peak_memory_bytes"] if args.device == "cuda" else peak_at_end
    return {
        "side": name,
        "timed_steps": args.steps - w,
        "seconds": seconds,
        "child_seconds": child_seconds,
        "tokens": sum(timed),
        "tokens_all_steps": sum(tokens),
        "examples": EXAMPLES_PER_STEP * args.steps,
        "peak_memory_bytes": peak,
        "rss_at_end_bytes": rss_at_end,
        "result_peak_memory_bytes": result["peak_memory_bytes"],
        "result_tokens_per_s": result["tokens_per_s"],
        "losses": result["losses"],
        "model_dtype": start.get("dtype"),
        "threads": args.threads,
        "new_loss": result["new_loss"],
        "base_loss": result["base_loss"],
    }


# ---- the comparison ---------------------------------------------------------------------------
def summarize(side: dict[str, Any]) -> dict[str, Any]:
    seconds = side["seconds"]
    losses = [x for x in side["losses"] if x is not None]
    window = losses[-5:]
    return {
        **side,
        "tokens_per_s": side["tokens"] / seconds,
        "quotes_per_s": EXAMPLES_PER_STEP * side["timed_steps"] / seconds,
        "tokens_per_quote": side["tokens_all_steps"] / side["examples"],
        "final_loss": sum(window) / len(window) if window else None,
    }


def resolve_model(name: str | None) -> Path:
    """A GPTQ folder, or any `model` setting (default: the embedded model, built once)."""
    from core import settings as settings_module
    from core.app import locate_model

    if name and Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    overrides = {"model": name} if name else {}
    return Path(locate_model(settings_module.load(None, **overrides)).path)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args.model)
    need = args.quotes + EVAL_QUOTES
    texts = synthetic_quotes(need) if args.synthetic else package_quotes(need)
    folder = Path(tempfile.mkdtemp(prefix="loracord-bench-train-"))
    (folder / "quotes.json").write_text(
        json.dumps({"train": texts[: args.quotes], "eval": texts[args.quotes :]}), "utf-8"
    )
    print(f"model: {model}; work folder: {folder}", file=sys.stderr)
    sides = {}
    for name in args.order.split(","):
        t0 = time.perf_counter()
        if name == "seed":
            side = seed_side(args, model, folder)
        elif name in ("ours", "ours-quantized"):
            side = ours_side(args, model, folder, dense=name == "ours")
        else:
            raise SystemExit(f"unknown side {name!r} in --order")
        sides[name] = summarize(side)
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if "seed" not in sides or "ours" not in sides:
        return {"machine": machine(args.device), "sides": sides}
    ours, seed = sides["ours"], sides["seed"]
    for s in sides.values():
        s["vs_seed_tokens_per_s"] = s["tokens_per_s"] / seed["tokens_per_s"]
        s["vs_seed_quotes_per_s"] = s["quotes_per_s"] / seed["quotes_per_s"]
        s["vs_seed_peak_memory"] = s["peak_memory_bytes"] / seed["peak_memory_bytes"]
    return {
        "machine": machine(args.device),
        "model": str(model),
        "device": args.device,
        "steps": args.steps,
        "warmup_steps_untimed": args.warmup,
        "examples_per_step": EXAMPLES_PER_STEP,
        "quotes": args.quotes,
        "source": "synthetic" if args.synthetic else "inspirational-quotes",
        "threads": args.threads,
        "sides": sides,
        "ratio_tokens_per_s": ours["tokens_per_s"] / seed["tokens_per_s"],
        "ratio_quotes_per_s": ours["quotes_per_s"] / seed["quotes_per_s"],
        "ratio_peak_memory": ours["peak_memory_bytes"] / seed["peak_memory_bytes"],
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}; {r['steps']} steps x {r['examples_per_step']} examples, ")
    print(f"the first {r['warmup_steps_untimed']} untimed; {r['quotes']} {r['source']} quotes")
    head = (
        "side",
        "dtype",
        "tokens/s",
        "quotes/s",
        "tokens/quote",
        "peak memory",
        "memory at end",
        "final loss",
        "vs seed: tokens/s, quotes/s, peak",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, s in r["sides"].items():
        loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.3f}"
        end = s.get("rss_at_end_bytes")
        print(
            f"| {name} | {s['model_dtype']} | {s['tokens_per_s']:.1f} | {s['quotes_per_s']:.2f} | "
            f"{s['tokens_per_quote']:.1f} | {s['peak_memory_bytes'] / 2**20:.0f} MiB | "
            f"{'-' if end is None else f'{end / 2**20:.0f} MiB'} | {loss} | "
            f"{s['vs_seed_tokens_per_s']:.2f}x, {s['vs_seed_quotes_per_s']:.2f}x, "
            f"{s['vs_seed_peak_memory']:.2f}x |"
        )
    print(
        f"| **ours / seed** | | **{r['ratio_tokens_per_s']:.2f}x** | "
        f"**{r['ratio_quotes_per_s']:.2f}x** | | **{r['ratio_peak_memory']:.2f}x** | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GPTQ folder or model setting")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the time")
    parser.add_argument("--quotes", type=int, default=48, help="training quotes")
    parser.add_argument("--synthetic", action="store_true", help="invented quotes, not the package")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per side")
    parser.add_argument(
        "--order",
        default="seed,ours",
        help="the sides, in order: seed, ours, ours-quantized (dense-once off)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    # The seed side's own process:
    parser.add_argument("--side", choices=("seed",), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quotes-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and below --steps")
    if args.side == "seed":
        Path(args.result).write_text(json.dumps(run_seed(args)), encoding="utf-8")
        return
    result = bench(args)
    if "ratio_tokens_per_s" in result:
        print_table(result)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "sides"}))


if __name__ == "__main__":
    main()
