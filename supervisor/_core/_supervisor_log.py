"""structlog, configured once for the whole supervisor, and the event log.

Human-readable lines on a terminal (structlog's console renderer), JSON
lines otherwise, with ISO timestamps and levels. :func:`log_events` is a bus
subscriber that writes every event as one log line; if it falls behind it
replays what it missed from the journal, so the log has every event.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog
import trio

import events

__all__ = ["configure_logging", "log_events"]

_LEVELS = {
    "oom_kill": "warning",
    "oom": "warning",
    "memory_pressure": "warning",
    "start_failed": "error",
    "gap": "warning",
    "journal_degraded": "warning",
}


def configure_logging(*, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog: console renderer on a TTY, JSON lines otherwise."""
    out = stream or sys.stdout
    if json is None:
        json = not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def _log(logger: Any, event: events.Event) -> None:
    level = _LEVELS.get(event.kind, "info")
    if event.kind == "exited" and getattr(event, "status", 0) != 0:
        level = "warning"
    fields: dict[str, Any] = {"seq": event.seq}
    if event.sandbox:
        fields.update(sandbox=event.sandbox, instance=event.instance, generation=event.generation)
    fields.update(event.data())
    getattr(logger, level)(event.kind, **fields)


async def log_events(
    bus: events.Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Log every event on the bus, in order, recovering gaps from the journal.

    Returns after logging ``supervisor_stopped``, so the last lines are
    never lost to cancellation. If the log's stream fails (``corral up |
    head`` exits, the terminal of a closed ssh session, a full disk), the
    log is switched off with one line on stderr and the fleet runs on: a
    log is never worth a supervisor. Lines are written in a worker thread,
    a batch at a time: a reader that stops reading (``corral up | less``,
    paused) blocks this task alone, never the supervisor; it falls behind,
    and what it missed comes from the journal once it reads again.
    """
    from ._plugin_subscription import replay

    logger = structlog.get_logger("corral")
    broken = False
    writer = trio.CapacityLimiter(1)

    def write(batch: list[events.Event]) -> None:
        nonlocal broken
        for event in batch:
            if broken:
                return
            try:
                _log(logger, event)
            except OSError as exc:
                broken = True
                say(f"corral: the supervisor log is off: cannot write it: {exc.strerror or exc}")

    with bus.subscribe(maxsize=4096) as sub:
        task_status.started()
        async for first in sub:
            batch = [first]
            while len(batch) < 1024:
                try:
                    batch.append(sub.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break  # the bus closed: the loop ends once this batch is out
            lines: list[events.Event] = []
            for event in batch:
                if isinstance(event, events.Gap):
                    lines += [
                        e async for e in replay(bus, sub.filter, event.first, event.last, None)
                    ]
                else:
                    lines.append(event)
            await trio.to_thread.run_sync(write, lines, limiter=writer, abandon_on_cancel=True)
            if any(isinstance(e, events.SupervisorStopped) for e in lines):
                return


def say(line: str) -> None:
    """One line on stderr, if stderr is still there."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
