"""Settings: defaults, file, environment overrides, and one clear error per bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import SettingsError
from core.settings import load


def test_defaults_are_valid_and_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load(environ={"HOME": str(tmp_path)})
    assert s.model == "embedded"
    assert s.cache_dir.is_absolute() and s.data_dir.is_absolute() and s.adapters_dir.is_absolute()
    assert s.discord.token is None


def test_committed_example_file_loads_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "loracord.toml"
    assert load(example, environ={}) == load(None, environ={"LORACORD_CONFIG": str(example)})
    assert load(example, environ={}).model == "embedded"


def test_file_then_environment_then_keywords(tmp_path: Path) -> None:
    cfg = tmp_path / "loracord.toml"
    cfg.write_text('model = "/models/x"\nqueue_size = 3\n[discord]\ndev_guild = 42\n')
    s = load(
        cfg,
        environ={
            "LORACORD_QUEUE_SIZE": "5",
            "LORACORD_DISCORD_ADMIN_ROLE_IDS": "1,2",
            "DISCORD_TOKEN": "secret",
        },
        temperature=0.0,
    )
    assert s.model == "/models/x"
    assert s.queue_size == 5
    assert s.discord.dev_guild == 42
    assert s.discord.admin_role_ids == (1, 2)
    assert s.discord.token == "secret"
    assert s.temperature == 0.0
    assert "secret" not in repr(s)


def test_every_bad_field_is_reported_with_its_source(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('temperature = 9\nmax_new_tokens = 0\nkernel = "warp"\ntypo_field = 1\n')
    with pytest.raises(SettingsError) as caught:
        load(cfg, environ={"LORACORD_QUEUE_SIZE": "many", "LORACORD_NOPE": "1"})
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 6, problems
    assert "temperature" in text and "less than or equal to 2" in text
    assert "max_new_tokens" in text
    assert "unknown kernel 'warp'" in text
    assert "typo_field" in text
    assert "LORACORD_QUEUE_SIZE" in text and "'many'" in text
    assert "LORACORD_NOPE: no such setting" in text


def test_test_suite_variables_are_not_settings() -> None:
    settings = load(
        None,
        environ={"LORACORD_TEST_POSTGRES_URL": "postgresql://x", "LORACORD_CONFIG": "/dev/null"},
    )
    assert settings.model == "embedded"


def test_only_list_settings_split_on_commas() -> None:
    url = "postgresql://bot:p,w@db/loracord?options=a,b"
    settings = load(
        None,
        environ={
            "LORACORD_CONFIG": "/dev/null",
            "LORACORD_DATABASE_URL": url,
            "LORACORD_DISCORD_PLUGINS": "ask, quotes",
            "LORACORD_DISCORD_ADMIN_USER_IDS": "[7, 8]",
        },
    )
    assert settings.database_url == url
    assert settings.discord.plugins == ("ask", "quotes")
    assert settings.discord.admin_user_ids == (7, 8)


def test_token_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[discord]\ntoken = "abc"\n')
    with pytest.raises(SettingsError, match="DISCORD_TOKEN"):
        load(cfg, environ={})


def test_unreadable_file_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("model = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load(cfg, environ={})
    with pytest.raises(SettingsError, match="does not exist"):
        load(tmp_path / "missing.toml", environ={})


def test_default_answer_length_must_fit_the_cap() -> None:
    with pytest.raises(SettingsError, match="above max_new_tokens_cap"):
        load(None, environ={}, max_new_tokens=300, max_new_tokens_cap=100)
    with pytest.raises(SettingsError, match="model"):
        load(None, environ={}, model="  ")
