"""`loracord adapters ...`: the operator's adapter commands, straight on the registry and the
database (no model is loaded, so they work beside a running bot, which picks every change up
within a few seconds).

`list` shows every adapter (or one server's) with its versions, promoted version and channels;
`switch` binds a channel to `name[@version]` (or `base`), `reset` binds it to the base model,
`rollback` moves its adapter back to the previous promoted version, `info` shows what answers
in a channel, `default` sets a server's default adapter (for its channels bound to none), and
`import` takes a PEFT LoRA folder made on the served model. Commands that
check an adapter against the served model locate that model first (building the embedded one
on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli_quotes import resolve_channel
from core.names import CONSOLE_SERVER, server_name

if TYPE_CHECKING:
    from core.channels import AdapterReport, ChannelAdapters
    from core.settings import Settings


def add_parser(subparsers: Any) -> None:
    """Register `adapters` and its actions on the top-level subparsers."""
    adapters = subparsers.add_parser(
        "adapters", help="list, switch, roll back or import LoRA adapters"
    )
    actions = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    lst = actions.add_parser("list", help="adapters with their versions and channels")
    lst.add_argument("--server", help="only this server's adapters (a Discord id or 'console')")
    lst.add_argument("--json", action="store_true", help="print a JSON array")

    def channel_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--channel", required=True, help="console channel name, or a Discord channel id"
        )
        parser.add_argument("--server", help="Discord server id (for a channel not seen yet)")
        parser.add_argument("--json", action="store_true", help="print JSON")

    switch = actions.add_parser("switch", help="answer in a channel with NAME[@VERSION]")
    channel_args(switch)
    switch.add_argument("adapter", metavar="NAME[@VERSION]", help="an adapter, or 'base'")
    reset = actions.add_parser("reset", help="answer in a channel from the base model")
    channel_args(reset)
    rollback = actions.add_parser(
        "rollback", help="move a channel's adapter back to its previous version"
    )
    channel_args(rollback)
    info = actions.add_parser("info", help="what answers in a channel, and why")
    channel_args(info)

    default = actions.add_parser(
        "default", help="the adapter of a server's channels that have none of their own"
    )
    default.add_argument("--server", required=True, help="a Discord server id, or 'console'")
    which = default.add_mutually_exclusive_group(required=True)
    which.add_argument("adapter", nargs="?", metavar="NAME[@VERSION]", help="or 'base'")
    which.add_argument("--clear", action="store_true", help="no default: the base model")

    imp = actions.add_parser(
        "import",
        help="import a PEFT LoRA folder made on the served model",
        description="Import a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) "
        "made on the served model, as the next version of NAME, promoted at once. It is "
        "checked first: shapes, rank, targets, LoRA variant and file integrity.",
    )
    imp.add_argument("path", type=Path, help="the PEFT adapter folder")
    imp.add_argument("--name", required=True, help="adapter name: a-z, 0-9, '-' and '_'")
    imp.add_argument(
        "--server", default=CONSOLE_SERVER, help="the server it belongs to (default: console)"
    )
    imp.add_argument("--json", action="store_true", help="print JSON")
    default.add_argument("--json", action="store_true", help="print JSON")


def _service(settings: Settings) -> ChannelAdapters:
    from core.app import build_registry, locate_model
    from core.channels import ChannelAdapters, served_model_base
    from core.store import AsyncQuoteStore, QuoteStore

    def base() -> Any:
        return served_model_base(locate_model(settings).path)

    store = AsyncQuoteStore(QuoteStore.from_settings(settings))
    return ChannelAdapters(store, build_registry(settings), None, base)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `adapters` action; returns the exit status."""
    return asyncio.run(_run(settings, args))


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    service = _service(settings)
    await service.store.open()
    try:
        return await _action(service, settings, args)
    finally:
        await service.store.close()


async def _action(service: ChannelAdapters, settings: Settings, args: argparse.Namespace) -> int:
    command = args.adapters_command
    if command == "list":
        server = server_name(args.server) if args.server else None
        rows = await service.listing(server)
        if args.json:
            print(json.dumps(rows, ensure_ascii=False))
        elif not rows:
            print("no adapters yet" + (f" in server {server}" if server else ""))
        else:
            for row in rows:
                promoted = row["promoted"] or "none promoted"
                channels = ", ".join(row["channels"]) or "no channels"
                print(
                    f"{row['name']}  ({row['server']})  {promoted}  "
                    f"versions: {', '.join(row['versions'])}  channels: {channels}"
                )
        return 0
    if command == "import":
        from core.adapters import adapter_name

        name = adapter_name(args.name)
        server = server_name(args.server)
        shapes, fingerprint = service.base
        version = await asyncio.to_thread(
            service.registry.import_folder, args.path, name, server, shapes, fingerprint
        )
        result = {"name": name, "version": version.version, "server": server, "promoted": True}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"imported {name}@{version.version} (promoted) for server {server}")
        return 0
    if command == "default":
        server = server_name(args.server)
        default = await service.set_default(server, None if args.clear else args.adapter)
        if args.json:
            print(json.dumps({"server": server, "default": default}))
        else:
            print(f"server {server}: channels without their own adapter answer with {default}")
        return 0
    channel = await asyncio.to_thread(
        resolve_channel, service.store.sync, args.channel, args.server
    )
    if command in ("switch", "reset"):
        await service.switch(channel, "base" if command == "reset" else args.adapter)
        report = await service.info(channel)
        _print_report(report, args.json, f"{channel.channel} now answers with")
        return 0
    if command == "rollback":
        left, now = await service.rollback(channel)
        result = {"left": str(left), "now": str(now) if now else None}
        if args.json:
            print(json.dumps(result))
        else:
            target = str(now) if now else "the base model (no earlier version)"
            print(f"rolled back {left} (marked rejected); {channel.channel} now uses {target}")
        return 0
    assert command == "info"
    _print_report(await service.info(channel), args.json, f"{channel.channel} answers with")
    return 0


def report_dict(report: AdapterReport) -> dict[str, Any]:
    served = report.served
    return {
        "channel": report.channel.channel,
        "server": report.channel.server,
        "adapter": str(served.adapter) if served.adapter else None,
        "bound": served.binding.adapter,
        "pinned": served.binding.version,
        "binding": served.binding.source,
        "promoted": report.promoted,
        "versions": list(report.versions),
        "fallback_reason": served.reason,
        "eval_loss": report.meta.get("eval_loss"),
        "created_at": report.meta.get("created_at"),
    }


def _print_report(report: AdapterReport, as_json: bool, lead: str) -> None:
    if as_json:
        print(json.dumps(report_dict(report), ensure_ascii=False))
        return
    print(f"{lead} {report.served.describe()}")
    if report.served.reason:
        print(f"loracord: {report.served.reason}", file=sys.stderr)
