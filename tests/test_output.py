"""Sandbox output logs: the k8s-file format, rotation, the pump, reading and following."""

from __future__ import annotations

import errno
import itertools
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor._cli import _output_reader as _logfiles
from supervisor._cli._output_reader import (
    _Watch,
    follow,
    format_record,
    parse_since,
    read_records,
)
from supervisor._core._output import LineSplitter, OpenLogs, OutputWriter, Record, pump

RECORD_RE = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) [FP] [^\n]*")
FILLER = bytes(range(0x20, 0x7F)) * 4


def numbered(prefix: bytes, total: int, long_every: int = 0, long_len: int = 0) -> list[bytes]:
    """Lines "<prefix><number> <filler>" adding up to about *total* bytes."""
    lines = []
    size = i = 0
    while size < total:
        n = long_len if long_every and i % long_every == long_every - 1 else (i * 7919) % 200
        line = b"%s%09d %s" % (prefix, i, (FILLER * (n // len(FILLER) + 1))[:n])
        lines.append(line)
        size += len(line) + 1
        i += 1
    return lines


def feed(fd: int, data: bytes) -> None:
    """Write *data* to a blocking pipe end, then close it (run in a thread)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
    finally:
        os.close(fd)


def check_files(path: str, max_files: int) -> int:
    """Every line of every file is one well-formed record; the total size."""
    d, base = os.path.split(path)
    names = sorted(os.listdir(d))
    assert set(names) <= {base} | {f"{base}.{k}" for k in range(1, max_files)}, names
    total = 0
    for name in names:
        raw = Path(d, name).read_bytes()
        total += len(raw)
        assert raw.endswith(b"\n")
        for line in raw[:-1].split(b"\n"):
            assert RECORD_RE.fullmatch(line), line[:100]
    return total


def lines_of(records: list[Record], stream: str) -> list[bytes]:
    """A stream's lines, the P pieces joined to the F that ends them."""
    out, piece = [], b""
    for r in records:
        if r.stream == stream:
            piece += r.content
            if not r.partial:
                out.append(piece)
                piece = b""
    return out


def ref_tail(records: list[Record], n: int) -> list[Record]:
    """The records of the last *n* lines, the slow obvious way."""
    open_line: dict[str, int] = {}
    line_of, ends = [], []
    for i, r in enumerate(records):
        lid = open_line.pop(r.stream, None)
        if lid is None:
            lid = i
        line_of.append(lid)
        if r.partial:
            open_line[r.stream] = lid
        else:
            ends.append((i, lid))
    for lid in open_line.values():
        ends.append((max(i for i, x in enumerate(line_of) if x == lid), lid))
    keep = {lid for _, lid in sorted(ends)[-n:]} if n else set()
    return [r for r, lid in zip(records, line_of, strict=True) if lid in keep]


# --- the pump under load ------------------------------------------------------


def test_fifty_megabytes_keep_whole_records_and_the_tail(tmp_path: Path) -> None:
    """50 MB through a pipe: at most 4 files of whole records, holding exactly the last lines."""
    lines = numbered(b"", 50 << 20)
    data = b"\n".join(lines) + b"\n"
    path = str(tmp_path / "c.log")

    async def main() -> None:
        r, w = os.pipe()
        with OutputWriter(path, max_bytes=1 << 20, max_files=4) as writer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, feed, w, data)
                await pump(r, "stdout", writer)

    t0 = time.perf_counter()
    trio.run(main)
    elapsed = time.perf_counter() - t0
    print(f"\npump ingestion: {len(data) / elapsed / 1e6:.0f} MB/s ({len(data) >> 20} MiB)")

    assert check_files(path, 4) <= 4 << 20
    records = read_records(path)
    assert all(r.stream == "stdout" and not r.partial for r in records)
    first = int(records[0].content[:9])
    assert first > 0
    assert [r.content for r in records] == lines[first:]


def test_pump_does_not_starve_other_tasks(tmp_path: Path) -> None:
    """While a pump ingests 50 MB, a sleep(0) loop and a 10 ms timer keep running."""
    data = b"\n".join(numbered(b"", 50 << 20)) + b"\n"
    gap = late = 0.0
    done = False

    async def spinner() -> None:
        nonlocal gap
        last = time.perf_counter()
        while not done:
            await trio.sleep(0)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now

    async def timer() -> None:
        nonlocal late
        while not done:
            t = time.perf_counter()
            await trio.sleep(0.01)
            late = max(late, time.perf_counter() - t - 0.01)

    async def main() -> None:
        nonlocal done
        r, w = os.pipe()
        with OutputWriter(str(tmp_path / "c.log"), max_bytes=1 << 20, max_files=4) as writer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spinner)
                nursery.start_soon(timer)
                nursery.start_soon(trio.to_thread.run_sync, feed, w, data)
                await pump(r, "stdout", writer)
                done = True

    t0 = time.perf_counter()
    trio.run(main)
    elapsed = time.perf_counter() - t0
    print(
        f"\npump with other tasks: {len(data) / elapsed / 1e6:.0f} MB/s; "
        f"max sleep(0) gap {gap * 1e3:.1f} ms, max 10 ms timer lateness {late * 1e3:.1f} ms"
    )
    assert gap < 0.5
    assert late < 0.5


def test_two_streams_concurrently_give_whole_records(tmp_path: Path) -> None:
    """stdout and stderr pumped at once into one file: whole records, each stream intact."""
    out = numbered(b"out ", 4 << 20, long_every=97, long_len=5000)
    err = numbered(b"err ", 4 << 20, long_every=89, long_len=3000)
    path = str(tmp_path / "c.log")

    async def main() -> None:
        with OutputWriter(path, max_bytes=64 << 20, max_line=1024) as writer:
            async with trio.open_nursery() as nursery:
                for stream, lines in (("stdout", out), ("stderr", err)):
                    r, w = os.pipe()
                    data = b"\n".join(lines) + b"\n"
                    nursery.start_soon(trio.to_thread.run_sync, feed, w, data)
                    nursery.start_soon(pump, r, stream, writer)

    trio.run(main)
    check_files(path, 1)
    records = read_records(path)
    assert lines_of(records, "stdout") == out
    assert lines_of(records, "stderr") == err
    assert all(len(r.content) <= 1024 for r in records)
    switches = sum(a.stream != b.stream for a, b in itertools.pairwise(records))
    assert switches > 1, "the streams were not interleaved"


# --- the pump's edges ----------------------------------------------------------


def test_pump_long_line_and_eof_without_newline(tmp_path: Path) -> None:
    """A line over max_line is P pieces then F; bytes before EOF without a newline are P."""
    path = str(tmp_path / "c.log")

    async def main() -> None:
        r, w = os.pipe()
        with OutputWriter(path, max_line=1000) as writer:
            async with trio.open_nursery() as nursery:
                data = b"short\n" + b"x" * 2500 + b"\n" + b"tail"
                nursery.start_soon(trio.to_thread.run_sync, feed, w, data)
                await pump(r, "stderr", writer)
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(r)  # the pump closed it

    trio.run(main)
    got = [(r.stream, r.partial, r.content) for r in read_records(path)]
    assert got == [
        ("stderr", False, b"short"),
        ("stderr", True, b"x" * 1000),
        ("stderr", True, b"x" * 1000),
        ("stderr", False, b"x" * 500),
        ("stderr", True, b"tail"),
    ]


def test_cancelled_pump_writes_what_it_read(tmp_path: Path) -> None:
    """Cancelling a pump writes the unfinished line it holds and closes the fd."""
    path = str(tmp_path / "c.log")

    async def main() -> None:
        r, w = os.pipe()
        os.write(w, b"done\nhalf a li")
        with OutputWriter(path) as writer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, r, "stdout", writer)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        os.close(w)
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(r)

    trio.run(main)
    assert [(r.partial, r.content) for r in read_records(path)] == [
        (False, b"done"),
        (True, b"half a li"),
    ]


def test_pump_write_errors_go_to_on_error_and_the_pipe_is_drained(tmp_path: Path) -> None:
    """With on_error, a failing disk does not stop the pump reading the pipe to its end."""

    class Full(OutputWriter):
        def write_lines(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)

    errors: list[OSError] = []

    async def main() -> None:
        r, w = os.pipe()
        with Full(str(tmp_path / "c.log")) as writer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, feed, w, b"x\n" * 500_000)
                await pump(r, "stdout", writer, on_error=errors.append)

    trio.run(main)
    assert errors
    assert all(e.errno == errno.ENOSPC for e in errors)


def test_pump_write_errors_propagate_without_on_error(tmp_path: Path) -> None:
    """Without on_error a failed write ends the pump with the OSError."""

    class Full(OutputWriter):
        def write_lines(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)

    async def main() -> None:
        r, w = os.pipe()
        os.write(w, b"x\n")
        os.close(w)
        with Full(str(tmp_path / "c.log")) as writer:
            await pump(r, "stdout", writer)

    with pytest.raises(OSError, match="No space left"):
        trio.run(main)


# --- LineSplitter ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "records", "rest"),
    [
        (b"a\nb\n", [("F", b"a"), ("F", b"b")], []),
        (b"\n\n", [("F", b""), ("F", b"")], []),
        (b"abcd\n", [("F", b"abcd")], []),
        (b"abcde\n", [("P", b"abcd"), ("F", b"e")], []),
        (b"abcdefgh\n", [("P", b"abcd"), ("F", b"efgh")], []),
        (b"abcdefghi", [("P", b"abcd"), ("P", b"efgh")], [("P", b"i")]),
        (b"abcd", [], [("P", b"abcd")]),
        (b"ab\ncd", [("F", b"ab")], [("P", b"cd")]),
        (b"", [], []),
    ],
)
def test_splitter_cases(
    data: bytes, records: list[tuple[str, bytes]], rest: list[tuple[str, bytes]]
) -> None:
    """Full lines are F, pieces of long lines P then F, the end without newline P."""
    s = LineSplitter(4)
    assert (s.feed(data), s.flush()) == (records, rest)


def test_splitter_does_not_depend_on_chunking() -> None:
    """Any chunking of the same bytes gives the same records."""
    rng = random.Random(7)
    data = b"".join(
        b"y" * rng.choice([0, 1, 9, 10, 11, 20, 21, 35]) + rng.choice([b"\n", b""])
        for _ in range(2000)
    )
    whole = LineSplitter(10)
    expected = whole.feed(data) + whole.flush()
    for _ in range(20):
        s = LineSplitter(10)
        got, i = [], 0
        while i < len(data):
            n = rng.randint(1, 40)
            got += s.feed(data[i : i + n])
            i += n
        assert got + s.flush() == expected


# --- OutputWriter ----------------------------------------------------------------


def test_writer_record_format(tmp_path: Path) -> None:
    """A record is timestamp, stream, tag and the raw bytes, one line."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path) as w:
        w.write_line("stdout", "F", b"hello world \xff\x00 end", ts=1714564800.125)
        w.write_line("stderr", "P", b"", ts=1714564801)
    assert Path(path).read_bytes() == (
        b"2024-05-01T12:00:00.125000000Z stdout F hello world \xff\x00 end\n"
        b"2024-05-01T12:00:01.000000000Z stderr P \n"
    )
    assert read_records(path) == [
        Record(1714564800.125, "stdout", False, b"hello world \xff\x00 end"),
        Record(1714564801.0, "stderr", True, b""),
    ]


def test_writer_rotates_between_records(tmp_path: Path) -> None:
    """Files stay under max_bytes, at most max_files of them, the oldest dropped."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=1000, max_files=3) as w:
        for i in range(200):
            w.write_line("stdout", "F", b"line %05d" % i)
    sizes = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)}
    assert set(sizes) == {"c.log", "c.log.1", "c.log.2"}
    assert all(0 < s <= 1000 for s in sizes.values())
    check_files(path, 3)
    got = [r.content for r in read_records(path)]
    assert got == [b"line %05d" % i for i in range(200 - len(got), 200)]
    assert got[0] != b"line 00000"


def test_writer_batch_spanning_a_rotation(tmp_path: Path) -> None:
    """One write_lines call larger than a file is split between files at record boundaries."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=500, max_files=10) as w:
        w.write_lines("stdout", [("F", b"r%03d" % i) for i in range(100)])
    check_files(path, 10)
    assert [r.content for r in read_records(path)] == [b"r%03d" % i for i in range(100)]
    assert all(os.path.getsize(tmp_path / n) <= 500 for n in os.listdir(tmp_path))


def test_writer_oversized_record_gets_a_file_of_its_own(tmp_path: Path) -> None:
    """A record bigger than max_bytes is written whole, alone in its file."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=100, max_files=3) as w:
        w.write_line("stdout", "F", b"small")
        w.write_line("stdout", "F", b"b" * 300)
        w.write_line("stdout", "F", b"after")
    assert [r.content for r in read_records(path)] == [b"small", b"b" * 300, b"after"]
    assert os.path.getsize(path + ".1") > 300


def test_writer_single_file_truncates(tmp_path: Path) -> None:
    """With max_files=1 a full file is replaced by a new one."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=200, max_files=1) as w:
        for i in range(50):
            w.write_line("stdout", "F", b"%02d" % i)
    assert os.listdir(tmp_path) == ["c.log"]
    assert read_records(path)[-1].content == b"49"


def test_writer_appends_and_terminates_a_torn_record(tmp_path: Path) -> None:
    """Reopening appends; a torn last record is ended, so the next record is intact."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path) as w:
        w.write_line("stdout", "F", b"one")
    with open(path, "ab") as f:
        f.write(b"2024-05-01T12:00:00.0000")  # a crash mid-record
    with OutputWriter(path) as w:
        w.write_line("stdout", "F", b"two")
    assert [r.content for r in read_records(path)] == [b"one", b"two"]


def test_writer_removes_files_beyond_max_files(tmp_path: Path) -> None:
    """Rotated files left by a larger max_files are removed."""
    path = str(tmp_path / "c.log")
    for k in (1, 2, 3, 4):
        Path(f"{path}.{k}").write_bytes(b"")
    OutputWriter(path, max_files=3).close()
    assert sorted(os.listdir(tmp_path)) == ["c.log", "c.log.1", "c.log.2"]


@pytest.mark.parametrize(
    ("stream", "tag", "content", "message"),
    [
        ("stdin", "F", b"x", "stream must be stdout or stderr"),
        ("stdout", "X", b"x", "tag must be F or P"),
        ("stdout", "F", b"a\nb", "contains a newline"),
    ],
)
def test_writer_rejects_bad_records(
    tmp_path: Path, stream: str, tag: str, content: bytes, message: str
) -> None:
    """A bad stream, tag or newline is a ValueError and writes nothing."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path) as w, pytest.raises(ValueError, match=message):
        w.write_lines(stream, [("F", b"good"), (tag, content)])
    assert os.path.getsize(path) == 0


def test_closed_writer_refuses(tmp_path: Path) -> None:
    """Writing after close is a ValueError naming the file."""
    w = OutputWriter(str(tmp_path / "c.log"))
    w.close()
    w.close()
    with pytest.raises(ValueError, match=r"c\.log: writer is closed"):
        w.write_line("stdout", "F", b"x")


def _open_files(path: Path) -> int:
    """This process's descriptors open on *path*."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass  # the listing's own descriptor, closed since
    return count


def test_only_the_most_recently_written_logs_stay_open(tmp_path: Path) -> None:
    """Past the capacity of OpenLogs, the least recently written log lets
    go of its descriptor; its next write opens the file again and appends,
    a torn last record still ended before it."""
    logs = OpenLogs(capacity=2)
    paths = [tmp_path / f"{n}.log" for n in "abc"]
    writers = [OutputWriter(str(p), open_logs=logs) for p in paths]
    try:
        assert [_open_files(p) for p in paths] == [0, 1, 1]  # a's was the oldest
        writers[0].write_line("stdout", "F", b"one")
        assert [_open_files(p) for p in paths] == [1, 0, 1]
        assert len(logs) == 2
        with open(paths[1], "ab") as f:
            f.write(b"torn, no newline")  # as a crash mid-write leaves it
        writers[1].write_line("stderr", "F", b"two")
        assert [_open_files(p) for p in paths] == [1, 1, 0]
        lines = paths[1].read_bytes().split(b"\n")
        assert lines[0] == b"torn, no newline" and lines[1].endswith(b" stderr F two")
        writers[1].close()
        assert len(logs) == 1 and _open_files(paths[1]) == 0
    finally:
        for w in writers:
            w.close()
    assert len(logs) == 0


# --- read_records ----------------------------------------------------------------


def write(path: str, records: list[Record], **kw: Any) -> None:
    with OutputWriter(path, **kw) as w:
        for r in records:
            w.write_line(r.stream, "P" if r.partial else "F", r.content, ts=r.ts)


def test_read_since_and_tail(tmp_path: Path) -> None:
    """since keeps ts >= since; tail keeps the last lines, a P..F run being one line."""
    path = str(tmp_path / "c.log")
    recs = [
        Record(100.0, "stdout", False, b"a"),
        Record(101.0, "stdout", True, b"b1"),
        Record(102.0, "stderr", False, b"e"),
        Record(103.0, "stdout", False, b"b2"),
        Record(104.0, "stdout", False, b"c"),
        Record(105.0, "stderr", True, b"f"),
    ]
    write(path, recs)
    assert read_records(path) == recs
    assert read_records(path, since=102.0) == recs[2:]
    assert read_records(path, tail=0) == []
    assert read_records(path, tail=1) == recs[5:]  # the stderr line without newline
    assert read_records(path, tail=2) == recs[4:]
    assert read_records(path, tail=3) == [recs[1], *recs[3:]]  # b1+b2 is one line
    assert read_records(path, tail=4) == recs[1:]
    assert read_records(path, tail=10) == recs
    assert read_records(path, since=102.0, tail=3) == recs[3:]  # b2: b1 is cut by since
    assert read_records(path, since=102.0, tail=4) == recs[2:]
    assert read_records(path, since=1000.0) == []


def test_read_tail_across_rotated_files_matches_a_reference(tmp_path: Path) -> None:
    """Tail over many files, long lines crossing files, equals the obvious computation."""
    rng = random.Random(3)
    path = str(tmp_path / "c.log")
    recs = [
        Record(1000.0 + i, rng.choice(["stdout", "stderr"]), rng.random() < 0.4, b"%d" % i)
        for i in range(3000)
    ]
    write(path, recs, max_bytes=2000, max_files=1000)
    assert len(os.listdir(tmp_path)) > 20
    assert read_records(path) == recs
    for n in (0, 1, 2, 5, 17, 100, 999, 3000, 5000):
        assert read_records(path, tail=n) == ref_tail(recs, n), n
    for since in (999.0, 1500.0, 3999.0, 4000.0):
        assert read_records(path, since=since, tail=50) == ref_tail(
            [r for r in recs if r.ts >= since], 50
        )


def test_read_missing_log_is_empty(tmp_path: Path) -> None:
    """No file yet: no records."""
    assert read_records(str(tmp_path / "nothing.log")) == []


def test_read_conmon_timestamps(tmp_path: Path) -> None:
    """conmon's own lines (local offset, trimmed fraction, no content) parse too."""
    path = tmp_path / "c.log"
    path.write_bytes(
        b"2024-05-01T14:00:00.5+02:00 stdout F hi there\n"
        b"2024-05-01T12:00:01Z stderr F\n"
        b"garbage line\n"
        b"2024-13-01T12:00:01Z stderr F bad month\n"
    )
    assert read_records(str(path)) == [
        Record(1714564800.5, "stdout", False, b"hi there"),
        Record(1714564801.0, "stderr", False, b""),
    ]


# --- follow ------------------------------------------------------------------------


def test_follow_sees_new_records_across_rotations(tmp_path: Path) -> None:
    """After the history, follow yields each record appended, through several rotations."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=300, max_files=10) as w:
        for i in range(5):
            w.write_line("stdout", "F", b"old %d" % i)
        gen = follow(path, tail=1)
        assert next(gen).content == b"old 4"
        for i in range(40):  # several rotations while the follower is not reading
            w.write_line("stderr", "F", b"new %02d" % i)
        assert [next(gen).content for _ in range(40)] == [b"new %02d" % i for i in range(40)]
        assert len(os.listdir(tmp_path)) > 3
        w.write_line("stdout", "F", b"last")
        assert next(gen).content == b"last"
        gen.close()


def test_follow_far_behind_skips_what_was_dropped(tmp_path: Path) -> None:
    """A follower more than max_files rotations behind goes on with the oldest file left."""
    path = str(tmp_path / "c.log")
    with OutputWriter(path, max_bytes=200, max_files=3) as w:
        w.write_line("stdout", "F", b"%04d" % 0)
        gen = follow(path)
        assert next(gen).content == b"0000"
        for i in range(1, 200):
            w.write_line("stdout", "F", b"%04d" % i)
        got = [int(next(gen).content)]
        while got[-1] != 199:
            got.append(int(next(gen).content))
        gen.close()
    assert got == sorted(got)
    assert got[0] == 1  # the rest of the file it held
    assert len(got) < 199


def test_follow_in_a_thread_with_inotify(tmp_path: Path) -> None:
    """A blocked follower wakes for appends and rotations and stops, without polling."""
    path = str(tmp_path / "c.log")
    got: queue.Queue[Record | None] = queue.Queue()
    stop = threading.Event()

    def consume() -> None:
        try:
            for r in follow(path, stop=stop.is_set, poll=60):
                got.put(r)
        finally:
            got.put(None)

    def take() -> Iterator[bytes]:
        while (r := got.get(timeout=10)) is not None:
            yield r.content

    t = threading.Thread(target=consume)
    t.start()
    try:
        with OutputWriter(path, max_bytes=400, max_files=50) as w:
            w.write_line("stdout", "F", b"first")
            first = got.get(timeout=10)
            assert first is not None
            assert first.content == b"first"
            for i in range(100):
                w.write_line("stdout", "F", b"%03d" % i)
            stop.set()
            w.write_line("stdout", "F", b"final")  # wakes the follower, which drains and stops
            rest = list(take())
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert rest == [b"%03d" % i for i in range(100)] + [b"final"]


def test_follow_uses_inotify(tmp_path: Path) -> None:
    """The follower's watch is inotify here, not the polling fallback."""
    w = _Watch(str(tmp_path / "c.log"))
    try:
        assert w._fd >= 0
    finally:
        w.close()


def test_follow_stop_returns_after_draining(tmp_path: Path) -> None:
    """With stop already true, follow yields what is there and returns."""
    path = str(tmp_path / "c.log")
    assert list(follow(path, stop=lambda: True)) == []
    write(path, [Record(1.0, "stdout", False, b"x")])
    assert list(follow(path, stop=lambda: True)) == [Record(1.0, "stdout", False, b"x")]


# --- printing and --since ----------------------------------------------------------


def test_format_record() -> None:
    """F prints with a newline, P without; timestamps in microseconds."""
    r = Record(1714564800.1234567, "stdout", False, b"hi")
    assert format_record(r, timestamps=False) == b"hi\n"
    assert format_record(r._replace(partial=True), timestamps=False) == b"hi"
    assert format_record(r, timestamps=True) == b"2024-05-01T12:00:00.123457Z hi\n"
    assert format_record(r._replace(ts=59.9999999), timestamps=True).startswith(
        b"1970-01-01T00:01:00.000000Z"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", 990.0),
        ("5m", 700.0),
        ("2h", 1000.0 - 7200),
        ("1h30m", 1000.0 - 5400),
        ("1.5s", 998.5),
        ("250ms", 999.75),
        ("0s", 1000.0),
        ("1d", 1000.0 - 86400),
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T12:00:00.25Z", 1714564800.25),
        ("2024-05-01T14:00:00+02:00", 1714564800.0),
        ("2024-05-01t12:00:00z", 1714564800.0),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    """Durations count back from now; RFC 3339 times are absolute."""
    assert parse_since(text, 1000.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "s",
        "10x",
        "-5m",
        "yesterday",
        "2024-05-01",
        "2024-02-30T00:00:00Z",
        "2024-05-01T12:00:00",
    ],
)
def test_parse_since_rejects(text: str) -> None:
    """Anything else is a ValueError saying what is expected."""
    with pytest.raises(ValueError, match=f"invalid time {re.escape(repr(text))}"):
        parse_since(text, 1000.0)


def test_follow_in_a_thread_under_fast_rotation(tmp_path: Path) -> None:
    """A follower racing a writer that rotates every few records misses nothing."""
    path = str(tmp_path / "c.log")
    got: list[bytes] = []
    stop = threading.Event()

    def consume() -> None:
        got.extend(r.content for r in follow(path, stop=stop.is_set, poll=0.05))

    t = threading.Thread(target=consume)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: more races
    try:
        with OutputWriter(path, max_bytes=200, max_files=100) as w:
            t.start()
            try:
                for i in range(300):
                    w.write_line("stdout", "F", b"%05d" % i)
            finally:
                stop.set()
                t.join(timeout=30)
    finally:
        sys.setswitchinterval(interval)
    assert not t.is_alive()
    assert got == [b"%05d" % i for i in range(300)]


@pytest.mark.parametrize("at", range(1, 8))
def test_open_files_in_order_despite_rotations_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """Two rotations while the files are being opened: they still come oldest first, none missed."""
    path = str(tmp_path / "c.log")
    n = 0
    with OutputWriter(path, max_bytes=100, max_files=50) as w:

        def add(count: int) -> None:
            nonlocal n
            for _ in range(count):
                w.write_line("stdout", "F", b"%04d" % n)
                n += 1

        add(10)
        real, calls = _logfiles._try_open, 0

        def racing(name: str) -> _logfiles._File | None:
            nonlocal calls
            calls += 1
            if calls == at:
                add(4)  # two rotations
            return real(name)

        monkeypatch.setattr(_logfiles, "_try_open", racing)
        files = _logfiles._open_files(path)
    try:
        got = [
            r.content
            for f in files
            for r in _logfiles._Parser().parse(_logfiles._read_to_end(f.fd))[0]
        ]
    finally:
        _logfiles._close(files)
    assert got == [b"%04d" % i for i in range(len(got))]
    assert len(got) >= 10
