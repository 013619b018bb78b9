"""The subscription request a socket client sends (see docs/events.md).

One msgpack map, at most :data:`MAX_REQUEST_BYTES`::

    {"v": 1, "kinds": [str] | nil, "sandboxes": [pattern] | nil, "since": int | nil}

Shared by the server (which validates it) and both clients (which build
it); it does not import trio.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ._codec import SCHEMA_VERSION
from ._errors import DecodeError
from ._filter import Filter

__all__ = ["MAX_FILTER_ITEMS", "MAX_REQUEST_BYTES", "Request", "decode_request", "encode_request"]

MAX_REQUEST_BYTES = 64 << 10
# Patterns compile into one regex in the server's (the supervisor's) thread;
# this many take about 25 ms, ten times as many a noticeable stall.
MAX_FILTER_ITEMS = 1024


@dataclass(frozen=True, slots=True)
class Request:
    """What a socket client asked for."""

    filter: Filter
    since: int | None


def encode_request(
    *,
    kinds: Iterable[str] | None = None,
    sandboxes: Iterable[str] | None = None,
    since: int | None = None,
) -> bytes:
    """The request bytes; raises ``TypeError``/``ValueError`` for bad arguments."""
    filter = Filter(kinds, sandboxes)  # validates the lists
    for what, items in (("kinds", filter.kinds), ("sandboxes", filter.sandboxes)):
        if items is not None and len(items) > MAX_FILTER_ITEMS:
            raise ValueError(f"{what}: at most {MAX_FILTER_ITEMS} entries, got {len(items)}")
    if since is not None and (type(since) is not int or since < 0):
        raise ValueError(f"since: expected a seq (int >= 0) or None, got {since!r}")
    data: bytes = msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "kinds": None if filter.kinds is None else sorted(filter.kinds),
            "sandboxes": None if filter.sandboxes is None else list(filter.sandboxes),
            "since": since,
        }
    )
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"the request is {len(data)} bytes; the limit is {MAX_REQUEST_BYTES}")
    return data


def _string_list(request: dict[Any, Any], key: str) -> list[str] | None:
    value = request.get(key)
    if value is None:
        return None
    if type(value) is not list or not all(type(v) is str for v in value):
        raise DecodeError(f"{key}: expected a list of str or nil")
    if len(value) > MAX_FILTER_ITEMS:
        raise DecodeError(f"{key}: at most {MAX_FILTER_ITEMS} entries")
    return value


def decode_request(obj: Any) -> Request:
    """The request in a decoded msgpack object; :class:`DecodeError` if invalid.

    Missing ``kinds``, ``sandboxes`` and ``since`` mean nil; unknown keys are
    ignored (later versions may add some).
    """
    if type(obj) is not dict:
        raise DecodeError("the request must be a map")
    if obj.get("v") != SCHEMA_VERSION or type(obj.get("v")) is not int:
        raise DecodeError(f"v: expected {SCHEMA_VERSION}, got {obj.get('v')!r:.40}")
    since = obj.get("since")
    if since is not None and (type(since) is not int or since < 0):
        raise DecodeError("since: expected int >= 0 or nil")
    return Request(Filter(_string_list(obj, "kinds"), _string_list(obj, "sandboxes")), since)
