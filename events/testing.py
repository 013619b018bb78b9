"""Helpers for testing code that publishes or consumes events.

- :func:`capture_events` records what is published on a bus, synchronously,
  so a test can assert on it right after the code under test ran.
- :func:`fake_event` builds any event with plausible defaults, so a test
  states only the fields it cares about.

An in-memory bus is simply ``Bus()`` (no journal).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Any, TypeVar, overload

from ._bus import Bus
from ._types import EVENT_TYPES, Event

__all__ = ["capture_events", "fake_event"]

E = TypeVar("E", bound=Event)


@contextmanager
def capture_events(bus: Bus) -> Iterator[list[Event]]:
    """Collect every event published on *bus* inside the block, stamped, in order.

    ::

        with capture_events(bus) as captured:
            await plugin.handle(...)
        assert [e.kind for e in captured] == ["stopping", "stopped"]

    The list is filled as each event is published (no task, no awaiting),
    and keeps its contents after the block.
    """
    captured: list[Event] = []
    tap = captured.append
    bus._taps.append(tap)
    try:
        yield captured
    finally:
        bus._taps.remove(tap)


# Zero values for the field types events use.
_ZERO: dict[str, Any] = {"int": 0, "float": 0.0, "str": "", "bool": False, "int | None": None}


@overload
def fake_event(kind: type[E], /, **values: Any) -> E: ...
@overload
def fake_event(kind: str, /, **values: Any) -> Event: ...
def fake_event(kind: type[Event] | str, /, **values: Any) -> Event:
    """An event of *kind* (a record type or its KIND) with *values* set and
    every other required field filled in: sandbox ``"test"``, numbers 0,
    strings empty, optional values None, maps empty.

    ``fake_event("exited", status=137, signal=9)``
    """
    cls = EVENT_TYPES[kind] if isinstance(kind, str) else kind
    for f in fields(cls):
        if f.name in values or f.default is not MISSING or f.default_factory is not MISSING:
            continue
        if f.name == "sandbox":
            values["sandbox"] = "test"
        elif f.type == "dict[str, Any]":
            values[f.name] = {}
        else:
            values[f.name] = _ZERO[str(f.type)]
    return cls(**values)
