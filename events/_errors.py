"""The events package's exceptions.

::

    EventsError          every error this package raises on purpose
    ├── DecodeError      bytes or a map that is not a valid v1 event or request
    │                    (also a ValueError)
    ├── JournalError     the journal directory could not be read or written
    └── SocketError      the event socket could not be served or reached

``OSError`` and msgpack's own exceptions are translated at the boundary
(``raise ... from exc``), so the message names the path or the field and
says what was expected.
"""

from __future__ import annotations

__all__ = ["DecodeError", "EventsError", "JournalError", "SocketError"]


class EventsError(Exception):
    """Base class of every error the events package raises on purpose."""


class DecodeError(EventsError, ValueError):
    """Input is not a valid event (or subscription request) of schema v1.

    The message says what was wrong, e.g. ``data.pid: expected int, got
    str``. Unknown *kinds* are not an error: they decode to
    :class:`UnknownEvent`.
    """


class JournalError(EventsError):
    """The journal directory or one of its segments could not be used."""


class SocketError(EventsError):
    """The event socket could not be served, reached, or broke mid-stream."""
