"""The public surface of the events package: what it exports, and its cost."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import events
import events.testing

REPO = Path(__file__).resolve().parent.parent


def test_import_does_not_load_trio() -> None:
    """`import events` and the blocking client stay off trio (about 180 ms)."""
    code = (
        "import sys, events, events._blocking; "
        "events.encode, events.Journal, events.iter_events; "
        "assert 'trio' not in sys.modules, 'trio was imported'; "
        "events.Bus; assert 'trio' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("name", events.__all__)
def test_every_export_resolves_and_is_documented(name: str) -> None:
    """Each name in __all__ exists (lazily or not) and says what it is."""
    obj = getattr(events, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__.startswith("events._"), f"events.{name} is not ours"
        assert inspect.getdoc(obj), f"events.{name} has no docstring"


def test_dir_lists_the_lazy_names_and_unknown_names_fail() -> None:
    """dir() shows the lazy exports; a typo is an AttributeError, not None."""
    assert {"Bus", "serve_events", "subscribe"} <= set(dir(events))
    with pytest.raises(AttributeError, match="no attribute 'Buss'"):
        events.Buss  # type: ignore[attr-defined]  # noqa: B018  (the typo is the point)


def test_testing_helpers_are_documented() -> None:
    """The helpers for plugin authors are public API, documented like the rest."""
    for name in events.testing.__all__:
        assert inspect.getdoc(getattr(events.testing, name))
