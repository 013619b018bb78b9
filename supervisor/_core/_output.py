"""Sandbox stdout and stderr captured to rotated log files: the writer and the format.

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

Writing: one :class:`OutputWriter` per sandbox; one :func:`pump` task per
stream reads a pipe, splits it with a :class:`LineSplitter` and writes
records. The current file is ``path``; when it would exceed ``max_bytes``
it is renamed to ``path.1`` (``path.1`` to ``path.2`` and so on, the oldest
dropped) and a new ``path`` is started, so a sandbox keeps at most
``max_files`` files.

Reading is the CLI's (``corral logs``): :mod:`supervisor._cli._output_reader`.
Both sides share :class:`Record` and :data:`TIMESTAMP_RE`; the rotated
files are :mod:`events.segments`' numbered layout on both sides.

Importing this module does not import trio (only :func:`pump` needs it), so
the reader, which imports it for the format, stays cheap.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from events.segments import NumberedSegments

__all__ = [
    "TIMESTAMP_RE",
    "LineSplitter",
    "OpenLogs",
    "OutputWriter",
    "Record",
    "pump",
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


class OpenLogs:
    """The writers whose files stay open: the *capacity* most recently
    written to. The others let go of their descriptor and open the file
    again at their next write.

    A fleet's sandboxes mostly write nothing for long stretches; an open
    log each would cost a descriptor per sandbox, and the open-file limit
    bounds a fleet (``docs/performance.md``). A write to a file let go of
    costs an ``open``, an ``fstat`` and a ``pread`` more. Not thread-safe:
    the trio thread's, as the writers are.
    """

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"open logs: capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._open: dict[OutputWriter, None] = {}  # oldest first (insertion order)

    def __len__(self) -> int:
        return len(self._open)

    def used(self, writer: OutputWriter) -> None:
        """*writer* has its file open now: the least recently used past
        the capacity lets go of its own."""
        held = self._open
        if writer in held:
            del held[writer]  # to the end: the most recent
        held[writer] = None
        if len(held) > self.capacity:
            oldest = next(iter(held))
            del held[oldest]
            oldest._files.let_go()

    def forget(self, writer: OutputWriter) -> None:
        """*writer* is closed."""
        self._open.pop(writer, None)


class OutputWriter:
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
        open_logs: OpenLogs | None = None,
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
        # With *open_logs*, the file is open only while among the most
        # recently written (see OpenLogs).
        self._open_logs = open_logs
        if open_logs is not None:
            open_logs.used(self)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the current file (idempotent)."""
        self._files.close()
        if self._open_logs is not None:
            self._open_logs.forget(self)

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
                    if self._open_logs is not None:
                        self._open_logs.used(self)
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
        if self._open_logs is not None:
            self._open_logs.used(self)

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
    writer: OutputWriter,
    *,
    chunk: int = 65536,
    on_error: Callable[[OSError], None] | None = None,
    close: Callable[[int], None] = os.close,
) -> None:
    """Copy a pipe to *writer* as *stream* records until end of file, then
    close *fd* (with *close*: a descriptor shared with others is let go of).

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
            close(fd)


# --- the format both sides share ----------------------------------------------

TIMESTAMP_RE = re.compile(
    rb"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
"""A record's timestamp, RFC 3339: ours (UTC, nanoseconds) and conmon's
(a local offset, trailing zeros of the fraction trimmed). Groups: year,
month, day, hour, minute, second, fraction digits (or None), zone."""
