"""Reading quote files for import: JSON, JSONL, CSV, plain text and fortune files, all or nothing.

Formats (chosen by extension unless given):
- `.json`: an array of objects `{"quote", "author", "tags"}` (the seed's english_quotes columns)
  or `{"text", "from"}` (inspirational-quotes), or plain strings.
- `.jsonl` / `.ndjson`: one such object per line.
- `.csv`: a header (any case) with `quote` (or `text`) and optionally `author` (or `from`) and
  `tags`.
- `.txt`: one quote per line. A `.txt` that holds JSON or a fortune file is refused with a hint
  rather than stored as it is.
- `.fortune`, `.dat`-less fortune files (no extension): quotes separated by lines holding only
  `%`; a last line `-- Name` is taken as the author. Backspace overstrike (`_\bX` underline,
  `X\bX` bold) from old fortune files is resolved to the plain letters.
- any other extension is refused: guessing would store a whole file as one quote.
The first problem stops the parse with a `QuoteImportError` naming the line; the store then adds
everything or nothing. Parsing is linear in the file's size. This module does not touch the store.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from core.errors import QuoteImportError
from core.store.records import NewQuote, normalize

log = logging.getLogger(__name__)

Format = Literal["json", "jsonl", "csv", "txt", "fortune"]
FORMATS: tuple[str, ...] = ("json", "jsonl", "csv", "txt", "fortune")
_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "txt",
    ".fortune": "fortune",
    "": "fortune",
}
KNOWN = ".json, .jsonl, .csv, .txt (one quote per line) or .fortune"
_TEXT_KEYS = ("quote", "text")
_AUTHOR_KEYS = ("author", "from")
_ATTRIBUTION = re.compile(r"^\s*(?:--|—|―)\s*(\S.*)$")


class _Bad(Exception):
    """A problem in one record; the caller adds the line number."""


class _LineBad(Exception):
    """A problem at a known line."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


def detect_format(name: str) -> Format:
    """The format a file name implies; an unknown extension is refused (`QuoteImportError`)."""
    suffix = Path(name).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise QuoteImportError(
            name, None, f"cannot tell what a {suffix!r} file holds: name it {KNOWN}"
        )
    return _EXTENSIONS[suffix]  # type: ignore[return-value]


def overstrike(text: str) -> str:
    """Text as a terminal would show it: `X\bY` prints Y over X (an underscore never wins)."""
    if "\b" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        shown: list[str] = []
        at = 0
        for char in line:
            if char == "\b":
                at = max(at - 1, 0)
                continue
            if at < len(shown):
                shown[at] = shown[at] if char == "_" else char
            else:
                shown.append(char)
            at += 1
        lines.append("".join(shown))
    return "\n".join(lines)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise QuoteImportError(source, line, "not UTF-8 text") from e


def _tags(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)  # english_quotes' CSV writes Python lists
            except (ValueError, SyntaxError) as e:
                raise _Bad(f"tags {text!r} is not a list") from e
        else:
            return tuple(t.strip() for t in text.split(",") if t.strip())
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return tuple(t.strip() for t in value if t.strip())
    raise _Bad("tags must be a list of strings or a comma-separated string")


def _record(obj: Any) -> NewQuote:
    """One quote from a JSON value or a CSV row."""
    if isinstance(obj, str):
        obj = {"quote": obj}
    if not isinstance(obj, dict):
        raise _Bad(f"expected an object with a 'quote' or 'text' field, got {type(obj).__name__}")
    text_key = next((k for k in _TEXT_KEYS if k in obj), None)
    if text_key is None:
        raise _Bad("no 'quote' or 'text' field")
    text = obj[text_key]
    if not isinstance(text, str):
        raise _Bad(f"'{text_key}' must be text")
    text = overstrike(text)
    if not normalize(text):
        raise _Bad(f"'{text_key}' is empty or only invisible characters")
    author = next((obj[k] for k in _AUTHOR_KEYS if obj.get(k) is not None), None)
    if author is not None and not isinstance(author, str):
        raise _Bad("'author' must be text")
    author = overstrike(author) if author is not None else None
    return NewQuote(
        text=text, author_name=(author or "").strip() or None, tags=_tags(obj.get("tags"))
    )


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_items(text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise json.JSONDecodeError("expected a JSON array of quotes", text, pos)
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    line, counted = 1, 0
    while True:
        value, end = decoder.raw_decode(text, pos)
        # Count only the newlines since the last item: counting from the start is quadratic.
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, value
        pos = _skip_space(text, end)
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("expected ',' or ']' after a quote", text, pos)
        pos = _skip_space(text, pos + 1)
    if text[pos + 1 :].strip():
        raise json.JSONDecodeError("extra data after the array", text, pos + 1)


def _parse_json(text: str) -> Iterator[tuple[int, Any]]:
    try:
        yield from _json_items(text)
    except json.JSONDecodeError as e:
        raise _LineBad(e.lineno, f"invalid JSON: {e.msg}") from e


def _parse_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise _LineBad(number, f"invalid JSON: {e.msg}") from e


def _parse_csv(text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        # `Quote,Author` is as good a header as `quote,author`.
        reader.fieldnames = [h.strip().lower() for h in reader.fieldnames or []]
        header = reader.fieldnames
        if not any(k in header for k in _TEXT_KEYS):
            raise _LineBad(1, f"the header needs a 'quote' or 'text' column (found {header})")
        start = reader.line_num + 1
        for row in reader:
            if None in row or None in row.values():
                raise _LineBad(start, f"expected {len(header)} fields like the header")
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise _LineBad(reader.line_num, f"invalid CSV: {e}") from e


def _parse_fortune(text: str) -> Iterator[tuple[int, Any]]:
    chunk: list[str] = []
    start = 1
    for number, line in enumerate([*text.splitlines(), "%"], 1):
        if line.strip() != "%":
            chunk.append(line)
            continue
        body = "\n".join(chunk).strip("\n")
        if body.strip():
            yield start, _fortune_record(body)
        chunk, start = [], number + 1


def _fortune_record(body: str) -> dict[str, Any]:
    lines = body.rstrip().splitlines()
    match = _ATTRIBUTION.match(lines[-1]) if len(lines) > 1 else None
    if match:
        return {"quote": "\n".join(lines[:-1]), "author": match.group(1).strip()}
    return {"quote": body}


def _looks_like(text: str) -> str | None:
    """What a `.txt` file really holds when it is not one quote per line, else None."""
    body = text.strip()
    if body[:1] in ("[", "{"):
        try:
            json.loads(body)
            return "JSON: name it .json or pass --format json"
        except json.JSONDecodeError:
            pass
        try:
            json.loads(body.splitlines()[0])
            return "JSON Lines: name it .jsonl or pass --format jsonl"
        except json.JSONDecodeError:
            pass
    if any(line.strip() == "%" for line in body.splitlines()):
        return "a fortune file ('%' lines): name it .fortune or pass --format fortune"
    return None


def _parse_txt(text: str) -> Iterator[tuple[int, Any]]:
    found = _looks_like(text)
    if found is not None:
        raise _LineBad(1, f"this .txt file holds {found}")
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line.strip()


_PARSERS: dict[str, Callable[[str], Iterator[tuple[int, Any]]]] = {
    "json": _parse_json,
    "jsonl": _parse_jsonl,
    "csv": _parse_csv,
    "txt": _parse_txt,
    "fortune": _parse_fortune,
}


def parse(data: bytes, source: str, fmt: Format | None = None) -> list[NewQuote]:
    """Every quote in a file's bytes; `source` names it in errors. Raises `QuoteImportError`."""
    fmt = fmt or detect_format(source)
    if fmt not in _PARSERS:
        raise QuoteImportError(source, None, f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    text = _decode(data, source)
    items: list[NewQuote] = []
    try:
        for line, value in _PARSERS[fmt](text):
            try:
                items.append(_record(value))
            except _Bad as e:
                raise _LineBad(line, str(e)) from e
    except _LineBad as e:
        raise QuoteImportError(source, e.line, e.problem) from e
    if not items:
        raise QuoteImportError(source, None, f"no quotes found (read as {fmt})")
    log.debug("parsed %d quotes from %s as %s", len(items), source, fmt)
    return items


def read_file(path: Path, fmt: Format | None = None) -> list[NewQuote]:
    """Every quote in the file at `path` (see `parse`)."""
    fmt = fmt or detect_format(str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QuoteImportError(str(path), None, f"cannot read it ({e.strerror})") from e
    return parse(data, str(path), fmt)
