"""The bot host: a `commands.Bot` handed loracord's services, loading plugins as extensions.

Importing this module starts nothing. `LoracordBot(app)` holds the services (settings, engine;
later store, registry, trainer through `app`), loads each plugin in `settings.discord.plugins`
as the extension `plugins.<name>` in `setup_hook` (a plugin that fails is logged and skipped;
only the plugins the settings list can ever be loaded, at start or by `/plugins reload`),
syncs the command tree when it changed, and routes every app-command error through one handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from core.errors import LoracordError
from core.model.requests import ChatMessage, GenerationParams, ResponseStream
from core.settings import DiscordSettings, Settings
from core.store import ChannelRef

from .answers import AnswerBoard
from .checks import ChannelKey
from .conversation import AnswerIndex
from .errors import on_app_command_error
from .streaming import NO_MENTIONS
from .sync import CommandSync

if TYPE_CHECKING:
    from core.app import App
    from core.channels import Served
    from core.model.engine import Engine

log = logging.getLogger(__name__)

PLUGIN_PACKAGE = "plugins"


def intents_for(settings: DiscordSettings) -> discord.Intents:
    """Only what loracord needs; message content (privileged) only when the setting asks."""
    intents = discord.Intents.none()
    intents.guilds = True  # channels, threads and roles: admin checks and thread parents
    intents.guild_messages = True  # replies to the bot's answers
    intents.dm_messages = True
    intents.guild_reactions = True  # star reactions (quotes), read as raw events
    intents.message_content = settings.message_content_intent
    return intents


def store_ref(channel: ChannelKey | None) -> ChannelRef | None:
    """A Discord channel key as the store keys channels (None stays None: a DM)."""
    return None if channel is None else ChannelRef.discord(channel.guild_id, channel.channel_id)


class PluginNotAllowed(LoracordError):
    """A plugin outside the `discord.plugins` setting: which plugins run is the operator's choice,
    made in the settings, never from Discord."""

    def __init__(self, name: str, allowed: tuple[str, ...]) -> None:
        listed = ", ".join(allowed) or "none"
        super().__init__(
            f"`{name}` is not one of this bot's plugins (the discord.plugins setting lists: "
            f"{listed}); the operator adds plugins there"
        )


class LoracordBot(commands.Bot):
    """loracord's Discord client: services in, plugins loaded, commands synced."""

    def __init__(self, app: App, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents_for(app.settings.discord),
            allowed_mentions=NO_MENTIONS,
            help_command=None,
        )
        self.app = app
        self.answers = AnswerBoard()
        self.conversations = AnswerIndex()
        self.command_sync = CommandSync(
            self.tree, app.settings.data_dir, app.settings.discord.dev_guild
        )
        self.plugin_errors: dict[str, BaseException] = {}
        # Time for throttling edits and cooldowns; tests hand in a clock they drive.
        self.clock: Callable[[], float] = clock or time.monotonic
        self.tree.on_error = on_app_command_error  # type: ignore[method-assign]

    @property
    def settings(self) -> Settings:
        return self.app.settings

    @property
    def engine(self) -> Engine:
        return self.app.engine

    @staticmethod
    def plugin_module(name: str) -> str:
        return f"{PLUGIN_PACKAGE}.{name}"

    async def setup_hook(self) -> None:
        for name in self.settings.discord.plugins:
            await self.load_plugin(name)
        await self.sync_commands()

    def check_plugin_allowed(self, name: str) -> None:
        """Raise `PluginNotAllowed` unless `name` is in the `discord.plugins` setting."""
        allowed = self.settings.discord.plugins
        if name not in allowed:
            raise PluginNotAllowed(name, allowed)

    async def load_plugin(self, name: str) -> bool:
        """Load (or reload, if loaded) one configured plugin; on failure log it, keep the old
        version. A name the settings do not list raises `PluginNotAllowed`."""
        self.check_plugin_allowed(name)
        module = self.plugin_module(name)
        try:
            if module in self.extensions:
                await self.reload_extension(module)
            else:
                await self.load_extension(module)
        except commands.ExtensionError as e:
            self.plugin_errors[name] = e
            cause = e.__cause__ or e
            log.error("plugin %r failed to load: %s", name, cause, exc_info=cause)
            return False
        self.plugin_errors.pop(name, None)
        log.info("plugin %r loaded", name)
        return True

    def plugin_names(self) -> list[str]:
        """Plugins that are loaded now."""
        prefix = PLUGIN_PACKAGE + "."
        return sorted(m[len(prefix) :] for m in self.extensions if m.startswith(prefix))

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync the command tree if it changed since the last sync."""
        return await self.command_sync.sync(force=force)

    async def ask(
        self,
        channel: ChannelKey | None,
        turns: Sequence[ChatMessage],
        params: GenerationParams,
    ) -> tuple[ResponseStream, Served]:
        """Submit a conversation in `channel` (None: a DM) through the adapter bound there (a
        thread's key is its parent channel's); returns the stream and what serves it."""
        ref = store_ref(channel)
        stream, served = await self.app.channels.submit(ref, turns, params)
        if served.reason:
            log.info("in %s: %s; answering with %s", ref, served.reason, served.describe())
        return stream, served

    async def on_ready(self) -> None:
        log.info(
            "logged in as %s (%s), in %d servers", self.user, self.application_id, len(self.guilds)
        )

    async def close(self) -> None:
        """Stop taking answers, end those in flight with a message, then disconnect."""
        await self.answers.shutdown()
        await super().close()


def create_bot(app: App, *, clock: Callable[[], float] | None = None) -> LoracordBot:
    """The bot for `app`, not yet started."""
    return LoracordBot(app, clock=clock)
