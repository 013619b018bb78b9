"""The logging plugin's event log file (plugins.eventlog.EventLog): lines, rotation, reopening."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from events import Started, stamped
from plugins.eventlog import EventLog


def started(seq: int) -> Started:
    """A stamped event with this seq."""
    return stamped(Started(sandbox="web", instance=1, pid=seq), seq, 1714564800.5, 2.0)


def test_each_event_is_one_json_line(tmp_path: Path) -> None:
    """An event is one JSON object on one line; the directory is made; mode 0640."""
    path = tmp_path / "logging" / "events.jsonl"
    log = EventLog(str(path), max_bytes=1 << 20, max_files=3)
    log.write(started(1))
    log.close()
    (line,) = path.read_text().splitlines()
    assert json.loads(line) == {
        "seq": 1,
        "kind": "started",
        "sandbox": "web",
        "instance": 1,
        "generation": 0,
        "wall": "2024-05-01T12:00:00.500000Z",
        "mono": 2.0,
        "data": {"pid": 1},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 & ~_umask()


def test_rotation_keeps_max_files_of_whole_lines(tmp_path: Path) -> None:
    """Full files move to .1, .2...; at most max_files, every line whole, none lost in the kept ones."""
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), max_bytes=1000, max_files=3)
    for seq in range(1, 101):
        log.write(started(seq))
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    seqs = []
    for name in ("events.jsonl.2", "events.jsonl.1", "events.jsonl"):
        assert (tmp_path / name).stat().st_size <= 1000
        seqs += [json.loads(line)["seq"] for line in (tmp_path / name).read_text().splitlines()]
    assert seqs == list(range(seqs[0], 101))


def test_reopening_carries_on_after_the_last_whole_line(tmp_path: Path) -> None:
    """last_seq comes from the last whole line; a torn line is ended before the next."""
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), max_bytes=1 << 20, max_files=2)
    log.write(started(1))
    log.write(started(2))
    log.close()
    with open(path, "a") as f:
        f.write('{"seq": 3, "kind": "sta')  # a crash in the middle of a line
    log = EventLog(str(path), max_bytes=1 << 20, max_files=2)
    assert log.last_seq == 2
    log.write(started(3))
    log.close()
    got = path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in (got[0], got[1], got[3])] == [1, 2, 3]
    assert got[2] == '{"seq": 3, "kind": "sta'


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
