"""The journal: events appended to size-rotated msgpack segment files.

Layout of the directory::

    00000000000000000001.journal   events 1 .. 4711, msgpack maps back to back
    00000000000000004712.journal   events 4712 .. (the current segment)

A segment is named by the seq of its first event (20 digits, so names sort
like numbers). Appends go to an in-memory buffer, written out when it holds
:data:`FLUSH_BYTES`, on :meth:`Journal.flush` and on close: one ``write`` per
buffer, not per event. Nothing is fsync'd: the page cache survives a crash of
the supervisor, which is what the journal is for.

The journal is synchronous and does not import trio: it is small file I/O,
fine in the trio thread, and a one-shot CLI can read it without trio.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import re
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ._codec import UNPACK_OPTIONS, encode, from_map
from ._errors import JournalError
from ._types import Event, Gap

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_SEGMENT_BYTES", "FLUSH_BYTES", "Journal"]

DEFAULT_SEGMENT_BYTES = 16 << 20
DEFAULT_MAX_BYTES = 256 << 20
FLUSH_BYTES = 64 << 10
"""Buffered bytes that trigger a write: large enough to amortise the syscall,
small enough that a crash loses little."""

# A sparse index entry every this many bytes lets replay start near the seq
# it wants instead of decoding a whole 16 MiB segment from its start.
_INDEX_EVERY = 64 << 10
_READ_CHUNK = 256 << 10
_NAME = re.compile(r"^(\d{20})\.journal$")


class _Segment:
    """One segment file: its first seq, bytes on disk, a sparse index."""

    __slots__ = ("first", "index_offsets", "index_seqs", "size")

    def __init__(self, first: int, size: int = 0) -> None:
        self.first = first
        self.size = size
        # Parallel lists (seq, offset of that record), ascending.
        self.index_seqs: list[int] = []
        self.index_offsets: list[int] = []

    def note(self, seq: int, offset: int) -> None:
        if not self.index_offsets or offset - self.index_offsets[-1] >= _INDEX_EVERY:
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)

    def forget_from(self, offset: int) -> None:
        """Drop index entries at or past *offset* (their records were lost)."""
        i = bisect.bisect_left(self.index_offsets, offset)
        del self.index_seqs[i:], self.index_offsets[i:]

    def start_offset(self, seq: int) -> int:
        """An offset at or before the record *seq* (0 if unknown)."""
        i = bisect.bisect_right(self.index_seqs, seq) - 1
        return self.index_offsets[i] if i >= 0 else 0


class Journal:
    """An append-only event journal in the directory *path*.

    ``segment_bytes`` is the size at which a new segment starts;
    ``max_bytes`` bounds the directory's total: when a segment is full, the
    oldest segments are deleted so that the rest plus a full current one fit
    (the current one is never deleted). Seqs must increase; the bus appends
    consecutive ones.

    Opening recovers ``last_seq`` from the newest segment; a truncated last
    record (a crash in the middle of a write) is cut off. The directory is
    locked (``flock``) against a second journal on it, in any process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if segment_bytes <= 0 or max_bytes < segment_bytes:
            raise ValueError(
                f"journal sizes: need 0 < segment_bytes <= max_bytes, got "
                f"segment_bytes={segment_bytes}, max_bytes={max_bytes}"
            )
        self.path = os.fspath(path)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._segments: list[_Segment] = []
        self._buf = bytearray()
        self._fd = -1  # the current segment, opened for appending on first write
        self._last = 0
        self._closed = False
        try:
            os.makedirs(self.path, mode=0o750, exist_ok=True)
            self._lock = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalError(f"cannot open journal directory {self.path}: {exc}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._recover()
        except BaseException as exc:
            os.close(self._lock)
            if isinstance(exc, BlockingIOError):
                raise JournalError(f"journal {self.path} is in use by another process") from exc
            if isinstance(exc, OSError):
                raise JournalError(f"cannot recover journal {self.path}: {exc}") from exc
            raise

    # --- state -------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still in the journal; 0 if it is empty."""
        return self._segments[0].first if self._segments else 0

    @property
    def last_seq(self) -> int:
        """The newest seq appended (flushed or not); 0 if it is empty."""
        return self._last

    @property
    def size(self) -> int:
        """Bytes in all segments, counting the unflushed buffer."""
        return sum(s.size for s in self._segments) + len(self._buf)

    def _file(self, seg: _Segment | int) -> str:
        """The path of a segment, given it or its first seq."""
        first = seg if isinstance(seg, int) else seg.first
        return os.path.join(self.path, f"{first:020d}.journal")

    # --- writing -------------------------------------------------------------

    def append(self, event: Event) -> None:
        """Add *event* (already stamped with a seq above :attr:`last_seq`)."""
        self.append_encoded(event.seq, encode(event))

    def append_encoded(self, seq: int, record: bytes) -> None:
        """Add an event the caller has encoded already (the bus does, once).

        *record* must be :func:`encode` of an event with this *seq*.
        """
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        if seq <= self._last:
            raise ValueError(f"journal seqs must increase: got {seq} after {self._last}")
        seg = self._segments[-1] if self._segments else None
        pending = len(self._buf)
        used = seg.size + pending if seg is not None else 0
        # A record larger than a segment gets one of its own.
        if seg is None or (used and used + len(record) > self.segment_bytes):
            self._rotate(seq)
            seg = self._segments[-1]
            pending = 0
        seg.note(seq, seg.size + pending)
        self._buf += record
        self._last = seq
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered events to the current segment."""
        if not self._buf:
            return
        seg = self._segments[-1]
        try:
            if self._fd < 0:
                self._fd = os.open(
                    self._file(seg), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            done = os.write(self._fd, self._buf)
            while done < len(self._buf):  # only when the disk is (nearly) full
                done += os.write(self._fd, self._buf[done:])
        except OSError as exc:
            # Cut a half-written record off so the segment stays readable;
            # the lost events show up as a Gap on replay.
            if self._fd >= 0:
                try:
                    os.ftruncate(self._fd, seg.size)
                except OSError:
                    pass
            self._buf.clear()
            seg.forget_from(seg.size)  # later records will reuse those offsets
            raise JournalError(f"cannot write journal segment {self._file(seg)}: {exc}") from exc
        seg.size += len(self._buf)
        self._buf.clear()

    def _rotate(self, first: int) -> None:
        """Start a new segment whose first event is *first*."""
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._segments.append(_Segment(first))
        self._trim()

    def _trim(self) -> None:
        # Room for the new segment to grow to segment_bytes without the total
        # passing max_bytes.
        total = sum(s.size for s in self._segments[:-1]) + self.segment_bytes
        while len(self._segments) > 1 and total > self.max_bytes:
            old = self._segments.pop(0)
            total -= old.size
            try:
                os.unlink(self._file(old))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise JournalError(
                    f"cannot delete journal segment {self._file(old)}: {exc}"
                ) from exc

    def close(self) -> None:
        """Flush and release the directory. Closing twice is harmless."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.close(self._lock)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- recovery ------------------------------------------------------------

    def _recover(self) -> None:
        firsts = sorted(int(m[1]) for n in os.listdir(self.path) if (m := _NAME.match(n)))
        self._segments = [_Segment(f, os.stat(self._file(f)).st_size) for f in firsts]
        # The newest segment may end in a half-written record, or be empty
        # (a crash right after rotating): cut it back to its last complete
        # record, and drop it if nothing is left.
        while self._segments:
            seg = self._segments[-1]
            good, last = self._scan(seg)
            if last:
                if good < seg.size:
                    os.truncate(self._file(seg), good)
                    seg.size = good
                self._last = last
                break
            os.unlink(self._file(seg))
            self._segments.pop()
        if self._segments:
            self._trim_on_open()

    def _trim_on_open(self) -> None:
        # Settings may have shrunk since the last run.
        total = sum(s.size for s in self._segments)
        while len(self._segments) > 1 and total > self.max_bytes:
            old = self._segments.pop(0)
            total -= old.size
            os.unlink(self._file(old))

    def _scan(self, seg: _Segment) -> tuple[int, int]:
        """(end offset of the last good record, its seq) of *seg*; builds its index."""
        good = last = 0
        with open(self._file(seg), "rb") as f:
            unpacker = msgpack.Unpacker(f, read_size=_READ_CHUNK, **UNPACK_OPTIONS)
            while True:
                try:
                    record = next(unpacker)
                except StopIteration:
                    break
                except (ValueError, msgpack.UnpackException):
                    break  # garbage after a crash: everything from here goes
                seq = record.get("seq") if type(record) is dict else None
                if type(seq) is not int or seq <= last:
                    break
                seg.note(seq, good)
                good = unpacker.tell()
                last = seq
        return good, last

    # --- reading -------------------------------------------------------------

    def replay(self, since: int, until: int | None = None) -> Iterator[Event]:
        """Every journaled event with ``since <= seq <= until``, in order.

        ``until`` defaults to :attr:`last_seq` now. Buffered events are
        flushed first. Where part of the range is not on disk (rotated away,
        or lost to a write error) the iterator yields one :class:`Gap` for
        each missing stretch, so that every seq in the range is accounted for.
        """
        records = self.replay_records(since, until)  # flushes now, not at first next()
        return (r if isinstance(r, Gap) else from_map(r) for r in records)

    def replay_records(
        self, since: int, until: int | None = None
    ) -> Iterator[dict[str, Any] | Gap]:
        """Like :meth:`replay`, but yielding the decoded msgpack maps as
        stored (cheaper to relay: no event objects are built)."""
        self.flush()
        end = self._last if until is None else min(until, self._last)
        return self._records(max(since, 1), end)

    def _records(self, want: int, end: int) -> Iterator[dict[str, Any] | Gap]:
        # `want` is the next seq to account for. The segment list is looked
        # up afresh for each segment: appends may rotate old ones away while
        # a slow reader (the socket server) is in the middle.
        while want <= end:
            firsts = [s.first for s in self._segments]
            i = bisect.bisect_right(firsts, want) - 1
            if i < 0:
                if not firsts:
                    yield Gap(first=want, last=end)
                    return
                yield Gap(first=want, last=min(firsts[0] - 1, end))
                want = firsts[0]
                continue
            seg = self._segments[i]
            seg_end = self._segments[i + 1].first - 1 if i + 1 < len(self._segments) else end
            try:
                for record in self._read(seg, want):
                    seq = record["seq"]
                    if seq > end:
                        if want <= end:
                            yield Gap(first=want, last=end)
                        return
                    if seq > want:
                        yield Gap(first=want, last=seq - 1)
                    yield record
                    want = seq + 1
            except FileNotFoundError:
                if seg in self._segments:
                    # Deleted behind our back: account for its whole range.
                    yield Gap(first=want, last=min(seg_end, end))
                    want = min(seg_end, end) + 1
                # Otherwise rotated away meanwhile: the next round yields a Gap.
                continue
            if want <= min(seg_end, end):
                # A hole at the end of the segment (a failed write).
                yield Gap(first=want, last=min(seg_end, end))
                want = min(seg_end, end) + 1

    def _read(self, seg: _Segment, want: int) -> Iterator[dict[str, Any]]:
        """Records of *seg* from about *want* on (earlier ones skipped)."""
        try:
            f = open(self._file(seg), "rb")  # noqa: SIM115 - closed below; a generator
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise JournalError(f"cannot read journal segment {self._file(seg)}: {exc}") from exc
        with f:
            f.seek(seg.start_offset(want))
            unpacker = msgpack.Unpacker(f, read_size=_READ_CHUNK, **UNPACK_OPTIONS)
            try:
                for record in unpacker:
                    if record["seq"] >= want:
                        yield record
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                raise JournalError(
                    f"journal segment {self._file(seg)} is corrupt near offset "
                    f"{unpacker.tell()}: {exc}"
                ) from exc
