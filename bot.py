"""loracord's entry point: parse the command line, load settings, run Discord, the console or a
CLI command. Logging is configured here and nowhere else.

Every command exits 0 on success; on failure it prints one clear line on stderr and exits 1
(2 for a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core import cli_adapters, cli_quotes, cli_training
from core.errors import LoracordError, SettingsError

log = logging.getLogger("loracord")

# Our own loggers. By default only these speak, and only the essential ones below at INFO.
_OWN = ("loracord", "core", "plugins")
# What a user needs to see even when nothing is asked: the first start's model build (minutes,
# with its progress) and a model download.
_ESSENTIAL = ("loracord", "core.model.build", "core.model.source")
# discord.py's DEBUG log of HTTP requests carries interaction tokens in its URLs.
_TOKEN_BEARING = ("discord.http", "discord.webhook")
_DISCARDED = io.StringIO()


class _BriefFormatter(logging.Formatter):
    """The default format: our notices as `loracord: ...`, anything else with level and source."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno < logging.WARNING and record.name.split(".")[0] in _OWN:
            return f"loracord: {message}"
        return f"loracord: {record.levelname.lower()}: {message} ({record.name})"


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Quiet by default (our essential lines and warnings); -v everything at INFO; -vv DEBUG
    except discord.py's token-bearing HTTP log; -vvv that too."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_BriefFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if not verbose:
        for name in _ESSENTIAL if not quiet else ("core.model.build",):
            logging.getLogger(name).setLevel(logging.INFO)
        warnings.filterwarnings("ignore")
    for name in _TOKEN_BEARING:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 2 else max(level, logging.INFO))


def _quiet_model_libraries(verbose: int) -> None:
    """Silence torch's, GPTQModel's and transformers' start-up chatter unless -v was given.

    They print ~20 lines on every model load (GPTQModel's banner and kernel choice go to stdout
    through its own logger), each configured on import, so each is set here, before the engine
    imports them.
    """
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch  # noqa: F401  (sets up torch's own log handler, which we then quiet)

    logging.getLogger("torch").setLevel(logging.ERROR)
    # GPTQModel's logger, made here first so that its level holds. Importing it prints a blank
    # line into the stdout of that moment (through a writer thread when stdout is unbuffered):
    # a sink that lives on, as a collected one would send the line back to stdout.
    with contextlib.redirect_stdout(_DISCARDED):
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" on every start


def _ensure_dir(path: Path, setting: str) -> None:
    """Create a folder loracord writes to, or one clear line saying why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
        raise SettingsError([f"{setting} {path} cannot be created: {why}"]) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loracord",
        description="A Discord bot answering from a local GPTQ model with a LoRA adapter per "
        "channel. Without a command: Discord if DISCORD_TOKEN is set, else the local console.",
    )
    parser.add_argument("--config", type=Path, help="settings file (default: ./loracord.toml)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: also the libraries' logs and banners; -vv: debug logs; -vvv: also discord.py's "
        "HTTP debug log, which shows interaction tokens (keep it out of shared logs)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only (and a model build)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = commands.add_parser("ask", help="ask the model once and print the answer")
    ask.add_argument("prompt", help="the question")
    ask.add_argument("--channel", default="general", help="channel name or Discord channel id")
    ask.add_argument("--server", help="Discord server id (for a channel id not seen yet)")
    ask.add_argument("--max-tokens", type=int, help="most tokens to generate")
    ask.add_argument("--temperature", type=float, help="0 = greedy (default from settings)")
    ask.add_argument("--json", action="store_true", help="print the answer and details as JSON")

    model = commands.add_parser("model", help="build or describe the model")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    model_commands.add_parser("build", help="build the embedded model now (it builds on first use)")
    info = model_commands.add_parser("info", help="load the model and describe it")
    info.add_argument("--json", action="store_true", help="print JSON")
    cli_quotes.add_parser(commands)
    cli_adapters.add_parser(commands)
    cli_training.add_parser(commands)
    return parser


async def _with_app(settings: Any, body: Callable[[Any], Awaitable[int]]) -> int:
    from core.app import build

    app = build(settings)
    try:
        # GPTQModel prints its banner and kernel choice on stdout (at -v); stdout is for results.
        with contextlib.redirect_stdout(sys.stderr):
            await app.start()
        return await body(app)
    finally:
        await app.close()


async def _ask(settings: Any, args: argparse.Namespace) -> int:
    from core.cli_quotes import resolve_channel
    from core.errors import PromptError
    from core.model.requests import ChatMessage
    from core.names import channel_name

    # Everything the user typed is checked here, before seconds of model loading.
    channel = channel_name(args.channel)
    if not args.prompt.strip():
        raise PromptError("the prompt is empty; ask a question")
    params = settings.generation_params(
        max_new_tokens=args.max_tokens, temperature=args.temperature
    )
    _quiet_model_libraries(args.verbose)

    async def body(app: Any) -> int:
        # The channel's adapter, through the same bindings as Discord and the console.
        where = await asyncio.to_thread(resolve_channel, app.store.sync, channel, args.server)
        stream, served = await app.channels.submit(
            where, (ChatMessage("user", args.prompt),), params
        )
        text = await stream.text()
        if served.reason:
            print(f"loracord: {served.reason}; answered with {served.describe()}", file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    {
                        "channel": channel,
                        "adapter": str(served.adapter) if served.adapter else None,
                        "answer": text,
                        "finish_reason": stream.finish_reason,
                        "prompt_tokens": stream.prompt_tokens,
                        "completion_tokens": stream.completion_tokens,
                        "notices": stream.notices,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(text)
            for notice in stream.notices:
                print(f"loracord: {notice}", file=sys.stderr)
        return 0

    return await _with_app(settings, body)


async def _model_info(settings: Any, args: argparse.Namespace) -> int:
    _quiet_model_libraries(args.verbose)

    async def body(app: Any) -> int:
        info = app.engine.info.as_dict()
        if args.json:
            print(json.dumps(info))
        else:
            width = max(map(len, info))
            for key, value in info.items():
                print(f"{key:<{width}}  {value}")
        return 0

    return await _with_app(settings, body)


def _model_build(settings: Any, args: argparse.Namespace) -> int:
    from core.app import locate_model

    _quiet_model_libraries(args.verbose)
    # An explicit build tries again even after a build that failed its quality gate.
    source = locate_model(settings, retry_build=True)
    print(source.path)
    return 0


async def _serve(settings: Any, args: argparse.Namespace) -> int:
    from core.app import build

    _quiet_model_libraries(args.verbose)
    app = build(settings)
    if settings.discord.token:
        from core.discord import run_bot

        if not args.quiet:  # a server's log: what it connected to, synced and collected
            for name in ("core", "plugins"):
                logging.getLogger(name).setLevel(min(logging.getLogger().level, logging.INFO))
        await run_bot(app)
        return 0
    from core.console import Console

    log.info("no DISCORD_TOKEN set: starting the local console (loading the model...)")
    try:
        await app.start(watch_adapters=True)
        await Console(app).run()
    finally:
        await app.close()
    return 0


def _dispatch(settings: Any, args: argparse.Namespace) -> int:
    if args.command == "quotes":
        return cli_quotes.run(settings, args)
    if args.command == "adapters":
        _ensure_dir(settings.adapters_dir, "adapters_dir")
        if args.adapters_command in ("switch", "import", "reset", "default", "info"):
            _ensure_dir(settings.cache_dir, "cache_dir")
            _quiet_model_libraries(args.verbose)
        return cli_adapters.run(settings, args)
    _ensure_dir(settings.cache_dir, "cache_dir")
    if args.command == "train":
        _ensure_dir(settings.adapters_dir, "adapters_dir")
        _quiet_model_libraries(args.verbose)
        return cli_training.run(settings, args)
    if args.command == "model" and args.model_command == "build":
        return _model_build(settings, args)
    if args.command == "ask":
        return asyncio.run(_ask(settings, args))
    if args.command == "model":
        return asyncio.run(_model_info(settings, args))
    return asyncio.run(_serve(settings, args))


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    from core import settings as settings_module

    try:
        settings = settings_module.load(args.config)
        _ensure_dir(settings.data_dir, "data_dir")
        return _dispatch(settings, args)
    except LoracordError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"loracord: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.debug("unexpected error", exc_info=True)
        print(
            f"loracord: internal error: {type(e).__name__}: {e} (run with -v for details)",
            file=sys.stderr,
        )
        if args.verbose:
            raise
        return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
