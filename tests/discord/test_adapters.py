"""/adapter end to end on SimCord with the real embedded model (few, 4-token answers).

Switching needs Manage Channels in the channel (or a server admin) and changes that channel
only; refusals (no rights, an unknown name, another server's adapter, a corrupt version) are one
ephemeral line and change nothing; list and autocomplete show this server's adapters only; info,
reset and rollback; in a thread the commands act on the parent channel.

Adapter names are unique across the test run: the engine (and its loaded adapters) is shared.
"""

from __future__ import annotations

import discord
import pytest

from core.adapters import WEIGHTS_FILE
from core.discord import NotAdmin
from core.errors import AdapterError
from core.model.requests import AdapterRef
from core.store import ChannelRef
from plugins.adapters.cog import NotChannelManager
from tests.adapter_kit import write_adapter


@pytest.fixture
async def h(make_harness):
    return await make_harness()


def _import(h, tmp_path, name: str, seed: int, server: str | None = None) -> AdapterRef:
    """Import a new version of `name` (promoted at once) for this server, or for `server`."""
    shapes, fingerprint = h.bot.app.channels.base
    folder = write_adapter(tmp_path / f"src-{name}-{seed}", shapes, seed=seed, strength=0.05)
    owner = server or str(h.guild.id)
    version = h.bot.app.registry.import_folder(folder, name, owner, shapes, fingerprint)
    return AdapterRef(name, version.version)


def _ref(h, channel=None) -> ChannelRef:
    return ChannelRef.discord(h.guild.id, (channel or h.channel).id)


async def _bound(h, channel=None) -> tuple[str | None, str | None]:
    binding = await h.bot.app.store.binding(_ref(h, channel))
    return binding.adapter, binding.version


async def _asked_with(h, channel=None) -> AdapterRef | None:
    """The adapter that served a short /ask in `channel` (default #general)."""
    await h.slash(h.alice, "ask", channel=channel, prompt="Hi!", max_tokens=4)
    return h.probe.last.request.adapter


def _manager(h, name: str = "mod"):
    role = h.guild.create_role("Mods", permissions=discord.Permissions(manage_channels=True))
    return h.member(name, role)


async def test_a_channel_manager_switches_this_channel_only(h, tmp_path) -> None:
    ref = _import(h, tmp_path, "dc-switch", seed=31)
    other = h.guild.create_text_channel("random")

    done = await h.slash(_manager(h), "adapter switch", adapter="dc-switch")

    assert done.ephemeral and "**dc-switch@v1**" in h.response_text(done)
    assert await _bound(h) == ("dc-switch", None)  # follows the promoted version
    assert await _asked_with(h) == ref
    assert await _asked_with(h, other) is None
    assert await _bound(h, other) == (None, None)


async def test_manage_channels_counts_in_the_channel_itself(h, tmp_path) -> None:
    _import(h, tmp_path, "dc-local", seed=32)
    carol = h.member("carol")
    own = h.guild.create_text_channel(
        "carols", overwrites={carol: discord.PermissionOverwrite(manage_channels=True)}
    )
    done = await h.slash(carol, "adapter switch", channel=own, adapter="dc-local@v1")
    assert "**dc-local@v1**" in h.response_text(done)
    assert await _bound(h, own) == ("dc-local", "v1")  # pinned

    refused = await h.slash(carol, "adapter switch", adapter="dc-local")  # in #general
    assert refused.ephemeral and h.response_text(refused) == str(NotChannelManager())
    assert await _bound(h) == (None, None)
    assert [type(e) for e in h.command_errors()] == [NotChannelManager]


async def test_a_member_without_manage_channels_changes_nothing(h, tmp_path) -> None:
    ref = _import(h, tmp_path, "dc-guarded", seed=33)
    await h.slash(h.admin, "adapter switch", adapter="dc-guarded")  # admin rights suffice
    message = str(NotChannelManager())
    assert "\n" not in message

    for command, options in (
        ("adapter switch", {"adapter": "base"}),
        ("adapter reset", {}),
        ("adapter rollback", {}),
    ):
        refused = await h.slash(h.bob, command, **options)
        assert refused.ephemeral and h.response_text(refused) == message, command
    assert [type(e) for e in h.command_errors()] == [NotChannelManager] * 3
    assert await _bound(h) == ("dc-guarded", None)
    assert h.bot.app.registry.info("dc-guarded").promoted == "v1"  # no rollback either
    assert (await h.bot.app.channels.resolve(_ref(h))).adapter == ref

    shown = await h.slash(h.bob, "adapter info")  # reading is for everyone
    assert "**dc-guarded@v1**" in h.response_text(shown)


async def test_unknown_and_other_servers_adapters_are_refused_and_never_shown(h, tmp_path) -> None:
    ours = _import(h, tmp_path, "dc-ours", seed=34)
    elsewhere = h.env.create_guild("elsewhere")
    _import(h, tmp_path, "dc-theirs", seed=35, server=str(elsewhere.id))
    await h.slash(h.admin, "adapter switch", adapter="dc-ours")

    for name in ("dc-nope", "dc-theirs", "dc-theirs@v1"):
        refused = await h.slash(h.admin, "adapter switch", adapter=name)
        text = h.response_text(refused)
        bare = name.partition("@")[0]
        assert refused.ephemeral and text == f"there is no adapter named {bare} in this server"
    assert [type(e) for e in h.command_errors()] == [AdapterError] * 3
    assert await _bound(h) == ("dc-ours", None)
    assert (await h.bot.app.channels.resolve(_ref(h))).adapter == ours

    listed = h.response_text(await h.slash(h.alice, "adapter list"))
    assert "**dc-ours**" in listed and "dc-theirs" not in listed
    assert f"<#{h.channel.id}>" in listed  # where it answers
    visitor = elsewhere.add_member(h.env.create_user("visitor"))
    lobby = elsewhere.create_text_channel("lobby")
    their_list = h.response_text(await h.slash(visitor, "adapter list", channel=lobby))
    assert "**dc-theirs**" in their_list and "dc-ours" not in their_list

    offered = await h.admin.autocomplete(h.channel, "adapter switch", "adapter", "")
    assert [c["value"] for c in offered] == ["base", "dc-ours", "dc-ours@v1"]
    typed = await h.admin.autocomplete(h.channel, "adapter switch", "adapter", "THEIRS")
    assert typed == []
    assert "dc-theirs" not in await h.bot.app.channels.names(str(h.guild.id))


async def test_info_rollback_and_reset(h, tmp_path) -> None:
    v1 = _import(h, tmp_path, "dc-roll", seed=36)
    v2 = _import(h, tmp_path, "dc-roll", seed=37)
    done = await h.slash(h.admin, "adapter switch", adapter="dc-roll")
    assert "**dc-roll@v2**" in h.response_text(done)

    info = h.response_text(await h.slash(h.alice, "adapter info"))
    assert info.splitlines()[:2] == [
        "This channel answers with **dc-roll@v2**.",
        "Bound to **dc-roll** (its promoted version, this channel's setting).",
    ]

    rolled = await h.slash(h.admin, "adapter rollback")
    assert rolled.ephemeral and h.response_text(rolled) == (
        f"Rolled back **{v2}**; it will not be promoted again. Now: **{v1}**."
    )
    assert await _asked_with(h) == v1
    info = h.response_text(await h.slash(h.alice, "adapter info"))
    assert info.startswith("This channel answers with **dc-roll@v1**.")

    reset = await h.slash(h.admin, "adapter reset")
    assert reset.ephemeral and "base model" in h.response_text(reset)
    assert await _bound(h) == (None, None)
    assert await _asked_with(h) is None
    info = h.response_text(await h.slash(h.alice, "adapter info"))
    assert info == "This channel answers with **the base model**."


async def test_switch_in_a_thread_acts_on_the_parent_channel(h, tmp_path) -> None:
    ref = _import(h, tmp_path, "dc-thread", seed=38)
    thread = h.thread()
    done = await h.slash(h.admin, "adapter switch", channel=thread, adapter="dc-thread")
    assert "**dc-thread@v1**" in h.response_text(done)
    assert await _bound(h) == ("dc-thread", None)  # #general's binding
    assert await _bound(h, thread) == (None, None)  # none of the thread's own
    shown = h.response_text(await h.slash(h.alice, "adapter info", channel=thread))
    assert shown.startswith("This channel answers with **dc-thread@v1**.")
    assert await _asked_with(h) == ref


async def test_a_corrupt_version_is_refused_and_the_channel_keeps_its_version(h, tmp_path) -> None:
    v1 = _import(h, tmp_path, "dc-corrupt", seed=39)
    await h.slash(h.admin, "adapter switch", adapter="dc-corrupt")  # follows the promoted one
    v2 = _import(h, tmp_path, "dc-corrupt", seed=40)  # promoted at once, then damaged on disk
    weights = h.bot.app.registry.version_dir(v2.name, v2.version) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))

    refused = await h.slash(h.admin, "adapter switch", adapter="dc-corrupt@v2")
    text = h.response_text(refused)
    assert refused.ephemeral and "\n" not in text
    assert text.startswith("adapter dc-corrupt@v2 is corrupt"), text
    assert [type(e) for e in h.command_errors()] == [AdapterError]
    assert await _bound(h) == ("dc-corrupt", None)

    assert await _asked_with(h) == v1  # the promoted v2 cannot load: v1 keeps answering
    info = h.response_text(await h.slash(h.alice, "adapter info"))
    assert info.startswith("This channel answers with **dc-corrupt@v1**.")
    assert "dc-corrupt@v2 could not be loaded" in info


async def test_a_server_default_serves_channels_without_their_own(h, tmp_path) -> None:
    ref = _import(h, tmp_path, "dc-default", seed=41)
    fresh = h.guild.create_text_channel("fresh")
    refused = await h.slash(_manager(h), "adapter default", adapter="dc-default")
    assert refused.ephemeral and "admins of this server" in h.response_text(refused)
    assert [type(e) for e in h.command_errors()] == [NotAdmin]
    assert await _asked_with(h, fresh) is None

    done = await h.slash(h.admin, "adapter default", adapter="dc-default")
    assert "**dc-default@v1**" in h.response_text(done)
    assert await _asked_with(h, fresh) == ref  # no binding of its own: the server's default
    await h.slash(h.admin, "adapter reset", channel=fresh)  # its own binding: the base model
    assert await _asked_with(h, fresh) is None
    assert await _asked_with(h) == ref  # #general has none of its own
    await h.slash(h.admin, "adapter default", adapter="clear")
    assert await _asked_with(h) is None
