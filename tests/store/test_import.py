"""Import files: every format, and a malformed file naming its line and adding nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import QuoteImportError
from core.quotes_import import parse, read_file
from core.store import ChannelRef, QuoteStore

GENERAL = ChannelRef.console("general")


def test_json_with_the_seed_columns_and_with_text_from() -> None:
    data = json.dumps(
        [
            {"quote": "Be yourself.", "author": "Oscar Wilde", "tags": ["be-yourself"]},
            {"text": "Stay hungry.", "from": "Steve Jobs"},
            "Just text.",
        ]
    ).encode()
    items = parse(data, "quotes.json")
    assert [(i.text, i.author_name, i.tags) for i in items] == [
        ("Be yourself.", "Oscar Wilde", ("be-yourself",)),
        ("Stay hungry.", "Steve Jobs", ()),
        ("Just text.", None, ()),
    ]


def test_jsonl_csv_and_fortune() -> None:
    jsonl = b'{"quote": "a", "author": "A"}\n\n{"text": "b", "from": "B"}\n'
    assert [(i.text, i.author_name) for i in parse(jsonl, "q.jsonl")] == [("a", "A"), ("b", "B")]
    csv = b'quote,author,tags\n"Hi, ""you""",Me,"[\'x\', \'y\']"\nmultiline\n,,\n'
    with pytest.raises(QuoteImportError, match="line 3"):
        parse(csv, "q.csv")
    csv = b'quote,author,tags\n"Hi, ""you""",Me,"[\'x\', \'y\']"\n"two\nlines",,a,b\n'
    with pytest.raises(QuoteImportError, match="line 3"):
        parse(csv, "q.csv")
    csv = b'quote,author,tags\n"Hi, ""you""",Me,"[\'x\', \'y\']"\n"two\nlines",,"a, b"\n'
    items = parse(csv, "q.csv")
    assert [(i.text, i.author_name, i.tags) for i in items] == [
        ('Hi, "you"', "Me", ("x", "y")),
        ("two\nlines", None, ("a", "b")),
    ]
    fortune = b"%\nA fortune.\n\t\t-- Somebody\n%\nTwo\n  lines.\n%\n"
    assert [(i.text, i.author_name) for i in parse(fortune, "fortunes")] == [
        ("A fortune.", "Somebody"),
        ("Two\n  lines.", None),
    ]


def test_inspirational_quotes_package_imports(store: QuoteStore) -> None:
    from importlib.util import find_spec

    spec = find_spec("inspirational_quotes")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "quotes.json"
    items = read_file(path)
    report = store.import_quotes(GENERAL, items)
    assert report.added + report.duplicates == len(items) > 300
    assert store.count(GENERAL) == report.added


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("bad.json", '[\n{"quote": "ok"},\n{"quote": "ok too"},\n{"quote": }\n]', 4),
        ("bad.json", '[\n{"quote": "ok"},\n{"author": "no text"}\n]', 3),
        ("bad.jsonl", '{"quote": "ok"}\n{"quote": "fine"}\n{"quote": "broken"\n', 3),
        ("bad.jsonl", '{"quote": "ok"}\n{"quote": ""}\n', 2),
        ("bad.csv", "quote,author\nok,A\nfine,B,extra\n", 3),
        ("bad.csv", "text,author\nok,A\n,B\n", 3),
        ("bad.json", '[{"quote": "ok", "tags": 5}]', 1),
    ],
)
def test_malformed_file_names_the_line_and_adds_nothing(
    store: QuoteStore, tmp_path: Path, name: str, content: str, line: int
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QuoteImportError) as caught:
        store.import_quotes(GENERAL, read_file(path))
    assert caught.value.line == line
    assert f"line {line}" in str(caught.value) and "nothing was imported" in str(caught.value)
    assert store.count(GENERAL) == 0


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(QuoteImportError, match="cannot read"):
        read_file(tmp_path / "missing.json")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"%\nfine\n%\ncaf\xe9\n")
    with pytest.raises(QuoteImportError, match="line 4: not UTF-8"):
        read_file(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(QuoteImportError, match="no quotes found"):
        read_file(empty)
