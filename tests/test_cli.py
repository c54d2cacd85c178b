"""`loracord` as a user runs it: a subprocess, exit codes, stdout and one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.test_model import _cli, _env


def test_ask_prints_the_answer_and_exits_0(embedded_model_dir: Path, tmp_path: Path) -> None:
    done = _cli(
        "ask",
        "--channel",
        "general",
        "--max-tokens",
        "40",
        "--temperature",
        "0",
        "What is the capital of France?",
        env=_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    answer = done.stdout.strip()
    assert len(answer.split()) >= 2, done.stdout
    assert "France" in answer or "Paris" in answer, answer
    # stdout holds the answer only: GPTQModel's banner and load logs go to stderr.
    for noise in ("INFO", "WARN", "Loading weights", "Kernel"):
        assert noise not in done.stdout


def test_ask_json(embedded_model_dir: Path, tmp_path: Path) -> None:
    done = _cli(
        "ask", "--max-tokens", "5", "--temperature", "0", "--json", "Say hello.", env=_env(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["completion_tokens"] <= 5 and result["answer"]
    assert result["finish_reason"] in ("stop", "length")


def _one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_empty_prompt_is_one_clear_line(embedded_model_dir: Path, tmp_path: Path) -> None:
    _one_line_error(_cli("ask", "  ", env=_env(tmp_path)), "prompt is empty")


def test_bad_settings_are_one_clear_line(tmp_path: Path) -> None:
    _one_line_error(
        _cli("ask", "hi", env=_env(tmp_path, LORACORD_TEMPERATURE="hot")), "LORACORD_TEMPERATURE"
    )


def test_missing_model_folder_is_one_clear_line(tmp_path: Path) -> None:
    _one_line_error(
        _cli("ask", "hi", env=_env(tmp_path, LORACORD_MODEL=str(tmp_path / "nope"))),
        "no such folder",
    )


def test_usage_error_exits_2(tmp_path: Path) -> None:
    done = _cli("ask", env=_env(tmp_path))
    assert done.returncode == 2
