"""`loracord quotes ...`: the operator's quote commands, straight on the database.

`add_parser(subparsers)` registers the command; `run(settings, args)` runs it and returns the exit
status. Nothing here loads the model: the store is all these commands need, so they work beside a
running bot. The operator is trusted: adding works in channels with collection off and has no
daily cap. Channels are console channel names, or Discord channel ids the store has seen; every
name goes through `core.names`. Errors point to these commands, never to Discord's `/quote`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import QuoteError, QuoteNotFound
from core.names import CONSOLE_SERVER, channel_name, server_name

if TYPE_CHECKING:
    from core.settings import Settings
    from core.store import ChannelRef, Quote, QuoteStore

# Discord ids are snowflakes (15 to 20 digits today); shorter digit names are console channels.
_SNOWFLAKE = re.compile(r"^\d{15,21}$")
_MAX_ID = 2**63 - 1
_PROGRESS_EVERY = 5000


def _count(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _quote_id(text: str) -> int:
    """argparse type: a quote id (a whole number that fits the database)."""
    value = _count(text)
    if value > _MAX_ID:
        raise argparse.ArgumentTypeError(f"{text} is larger than any quote id")
    return value


def _channel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel", required=True, help="console channel name, or a Discord channel id"
    )
    parser.add_argument("--server", help="Discord server id (for a channel the bot has not seen)")


def add_parser(subparsers: Any) -> None:
    """Register `quotes` and its actions on the top-level subparsers."""
    quotes = subparsers.add_parser("quotes", help="add, import, list, forget or export quotes")
    actions = quotes.add_subparsers(dest="quotes_command", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="save one quote")
    _channel_args(add)
    add.add_argument("text", help="the quote")
    add.add_argument("--author", help="who said it")
    add.add_argument("--author-id", help="the author's Discord user id")

    imp = actions.add_parser(
        "import",
        help="import a JSON, JSONL, CSV, plain text or fortune file",
        description="Import quotes, all or nothing. The format follows the extension: .json, "
        ".jsonl, .csv (quote/text, author/from, tags), .txt (one quote per line), .fortune or "
        "no extension (quotes between '%%' lines); other extensions are refused.",
    )
    _channel_args(imp)
    imp.add_argument("file", type=Path)
    imp.add_argument("--format", choices=("json", "jsonl", "csv", "txt", "fortune"))

    lst = actions.add_parser("list", help="list a channel's quotes")
    _channel_args(lst)
    lst.add_argument("--member", help="only this author id's quotes")
    lst.add_argument("--limit", type=_count, help="at most this many (1 or more)")
    lst.add_argument("--json", action="store_true", help="print a JSON array")

    forget = actions.add_parser("forget", help="remove a member's quotes, or one quote")
    _channel_args(forget)
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("--member", help="remove this author id's quotes in the channel's server")
    which.add_argument("--id", type=_quote_id, help="remove the quote with this id")

    export = actions.add_parser("export", help="write a member's quotes as JSON")
    export.add_argument("--member", required=True, help="the author's id")
    export.add_argument("--output", type=Path, help="file to write (default: stdout)")

    for name, verb in (("enable", "turn on"), ("disable", "turn off")):
        toggle = actions.add_parser(name, help=f"{verb} collection from Discord in a channel")
        _channel_args(toggle)


def resolve_channel(store: QuoteStore, channel: str, server: str | None) -> ChannelRef:
    """`--channel` (and `--server`) as the store's (server, channel); names are checked."""
    from core.store import ChannelRef

    name = channel_name(channel)
    if server is not None:
        return ChannelRef(server_name(server), name)
    if _SNOWFLAKE.match(name):
        known = store.find_channel(name)
        if len(known) == 1:
            return known[0]
        raise QuoteNotFound(
            f"Discord channel {name} is not known to the store yet (the bot records a channel "
            "when it first sees it); pass --server ID to name its server"
            if not known
            else f"channel id {name} is known in several servers; pass --server ID"
        )
    return ChannelRef(CONSOLE_SERVER, name)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `quotes` action; returns the exit status (errors raise `LoracordError`)."""
    from core.store import QuoteStore

    with QuoteStore.from_settings(settings) as store:
        if args.quotes_command == "export":
            return _export(store, args)
        ref = resolve_channel(store, args.channel, args.server)
        handler = {
            "add": _add,
            "import": _import,
            "list": _list,
            "forget": _forget,
            "enable": _toggle,
            "disable": _toggle,
        }[args.quotes_command]
        return handler(store, ref, args)


def _notice(text: str) -> None:
    print(f"loracord: {text}", file=sys.stderr)


def _add(store: QuoteStore, ref: ChannelRef, args: argparse.Namespace) -> int:
    result = store.add(
        ref,
        args.text,
        source="command",
        author_name=args.author,
        author_id=args.author_id,
        operator=True,
    )
    for notice in result.notices:
        _notice(notice)
    verb = "added" if result.created else "already saved as"
    print(f"{verb} quote #{result.quote.id} in {ref}")
    return 0


def _progress(done: int, total: int) -> None:
    """A count on stderr while a long import runs, only for a person watching a terminal."""
    if total < _PROGRESS_EVERY or not sys.stderr.isatty():
        return
    end = "\n" if done == total else ""
    print(f"\rloracord: staged {done}/{total} quotes", end=end, file=sys.stderr, flush=True)


def _import(store: QuoteStore, ref: ChannelRef, args: argparse.Namespace) -> int:
    from core.quotes_import import read_file

    items = read_file(args.file, args.format)
    report = store.import_quotes(ref, items, progress=_progress)
    for notice in report.notices:
        _notice(notice)
    print(f"imported {report.added} quotes into {ref} ({report.duplicates} duplicates skipped)")
    return 0


def _quote_line(quote: Quote) -> str:
    author = f" — {quote.author_name}" if quote.author_name else ""
    text = quote.text.replace("\n", " / ")
    return f"#{quote.id}  {text}{author}"


def _list(store: QuoteStore, ref: ChannelRef, args: argparse.Namespace) -> int:
    found = store.list_quotes(ref, author_id=args.member, limit=args.limit)
    if args.json:
        rows = [
            {k: q.as_dict()[k] for k in ("id", "text", "author", "source", "added_at")}
            for q in found
        ]
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for quote in found:
        print(_quote_line(quote))
    if not found:
        _notice(f"no quotes in {ref}")
    return 0


def _forget(store: QuoteStore, ref: ChannelRef, args: argparse.Namespace) -> int:
    if args.id is not None:
        try:
            result = store.forget_quote(args.id, server=ref.server)
        except QuoteNotFound as e:
            raise QuoteNotFound(
                f"{e}; `loracord quotes list --channel {ref.channel}` shows ids"
            ) from e
    else:
        result = store.forget_member(ref.server, args.member)
    print(f"removed {result.removed} quotes")
    for marked in result.marked_for_retraining:
        _notice(f"{marked} was trained on a removed quote: marked for retraining")
    return 0


def _export(store: QuoteStore, args: argparse.Namespace) -> int:
    found = store.export_member(args.member)
    text = json.dumps([q.as_dict() for q in found], ensure_ascii=False, indent=2)
    if args.output is None:
        print(text)
        return 0
    try:
        args.output.write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        raise QuoteError(f"cannot write {args.output}: {e.strerror}") from e
    print(f"wrote {len(found)} quotes to {args.output}")
    return 0


def _toggle(store: QuoteStore, ref: ChannelRef, args: argparse.Namespace) -> int:
    state = store.set_collecting(ref, args.quotes_command == "enable")
    print(f"quote collection is {'on' if state.collecting else 'off'} in {ref}")
    return 0
