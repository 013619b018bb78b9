"""Validation helpers for plugin settings, with errors that name the field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from supervisor import SpecError, parse_duration, parse_size

__all__ = ["SettingsError", "duration", "number", "per_instance", "size"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A plugin setting is invalid; ``str()`` is ``FIELD: what was expected``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def duration(value: object, field: str) -> float:
    """Seconds from a number or ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h30m"``
    (corral's one duration grammar: :func:`supervisor.parse_duration`), at
    most 24 hours."""
    try:
        return parse_duration(value, field)
    except SpecError as exc:
        raise SettingsError(field, _detail(exc)) from None


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
    """Bytes from ``"512M"``, ``"1G"`` or a plain number (corral's one size
    grammar: :func:`supervisor.parse_size`)."""
    try:
        return parse_size(value, field, minimum=1)
    except SpecError as exc:
        raise SettingsError(field, _detail(exc)) from None


def _detail(exc: SpecError) -> str:
    return str(exc).removeprefix(f"{exc.field}: ")


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
