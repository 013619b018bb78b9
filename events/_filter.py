"""Which events a subscriber wants: a set of kinds and sandbox name patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

__all__ = ["Filter"]

# Sandbox names come and go (ephemeral sandboxes have unique names), so the
# per-name cache is emptied when it grows past this instead of growing forever.
_CACHE_LIMIT = 4096


def _strings(what: str, values: Iterable[str]) -> tuple[str, ...]:
    # A lone string is iterable too: kinds="exited" would mean the kinds
    # "e", "x", "i", ... and silently match nothing.
    if isinstance(values, str):
        raise TypeError(f"{what}: expected a list of strings, got the string {values!r}")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{what}: expected strings, got {type(v).__name__} {v!r}")
    return out


class Filter:
    """Matches events by kind (exact names) and sandbox (fnmatch patterns,
    case-sensitive). ``None`` for either means "all".

    Supervisor-level events have sandbox ``""``: a sandbox filter selects
    them only if a pattern matches the empty string (``"*"`` does).
    """

    __slots__ = ("_cache", "_pattern", "kinds", "sandboxes")

    def __init__(
        self, kinds: Iterable[str] | None = None, sandboxes: Iterable[str] | None = None
    ) -> None:
        self.kinds: frozenset[str] | None = (
            None if kinds is None else frozenset(_strings("kinds", kinds))
        )
        self.sandboxes: tuple[str, ...] | None = (
            None if sandboxes is None else _strings("sandboxes", sandboxes)
        )
        self._pattern: re.Pattern[str] | None = None
        if self.sandboxes is not None:
            # One regex for all patterns; an empty list matches nothing.
            self._pattern = re.compile(
                "|".join(fnmatch.translate(p) for p in self.sandboxes) or "(?!)"
            )
        self._cache: dict[str, bool] = {}

    def matches(self, kind: str, sandbox: str) -> bool:
        """Whether an event of *kind* about *sandbox* passes."""
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self._pattern is None:
            return True
        hit = self._cache.get(sandbox)
        if hit is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            hit = self._cache[sandbox] = self._pattern.match(sandbox) is not None
        return hit
