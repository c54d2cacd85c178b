"""Channels and their adapters: bindings, the registry and the running engine together.

On the real embedded model: switching one channel changes no other; unknown and other servers'
adapters are refused; a corrupt new version is refused while the old one keeps answering; an
adapter made for another base model falls back to the base model visibly and marks the channel
for retraining; rollback; and the CLI in another process changing bindings and versions beside a
running bot, which serves the change within 5 seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.adapters import META_FILE, WEIGHTS_FILE, BaseShapes, Fingerprint
from core.app import App, build
from core.errors import AdapterError
from core.model.requests import AdapterRef, ChatMessage, GenerationParams
from core.store import ChannelRef
from tests.adapter_kit import write_adapter
from tests.conftest import make_settings
from tests.test_model import _cli, _env

GENERAL = ChannelRef.console("general")
RANDOM = ChannelRef.console("random")
PARAMS = GenerationParams(max_new_tokens=6, temperature=0.0)
ASK = (ChatMessage("user", "What is the capital of France?"),)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("channels")


@pytest.fixture(scope="module")
def app(root: Path, embedded_model_dir: Path) -> Iterator[App]:
    """A running app that watches the registry and the bindings, as the bot does."""
    application = build(make_settings(root, adapter_slots=2))
    application.channels.poll_seconds = 0.5
    loop = asyncio.new_event_loop()
    loop.run_until_complete(application.start(watch_adapters=True))
    yield application
    loop.run_until_complete(application.close())
    loop.close()


@pytest.fixture(scope="module")
def base(embedded_model_dir: Path) -> tuple[BaseShapes, Fingerprint]:
    return BaseShapes.of_model(embedded_model_dir), Fingerprint.of_model(embedded_model_dir)


def _folder(root: Path, base: tuple[BaseShapes, Fingerprint], seed: int) -> Path:
    return write_adapter(root / f"src-{seed}", base[0], seed=seed, strength=0.15)


def _import(
    app: App,
    root: Path,
    base: tuple[BaseShapes, Fingerprint],
    name: str,
    seed: int,
    server: str = "console",
) -> AdapterRef:
    version = app.registry.import_folder(_folder(root, base, seed), name, server, *base)
    return AdapterRef(name, version.version)


async def _ask(app: App, channel: ChannelRef) -> tuple[str, AdapterRef | None, str | None]:
    stream, served = await app.channels.submit(channel, ASK, PARAMS)
    return await stream.text(), stream.adapter, served.reason


async def test_switching_one_channel_changes_no_other(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    ref = _import(app, root, base, "general-quotes", 1)
    served = await app.channels.switch(GENERAL, "general-quotes", by="test")
    assert served.adapter == ref and served.reason is None
    assert any(s.ref == ref for s in app.engine.adapters())  # loaded by the switch itself
    general, random_ = await _ask(app, GENERAL), await _ask(app, RANDOM)
    assert general[1] == ref and random_[1] is None
    assert general[0] != random_[0]  # the adapter changes what the channel hears
    assert (await app.store.binding(RANDOM)).adapter is None
    await app.channels.reset(GENERAL)
    assert (await _ask(app, GENERAL))[1] is None


async def test_unknown_and_other_servers_adapters_are_refused(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    _import(app, root, base, "theirs", 2, server="123456789012345678")
    for choice, why in (
        ("nope", "there is no adapter named nope in this server"),
        ("theirs", "no adapter named theirs"),  # another server's: as if it did not exist
        ("../../etc", "not an adapter name"),
        ("general-quotes@v9", "has no version v9"),
    ):
        with pytest.raises(AdapterError, match=why):
            await app.channels.switch(RANDOM, choice)
    assert (await app.store.binding(RANDOM)).adapter is None
    names = [row["name"] for row in await app.channels.listing("console")]
    assert "theirs" not in names and "general-quotes" in names
    assert "theirs" not in await app.channels.names("console")


async def test_a_corrupt_new_version_is_refused_and_the_last_good_one_answers(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    v1 = _import(app, root, base, "steady", 3)
    await app.channels.switch(RANDOM, "steady")
    good = await _ask(app, RANDOM)
    assert good[1] == v1, good
    v2 = _import(app, root, base, "steady", 4)  # promoted at once, then damaged on disk
    weights = app.registry.version_dir("steady", v2.version) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    await app.channels.refresh(force=True)
    text, used, reason = await _ask(app, RANDOM)
    assert used == v1 and text == good[0]
    assert reason is not None and "steady@v2" in reason and "corrupt" in reason


async def test_an_adapter_for_another_base_falls_back_visibly(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    channel = ChannelRef.console("elsewhere")
    ref = _import(app, root, base, "other-base", 5)
    await app.channels.switch(channel, "other-base")
    meta_file = app.registry.version_dir(ref.name, ref.version) / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"]["tokenizer"] = "0" * 16  # as if made on a model with another tokenizer
    meta_file.write_text(json.dumps(meta))
    await app.channels.refresh(force=True)
    _, used, reason = await _ask(app, channel)
    assert used is None and reason is not None and "another base model" in reason
    assert (await app.store.channel_state(channel)).needs_retrain
    report = await app.channels.info(channel)
    assert report.served.reason == reason


async def test_rollback_moves_back_and_the_version_left_is_never_promoted_again(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    channel = ChannelRef.console("rolls")
    v1 = _import(app, root, base, "rolling", 6)
    v2 = _import(app, root, base, "rolling", 7)
    await app.channels.switch(channel, "rolling")
    assert (await _ask(app, channel))[1] == v2
    left, now = await app.channels.rollback(channel)
    assert (left, now) == (v2, v1)
    assert (await _ask(app, channel))[1] == v1
    with pytest.raises(AdapterError, match="rejected"):
        await app.channels.switch(channel, "rolling@v2")
    with pytest.raises(AdapterError, match="rejected"):
        app.registry.promote("rolling", "v2")


def _wait_for(check, seconds: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


async def _served_within(app: App, channel: ChannelRef, ref: AdapterRef, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        loaded = {s.ref for s in app.engine.adapters() if not s.unloading}
        if ref in loaded and (await app.channels.resolve(channel)).adapter == ref:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ref} was not served in {channel} within {seconds} s")


async def test_the_cli_beside_a_running_bot(
    app: App, root: Path, base: tuple[BaseShapes, Fingerprint], tmp_path: Path
) -> None:
    """`loracord adapters ...` in another process: the bot serves its changes within 5 s."""
    env = _env(tmp_path, LORACORD_ADAPTERS_DIR=str(app.settings.adapters_dir))
    env["LORACORD_DATA_DIR"] = str(app.settings.data_dir)  # the running bot's database
    channel = ChannelRef.console("cli-chan")
    # The bot's watcher (App.start(watch_adapters=True) runs it on the bot's loop; this test's
    # loop is not the fixture's, so it runs here).
    watcher = asyncio.create_task(app.channels.watch())
    try:
        await _cli_changes(app, root, base, env, channel)
    finally:
        watcher.cancel()


async def _cli_changes(
    app: App,
    root: Path,
    base: tuple[BaseShapes, Fingerprint],
    env: dict[str, str],
    channel: ChannelRef,
) -> None:
    tmp_path = Path(env["LORACORD_CONFIG"]).parent
    done = _cli(
        "adapters", "import", str(_folder(root, base, 8)), "--name", "cli-made", "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "name": "cli-made",
        "version": "v1",
        "server": "console",
        "promoted": True,
    }
    done = _cli("adapters", "switch", "--channel", "cli-chan", "cli-made", env=env)
    assert done.returncode == 0, done.stderr
    assert "cli-made@v1" in done.stdout
    await _served_within(app, channel, AdapterRef("cli-made", "v1"), 5.0)

    # A new version promoted by another process: loaded before anyone asks, the old one let go.
    done = _cli("adapters", "import", str(_folder(root, base, 9)), "--name", "cli-made", env=env)
    assert done.returncode == 0, done.stderr
    await _served_within(app, channel, AdapterRef("cli-made", "v2"), 5.0)
    assert (await _ask(app, channel))[1] == AdapterRef("cli-made", "v2")
    await asyncio.to_thread(
        _wait_for,
        lambda: AdapterRef("cli-made", "v1") not in {s.ref for s in app.engine.adapters()},
    )

    listed = _cli("adapters", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["cli-made"]["versions"] == ["v1", "v2"]
    assert rows["cli-made"]["promoted"] == "v2" and rows["cli-made"]["channels"] == ["cli-chan"]

    done = _cli("adapters", "switch", "--channel", "cli-chan", "no-such", env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "loracord: error: there is no adapter named no-such in this server"
    ]
    done = _cli("adapters", "import", str(tmp_path), "--name", "empty", env=env)
    assert done.returncode == 1 and "adapter_config.json" in done.stderr
    assert "empty" not in {
        r["name"] for r in json.loads(_cli("adapters", "list", "--json", env=env).stdout)
    }


def test_ask_answers_with_the_channels_adapter(
    embedded_model_dir: Path, tmp_path: Path, base: tuple[BaseShapes, Fingerprint]
) -> None:
    env = _env(tmp_path, LORACORD_ADAPTERS_DIR=str(tmp_path / "adapters"))
    folder = write_adapter(tmp_path / "src", base[0], seed=10, strength=0.05)
    for args in (
        ("adapters", "import", str(folder), "--name", "asker"),
        ("adapters", "switch", "--channel", "general", "asker@v1"),
    ):
        done = _cli(*args, env=env)
        assert done.returncode == 0, done.stderr
    asked = [
        json.loads(done.stdout)
        for channel in ("general", "random")
        if (
            done := _cli("ask", "--channel", channel, "--max-tokens", "4", "--json", "Hi!", env=env)
        ).returncode
        == 0
    ]
    assert [a["adapter"] for a in asked] == ["asker@v1", None]
    info = _cli("adapters", "info", "--channel", "general", "--json", env=env)
    assert json.loads(info.stdout)["adapter"] == "asker@v1"
    assert json.loads(info.stdout)["pinned"] == "v1"


async def test_an_adapter_made_with_peft_on_the_served_folder_imports_and_serves(
    app: App, embedded_model_dir: Path, tmp_path: Path
) -> None:
    """What a user does: load the GPTQ folder `model info` names with transformers, wrap it with
    `get_peft_model`, save, import. (B is random here, so the adapter changes the answers.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        embedded_model_dir, dtype=torch.float32, device_map="cpu"
    )
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "made-with-peft")
    del model
    shapes, fingerprint = app.channels.base
    version = app.registry.import_folder(
        tmp_path / "made-with-peft", "peft-made", "console", shapes, fingerprint
    )
    channel = ChannelRef.console("peft-room")
    await app.channels.switch(channel, "peft-made")
    text, used, reason = await _ask(app, channel)
    assert used == AdapterRef("peft-made", version.version) and reason is None
    assert text != (await _ask(app, ChannelRef.console("plain-room")))[0]
