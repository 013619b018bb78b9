"""The journal: events appended to size-rotated msgpack segment files.

Layout of the directory::

    00000000000000000001.journal   events 1 .. 4711, msgpack maps back to back
    00000000000000004712.journal   events 4712 .. (the current segment)
    high-water                     the highest seq handed out, or reserved

A segment is named by the seq of its first event (20 digits, so names sort
like numbers). Appends go to an in-memory buffer, written out when it holds
:data:`FLUSH_BYTES`, on :meth:`Journal.flush` and on close: one ``write`` per
buffer, not per event. Nothing is fsync'd: the page cache survives a crash of
the supervisor, which is what the journal is for. Naming, rotating and
dropping segments and cutting off a torn record are :mod:`events.segments`'
(:class:`~events.segments.SeqSegments`); the buffer, the sparse index and
replay are the journal's own.

**Seqs are never reused**, even after a crash that lost the buffer: before
an event gets a seq above the one recorded in ``high-water``, the journal
records a block of :data:`RESERVE_SEQS` seqs there (one ``pwrite`` of a file
allocated at open, so it works on a full disk too), and a journal opened
later continues after the larger of that and the last seq in the segments.
Whatever a consumer saw (on the event socket, in a log) keeps its meaning.
A clean close records the last seq itself, so only a crash skips seqs; a
replay reports them as a :class:`Gap`.

**A write that fails** (a full disk, EIO) does not stop the journal: it
becomes *degraded* (:attr:`Journal.failure` says why), keeps what it could
not write in memory, up to :data:`KEEP_BYTES`, and writes it at the next
:meth:`~Journal.flush` that succeeds; what did not fit is dropped, and
replay reports it as a :class:`Gap`. A failed write is cut back to the last
whole record, so the segments never hold a torn or garbled one. The bus
publishes ``journal_degraded`` and ``journal_recovered`` from the changes
the journal records.

The journal is synchronous and does not import trio: it is small file I/O,
fine in the trio thread, and a one-shot CLI can read it without trio.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

from ._codec import UNPACK_OPTIONS, encode, from_map
from ._errors import JournalError
from ._types import Event, Gap
from .segments import SeqSegment, SeqSegments

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "FLUSH_BYTES",
    "KEEP_BYTES",
    "RESERVE_SEQS",
    "Journal",
]

DEFAULT_SEGMENT_BYTES = 16 << 20
DEFAULT_MAX_BYTES = 256 << 20
FLUSH_BYTES = 64 << 10
"""Buffered bytes that trigger a write: large enough to amortise the syscall,
small enough that a crash loses little."""

KEEP_BYTES = 1 << 20
"""While writes fail, unwritten events are kept in memory up to this many
bytes, to be written when the disk takes them again; beyond it they are
dropped (a gap in the journal)."""
RESERVE_SEQS = 1024
"""Seqs reserved in ``high-water`` at a time: one small write per this many
events; a crash skips at most this many."""

# A sparse index entry every this many bytes lets replay start near the seq
# it wants instead of decoding a whole 16 MiB segment from its start.
_INDEX_EVERY = 64 << 10
_READ_CHUNK = 256 << 10
_SUFFIX = ".journal"
_HIGH_WATER = "high-water"
_MARK = b"%020d\n"  # the high-water file's content
_MARK_LEN = len(_MARK % 0)


class _Change(NamedTuple):
    """A change of the journal's health, for the bus to publish."""

    failure: str | None
    """Why writing failed (the journal became degraded), or None: it recovered."""
    first: int
    """On recovery: the first seq that could not be written (0: none was lost)."""
    last: int
    """On recovery: the last seq that could not be written."""


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

    Opening recovers ``last_seq`` from the newest segment and the
    ``high-water`` file; a truncated last record (a crash in the middle of a
    write) is cut off. The directory is locked (``flock``) against a second
    journal on it, in any process.

    Writing never loses the journal's consistency: a failed write makes it
    degraded (see the module's description) and raises
    :class:`JournalError`; the journal stays usable.
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
        self._buf_first = 0  # the seq of the first record in _buf (0: empty)
        self._last = 0
        self._closed = False
        # Degraded mode: why writing fails (None: it does not), the seqs
        # dropped since it began, and the changes not yet taken by the bus.
        self._failure: str | None = None
        self._lost: tuple[int, int] | None = None
        self._changes: list[_Change] = []
        # high-water: its descriptor, the seq it records, and whether the
        # last write of it failed (then it is retried at flush only).
        self._mark_path = os.path.join(self.path, _HIGH_WATER)
        self._mark_fd = -1
        self._reserved = 0
        self._mark_broken = False
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
        # Seqs up to the high-water mark may have been seen by someone
        # before a crash, even if they never reached a segment.
        self._last = self._reserved = max(self._last, self._open_mark())

    # --- state -------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still in the journal; 0 if it is empty."""
        segments = self._files.segments
        return segments[0].first if segments else 0

    @property
    def last_seq(self) -> int:
        """The newest seq appended (flushed or not), or handed out before a
        crash; 0 if there was none."""
        return self._last

    @property
    def size(self) -> int:
        """Bytes in all segments, counting the unflushed buffer."""
        return sum(s.size for s in self._files.segments) + len(self._buf)

    @property
    def failure(self) -> str | None:
        """Why the journal cannot be written, while it cannot (it is
        *degraded*); None while writes succeed."""
        return self._failure

    # --- writing -------------------------------------------------------------

    def append(self, event: Event) -> None:
        """Add *event* (already stamped with a seq above :attr:`last_seq`)."""
        self.append_encoded(event.seq, encode(event))

    def append_encoded(self, seq: int, record: bytes) -> None:
        """Add an event the caller has encoded already (the bus does, once).

        *record* must be :func:`encode` of an event with this *seq*. The
        event is taken even when this raises :class:`JournalError` (a write
        failed: the journal is degraded, see :attr:`failure`); only a closed
        journal refuses it.
        """
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        if seq <= self._last:
            raise ValueError(f"journal seqs must increase: got {seq} after {self._last}")
        error: JournalError | None = None
        if seq > self._reserved and not self._mark_broken:
            # Before anyone can see this seq: a crash must not hand it out again.
            try:
                self._write_mark(seq + RESERVE_SEQS - 1)
            except JournalError as exc:
                error = exc
        files = self._files
        pending = len(self._buf)
        # A record larger than a segment gets one of its own.
        if files.needs_rotation(len(record), pending):
            try:
                self._rotate(seq)
            except JournalError as exc:
                error = error or exc
            pending = 0
        elif self._failure is not None and pending + len(record) > KEEP_BYTES:
            self._drop()
            pending = 0
        seg = files.current
        assert seg is not None  # there is one after a rotation
        offset = seg.size + pending
        if offset >= seg.next_note:
            seg.note(seq, offset)
        if not self._buf:
            self._buf_first = seq
        self._buf += record
        self._last = seq
        if error is not None:
            raise error
        # While degraded only flush() retries: not one failing write per event.
        if len(self._buf) >= FLUSH_BYTES and self._failure is None:
            self.flush()

    def flush(self) -> None:
        """Write the buffered events to the current segment.

        Also retries a failed write of ``high-water``. On failure the
        journal is degraded (the events stay buffered, up to
        :data:`KEEP_BYTES`) and :class:`JournalError` says why; once a flush
        succeeds again it has recovered.
        """
        error: JournalError | None = None
        if self._buf:
            seg = self._files.current
            assert seg is not None  # appending made one
            try:
                # On failure the segment is cut back to its last whole record.
                self._files.write(self._buf)
            except OSError as exc:
                error = JournalError(f"cannot write journal segment {seg.path}: {_reason(exc)}")
                error.__cause__ = exc
            else:
                self._buf.clear()
                self._buf_first = 0
        if self._mark_broken and error is None:
            try:
                self._write_mark(self._last + RESERVE_SEQS - 1)
            except JournalError as exc:
                error = exc
        if error is not None:
            self._fail(str(error))
            raise error
        self._recover()

    def _rotate(self, first: int) -> None:
        """Start a new segment whose first event is *first*."""
        error: JournalError | None = None
        try:
            self.flush()
        except JournalError as exc:
            # The buffered events belong to the segment being finished.
            error = exc
            self._drop()
        try:
            self._files.rotate(first)
        except OSError as exc:
            # The new segment is started; the old one is kept, and deleted
            # at a later rotation. Nothing is lost: not a degraded journal.
            error = error or JournalError(
                f"cannot delete journal segment {exc.filename}: {exc.strerror}"
            )
        if error is not None:
            raise error

    def _drop(self) -> None:
        """Give up the buffered events: they become a gap in the journal."""
        if not self._buf:
            return
        first = self._lost[0] if self._lost is not None else self._buf_first
        self._lost = (first, self._last)
        seg = self._files.current
        assert seg is not None  # there are buffered events for it
        seg.forget_from(seg.size)  # later records will reuse those offsets
        self._buf.clear()
        self._buf_first = 0

    def _fail(self, failure: str) -> None:
        if self._failure is None:
            self._failure = failure
            self._lost = None
            self._changes.append(_Change(failure, 0, 0))

    def _recover(self) -> None:
        if self._failure is not None:
            first, last = self._lost or (0, 0)
            self._failure = self._lost = None
            self._changes.append(_Change(None, first, last))

    def _take_change(self) -> _Change | None:
        """The oldest change of health not yet taken (by the bus), if any."""
        return self._changes.pop(0) if self._changes else None

    # --- high-water ------------------------------------------------------------

    def _open_mark(self) -> int:
        """Open ``high-water`` (making room for it now); the seq it records."""
        try:
            fd = os.open(self._mark_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._mark_broken = True
            self._fail(f"cannot open {self._mark_path}: {_reason(exc)}")
            return 0
        self._mark_fd = fd
        try:
            data = os.pread(fd, _MARK_LEN, 0)
        except OSError:
            data = b""
        try:
            # Allocated now, a rewrite needs no new block when the disk is full.
            os.posix_fallocate(fd, 0, _MARK_LEN)
        except OSError:
            pass  # a file system without fallocate: writes still work while there is room
        try:
            return int(data) if data else 0
        except ValueError:
            return 0  # not written by a journal: no seqs were reserved in it

    def _write_mark(self, seq: int) -> None:
        """Record *seq* in ``high-water``. JournalError (degraded) if that fails."""
        data = _MARK % seq
        try:
            if self._mark_fd < 0:
                self._mark_fd = os.open(
                    self._mark_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            if os.pwrite(self._mark_fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            self._mark_broken = True
            error = JournalError(f"cannot write {self._mark_path}: {_reason(exc)}")
            self._fail(str(error))
            raise error from exc
        self._mark_broken = False
        self._reserved = seq

    def close(self) -> None:
        """Flush and release the directory. Closing twice is harmless.

        :class:`JournalError` if the last flush failed (after releasing
        everything): the events it held are lost.
        """
        if self._closed:
            return
        error: JournalError | None = None
        try:
            self.flush()
        except JournalError as exc:
            error = exc
        if self._reserved > self._last and not self._mark_broken:
            # A clean end: the next journal continues right after the last
            # seq, without the skip a crash leaves. If this fails, it skips.
            try:
                self._write_mark(self._last)
            except JournalError:
                pass
        self._closed = True
        self._buf.clear()
        self._files.close()
        if self._mark_fd >= 0:
            os.close(self._mark_fd)
            self._mark_fd = -1
        os.close(self._lock)
        if error is not None:
            raise error

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
        flushed first (unless the journal is degraded). Where part of the
        range is not on disk (rotated away, lost to a write error or a
        crash, or still in memory while the journal is degraded) the
        iterator yields one :class:`Gap` for each missing stretch, so that
        every seq in the range is accounted for.
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
        if self._buf and self._failure is None:
            try:
                self.flush()
            except JournalError:
                pass  # degraded now: what is not on disk comes out as a Gap
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


def _reason(exc: OSError) -> str:
    """``[Errno 28] No space left on device``: the errno and its text, no path."""
    if exc.errno is not None:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc)
