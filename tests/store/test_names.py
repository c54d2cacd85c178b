"""core.names: the one check for channel and server names."""

from __future__ import annotations

import pytest

from core.errors import InvalidName, LoracordError
from core.names import channel_name, server_name


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("general", "general"),
        ("#General", "general"),
        (" off-topic_2 ", "off-topic_2"),
        ("222", "222"),
        ("1234567890123456789", "1234567890123456789"),
    ],
)
def test_channel_names_are_normalised(given: str, expected: str) -> None:
    assert channel_name(given) == expected


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("../../etc/passwd", "'../../etc/passwd'"),
        ("", "''"),
        ("#", "'#'"),
        ("a\u200bb", "'a\\u200bb'"),
        ("bad\x1b[2Jname", "'bad\\x1b[2Jname'"),
        ("-leading", "'-leading'"),
        ("caf\u00e9", "'café'"),
        ("x" * 65, "'" + "x" * 40 + "'... (65 characters)"),
    ],
)
def test_hostile_channel_names_are_refused_in_one_safe_line(given: str, shown: str) -> None:
    with pytest.raises(InvalidName) as caught:
        channel_name(given)
    message = str(caught.value)
    assert message.startswith(f"{shown} is not a channel name: use 1-64 lowercase letters")
    assert "\n" not in message and "\x1b" not in message and "\u200b" not in message
    assert isinstance(caught.value, LoracordError)


@pytest.mark.parametrize(("given", "expected"), [("42", "42"), ("console", "console")])
def test_server_names(given: str, expected: str) -> None:
    assert server_name(given) == expected


@pytest.mark.parametrize("given", ["../x", "", "s1", "1" * 21, "4\u200b2"])
def test_bad_server_names_are_refused(given: str) -> None:
    with pytest.raises(InvalidName, match=r"is not a server: use a Discord server id \(digits\)"):
        server_name(given)
