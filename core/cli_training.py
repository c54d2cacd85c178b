"""`loracord train ...`: train a channel's adapter now, turn its nightly training on or off, or
see what trains.

Training runs through the same runner as `/train now`: one training at a time across processes
(a second one is refused while one runs), the trainer in a child process, the new version saved
and promoted only when it is better. A bot running beside the CLI loads a promoted version
within a few seconds. With `--json` the last line on stdout is one JSON object: `version`,
`promoted`, `base_loss`, `current_loss` (null when the channel had no adapter), `new_loss` and
the rest of the outcome. Progress goes to stderr as a progress bar.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from core.cli_quotes import resolve_channel
from core.names import channel_name

if TYPE_CHECKING:
    from core.settings import Settings
    from core.training.runner import Progress


def add_parser(subparsers: Any) -> None:
    """Register `train` on the top-level subparsers."""
    train = subparsers.add_parser(
        "train",
        help="train a channel's adapter now, or set its nightly training",
        description="Train the adapter of a channel on its quotes now (the new version is "
        "promoted only if it beats the current one on held-out quotes), turn its nightly "
        "training on or off (--auto), or show the training lock and recent runs (--status).",
    )
    train.add_argument("--channel", help="console channel name, or a Discord channel id")
    train.add_argument("--server", help="Discord server id (for a channel id not seen yet)")
    train.add_argument("--steps", type=int, help="optimizer steps (default from settings)")
    train.add_argument(
        "--auto", choices=("on", "off"), help="turn the channel's nightly training on or off"
    )
    train.add_argument("--status", action="store_true", help="who trains now, and the latest runs")
    train.add_argument("--json", action="store_true", help="print JSON")


def _progress(terminal: bool) -> tuple[Any, Any]:
    """A progress callback on stderr and its closer: a tqdm bar on a terminal, else (a log, a
    pipe) one line per phase and about every tenth of the steps."""
    if not terminal:
        shown: dict[str, Any] = {"phase": None, "step": 0}

        def lines(progress: Progress) -> None:
            every = max(1, progress.steps // 10)
            changed = progress.phase != shown["phase"]
            stepped = progress.phase == "training" and (
                progress.step - shown["step"] >= every or progress.step == progress.steps
            )
            if changed or stepped:
                shown.update(phase=progress.phase, step=progress.step)
                print(f"loracord: {progress.line()}", file=sys.stderr, flush=True)

        return lines, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, file=sys.stderr, unit="step", dynamic_ncols=True, leave=True)

    def update(progress: Progress) -> None:
        if progress.steps and bar.total != progress.steps:
            bar.reset(total=progress.steps)
        if progress.phase == "training":
            bar.n = progress.step
            if progress.loss is not None:
                bar.set_postfix(
                    loss=f"{progress.loss:.3f}", tok_s=f"{progress.tokens_per_s or 0:.0f}"
                )
        bar.set_description(progress.phase if progress.phase != "training" else "training")
        bar.refresh()

    return update, bar.close


async def _train(settings: Settings, args: argparse.Namespace) -> int:
    from core.app import build
    from core.training.runner import TrainRequest

    app = build(settings)
    # No model is loaded here: the trainer loads its own in the child. A running bot loads the
    # new version itself (it polls the registry), so this runner hot-loads nothing.
    app.trainer.channels = None
    await app.store.open()
    try:
        where = await asyncio.to_thread(
            resolve_channel, app.store.sync, channel_name(args.channel), args.server
        )
        update, close = _progress(sys.stderr.isatty())
        try:
            outcome = await app.trainer.train(
                TrainRequest(where, "cli", steps=args.steps, by="cli"), update
            )
        finally:
            close()
    finally:
        await app.close()
    if args.json:
        print(json.dumps(outcome.as_dict(), ensure_ascii=False))
    else:
        print("\n".join(outcome.report()))
    return 0 if outcome.status in ("promoted", "kept") else 1


def _auto(settings: Settings, args: argparse.Namespace) -> int:
    from core.store import open_store

    with contextlib.closing(open_store(settings)) as store:
        where = resolve_channel(store, channel_name(args.channel), args.server)
        state = store.set_auto_train(where, args.auto == "on")
    if args.json:
        print(json.dumps({"channel": str(where), "auto_train": state.auto_train}))
    else:
        print(f"nightly training of {where}: {'on' if state.auto_train else 'off'}")
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from core.store import open_store

    with contextlib.closing(open_store(settings)) as store:
        holder = store.training_lock_holder()
        runs = store.runs(limit=10)
    if args.json:
        print(
            json.dumps(
                {
                    "training": None
                    if holder is None
                    else {"channel": str(holder.channel), "run": holder.run_id},
                    "runs": [
                        {
                            "run": r.id,
                            "channel": str(r.channel),
                            "adapter": r.adapter,
                            "version": r.version,
                            "status": r.status,
                            "reason": r.reason,
                            "started_at": r.started_at.isoformat(),
                            "new_loss": r.new_loss,
                        }
                        for r in runs
                    ],
                }
            )
        )
        return 0
    print("training now: " + ("nothing" if holder is None else f"{holder.channel}"))
    for r in runs:
        ref = f"{r.adapter}@{r.version}" if r.version else (r.adapter or "-")
        when = r.started_at.strftime("%Y-%m-%d %H:%M")
        print(
            f"#{r.id} {when} {r.channel} {ref}: {r.status}" + (f" ({r.reason})" if r.reason else "")
        )
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run `loracord train` with parsed `args`; returns the exit status."""
    from core.errors import TrainingError

    if args.status:
        return _status(settings, args)
    if not args.channel:
        raise TrainingError("name the channel to train: loracord train --channel NAME")
    if args.steps is not None and args.steps < 1:
        raise TrainingError(f"--steps must be at least 1, not {args.steps}")
    if args.auto is not None:
        return _auto(settings, args)
    return asyncio.run(_train(settings, args))
