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
