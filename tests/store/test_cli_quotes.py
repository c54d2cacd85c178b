"""`loracord quotes ...` through a real subprocess, as an operator or a script runs it.

Each command exits 0 on success and 1 with one `loracord: error:` line otherwise. None of them
may load the model: one test checks torch is never imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path: Path, db_url: str):
    """Runs `python bot.py quotes ...` on the test database; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACORD_")}
    env.pop("DISCORD_TOKEN", None)
    env["LORACORD_DATA_DIR"] = str(tmp_path / "data")
    env["LORACORD_CONFIG"] = str(tmp_path / "empty.toml")
    env["LORACORD_DATABASE_URL"] = db_url
    (tmp_path / "empty.toml").write_text("")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "bot.py", "quotes", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loracord: error: "), result.stderr
    return lines[0]


def test_add_list_json_and_duplicates(cli) -> None:
    added = cli("add", "--channel", "general", "--author", "Ann", "Hello there ⭐")
    assert added.returncode == 0 and "added quote #1 in #general" in added.stdout
    again = cli("add", "--channel", "#general", "  hello THERE ⭐ ")
    assert again.returncode == 0 and "already saved as quote #1" in again.stdout
    listed = cli("list", "--channel", "general", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1
    assert set(rows[0]) == {"id", "text", "author", "source", "added_at"}
    assert (rows[0]["text"], rows[0]["author"], rows[0]["source"]) == (
        "Hello there ⭐",
        "Ann",
        "command",
    )
    assert json.loads(cli("list", "--channel", "random", "--json").stdout) == []


def test_import_reports_and_a_malformed_file_adds_nothing(cli, tmp_path: Path) -> None:
    good = tmp_path / "quotes.csv"
    good.write_text("quote,author,tags\nOne,A,\nTwo,B,\nONE,A,\n", encoding="utf-8")
    done = cli("import", "--channel", "general", str(good))
    assert done.returncode == 0, done.stderr
    assert "imported 2 quotes into #general (1 duplicates skipped)" in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"quote": "Three"}\n{"quote": "Four"\n', encoding="utf-8")
    line = _one_error_line(cli("import", "--channel", "general", str(bad)))
    assert "bad.jsonl, line 2" in line and "nothing was imported" in line
    texts = [r["text"] for r in json.loads(cli("list", "--channel", "general", "--json").stdout)]
    assert texts == ["One", "Two"]


def test_forget_and_export(cli, tmp_path: Path) -> None:
    for text, author in (("mine", "7"), ("also mine", "7"), ("theirs", "8")):
        assert cli("add", "--channel", "general", "--author-id", author, text).returncode == 0
    out = tmp_path / "me.json"
    exported = cli("export", "--member", "7", "--output", str(out))
    assert exported.returncode == 0 and "wrote 2 quotes" in exported.stdout
    assert [q["text"] for q in json.loads(out.read_text(encoding="utf-8"))] == ["mine", "also mine"]
    forgot = cli("forget", "--channel", "general", "--member", "7")
    assert forgot.returncode == 0 and "removed 2 quotes" in forgot.stdout
    assert json.loads(cli("export", "--member", "7").stdout) == []
    rows = json.loads(cli("list", "--channel", "general", "--json").stdout)
    assert [r["text"] for r in rows] == ["theirs"]
    line = _one_error_line(cli("forget", "--channel", "general", "--id", "999"))
    assert "no quote #999" in line


def test_discord_channel_ids_and_bad_input_are_one_clear_line(cli) -> None:
    line = _one_error_line(cli("list", "--channel", "123456789012345678"))
    assert "--server" in line
    assert cli("add", "--channel", "123456789012345678", "--server", "42", "hi").returncode == 0
    listed = cli("list", "--channel", "123456789012345678", "--json")
    assert [r["text"] for r in json.loads(listed.stdout)] == ["hi"]
    assert "needs text" in _one_error_line(cli("add", "--channel", "general", "   "))
    assert "not a channel name" in _one_error_line(cli("list", "--channel", "no spaces"))
    usage = cli("add", "--channel", "general")
    assert usage.returncode == 2


def test_quotes_commands_never_load_the_model(tmp_path: Path, db_url: str) -> None:
    code = (
        "import sys, bot\n"
        "rc = bot.run(['quotes', 'add', '--channel', 'general', 'no model needed'])\n"
        "rc |= bot.run(['quotes', 'list', '--channel', 'general', '--json'])\n"
        "assert rc == 0, rc\n"
        "loaded = [m for m in ('torch', 'transformers', 'gptqmodel') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACORD_")}
    env.update(LORACORD_DATA_DIR=str(tmp_path / "data"), LORACORD_DATABASE_URL=db_url)
    env["LORACORD_CONFIG"] = str(tmp_path / "empty.toml")
    (tmp_path / "empty.toml").write_text("")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no model needed" in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("add", "--server", "42", "--channel", "../../etc/passwd", "hi"),
            "loracord: error: '../../etc/passwd' is not a channel name: use 1-64 lowercase "
            "letters, digits, '-' and '_' (starting with a letter or digit), or a Discord "
            "channel id",
        ),
        (
            ("add", "--server", "../x", "--channel", "123456789012345678", "hi"),
            "loracord: error: '../x' is not a server: use a Discord server id (digits) or "
            "'console'",
        ),
        (
            ("list", "--channel", "gen\u200beral"),
            "loracord: error: 'gen\\u200beral' is not a channel name: use 1-64 lowercase "
            "letters, digits, '-' and '_' (starting with a letter or digit), or a Discord "
            "channel id",
        ),
    ],
)
def test_hostile_names_are_refused_on_every_path(cli, args, expected: str) -> None:
    assert _one_error_line(cli(*args)) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("list", "--channel", "general", "--limit", "0"),
            "argument --limit: must be at least 1, not 0",
        ),
        (
            ("list", "--channel", "general", "--limit", "-1"),
            "argument --limit: must be at least 1, not -1",
        ),
        (
            ("forget", "--channel", "general", "--id", "99999999999999999999999"),
            "argument --id: 99999999999999999999999 is larger than any quote id",
        ),
    ],
)
def test_bad_numbers_are_usage_errors(cli, args, expected: str) -> None:
    done = cli(*args)
    assert done.returncode == 2 and done.stderr.strip().endswith(expected), done.stderr
    assert "Traceback" not in done.stderr


def test_cli_errors_point_to_cli_commands(cli) -> None:
    line = _one_error_line(cli("forget", "--channel", "general", "--id", "999"))
    assert line == (
        "loracord: error: there is no quote #999 in server console; "
        "`loracord quotes list --channel general` shows ids"
    )


def test_invisible_quotes_are_refused_and_do_not_dodge_duplicates(cli) -> None:
    line = _one_error_line(cli("add", "--channel", "general", "\u200b\u200d\u2060"))
    assert line.startswith("loracord: error: a quote needs text: this one is empty or only")
    assert cli("add", "--channel", "general", "hello world").returncode == 0
    again = cli("add", "--channel", "general", "hel\u200blo\u00a0WORLD")
    assert again.returncode == 0 and "already saved as quote #1" in again.stdout


def test_unknown_extensions_and_json_saved_as_txt_are_refused(cli, tmp_path: Path) -> None:
    odd = tmp_path / "quotes.xyz"
    odd.write_text("one\n", encoding="utf-8")
    assert _one_error_line(cli("import", "--channel", "general", str(odd))) == (
        f"loracord: error: cannot import {odd}: cannot tell what a '.xyz' file holds: name it "
        ".json, .jsonl, .csv, .txt (one quote per line) or .fortune; nothing was imported"
    )
    disguised = tmp_path / "quotes.txt"
    disguised.write_text('[{"quote": "one"}, {"quote": "two"}]', encoding="utf-8")
    assert _one_error_line(cli("import", "--channel", "general", str(disguised))) == (
        f"loracord: error: cannot import {disguised}, line 1: this .txt file holds JSON: name "
        "it .json or pass --format json; nothing was imported"
    )
    plain = tmp_path / "lines.txt"
    plain.write_text("first quote\n\nsecond quote\n", encoding="utf-8")
    done = cli("import", "--channel", "general", str(plain))
    assert "imported 2 quotes into #general" in done.stdout, done.stderr


def test_a_damaged_database_is_one_line(cli, tmp_path: Path, db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("a damaged file is SQLite's")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "loracord.db"
    path.write_bytes(b"not a database at all\n" * 100)
    assert _one_error_line(cli("list", "--channel", "general")) == (
        f"loracord: error: the database {path} is damaged (file is not a database): restore it "
        "from a backup, or move it away to start an empty one"
    )
