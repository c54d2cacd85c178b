"""`python -m core.training --job JOB.json --progress-fd N`: one training run in this process.

Events go to fd N only (one JSON line each); stdout and stderr are left to the libraries'
banners and to tracebacks for the log. Exit codes: 0 result, 1 error, 3 cancelled.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from core.errors import first_line
from core.training.protocol import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    JobError,
    TrainJob,
    encode_event,
)

OOM_ADVICE = "lower training.batch_size or training.max_length"


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def describe(error: BaseException) -> str:
    """The `error` event's one line: what went wrong and, where we know, what to change."""
    from core.errors import LoracordError
    from core.training.recipe import TrainingError

    if _is_out_of_memory(error):
        return f"out of memory while training: {OOM_ADVICE}"
    if isinstance(error, JobError | TrainingError | LoracordError):
        return first_line(error)
    return f"training failed: {type(error).__name__}: {first_line(error)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.training", description=__doc__)
    parser.add_argument("--job", required=True, type=Path, help="the job file (JSON)")
    parser.add_argument("--progress-fd", required=True, type=int, help="fd for the events")
    parser.add_argument(
        "--nice", type=int, default=0, help="lower this process's CPU priority by N (0-19)"
    )
    args = parser.parse_args(argv)
    if args.nice > 0:
        # Before torch starts its threads, which inherit it: the bot's answers come first.
        os.nice(min(args.nice, 19))
    try:
        progress: TextIO = os.fdopen(args.progress_fd, "w", buffering=1, encoding="utf-8")
    except OSError as e:
        print(f"cannot open progress fd {args.progress_fd}: {e}", file=sys.stderr)
        return EXIT_ERROR

    def emit(kind: str, **fields: Any) -> None:
        progress.write(encode_event(kind, **fields) + "\n")

    from core.training.recipe import Cancelled, StopSignal, run

    stop = StopSignal()
    stop.install()
    try:
        try:
            job = TrainJob.from_json(args.job.read_text(encoding="utf-8"))
        except OSError as e:
            raise JobError(f"cannot read the job file {args.job}: {e.strerror}") from None
        run(job, emit, stop)
    except Cancelled:
        emit("cancelled")
        return EXIT_CANCELLED
    except BaseException as e:
        if not isinstance(e, JobError):
            traceback.print_exc(file=sys.stderr)
        emit("error", message=describe(e))
        return EXIT_ERROR
    finally:
        progress.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
