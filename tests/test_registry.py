"""The versioned adapter registry (core.adapters.Registry): names, versions, promotion and
rollback, retention, refusals that leave nothing behind, integrity, paths, ownership, and
several processes changing one name at once.

No model is loaded: the base is a tiny Llama config written by hand, and adapters are written
for it with tests/adapter_kit.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from core.adapters import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    BaseShapes,
    Fingerprint,
    Registry,
    adapter_name,
    adapter_version,
    parse_ref,
    slugify,
)
from core.errors import AdapterError

CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
}
OTHER_CONFIG = {**CONFIG, "hidden_size": 48}
SHAPES = BaseShapes.from_config(CONFIG)


def _fingerprint(tokenizer: str = "tok-a", weights: str = "weights-a") -> Fingerprint:
    return Fingerprint("llama", SHAPES.digest(), tokenizer, weights)


FP = _fingerprint()


def _adapter(folder: Path, seed: int = 0, **kwargs: Any) -> Path:
    from tests.adapter_kit import write_adapter  # torch: not imported by the worker processes

    shapes = kwargs.pop("shapes", SHAPES)
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 8.0)
    return write_adapter(folder, shapes, seed=seed, **kwargs)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


@pytest.fixture
def registry(root: Path) -> Registry:
    return Registry(root, keep_versions=3, max_rank=16)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return _adapter(tmp_path / "src", seed=1)


def _tree(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- names --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "name"),
    [("general", "general"), (" My-Chan_2 ", "my-chan_2"), ("0", "0"), ("a" * 64, "a" * 64)],
)
def test_good_names(value: str, name: str) -> None:
    assert adapter_name(value) == name


@pytest.mark.parametrize(
    "value",
    [
        "",
        "base",
        " BASE ",
        "../x",
        "a/b",
        "A B",
        "-x",
        "_x",
        ".x",
        "a" * 65,
        "gen\u0435ral",  # Cyrillic e
        "\u212aey",  # Kelvin sign: lowercases to an ASCII "k"
        "x\u200b",  # zero-width space
        "x\ny",
    ],
)
def test_bad_names(value: str) -> None:
    with pytest.raises(AdapterError) as err:
        adapter_name(value)
    assert "\n" not in str(err.value)
    if value.strip().lower() == "base":
        assert "reserved" in str(err.value)


def test_refs_and_versions() -> None:
    assert parse_ref("Chat@v3") == ("chat", "v3")
    assert parse_ref("chat") == ("chat", None)
    assert parse_ref("base") == ("base", None)
    assert adapter_version("V12") == "v12"
    for bad in ("chat@", "chat@3", "chat@v0", "chat@v01", "chat@latest", "../x@v1"):
        with pytest.raises(AdapterError):
            parse_ref(bad)


def test_slugify() -> None:
    assert slugify("#Général Chat!") == "general-chat"
    assert slugify("1234567890") == "1234567890"
    assert slugify("base") == "base-channel"
    assert slugify("💬💬").startswith("channel-")
    assert len(slugify("x" * 100)) == 64
    for value in ("--a--", "Ünïcödé", "../../etc", "日本語"):
        assert adapter_name(slugify(value)) == slugify(value)


# -- publish, list, info, meta --------------------------------------------------------------------
def test_publish_list_info_meta(registry: Registry, source: Path, root: Path) -> None:
    first = registry.publish(
        "chat",
        "console",
        source,
        SHAPES,
        FP,
        meta={"dataset": {"hash": "abc", "size": 10}, "eval_loss": 1.5, "quotes": 12},
    )
    second = registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    assert (first.version, second.version) == ("v1", "v2")
    assert not first.promoted and second.promoted
    assert sorted(os.listdir(root / "chat" / "v1")) == [CONFIG_FILE, WEIGHTS_FILE, META_FILE]

    info = registry.info("chat")
    assert info.versions == ("v1", "v2")
    assert (info.server, info.promoted, info.history, info.rejected) == (
        "console",
        "v2",
        ("v2",),
        {},
    )
    assert registry.list() == [info]
    assert registry.version_dir("chat", "v1") == root / "chat" / "v1"

    meta = registry.meta("chat", "v1")
    assert meta["name"] == "chat" and meta["version"] == "v1" and meta["server"] == "console"
    assert meta["created_at"].endswith("Z")
    assert meta["fingerprint"] == FP.as_dict()
    assert set(meta["files"]) == {CONFIG_FILE, WEIGHTS_FILE}
    assert (meta["rank"], meta["alpha"], meta["targets"]) == (
        4,
        8.0,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    assert meta["dataset"] == {"hash": "abc", "size": 10} and meta["eval_loss"] == 1.5
    assert meta["quotes"] == 12 and meta["source"] == "training" and meta["parent"] is None
    assert registry.meta("chat", "v2")["dataset"] is None

    state = json.loads((root / "chat" / STATE_FILE).read_text())
    assert state["server"] == "console" and state["promoted"] == "v2"

    spec = registry.check("chat", "v2", SHAPES, FP)
    assert spec.path == root / "chat" / "v2" and spec.rank == 4 and spec.scale == 2.0
    assert registry.fits("chat", "v2", SHAPES, FP) is None

    with pytest.raises(AdapterError, match="no adapter named nope"):
        registry.info("nope")
    with pytest.raises(AdapterError, match="has no version v9"):
        registry.version_dir("chat", "v9")
    with pytest.raises(AdapterError, match="registry sets"):
        registry.publish("chat", "console", source, SHAPES, FP, meta={"files": {}})
    with pytest.raises(AdapterError, match="JSON"):
        registry.publish("chat", "console", source, SHAPES, FP, meta={"eval_loss": float("nan")})
    assert registry.info("chat").versions == ("v1", "v2")


def test_numbers_are_never_reused(registry: Registry, source: Path) -> None:
    for _ in range(3):
        registry.publish("chat", "console", source, SHAPES, FP)
    registry.delete_version("chat", "v3", protected=set())
    assert registry.publish("chat", "console", source, SHAPES, FP).version == "v4"
    assert registry.info("chat").versions == ("v1", "v2", "v4")


def test_import_is_promoted(registry: Registry, source: Path) -> None:
    imported = registry.import_folder(source, "Imported", "console", SHAPES, FP)
    assert (imported.name, imported.version, imported.promoted) == ("imported", "v1", True)
    assert registry.info("imported").promoted == "v1"
    assert registry.meta("imported", "v1")["source"] == "import"


# -- promotion and rollback ---------------------------------------------------------------------
def test_promote_rollback_rejected(registry: Registry, source: Path) -> None:
    for _ in range(3):
        registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    assert registry.info("chat").promoted == "v3"

    assert registry.rollback("chat") == ("v3", "v2")
    info = registry.info("chat")
    assert info.promoted == "v2" and info.rejected == {"v3": "rolled back"}
    with pytest.raises(AdapterError, match=r"chat@v3 was rejected \(rolled back\)"):
        registry.promote("chat", "v3")
    assert registry.info("chat").promoted == "v2"

    assert registry.rollback("chat") == ("v2", "v1")
    assert registry.rollback("chat") == ("v1", None)  # nothing left: channels use the base
    info = registry.info("chat")
    assert info.promoted is None and set(info.rejected) == {"v1", "v2", "v3"}
    with pytest.raises(AdapterError, match="no promoted version"):
        registry.rollback("chat")

    registry.promote("chat", "v3", force=True)  # an explicit operator action lifts it
    info = registry.info("chat")
    assert info.promoted == "v3" and "v3" not in info.rejected
    assert info.history == ("v1", "v2", "v3", "v2", "v1", "v3")
    with pytest.raises(AdapterError, match="no version v7"):
        registry.promote("chat", "v7")


def test_rollback_skips_deleted_versions(registry: Registry, source: Path) -> None:
    for _ in range(3):
        registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    registry.delete_version("chat", "v2", protected=set())
    assert registry.rollback("chat") == ("v3", "v1")


# -- retention ----------------------------------------------------------------------------------
def test_prune_keeps_newest_promoted_and_protected(registry: Registry, source: Path) -> None:
    for _ in range(8):
        registry.publish("chat", "console", source, SHAPES, FP)
    registry.promote("chat", "v1")
    deleted = registry.prune("chat", protected={"v3"})
    assert deleted == ["v2", "v4", "v5"]
    assert registry.info("chat").versions == ("v1", "v3", "v6", "v7", "v8")
    assert registry.prune("chat", protected={"v3"}) == []
    assert not [p for p in os.listdir(registry.root / "chat") if p.startswith(".tmp-")]
    assert registry.prune("chat", protected=set()) == ["v3"]

    with pytest.raises(AdapterError, match="promoted"):
        registry.delete_version("chat", "v1", protected=set())
    with pytest.raises(AdapterError, match="in use"):
        registry.delete_version("chat", "v6", protected={"v6"})
    registry.delete_version("chat", "v6", protected=set())
    assert registry.info("chat").versions == ("v1", "v7", "v8")


# -- refusals leave nothing behind --------------------------------------------------------------
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("other-shapes", {"shapes": BaseShapes.from_config(OTHER_CONFIG)}, "does not fit"),
    ("rank", {"rank": 32}, "rank is 32, above"),
    ("dora", {"config": {"use_dora": True}}, "DoRA"),
    ("mlp", {"targets": ("q_proj", "gate_proj", "up_proj")}, "targets gate_proj, up_proj"),
    ("loha", {"config": {"peft_type": "LOHA"}}, "only LoRA"),
]


@pytest.mark.parametrize(("label", "kwargs", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_import_refusals_leave_nothing(
    registry: Registry, root: Path, tmp_path: Path, label: str, kwargs: dict[str, Any], reason: str
) -> None:
    bad = _adapter(tmp_path / label, **kwargs)
    with pytest.raises(AdapterError, match=reason):
        registry.import_folder(bad, "chat", "console", SHAPES, FP)
    assert _tree(root) == []
    # ... nor in a name that already has versions
    good = registry.import_folder(_adapter(tmp_path / "good"), "chat", "console", SHAPES, FP)
    before = (_tree(root), (root / "chat" / STATE_FILE).read_bytes())
    with pytest.raises(AdapterError, match=reason):
        registry.import_folder(bad, "chat", "console", SHAPES, FP)
    assert (_tree(root), (root / "chat" / STATE_FILE).read_bytes()) == before
    assert registry.info("chat").promoted == good.version


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-10])


def _garbage_header(file: Path) -> None:
    file.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!!" + b"\0" * 64)


def _huge_header(file: Path) -> None:
    file.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _huge_header])
def test_corrupt_safetensors_refused(
    registry: Registry, root: Path, tmp_path: Path, damage: Any
) -> None:
    bad = _adapter(tmp_path / "bad")
    damage(bad / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="corrupt"):
        registry.import_folder(bad, "chat", "console", SHAPES, FP)
    assert _tree(root) == []


def test_missing_files_and_not_a_folder(registry: Registry, root: Path, tmp_path: Path) -> None:
    bad = _adapter(tmp_path / "bad")
    (bad / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError, match=CONFIG_FILE):
        registry.import_folder(bad, "chat", "console", SHAPES, FP)
    with pytest.raises(AdapterError, match="not a folder"):
        registry.import_folder(tmp_path / "nowhere", "chat", "console", SHAPES, FP)
    assert _tree(root) == []


def test_rslora_accepted_with_its_scale(registry: Registry, tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "rs", rank=16, alpha=8.0, config={"use_rslora": True})
    registry.import_folder(folder, "rs", "console", SHAPES, FP)
    spec = registry.check("rs", "v1", SHAPES, FP)
    assert spec.scale == pytest.approx(8.0 / 16**0.5)
    assert registry.meta("rs", "v1")["scale"] == pytest.approx(2.0)


# -- integrity and fingerprints -----------------------------------------------------------------
def test_file_changed_after_publish_refused(registry: Registry, source: Path, root: Path) -> None:
    registry.publish("chat", "console", source, SHAPES, FP)
    registry.publish("chat", "console", source, SHAPES, FP)
    weights = root / "chat" / "v2" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, still a valid safetensors file
    weights.write_bytes(bytes(data))
    message = "adapter chat@v2 is corrupt: adapter_model.safetensors changed since it was saved"
    with pytest.raises(AdapterError) as err:
        registry.check("chat", "v2", SHAPES, FP)
    assert str(err.value) == message
    assert registry.fits("chat", "v2", SHAPES, FP) == message
    assert registry.fits("chat", "v1", SHAPES, FP) is None

    (root / "chat" / "v1" / CONFIG_FILE).unlink()
    assert "adapter_config.json is missing" in str(registry.fits("chat", "v1", SHAPES, FP))
    (root / "chat" / "v1" / META_FILE).unlink()
    with pytest.raises(AdapterError, match=f"corrupt: no {META_FILE}"):
        registry.check("chat", "v1", SHAPES, FP)


def test_fingerprint_mismatch(
    registry: Registry, source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    made_on = Fingerprint.of_model(model, weights_sha256="w-one")
    registry.publish("chat", "console", source, SHAPES, made_on)

    other_weights = Fingerprint.of_model(model, weights_sha256="w-two")
    with caplog.at_level(logging.WARNING, logger="core.adapters"):
        assert registry.check("chat", "v1", SHAPES, other_weights).rank == 4
    assert any("other weights" in r.getMessage() for r in caplog.records)

    (model / "tokenizer.json").write_text('{"vocab": ["a", "c"]}')
    retokenized = Fingerprint.of_model(model, weights_sha256="w-one")
    with pytest.raises(AdapterError, match="its tokenizer differs"):
        registry.check("chat", "v1", SHAPES, retokenized)
    other_arch = Fingerprint("mistral", made_on.shapes, made_on.tokenizer, made_on.weights)
    assert "architecture differs" in str(registry.fits("chat", "v1", SHAPES, other_arch))


# -- paths --------------------------------------------------------------------------------------
def test_symlink_escape_refused(registry: Registry, source: Path, root: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "evil").symlink_to(elsewhere)
    with pytest.raises(AdapterError, match=r"symbolic link.*outside"):
        registry.publish("evil", "console", source, SHAPES, FP)
    with pytest.raises(AdapterError, match="symbolic link"):
        registry.info("evil")
    assert os.listdir(elsewhere) == []
    assert registry.list() == []

    registry.publish("chat", "console", source, SHAPES, FP)
    (root / "chat" / "v9").symlink_to(elsewhere)
    assert registry.info("chat").versions == ("v1",)
    with pytest.raises(AdapterError, match="symbolic link"):
        registry.version_dir("chat", "v9")
    for name in ("a/b", "../chat", "/etc", "chat/../../x"):
        with pytest.raises(AdapterError, match="not an adapter name"):
            registry.publish(name, "console", source, SHAPES, FP)


def test_files_linked_out_are_refused(registry: Registry, source: Path, root: Path) -> None:
    registry.publish("chat", "console", source, SHAPES, FP)
    weights = root / "chat" / "v1" / WEIGHTS_FILE
    weights.unlink()
    weights.symlink_to(source / WEIGHTS_FILE)  # same bytes, but a link out of the registry
    assert "corrupt" in str(registry.fits("chat", "v1", SHAPES, FP))


# -- ownership ----------------------------------------------------------------------------------
def test_ownership(registry: Registry, source: Path) -> None:
    registry.publish("chat", "111", source, SHAPES, FP)
    registry.publish("other", "222", source, SHAPES, FP)
    registry.publish("local", "console", source, SHAPES, FP)
    with pytest.raises(AdapterError, match="adapter chat belongs to another server"):
        registry.publish("chat", "222", source, SHAPES, FP)
    with pytest.raises(AdapterError, match="belongs to another server"):
        registry.import_folder(source, "chat", "console", SHAPES, FP)
    assert registry.info("chat").versions == ("v1",)
    assert [i.name for i in registry.list(server="111")] == ["chat"]
    assert [i.name for i in registry.list(server="222")] == ["other"]
    assert [i.name for i in registry.list()] == ["chat", "local", "other"]
    with pytest.raises(AdapterError, match="not a server"):
        registry.publish("x", "../srv", source, SHAPES, FP)


# -- crashes and the stamp ----------------------------------------------------------------------
def test_crash_leftovers_ignored_and_cleaned(registry: Registry, source: Path, root: Path):
    registry.publish("chat", "console", source, SHAPES, FP)
    crashed = root / "chat" / ".tmp-abc123"
    crashed.mkdir()
    (crashed / WEIGHTS_FILE).write_bytes(b"half")
    fresh = root / "chat" / ".tmp-fresh"
    fresh.mkdir()
    deleting = root / "chat" / ".tmp-deleted-v0-1234"
    deleting.mkdir()
    (root / "chat" / "notes").mkdir()  # anything else is not a version
    # a first publish that crashed: only a staging folder, no state
    (root / "newname" / ".tmp-xyz").mkdir(parents=True)
    old = time.time() - 7200
    os.utime(crashed, (old, old))
    os.utime(root / "newname" / ".tmp-xyz", (old, old))

    assert registry.info("chat").versions == ("v1",)
    assert [i.name for i in registry.list()] == ["chat"]
    removed = registry.clean_stale()
    assert sorted(p.name for p in removed) == [".tmp-abc123", ".tmp-deleted-v0-1234", ".tmp-xyz"]
    assert fresh.exists() and not crashed.exists() and not deleting.exists()
    assert not (root / "newname").exists()
    assert registry.check("chat", "v1", SHAPES, FP).rank == 4


def test_state_stamp_changes_on_every_change(registry: Registry, source: Path) -> None:
    assert registry.state_stamp() == ()
    stamps = [registry.state_stamp()]
    registry.publish("chat", "console", source, SHAPES, FP)
    stamps.append(registry.state_stamp())
    registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    stamps.append(registry.state_stamp())
    registry.promote("chat", "v1")
    stamps.append(registry.state_stamp())
    registry.rollback("chat")
    stamps.append(registry.state_stamp())
    assert len(set(stamps)) == len(stamps)
    assert registry.state_stamp() == stamps[-1]


# -- several processes at once ------------------------------------------------------------------
def _publish_worker(root: str, source: str, start: Any) -> str:
    start.wait()
    registry = Registry(Path(root), keep_versions=100)
    return registry.publish("chat", "console", Path(source), SHAPES, FP, promote=True).version


def _flip_worker(root: str, seconds: float, start: Any, seed: int) -> int:
    import random

    rng = random.Random(seed)
    registry = Registry(Path(root))
    start.wait()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if rng.random() < 0.5:
                registry.promote("chat", rng.choice(["v1", "v2", "v3", "v4"]), force=True)
            else:
                registry.rollback("chat")
            done += 1
        except AdapterError as e:
            assert "no promoted version" in str(e), e
    return done


def _promote_worker(root: str, versions: tuple[str, str], rounds: int, start: Any) -> int:
    registry = Registry(Path(root))
    start.wait()
    for n in range(rounds):
        registry.promote("chat", versions[n % 2], force=True)
    return rounds


def _consistent(root: Path, *, settled: bool = True) -> dict[str, Any]:
    state = json.loads((root / "chat" / STATE_FILE).read_text())
    versions = {p.name for p in (root / "chat").iterdir() if p.name.startswith("v")}
    assert state["server"] == "console"
    assert state["promoted"] is None or state["promoted"] in versions
    assert set(state["history"]) <= versions and set(state["rejected"]) <= versions
    if settled:  # while writers run, their .tmp-state-* files come and go
        assert not [p for p in os.listdir(root / "chat") if p.startswith(".tmp-")]
    return state


@pytest.mark.timeout(120)
def test_concurrent_publishes(root: Path, source: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Event()
    with context.Pool(8) as pool:
        pending = [
            pool.apply_async(_publish_worker, (str(root), str(source), start)) for _ in range(8)
        ]
        time.sleep(0.5)
        start.set()
        versions = [p.get(timeout=100) for p in pending]
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{n}" for n in range(1, 9)]
    state = _consistent(root)
    assert sorted(state["history"]) == sorted(versions)  # no promotion was lost
    assert state["promoted"] == state["history"][-1] and state["last_version"] == 8
    registry = Registry(root)
    assert registry.info("chat").versions == tuple(f"v{n}" for n in range(1, 9))
    for version in versions:
        assert registry.fits("chat", version, SHAPES, FP) is None


@pytest.mark.timeout(120)
def test_concurrent_promote_and_rollback(root: Path, source: Path) -> None:
    registry = Registry(root)
    for _ in range(4):
        registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Event()
    with context.Pool(2) as pool:
        pending = [
            pool.apply_async(_flip_worker, (str(root), 2.0, start, seed)) for seed in range(2)
        ]
        start.set()
        reads = 0
        while not all(p.ready() for p in pending):  # readers take no lock, never see half
            _consistent(root, settled=False)
            registry.info("chat")
            reads += 1
        changes = [p.get(timeout=60) for p in pending]
    assert min(changes) > 10 and reads > 10
    state = _consistent(root)
    assert len(state["history"]) >= 4
    info = registry.info("chat")
    assert info.promoted is None or info.promoted not in info.rejected


@pytest.mark.timeout(120)
def test_concurrent_promotes_lose_no_update(root: Path, source: Path) -> None:
    """Each promote here changes the pointer (the two processes alternate over their own
    versions), so each appends one history entry: none may be lost to a concurrent write."""
    registry = Registry(root)
    for _ in range(4):
        registry.publish("chat", "console", source, SHAPES, FP, promote=True)
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Event()
    with context.Pool(2) as pool:
        pending = [
            pool.apply_async(_promote_worker, (str(root), pair, 40, start))
            for pair in (("v1", "v2"), ("v3", "v4"))
        ]
        time.sleep(0.5)
        start.set()
        done = sum(p.get(timeout=60) for p in pending)
    state = _consistent(root)
    assert len(state["history"]) == 4 + done
