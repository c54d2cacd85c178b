"""Typed settings: `loracord.toml`, then `LORACORD_*` environment overrides, validated at start.

`load()` is the only entry point. It returns a frozen `Settings` or raises `SettingsError`
listing every bad field at once, each with where it came from (file or variable).
Secrets (the Discord token) come only from the environment, never from the file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import SettingsError
from core.model.requests import DEFAULT_SYSTEM_PROMPT, GenerationParams

ENV_PREFIX = "LORACORD_"
DEFAULT_FILE = "loracord.toml"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKEN_VARIABLE = "DISCORD_TOKEN"

# A key named like this holds (or was meant to hold) a secret: its value is never echoed back.
# "tokens" is excluded so that max_new_tokens and friends still show what was given.
_SECRET_NAME = re.compile(r"token(?!s)|secret|passw|credential|key", re.IGNORECASE)
# Settings whose value may embed a secret (a password in a database URL): never echoed either.
_NEVER_ECHOED = frozenset({"database_url", "token"})
_TOKEN_HINT = (
    f"it looks like a secret: the Discord token belongs in the {TOKEN_VARIABLE} environment "
    "variable, never in a file or another variable (the value is not shown)"
)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loracord"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loracord"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DiscordSettings(_Section):
    """How the bot behaves on Discord. The token is read from `DISCORD_TOKEN` only."""

    token: str | None = Field(default=None, exclude=True, repr=False)
    dev_guild: int | None = None
    plugins: tuple[str, ...] = ("ask", "admin", "quotes", "adapters", "training")
    admin_role_ids: tuple[int, ...] = ()
    admin_user_ids: tuple[int, ...] = ()
    message_content_intent: bool = False
    dm_policy: Literal["base", "refuse"] = "base"
    answer_on_mention: bool = False
    reply_chain_limit: int = Field(default=8, ge=1, le=50)
    cooldown_seconds: float = Field(default=5.0, ge=0)
    edit_interval_seconds: float = Field(default=1.0, ge=0.2)


class QuoteSettings(_Section):
    """Quote collection: the star reaction, limits against floods, the training split."""

    star_emoji: str = "⭐"
    star_threshold: int = Field(default=1, ge=1)
    max_chars: int = Field(default=1000, ge=20, le=100_000)
    daily_cap: int = Field(default=50, ge=1)
    eval_percent: int = Field(default=10, ge=0, le=50)


class TrainingSettings(_Section):
    """Fine-tuning a channel's adapter: the recipe, when it is promoted, and the nightly run.

    The recipe's defaults are the seed's: LoRA r=8, alpha=32, dropout 0.05 on q/k/v/o, lr 2e-4
    with warmup. The base model trains in the device's mixed precision; the LoRA weights and
    the optimizer state stay fp32.
    """

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    warmup_steps: int = Field(default=2, ge=0)
    # Optimizer steps per run (the step budget); each step sees batch_size x grad_accum examples.
    steps: int = Field(default=40, ge=1, le=100_000)
    batch_size: int = Field(default=4, ge=1, le=256)
    grad_accum: int = Field(default=1, ge=1, le=256)
    # Longer training examples (system prompt, user turn and quote) are cut to this many tokens.
    max_length: int = Field(default=256, ge=32, le=8192)
    gradient_checkpointing: bool = True
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    # "current": continue from the channel's promoted adapter; "scratch": a new LoRA each run.
    # A channel marked for retraining (a quote it was trained on is gone) always starts anew.
    start_from: Literal["current", "scratch"] = "current"
    # The user turn before each quote in the training chats (what /ask's users type).
    prompt: str = "Say something in this channel's voice."
    # Asked of the base model and the new adapter for the result message.
    sample_prompt: str = "Say something in this channel's voice."
    # CPU threads of the trainer process (the bot keeps the rest for answering); None: half
    # of the cores, at least one.
    threads: int | None = Field(default=None, ge=1)
    # How much lower the trainer's CPU priority is than the bot's (0-19): at 19 the answers
    # served during a training start as fast as when idle (BENCHMARKS.md, 2 cores).
    nice: int = Field(default=19, ge=0, le=19)
    # CUDA: the share of the GPU's memory the trainer process may take beside the bot.
    gpu_memory_fraction: float = Field(default=0.5, gt=0.0, le=1.0)

    # Promotion: the new adapter's held-out loss must beat the current one's (the base model's
    # when the channel has none) by this relative margin, on at least min_eval_quotes quotes,
    # and its loss on general chat prompts may rise at most general_tolerance over the base's.
    promote_margin: float = Field(default=0.02, ge=0.0, lt=1.0)
    min_eval_quotes: int = Field(default=2, ge=1)
    general_tolerance: float = Field(default=0.25, ge=0.0)

    # The nightly run: a cron time and timezone, channels with auto-train on that have at
    # least min_new_quotes since their last run (or are marked for retraining), stalest first,
    # within night_budget_minutes. A night missed while the bot was down runs once at start
    # if it is less than misfire_grace_hours late.
    nightly: bool = True
    nightly_time: str = "03:00"
    timezone: str = "UTC"
    min_new_quotes: int = Field(default=5, ge=1)
    night_budget_minutes: float = Field(default=120.0, gt=0)
    misfire_grace_hours: float = Field(default=36.0, ge=24.0)
    # One training at a time across processes: a lock in the database whose lease the holder
    # renews; a holder that died loses it after lease_seconds.
    lease_seconds: float = Field(default=60.0, ge=5.0)
    # Post the result of a nightly run in the trained channel.
    announce: bool = False

    @field_validator("nightly_time")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        match = re.fullmatch(r"\s*([01]?\d|2[0-3]):([0-5]\d)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a time of day as HH:MM (e.g. 03:00)")
        return f"{int(match[1]):02d}:{match[2]}"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a known time zone (e.g. UTC, Europe/Paris)"
            ) from None
        return value.strip()


class Settings(_Section):
    """Everything loracord reads at start. Paths are absolute after validation."""

    model: str = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    kernel: str = "auto"
    threads: int | None = Field(default=None, ge=1)

    data_dir: Path = Field(default_factory=_default_data_dir)
    adapters_dir: Path = PROJECT_ROOT / "adapters"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: the SQLite file data_dir/loracord.db. Or any SQLAlchemy URL, e.g.
    # postgresql+psycopg://user:password@host/db (keep passwords in LORACORD_DATABASE_URL).
    database_url: str | None = None

    # "" = the model's own default system prompt (see DEFAULT_SYSTEM_PROMPT).
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    # 1.2 ended the loops of the embedded model (BENCHMARKS.md, "Answer defaults").
    repetition_penalty: float = Field(default=1.2, ge=1.0, le=2.0)
    max_new_tokens: int = Field(default=200, ge=1)
    max_new_tokens_cap: int = Field(default=1024, ge=1)
    max_context_tokens: int = Field(default=2048, ge=64)
    # Requests answered together: each holds one row of max_context_tokens in the KV cache.
    batch_rows: int = Field(default=8, ge=1, le=256)
    # Prompt tokens read per engine step, so a long prompt does not stall the answers decoding.
    prefill_tokens_per_step: int = Field(default=256, ge=16)
    # Decode steps through loracord's fused step (and CUDA graphs on a GPU); false runs every
    # step through the model's own modules: slower, the same tokens (for comparison).
    fast_decode: bool = True
    # CUDA: the share of the GPU's memory the bot may take (weights, KV cache, adapter slots
    # and a step's work); the nightly trainer takes training.gpu_memory_fraction beside it.
    gpu_memory_fraction: float = Field(default=0.45, gt=0.0, le=1.0)
    queue_size: int = Field(default=16, ge=1)
    # LoRA adapters resident in the engine's slots at once (the base model needs none); others
    # wait in a CPU-side cache of adapter_cache_size and load into a slot on use.
    adapter_slots: int = Field(default=4, ge=1, le=256)
    # The highest LoRA rank the slots hold; an adapter of higher rank is refused.
    adapter_max_rank: int = Field(default=16, ge=1, le=256)
    adapter_cache_size: int = Field(default=16, ge=1)
    # Versions kept per adapter name; older ones are deleted unless pinned, promoted or in use.
    adapter_versions_kept: int = Field(default=5, ge=1)

    discord: DiscordSettings = DiscordSettings()
    quotes: QuoteSettings = QuoteSettings()
    training: TrainingSettings = TrainingSettings()

    @field_validator("data_dir", "adapters_dir", "cache_dir", mode="before")
    @classmethod
    def _path_not_empty(cls, value: Any) -> Any:
        # Path("") is the current directory: an empty value is a mistake, not a choice.
        if isinstance(value, str | Path) and not str(value).strip():
            raise ValueError("must not be empty; leave it unset for the default")
        return value

    @field_validator("data_dir", "adapters_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str | None) -> str | None:
        return None if value is None else check_database_url(value)

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model: 'embedded', a local folder or a hub id")
        return value.strip()

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, value: str) -> str:
        from core.model.kernels import KNOWN_KERNELS

        value = value.strip().lower()
        if value not in KNOWN_KERNELS:
            raise ValueError(f"unknown kernel {value!r}; one of: {', '.join(KNOWN_KERNELS)}")
        return value

    def generation_params(
        self, *, max_new_tokens: int | None = None, temperature: float | None = None
    ) -> GenerationParams:
        """The sampling every front uses: the settings' defaults, with what the user asked for.

        A bad value raises `PromptError` here, before any model work. The token budget is
        capped by the engine (`max_new_tokens_cap`), which tells the user in a notice.
        """
        return GenerationParams(
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )

    @model_validator(mode="after")
    def _gpu_shares_fit(self) -> Settings:
        bot, trainer = self.gpu_memory_fraction, self.training.gpu_memory_fraction
        if bot + trainer > 1.0 + 1e-9:
            raise ValueError(
                f"gpu_memory_fraction ({bot:g}, the bot) and training.gpu_memory_fraction "
                f"({trainer:g}, the trainer beside it) add up to more than the whole GPU; "
                "lower one so they sum to at most 1"
            )
        return self

    @model_validator(mode="after")
    def _default_within_cap(self) -> Settings:
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) is above max_new_tokens_cap "
                f"({self.max_new_tokens_cap})"
            )
        return self


def check_database_url(value: str) -> str:
    """A SQLAlchemy URL with a usable port, or `ValueError` with a message that never repeats
    the URL (it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    text = value.strip()
    if not text:
        raise ValueError("must not be empty; leave it unset for the SQLite file in data_dir")
    try:
        port = make_url(text).port
    except ArgumentError:
        raise ValueError(
            "is not a database URL (e.g. postgresql+psycopg://user@host:5432/loracord)"
        ) from None
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"has port {port}; a port is a number from 1 to 65535")
    return text


def _looks_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) or name in _NEVER_ECHOED


def _looks_like_token(value: Any) -> bool:
    # A Discord bot token has three dot-separated base64 parts; hide it whatever its key.
    return isinstance(value, str) and bool(re.search(r"[\w-]{20,}\.[\w-]{5,}\.[\w-]{20,}", value))


def _sections() -> dict[str, type[_Section]]:
    return {
        name: field.annotation
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
    }


def _env_key(key: str) -> tuple[str, ...] | None:
    """Where `LORACORD_<KEY>` goes in the settings, or None when it is no setting."""
    sections = _sections()
    for section, model in sections.items():
        sub = key.removeprefix(section + "_")
        if sub != key and sub in model.model_fields and (section, sub) != ("discord", "token"):
            return (section, sub)
    return (key,) if key in Settings.model_fields and key not in sections else None


def _env_overrides(
    environ: dict[str, str],
) -> tuple[dict[str, Any], dict[tuple[str, ...], str], list[str]]:
    """Map `LORACORD_X` / `LORACORD_DISCORD_X` and `DISCORD_TOKEN` onto settings keys.

    Returns the values, which variable each came from, and the problems (unknown variables).
    """
    values: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        if var.startswith(f"{ENV_PREFIX}TEST_"):  # reserved for the test suite, never a setting
            continue
        key = var[len(ENV_PREFIX) :].lower()
        loc = _env_key(key)
        if loc is None:
            hint = _TOKEN_HINT if _looks_secret(key) else "no such setting"
            problems.append(f"environment variable {var}: {hint}")
            continue
        model: type[_Section] = _sections()[loc[0]] if len(loc) == 2 else Settings
        target = values.setdefault(loc[0], {}) if len(loc) == 2 else values
        target[loc[-1]] = _parse_env(raw, model.model_fields[loc[-1]])
        origin[loc] = var
    token = environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        values.setdefault("discord", {})["token"] = token
    return values, origin, problems


def _is_list_field(field: Any) -> bool:
    import typing

    annotation = field.annotation
    return typing.get_origin(annotation) in (list, tuple, set, frozenset) or any(
        typing.get_origin(arg) in (list, tuple, set, frozenset)
        for arg in typing.get_args(annotation)
    )


def _parse_env(raw: str, field: Any = None) -> Any:
    """Env values are strings; list settings may be JSON (`[1,2]`) or comma-separated (`1,2`).

    Other settings take the text as it is, so a database URL with a comma stays one string.
    """
    text = raw.strip()
    if field is not None and not _is_list_field(field):
        return text
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_file(path: Path) -> dict[str, Any]:
    """The parsed TOML file; anything that stops reading it is one `SettingsError` line."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problem = "does not exist"
    except IsADirectoryError:
        problem = "is a directory, not a file"
    except PermissionError:
        problem = "cannot be read: permission denied"
    except OSError as e:
        problem = f"cannot be read: {e.strerror or type(e).__name__}"
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text (bad byte at offset {e.start})"
    except tomllib.TOMLDecodeError as e:
        problem = f"is not valid TOML: {e}"
    raise SettingsError([f"settings file {path} {problem}"])


def _drop_secrets(data: dict[str, Any], where: str, prefix: str = "") -> list[str]:
    """Remove keys that look like secrets from the file's data; one problem for each.

    They are never valid in the file (the token comes from the environment), and removing them
    keeps their values out of the validation errors.
    """
    problems: list[str] = []
    for key in list(data):
        dotted = prefix + key
        model = _sections().get(prefix[:-1]) if prefix else Settings
        known = model is not None and key in model.model_fields
        if _SECRET_NAME.search(key) and (not known or dotted == "discord.token"):
            problems.append(f"{where}: {dotted}: {_TOKEN_HINT}")
            del data[key]
        elif isinstance(data[key], dict):
            problems += _drop_secrets(data[key], where, dotted + ".")
    return problems


def _has(data: dict[str, Any], loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _describe(
    err: Any, origin: dict[tuple[str, ...], str], file_data: dict[str, Any], file_name: str
) -> str:
    """One validation error as `where: what (got value)`, never showing a secret."""
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    if loc in origin:
        where = f"environment variable {origin[loc]}"
    elif loc and _has(file_data, loc):
        where = f"{file_name}: {dotted}"
    else:
        where = dotted or "settings"
    unknown = err["type"] == "extra_forbidden"
    msg = "not a setting" if unknown else err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = loc and not unknown and "input" in err
    if shown and not any(_looks_secret(part) for part in loc) and not _looks_like_token(value):
        msg += f" (got {value!r})"
    return f"{where}: {msg}"


def _resolve_path(path: str | Path | None, environ: dict[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    variable = f"{ENV_PREFIX}CONFIG"
    if variable in environ:
        if not environ[variable].strip():  # not silently ./loracord.toml or the defaults
            raise SettingsError(
                [
                    f"environment variable {variable}: must not be empty; leave it unset for "
                    f"./{DEFAULT_FILE}"
                ]
            )
        return Path(environ[variable])
    local = Path.cwd() / DEFAULT_FILE
    return local if local.is_file() else None


def load(
    path: str | Path | None = None, *, environ: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read the settings file (or defaults), apply environment and keyword overrides, validate.

    Every problem is collected, each naming where it came from (the file, an environment
    variable, or a keyword), and raised together as one `SettingsError`.
    """
    env = dict(os.environ if environ is None else environ)
    file_path = _resolve_path(path, env)
    data = _read_file(file_path) if file_path else {}
    problems = _drop_secrets(data, str(file_path)) if file_path else []
    env_values, origin, env_problems = _env_overrides(env)
    problems += env_problems
    merged = _merge(_merge(data, env_values), overrides)
    for loc in list(origin):  # a keyword override wins over the variable it replaces
        if _has(overrides, loc):
            del origin[loc]
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as e:
        problems += [_describe(err, origin, data, str(file_path)) for err in e.errors()]
        # `from None`: the pydantic error holds the raw values, secrets included.
        raise SettingsError(problems) from None
    if problems:
        raise SettingsError(problems)
    return settings
