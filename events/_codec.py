"""The one msgpack encoding of events (schema v1), documented in docs/events.md.

Each event is one msgpack map::

    {"v": 1, "seq": int, "kind": str, "sandbox": str, "instance": int,
     "generation": int, "wall": float, "mono": float, "data": map}

A stream (journal segment, socket) is nothing but such maps back to back:
msgpack objects delimit themselves, so there is no framing of our own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ._errors import DecodeError
from ._types import EVENT_TYPES, Event, UnknownEvent

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "SCHEMA_VERSION",
    "UNPACK_OPTIONS",
    "Decoder",
    "decode",
    "encode",
]

SCHEMA_VERSION = 1
"""The ``v`` of every map this version writes, and the only one it reads."""

DEFAULT_MAX_EVENT_BYTES = 16 << 20
"""A :class:`Decoder` refuses to buffer a single object larger than this."""

UNPACK_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": False}
"""How every reader of events unpacks: str as str, and maps nested in a
plugin's payload may have any keys (msgpack allows them; the top-level maps
are checked for str keys)."""

# msgpack raises ValueError subclasses for malformed input, and
# UnpackException (not a ValueError) for a few buffer conditions.
_UNPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def encode(event: Event) -> bytes:
    """*event* as one msgpack map of schema v1.

    Raises ``TypeError`` for the bare :class:`Event` base class (it has no
    kind), for a field whose value does not have the declared type, and for
    a :class:`PluginEvent` payload msgpack cannot represent: whatever
    encodes, decodes (a bad record in the journal would fail every replay).
    """
    kind = event.kind
    if not kind:
        raise TypeError(f"{type(event).__name__} has no KIND: publish one of its subclasses")
    _check_fields(event)
    try:
        return msgpack.packb(  # type: ignore[no-any-return]
            {
                "v": SCHEMA_VERSION,
                "seq": event.seq,
                "kind": kind,
                "sandbox": event.sandbox,
                "instance": event.instance,
                "generation": event.generation,
                # float() so the wire type is always float64, even when a
                # producer passed an int.
                "wall": float(event.wall),
                "mono": float(event.mono),
                "data": event.data(),
            }
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot encode {kind} event: {exc}") from exc


def decode(obj: bytes | bytearray | memoryview | dict[str, Any]) -> Event:
    """The event in *obj*: the bytes of one msgpack map, or the map itself.

    Raises :class:`DecodeError` for anything that is not a valid v1 event;
    an unknown ``kind`` is not an error and gives an :class:`UnknownEvent`.
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        try:
            obj = msgpack.unpackb(obj, **UNPACK_OPTIONS)
        except _UNPACK_ERRORS as exc:
            raise DecodeError(f"not one msgpack object: {exc}") from exc
    return from_map(obj)


class Decoder:
    """Decodes a stream of events fed in pieces of any size.

    ::

        dec = Decoder()
        dec.feed(chunk)
        for event in dec:   # every complete event fed so far
            ...

    A :class:`DecodeError` for a well-formed map with bad fields leaves the
    stream usable (iterate on to skip the record); one for malformed msgpack
    does not, as there is no way to find the next record boundary.
    """

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._unpacker = msgpack.Unpacker(max_buffer_size=max_event_bytes, **UNPACK_OPTIONS)
        self._fed = 0
        # Offset just past the last complete object. (tell() itself also
        # counts the part of an incomplete object already parsed.)
        self._done = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the stream."""
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise DecodeError(f"an object larger than {self._max} bytes") from exc
        self._fed += len(data)

    @property
    def pending(self) -> int:
        """Bytes fed but not yet decoded: non-zero at end of stream means a
        truncated last event."""
        return self._fed - self._done

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            obj = next(self._unpacker)
        except StopIteration:
            raise
        except _UNPACK_ERRORS as exc:
            raise DecodeError(f"malformed msgpack in the stream: {exc}") from exc
        self._done = self._unpacker.tell()
        return from_map(obj)


# --- validation ----------------------------------------------------------------

_Check = Callable[[Any], Any]


class _Invalid(Exception):
    """A value has the wrong type; the caller names the field."""


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _int(value: Any) -> int:
    # type() rather than isinstance(): a msgpack true must not pass as 1.
    if type(value) is not int:
        raise _Invalid("int")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise _Invalid("int >= 0")
    return value


def _float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        # Other producers may write a whole number as an integer.
        return float(value)
    raise _Invalid("float")


def _str(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid("str")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Invalid("bool")
    return value


def _optional_int(value: Any) -> int | None:
    if value is not None and type(value) is not int:
        raise _Invalid("int or nil")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if type(value) not in (list, tuple) or not all(type(v) is str for v in value):
        raise _Invalid("array of str")
    return tuple(value)


def _map(value: Any) -> dict[str, Any]:
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise _Invalid("map with str keys")
    return value


# Annotations are strings here (``from __future__ import annotations``), and
# the set of types event fields use is small and closed: an unknown one is a
# bug in _types.py and fails at the first decode of that kind.
_CHECKS: dict[str, _Check] = {
    "int": _int,
    "float": _float,
    "str": _str,
    "bool": _bool,
    "int | None": _optional_int,
    "dict[str, Any]": _map,
    "tuple[str, ...]": _strs,
}

_HEADER: tuple[tuple[str, _Check], ...] = (
    ("seq", _count),
    ("kind", _str),
    ("sandbox", _str),
    ("instance", _count),
    ("generation", _count),
    ("wall", _float),
    ("mono", _float),
    ("data", _map),
)


_plans: dict[type[Event], tuple[tuple[str, _Check, bool], ...]] = {}


def _plan(cls: type[Event]) -> tuple[tuple[str, _Check, bool], ...]:
    """(name, check, required) for each data field of *cls*, computed once."""
    plan = _plans.get(cls)
    if plan is None:
        plan = _plans[cls] = _make_plan(cls)
    return plan


def _make_plan(cls: type[Event]) -> tuple[tuple[str, _Check, bool], ...]:
    common = {name for name, _ in _HEADER}
    plan = []
    for f in fields(cls):
        if f.name in common:
            continue
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        required = f.default is MISSING and f.default_factory is MISSING
        plan.append((f.name, _CHECKS[annotation], required))
    return tuple(plan)


# What encode checks per class: the common integers and every data field.
# (A plain loop of the check functions: faster here than cleverer forms.)
_encode_checks: dict[type[Event], tuple[tuple[str, _Check], ...]] = {}


def _check_fields(event: Event) -> None:
    """Raise TypeError unless every field of *event* has its declared type."""
    cls = type(event)
    checks = _encode_checks.get(cls)
    if checks is None:
        common = (("sandbox", _str), ("instance", _count), ("generation", _count), ("seq", _count))
        checks = _encode_checks[cls] = common + tuple((n, c) for n, c, _ in _plan(cls))
    for name, check in checks:
        try:
            check(getattr(event, name))
        except _Invalid as exc:
            value = getattr(event, name)
            raise TypeError(
                f"cannot encode {event.kind} event: {name}: expected {exc}, "
                f"got {_type_name(value)} {value!r:.40}"
            ) from None


def from_map(obj: Any) -> Event:
    """The event in a decoded msgpack map (see :func:`decode`)."""
    if type(obj) is not dict:
        raise DecodeError(f"expected an event map, got {_type_name(obj)}")
    version = obj.get("v")
    if type(version) is not int:
        raise DecodeError("missing schema version 'v'" if version is None else "v: expected int")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {version} (this decoder reads 1)")
    header: dict[str, Any] = {}
    for key, check in _HEADER:
        if key not in obj:
            raise DecodeError(f"missing key {key!r}")
        try:
            header[key] = check(obj[key])
        except _Invalid as exc:
            raise DecodeError(
                f"{key}: expected {exc}, got {_type_name(obj[key])} {obj[key]!r:.40}"
            ) from None
    kind = header.pop("kind")
    if not kind:
        raise DecodeError("kind: expected a non-empty str")
    data = header.pop("data")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        return UnknownEvent(kind=kind, payload=data, **header)
    for name, check, required in _plan(cls):
        if name not in data:
            if required:
                raise DecodeError(f"{kind}: missing data key {name!r}")
            continue
        try:
            header[name] = check(data[name])
        except _Invalid as exc:
            value = data[name]
            raise DecodeError(
                f"{kind}: data.{name}: expected {exc}, got {_type_name(value)} {value!r:.40}"
            ) from None
    return cls(**header)
