"""Import files: every format, and a malformed file naming its line and adding nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import SupportsIndex

import pytest

from core.errors import QuoteImportError
from core.quotes_import import _json_items, parse, read_file
from core.store import ChannelRef, NewQuote, QuoteStore

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


def test_csv_headers_are_case_insensitive() -> None:
    items = parse(b"Quote,Author,TAGS\nHi,Me,x\n", "q.csv")
    assert [(i.text, i.author_name, i.tags) for i in items] == [("Hi", "Me", ("x",))]


def test_fortune_backspace_overstrike_is_resolved() -> None:
    fortune = b"%\n*__\x08\x08UN*derlined and B\x08BO\x08OLD\x08D\n\t-- _\x08A_\x08n\n%\n"
    (item,) = parse(fortune, "fortunes.fortune")
    assert (item.text, item.author_name) == ("*UN*derlined and BOLD", "An")


def test_txt_is_one_quote_per_line_and_refuses_what_it_is_not() -> None:
    items = parse(b"first\n\n  second  \n", "q.txt")
    assert [i.text for i in items] == ["first", "second"]
    cases = {
        b'{"quote": "a"}\n{"quote": "b"}\n': "JSON Lines: name it .jsonl or pass --format jsonl",
        b"one\n%\ntwo\n": "a fortune file ('%' lines): name it .fortune or pass --format fortune",
    }
    for data, what in cases.items():
        with pytest.raises(QuoteImportError) as caught:
            parse(data, "q.txt")
        assert str(caught.value) == (
            f"cannot import q.txt, line 1: this .txt file holds {what}; nothing was imported"
        )


def test_unknown_extensions_are_refused() -> None:
    with pytest.raises(QuoteImportError) as caught:
        parse(b"one\n", "q.docx")
    assert str(caught.value) == (
        "cannot import q.docx: cannot tell what a '.docx' file holds: name it .json, .jsonl, "
        ".csv, .txt (one quote per line) or .fortune; nothing was imported"
    )
    assert [i.text for i in parse(b"%\none\n%\n", "fortunes")] == ["one"]


def test_invisible_only_quotes_name_their_line() -> None:
    data = json.dumps(["fine", "\u200b\u2060 \u200d"]).encode()
    with pytest.raises(QuoteImportError) as caught:
        parse(data, "q.json")
    assert str(caught.value) == (
        "cannot import q.json, line 1: 'quote' is empty or only invisible characters; "
        "nothing was imported"
    )


class _CountingText(str):
    """A str that adds up how many characters its `count` calls scan."""

    scanned = 0

    def count(
        self, sub: str, start: SupportsIndex | None = None, end: SupportsIndex | None = None
    ) -> int:
        first = 0 if start is None else int(start)
        _CountingText.scanned += (len(self) if end is None else int(end)) - first
        return super().count(sub, start, end)


def test_json_lines_are_counted_in_linear_time() -> None:
    data = json.dumps([{"quote": f"quote {n}"} for n in range(20000)], indent=1)
    _CountingText.scanned = 0
    assert len(list(_json_items(_CountingText(data)))) == 20000
    # Counting from the start for every item scanned ~n^2/2 characters (7 s for 20,000 quotes).
    assert _CountingText.scanned <= len(data)
    broken = data[: data.rindex("}")] + "}, oops]"
    with pytest.raises(QuoteImportError) as caught:
        parse(broken.encode(), "big.json")
    assert f"big.json, line {broken.count(chr(10)) + 1}: invalid JSON" in str(caught.value)


def test_a_long_import_reports_progress_in_batches(store: QuoteStore) -> None:
    seen: list[tuple[int, int]] = []
    items = [NewQuote(f"quote {n}") for n in range(1201)]
    report = store.import_quotes(GENERAL, items, progress=lambda *p: seen.append(p))
    assert seen == [(500, 1201), (1000, 1201), (1201, 1201)]
    assert (report.added, report.duplicates) == (1201, 0)
