"""The signals a foreground client passes on to what it runs.

``corral run`` forwards them to its sandbox's init, ``corral exec`` to the
process it started in a running sandbox, so that Ctrl-C, a service
manager's SIGTERM or a SIGHUP reach the command as if it ran in the
foreground. SIGKILL and SIGSTOP cannot be caught; SIGWINCH means something
else to a terminal client and is handled there.

In the runtime, the lowest layer both clients import, and in a module of its
own that imports nothing but :mod:`signal`: ``corral run`` must stay cheap.
"""

from __future__ import annotations

import signal

__all__ = ["FORWARDED_SIGNALS"]

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""Caught by a foreground client and sent on to what it runs."""
