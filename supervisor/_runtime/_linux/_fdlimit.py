"""Undoing work at the open-file limit.

A fleet that reaches its open-file limit fails the starts that cannot get
their descriptors (one line each); what those starts made must still be
undone. Most of the undoing needs no descriptor (``rmdir``, ``unlink``),
but some does: killing what is left in a cgroup reads its ``cgroup.procs``,
giving back a user-namespace claim reads the claim. At the limit, the
other starts failing at the same moment let theirs go within milliseconds:
:func:`patiently` tries again meanwhile, for a bounded time.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

__all__ = ["PATIENCE", "out_of_descriptors", "patiently"]

PATIENCE = 2.0
"""Seconds an undo step is tried again while descriptors are short."""

_SHORT = (errno.EMFILE, errno.ENFILE)


def out_of_descriptors(exc: BaseException) -> bool:
    """True if *exc* (or an error it was raised from) is EMFILE or ENFILE."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain, not a loop
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _SHORT:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def patiently(fn: Callable[..., object], *args: object, patience: float = PATIENCE) -> None:
    """``fn(*args)``, tried again (1, 2, 4 ... up to 100 ms apart) while it
    fails for want of descriptors, for up to *patience* seconds; any other
    failure, or the last, is raised. *fn* must be safe to call again after
    a failure (an undo step: it finds done what was done)."""
    deadline = time.monotonic() + patience
    delay = 0.001
    while True:
        try:
            fn(*args)
            return
        except Exception as exc:
            if not out_of_descriptors(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
