"""Validation helpers for plugin settings, with errors that name the field."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["SettingsError", "duration", "number", "per_instance", "size"]

T = TypeVar("T")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SettingsError(ValueError):
    """A plugin setting is invalid; ``str()`` is ``FIELD: what was expected``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def duration(value: object, field: str) -> float:
    """Seconds from a number or ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        n = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        n = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise SettingsError(field, f"expected a duration like 10s or 500ms, got {value!r}")
    if not 0 <= n <= 86400:
        raise SettingsError(field, f"expected a duration between 0 and 24h, got {value!r}")
    return n


def number(value: object, field: str, *, low: float, high: float, whole: bool = False) -> float:
    """A number within [low, high] (a whole one if *whole*)."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not low <= value <= high
        or (whole and value != int(value))
    ):
        kind = "a whole number" if whole else "a number"
        raise SettingsError(field, f"expected {kind} from {low:g} to {high:g}, got {value!r}")
    return float(value)


def size(value: object, field: str) -> int:
    """Bytes from ``"512M"``, ``"1G"`` or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
        if n > 0:
            return n
    raise SettingsError(field, f"expected a size like 64M or 1G, got {value!r}")


def per_instance(
    settings: Callable[[str], Mapping[str, Any]], parse: Callable[[Mapping[str, Any]], T]
) -> Callable[[str], T]:
    """``policy_for(name)``: each instance's settings (``handle.settings``),
    parsed once; a bad table is a :class:`SettingsError` naming the sandbox."""
    cache: dict[str, T] = {}

    def policy_for(name: str) -> T:
        if name not in cache:
            try:
                cache[name] = parse(settings(name))
            except SettingsError as exc:
                raise SettingsError(exc.field, f"sandbox {name!r}: {exc.detail}") from None
        return cache[name]

    return policy_for
