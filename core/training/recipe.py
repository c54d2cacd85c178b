"""The training itself: LoRA on the GPTQ base, our own loop, evaluation, samples, saving.

Why not HF Trainer: we need the loss on assistant tokens only without computing logits for the
rest, batches padded to their own longest example, progress events at each optimizer step, and
cancellation at step boundaries; a small loop does all of that with nothing hidden.

Precision: the 4-bit base computes in the device's half precision where it has one (bf16 on a
CPU with AVX512-BF16 or AMX, bf16/fp16 on CUDA), the LoRA weights and AdamW's state stay fp32
(bf16 LoRA weights were measured to diverge); PEFT casts each LoRA input to fp32 and the result
back. Kernels: GPTQModel's `auto_trainable` on CPU, `torch` on CUDA (the fast CUDA serving
kernels have no backward or train wrongly); a small model's weights are then dequantized once
into dense frozen linears (`_dequantize_once_if_small`), the same numbers without the per-call
dequantization.

Schedule: linear warmup over `warmup_steps`, then cosine decay towards 0 over the remaining
steps (the last step still gets a small positive rate), AdamW over the LoRA weights only,
gradient norm clipped to 1.0. The loss of a step is the mean cross-entropy per assistant token
over all of its examples (across `grad_accum` micro-batches), so long quotes weigh what their
tokens weigh.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.model import fidelity
from core.model.decoding import stop_token_ids
from core.model.source import read_quantization
from core.training.data import IGNORE_INDEX, Example, batch_stream, collate, quote_examples
from core.training.protocol import TrainJob, finite

log = logging.getLogger(__name__)

Emit = Callable[..., None]  # emit(kind, **fields): one progress event

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_GRAD_NORM = 1.0
SAMPLE_TOKENS = 48  # the sample answers' length, with the bot's repetition penalty
SAMPLE_REPETITION_PENALTY = 1.2
GENERAL_ANSWER_TOKENS = 32  # the base model's answers to the general prompts
TRAIN_LOSS_WINDOW = 5  # `train_loss` is the mean of this many last steps


class Cancelled(Exception):
    """SIGTERM arrived, or the parent died: stop without leaving an adapter behind."""


class TrainingError(Exception):
    """A failure whose message is one line meant for the operator."""


class StopSignal:
    """SIGTERM and the parent's death, as the training loop sees them.

    Inside `deferred()` (an optimizer step) a SIGTERM only sets a flag that `check()` turns into
    `Cancelled` at the next step boundary, so a step is never left half-applied; anywhere else
    (loading, evaluation, sampling) it raises at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False
        self._parent = os.getppid()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        _die_with_parent()

    def _on_term(self, signum: int, frame: object) -> None:
        # Only the first SIGTERM raises: a second one must not break the clean-up of the first.
        first = not self.requested
        self.requested = True
        if first and not self._deferring:
            raise Cancelled

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def ignore(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def check(self) -> None:
        if self.requested or os.getppid() != self._parent:
            raise Cancelled


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort: the loop also
    checks the parent's pid at every step)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


@dataclass
class Loaded:
    """The PEFT-wrapped model and the pieces the loss needs."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    decoder: Any  # the transformer stack (hidden states, final norm included)
    head: Any  # the LM head
    stops: set[int]
    pad_id: int
    dtype: str


def resolve_dtype(job: TrainJob) -> str:
    """The base model's compute dtype for "auto": bf16 where the hardware has it.

    Measured on the project's 2-core AVX512-BF16 CPU (embedded model, batch 4, 30 steps, the
    weights dequantized once): bf16 157 tokens/s and 1.5 GiB peak RSS, fp32 112 tokens/s and
    1.8 GiB, the same losses within 0.05. Without native bf16, fp32.
    """
    if job.dtype != "auto":
        return job.dtype
    if job.device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    from core.model.kernels import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() else "float32"


def load(job: TrainJob) -> Loaded:
    """The GPTQ base with a trainable fp32 LoRA (new, or continued from `init_adapter`)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from core.model.residuals import attach as attach_residuals

    path = Path(job.model_dir)
    if not path.is_dir():
        raise TrainingError(f"the model folder {path} does not exist")
    quant = read_quantization(path)
    dtype = resolve_dtype(job)
    kernel = "torch" if job.device == "cuda" else "auto_trainable"
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = _dense_if_small(job, path, quant, getattr(torch, dtype))
    if base is None:
        # Through GPTQModel's trainable kernel. On CPU the checkpoint loads in fp32 and a small
        # model is then made dense in `dtype`: the kernel's bf16 load took 160 MiB more than
        # its fp32 one (measured, embedded model), and the weights are dequantized in fp32 and
        # rounded once.
        load_dtype = "float32" if job.device == "cpu" else dtype
        base = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=GPTQConfig(bits=int(quant["bits"]), backend=kernel),
            dtype=getattr(torch, load_dtype),
            device_map=job.device,
        )
        attach_residuals(base, path)  # the checkpoint's whole weights, as served
        if not _dequantize_once_if_small(base, getattr(torch, dtype)):
            dtype = load_dtype  # too big to hold dense: it trains through the kernel as loaded
            if job.device == "cuda":
                _dequantize_again_in_backward(base)
        # For GPTQ models this only freezes the base and turns on checkpointing: it does not
        # upcast the non-quantized weights (checked: all stay in `dtype`).
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=job.recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:  # what prepare_model_for_kbit_training does for GPTQ, without its upcast of a dense model
        base.requires_grad_(False)
        if job.recipe.gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    base.config.use_cache = False
    if job.init_adapter:
        model = PeftModel.from_pretrained(base, job.init_adapter, is_trainable=True)
    else:
        recipe = job.recipe
        config = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,  # type: ignore[arg-type]  # PEFT takes any number
            lora_dropout=recipe.dropout,
            target_modules=TARGET_MODULES,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 LoRA weights whatever PEFT picked
    stops = stop_token_ids(base, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        decoder=base.get_decoder(),
        head=base.get_output_embeddings(),
        stops=stops,
        pad_id=int(pad),
        dtype=dtype,
    )


# Dense weights the trainer may hold instead of dequantizing every GPTQ layer on every forward
# (the embedded model's take 0.2 GiB in bf16; a 7B model's would take 13 GiB and stay quantized).
DENSE_BUDGET_BYTES = 2 * 2**30


def _dense_if_small(job: TrainJob, path: Path, quant: dict[str, Any], dtype: Any) -> Any:
    """On the CPU, a model whose dense weights fit `DENSE_BUDGET_BYTES`, read straight from its
    checkpoint into dense `dtype` layers (`core.model.dense`); else None.

    Peak memory is what this saves: loading through GPTQModel first and replacing its layers
    afterwards kept the kernels' buffers alive beside the dense weights (the trainer's peak
    was 1.19x the seed recipe's on the embedded model)."""
    import torch

    from core.errors import ModelError
    from core.model.dense import dense_model, dense_parameters, supported

    if job.device != "cpu" or not supported(quant):
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        if dense_parameters(path, quant) * itemsize > DENSE_BUDGET_BYTES:
            return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # the kernel path will say
        log.debug("cannot size %s from its headers: %s", path, e)
        return None
    try:
        return dense_model(path, quant, dtype)
    except ModelError:
        return None


def _dequantize_once_if_small(model: Any, dtype: Any) -> bool:
    """Replace the GPTQ linears by frozen dense ones holding the same dequantized weights.

    In training mode GPTQModel's trainable kernels dequantize each weight on every call: 0.3 s
    per forward on the embedded model (2 cores), paid again by gradient checkpointing's
    recompute and on every generated token of the evaluation. The weights are computed as the
    kernel's training path computes them (`dequantize_weight`), then rounded once to `dtype`;
    the model's other floating-point weights (embeddings, norms) are cast to `dtype` too. The
    LoRA then wraps plain `nn.Linear` modules under the same names: the saved adapter is
    unchanged. Returns False (and changes nothing) when the dense weights would not fit.
    """
    import torch

    from core.model.loader import quant_layers
    from core.model.residuals import fold as fold_residual

    layers = quant_layers(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not layers or sum(m.in_features * m.out_features for m in layers) * itemsize > (
        DENSE_BUDGET_BYTES
    ):
        return False
    model.train()  # the kernels' training format (GPTQ v2 zero points) is what they dequantize
    names = {id(m): name for name, m in model.named_modules()}
    with torch.no_grad():
        for layer in layers:
            weight = layer.dequantize_weight(num_itr=layer.g_idx.shape[0] // layer.in_features)
            weight = fold_residual(layer, weight)  # [in, out], plus the layer's residual
            dense = torch.nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            dense.weight = torch.nn.Parameter(
                weight.to(dtype).t().contiguous(), requires_grad=False
            )
            if layer.bias is not None:
                dense.bias = torch.nn.Parameter(layer.bias.to(dtype).clone(), requires_grad=False)
            parent, _, child = names[id(layer)].rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        for param in model.parameters():  # transformers refuses `.to(dtype)` on a GPTQ model
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    model.eval()
    return True


class DequantizedMatmul:
    """`x @ W` for a frozen GPTQ layer that dequantizes `W` again for the backward pass.

    Through the plain kernel, autograd keeps each layer's dequantized weight for the backward:
    with gradient checkpointing that is every weight of the decoder layer being recomputed, at
    once (~0.4 GiB in bf16 for a 7B layer). Dequantizing again when the gradient needs it
    keeps one weight at a time; on a GPU a dequantization is a few milliseconds per model."""

    _function: Any = None

    @classmethod
    def apply(cls, x: Any, layer: Any) -> Any:
        if cls._function is None:
            import torch

            def weight(layer: Any, dtype: Any) -> Any:
                num_itr = layer.g_idx.shape[0] // layer.in_features
                return layer.dequantize_weight(num_itr=num_itr).to(dtype)  # [in, out]

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, x: Any, layer: Any) -> Any:
                    ctx.layer = layer
                    return x @ weight(layer, x.dtype)

                @staticmethod
                def backward(ctx: Any, grad: Any) -> Any:
                    return grad @ weight(ctx.layer, grad.dtype).t(), None

            cls._function = Function
        return cls._function.apply(x, layer)


def _dequantize_again_in_backward(model: Any) -> None:
    """Route the model's GPTQ layers through `DequantizedMatmul` while training (the `torch`
    kernel's own forward is the same dequantize-then-matmul, so the numbers are the same)."""
    from core.model.loader import quant_layers

    for layer in quant_layers(model):
        kernel_forward = layer.forward

        def forward(x: Any, layer: Any = layer, kernel_forward: Any = kernel_forward) -> Any:
            if not (layer.training or x.requires_grad) or layer.bias is not None:
                return kernel_forward(x)
            out = DequantizedMatmul.apply(x.reshape(-1, x.shape[-1]), layer)
            return out.reshape(*x.shape[:-1], layer.out_features)

        layer.forward = forward


HEAD_ROWS = 32


def summed_loss(loaded: Loaded, batch: Sequence[Example]) -> tuple[Any, int, int]:
    """(sum of cross-entropy over the batch's loss tokens, loss tokens, real tokens).

    The LM head runs only at the positions that predict a loss token: with the vocabulary at
    49k and the prompt most of each example, that skips most of the head's matmul and softmax
    (the model's own forward would compute logits everywhere).
    """
    import torch

    device = loaded.head.weight.device
    ids, mask, labels = (t.to(device) for t in collate(batch, loaded.pad_id))
    hidden = loaded.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    where = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n = where.numel()
    # The head's rows are rounded up to a multiple of HEAD_ROWS (the extra rows' logits are
    # dropped), as `collate` rounds the batch's width: on a CPU oneDNN caches a primitive per
    # matmul shape, and shapes that changed at every step grew the trainer step by step.
    rows = -(-n // HEAD_ROWS) * HEAD_ROWS
    where = torch.cat([where, where.new_zeros(rows - n)])
    logits = loaded.head(hidden[:, :-1].reshape(-1, hidden.shape[-1])[where]).float()[:n]
    loss = torch.nn.functional.cross_entropy(logits, targets[where[:n]], reduction="sum")
    return loss, n, int(mask.sum())


def mean_loss(loaded: Loaded, examples: Sequence[Example], batch_size: int) -> tuple[float, int]:
    """(mean cross-entropy per loss token, loss tokens) of `examples` under the model as it is
    set now (adapter on, off or switched), without gradients."""
    import torch

    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            loss, n, _ = summed_loss(loaded, examples[start : start + batch_size])
            total += float(loss)
            tokens += n
    return total / max(1, tokens), tokens


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup (step 0 already gets peak / (warmup + 1)), then cosine decay towards 0."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Trained:
    losses: list[float]
    seconds: float
    tokens: int
    diverged: bool


def train(
    loaded: Loaded, examples: Sequence[Example], job: TrainJob, emit: Emit, stop: StopSignal
) -> Trained:
    """`recipe.steps` optimizer steps over `examples`, one `step` event after each."""
    import torch

    recipe = job.recipe
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    batches = batch_stream(examples, recipe.batch_size, recipe.seed)
    loaded.model.train()
    losses: list[float] = []
    tokens_total = 0
    started = time.monotonic()
    for step in range(recipe.steps):
        stop.check()
        step_started = time.monotonic()
        lr = learning_rate(step, recipe.steps, recipe.learning_rate, recipe.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(recipe.grad_accum)]
        targets = sum(e.targets for b in micro for e in b)
        step_loss, step_tokens = 0.0, 0
        with stop.deferred():
            for batch in micro:
                loss, _, real = summed_loss(loaded, batch)
                (loss / targets).backward()
                step_loss += float(loss.detach())
                step_tokens += real
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        now = time.monotonic()
        mean = step_loss / max(1, targets)
        losses.append(mean)
        tokens_total += step_tokens
        per_step = (now - started) / (step + 1)
        emit(
            "step",
            step=step + 1,
            steps=recipe.steps,
            loss=finite(mean),
            lr=lr,
            tokens_per_s=step_tokens / max(now - step_started, 1e-9),
            eta_s=per_step * (recipe.steps - step - 1),
        )
        if not math.isfinite(mean):  # the weights are NaN/inf now: more steps cannot help
            return Trained(losses, time.monotonic() - started, tokens_total, diverged=True)
    stop.check()
    return Trained(losses, time.monotonic() - started, tokens_total, diverged=False)


def general_prompt_texts(count: int) -> list[str]:
    """`count` of the committed general chat prompts, taken round-robin across their categories
    (facts, quote requests, instructions, small talk): the set lists the facts first, and a
    measure of harm elsewhere should cover every kind of question members ask."""
    by_category: dict[str, list[str]] = {}
    for prompt in fidelity.eval_prompts():
        by_category.setdefault(prompt.category, []).append(prompt.text)
    chosen: list[str] = []
    columns = list(by_category.values())
    for index in range(max(map(len, columns), default=0)):
        chosen.extend(column[index] for column in columns if index < len(column))
    return chosen[:count]


def greedy_text(loaded: Loaded, prompt_ids: list[int]) -> str:
    answer = fidelity.greedy_answers(
        loaded.model,
        loaded.tokenizer,
        [prompt_ids],
        SAMPLE_TOKENS,
        repetition_penalty=SAMPLE_REPETITION_PENALTY,
    )[0]
    return str(loaded.tokenizer.decode(answer, skip_special_tokens=True)).strip()


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def note_peak(device: str, after: str) -> None:
    """One line in the child's log (stderr): the peak memory so far, phase by phase."""
    print(
        f"peak memory after {after}: {peak_memory_bytes(device) / 2**20:.0f} MiB", file=sys.stderr
    )


def plot_losses(path: Path, losses: Sequence[float], evals: dict[str, float | None]) -> None:
    """The train loss per step, the held-out losses as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, [x if math.isfinite(x) else math.nan for x in losses], label="train", lw=1.5)
    styles = {"base": "gray", "current": "tab:orange", "new": "tab:green"}
    for name, value in evals.items():
        if value is not None:
            ax.axhline(value, ls="--", color=styles[name], label=f"held-out, {name}: {value:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(job: TrainJob, emit: Emit, stop: StopSignal) -> None:
    """Train, evaluate, sample, then publish `out_dir` atomically and emit the result."""
    import torch

    started = time.monotonic()
    out_dir = Path(job.out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if out_dir.exists():
        raise TrainingError(f"the output folder {out_dir} already exists")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a child that was killed
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device is cuda but torch sees no CUDA GPU")
        torch.cuda.set_per_process_memory_fraction(job.gpu_memory_fraction)
    torch.manual_seed(job.recipe.seed)

    loaded = load(job)
    note_peak(job.device, "loading")
    tok, recipe = loaded.tokenizer, job.recipe

    def quotes(items: Sequence[Any], name: str) -> list[Example]:
        made = quote_examples(
            tok,
            job.system_prompt,
            job.prompt,
            [q.quote for q in items],
            loaded.stops,
            recipe.max_length,
        )
        if not made:
            raise TrainingError(
                f"no {name} quote fits max_length {recipe.max_length} after the prompt"
            )
        return made

    train_examples, eval_examples = quotes(job.train, "train"), quotes(job.eval, "eval")
    emit(
        "start",
        steps=recipe.steps,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        device=job.device,
        dtype=loaded.dtype,
    )
    trained = train(loaded, train_examples, job, emit, stop)
    note_peak(job.device, "training")

    emit("phase", phase="evaluating")
    model = loaded.model
    model.eval()
    model.get_base_model().config.use_cache = True  # generation below
    new_loss, eval_tokens = mean_loss(loaded, eval_examples, recipe.batch_size)
    note_peak(job.device, "the held-out loss")
    current_loss = None
    if job.current_adapter:
        model.load_adapter(job.current_adapter, adapter_name="current")
        model.set_adapter("current")
        current_loss, _ = mean_loss(loaded, eval_examples, recipe.batch_size)
        model.set_adapter("default")
        model.delete_adapter("current")  # save_pretrained would save it too
    general_texts = general_prompt_texts(job.general_prompts)
    general_prompts = fidelity.render_prompts(tok, job.system_prompt, general_texts)
    with model.disable_adapter():
        base_loss, _ = mean_loss(loaded, eval_examples, recipe.batch_size)
        answers = fidelity.greedy_answers(
            model, tok, general_prompts, GENERAL_ANSWER_TOKENS, batch_size=recipe.batch_size * 4
        )
        general = [
            Example(p + a, [IGNORE_INDEX] * len(p) + a)
            for p, a in zip(general_prompts, answers, strict=True)
            if a
        ]
        general_base = mean_loss(loaded, general, recipe.batch_size)[0] if general else None
    general_new = mean_loss(loaded, general, recipe.batch_size)[0] if general else None

    note_peak(job.device, "the general prompts")
    emit("phase", phase="sampling")
    sample_ids = fidelity.render_prompts(tok, job.system_prompt, [job.sample_prompt])[0]
    with model.disable_adapter():
        sample_base = greedy_text(loaded, sample_ids)
    sample_new = greedy_text(loaded, sample_ids)

    note_peak(job.device, "sampling")
    emit("phase", phase="saving")
    evals = {
        "base": finite(base_loss),
        "current": None if current_loss is None else finite(current_loss),
        "new": finite(new_loss),
    }
    try:
        model.save_pretrained(tmp)
        plot_losses(tmp / "loss_curve.png", trained.losses, evals)
        stop.check()
        with stop.deferred():
            os.rename(tmp, out_dir)
            stop.ignore()  # the adapter is complete: a SIGTERM now is too late to cancel it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    window = trained.losses[-TRAIN_LOSS_WINDOW:]
    emit(
        "result",
        train_loss=finite(sum(window) / len(window)),
        base_loss=evals["base"],
        current_loss=evals["current"],
        new_loss=evals["new"],
        general_base_loss=None if general_base is None else finite(general_base),
        general_new_loss=None if general_new is None else finite(general_new),
        eval_examples=len(eval_examples),
        eval_tokens=eval_tokens,
        samples={"prompt": job.sample_prompt, "base": sample_base, "new": sample_new},
        losses=[finite(x) for x in trained.losses],
        diverged=trained.diverged,
        seconds=round(time.monotonic() - started, 3),
        tokens_per_s=trained.tokens / max(trained.seconds, 1e-9),
        peak_memory_bytes=peak_memory_bytes(job.device),
        out_dir=str(out_dir),
    )
