"""What the runner and the trainer child say to each other: the job file and the progress events.

The runner writes a `TrainJob` as JSON and starts `python -m core.training --job FILE
--progress-fd N`; the child writes one JSON event per line to fd N (never to stdout, where
libraries print banners) and exits 0 after a `result`, 1 after an `error`, 3 after `cancelled`
(SIGTERM). Both sides check every event against `EVENT_FIELDS`, so a field renamed on one side
fails loudly instead of arriving as a silent None. No torch here: the runner imports this.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CANCELLED = 3

Device = Literal["cpu", "cuda"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Phase = Literal["evaluating", "sampling", "saving"]
PHASES: tuple[str, ...] = ("evaluating", "sampling", "saving")


class JobError(ValueError):
    """The job file is unusable; the message is one line naming the field."""


class ProtocolError(ValueError):
    """A progress line that is not a well-formed event."""


@dataclass(frozen=True)
class Recipe:
    """The training hyperparameters; names and defaults are `TrainingSettings`' own, so the
    runner passes those settings through unchanged."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    learning_rate: float = 2e-4
    warmup_steps: int = 2
    steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    gradient_checkpointing: bool = True
    weight_decay: float = 0.0
    seed: int = 0

    def check(self) -> None:
        positive = ("rank", "steps", "batch_size", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise JobError(f"recipe.{name} must be at least 1")
        if self.alpha <= 0 or self.learning_rate <= 0:
            raise JobError("recipe.alpha and recipe.learning_rate must be above 0")
        if not 0 <= self.dropout < 1:
            raise JobError("recipe.dropout must be in [0, 1)")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise JobError("recipe.warmup_steps and recipe.weight_decay must not be negative")
        if self.max_length < 8:
            raise JobError("recipe.max_length must be at least 8")


@dataclass(frozen=True)
class Quote:
    """One training or held-out quote."""

    id: int
    quote: str
    author: str


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs; the child reads nothing else (no settings, no DB)."""

    model_dir: str
    out_dir: str
    train: tuple[Quote, ...]
    eval: tuple[Quote, ...]
    system_prompt: str = ""  # "": the chat template's own default, as the bot serves it
    prompt: str = "Say something in this channel's voice."
    init_adapter: str | None = None  # continue training from this PEFT folder
    current_adapter: str | None = None  # the channel's promoted adapter, evaluated for comparison
    recipe: Recipe = field(default_factory=Recipe)
    device: Device = "cpu"
    dtype: Dtype = "auto"
    threads: int | None = None  # CPU threads of the child; None: torch's default
    gpu_memory_fraction: float = 0.5
    sample_prompt: str = "Say something in this channel's voice."
    general_prompts: int = 16

    def __post_init__(self) -> None:
        if not self.model_dir or not self.out_dir:
            raise JobError("model_dir and out_dir must be set")
        if not self.train:
            raise JobError("train holds no quotes")
        if not self.eval:
            raise JobError("eval holds no quotes (the new adapter could not be judged)")
        if any(not q.quote.strip() for q in (*self.train, *self.eval)):
            raise JobError("a quote is empty")
        if self.device not in ("cpu", "cuda"):
            raise JobError(f"device must be 'cpu' or 'cuda', not {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise JobError(f"dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise JobError("threads must be at least 1")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise JobError("gpu_memory_fraction must be above 0 and at most 1")
        if self.general_prompts < 0:
            raise JobError("general_prompts must not be negative")
        self.recipe.check()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        """Parse and check a job file; any problem is one `JobError` line."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobError(f"the job file is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise JobError("the job file must hold a JSON object")
        try:
            values = _typed(cls, data, "")
            values["train"] = _quotes(data.get("train"), "train")
            values["eval"] = _quotes(data.get("eval"), "eval")
            values["recipe"] = Recipe(**_typed(Recipe, data.get("recipe", {}), "recipe."))
            return cls(**values)
        except TypeError as e:  # a missing required field
            raise JobError(f"the job file is incomplete: {e}") from None


# Field types as JSON carries them (annotations are strings under `from __future__`).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "Device": (str,),
    "Dtype": (str,),
}


def _typed(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """The plain (non-nested) fields of `cls` from `data`, type-checked; unknown keys refused."""
    if not isinstance(data, dict):
        raise JobError(f"{prefix.rstrip('.') or 'the job'} must be a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise JobError(f"unknown field {prefix}{unknown[0]} in the job file")
    values: dict[str, Any] = {}
    for name, value in data.items():
        kinds = _JSON_TYPES.get(str(known[name].type))
        if kinds is None:  # nested: handled by the caller
            continue
        bool_ok = bool in kinds
        if not isinstance(value, kinds) or (isinstance(value, bool) and not bool_ok):
            raise JobError(f"{prefix}{name} must be {known[name].type}, not {value!r}")
        values[name] = value
    return values


def _quotes(data: Any, name: str) -> tuple[Quote, ...]:
    if not isinstance(data, list):
        raise JobError(f"{name} must be a list of quotes")
    quotes = []
    for index, item in enumerate(data):
        try:
            quotes.append(Quote(**_typed(Quote, item, f"{name}[{index}].")))
        except TypeError:
            raise JobError(f"{name}[{index}] needs id, quote and author") from None
    return tuple(quotes)


# ---- progress events -------------------------------------------------------------------------

_NUM = (int, float)
_NUM_OR_NULL = (int, float, type(None))  # null: the value was not finite (training diverged)

# Every event's fields and their JSON types; "event" names the kind.
EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "start": {
        "steps": (int,),
        "train_examples": (int,),
        "eval_examples": (int,),
        "device": (str,),
        "dtype": (str,),
    },
    "step": {
        "step": (int,),
        "steps": (int,),
        "loss": _NUM_OR_NULL,
        "lr": _NUM,
        "tokens_per_s": _NUM,
        "eta_s": _NUM,
    },
    "phase": {"phase": (str,)},
    "result": {
        "train_loss": _NUM_OR_NULL,
        "base_loss": _NUM_OR_NULL,
        "current_loss": _NUM_OR_NULL,
        "new_loss": _NUM_OR_NULL,
        "general_base_loss": _NUM_OR_NULL,
        "general_new_loss": _NUM_OR_NULL,
        "eval_examples": (int,),
        "eval_tokens": (int,),
        "samples": (dict,),
        "losses": (list,),
        "diverged": (bool,),
        "seconds": _NUM,
        "tokens_per_s": _NUM,
        "peak_memory_bytes": (int,),
        "out_dir": (str,),
    },
    "error": {"message": (str,)},
    "cancelled": {},
}
SAMPLE_KEYS = ("prompt", "base", "new")


def finite(value: float) -> float | None:
    """A loss as the protocol carries it: None when it is NaN or infinite (not valid JSON)."""
    return value if math.isfinite(value) else None


def _check(event: dict[str, Any]) -> dict[str, Any]:
    kind = event.get("event")
    if kind not in EVENT_FIELDS:
        raise ProtocolError(f"unknown event {kind!r}")
    spec = EVENT_FIELDS[kind]
    extra = set(event) - set(spec) - {"event"}
    if extra:
        raise ProtocolError(f"{kind} event has unknown field {sorted(extra)[0]!r}")
    for name, kinds in spec.items():
        if name not in event:
            raise ProtocolError(f"{kind} event lacks {name!r}")
        value = event[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ProtocolError(f"{kind} event: {name} = {value!r} has the wrong type")
    if kind == "phase" and event["phase"] not in PHASES:
        raise ProtocolError(f"unknown phase {event['phase']!r}")
    if kind == "result":
        samples = event["samples"]
        if set(samples) != set(SAMPLE_KEYS) or not all(
            isinstance(v, str) for v in samples.values()
        ):
            raise ProtocolError(f"result event: samples must map {SAMPLE_KEYS} to text")
        if not all(isinstance(x, _NUM_OR_NULL) for x in event["losses"]):
            raise ProtocolError("result event: losses must be numbers")
    return event


def encode_event(kind: str, **fields_: Any) -> str:
    """One event as its JSON line (no newline), checked like the runner will check it."""
    return json.dumps(_check({"event": kind, **fields_}), allow_nan=False, ensure_ascii=False)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_event(line: str) -> dict[str, Any]:
    """The event on one progress line; `ProtocolError` for anything else (garbage, a library's
    stray print, a truncated line)."""
    try:
        event = json.loads(line, parse_constant=_no_constant)
    except ValueError:  # JSONDecodeError, or NaN/Infinity
        raise ProtocolError(f"not a progress event: {line.strip()[:80]!r}") from None
    if not isinstance(event, dict):
        raise ProtocolError(f"not a progress event: {line.strip()[:80]!r}")
    return _check(event)
