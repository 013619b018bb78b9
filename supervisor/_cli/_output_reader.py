"""``corral logs``: read a sandbox's captured output back, and follow it.

The files are those :class:`~supervisor._core._output.OutputWriter` writes in
the supervisor: k8s-file records (the format is defined and documented in
:mod:`supervisor._core._output`), the current file ``path`` and the rotated
``path.1`` (newest) to ``path.N`` (oldest). Conmon's files (a local offset,
trailing zeros of the fraction trimmed) are read too.

:func:`read_records` for ``corral logs [--since] [--tail]``, :func:`follow`
for ``-f`` (follows rotation; inotify, polling as fallback),
:func:`format_record` for printing and :func:`parse_since` for ``--since``.
The reader shares no state with the writer: it only reads files, so it works
while the fleet runs and after it stopped.

Importing this module imports neither trio nor ctypes: the inotify binding
of the runtime's syscall layer is loaded only when :func:`follow` waits.
"""

from __future__ import annotations

import calendar
import errno
import os
import re
import select
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from events.segments import rotated_numbers

from .._core._output import TIMESTAMP_RE, Record
from .._errors import SpecError
from .._runtime._units import parse_duration

__all__ = ["follow", "format_record", "parse_since", "read_records"]

_NS = 1_000_000_000


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
                m = TIMESTAMP_RE.fullmatch(head + b"Z")
                if m is None:
                    raise ValueError(ts)
                self._sec = int(_epoch(m))
                self._head = head
            return self._sec + int(ts[20:29]) / _NS
        m = TIMESTAMP_RE.fullmatch(ts)  # conmon's: local offset, trailing zeros trimmed
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
    for k in [0, *rotated_numbers(path)]:
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


class _Watch:
    """Waits for changes to one file name in a directory: inotify, else polling."""

    def __init__(self, path: str) -> None:
        # Here, not at the top: only -f waits, and the binding loads ctypes.
        from .._runtime._linux import _syscalls as sc

        d, base = os.path.split(path)
        self._name = os.fsencode(base)
        self._fd = -1
        try:
            fd = sc.inotify_init()
        except OSError:  # EMFILE: the user's inotify instances are used up
            return
        try:
            sc.inotify_add_watch(fd, d or ".", sc.IN_MODIFY | sc.IN_CREATE | sc.IN_MOVED_TO)
        except OSError:
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
        from .._runtime._linux import _syscalls as sc

        events = sc.inotify_read(self._fd)
        return any(name == self._name or mask & sc.IN_Q_OVERFLOW for mask, name in events)


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
    m = TIMESTAMP_RE.fullmatch(s.encode(errors="replace"))
    if m is not None:
        try:
            return _epoch(m)
        except ValueError as exc:
            raise ValueError(f"invalid time {text!r}: {exc}") from None
    raise ValueError(
        f"invalid time {text!r}: expected a duration such as 10s, 5m or 2h, "
        "or an RFC 3339 time such as 2024-05-01T12:00:00Z"
    )
