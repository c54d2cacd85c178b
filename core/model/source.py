"""Resolve the `model` setting into a local folder holding a GPTQ checkpoint.

Three forms: `embedded` (built once from the bundled GGUF, see build.py), a local folder, or a
Hugging Face hub id, taken from the local Hugging Face cache when it is there (works offline)
and downloaded otherwise. Every failure is one `ModelError` line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A local checkpoint folder and where it came from (`embedded`, `folder` or `hub`)."""

    path: Path
    origin: str
    name: str


def read_quantization(path: Path) -> dict[str, Any]:
    """The checkpoint's GPTQ `quantization_config`, or a ModelError saying what is wrong."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json; it is not a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_file} is unreadable: {e}") from e
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise ModelError(
            f"{path} is not a GPTQ checkpoint (config.json has no quantization_config); "
            "quantize it with GPTQModel first or use model = 'embedded'"
        )
    method = str(quant.get("quant_method", "")).lower()
    if method != "gptq":
        raise ModelError(f"{path} is quantized with {method or 'an unknown method'}, not GPTQ")
    return quant


def resolve(model: str, cache_dir: Path, *, retry_build: bool = False) -> ResolvedModel:
    """Turn the `model` setting into a local GPTQ checkpoint folder, building or fetching it."""
    if model == "embedded":
        from core.model.build import ensure_embedded

        path = ensure_embedded(cache_dir, retry=retry_build)
        return ResolvedModel(path, "embedded", "SmolLM2-135M-Instruct (embedded)")
    folder = Path(model).expanduser()
    if folder.is_dir():
        read_quantization(folder)
        return ResolvedModel(folder.resolve(), "folder", folder.name)
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ModelError(f"model {model!r}: no such folder, and not a hub id like 'owner/name'")
    path = _from_hub(model)
    read_quantization(path)
    return ResolvedModel(path, "hub", model)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _from_hub(repo_id: str) -> Path:
    """The hub repo's snapshot from the local cache, else downloaded (with hub progress bars)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception as cached_error:
        if _offline():
            raise ModelError(
                f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from cached_error
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"model {repo_id!r} is neither a local folder nor in the Hugging Face cache, "
            f"and downloading it failed: {reason}"
        ) from e
