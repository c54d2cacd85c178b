"""LoRA adapters on disk: what a served base model requires of one, and the checks.

An adapter version is a plain PEFT folder (`adapter_config.json`, `adapter_model.safetensors`)
that either serving backend reads. This module reads nothing into torch: it parses the config
and the safetensors header (a JSON table of names, dtypes, shapes and byte ranges) and checks
them against the base model's shapes, so the CLI can check an adapter without loading a model.
`core.model.lora` reads the tensors themselves.

`Registry` keeps the versions: `adapters_dir/<name>/v<N>/` holds the PEFT files and meta.json
(never changed once written), `adapters_dir/<name>/state.json` the owner, the promoted version,
the promotion history and the rejected versions. The CLI and a running bot may change it at the
same time: see `Registry` for the locking and the atomic writes.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


# -- the versioned registry -----------------------------------------------------------------------
#
# adapters_dir/<name>/state.json      {"server", "promoted", "history", "rejected", "last_version"}
# adapters_dir/<name>/.lock           flock'd around every change of the name
# adapters_dir/<name>/v<N>/           adapter_config.json, adapter_model.safetensors, meta.json
# adapters_dir/<name>/.tmp-*          a version being written or deleted (never listed)

BASE_NAME = "base"
"""Not an adapter name: `base` means the base model, no adapter."""
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
_DELETED_PREFIX = TMP_PREFIX + "deleted-"
_STALE_SECONDS = 3600.0
CURVE_FILE = "loss_curve.png"
_COPIED = (CONFIG_FILE, WEIGHTS_FILE)
# Copied with a version when the source has them (a training's loss curve); hashed like the rest.
_OPTIONAL = (CURVE_FILE,)
_SOURCES = ("import", "training")
# Keys of meta.json the registry sets; a caller's meta may not override them.
_COMPUTED_META = frozenset(
    {
        "name",
        "version",
        "server",
        "created_at",
        "fingerprint",
        "files",
        "rank",
        "alpha",
        "scale",
        "targets",
        "source",
    }
)
# ASCII only: `\w` would let in look-alike letters and zero-width joiners.
_ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_VERSION_NAME = re.compile(r"v([1-9][0-9]{0,8})", re.ASCII)
_NAME_RULE = "use 1-64 lowercase letters, digits, '-' and '_' (starting with a letter or digit)"

log = logging.getLogger(__name__)


def adapter_name(value: str) -> str:
    """An adapter name as the registry keys it: `[a-z0-9][a-z0-9_-]{0,63}`, ASCII.

    Surrounding spaces are dropped and letters lowercased (as `core.names.channel_name` does);
    `base` is reserved (it means "no adapter"). Anything else raises `AdapterError`.
    """
    if not isinstance(value, str):
        raise AdapterError(f"{shown(repr(value))} is not an adapter name: {_NAME_RULE}")
    name = value.strip()
    # Checked before lowercasing: "\u212a".lower() is an ASCII "k" (the Kelvin sign).
    if name.isascii():
        name = name.lower()
        if name == BASE_NAME:
            raise AdapterError(
                f"{shown(value)} is reserved (it means the base model, no adapter); "
                "choose another adapter name"
            )
        if _ADAPTER_NAME.fullmatch(name):
            return name
    raise AdapterError(f"{shown(value)} is not an adapter name: {_NAME_RULE}")


def adapter_version(value: str) -> str:
    """A version as the registry names it: `v1`, `v2`, ... (no leading zeros)."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if text.isascii() and _VERSION_NAME.fullmatch(text):
        return text
    raise AdapterError(f"{shown(str(value))} is not a version: versions are v1, v2, v3, ...")


def parse_ref(value: str) -> tuple[str, str | None]:
    """`name` or `name@v3` as (name, version or None). The name is checked as `adapter_name`
    does, except that `base` passes through (the caller decides what "no adapter" means)."""
    name, at, version = value.partition("@")
    name = name.strip()
    if not (name.isascii() and name.lower() == BASE_NAME):
        name = adapter_name(name)
    name = name.lower()
    if not at:
        return name, None
    if not version.strip():
        raise AdapterError(f"{shown(value)} has no version after '@' (e.g. {name}@v1)")
    return name, adapter_version(version)


def slugify(channel: str) -> str:
    """A valid adapter name made from a channel name (`#Général chat` -> `general-chat`).

    Accents are dropped, other characters become `-`, and the result is cut to 64 characters;
    a name that would be empty gets a stable `channel-<hash>`, and `base` becomes `base-channel`.
    """
    text = unicodedata.normalize("NFKD", channel).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_")[:64].rstrip("-_")
    if not slug:
        slug = "channel-" + hashlib.sha256(channel.encode()).hexdigest()[:8]
    elif slug == BASE_NAME:
        slug = "base-channel"
    return adapter_name(slug)


def _server(value: str) -> str:
    from core.errors import InvalidName
    from core.names import server_name

    try:
        return server_name(value)
    except InvalidName as e:
        raise AdapterError(str(e)) from None


def _number(version: str) -> int:
    return int(version[1:])


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter name: its owner, its versions (oldest first), the promoted one, the rejected
    ones with why, and every version promoted, in order."""

    name: str
    server: str
    versions: tuple[str, ...]
    promoted: str | None
    rejected: dict[str, str]
    history: tuple[str, ...]


@dataclass(frozen=True)
class VersionInfo:
    """A version as `publish` saved it: where it lies and its meta.json."""

    name: str
    version: str
    server: str
    path: Path
    promoted: bool
    meta: dict[str, Any] = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class _State:
    server: str
    promoted: str | None = None
    history: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    last_version: int = 0

    @classmethod
    def parse(cls, data: Any) -> _State:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        server, promoted = data.get("server"), data.get("promoted")
        history, rejected = data.get("history", []), data.get("rejected", {})
        last = data.get("last_version", 0)
        if not isinstance(server, str) or not server:
            raise ValueError("no server")
        if promoted is not None and not (
            isinstance(promoted, str) and _VERSION_NAME.fullmatch(promoted)
        ):
            raise ValueError("promoted is not a version")
        if not isinstance(history, list) or not all(
            isinstance(v, str) and _VERSION_NAME.fullmatch(v) for v in history
        ):
            raise ValueError("history is not a list of versions")
        if not isinstance(rejected, dict) or not all(
            isinstance(v, str) and _VERSION_NAME.fullmatch(v) and isinstance(r, str)
            for v, r in rejected.items()
        ):
            raise ValueError("rejected is not a table of versions and reasons")
        if not isinstance(last, int) or isinstance(last, bool) or last < 0:
            raise ValueError("last_version is not a number")
        return cls(server, promoted, list(history), dict(rejected), last)

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "promoted": self.promoted,
            "history": self.history,
            "rejected": self.rejected,
            "last_version": self.last_version,
        }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_json(file: Path, data: Any) -> None:
    with open(file, "x", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace_json(file: Path, data: Any) -> None:
    """Write `file` atomically: a temp file in the same folder, fsync, `os.replace`."""
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "state-", suffix=".json", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, 0o644)
        os.replace(name, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    _fsync_dir(file.parent)


def _copy_hashed(source: Path, target: Path) -> str:
    """Copy `source` to the new file `target` (fsynced); returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while block := reader.read(1 << 20):
            digest.update(block)
            writer.write(block)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Registry:
    """Versioned LoRA adapters in `root` (the `adapters_dir` setting), safe to change from
    several processes at once (the CLI and a running bot).

    Each name is owned by one server and holds versions `v1`, `v2`, ... that never change once
    written (meta.json records the sha256 of each file; `check` refuses a changed one) and are
    never renumbered: a deleted version's number is not given again. `state.json` holds what
    changes: the owner, the promoted version, the promotion history and the rejected versions.
    Every change of it happens under an exclusive `flock` on the name's `.lock` and is written
    atomically; readers take no lock and see the old or the new state, never a half-written one.
    A version folder appears by one `rename` of a fully written `.tmp-*` folder; a crash leaves
    only the `.tmp-*` folder, which nothing lists and `clean_stale` removes.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_versions: int = 5,
        max_rank: int = 16,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.root = Path(root).expanduser().resolve()
        self.keep_versions = keep_versions
        self.max_rank = max_rank
        self._clock = clock

    # -- paths ------------------------------------------------------------------------------
    def _contained(self, path: Path, what: str) -> Path:
        """`path` (a direct child of a folder in the registry) if it is no symbolic link and
        stays inside the registry's folder; else `AdapterError`."""
        resolved = path.resolve()
        if resolved != path or path.is_symlink():
            where = (
                "inside" if resolved.is_relative_to(self.root) else "outside the adapters folder"
            )
            raise AdapterError(
                f"{what} is a symbolic link (leading {where}); the registry refuses links"
            )
        return path

    def _name_dir(self, name: str) -> Path:
        name = adapter_name(name)
        return self._contained(self.root / name, f"adapter {name}")

    def _existing(self, name: str) -> tuple[str, Path]:
        name = adapter_name(name)
        folder = self._name_dir(name)
        if not (folder / STATE_FILE).is_file():
            raise AdapterError(f"no adapter named {name}")
        return name, folder

    @staticmethod
    def _versions(folder: Path) -> list[str]:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        found = [
            e.name
            for e in entries
            if _VERSION_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]
        return sorted(found, key=_number)

    def _read_state(self, folder: Path, name: str) -> _State | None:
        try:
            text = (folder / STATE_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise AdapterError(f"adapter {name}'s {STATE_FILE} cannot be read: {e}") from None
        try:
            return _State.parse(json.loads(text))
        except (ValueError, json.JSONDecodeError) as e:
            raise AdapterError(
                f"adapter {name}'s {STATE_FILE} is corrupt ({e}); fix or remove it"
            ) from None

    def _state(self, folder: Path, name: str) -> _State:
        state = self._read_state(folder, name)
        if state is None:
            raise AdapterError(f"no adapter named {name}")
        return state

    def _write_state(self, folder: Path, state: _State) -> None:
        try:
            _replace_json(folder / STATE_FILE, state.as_dict())
        except OSError as e:
            raise AdapterError(f"cannot save the adapter's {STATE_FILE}: {e}") from None

    @contextlib.contextmanager
    def _lock(self, folder: Path) -> Iterator[None]:
        """Hold the exclusive lock of one adapter name (across processes and threads)."""
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:
            raise AdapterError(f"no adapter named {folder.name}") from None
        except OSError as e:
            raise AdapterError(f"cannot lock adapter {folder.name}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _info(self, name: str, folder: Path, state: _State) -> AdapterInfo:
        return AdapterInfo(
            name=name,
            server=state.server,
            versions=tuple(self._versions(folder)),
            promoted=state.promoted,
            rejected=dict(state.rejected),
            history=tuple(state.history),
        )

    # -- reading ----------------------------------------------------------------------------
    def list(self, server: str | None = None) -> builtins.list[AdapterInfo]:
        """Every adapter (of `server` only, when given), by name. A name whose state.json is
        corrupt is left out with a warning, so one bad folder does not hide the others."""
        wanted = None if server is None else _server(server)
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        infos = []
        for entry in entries:
            if not _ADAPTER_NAME.fullmatch(entry.name) or entry.name == BASE_NAME:
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            folder = self.root / entry.name
            try:
                state = self._read_state(folder, entry.name)
            except AdapterError as e:
                log.warning("%s", e)
                continue
            if state is None or (wanted is not None and state.server != wanted):
                continue
            infos.append(self._info(entry.name, folder, state))
        return infos

    def info(self, name: str) -> AdapterInfo:
        """One adapter; `AdapterError` "no adapter named x" when there is none."""
        name, folder = self._existing(name)
        return self._info(name, folder, self._state(folder, name))

    def version_dir(self, name: str, version: str) -> Path:
        """The folder of an existing version."""
        name, folder = self._existing(name)
        version = adapter_version(version)
        path = self._contained(folder / version, f"{name}@{version}")
        if not path.is_dir():
            raise AdapterError(f"adapter {name} has no version {version}")
        return path

    def meta(self, name: str, version: str) -> dict[str, Any]:
        """A version's meta.json."""
        path = self.version_dir(name, version)
        version = path.name
        file = path / META_FILE
        if not file.is_file() or file.is_symlink():
            raise AdapterError(f"adapter {path.parent.name}@{version} is corrupt: no {META_FILE}")
        return _read_json(file, f"adapter {path.parent.name}@{version}")

    def check(
        self, name: str, version: str, shapes: BaseShapes, fingerprint: Fingerprint
    ) -> AdapterSpec:
        """The full check before a version is served on the base model `shapes`/`fingerprint`.

        Its files must be those meta.json recorded (sha256), it must have been made on the
        same architecture, layer shapes and tokenizer (a different weights hash is only logged
        as a warning: builds of one model differ between machines), and `inspect_adapter` must
        accept it. Returns its spec; raises `AdapterError` with the reason otherwise.
        """
        path = self.version_dir(name, version)
        name, version = path.parent.name, path.name
        ref = f"{name}@{version}"
        meta = self.meta(name, version)
        if meta.get("name") != name or meta.get("version") != version:
            raise AdapterError(f"adapter {ref} is corrupt: its {META_FILE} names another version")
        files = meta.get("files")
        if not isinstance(files, dict) or not set(_COPIED) <= set(files) <= {*_COPIED, *_OPTIONAL}:
            raise AdapterError(f"adapter {ref} is corrupt: its {META_FILE} lists no file hashes")
        for file in _COPIED:
            try:
                digest = _sha256(path / file)
            except FileNotFoundError:
                raise AdapterError(f"adapter {ref} is corrupt: {file} is missing") from None
            except OSError as e:
                raise AdapterError(
                    f"adapter {ref} is corrupt: {file} cannot be read ({e})"
                ) from None
            if digest != files[file]:
                raise AdapterError(f"adapter {ref} is corrupt: {file} changed since it was saved")
        made_on = Fingerprint.from_dict(meta.get("fingerprint"))
        if made_on is None:
            raise AdapterError(f"adapter {ref} is corrupt: its {META_FILE} has no fingerprint")
        reason = made_on.mismatch(fingerprint)
        if reason is not None:
            raise AdapterError(f"adapter {ref} cannot be served: {reason}")
        if made_on.weights != fingerprint.weights:
            log.warning(
                "adapter %s was made on other weights of the served model (%s, served %s); "
                "serving it anyway",
                ref,
                made_on.weights[:12],
                fingerprint.weights[:12],
            )
        try:
            return inspect_adapter(path, shapes, self.max_rank)
        except AdapterError as e:
            raise AdapterError(f"adapter {ref}: {e}") from None

    def fits(
        self, name: str, version: str, shapes: BaseShapes, fingerprint: Fingerprint
    ) -> str | None:
        """Why the version cannot be served (what `check` refuses it for), or None."""
        try:
            self.check(name, version, shapes, fingerprint)
        except AdapterError as e:
            return str(e)
        return None

    def state_stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        """(name, mtime_ns, size, inode) of every state.json: cheap (one listing and a stat
        per name) for a running bot to poll every few seconds. Every change of the registry
        (publish, promote, rollback, prune, delete) rewrites its name's state.json by
        `os.replace`, which gives it a new inode, so the stamp changes even when two writes
        fall within one mtime tick."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return ()
        stamp = []
        for entry in entries:
            if not _ADAPTER_NAME.fullmatch(entry.name):
                continue
            try:
                st = os.stat(self.root / entry.name / STATE_FILE, follow_symlinks=False)
            except OSError:
                continue
            stamp.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(stamp))

    # -- writing ----------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        server: str,
        source_dir: Path,
        shapes: BaseShapes,
        fingerprint: Fingerprint,
        *,
        meta: dict[str, Any] | None = None,
        promote: bool = False,
        source: str = "training",
    ) -> VersionInfo:
        """Save the PEFT folder `source_dir` as the next version of `name`, owned by `server`.

        `shapes` and `fingerprint` are the served base model's (the caller computes them once).
        The folder is checked with `inspect_adapter` before anything is written; only
        adapter_config.json and adapter_model.safetensors (and loss_curve.png, when there is
        one) are copied, and meta.json is written with them. `meta` adds the caller's keys
        (`dataset` {"hash", "size"}, `train_loss`, `eval_loss`, `parent`, and any other JSON
        value); the keys the registry computes cannot be given. The first publish of a name
        makes `server` its owner; a name owned by another server is refused. `promote` promotes
        the new version at once. Old versions are not pruned here (the caller knows which are
        pinned: see `prune`).
        """
        name = adapter_name(name)
        server = _server(server)
        if source not in _SOURCES:
            raise AdapterError(f"unknown adapter source {shown(str(source))}")
        extra = dict(meta or {})
        clash = sorted(set(extra) & _COMPUTED_META)
        if clash:
            raise AdapterError(f"meta cannot set {', '.join(clash)}: the registry sets them")
        dataset = extra.get("dataset")
        if dataset is not None and not (
            isinstance(dataset, dict) and {"hash", "size"} <= set(dataset)
        ):
            raise AdapterError('meta "dataset" must be {"hash": ..., "size": ...} or null')
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise AdapterError(f"meta cannot be saved as JSON: {e}") from None
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise AdapterError(f"{shown(str(source_dir))} is not a folder")
        inspect_adapter(source_dir, shapes, self.max_rank)
        folder = self._name_dir(name)
        owner = self._read_state(folder, name)
        if owner is not None and owner.server != server:
            raise AdapterError(f"adapter {name} belongs to another server")

        staging = self._stage(folder)
        try:
            try:
                wanted = [*_COPIED, *(f for f in _OPTIONAL if (source_dir / f).is_file())]
                files = {f: _copy_hashed(source_dir / f, staging / f) for f in wanted}
            except OSError as e:
                raise AdapterError(f"cannot save adapter {name}: {e}") from None
            # What is stored is checked again: the source may have changed while it was copied.
            spec = inspect_adapter(staging, shapes, self.max_rank)
            with self._lock(folder):
                state = self._read_state(folder, name) or _State(server)
                if state.server != server:
                    raise AdapterError(f"adapter {name} belongs to another server")
                numbers = [_number(v) for v in self._versions(folder)]
                number = max([state.last_version, *numbers]) + 1
                version = f"v{number}"
                record: dict[str, Any] = {
                    "name": name,
                    "version": version,
                    "server": server,
                    "created_at": self._clock()
                    .astimezone(UTC)
                    .isoformat(timespec="seconds")
                    .replace("+00:00", "Z"),
                    "fingerprint": fingerprint.as_dict(),
                    "files": files,
                    "rank": spec.rank,
                    "alpha": spec.alpha,
                    "scale": spec.scale,
                    "targets": list(spec.targets),
                    "dataset": None,
                    "train_loss": None,
                    "eval_loss": None,
                    "parent": None,
                    "source": source,
                    **extra,
                }
                try:
                    _write_new_json(staging / META_FILE, record)
                    _fsync_dir(staging)
                    # The number is taken (and the owner recorded) before the folder appears,
                    # so a crash after this point never reuses it.
                    state.last_version = number
                    self._write_state(folder, state)
                    os.rename(staging, folder / version)
                    _fsync_dir(folder)
                except OSError as e:
                    raise AdapterError(f"cannot save adapter {name}: {e}") from None
                if promote:
                    state.promoted = version
                    state.history.append(version)
                    self._write_state(folder, state)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            self._drop_if_empty(folder)
            raise
        log.info(
            "saved adapter %s@%s for server %s%s",
            name,
            version,
            server,
            " (promoted)" if promote else "",
        )
        return VersionInfo(name, version, server, folder / version, promote, record)

    def import_folder(
        self, path: Path, name: str, server: str, shapes: BaseShapes, fingerprint: Fingerprint
    ) -> VersionInfo:
        """`loracord adapters import PATH --name N`: any PEFT LoRA folder made on the served
        base becomes the next version of `name` and is **promoted at once** (source "import").

        It is checked as `publish` checks (shapes, rank, targets, LoRA variant, file
        integrity); a refused folder leaves nothing behind: no folder, no change of state.
        """
        return self.publish(
            name, server, Path(path), shapes, fingerprint, promote=True, source="import"
        )

    def promote(self, name: str, version: str, *, force: bool = False) -> AdapterInfo:
        """Make `version` the promoted one (channels that follow `name` get it).

        A rejected version (rolled back) is refused with the reason it was rejected, unless
        `force` (an explicit operator action), which also lifts the rejection.
        """
        name, folder = self._existing(name)
        version = adapter_version(version)
        with self._lock(folder):
            state = self._state(folder, name)
            if version not in self._versions(folder):
                raise AdapterError(f"adapter {name} has no version {version}")
            if version in state.rejected:
                if not force:
                    raise AdapterError(
                        f"{name}@{version} was rejected ({state.rejected[version]}); it is not "
                        "promoted again unless forced"
                    )
                del state.rejected[version]
            if state.promoted != version:
                state.promoted = version
                state.history.append(version)
            self._write_state(folder, state)
            return self._info(name, folder, state)

    def rollback(self, name: str) -> tuple[str, str | None]:
        """Move the promoted pointer back; returns (the version left, the one promoted now).

        The version left is marked rejected ("rolled back"), so `promote` refuses it from then
        on unless forced. The pointer goes to the latest earlier version in the history that
        still exists and is not rejected; when there is none, no version is promoted (None) and
        channels that follow the adapter answer from the base model.
        """
        name, folder = self._existing(name)
        with self._lock(folder):
            state = self._state(folder, name)
            left = state.promoted
            if left is None:
                raise AdapterError(f"adapter {name} has no promoted version to roll back")
            existing = set(self._versions(folder))
            state.rejected[left] = "rolled back"
            now = next(
                (v for v in reversed(state.history) if v in existing and v not in state.rejected),
                None,
            )
            state.promoted = now
            if now is not None:
                state.history.append(now)
            self._write_state(folder, state)
        log.info("adapter %s rolled back from %s to %s", name, left, now or "no version")
        return left, now

    def prune(self, name: str, *, protected: Collection[str]) -> builtins.list[str]:
        """Retention: delete versions older than the newest `keep_versions`, except the
        promoted one and those in `protected` (the caller passes pinned and in-flight
        versions). Returns the versions deleted, oldest first."""
        name, folder = self._existing(name)
        keep = set(protected)
        with self._lock(folder):
            state = self._state(folder, name)
            versions = self._versions(folder)
            keep.update(versions[-self.keep_versions :])
            if state.promoted:
                keep.add(state.promoted)
            doomed = [v for v in versions if v not in keep]
            trash = self._discard(folder, state, doomed)
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        if doomed:
            log.info("pruned adapter %s: %s", name, ", ".join(doomed))
        return doomed

    def purge(self, name: str, versions: Collection[str], reason: str) -> builtins.list[str]:
        """Delete `versions` whatever their standing (promoted, pinned, in use): consent, when
        they were trained on quotes that were removed since. A purged promoted version leaves
        the name with no promoted version (its channels answer from the base model) unless
        another one is promoted. Returns the versions deleted."""
        name, folder = self._existing(name)
        with self._lock(folder):
            state = self._state(folder, name)
            gone = [adapter_version(v) for v in versions if v in self._versions(folder)]
            if not gone:
                return []
            if state.promoted in gone:
                state.promoted = None
            state.history = [v for v in state.history if v not in gone]
            trash = self._discard(folder, state, gone)
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        log.info("adapter %s: deleted %s (%s)", name, ", ".join(gone), reason)
        return gone

    def delete_version(self, name: str, version: str, protected: Collection[str]) -> None:
        """Delete one version; refused for the promoted one and those in `protected`."""
        name, folder = self._existing(name)
        version = adapter_version(version)
        with self._lock(folder):
            state = self._state(folder, name)
            if version not in self._versions(folder):
                raise AdapterError(f"adapter {name} has no version {version}")
            if version == state.promoted:
                raise AdapterError(
                    f"{name}@{version} is the promoted version; promote another version or "
                    "roll back first"
                )
            if version in protected:
                raise AdapterError(f"{name}@{version} is in use (pinned or being served)")
            trash = self._discard(folder, state, [version])
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)

    def _discard(self, folder: Path, state: _State, versions: Iterable[str]) -> builtins.list[Path]:
        """Rename versions to `.tmp-deleted-*` (under the lock), so a half-deleted version is
        never listed; the caller removes the returned folders."""
        trash: builtins.list[Path] = []
        try:
            for version in versions:
                target = folder / f"{_DELETED_PREFIX}{version}-{secrets.token_hex(4)}"
                os.rename(folder / version, target)
                trash.append(target)
                state.rejected.pop(version, None)
        except OSError as e:
            raise AdapterError(f"cannot delete a version of adapter {folder.name}: {e}") from None
        finally:
            if trash:
                self._write_state(folder, state)
        return trash

    def clean_stale(self, max_age: float = _STALE_SECONDS) -> builtins.list[Path]:
        """Remove what crashed writes left: `.tmp-*` entries older than `max_age` seconds
        (and half-deleted versions at any age). Returns what was removed."""
        removed: builtins.list[Path] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        now = time.time()
        for entry in entries:
            if not _ADAPTER_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            folder = self.root / entry.name
            for item in os.scandir(folder):
                if not item.name.startswith(TMP_PREFIX):
                    continue
                path = folder / item.name
                try:
                    age = now - item.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if age < max_age and not item.name.startswith(_DELETED_PREFIX):
                    continue
                if item.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path)
            self._drop_if_empty(folder)
        if removed:
            log.info("removed %d stale temporary entries from %s", len(removed), self.root)
        return removed

    # -- helpers ----------------------------------------------------------------------------
    def _stage(self, folder: Path) -> Path:
        """A new `.tmp-*` folder in `folder` (created, with the registry's folder, if needed)."""
        for _ in range(5):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self._contained(folder, f"adapter {folder.name}")
                staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
            except FileNotFoundError:  # removed by a failed first publish at that moment
                continue
            except OSError as e:
                raise AdapterError(f"cannot save adapter {folder.name}: {e}") from None
            os.chmod(staging, 0o755)
            return staging
        raise AdapterError(f"cannot save adapter {folder.name}: its folder keeps disappearing")

    def _drop_if_empty(self, folder: Path) -> None:
        """Remove a name's folder that holds nothing but its lock (a first publish that
        failed), so a refusal leaves nothing behind."""
        try:
            with self._lock(folder):
                if os.listdir(folder) != [LOCK_FILE]:
                    return
                os.unlink(folder / LOCK_FILE)
                with contextlib.suppress(OSError):  # someone began writing here just now
                    os.rmdir(folder)
        except (AdapterError, OSError):
            pass
