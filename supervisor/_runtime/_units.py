"""The one grammar for sizes and durations, wherever corral reads them.

Fleet files, plugin settings, ``corral run`` options and ``corral logs
--since`` all parse through here, so ``64M`` and ``1h30m`` mean the same
thing everywhere and every error names its field the same way.

Sizes: a whole number of bytes, or a number with a binary unit, as in
Docker: ``512k``, ``64M``, ``1.5G``, ``2T`` (``1M`` is 1 MiB; a trailing
``B`` or ``iB`` is allowed: ``64MiB``, ``64mb``).

Durations: a number of seconds, or one or more number-unit pairs in the
manner of Go's ``time.ParseDuration``: ``500ms``, ``10s``, ``2m``, ``1h30m``,
``1.5d``; units ``ns``, ``us`` (``µs``), ``ms``, ``s``, ``m``, ``h``, ``d``.
Blanks around the numbers and units are ignored.
"""

from __future__ import annotations

from .._errors import SpecError

__all__ = ["format_size", "human_size", "parse_duration", "parse_size"]

# Patterns, not compiled ones: re compiles each on first use and caches it,
# so a CLI start that parses no duration pays nothing for them (0.6 ms).
# re itself is imported by the parsers that use it: a control verb prints
# sizes (human_size) without ever importing it (~2 ms with enum).
_SIZE = r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_EXPECTED = "expected a size like 64M or 1G"

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# Longest units first, so that "ms" is not read as "m" followed by "s".
_UNIT = "|".join(sorted(_DURATION_UNITS, key=len, reverse=True))
_PART = rf"\s*({_NUMBER})\s*({_UNIT})"
_DURATION = rf"^(?:\s*{_NUMBER}\s*|(?:{_PART})+\s*)$"
_DURATION_EXPECTED = "expected a duration like 10s or 500ms"
DAY = 86400.0


def parse_size(value: object, field: str, *, minimum: int = 1) -> int:
    """Bytes from a size (see the module's grammar); at least *minimum*.

    Raises :class:`~supervisor.SpecError` naming *field*.
    """
    import re

    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := re.match(_SIZE, value)):
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise SpecError(field, f"{_SIZE_EXPECTED}, got {value!r}")
    if n < minimum:
        if minimum <= 1:
            raise SpecError(field, f"{_SIZE_EXPECTED} (more than 0), got {value!r}")
        raise SpecError(field, f"expected at least {format_size(minimum)}, got {value!r}")
    return n


def format_size(n: int) -> str:
    """*n* bytes as the grammar writes it, exactly: ``64M``, ``1G``, ``1500``."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """Bytes for a person: ``512 B``, ``1.5 KiB``, ``64.0 MiB``, up to GiB."""
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def parse_duration(
    value: object, field: str, *, maximum: float | None = DAY, unit_required: bool = False
) -> float:
    """Seconds from a duration (see the module's grammar), from 0 to *maximum*
    (``None``: no upper bound). With *unit_required* a bare number is
    refused (``--since 10`` could mean a time as well as a duration).

    Raises :class:`~supervisor.SpecError` naming *field*.
    """
    import re

    n: float | None = None
    if isinstance(value, str) and re.match(_DURATION, value):
        parts = re.findall(_PART, value)
        if parts:
            n = sum(float(v) * _DURATION_UNITS[u] for v, u in parts)
        elif not unit_required:
            n = float(value)
    elif isinstance(value, int | float) and not isinstance(value, bool) and not unit_required:
        n = float(value)
    if n is None:
        raise SpecError(field, f"{_DURATION_EXPECTED}, got {value!r}")
    if n != n or n < 0 or (maximum is not None and n > maximum):
        bound = "" if maximum is None else f" and {_format_duration(maximum)}"
        raise SpecError(field, f"expected a duration between 0{bound}, got {value!r}")
    return n


def _format_duration(seconds: float) -> str:
    for unit in ("h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
