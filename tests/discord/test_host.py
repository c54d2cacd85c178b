"""The bot host: who may run which command, plugin loading and reloading, command sync only on
change. The permission table these tests follow is in docs/discord.md."""

from __future__ import annotations

import discord
import pytest
from fake_engines import ScriptedEngine

from core.discord import NotAdmin, NotBotAdmin
from core.discord.bot import PluginNotAllowed
from core.discord.sync import CommandSync

ECHO = """
from discord import app_commands
from discord.ext import commands


class Echo(commands.Cog):
    @app_commands.command(name="echo", description="Say the plugin's version")
    async def echo(self, interaction):
        await interaction.response.send_message("{reply}")


async def setup(bot):
    await bot.add_cog(Echo())
"""

BROKEN = """
raise RuntimeError("this plugin is broken on purpose")
"""


async def test_bot_wide_commands_are_for_the_owner_and_configured_admins(
    make_offline_harness,
) -> None:
    h = await make_offline_harness(ScriptedEngine())
    helper_role = h.guild.create_role("Helpers")
    helper = h.member("helper", helper_role)
    listed = h.member("listed")
    h.reconfigure(admin_role_ids=(helper_role.id,), admin_user_ids=(listed.id,))

    for member in (h.alice, h.admin):  # a server's Administrator is not the bot's admin
        refused = await h.slash(member, "plugins list")
        assert refused.ephemeral
        assert refused.response.content == str(NotBotAdmin())
        assert "a server's Administrator permission is not enough" in refused.response.content
    assert [type(e) for e in h.command_errors()] == [NotBotAdmin, NotBotAdmin]

    for member in (h.owner, helper, listed):
        accepted = await h.slash(member, "plugins list")
        assert accepted.ephemeral
        assert "`ask`" in accepted.response.content and "`admin`" in accepted.response.content


async def test_the_owner_comes_from_the_application_info(make_offline_harness) -> None:
    h = await make_offline_harness(ScriptedEngine())
    h.bot.owner_id = None  # as in production: is_owner asks Discord who owns the application

    refused = await h.slash(h.owner, "plugins list")

    assert refused.response.content == str(NotBotAdmin())
    assert h.bot.owner_id == h.bot.user.id  # SimCord's application is owned by the bot itself
    assert [type(e) for e in h.command_errors()] == [NotBotAdmin]


async def test_a_server_administrator_cannot_reload_a_plugin(
    make_offline_harness, plugin_dir
) -> None:
    plugin_dir.write("echo", ECHO.replace("{reply}", "v1"))
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["ask", "admin", "echo"]})
    plugin_dir.write("echo", ECHO.replace("{reply}", "v2"))

    refused = await h.slash(h.admin, "plugins reload", name="echo")

    assert refused.ephemeral and refused.response.content == str(NotBotAdmin())
    assert [type(e) for e in h.command_errors()] == [NotBotAdmin]
    assert (await h.slash(h.alice, "echo")).response.content == "v1"  # not reloaded
    allowed = await h.slash(h.owner, "plugins reload", name="echo")
    assert "`echo` reloaded" in h.response_text(allowed)
    assert (await h.slash(h.alice, "echo")).response.content == "v2"


async def test_a_plugin_left_out_of_the_settings_is_refused_even_to_the_owner(
    make_offline_harness,
) -> None:
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["ask", "admin"]})
    syncs = len(h.command_syncs())

    refused = await h.slash(h.owner, "plugins reload", name="quotes")

    assert refused.ephemeral
    assert refused.response.content == (
        "`quotes` is not one of this bot's plugins (the discord.plugins setting lists: ask, "
        "admin); the operator adds plugins there"
    )
    assert [type(e) for e in h.command_errors()] == [PluginNotAllowed]
    assert "quotes" not in h.bot.plugin_names()
    assert len(h.command_syncs()) == syncs
    with pytest.raises(PluginNotAllowed, match="`quotes` is not one of this bot's plugins"):
        await h.bot.load_plugin("quotes")  # the host itself refuses, whoever asks


async def test_per_server_commands_are_for_administrator_or_manage_server(
    make_offline_harness,
) -> None:
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["quotes"]})
    managers = h.guild.create_role("Managers", permissions=discord.Permissions(manage_guild=True))
    manager = h.member("manager", managers)

    for member in (h.alice, h.owner):  # owning the bot gives no rights in a server
        refused = await h.slash(member, "quote enable")
        assert refused.ephemeral and refused.response.content == str(NotAdmin())
    assert [type(e) for e in h.command_errors()] == [NotAdmin, NotAdmin]

    for member in (h.admin, manager):
        accepted = await h.slash(member, "quote enable")
        assert accepted.ephemeral and "on here" in accepted.response.content


async def test_a_broken_plugin_does_not_stop_the_others(make_offline_harness, plugin_dir) -> None:
    plugin_dir.write("broken", BROKEN)
    h = await make_offline_harness(
        ScriptedEngine(["still ", "answering"]),
        discord={"plugins": ["broken", "ask", "admin"]},
    )
    h.logs.expect("plugin 'broken' failed to load")

    answer = await h.ask(h.alice, "are you there?")
    assert answer.response.content == "still answering"
    listing = await h.slash(h.owner, "plugins list")
    assert "\N{CROSS MARK} `broken`: RuntimeError: this plugin is broken on purpose" in (
        listing.response.content
    )


async def test_reload_picks_up_changes_and_keeps_the_old_version_on_failure(
    make_offline_harness, plugin_dir
) -> None:
    plugin_dir.write("echo", ECHO.replace("{reply}", "v1"))
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["ask", "admin", "echo"]})
    assert (await h.slash(h.alice, "echo")).response.content == "v1"

    plugin_dir.write("echo", ECHO.replace("{reply}", "v2"))
    reloaded = await h.slash(h.owner, "plugins reload", name="echo")
    assert "`echo` reloaded" in h.response_text(reloaded)
    assert (await h.slash(h.alice, "echo")).response.content == "v2"

    plugin_dir.write("echo", BROKEN)
    failed = await h.slash(h.owner, "plugins reload", name="echo")
    assert "failed to load" in h.response_text(failed)
    assert "previous version is still running" in h.response_text(failed)
    h.logs.expect("plugin 'echo' failed to load")
    assert (await h.slash(h.alice, "echo")).response.content == "v2"

    refused = await h.slash(h.alice, "plugins reload", name="echo")
    assert refused.response.content == str(NotBotAdmin())
    assert [type(e) for e in h.command_errors()] == [NotBotAdmin]


async def test_reload_with_a_new_command_syncs_again(make_offline_harness, plugin_dir) -> None:
    plugin_dir.write("echo", ECHO.replace("{reply}", "v1"))
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["ask", "admin", "echo"]})
    syncs = len(h.command_syncs())
    plugin_dir.write("echo", ECHO.replace("{reply}", "v1").replace('name="echo"', 'name="echo2"'))

    result = await h.slash(h.owner, "plugins reload", name="echo")

    assert "Commands re-synced" in h.response_text(result)
    assert len(h.command_syncs()) == syncs + 1
    assert (await h.slash(h.alice, "echo2")).response.content == "v1"


async def test_second_start_with_unchanged_commands_does_not_sync(make_offline_harness) -> None:
    h = await make_offline_harness(ScriptedEngine(["hi"]))
    assert len(h.command_syncs()) == 1
    assert (h.bot.settings.data_dir / "discord_commands.json").is_file()

    again = await h.restart()

    assert len(h.command_syncs()) == 1
    assert again.command_sync.syncs == 0
    assert (await h.ask(h.alice, "still there?")).response.content == "hi"


FAILING = """
from discord import app_commands
from discord.ext import commands

from core.errors import LoracordError


class Failing(commands.Cog):
    @app_commands.command(name="oops", description="Fail like a bug")
    async def oops(self, interaction):
        raise RuntimeError("a bug")

    @app_commands.command(name="nope", description="Fail like a user error")
    async def nope(self, interaction):
        raise LoracordError("that channel has no adapter yet")


async def setup(bot):
    await bot.add_cog(Failing())
"""


async def test_errors_become_ephemeral_messages_and_bugs_are_logged(
    make_offline_harness, plugin_dir
) -> None:
    plugin_dir.write("failing", FAILING)
    h = await make_offline_harness(ScriptedEngine(), discord={"plugins": ["failing"]})

    user_error = await h.slash(h.alice, "nope")
    assert user_error.ephemeral
    assert user_error.response.content == "that channel has no adapter yet"
    assert not h.logs.records

    bug = await h.slash(h.alice, "oops")
    assert bug.ephemeral and "Something went wrong" in bug.response.content
    (record,) = h.logs.expect("command /oops failed")
    assert record.exc_info and "a bug" in str(record.exc_info[1])
    assert [type(e).__name__ for e in h.command_errors()] == ["LoracordError", "RuntimeError"]


async def test_dev_guild_sync_goes_to_that_guild_once(make_offline_harness) -> None:
    h = await make_offline_harness(ScriptedEngine(["guild answer"]))
    h.reconfigure(dev_guild=h.guild.id)
    h.bot.command_sync = CommandSync(h.bot.tree, h.bot.settings.data_dir, h.guild.id)

    assert await h.bot.sync_commands()
    assert not await h.bot.sync_commands()  # unchanged: not sent again

    (guild_sync,) = [r for r in h.command_syncs() if f"/guilds/{h.guild.id}/" in r.path]
    # The default plugins: ask, admin, quotes (a slash group and a message menu), adapters,
    # training.
    commands = {c["name"] for c in guild_sync.json}
    assert commands == {"ask", "plugins", "quote", "Save as quote", "adapter", "train"}
    assert (await h.ask(h.alice, "hi")).response.content == "guild answer"
