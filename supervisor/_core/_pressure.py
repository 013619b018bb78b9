"""Memory pressure of a running generation, reported before any OOM kill.

The kernel says it through the cgroup (see
:class:`supervisor._runtime._linux._cgroups.PressureWatch`): v2's ``high``
and ``max`` counters arrive with the OOM watch's wake-ups (they share
``memory.events``), v1's threshold and v2's PSI trigger through a
pressure watch of their own, re-armed when the limits change (the v1
threshold *is* ``memory_high``).

A sandbox at its limit can make the kernel signal hundreds of times a
second; each level's first signal is published at once (the latency that
matters, ``pressure_to_event_p99_ms`` in benchmarks/), the ones that follow
within :data:`PRESSURE_REPEAT` under the same limits are folded into one
event at its end.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from events import MemoryPressure

from .._errors import CorralError
from .._runtime._linux._cgroups import PressureWatch
from .._runtime._sandbox import Sandbox
from ._instance import Ident, Instance
from ._supervisor_log import say

__all__ = ["PRESSURE_REPEAT", "PressureReports", "watch_pressure"]

PRESSURE_REPEAT = 1.0
"""Seconds within which more pressure of a level already reported is
folded into the next event (with its ``count``)."""


class PressureReports:
    """Turns one generation's pressure signals into ``memory_pressure`` events."""

    def __init__(
        self,
        inst: Instance,
        ident: Ident,
        publish: Callable[[MemoryPressure], object],
        nursery: trio.Nursery,
    ) -> None:
        self._inst = inst
        self._ident = ident
        self._publish = publish
        self._nursery = nursery
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._counters: dict[str, int] | None = None
        self.watch: PressureWatch | None = None
        """The open pressure watch, which reads usage and marks."""

    def counters(self, now: dict[str, int]) -> None:
        """The cumulative counters (v2's ``high``, ``max``) as of now: their
        rise since the last call is signalled; the first call is the base."""
        before, self._counters = self._counters, dict(now)
        if before is None:
            return
        for level, n in now.items():
            if n > before.get(level, 0):
                self.signal(level, n - before.get(level, 0))

    def rearmed(self) -> None:
        """The limits changed: pressure from now on is about new marks, and
        is news at once (a hog whose limit just grew may reach the next
        mark within the second; folding that would let it reach the limit)."""
        self._last.clear()

    def signal(self, level: str, count: int) -> None:
        """The kernel signalled *level* *count* times."""
        now = trio.current_time()
        due = self._last.get(level, -math.inf) + PRESSURE_REPEAT
        if now >= due:
            self._emit(level, count + self._folded.pop(level, 0), now)
            return
        if level not in self._folded:
            self._nursery.start_soon(self._flush, level, due)
        self._folded[level] = self._folded.get(level, 0) + count

    async def _flush(self, level: str, due: float) -> None:
        await trio.sleep_until(due)
        count = self._folded.pop(level, 0)
        if count:
            self._emit(level, count, trio.current_time())

    def _emit(self, level: str, count: int, now: float) -> None:
        self._last[level] = now
        limits = self._inst.limits
        usage, limit, high = 0, limits.memory, limits.memory_high
        if self.watch is not None:
            try:
                usage = self.watch.usage()
                limit, high = self.watch.marks()
            except (CorralError, OSError):
                pass  # the cgroup is going: its exit is about to be seen
        self._publish(
            MemoryPressure(
                **self._ident, level=level, usage=usage, limit=limit, high=high, count=count
            )
        )


async def watch_pressure(inst: Instance, sb: Sandbox, reports: PressureReports) -> None:
    """Watch *sb*'s memory pressure until cancelled, re-armed with each
    change of *inst*'s limits."""
    while True:
        moved = inst._limits_moved
        limits = inst.limits
        try:
            watch = sb.cgroup.open_pressure_watch(limits)
        except (CorralError, OSError) as exc:
            say(f"corral: sandbox {sb.name!r}: memory pressure not watched: {exc}")
            await moved.wait()
            continue
        reports.watch = watch
        reports.rearmed()
        try:
            # A mark set (or moved) below what is in use already is news
            # now: the kernel signals only the next crossing, or charge.
            over = limits.memory_high is not None and watch.usage() >= limits.memory_high
        except (CorralError, OSError):
            over = False
        if over:
            reports.signal("high", 1)
        try:
            async with trio.open_nursery() as sources:
                for fd in watch.fds:
                    sources.start_soon(_source, watch, fd, reports)
                await moved.wait()
                sources.cancel_scope.cancel()
        finally:
            reports.watch = None
            watch.close()


async def _source(watch: PressureWatch, fd: int, reports: PressureReports) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        for level, count in watch.read(fd).items():
            reports.signal(level, count)
