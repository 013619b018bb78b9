"""The ``network`` setting of a sandbox, checked (plain text, no I/O)."""

from __future__ import annotations

from ..._errors import SpecError

__all__ = ["NETWORK_MODES", "parse_network"]

NETWORK_MODES = ("none", "bridge", "host")
"""What ``network`` may be."""


def parse_network(value: object, field: str = "network") -> str:
    """A sandbox's network mode: ``none``, ``bridge`` or ``host``."""
    if not isinstance(value, str) or value not in NETWORK_MODES:
        raise SpecError(field, f"expected one of {', '.join(NETWORK_MODES)}, got {value!r}")
    return value
