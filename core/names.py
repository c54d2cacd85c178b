"""Channel and server names: the one check every path applies before a name is used.

Channel names key database rows and, soon, adapter folders on disk, so a name is either a
console channel name (`general`: ASCII lowercase letters, digits, `-` and `_`, at most 64) or a
Discord id (digits). Anything else (`../../etc/passwd`, an empty name, control or zero-width
characters) raises `InvalidName` with one line that shows the bad value safely.
"""

from __future__ import annotations

import re

from core.errors import InvalidName

CONSOLE_SERVER = "console"
"""The local server of the console and the CLI (the store keys its channels under it)."""

# ASCII only: `\w` would let in look-alike letters and zero-width joiners.
_CONSOLE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
# A Discord snowflake is a 64-bit integer: at most 20 decimal digits.
_DISCORD_ID = re.compile(r"[0-9]{1,20}", re.ASCII)
_SHOWN = 40


def shown(value: str) -> str:
    """`value` as it is safe to print in one line: quoted, escaped, and cut when long."""
    if len(value) <= _SHOWN:
        return repr(value)
    return repr(value[:_SHOWN]) + f"... ({len(value)} characters)"


def channel_name(value: str) -> str:
    """A channel as the store keys it: a console channel name or a Discord channel id.

    Surrounding spaces and one leading `#` are dropped and letters lowercased, as the console
    does when you type `#General`.
    """
    name = value.strip()
    if name.startswith("#"):
        name = name[1:]
    # ASCII before lowercasing: "\u212a" (the Kelvin sign) lowercases to a plain "k".
    name = name.lower() if name.isascii() else name
    if _CONSOLE_NAME.fullmatch(name):
        return name
    raise InvalidName(
        f"{shown(value)} is not a channel name: use 1-64 lowercase letters, digits, '-' and '_' "
        "(starting with a letter or digit), or a Discord channel id"
    )


def server_name(value: str) -> str:
    """A server as the store keys it: `console` or a Discord server id."""
    name = value.strip().lower()
    if name == CONSOLE_SERVER or _DISCORD_ID.fullmatch(name):
        return name
    raise InvalidName(
        f"{shown(value)} is not a server: use a Discord server id (digits) or {CONSOLE_SERVER!r}"
    )


def is_discord_id(value: str) -> bool:
    """Whether a (validated) name is a Discord id rather than a console channel name."""
    return _DISCORD_ID.fullmatch(value) is not None
