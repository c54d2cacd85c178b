"""Command sync: push the command tree to Discord only when it changed.

Global sync is rate-limited by Discord, so the payload's hash is kept per target (application
and guild, or global) in `data_dir/discord_commands.json`; an unchanged tree is not sent again.
With `dev_guild` set, the global commands are copied to that guild and synced there (instant).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import discord
from discord import app_commands

log = logging.getLogger(__name__)

STATE_FILE = "discord_commands.json"


def _canonical(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


class CommandSync:
    """Syncs a tree to its target when the payload's hash differs from the stored one."""

    def __init__(self, tree: app_commands.CommandTree, data_dir: Path, dev_guild: int | None):
        self.tree = tree
        self.path = data_dir / STATE_FILE
        self.guild = discord.Object(id=dev_guild) if dev_guild else None
        self.syncs = 0

    def _target(self, application_id: int | None) -> str:
        where = f"guild:{self.guild.id}" if self.guild else "global"
        return f"{application_id}:{where}"

    def payload_hash(self) -> str:
        """The hash of what a sync would send now."""
        if self.guild is not None:
            self.tree.clear_commands(guild=self.guild)
            self.tree.copy_global_to(guild=self.guild)
        commands = self.tree.get_commands(guild=self.guild)
        payload = sorted((c.to_dict(self.tree) for c in commands), key=_canonical)
        return hashlib.sha256(_canonical(payload).encode()).hexdigest()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("ignoring unreadable %s; commands will be synced", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, state: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(temporary, self.path)

    async def sync(self, *, force: bool = False) -> bool:
        """Sync if the commands changed (or `force`); returns whether a sync was sent."""
        target = self._target(self.tree.client.application_id)
        digest = self.payload_hash()
        state = self._read()
        if not force and state.get(target) == digest:
            log.info("commands unchanged since the last sync (%s); not syncing", target)
            return False
        synced = await self.tree.sync(guild=self.guild)
        self.syncs += 1
        state[target] = digest
        self._write(state)
        log.info("synced %d commands to %s", len(synced), target)
        return True
