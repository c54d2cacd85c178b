"""Settings: defaults, file, environment overrides, and one clear error per bad field."""

from __future__ import annotations

import os
import re
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


TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f'token = "{TOKEN}"', "token"),
        (f'discord_token = "{TOKEN}"', "discord_token"),
        (f'[discord]\ntoken = "{TOKEN}"', "discord.token"),
        (f'[discord]\nbot_secret = "{TOKEN}"', "discord.bot_secret"),
        (f'api_key = "{TOKEN}"', "api_key"),
        (f'[credentials]\npassword = "{TOKEN}"', "credentials"),
    ],
)
def test_a_secret_in_the_file_is_named_never_echoed(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "loracord.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(SettingsError) as caught:
        load(cfg, environ={})
    message = str(caught.value)
    assert caught.value.problems == [
        f"{cfg}: {key}: it looks like a secret: the Discord token belongs in the DISCORD_TOKEN "
        "environment variable, never in a file or another variable (the value is not shown)"
    ]
    assert TOKEN not in message and "GhIjKl" not in message


def test_a_token_shaped_value_under_any_key_is_not_echoed(tmp_path: Path) -> None:
    cfg = tmp_path / "loracord.toml"
    cfg.write_text(f'[discord]\ndev_guild = "{TOKEN}"\n')
    with pytest.raises(SettingsError) as caught:
        load(cfg, environ={})
    assert caught.value.problems == [
        f"{cfg}: discord.dev_guild: Input should be a valid integer, unable to parse string as an "
        "integer"
    ]


def test_only_discord_token_is_read_from_the_environment() -> None:
    env = {"LORACORD_CONFIG": "/dev/null", "LORACORD_DISCORD_TOKEN": TOKEN}
    with pytest.raises(SettingsError) as caught:
        load(None, environ=env)
    assert caught.value.problems == [
        "environment variable LORACORD_DISCORD_TOKEN: it looks like a secret: the Discord token "
        "belongs in the DISCORD_TOKEN environment variable, never in a file or another variable "
        "(the value is not shown)"
    ]
    assert TOKEN not in str(caught.value)
    settings = load(None, environ={"LORACORD_CONFIG": "/dev/null", "DISCORD_TOKEN": TOKEN})
    assert settings.discord.token == TOKEN


def test_an_unknown_variable_is_reported_in_the_environment_not_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "loracord.toml"
    cfg.write_text('model = "embedded"\n')
    with pytest.raises(SettingsError) as caught:
        load(cfg, environ={"LORACORD_MODLE": "x"})
    assert str(caught.value) == (
        "invalid settings: environment variable LORACORD_MODLE: no such setting"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql+psycopg://bot:hunter2@db:abc/loracord", "not a number from 1 to 65535"),
        ("postgresql+psycopg://bot:hunter2@db:0/loracord", "has port 0; a port is a number"),
        ("postgresql+psycopg://bot:hunter2@db:70000/loracord", "has port 70000"),
        ("hunter2 is no url", "is not a database URL"),
        ("  ", "must not be empty"),
    ],
)
def test_a_bad_database_url_is_refused_without_its_password(url: str, problem: str) -> None:
    env = {"LORACORD_CONFIG": "/dev/null", "LORACORD_DATABASE_URL": url}
    with pytest.raises(SettingsError) as caught:
        load(None, environ=env)
    (line,) = caught.value.problems
    assert line.startswith("environment variable LORACORD_DATABASE_URL: ") and problem in line
    assert "hunter2" not in str(caught.value)


def test_a_good_database_url_passes() -> None:
    url = "postgresql+psycopg://bot:pw@db:5432/loracord"
    env = {"LORACORD_CONFIG": "/dev/null", "LORACORD_DATABASE_URL": url}
    assert load(None, environ=env).database_url == url


@pytest.mark.parametrize(
    "var", ["LORACORD_DATA_DIR", "LORACORD_CACHE_DIR", "LORACORD_ADAPTERS_DIR"]
)
def test_an_empty_path_is_an_error_not_the_current_directory(var: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(None, environ={"LORACORD_CONFIG": "/dev/null", var: ""})
    assert caught.value.problems == [
        f"environment variable {var}: must not be empty; leave it unset for the default (got '')"
    ]


def test_a_config_that_is_a_directory_or_not_utf8_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, environ={})
    assert (
        str(caught.value)
        == f"invalid settings: settings file {tmp_path} is a directory, not a file"
    )
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('system_prompt = "café"\n'.encode("latin-1"))
    with pytest.raises(SettingsError) as caught:
        load(latin, environ={})
    assert str(caught.value) == (
        f"invalid settings: settings file {latin} is not UTF-8 text (bad byte at offset 20)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config_is_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "secret.toml"
    cfg.write_text('model = "embedded"\n')
    cfg.chmod(0)
    with pytest.raises(SettingsError) as caught:
        load(cfg, environ={})
    assert str(caught.value) == (
        f"invalid settings: settings file {cfg} cannot be read: permission denied"
    )


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_a_config_that_fails_to_read_is_one_clear_line_even_for_root() -> None:
    # Reading /proc/self/mem at offset 0 fails with EIO for every user, root included.
    with pytest.raises(SettingsError) as caught:
        load("/proc/self/mem", environ={})
    assert str(caught.value) == (
        "invalid settings: settings file /proc/self/mem cannot be read: Input/output error"
    )


def test_the_committed_file_shows_every_setting_and_its_true_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import PROJECT_ROOT, Settings

    committed = (PROJECT_ROOT / "loracord.toml").read_text(encoding="utf-8")
    setting = re.compile(r"^# (\w+) = ")
    shown = [m.group(1) for line in committed.splitlines() if (m := setting.match(line))]
    everything = [
        name
        for name, field in Settings.model_fields.items()
        if name not in ("discord", "quotes", "training") and not field.exclude
    ]
    for section in ("discord", "quotes", "training"):
        model = Settings.model_fields[section].annotation
        assert model is not None
        everything += [n for n, f in model.model_fields.items() if not f.exclude]
    assert sorted(shown) == sorted(everything)
    # Uncommenting every line not marked "example" must change nothing.
    uncommented = "\n".join(
        line[2:] if setting.match(line) and "# example" not in line else line
        for line in committed.splitlines()
    )
    cfg = tmp_path / "uncommented.toml"
    cfg.write_text(uncommented, encoding="utf-8")
    monkeypatch.chdir(PROJECT_ROOT)  # adapters_dir = "adapters" is taken from here
    home = {"HOME": str(Path.home())}
    assert load(cfg, environ=home) == load(None, environ={**home, "LORACORD_CONFIG": "/dev/null"})


def test_an_empty_config_variable_is_an_error() -> None:
    with pytest.raises(SettingsError) as caught:
        load(None, environ={"LORACORD_CONFIG": " "})
    assert str(caught.value) == (
        "invalid settings: environment variable LORACORD_CONFIG: must not be empty; leave it "
        "unset for ./loracord.toml"
    )
