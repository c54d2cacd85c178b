"""The project's own exceptions: each carries a message a user or operator can act on.

Everything above `core` (the CLI, the console, Discord plugins) shows `str(exc)` of a
`LoracordError` as-is and treats any other exception as a bug to log with its traceback.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: what a
    one-line warning or error shows of a library's (often multi-line) message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class LoracordError(Exception):
    """Base of every error whose message is meant for the user."""


class SettingsError(LoracordError):
    """The settings file or an environment override is invalid."""

    def __init__(self, problems: list[str], source: str = "settings") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"invalid {source}:\n{lines}"
            if len(problems) > 1
            else f"invalid {source}: {problems[0]}"
        )


class ModelError(LoracordError):
    """A model could not be found, built or loaded."""


class PromptError(LoracordError):
    """A request was refused before generation (empty prompt, bad parameters)."""


class EngineBusy(LoracordError):
    """The engine's queue is full; the caller should retry later."""


class EngineClosed(LoracordError):
    """The engine was shut down and takes no more requests."""


class GenerationCancelled(LoracordError):
    """A request was cancelled before it finished."""


class StoreError(LoracordError):
    """The database could not be opened, reached or upgraded."""


class InvalidName(LoracordError):
    """A channel or server name is not one loracord accepts (see `core.names`)."""


class QuoteError(LoracordError):
    """A quote operation was refused; the message says why and what to do."""


class EmptyQuote(QuoteError):
    """The quote has no text."""


class CollectionDisabled(QuoteError):
    """Quote collection is off in this channel."""


class QuoteCapReached(QuoteError):
    """A member saved as many quotes in a channel today as the cap allows."""


class QuoteNotFound(QuoteError):
    """No quote (or channel) matches what was asked for."""


class QuoteImportError(QuoteError):
    """An import file is malformed; nothing of it was imported."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source = source
        self.line = line
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"cannot import {where}: {problem}; nothing was imported")


class AdapterError(LoracordError):
    """An adapter was refused (bad name, corrupt or mismatched files, unknown version) or an
    adapter operation could not be done; whatever was serving keeps serving."""


class TrainingError(LoracordError):
    """A training could not run or finish (too few quotes, a crashed or cancelled trainer); no
    version was saved and whatever was serving keeps serving."""


class TrainingBusy(TrainingError):
    """Another training holds the lock (one runs at a time, across processes), or the queue
    is full."""
