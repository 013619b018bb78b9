"""The supervisor's worker threads, by kind of work: one limiter each.

``trio.to_thread.run_sync`` shares one default limiter of 40 threads among
all its callers. A CRIU checkpoint holds its thread for seconds (longer for
a large sandbox): forty of them, say a periodic checkpoint of a large fleet,
would hold every slot, and the create of a sandbox, the SIGTERM of a stop or
the removal of an old generation would wait behind them. So every call of
the supervisor names the limiter of its kind of work, and a kind can only
make itself wait. The sizes are what each kind needs, not tuning knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = [
    "CHECKPOINT_THREADS",
    "DISK_THREADS",
    "LIFECYCLE_THREADS",
    "SIGNAL_THREADS",
    "STANDBY_THREADS",
    "Limiters",
]

LIFECYCLE_THREADS = 40
"""Creates, destroys, execs, freezes and thaws: milliseconds each, and many
at once when a fleet starts or stops (trio's own default size)."""
CHECKPOINT_THREADS = 8
"""CRIU checkpoints and restores: seconds each and heavy on memory and disk,
so that a few at a time is all the host can do well anyway."""
SIGNAL_THREADS = 16
"""Signals to sandboxes: a system call, after a bounded wait for a newly
started init to be ready for the signal."""
STANDBY_THREADS = 256
"""Standby generations being made or waiting for their exec (each holds a
thread while it waits: :mod:`._standby`); more wait for a thread, and a
restart meanwhile starts afresh."""
DISK_THREADS = 8
"""Reading and removing files: checkpoint lists and deletions, the journal
for replays to socket clients, fleet files, cgroup counters."""


@dataclass(frozen=True)
class Limiters:
    """One :class:`trio.CapacityLimiter` per kind of thread work."""

    lifecycle: trio.CapacityLimiter
    """Creating, destroying, exec'ing into, freezing and thawing sandboxes."""
    checkpoint: trio.CapacityLimiter
    """CRIU checkpoints and restores."""
    signals: trio.CapacityLimiter
    """Signals to sandboxes (kill, the SIGTERM of a stop)."""
    disk: trio.CapacityLimiter
    """Reading and removing files."""
    standby: trio.CapacityLimiter
    """Standby generations, made and then waiting for their exec."""

    @classmethod
    def default(cls) -> Limiters:
        """Limiters of the sizes above."""
        return cls(
            lifecycle=trio.CapacityLimiter(LIFECYCLE_THREADS),
            checkpoint=trio.CapacityLimiter(CHECKPOINT_THREADS),
            signals=trio.CapacityLimiter(SIGNAL_THREADS),
            disk=trio.CapacityLimiter(DISK_THREADS),
            standby=trio.CapacityLimiter(STANDBY_THREADS),
        )
