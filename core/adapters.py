"""LoRA adapters on disk: what a served base model requires of one, and the checks.

An adapter version is a plain PEFT folder (`adapter_config.json`, `adapter_model.safetensors`)
that either serving backend reads. This module reads nothing into torch: it parses the config
and the safetensors header (a JSON table of names, dtypes, shapes and byte ranges) and checks
them against the base model's shapes, so the CLI can check an adapter without loading a model.
`core.model.lora` reads the tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import AdapterError
from core.names import shown

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "meta.json"

# The projections the engine serves adapters on: attention's four, as the seed recipe trains.
SERVED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTENTION = "self_attn"
# PEFT's tensor names for a causal LM: base_model.model.model.layers.<i>.self_attn.<t>.lora_A.weight
_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight"
)
# Config fields that change what the adapter computes beyond W + scale * B @ A. Each is refused
# when set, with the reason a user can act on.
_UNSUPPORTED = {
    "use_dora": "it is a DoRA adapter (magnitude vectors), which the adapter slots cannot run",
    "lora_bias": "it trains LoRA biases, which the adapter slots do not hold",
    "fan_in_fan_out": "it was made for Conv1D (GPT-2 style) layers",
    "use_qalora": "it is a QALoRA adapter",
    "use_bdlora": "it is a block-diagonal LoRA adapter",
    "modules_to_save": "it saves whole modules besides LoRA matrices",
    "trainable_token_indices": "it trains embedding rows besides LoRA matrices",
    "target_parameters": "it targets parameters, not linear modules",
    "rank_pattern": "it gives some modules their own rank (rank_pattern)",
    "alpha_pattern": "it gives some modules their own alpha (alpha_pattern)",
    "layer_replication": "it replicates layers",
    "alora_invocation_tokens": "it is an activated LoRA (aLoRA)",
}
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the base model's architecture, layer count, and the
    (in_features, out_features) of every served projection."""

    architecture: str
    layers: int
    modules: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseShapes:
        """From a Hugging Face `config.json` of a Llama-family model."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            layers = int(config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(
                f"the base model's config.json lacks {e}; cannot check adapters"
            ) from None
        return cls(
            architecture=str(config.get("model_type", "?")),
            layers=layers,
            modules={
                "q_proj": (hidden, heads * head_dim),
                "k_proj": (hidden, kv_heads * head_dim),
                "v_proj": (hidden, kv_heads * head_dim),
                "o_proj": (heads * head_dim, hidden),
            },
        )

    @classmethod
    def of_model(cls, model_dir: Path) -> BaseShapes:
        return cls.from_config(_read_json(model_dir / "config.json", "the base model"))

    def digest(self) -> str:
        text = json.dumps(
            [self.architecture, self.layers, sorted(self.modules.items())], sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fingerprint:
    """Which base model an adapter was made on. Architecture, layer shapes and tokenizer must
    match for an adapter to be served; the weights hash is recorded and only warned about, since
    builds of the same model differ between machines."""

    architecture: str
    shapes: str
    tokenizer: str
    weights: str

    @classmethod
    def of_model(cls, model_dir: Path, weights_sha256: str | None = None) -> Fingerprint:
        from core.model.loader import weights_sha256 as hash_weights

        shapes = BaseShapes.of_model(model_dir)
        tokenizer = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
            file = model_dir / name
            if file.is_file():
                tokenizer.update(name.encode() + b"\0" + file.read_bytes())
        return cls(
            architecture=shapes.architecture,
            shapes=shapes.digest(),
            tokenizer=tokenizer.hexdigest()[:16],
            weights=weights_sha256 or hash_weights(model_dir),
        )

    @classmethod
    def from_dict(cls, data: Any) -> Fingerprint | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                **{k: str(data[k]) for k in ("architecture", "shapes", "tokenizer", "weights")}
            )
        except KeyError:
            return None

    def as_dict(self) -> dict[str, str]:
        return {
            "architecture": self.architecture,
            "shapes": self.shapes,
            "tokenizer": self.tokenizer,
            "weights": self.weights,
        }

    def mismatch(self, served: Fingerprint) -> str | None:
        """Why an adapter made on `self` cannot serve on `served`, or None (weights may differ)."""
        for what, mine, theirs in (
            ("architecture", self.architecture, served.architecture),
            ("layer shapes", self.shapes, served.shapes),
            ("tokenizer", self.tokenizer, served.tokenizer),
        ):
            if mine != theirs:
                return (
                    f"it was made for another base model (its {what} differs from the "
                    "served model's)"
                )
        return None


@dataclass(frozen=True)
class AdapterSpec:
    """A checked PEFT LoRA folder: its rank, the scale applied to `B @ A`, and where each
    (layer, projection) pair of matrices sits in its safetensors file."""

    path: Path
    rank: int
    alpha: float
    scale: float
    targets: tuple[str, ...]
    # (layer, projection) -> (name of A [rank, in], name of B [out, rank]) in WEIGHTS_FILE
    tensors: dict[tuple[int, str], tuple[str, str]] = field(repr=False)
    nbytes: int = 0

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{what} has no {file.name} (at {file.parent})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{what}'s {file.name} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{what}'s {file.name} is not a JSON object")
    return data


def safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file's size (a truncated or
    garbled file is refused here, before any tensor is read)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise AdapterError(f"{file.name} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _SAFETENSORS_HEADER_LIMIT):
                raise AdapterError(f"{file.name} is corrupt (its header runs past the file)")
            table = json.loads(handle.read(length))
    except FileNotFoundError:
        raise AdapterError(f"the adapter has no {file.name} (at {file.parent})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file.name} is corrupt (its header cannot be read: {e})") from None
    if not isinstance(table, dict):
        raise AdapterError(f"{file.name} is corrupt (its header is not a table)")
    table.pop("__metadata__", None)
    data = size - 8 - length
    end = 0
    for name, entry in table.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError(
                f"{file.name} is corrupt (entry {shown(name)} is malformed)"
            ) from None
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype)
        if itemsize is None:
            raise AdapterError(f"{file.name} holds {shown(name)} as {dtype}, not a float type")
        count = 1
        for n in shape:
            count *= n
        if not 0 <= start <= stop <= data or stop - start != count * itemsize:
            raise AdapterError(f"{file.name} is corrupt (tensor {shown(name)} is cut short)")
        end = max(end, stop)
    if end != data:
        raise AdapterError(f"{file.name} is corrupt ({data - end} bytes past its last tensor)")
    return table


def inspect_adapter(path: Path, base: BaseShapes, max_rank: int) -> AdapterSpec:
    """Check a PEFT LoRA folder against the served base; returns where its matrices are.

    Raises `AdapterError` with one line for anything the engine cannot serve exactly: another
    PEFT method, a LoRA variant the slots cannot run, modules the engine does not serve, a rank
    above `max_rank`, shapes that do not fit the base, or a corrupt safetensors file.
    """
    config = _read_json(path / CONFIG_FILE, "the adapter")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"the adapter is a {kind} adapter; only LoRA adapters are served")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"the adapter cannot be served: {why}")
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"the adapter's {CONFIG_FILE} has no valid rank (r)") from None
    if rank < 1:
        raise AdapterError(f"the adapter's rank is {rank}; it must be at least 1")
    if rank > max_rank:
        raise AdapterError(
            f"the adapter's rank is {rank}, above the adapter slots' rank {max_rank} "
            "(raise the adapter_max_rank setting to serve it)"
        )
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r; the slots apply either.
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    table = safetensors_header(path / WEIGHTS_FILE)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    unserved: set[str] = set()
    for name in table:
        match = _TENSOR.fullmatch(name)
        if match is None:
            raise AdapterError(
                f"the adapter holds {shown(name)}, which is not a LoRA matrix of a layer"
            )
        layer, block, target, which = int(match[1]), match[2], match[3], match[4]
        if block != _ATTENTION or target not in SERVED_TARGETS:
            unserved.add(target)
            continue
        if layer >= base.layers:
            raise AdapterError(
                f"the adapter has layer {layer}, but the served model has {base.layers} layers"
            )
        pairs.setdefault((layer, target), {})[which] = name
    if unserved:
        raise AdapterError(
            f"the adapter targets {', '.join(sorted(unserved))}, which the engine does not serve "
            f"(it serves {', '.join(SERVED_TARGETS)})"
        )
    if not pairs:
        raise AdapterError("the adapter holds no LoRA matrices")
    tensors: dict[tuple[int, str], tuple[str, str]] = {}
    nbytes = 0
    for (layer, target), found in sorted(pairs.items()):
        if set(found) != {"A", "B"}:
            raise AdapterError(f"the adapter's layer {layer} {target} lacks its lora_A or lora_B")
        a_shape = table[found["A"]]["shape"]
        b_shape = table[found["B"]]["shape"]
        fan_in, fan_out = base.modules[target]
        if a_shape != [rank, fan_in] or b_shape != [fan_out, rank]:
            raise AdapterError(
                f"the adapter does not fit the served model: layer {layer} {target} has "
                f"A {a_shape} and B {b_shape}, the model needs A [{rank}, {fan_in}] and "
                f"B [{fan_out}, {rank}] (it was made for another base model)"
            )
        tensors[(layer, target)] = (found["A"], found["B"])
        nbytes += (fan_in + fan_out) * rank * 4
    targets = tuple(t for t in SERVED_TARGETS if any(t == k[1] for k in tensors))
    return AdapterSpec(path, rank, alpha, scale, targets, tensors, nbytes)
