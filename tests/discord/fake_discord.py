"""A small fake Discord on 127.0.0.1: REST API and gateway, for one real-socket smoke test.

Only what a bot needs to log in, receive READY and GUILD_CREATE, sync its commands and answer
one slash command. Payloads are complete enough for discord.py 2.7's parsers, which need:
JSON bodies with exactly `Content-Type: application/json`, the interaction callback
answered with JSON (discord.py asks `?with_response=1`), `attachment_size_limit`, member `flags`.
Every REST request is recorded; tests wait on them with `wait_for`, never on the clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

APP_ID = 900000000000000001
GUILD_ID = 900000000000000002
CHANNEL_ID = 900000000000000003
USER_ID = 900000000000000004
NOW = "2026-01-01T00:00:00.000000+00:00"
ALL_PERMISSIONS = str((1 << 50) - 1)

BOT_USER = {
    "id": str(APP_ID),
    "username": "loracord",
    "discriminator": "0",
    "global_name": "loracord",
    "avatar": None,
    "bot": True,
    "flags": 0,
}
HUMAN = {
    "id": str(USER_ID),
    "username": "alice",
    "discriminator": "0",
    "global_name": "alice",
    "avatar": None,
    "flags": 0,
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any


def _member(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "user": user,
        "roles": [],
        "joined_at": NOW,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "nick": None,
        "avatar": None,
        "pending": False,
    }


def _guild() -> dict[str, Any]:
    everyone = {
        "id": str(GUILD_ID),
        "name": "@everyone",
        "permissions": ALL_PERMISSIONS,
        "position": 0,
        "color": 0,
        "hoist": False,
        "managed": False,
        "mentionable": False,
        "flags": 0,
    }
    channel = {
        "id": str(CHANNEL_ID),
        "type": 0,
        "name": "general",
        "position": 0,
        "permission_overwrites": [],
        "guild_id": str(GUILD_ID),
        "nsfw": False,
        "parent_id": None,
        "topic": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
    }
    return {
        "id": str(GUILD_ID),
        "name": "smoke",
        "icon": None,
        "owner_id": str(USER_ID),
        "roles": [everyone],
        "emojis": [],
        "stickers": [],
        "features": [],
        "members": [_member(BOT_USER)],
        "channels": [channel],
        "threads": [],
        "voice_states": [],
        "presences": [],
        "member_count": 2,
        "large": False,
        "unavailable": False,
        "joined_at": NOW,
        "preferred_locale": "en-US",
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "premium_tier": 0,
        "system_channel_flags": 0,
        "afk_timeout": 300,
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
    }


def _message(message_id: int, content: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(message_id),
        "channel_id": str(CHANNEL_ID),
        "guild_id": str(GUILD_ID),
        "author": BOT_USER,
        "content": content,
        "timestamp": NOW,
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 20,
        "flags": 0,
        "components": body.get("components", []),
        "application_id": str(APP_ID),
        "webhook_id": str(APP_ID),
    }


class FakeDiscord:
    """The fake: start it, point discord.py at `api_base` and `gateway_url`, then drive it."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.commands: list[dict[str, Any]] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(910000000000000000)
        self._changed = asyncio.Condition()
        self._socket: web.WebSocketResponse | None = None
        self._seq = itertools.count(1)
        self.identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def wait_for(self, check: Callable[[FakeDiscord], Any], timeout: float = 120.0) -> Any:
        """Wait until `check(self)` is truthy (re-checked on every request); returns it."""
        async with self._changed:
            return await asyncio.wait_for(self._changed.wait_for(lambda: check(self)), timeout)

    async def _record(self, recorded: Recorded) -> None:
        async with self._changed:
            self.requests.append(recorded)
            self._changed.notify_all()

    # -- gateway ---------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket = socket
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}}))
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            if message["op"] == 1:
                await socket.send_str(json.dumps({"op": 11}))
            elif message["op"] == 2:
                await self._ready()
        return socket

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        assert self._socket is not None, "no bot connected"
        frame = {"op": 0, "t": event, "s": next(self._seq), "d": data}
        await self._socket.send_str(json.dumps(frame))

    async def _ready(self) -> None:
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": BOT_USER,
                "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                "session_id": "smoke-session",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(APP_ID), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
            },
        )
        await self.dispatch("GUILD_CREATE", _guild())
        self.identified.set()

    async def slash(self, name: str, options: list[dict[str, Any]]) -> str:
        """Send an INTERACTION_CREATE for `/name`; returns the interaction token."""
        command = next(c for c in self.commands if c["name"] == name)
        token = f"token-{next(self._ids)}"
        await self.dispatch(
            "INTERACTION_CREATE",
            {
                "id": str(next(self._ids)),
                "application_id": str(APP_ID),
                "type": 2,
                "data": {"id": command["id"], "name": name, "type": 1, "options": options},
                "guild_id": str(GUILD_ID),
                "channel_id": str(CHANNEL_ID),
                "channel": {
                    "id": str(CHANNEL_ID),
                    "type": 0,
                    "guild_id": str(GUILD_ID),
                    "name": "general",
                    "position": 0,
                    "permission_overwrites": [],
                },
                "member": {**_member(HUMAN), "permissions": ALL_PERMISSIONS},
                "token": token,
                "version": 1,
                "app_permissions": ALL_PERMISSIONS,
                "locale": "en-US",
                "guild_locale": "en-US",
                "entitlements": [],
                "authorizing_integration_owners": {"0": str(GUILD_ID)},
                "context": 0,
                "attachment_size_limit": 10 * 1024 * 1024,
            },
        )
        return token

    # -- REST ------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.json() if request.can_read_body else None
        await self._record(Recorded(request.method, path, dict(request.query), body))
        payload = self._answer(request.method, path, body)
        if payload is None:
            return _json({"message": "404: Not Found", "code": 0}, status=404)
        return _json(payload)

    def _answer(self, method: str, path: str, body: Any) -> Any:
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/users/@me"):
            return BOT_USER
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return {
                "id": str(APP_ID),
                "name": "loracord",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": HUMAN,
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
            }
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            self.commands = [
                {
                    "description": "",
                    **c,
                    "id": str(next(self._ids)),
                    "application_id": str(APP_ID),
                    "version": "1",
                }
                for c in body
            ]
            return self.commands
        if method == "POST" and parts[0] == "interactions":
            message_id = next(self._ids)
            return {
                "interaction": {
                    "id": parts[1],
                    "type": 2,
                    "response_message_id": str(message_id),
                    "response_message_loading": body.get("type") == 5,
                    "response_message_ephemeral": False,
                }
            }
        if parts[0] == "webhooks" and method in ("PATCH", "POST"):
            key = parts[2] if method == "POST" else f"{parts[2]}/{parts[-1]}"
            content = (body or {}).get("content") or ""
            message = _message(next(self._ids), content, body or {})
            self.messages[key] = message
            return message
        return None

    def originals(self, token: str) -> list[Recorded]:
        """The edits of an interaction's original response, in order."""
        return [
            r
            for r in self.requests
            if r.method == "PATCH" and r.path.endswith(f"/{token}/messages/@original")
        ]


def _json(payload: Any, status: int = 200) -> web.Response:
    # `body`, not `text`: aiohttp would add "; charset=utf-8", and discord.py then reads text.
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        headers={"Content-Type": "application/json"},
    )
