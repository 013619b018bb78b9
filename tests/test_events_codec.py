"""The msgpack codec of events (schema v1): pure functions, no kernel."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

import events
from events import (
    EVENT_TYPES,
    DecodeError,
    Decoder,
    Event,
    Exited,
    Gap,
    PluginEvent,
    Started,
    SupervisorStarted,
    UnknownEvent,
    decode,
    encode,
    stamped,
)
from events.testing import fake_event

DOCS = Path(__file__).resolve().parent.parent / "docs" / "events.md"

# A non-zero value of each field type, so a field that is dropped or mixed
# up on the way shows.
_SAMPLE: dict[str, Any] = {
    "int": 42,
    "float": 2.5,
    "str": "héllo",
    "bool": True,
    "int | None": 9,
    "dict[str, Any]": {"a": [1, "x", None], "b": {"c": 1.5}},
    "tuple[str, ...]": ("a", "b"),
}


def _sample(cls: type[Event]) -> Event:
    values = {
        f.name: _SAMPLE[str(f.type)] for f in fields(cls) if f.name not in ("seq", "wall", "mono")
    }
    values["sandbox"] = "web-1"
    return stamped(cls(**values), 7, 1700000000.25, 12345.5)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (Started(sandbox="a", pid="12"), "started event: pid: expected int, got str '12'"),  # type: ignore[arg-type]
        (Started(sandbox="a", pid=True), "pid: expected int, got bool"),
        (Started(sandbox=None, pid=1), "sandbox: expected str, got nil"),  # type: ignore[arg-type]
        (Started(sandbox="a", instance=-1, pid=1), "instance: expected int >= 0"),
        (fake_event(Exited, signal="KILL"), "signal: expected int or nil"),
        (fake_event(Exited, oom_killed=1), "oom_killed: expected bool, got int"),
        (
            PluginEvent(sandbox="", name="x", payload={1: "x"}),  # type: ignore[dict-item]
            "payload: expected map with str keys",
        ),
        (
            SupervisorStarted(pid=1, version="1", swept=("a", 1)),  # type: ignore[arg-type]
            "swept: expected array of str, got tuple",
        ),
    ],
)
def test_encode_refuses_fields_of_the_wrong_type(event: Event, message: str) -> None:
    """What encodes always decodes: a wrongly typed field fails at encode, naming it."""
    with pytest.raises(TypeError, match=re.escape(message)):
        encode(event)


def test_nested_maps_in_a_payload_may_have_any_keys() -> None:
    """Only the top-level maps need str keys; a plugin's nested data is free-form."""
    e = PluginEvent(sandbox="", name="x", payload={"by_pid": {1: "a", 2: "b"}})
    assert decode(encode(e)) == e
    dec = Decoder()
    dec.feed(encode(e))
    assert next(dec) == e


def _good_map(**changes: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "v": 1,
        "seq": 3,
        "kind": "started",
        "sandbox": "web-1",
        "instance": 0,
        "generation": 1,
        "wall": 1.5,
        "mono": 2.5,
        "data": {"pid": 4242},
    }
    for key, value in changes.items():
        if value is _DROP:
            del m[key]
        else:
            m[key] = value
    return m


_DROP = object()
GOOD = msgpack.packb(_good_map())


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=list(EVENT_TYPES))
def test_round_trip_every_kind(cls: type[Event]) -> None:
    """Every kind encodes to one map and decodes back to an equal record."""
    event = _sample(cls)
    data = encode(event)
    assert decode(data) == event
    raw = msgpack.unpackb(data)
    assert raw["kind"] == cls.KIND
    assert raw["v"] == 1
    assert set(raw) == {
        "v",
        "seq",
        "kind",
        "sandbox",
        "instance",
        "generation",
        "wall",
        "mono",
        "data",
    }
    # msgpack has one array type: a tuple field comes back a list.
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in event.data().items()}
    assert raw["data"] == plain


def test_data_holds_only_the_kind_s_own_fields() -> None:
    """data() leaves the common fields out and returns a new dict each time."""
    e = Exited(sandbox="a", status=137, exit_code=None, signal=9, oom_killed=True)
    assert e.data() == {
        "status": 137,
        "exit_code": None,
        "signal": 9,
        "oom_killed": True,
        "late": False,
    }
    assert Started(sandbox="a", pid=1).data() is not Started(sandbox="a", pid=1).data()


def test_stamped_is_replace() -> None:
    """stamped() sets seq and the times and keeps everything else."""
    e = Exited(
        sandbox="a", instance=2, generation=3, status=1, exit_code=1, signal=None, oom_killed=False
    )
    s = stamped(e, 10, 5.5, 6.5)
    assert (s.seq, s.wall, s.mono) == (10, 5.5, 6.5)
    assert s.data() == e.data() and (s.instance, s.generation) == (2, 3)
    assert e.seq == 0  # the original is untouched


def test_unknown_kind_decodes_to_unknown_event_and_back() -> None:
    """A kind from a newer producer is passed through, not refused."""
    m = _good_map(kind="migrated", data={"why": "user", "n": [1, 2]})
    event = decode(msgpack.packb(m))
    assert isinstance(event, UnknownEvent)
    assert event.kind == "migrated" and event.payload == {"why": "user", "n": [1, 2]}
    assert event.seq == 3 and event.sandbox == "web-1"
    assert msgpack.unpackb(encode(event)) == m


def test_unknown_keys_are_ignored_and_ints_pass_as_floats() -> None:
    """New optional keys (top level or in data) are ignored; 5 reads as 5.0."""
    m = _good_map(extra="x", wall=5, data={"pid": 1, "cmdline": "sh"})
    event = decode(m)
    assert event == Started(sandbox="web-1", generation=1, seq=3, wall=5.0, mono=2.5, pid=1)
    assert type(event.wall) is float


def test_plugin_event_payload_round_trips() -> None:
    """A plugin's own event carries any msgpack-able payload."""
    e = PluginEvent(sandbox="", name="restart.backoff", payload={"delay": 1.5, "bin": b"\x00"})
    assert decode(encode(e)) == e


def test_encode_refuses_the_base_class_and_unpackable_payloads() -> None:
    """Encoding fails loudly for something that is not an event on the wire."""
    with pytest.raises(TypeError, match="no KIND"):
        encode(Event(sandbox="a"))
    with pytest.raises(TypeError, match="cannot encode plugin event"):
        encode(PluginEvent(sandbox="a", name="x", payload={"o": object()}))


MALFORMED: list[tuple[str, Any, str]] = [
    ("empty bytes", b"", "not one msgpack object"),
    ("reserved byte", b"\xc1", "not one msgpack object"),
    ("truncated", GOOD[:-1], "not one msgpack object"),
    ("truncated header", GOOD[:5], "not one msgpack object"),
    ("trailing bytes", GOOD + b"\x00", "not one msgpack object"),
    ("garbage", b"\xde\xad\xbe\xef" * 8, "not one msgpack object"),
    ("bad utf-8", b"\x81\xa1v\xa2\xff\xfe", "not one msgpack object"),
    ("int map key", msgpack.packb({1: 2}), "missing schema version"),
    ("array", msgpack.packb([1, 2]), "expected an event map, got list"),
    ("string", msgpack.packb("started"), "expected an event map, got str"),
    ("nil", msgpack.packb(None), "expected an event map, got nil"),
    ("integer", b"\xff", "expected an event map, got int"),
    ("no version", _good_map(v=_DROP), "missing schema version"),
    ("version as str", _good_map(v="1"), "v: expected int"),
    ("version 2", _good_map(v=2), "unsupported schema version 2"),
    ("no seq", _good_map(seq=_DROP), "missing key 'seq'"),
    ("seq as str", _good_map(seq="3"), "seq: expected int >= 0, got str"),
    ("negative seq", _good_map(seq=-1), "seq: expected int >= 0"),
    ("seq as bool", _good_map(seq=True), "seq: expected int >= 0, got bool"),
    ("kind as int", _good_map(kind=5), "kind: expected str"),
    ("empty kind", _good_map(kind=""), "kind: expected a non-empty str"),
    ("no sandbox", _good_map(sandbox=_DROP), "missing key 'sandbox'"),
    ("sandbox nil", _good_map(sandbox=None), "sandbox: expected str, got nil"),
    ("instance float", _good_map(instance=1.5), "instance: expected int >= 0, got float"),
    ("generation negative", _good_map(generation=-2), "generation: expected int >= 0"),
    ("wall as str", _good_map(wall="now"), "wall: expected float, got str"),
    ("mono nil", _good_map(mono=None), "mono: expected float, got nil"),
    ("no data", _good_map(data=_DROP), "missing key 'data'"),
    ("data as list", _good_map(data=[1]), "data: expected map with str keys, got list"),
    ("data int key", _good_map(data={1: 2}), "data: expected map with str keys"),
    ("pid missing", _good_map(data={}), "started: missing data key 'pid'"),
    ("pid as str", _good_map(data={"pid": "12"}), "started: data.pid: expected int, got str"),
    (
        "exit_code as str",
        _good_map(
            kind="exited", data={"status": 0, "exit_code": "0", "signal": None, "oom_killed": False}
        ),
        "exited: data.exit_code: expected int or nil",
    ),
    (
        "oom_killed as int",
        _good_map(
            kind="exited", data={"status": 0, "exit_code": 0, "signal": None, "oom_killed": 0}
        ),
        "exited: data.oom_killed: expected bool, got int",
    ),
    ("gap first nil", _good_map(kind="gap", data={"first": None, "last": 2}), "gap: data.first"),
    ("grace as str", _good_map(kind="stopping", data={"reason": "x", "grace": "1"}), "data.grace"),
    (
        "plugin payload",
        _good_map(kind="plugin", data={"name": "x", "payload": [1]}),
        "data.payload",
    ),
    ("plugin name", _good_map(kind="plugin", data={"name": 1}), "plugin: data.name: expected str"),
]


@pytest.mark.parametrize(("what", "obj", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_a_decode_error(what: str, obj: Any, message: str) -> None:
    """Anything that is not a valid v1 event is a DecodeError saying what is wrong."""
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode(obj)
    if isinstance(obj, dict):
        with pytest.raises(DecodeError):
            decode(msgpack.packb(obj))


def test_decode_error_is_a_value_error() -> None:
    """Callers that catch ValueError catch decoding errors too."""
    with pytest.raises(ValueError):
        decode(b"\xc1")


def test_decoder_takes_a_stream_in_any_pieces() -> None:
    """Events fed one byte at a time come out whole, in order."""
    evs = [_sample(cls) for cls in EVENT_TYPES.values()]
    stream = b"".join(encode(e) for e in evs)
    dec = Decoder()
    out: list[Event] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        out.extend(dec)
    assert out == evs
    assert dec.pending == 0


def test_decoder_reports_a_truncated_last_event() -> None:
    """pending counts the bytes of an incomplete event at the end."""
    dec = Decoder()
    dec.feed(GOOD + GOOD[:10])
    assert len(list(dec)) == 1
    assert dec.pending == 10


def test_decoder_survives_a_bad_record_but_not_bad_msgpack() -> None:
    """A well-formed map with bad fields can be skipped; malformed bytes cannot."""
    dec = Decoder()
    dec.feed(msgpack.packb(_good_map(seq="x")) + GOOD)
    with pytest.raises(DecodeError, match="seq"):
        next(dec)
    assert next(dec).seq == 3
    dec = Decoder()
    dec.feed(b"\xc1")
    with pytest.raises(DecodeError, match="malformed msgpack"):
        next(dec)


def test_decoder_refuses_an_oversized_object() -> None:
    """The decoder's buffer is bounded, so a bad stream cannot exhaust memory."""
    dec = Decoder(max_event_bytes=1024)
    with pytest.raises(DecodeError, match="larger than 1024 bytes"):
        dec.feed(b"\xdb" + (100_000).to_bytes(4, "big") + b"x" * 2000)


def test_fake_event_fills_required_fields() -> None:
    """fake_event builds any kind from its name or type with plausible defaults."""
    e = fake_event("exited", status=137, signal=9)
    assert isinstance(e, Exited) and e.sandbox == "test" and e.exit_code is None
    g = fake_event(Gap, first=1, last=2)
    assert (g.first, g.last, g.sandbox) == (1, 2, "")
    assert fake_event(PluginEvent, name="x").payload == {}


def test_docs_list_every_kind_and_data_field() -> None:
    """docs/events.md documents each kind with all its data fields, so another
    language can decode from that page alone."""
    text = DOCS.read_text()
    for kind, cls in EVENT_TYPES.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{kind}` |")]
        assert len(rows) == 1, f"docs/events.md has no table row for {kind}"
        for f in fields(cls):
            if f.name not in ("sandbox", "instance", "generation", "seq", "wall", "mono"):
                assert f"`{f.name}`" in rows[0], f"{kind}.{f.name} is not documented"
    assert events.SCHEMA_VERSION == 1
