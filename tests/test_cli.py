"""`loracord` as a user runs it: a subprocess, exit codes, stdout and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    # Whether answers are right is measured over 64 prompts (tests/test_gate.py), not on
    # one answer that depends on the build.
    assert answer, done.stdout
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


def test_ask_is_quiet_by_default(embedded_model_dir: Path, tmp_path: Path) -> None:
    done = _cli("ask", "--temperature", "0", "--max-tokens", "4", "hi", env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    # No banner, kernel choice, torch warning or progress bar: the answer alone, on one line.
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1 and done.stdout.strip(), done.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-tokens", "0"], "loracord: error: max_tokens must be at least 1"),
        (["--temperature", "5"], "loracord: error: temperature must be between 0 and 2"),
        (["--channel", "../../etc/passwd"], "loracord: error: '../../etc/passwd' is not a channel"),
        (["--channel", "#"], "loracord: error: '#' is not a channel name"),
    ],
)
def test_bad_ask_options_are_refused_before_the_model_loads(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    # The model folder does not exist: had loading started first, that would be the error.
    env = _env(tmp_path, LORACORD_MODEL=str(tmp_path / "no-model"))
    started = time.monotonic()
    done = _cli("ask", *args, "hi", env=env)
    assert time.monotonic() - started < 60
    _one_line_error(done, needle)
    assert done.stderr.startswith(needle)


def test_a_config_directory_or_non_utf8_file_is_one_clear_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _one_line_error(
        _cli("--config", str(tmp_path), "quotes", "list", "--channel", "general", env=env),
        f"settings file {tmp_path} is a directory, not a file",
    )
    latin = tmp_path / "latin.toml"
    latin.write_bytes("system_prompt = 'caf\xe9'\n".encode("latin-1"))
    _one_line_error(
        _cli("--config", str(latin), "ask", "hi", env=env), f"settings file {latin} is not UTF-8"
    )


def test_a_bad_database_port_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    env = _env(tmp_path, LORACORD_DATABASE_URL="postgresql+psycopg://bot:hunter2@db:99999/x")
    done = _cli("quotes", "list", "--channel", "general", env=env)
    _one_line_error(done, "LORACORD_DATABASE_URL: has port 99999")
    assert "hunter2" not in done.stderr


def test_a_data_dir_that_cannot_be_created_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    env = {**_env(tmp_path), "LORACORD_DATA_DIR": str(blocker / "data")}
    for args in (("quotes", "list", "--channel", "general"), ("ask", "hi")):
        _one_line_error(
            _cli(*args, env=env),
            f"data_dir {blocker / 'data'} cannot be created: {blocker} is a file, not a folder",
        )


def test_an_empty_path_setting_is_an_error(tmp_path: Path) -> None:
    _one_line_error(
        _cli(
            "quotes",
            "list",
            "--channel",
            "general",
            env={**_env(tmp_path), "LORACORD_DATA_DIR": ""},
        ),
        "environment variable LORACORD_DATA_DIR: must not be empty",
    )


def test_secrets_are_never_echoed_and_only_discord_token_is_read(tmp_path: Path) -> None:
    token = "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"
    cfg = tmp_path / "leaky.toml"
    cfg.write_text(f'discord_token = "{token}"\n')
    done = _cli("--config", str(cfg), "quotes", "list", "--channel", "general", env=_env(tmp_path))
    _one_line_error(done, f"{cfg}: discord_token: it looks like a secret")
    assert "DISCORD_TOKEN environment variable" in done.stderr and token not in done.stderr
    done = _cli("ask", "hi", env=_env(tmp_path, LORACORD_DISCORD_TOKEN=token))
    _one_line_error(done, "environment variable LORACORD_DISCORD_TOKEN: it looks like a secret")
    assert token not in done.stderr


def test_unknown_variable_is_reported_in_the_environment(tmp_path: Path) -> None:
    done = _cli("quotes", "list", "--channel", "general", env=_env(tmp_path, LORACORD_MODLE="x"))
    _one_line_error(
        done, "loracord: error: invalid settings: environment variable LORACORD_MODLE: no such"
    )
    assert "none.toml" not in done.stderr


_HTTP_LOG = """
import logging, sys
import bot
bot._configure_logging(int(sys.argv[1]), False)
logging.getLogger("discord.http").debug("POST /interactions/1/SECRET-INTERACTION-TOKEN/callback")
logging.getLogger("discord.webhook.async_").debug("PATCH /webhooks/1/SECRET-WEBHOOK-TOKEN")
logging.getLogger("discord.gateway").debug("gateway debug line")
"""


@pytest.mark.parametrize("verbose", [0, 1, 2, 3])
def test_discord_http_debug_log_only_at_vvv(verbose: int, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _HTTP_LOG, str(verbose)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert ("SECRET-INTERACTION-TOKEN" in done.stderr) is (verbose >= 3)
    assert ("SECRET-WEBHOOK-TOKEN" in done.stderr) is (verbose >= 3)
    assert ("gateway debug line" in done.stderr) is (verbose >= 2)


def test_help_says_what_vvv_shows(tmp_path: Path) -> None:
    done = _cli("--help", env=_env(tmp_path))
    assert done.returncode == 0
    assert "-vvv: also discord.py's HTTP debug log, which shows interaction" in " ".join(
        done.stdout.split()
    )


def test_model_info_reports_the_context_and_capacity_served(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    env = _env(tmp_path, LORACORD_MAX_CONTEXT_TOKENS="512", LORACORD_BATCH_ROWS="3")
    done = _cli("model", "info", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    info = json.loads(done.stdout)
    assert (info["context_tokens"], info["rows"]) == (512, 3)
    # SmolLM2-135M: 30 layers x (keys + values) x 3 KV heads x 64 dims, per token and row, in
    # fp32 on a CPU (attention reads it without a cast), in the model's dtype on a GPU.
    per_token = 30 * 2 * 3 * 64 * 4
    assert info["kv_cache_bytes"] == 3 * 512 * per_token
    assert info["decode_path"].startswith("fast (")
