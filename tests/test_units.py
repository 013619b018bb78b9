"""The one size and duration grammar, and that every reader of one uses it."""

from __future__ import annotations

import pytest

from plugins._settings import SettingsError, duration, size
from supervisor import SpecError, parse_duration, parse_size
from supervisor._cli._output_reader import parse_since
from supervisor._core._fleet import parse_fleet

DURATIONS = [
    ("10s", 10.0),
    ("500ms", 0.5),
    (" 10 s ", 10.0),
    ("1h30m", 5400.0),
    ("2m", 120.0),
    (".5s", 0.5),
    ("1.5h", 5400.0),
    ("250us", 0.00025),
    ("10", 10.0),
    (3, 3.0),
    (0.25, 0.25),
]
BAD_DURATIONS = ["", "s", "10x", "-5m", "1e3", "soon", "1h 30", True, None, [1]]
SIZES = [
    ("64M", 64 << 20),
    ("1g", 1 << 30),
    ("512k", 512 << 10),
    ("1.5G", 3 << 29),
    ("64MiB", 64 << 20),
    ("2T", 2 << 40),
    (4096, 4096),
]
BAD_SIZES = ["", "12Q", "M", "-1M", "1e3", True, 1.5, None]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_a_duration_means_the_same_everywhere(text: object, seconds: float) -> None:
    """The fleet file, a plugin setting and the library read a duration alike."""
    assert parse_duration(text, "f") == pytest.approx(seconds)
    assert duration(text, "delay") == pytest.approx(seconds)
    fleet = parse_fleet(
        {"supervisor": {"grace_period": text}, "sandbox": [{"name": "a", "command": ["true"]}]}
    )
    assert fleet.supervisor.grace_period == pytest.approx(seconds)
    if isinstance(text, str) and not text.strip().replace(".", "").isdigit():
        assert parse_since(text, 1000.0) == pytest.approx(1000.0 - seconds)


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_a_bad_duration_is_refused_everywhere_naming_the_field(text: object) -> None:
    """One error, naming the field, from each reader."""
    with pytest.raises(SpecError, match=r"^grace: expected a duration like 10s or 500ms, got "):
        parse_duration(text, "grace")
    with pytest.raises(SettingsError, match=r"^delay: expected a duration"):
        duration(text, "delay")


def test_durations_are_bounded_where_they_say() -> None:
    """Settings stop at 24 hours; --since goes back further; a bare number is no --since."""
    with pytest.raises(SpecError, match="between 0 and 24h"):
        parse_duration("25h", "f")
    assert parse_duration("30d", "f", maximum=None) == 30 * 86400
    assert parse_since("1.5d", 200000.0) == pytest.approx(200000.0 - 1.5 * 86400)
    with pytest.raises(SpecError):
        parse_duration("10", "--since", unit_required=True)


@pytest.mark.parametrize(("text", "n"), SIZES)
def test_a_size_means_the_same_everywhere(text: object, n: int) -> None:
    """The sandbox spec's sizes and the plugins' sizes share one grammar."""
    assert parse_size(text, "memory", minimum=1) == n
    assert size(text, "max_bytes") == n


@pytest.mark.parametrize("text", BAD_SIZES)
def test_a_bad_size_is_refused_everywhere_naming_the_field(text: object) -> None:
    """One error, naming the field, from each reader."""
    with pytest.raises(SpecError, match=r"^memory: expected a size like 64M or 1G, got "):
        parse_size(text, "memory")
    with pytest.raises(SettingsError, match=r"^max_bytes: expected a size like 64M or 1G"):
        size(text, "max_bytes")


def test_a_size_below_the_minimum_says_the_minimum() -> None:
    """The memory limit's floor is named in the grammar's own units."""
    with pytest.raises(SpecError, match=r"^memory: expected at least 4M, got '1M'$"):
        parse_size("1M", "memory")
    with pytest.raises(
        SettingsError, match=r"^max_bytes: expected a size like 64M or 1G \(more than 0\), got 0$"
    ):
        size(0, "max_bytes")
