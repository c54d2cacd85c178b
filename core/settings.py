"""Typed settings: `loracord.toml`, then `LORACORD_*` environment overrides, validated at start.

`load()` is the only entry point. It returns a frozen `Settings` or raises `SettingsError`
listing every bad field at once, each with where it came from (file or variable).
Secrets (the Discord token) come only from the environment, never from the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import SettingsError

if TYPE_CHECKING:
    from core.model.requests import GenerationParams

ENV_PREFIX = "LORACORD_"
DEFAULT_FILE = "loracord.toml"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
    plugins: tuple[str, ...] = ("ask", "admin", "quotes")
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


class Settings(_Section):
    """Everything loracord reads at start. Paths are absolute after validation."""

    model: str = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    kernel: str = "auto"
    embedded_group_size: Literal[32, 64] = 32
    threads: int | None = Field(default=None, ge=1)

    data_dir: Path = Field(default_factory=_default_data_dir)
    adapters_dir: Path = PROJECT_ROOT / "adapters"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # None: the SQLite file data_dir/loracord.db. Or any SQLAlchemy URL, e.g.
    # postgresql+psycopg://user:password@host/db (keep passwords in LORACORD_DATABASE_URL).
    database_url: str | None = None

    system_prompt: str = (
        "You are loracord, a friendly assistant in a Discord server. Answer briefly and helpfully."
    )
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, ge=1.0, le=2.0)
    max_new_tokens: int = Field(default=200, ge=1)
    max_new_tokens_cap: int = Field(default=1024, ge=1)
    max_context_tokens: int = Field(default=2048, ge=64)
    queue_size: int = Field(default=16, ge=1)

    discord: DiscordSettings = DiscordSettings()
    quotes: QuoteSettings = QuoteSettings()

    @field_validator("data_dir", "adapters_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

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

        A token budget above `max_new_tokens_cap` is lowered to it; a bad value raises
        `PromptError` here, before any model work.
        """
        from core.model.requests import GenerationParams

        wanted = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return GenerationParams(
            max_new_tokens=wanted if wanted < 1 else min(wanted, self.max_new_tokens_cap),
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )

    @model_validator(mode="after")
    def _default_within_cap(self) -> Settings:
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) is above max_new_tokens_cap "
                f"({self.max_new_tokens_cap})"
            )
        return self


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Map `LORACORD_X` / `LORACORD_DISCORD_X` and `DISCORD_TOKEN` onto settings keys."""
    values: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    sections = {
        name: field.annotation
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
    }
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        if var.startswith(f"{ENV_PREFIX}TEST_"):  # reserved for the test suite, never a setting
            continue
        key = var[len(ENV_PREFIX) :].lower()
        placed = False
        for section, model in sections.items():
            prefix = section + "_"
            if key.startswith(prefix) and key[len(prefix) :] in model.model_fields:
                sub = key[len(prefix) :]
                values.setdefault(section, {})[sub] = _parse_env(raw, model.model_fields[sub])
                origin[(section, sub)] = var
                placed = True
        if not placed and key in Settings.model_fields and key not in sections:
            values[key] = _parse_env(raw, Settings.model_fields[key])
            origin[(key,)] = var
        elif not placed:
            values.setdefault("__unknown_env__", []).append(var)
    token = environ.get("DISCORD_TOKEN", "").strip()
    if token:
        values.setdefault("discord", {})["token"] = token
    return values, origin


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
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise SettingsError([f"settings file {path} does not exist"]) from e
    except tomllib.TOMLDecodeError as e:
        raise SettingsError([f"{path} is not valid TOML: {e}"]) from e
    if "token" in data.get("discord", {}):
        raise SettingsError(
            [f"{path}: discord.token must not be in the file; set DISCORD_TOKEN in the environment"]
        )
    return data


def _resolve_path(path: str | Path | None, environ: dict[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(environ[f"{ENV_PREFIX}CONFIG"])
    local = Path.cwd() / DEFAULT_FILE
    return local if local.is_file() else None


def load(
    path: str | Path | None = None, *, environ: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read the settings file (or defaults), apply environment and keyword overrides, validate."""
    env = dict(os.environ if environ is None else environ)
    file_path = _resolve_path(path, env)
    source = str(file_path) if file_path else "settings"
    data = _read_file(file_path) if file_path else {}
    env_values, origin = _env_overrides(env)
    unknown_env = env_values.pop("__unknown_env__", [])
    merged = _merge(_merge(data, env_values), overrides)
    problems = [f"{var}: no such setting" for var in sorted(unknown_env)]
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            where = origin.get(loc, ".".join(loc) or source)
            got = f" (got {err['input']!r})" if "input" in err and loc else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}{got}")
        raise SettingsError(problems, source) from e
    if problems:
        raise SettingsError(problems, source)
    return settings
