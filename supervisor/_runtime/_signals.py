"""The signals a foreground client passes on to what it runs.

``corral run`` forwards them to its sandbox's init, ``corral exec`` to the
process it started in a running sandbox, so that Ctrl-C, a service
manager's SIGTERM or a SIGHUP reach the command as if it ran in the
foreground. SIGKILL and SIGSTOP cannot be caught; SIGWINCH means something
else to a terminal client and is handled there.

In the runtime, the lowest layer both clients import, and in a module of its
own that imports nothing but the signal numbers: ``corral run`` and ``corral
exec`` must stay cheap. It reads them from :mod:`_signal`, the C module
under :mod:`signal`, whose numbers are plain ints: signal.py turns them into
enums at import, which with enum's own import costs ~2 ms of every
``corral exec``. Type checkers see :mod:`signal`, whose functions take both.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing: see supervisor._cli._common
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

__all__ = ["FORWARDED_SIGNALS"]

FORWARDED_SIGNALS: tuple[int, ...] = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
"""Caught by a foreground client and sent on to what it runs (numbers)."""
