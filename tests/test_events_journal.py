"""The on-disk event journal: buffering, replay, rotation and crash recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from events import Event, Gap, Journal, JournalError, Started, encode, stamped


def ev(seq: int, sandbox: str = "web") -> Event:
    """A stamped event with this seq."""
    return stamped(Started(sandbox=sandbox, pid=seq), seq, 1.0 + seq, 2.0 + seq)


def seqs(items: Iterator[Event]) -> list[int | tuple[int, int]]:
    """Seqs of events, (first, last) for gaps."""
    return [(e.first, e.last) if isinstance(e, Gap) else e.seq for e in items]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.journal"))


def on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in segments(path))


RECORD = len(encode(ev(100)))  # every test event encodes to the same size (small seqs)


def test_append_buffers_until_flush(tmp_path: Path) -> None:
    """Appends stay in memory (no write per event) until flush."""
    with Journal(tmp_path) as j:
        for i in range(1, 11):
            j.append(ev(i))
        assert on_disk(tmp_path) == 0
        assert (j.first_seq, j.last_seq) == (1, 10)
        j.flush()
        assert on_disk(tmp_path) == 10 * RECORD
        assert [p.name for p in segments(tmp_path)] == ["00000000000000000001.journal"]


def test_replay_ranges(tmp_path: Path) -> None:
    """replay yields exactly since..until, in order, flushing first."""
    with Journal(tmp_path) as j:
        events = [ev(i) for i in range(1, 101)]
        for e in events:
            j.append(e)
        assert list(j.replay(1)) == events
        assert seqs(j.replay(10, 20)) == list(range(10, 21))
        assert seqs(j.replay(95, 1000)) == list(range(95, 101))
        assert seqs(j.replay(0, 3)) == [1, 2, 3]
        assert list(j.replay(101)) == []
        assert list(j.replay(50, 49)) == []


def test_replay_default_until_is_last_seq_at_call(tmp_path: Path) -> None:
    """Events appended after replay() was called are not part of that replay."""
    with Journal(tmp_path) as j:
        for i in range(1, 6):
            j.append(ev(i))
        it = j.replay(1)
        j.append(ev(6))
        assert seqs(it) == [1, 2, 3, 4, 5]


def test_rotation_keeps_total_under_max_bytes(tmp_path: Path) -> None:
    """Segments rotate at segment_bytes; the oldest go so the total stays under max_bytes."""
    seg, cap = 40 * RECORD, 160 * RECORD
    with Journal(tmp_path, segment_bytes=seg, max_bytes=cap) as j:
        for i in range(1, 2001):
            j.append(ev(i))
            if i % 7 == 0:
                j.flush()
            assert on_disk(tmp_path) + len(j._buf) <= cap
        j.flush()
        files = segments(tmp_path)
        assert len(files) == 4
        for f in files:
            assert f.stat().st_size <= seg
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(f.read_bytes())
            first = next(unpacker)
            assert first["seq"] == int(f.name.split(".")[0])
        assert j.first_seq == int(files[0].name.split(".")[0]) > 1
        assert j.last_seq == 2000
        # What rotated away comes out as one gap; the rest is all there.
        assert seqs(j.replay(1)) == [(1, j.first_seq - 1), *range(j.first_seq, 2001)]


def test_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    """An event bigger than segment_bytes is still journaled, alone in a segment."""
    from events import PluginEvent

    big = stamped(PluginEvent(sandbox="", name="x", payload={"b": b"x" * 5000}), 2, 0.0, 0.0)
    with Journal(tmp_path, segment_bytes=1000, max_bytes=100_000) as j:
        j.append(ev(1))
        j.append(big)
        j.append(ev(3))
        assert seqs(j.replay(1)) == [1, 2, 3]
        assert [p.name[-12:] for p in segments(tmp_path)] == [
            "0001.journal", "0002.journal", "0003.journal",
        ]  # fmt: skip


def test_reopen_continues_after_last_seq(tmp_path: Path) -> None:
    """A reopened journal knows its range and appends after it."""
    with Journal(tmp_path) as j:
        for i in range(1, 51):
            j.append(ev(i))
    with Journal(tmp_path) as j:
        assert (j.first_seq, j.last_seq) == (1, 50)
        with pytest.raises(ValueError, match="must increase: got 50 after 50"):
            j.append(ev(50))
        j.append(ev(51))
        assert seqs(j.replay(49)) == [49, 50, 51]


def test_truncated_last_record_is_cut_off(tmp_path: Path) -> None:
    """A crash in the middle of a write leaves half a record: reopening cuts it
    off, and its seq, which someone may have seen, is not handed out again."""
    with Journal(tmp_path) as j:
        for i in range(1, 21):
            j.append(ev(i))
    (path,) = segments(tmp_path)
    os.truncate(path, 20 * RECORD - 3)
    with Journal(tmp_path) as j:
        assert path.stat().st_size == 19 * RECORD
        assert j.last_seq == 20
        j.append(ev(21))
        assert seqs(j.replay(1)) == [*range(1, 20), (20, 20), 21]


def test_without_high_water_the_segments_say_the_last_seq(tmp_path: Path) -> None:
    """A journal whose high-water file is gone (an older corral's) continues
    after the last whole record of its segments."""
    with Journal(tmp_path) as j:
        for i in range(1, 21):
            j.append(ev(i))
    (path,) = segments(tmp_path)
    os.truncate(path, 20 * RECORD - 3)
    (tmp_path / "high-water").unlink()
    with Journal(tmp_path) as j:
        assert j.last_seq == 19
        j.append(ev(20))
        assert seqs(j.replay(1)) == list(range(1, 21))


def test_garbage_after_the_last_record_is_cut_off(tmp_path: Path) -> None:
    """Junk at the end of the newest segment does not stop the journal opening."""
    with Journal(tmp_path) as j:
        for i in range(1, 4):
            j.append(ev(i))
    (path,) = segments(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\xc1\x00garbage")
    with Journal(tmp_path) as j:
        assert j.last_seq == 3
        assert path.stat().st_size == 3 * RECORD


def test_empty_newest_segment_is_dropped(tmp_path: Path) -> None:
    """A segment created just before a crash, with nothing in it, is removed."""
    with Journal(tmp_path) as j:
        for i in range(1, 4):
            j.append(ev(i))
    (tmp_path / f"{4:020d}.journal").write_bytes(b"")
    with Journal(tmp_path) as j:
        assert j.last_seq == 3
        assert len(segments(tmp_path)) == 1


def test_holes_come_out_as_gaps(tmp_path: Path) -> None:
    """Missing seqs (a failed write) are reported, so every seq is accounted for."""
    with Journal(tmp_path) as j:
        for i in (1, 2, 5, 6, 9):
            j.append(ev(i))
        assert seqs(j.replay(1)) == [1, 2, (3, 4), 5, 6, (7, 8), 9]
        assert seqs(j.replay(3, 4)) == [(3, 4)]


def test_segment_rotated_away_during_a_replay(tmp_path: Path) -> None:
    """A slow reader whose next segment was deleted meanwhile gets a Gap, then the rest."""
    with Journal(tmp_path, segment_bytes=10 * RECORD, max_bytes=30 * RECORD) as j:
        for i in range(1, 31):
            j.append(ev(i))
        it = j.replay(1)
        got = [next(it) for _ in range(3)]  # reading the first segment (1..10)
        for i in range(31, 61):
            j.append(ev(i))  # rotates 11..40 away; the open segment 1..10 too
        got += list(it)
        # Everything up to 30 (the until of the call) is accounted for.
        flat = seqs(iter(got))
        assert flat[:3] == [1, 2, 3]
        covered = [
            s for x in flat for s in (range(x[0], x[1] + 1) if isinstance(x, tuple) else [x])
        ]
        assert covered == list(range(1, 31))
        assert any(isinstance(x, tuple) for x in flat)


def test_a_second_journal_on_the_directory_is_refused(tmp_path: Path) -> None:
    """The directory is locked, so two supervisors cannot interleave seqs."""
    with Journal(tmp_path), pytest.raises(JournalError, match="in use"):
        Journal(tmp_path)
    Journal(tmp_path).close()  # free again


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    """segment_bytes must be positive and no larger than max_bytes."""
    with pytest.raises(ValueError, match="segment_bytes <= max_bytes"):
        Journal(tmp_path, segment_bytes=10, max_bytes=5)


def test_appending_after_close_is_an_error(tmp_path: Path) -> None:
    """A closed journal says so instead of losing events silently."""
    j = Journal(tmp_path)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.append(ev(1))


def test_replay_decodes_what_encode_accepts(tmp_path: Path) -> None:
    """A plugin payload with nested non-str keys is journaled and replayed intact."""
    from events import PluginEvent

    e = stamped(PluginEvent(sandbox="", name="x", payload={"m": {1: [b"\x00"]}}), 1, 0.5, 0.5)
    with Journal(tmp_path) as j:
        j.append(e)
    with Journal(tmp_path) as j:
        assert list(j.replay(1)) == [e]


# A process that appends N events to the journal at PATH and is killed
# before anything flushes them: the supervisor under a SIGKILL.
CRASH = """
import os, signal, sys
from events import Journal, Started, stamped
j = Journal(sys.argv[1])
for seq in range(1, int(sys.argv[2]) + 1):
    j.append(stamped(Started(sandbox="web", pid=seq), seq, 1.0, 2.0))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_seqs_handed_out_before_a_crash_are_never_reused(tmp_path: Path) -> None:
    """A process killed with its appends still in the buffer: a journal opened
    next continues above every seq it handed out, and replay says the rest
    is a gap."""
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), "5"], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert segments(tmp_path) == []  # nothing reached a segment
    with Journal(tmp_path) as j:
        last = j.last_seq
        assert last >= 5
        j.append(ev(last + 1))
        assert seqs(j.replay(1)) == [(1, last), last + 1]
    with Journal(tmp_path) as j:
        assert j.last_seq == last + 1  # a clean close skips nothing
