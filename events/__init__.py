"""Typed sandbox events, their msgpack codec, the journal, the bus and the
event socket. Depends on nothing else in corral.

- Event records (:class:`Event` and its subclasses, :data:`EVENT_TYPES`,
  :func:`stamped`): a closed set of frozen dataclasses.
- :func:`encode`, :func:`decode`, :class:`Decoder`: schema v1, one msgpack
  map per event (docs/events.md).
- :class:`Journal`: size-rotated on-disk segments for replay.
- :class:`Bus`, :class:`Subscription`: in-process publish/subscribe on trio
  memory channels; a slow subscriber gets a :class:`Gap`, never blocks.
- :func:`serve_events`: the Unix socket for outside consumers;
  :func:`subscribe` (trio) and :func:`iter_events` (blocking) read it.
- The exception tree rooted at :class:`EventsError` (see ``_errors``).
- :mod:`events.testing`: ``capture_events`` and ``fake_event``.
- :mod:`events.segments`: append-only files of whole records, size-bounded
  and rotated (the journal's segments, and the other such files corral keeps).
- :mod:`events.unixsocket`: binding a Unix socket and admitting peers by
  their credentials (the event socket's and the control socket's).

``import events`` imports nothing but the exception tree: every other name
is loaded on first access through the module ``__getattr__``. So scripts
using :func:`iter_events`, the codec or the journal do not pay for trio
(about 180 ms, for ``Bus``, ``Subscription``, ``serve_events``,
``subscribe``, ``EventStream``), and a program that reads only
:mod:`events.segments` (``corral logs``) does not pay for the event types
either (their dataclasses take ~17 ms to define), nor for msgpack.
"""

from __future__ import annotations

from ._errors import DecodeError as DecodeError
from ._errors import EventsError as EventsError
from ._errors import JournalError as JournalError
from ._errors import SocketError as SocketError

# typing.TYPE_CHECKING without importing typing (~4 ms with re); type
# checkers treat any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._blocking import iter_events as iter_events
    from ._bus import Bus as Bus
    from ._bus import Subscription as Subscription
    from ._client import EventStream as EventStream
    from ._client import subscribe as subscribe
    from ._codec import SCHEMA_VERSION as SCHEMA_VERSION
    from ._codec import Decoder as Decoder
    from ._codec import decode as decode
    from ._codec import encode as encode
    from ._journal import Journal as Journal
    from ._server import serve_events as serve_events
    from ._types import EVENT_TYPES as EVENT_TYPES
    from ._types import Added as Added
    from ._types import Adopted as Adopted
    from ._types import Checkpointed as Checkpointed
    from ._types import CheckpointFailed as CheckpointFailed
    from ._types import Created as Created
    from ._types import Event as Event
    from ._types import ExecExited as ExecExited
    from ._types import ExecStarted as ExecStarted
    from ._types import Exited as Exited
    from ._types import Failed as Failed
    from ._types import Gap as Gap
    from ._types import JournalDegraded as JournalDegraded
    from ._types import JournalRecovered as JournalRecovered
    from ._types import LimitChanged as LimitChanged
    from ._types import MemoryPressure as MemoryPressure
    from ._types import Oom as Oom
    from ._types import OomKill as OomKill
    from ._types import Paused as Paused
    from ._types import PluginEvent as PluginEvent
    from ._types import PluginFailed as PluginFailed
    from ._types import Removed as Removed
    from ._types import Restarting as Restarting
    from ._types import Restored as Restored
    from ._types import Resumed as Resumed
    from ._types import Signaled as Signaled
    from ._types import Started as Started
    from ._types import StartFailed as StartFailed
    from ._types import Stopped as Stopped
    from ._types import Stopping as Stopping
    from ._types import SupervisorStarted as SupervisorStarted
    from ._types import SupervisorStopped as SupervisorStopped
    from ._types import SupervisorStopping as SupervisorStopping
    from ._types import UnknownEvent as UnknownEvent
    from ._types import stamped as stamped

# Name -> module, for every name but the errors: each is loaded on first access.
_LAZY = {
    "iter_events": "_blocking",
    "SCHEMA_VERSION": "_codec",
    "Decoder": "_codec",
    "decode": "_codec",
    "encode": "_codec",
    "Journal": "_journal",
    "EVENT_TYPES": "_types",
    "Added": "_types",
    "Adopted": "_types",
    "Checkpointed": "_types",
    "CheckpointFailed": "_types",
    "Created": "_types",
    "Event": "_types",
    "ExecExited": "_types",
    "ExecStarted": "_types",
    "Exited": "_types",
    "Failed": "_types",
    "Gap": "_types",
    "JournalDegraded": "_types",
    "JournalRecovered": "_types",
    "LimitChanged": "_types",
    "MemoryPressure": "_types",
    "Oom": "_types",
    "OomKill": "_types",
    "Paused": "_types",
    "PluginEvent": "_types",
    "PluginFailed": "_types",
    "Removed": "_types",
    "Restarting": "_types",
    "Restored": "_types",
    "Resumed": "_types",
    "Signaled": "_types",
    "Started": "_types",
    "StartFailed": "_types",
    "Stopped": "_types",
    "Stopping": "_types",
    "SupervisorStarted": "_types",
    "SupervisorStopped": "_types",
    "SupervisorStopping": "_types",
    "UnknownEvent": "_types",
    "stamped": "_types",
    # These import trio.
    "Bus": "_bus",
    "Subscription": "_bus",
    "EventStream": "_client",
    "subscribe": "_client",
    "serve_events": "_server",
}


if not TYPE_CHECKING:
    # Hidden from type checkers: they see the imports above, so a misspelt
    # name (``events.Strated``) is an error for them, not an Any.

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'events' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "Added",
    "Adopted",
    "Bus",
    "CheckpointFailed",
    "Checkpointed",
    "Created",
    "DecodeError",
    "Decoder",
    "Event",
    "EventStream",
    "EventsError",
    "ExecExited",
    "ExecStarted",
    "Exited",
    "Failed",
    "Gap",
    "Journal",
    "JournalDegraded",
    "JournalError",
    "JournalRecovered",
    "LimitChanged",
    "MemoryPressure",
    "Oom",
    "OomKill",
    "Paused",
    "PluginEvent",
    "PluginFailed",
    "Removed",
    "Restarting",
    "Restored",
    "Resumed",
    "Signaled",
    "SocketError",
    "StartFailed",
    "Started",
    "Stopped",
    "Stopping",
    "Subscription",
    "SupervisorStarted",
    "SupervisorStopped",
    "SupervisorStopping",
    "UnknownEvent",
    "decode",
    "encode",
    "iter_events",
    "serve_events",
    "stamped",
    "subscribe",
]
