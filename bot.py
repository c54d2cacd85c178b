"""loracord's entry point: parse the command line, load settings, run Discord, the console or a
CLI command. Logging is configured here and nowhere else.

Every command exits 0 on success; on failure it prints one clear line on stderr and exits 1
(2 for a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core import cli_quotes
from core.errors import LoracordError

log = logging.getLogger("loracord")

_NOISY_LOGGERS = (
    "transformers",
    "optimum",
    "gptqmodel",
    "accelerate",
    "datasets",
    "torchao",
    "huggingface_hub",
    "discord.gateway",
)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose or not quiet else logging.WARNING
    )
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    third_party = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(third_party)
    # A first start builds the embedded model for minutes: always say so, even when quiet.
    logging.getLogger("core.model.build").setLevel(min(level, logging.INFO))
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loracord",
        description="A Discord bot answering from a local GPTQ model with a LoRA adapter per "
        "channel. Without a command: Discord if DISCORD_TOKEN is set, else the local console.",
    )
    parser.add_argument("--config", type=Path, help="settings file (default: ./loracord.toml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = commands.add_parser("ask", help="ask the model once and print the answer")
    ask.add_argument("prompt", help="the question")
    ask.add_argument("--channel", default="general", help="channel name or Discord channel id")
    ask.add_argument("--max-tokens", type=int, help="most tokens to generate")
    ask.add_argument("--temperature", type=float, help="0 = greedy (default from settings)")
    ask.add_argument("--json", action="store_true", help="print the answer and details as JSON")

    model = commands.add_parser("model", help="build or describe the model")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    model_commands.add_parser("build", help="build the embedded model now (it builds on first use)")
    info = model_commands.add_parser("info", help="load the model and describe it")
    info.add_argument("--json", action="store_true", help="print JSON")
    cli_quotes.add_parser(commands)
    return parser


async def _with_app(settings: Any, body: Callable[[Any], Awaitable[int]]) -> int:
    from core.app import build

    app = build(settings)
    try:
        # GPTQModel prints its banner and kernel choice on stdout; stdout is for results only.
        with contextlib.redirect_stdout(sys.stderr):
            await app.start()
        return await body(app)
    finally:
        await app.close()


async def _ask(settings: Any, args: argparse.Namespace) -> int:
    from core.errors import PromptError
    from core.model.requests import GenerationRequest

    if not args.prompt.strip():  # refuse before spending seconds on loading the model
        raise PromptError("the prompt is empty; ask a question")

    # Bad options are refused here, before seconds of model loading.
    params = settings.generation_params(
        max_new_tokens=args.max_tokens, temperature=args.temperature
    )

    async def body(app: Any) -> int:
        stream = await app.engine.submit(GenerationRequest.from_prompt(args.prompt, params))
        text = await stream.text()
        if args.json:
            print(
                json.dumps(
                    {
                        "channel": args.channel,
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


def _model_build(settings: Any) -> int:
    from core.app import locate_model

    source = locate_model(settings)
    print(source.path)
    return 0


async def _serve(settings: Any) -> int:
    from core.app import build

    app = build(settings)
    if settings.discord.token:
        from core.discord import run_bot

        await run_bot(app)
        return 0
    from core.console import Console

    log.info("no DISCORD_TOKEN set: starting the local console (loading the model...)")
    try:
        await app.start()
        await Console(app).run()
    finally:
        await app.close()
    return 0


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    quiet = args.quiet or args.command is not None
    _configure_logging(args.verbose, quiet)
    from core import settings as settings_module

    try:
        settings = settings_module.load(args.config)
        if args.command == "ask":
            return asyncio.run(_ask(settings, args))
        if args.command == "model" and args.model_command == "build":
            return _model_build(settings)
        if args.command == "model":
            return asyncio.run(_model_info(settings, args))
        if args.command == "quotes":
            return cli_quotes.run(settings, args)
        return asyncio.run(_serve(settings))
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
