"""The journal: events appended to size-rotated msgpack segment files.

Layout of the directory::

    00000000000000000001.journal   events 1 .. 4711, msgpack maps back to back
    00000000000000004712.journal   events 4712 .. (the current segment)

A segment is named by the seq of its first event (20 digits, so names sort
like numbers). Appends go to an in-memory buffer, written out when it holds
:data:`FLUSH_BYTES`, on :meth:`Journal.flush` and on close: one ``write`` per
buffer, not per event. Nothing is fsync'd: the page cache survives a crash of
the supervisor, which is what the journal is for. Naming, rotating and
dropping segments and cutting off a torn record are :mod:`events.segments`'
(:class:`~events.segments.SeqSegments`); the buffer, the sparse index and
replay are the journal's own.

The journal is synchronous and does not import trio: it is small file I/O,
fine in the trio thread, and a one-shot CLI can read it without trio.
"""

from __future__ import annotations

import bisect
import fcntl
import os
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ._codec import UNPACK_OPTIONS, encode, from_map
from ._errors import JournalError
from ._types import Event, Gap
from .segments import SeqSegment, SeqSegments

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
_SUFFIX = ".journal"


class _Segment(SeqSegment):
    """One segment file: its path, first seq, bytes on disk, and a sparse index."""

    __slots__ = ("index_offsets", "index_seqs", "next_note")

    def __init__(self, path: str, first: int, size: int = 0) -> None:
        super().__init__(path, first, size)
        # Parallel lists (seq, offset of that record), ascending.
        self.index_seqs: list[int] = []
        self.index_offsets: list[int] = []
        # The offset from which a record gets an index entry: the caller
        # compares, so that most appends make no call at all.
        self.next_note = 0

    def note(self, seq: int, offset: int) -> None:
        if offset >= self.next_note:
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)
            self.next_note = offset + _INDEX_EVERY

    def forget_from(self, offset: int) -> None:
        """Drop index entries at or past *offset* (their records were lost)."""
        i = bisect.bisect_left(self.index_offsets, offset)
        del self.index_seqs[i:], self.index_offsets[i:]
        self.next_note = self.index_offsets[-1] + _INDEX_EVERY if self.index_offsets else 0

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
        self._buf = bytearray()
        self._last = 0
        self._closed = False
        try:
            os.makedirs(self.path, mode=0o750, exist_ok=True)
            self._lock = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalError(f"cannot open journal directory {self.path}: {exc}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._files = SeqSegments(
                self.path,
                suffix=_SUFFIX,
                segment_bytes=segment_bytes,
                max_bytes=max_bytes,
                segment_type=_Segment,
                scan=self._scan,
            )
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
        segments = self._files.segments
        return segments[0].first if segments else 0

    @property
    def last_seq(self) -> int:
        """The newest seq appended (flushed or not); 0 if it is empty."""
        return self._last

    @property
    def size(self) -> int:
        """Bytes in all segments, counting the unflushed buffer."""
        return sum(s.size for s in self._files.segments) + len(self._buf)

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
        files = self._files
        pending = len(self._buf)
        # A record larger than a segment gets one of its own.
        if files.needs_rotation(len(record), pending):
            self._rotate(seq)
            pending = 0
        seg = files.current
        assert seg is not None  # there is one after a rotation
        offset = seg.size + pending
        if offset >= seg.next_note:
            seg.note(seq, offset)
        self._buf += record
        self._last = seq
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered events to the current segment."""
        if not self._buf:
            return
        seg = self._files.current
        assert seg is not None  # appending made one
        start = seg.size
        try:
            self._files.write(self._buf)
        except OSError as exc:
            # The segment was cut back to its last whole record; the lost
            # events show up as a Gap on replay.
            self._buf.clear()
            seg.forget_from(start)  # later records will reuse those offsets
            raise JournalError(
                f"cannot write journal segment {seg.path}: [Errno {exc.errno}] {exc.strerror}"
            ) from exc
        self._buf.clear()

    def _rotate(self, first: int) -> None:
        """Start a new segment whose first event is *first*."""
        self.flush()
        try:
            self._files.rotate(first)
        except OSError as exc:
            raise JournalError(f"cannot delete journal segment {exc.filename}: {exc}") from exc

    def close(self) -> None:
        """Flush and release the directory. Closing twice is harmless."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._files.close()
            os.close(self._lock)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- recovery ------------------------------------------------------------

    def _scan(self, seg: _Segment) -> int:
        """The end offset of the last good record of *seg* (0: none).

        Builds the segment's index and sets :attr:`last_seq` to that record's
        seq. Called on opening, for the newest segment, then for the one
        before as long as nothing good is found (segments without a good
        record are deleted).
        """
        good = last = 0
        with open(seg.path, "rb") as f:
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
        self._last = last
        return good

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
        stored (cheaper to relay: no event objects are built).

        The iterator may be advanced in another thread, one step at a time,
        while this thread goes on appending (the socket server does).
        """
        self.flush()
        end = self._last if until is None else min(until, self._last)
        return self._records(max(since, 1), end)

    def _records(self, want: int, end: int) -> Iterator[dict[str, Any] | Gap]:
        # `want` is the next seq to account for. The segment list is looked
        # up afresh for each segment: appends may rotate old ones away while
        # a slow reader (the socket server) is in the middle.
        while want <= end:
            # A copy: a replay may be read in a worker thread (the socket
            # server's) while appends rotate segments on the trio thread.
            segments = list(self._files.segments)
            firsts = [s.first for s in segments]
            i = bisect.bisect_right(firsts, want) - 1
            if i < 0:
                if not firsts:
                    yield Gap(first=want, last=end)
                    return
                yield Gap(first=want, last=min(firsts[0] - 1, end))
                want = firsts[0]
                continue
            seg = segments[i]
            seg_end = segments[i + 1].first - 1 if i + 1 < len(segments) else end
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
                if seg in self._files.segments:
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
            f = open(seg.path, "rb")  # noqa: SIM115 - closed below; a generator
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise JournalError(f"cannot read journal segment {seg.path}: {exc}") from exc
        with f:
            f.seek(seg.start_offset(want))
            unpacker = msgpack.Unpacker(f, read_size=_READ_CHUNK, **UNPACK_OPTIONS)
            try:
                for record in unpacker:
                    if record["seq"] >= want:
                        yield record
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                raise JournalError(
                    f"journal segment {seg.path} is corrupt near offset {unpacker.tell()}: {exc}"
                ) from exc
