"""Sandbox stdout and stderr captured to rotated log files, and read back.

The format is the "k8s-file" format conmon writes for podman and CRI-O: one
record per line, ::

    2024-05-01T12:00:00.123456789Z stdout F hello, world
    2024-05-01T12:00:00.123456789Z stderr P first 16 KiB of a long line...
    2024-05-01T12:00:00.123456789Z stderr F ...and the rest of it

a UTC RFC 3339 timestamp with nanoseconds, the stream (``stdout`` or
``stderr``), a tag and the raw bytes of the line without its newline. ``F``
is a full line or the last piece of a long one; ``P`` is a piece of a line
longer than ``max_line`` (the pieces that follow are ``P`` too, the last one
``F``), or the bytes before end of file that had no newline. Content is
kept byte for byte: files are written and read as bytes.

Writing: one :class:`LogWriter` per sandbox; one :func:`pump` task per
stream reads a pipe, splits it with a :class:`LineSplitter` and writes
records. The current file is ``path``; when it would exceed ``max_bytes``
it is renamed to ``path.1`` (``path.1`` to ``path.2`` and so on, the oldest
dropped) and a new ``path`` is started, so a sandbox keeps at most
``max_files`` files.

Reading: :func:`read_records` for ``corral logs [--since] [--tail]``,
:func:`follow` for ``-f`` (follows rotation; inotify, polling as fallback),
:func:`format_record` for printing and :func:`parse_since` for ``--since``.

Importing this module does not import trio (only :func:`pump` needs it), so
the CLI's ``corral logs`` stays cheap.
"""

from __future__ import annotations

import calendar
import ctypes
import errno
import itertools
import math
import os
import re
import select
import struct
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from .._errors import SpecError
from .._runtime._units import parse_duration

if TYPE_CHECKING:
    from events.segments import NumberedSegments

__all__ = [
    "LineSplitter",
    "LogWriter",
    "Record",
    "follow",
    "format_record",
    "parse_since",
    "pump",
    "read_records",
]

_STREAMS = {"stdout": b"stdout", "stderr": b"stderr"}
_TAGS = {"F": b"F", "P": b"P"}
_NS = 1_000_000_000


class Record(NamedTuple):
    """One record of a log file."""

    ts: float
    """When the supervisor read it, in seconds since the epoch (microsecond precision)."""
    stream: str
    """``"stdout"`` or ``"stderr"``."""
    partial: bool
    """True for a ``P`` record: the line goes on in the next record of the stream."""
    content: bytes
    """The bytes of the line (or piece), without the newline."""


# --- writing -----------------------------------------------------------------


class LogWriter:
    """Appends records to a sandbox's log file and rotates it.

    Each call writes its records with one ``os.write`` on an ``O_APPEND``
    descriptor, so a record is never interleaved with another and a reader
    sees a partial record only while it is being written. Rotation happens
    between records: every file holds whole records and at most
    ``max_bytes`` bytes (a single record larger than that gets a file of
    its own). An existing file is appended to. The files are
    :class:`events.segments.NumberedSegments`.

    Not thread-safe: use one writer from one thread (the trio thread).
    """

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int = 10 << 20,
        max_files: int = 5,
        max_line: int = 16 << 10,
    ) -> None:
        if max_bytes < 1 or max_files < 1 or max_line < 1:
            raise ValueError(
                f"log {path}: max_bytes, max_files and max_line must be positive, "
                f"got {max_bytes}, {max_files}, {max_line}"
            )
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_line = max_line
        self._ts_sec = -1
        self._ts_head = b""
        # Here, not at the top: importing the events package would cost the
        # CLI's reading side (``corral logs``) some 30 ms for nothing.
        from events.segments import NumberedSegments

        # A record torn by a crash is ended with a newline before the next
        # one, so that only the torn record is lost, not the one glued to it.
        self._files: NumberedSegments = NumberedSegments(
            path, segment_bytes=max_bytes, max_files=max_files, mode=0o600, terminator=b"\n"
        )

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the current file (idempotent)."""
        self._files.close()

    def write_line(self, stream: str, tag: str, content: bytes, ts: float | None = None) -> None:
        """Append one record; *ts* defaults to now."""
        self.write_lines(stream, ((tag, content),), ts)

    def write_lines(
        self, stream: str, lines: Iterable[tuple[str, bytes]], ts: float | None = None
    ) -> None:
        """Append records ``(tag, content)`` of one stream, all with timestamp *ts* (now).

        One ``os.write`` for all of them, or one per file when they span a
        rotation. Raises ValueError for a bad stream, tag or a newline in
        content (nothing of this call is written then), OSError naming the
        file when the write or the rotation fails.
        """
        sbytes = _STREAMS.get(stream)
        if sbytes is None:
            raise ValueError(f"log {self.path}: stream must be stdout or stderr, got {stream!r}")
        files = self._files
        if files.closed:
            raise ValueError(f"log {self.path}: writer is closed")
        if ts is None:
            ns = time.time_ns()
        else:  # not round(ts * 1e9): the product loses the last digits
            sec = math.floor(ts)
            ns = sec * _NS + round((ts - sec) * _NS)
        head = b"%s %s " % (self._format_ts(ns), sbytes)
        lines = list(lines)
        # Fast path, the usual batch from the pump: full lines that fit in
        # the current file, joined in C rather than record by record.
        contents = [c for t, c in lines if t == "F"]
        if len(contents) == len(lines):
            head += b"F "
            data = head + (b"\n" + head).join(contents) + b"\n"
            if b"".join(contents).find(b"\n") >= 0:  # memchr: count() is slower
                raise ValueError(f"log {self.path}: record content contains a newline")
            if files.current.size + len(data) <= self.max_bytes:
                if contents:
                    files.write(data)
                return
            head = head[:-2]
        records: list[bytes] = []
        for tag, content in lines:
            tbytes = _TAGS.get(tag)
            if tbytes is None:
                raise ValueError(f"log {self.path}: tag must be F or P, got {tag!r}")
            if b"\n" in content:
                raise ValueError(f"log {self.path}: record content contains a newline")
            records.append(b"%s%s %s\n" % (head, tbytes, content))
        files.write_records(records)

    def _format_ts(self, ns: int) -> bytes:
        sec, frac = divmod(ns, _NS)
        if sec != self._ts_sec:
            self._ts_head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
            self._ts_sec = sec
        return b"%s.%09dZ" % (self._ts_head, frac)


class LineSplitter:
    """Splits one stream's bytes into records ``(tag, content)``.

    A line of up to *max_line* bytes is one ``("F", line)``; a longer one is
    pieces of *max_line* bytes tagged ``P`` and a last piece tagged ``F``.
    The pieces do not depend on how the bytes were chunked.
    """

    def __init__(self, max_line: int = 16 << 10) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self.max_line = max_line
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """The records completed by *data*; an unfinished line is kept for later."""
        m = self.max_line
        out: list[tuple[str, bytes]] = []
        buf = self._buf + data
        if b"\n" in data:
            lines = buf.split(b"\n")
            buf = lines.pop()
            if max(map(len, lines)) <= m:  # the usual case, in C
                out = list(zip(itertools.repeat("F"), lines))
                lines = []
            for line in lines:
                if len(line) <= m:
                    out.append(("F", line))
                    continue
                start = 0
                while len(line) - start > m:
                    out.append(("P", line[start : start + m]))
                    start += m
                out.append(("F", line[start:]))
        if len(buf) > m:
            start = 0
            while len(buf) - start > m:
                out.append(("P", buf[start : start + m]))
                start += m
            buf = buf[start:]
        self._buf = buf
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """At end of file: the bytes left without a newline, as one ``P`` record."""
        buf, self._buf = self._buf, b""
        return [("P", buf)] if buf else []


async def pump(
    fd: int,
    stream: str,
    writer: LogWriter,
    *,
    chunk: int = 65536,
    on_error: Callable[[OSError], None] | None = None,
) -> None:
    """Copy a pipe to *writer* as *stream* records until end of file, then close *fd*.

    *fd* is the read end of a pipe; the pump makes it non-blocking (which
    affects every descriptor sharing its open file description, so the
    sandbox must not hold this end). End of file comes when every copy of
    the write end is closed, the supervisor's own included. The pieces of a
    line read before end of file or cancellation are written before
    returning.

    The records of one read share its timestamp (the time it was read).
    Writes to the log file are synchronous: appends to the page cache take
    microseconds. Reads take up to *chunk* bytes, and the pump checkpoints
    after each, so a sandbox writing as fast as it can does not starve the
    supervisor's other tasks.

    A failed write (disk full) raises OSError, unless *on_error* is given:
    then it is called with the error and the pump goes on reading, dropping
    what it cannot write, so that the sandbox is not blocked on a full pipe.
    """
    import trio  # here, so that importing this module does not import trio

    splitter = LineSplitter(writer.max_line)

    def write(lines: list[tuple[str, bytes]]) -> None:
        try:
            writer.write_lines(stream, lines)
        except OSError as exc:
            if on_error is None:
                raise
            on_error(exc)

    try:
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, chunk)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not data:
                break
            lines = splitter.feed(data)
            if lines:
                write(lines)
            await trio.lowlevel.checkpoint()
    finally:
        try:
            rest = splitter.flush()
            if rest:
                write(rest)
        finally:
            os.close(fd)


# --- reading -----------------------------------------------------------------

_TS_RE = re.compile(
    rb"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


def _epoch(m: re.Match[bytes]) -> float:
    """Seconds since the epoch of an RFC 3339 match; ValueError for a bad date."""
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    datetime(y, mo, d, h, mi, s)  # validates the fields
    t: float = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    frac, zone = m.group(7), m.group(8)
    if frac:
        t += int(frac) / 10 ** len(frac)
    if zone not in (b"Z", b"z"):
        sign = 1 if zone[0:1] == b"+" else -1
        t -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return t


class _Parser:
    """Parses record lines; caches the last second's epoch (lines come in bursts)."""

    def __init__(self) -> None:
        self._head = b""
        self._sec = 0

    def ts(self, ts: bytes) -> float:
        # Our own format, fixed width: 2024-05-01T12:00:00.123456789Z
        if len(ts) == 30 and ts[19] == 0x2E and ts[29] == 0x5A and ts[20:29].isdigit():
            head = ts[:19]
            if head != self._head:
                m = _TS_RE.fullmatch(head + b"Z")
                if m is None:
                    raise ValueError(ts)
                self._sec = int(_epoch(m))
                self._head = head
            return self._sec + int(ts[20:29]) / _NS
        m = _TS_RE.fullmatch(ts)  # conmon's: local offset, trailing zeros trimmed
        if m is None:
            raise ValueError(ts)
        return _epoch(m)

    def parse(self, data: bytes) -> tuple[list[Record], bytes]:
        """The records of the complete lines in *data* and the bytes after the last newline.

        A line that does not parse (a record torn by a crash) is skipped.
        """
        lines = data.split(b"\n")
        rest = lines.pop()
        out: list[Record] = []
        for line in lines:
            parts = line.split(b" ", 3)
            if len(parts) == 3:
                parts.append(b"")  # empty content, written without the space
            if len(parts) != 4:
                continue
            ts, stream, tag, content = parts
            if stream == b"stdout":
                s = "stdout"
            elif stream == b"stderr":
                s = "stderr"
            else:
                continue
            if tag != b"F" and tag != b"P":
                continue
            try:
                t = self.ts(ts)
            except ValueError:
                continue
            out.append(Record(t, s, tag == b"P", content))
        return out, rest


def _rotated_indices(path: str) -> list[int]:
    """The k of the existing files ``path.k``, ascending."""
    d, base = os.path.split(path)
    prefix = base + "."
    ks = []
    for name in os.listdir(d or "."):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            ks.append(int(name[len(prefix) :]))
    return sorted(ks)


class _File(NamedTuple):
    fd: int
    key: tuple[int, int]  # st_dev, st_ino


def _try_open(path: str) -> _File | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    return _File(fd, (st.st_dev, st.st_ino))


def _close(files: Iterable[_File | None]) -> None:
    for f in files:
        if f is not None:
            os.close(f.fd)


def _names(path: str) -> dict[int, tuple[int, int]]:
    """Which file (st_dev, st_ino) each name holds: 0 for *path*, k for ``path.k``."""
    out = {}
    for k in [0, *_rotated_indices(path)]:
        try:
            st = os.stat(f"{path}.{k}" if k else path)
        except FileNotFoundError:
            continue
        out[k] = (st.st_dev, st.st_ino)
    return out


def _open_files(path: str) -> list[_File]:
    """The log's files opened, oldest first; the last is the current file if it exists.

    Opened before they are read, so that a rotation meanwhile drops none of
    them. The order is the names' (``path.k`` ... ``path.1``, ``path``),
    which is right at every step of a rotation (files move up one at a
    time, the highest first), but only if no rotation came between two
    names: so the names are looked at before and after the files are opened,
    and all is done again if anything moved.
    """
    for _ in range(1000):
        before = _names(path)
        files: list[_File] = []
        try:
            for k in sorted(before, reverse=True):
                f = _try_open(f"{path}.{k}" if k else path)
                if f is None:
                    break
                files.append(f)
                if f.key != before[k]:
                    break
            else:
                if _names(path) == before:
                    return files
        except BaseException:
            _close(files)
            raise
        _close(files)
    # Only if the writer rotates faster than a few stat calls, for seconds.
    raise OSError(errno.EAGAIN, "log files kept rotating while being opened", path)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def _select_tail(records: Sequence[Record], n: int) -> tuple[list[Record], bool]:
    """The records of the last *n* lines, and whether no older record could belong to them.

    A line is one stream's ``F`` record with the ``P`` records of that
    stream before it (a long line in pieces); a stream's last records, if
    ``P``, are a line too (end of file without a newline). Lines count in
    the order they end. Not complete: fewer than *n* lines, or the first
    selected line of a stream may have begun before *records*.
    """
    if n <= 0:
        return [], True
    count = 0
    inside: dict[str, bool] = {}  # stream -> collecting pieces of a selected line
    kept: list[Record] = []
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.stream not in inside or not r.partial:  # r ends a line
            if count < n:
                count += 1
                inside[r.stream] = True
                kept.append(r)
            else:
                inside[r.stream] = False
                if not any(inside.values()):
                    break
        elif inside[r.stream]:
            kept.append(r)
    kept.reverse()
    return kept, count == n and not any(inside.values())


def _history(
    files: Sequence[_File], since: float | None, tail: int | None, parser: _Parser
) -> tuple[list[Record], bytes]:
    """The records of *files* (oldest first) kept by *since* and *tail*.

    Also the bytes after the last newline of the newest file (a record being
    written). Files are read newest first and older ones skipped once they
    cannot matter (this assumes timestamps increase from file to file).
    """
    parts: list[list[Record]] = []
    leftover = b""
    for i in range(len(files) - 1, -1, -1):
        records, rest = parser.parse(_read_to_end(files[i].fd))
        if i == len(files) - 1:
            leftover = rest
        parts.append(records)
        if since is not None and records and records[0].ts < since:
            break
        if tail is not None and _select_tail([r for p in reversed(parts) for r in p], tail)[1]:
            break
    out = [r for p in reversed(parts) for r in p]
    if since is not None:
        out = [r for r in out if r.ts >= since]
    if tail is not None:
        out = _select_tail(out, tail)[0]
    return out, leftover


def read_records(path: str, *, since: float | None = None, tail: int | None = None) -> list[Record]:
    """The records of the log at *path* and its rotated files, oldest first.

    *since* keeps records with ``ts >= since``; then *tail* keeps the last
    *tail* lines, a line being an ``F`` record with the ``P`` pieces of the
    same stream before it (so a long line is whole), or a stream's trailing
    ``P`` records. No file yet: an empty list. Lines that do not parse (a
    record torn by a crash) are skipped.
    """
    files = _open_files(path)
    try:
        return _history(files, since, tail, _Parser())[0]
    finally:
        _close(files)


# inotify(7)
_IN_MODIFY = 0x002
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_EVENT = struct.Struct("iIII")


class _Watch:
    """Waits for changes to one file name in a directory: inotify, else polling."""

    def __init__(self, path: str) -> None:
        d, base = os.path.split(path)
        self._name = os.fsencode(base)
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, AttributeError):
            return
        if fd < 0:  # EMFILE: the user's inotify instances are used up
            return
        mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
        if int(libc.inotify_add_watch(fd, os.fsencode(d or "."), mask)) < 0:
            os.close(fd)
            return
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def wait(self, timeout: float) -> None:
        """Return after a change to the file name, or after *timeout* seconds."""
        if self._fd < 0:
            time.sleep(min(timeout, 0.05))
            return
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._poll.poll(remaining * 1000):
                return
            if self._drain():
                return

    def _drain(self) -> bool:
        """Read the pending events; whether one was about our file."""
        hit = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return hit
            off = 0
            while off < len(data):
                _wd, mask, _cookie, n = _IN_EVENT.unpack_from(data, off)
                name = data[off + 16 : off + 16 + n].rstrip(b"\0")
                off += 16 + n
                if name == self._name or mask & _IN_Q_OVERFLOW:
                    hit = True


def follow(
    path: str,
    *,
    since: float | None = None,
    tail: int | None = None,
    stop: Callable[[], bool] | None = None,
    poll: float = 0.25,
) -> Generator[Record, None, None]:
    """Yield the log's records, then new ones as they are written; a blocking generator.

    First the records already there, chosen by *since* and *tail* as
    :func:`read_records` does (``tail=0`` to start at the end), then every
    record appended, across rotations: when the file is renamed away the
    follower finishes it and goes on with the next newer file, even several
    rotations behind (if it falls ``max_files`` rotations behind, what was
    dropped is skipped). The file need not exist yet; its directory must.

    Waits with inotify on the directory (polling every 50 ms if inotify is
    unavailable). Each time it has caught up, and at least every *poll*
    seconds while waiting, it calls *stop*; when that returns True it reads
    what was written until then and returns. Without *stop* it never ends:
    close the generator.
    """
    parser = _Parser()
    watch = _Watch(path)  # before the first read, so that no change is missed
    cur: _File | None = None
    prev: _File | None = None  # finished, kept open until its successor is known
    try:
        files = _open_files(path)
        try:
            records, buf = _history(files, since, tail, parser) if files else ([], b"")
            if files:
                cur = files.pop()
        finally:
            _close(files)
        yield from records
        while True:
            stopping = stop is not None and stop()
            while True:
                if cur is None:
                    cur = _successor(path, prev)
                    if cur is None:
                        break
                    _close([prev])
                    prev = None
                    buf = b""
                data = _read_to_end(cur.fd)
                if data:
                    records, buf = parser.parse(buf + data)
                    yield from records
                    continue
                if not _renamed(path, cur):
                    break
                # The writer closes a file before renaming it: what is in it
                # now is all there will be.
                records, _ = parser.parse(buf + _read_to_end(cur.fd))
                yield from records
                prev, cur = cur, None
            if stopping:
                return
            watch.wait(poll)
    finally:
        _close([cur, prev])
        watch.close()


def _renamed(path: str, f: _File) -> bool:
    """Whether *f* is no longer the file at *path*."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    return (st.st_dev, st.st_ino) != f.key


def _successor(path: str, prev: _File | None) -> _File | None:
    """The oldest file newer than *prev* (the oldest file if there is no *prev*), opened."""
    files = _open_files(path)
    keys = [f.key for f in files]
    i = 0
    if prev is not None and prev.key in keys:
        i = keys.index(prev.key) + 1
    nxt = files[i] if i < len(files) else None
    _close(f for f in files if f is not nxt)
    return nxt


# --- printing and options ----------------------------------------------------


def format_record(r: Record, *, timestamps: bool) -> bytes:
    """The bytes to print for *r*: its content, with a newline unless it is partial.

    With *timestamps*, prefixed by its time (RFC 3339, UTC, microseconds)
    and a space; the pieces of a long line get one each, as with podman.
    """
    out = r.content if r.partial else r.content + b"\n"
    if not timestamps:
        return out
    sec, us = divmod(round(r.ts * 1_000_000), 1_000_000)
    head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
    return b"%s.%06dZ %s" % (head, us, out)


def parse_since(text: str, now: float) -> float:
    """A ``--since`` value as seconds since the epoch.

    A duration before *now* (``10s``, ``5m``, ``2h``, ``1h30m``, ``1.5d``;
    units ns, us, ms, s, m, h, d) or an RFC 3339 time
    (``2024-05-01T12:00:00Z``, ``2024-05-01T14:00:00.5+02:00``).
    """
    s = text.strip()
    try:
        return now - parse_duration(s, "--since", maximum=None, unit_required=True)
    except SpecError:
        pass
    m = _TS_RE.fullmatch(s.encode(errors="replace"))
    if m is not None:
        try:
            return _epoch(m)
        except ValueError as exc:
            raise ValueError(f"invalid time {text!r}: {exc}") from None
    raise ValueError(
        f"invalid time {text!r}: expected a duration such as 10s, 5m or 2h, "
        "or an RFC 3339 time such as 2024-05-01T12:00:00Z"
    )
