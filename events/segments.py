"""Append-only files of whole records, bounded in size and rotated.

The one implementation behind every append-only file corral keeps: the
event journal, each sandbox's captured output and the ``logging`` plugin's
event log. A *record* is bytes the caller has encoded (a msgpack map, a
line with its newline); this module never looks inside one.

Records go to the *current segment*, a file open with ``O_APPEND``, many
records with one ``write(2)``, so that a reader never sees a record
interleaved with another and sees a partial record only while it is being
written. When a record would take the current segment past
``segment_bytes``, the segment is finished and a new one started; every
segment holds whole records, and a record larger than ``segment_bytes``
gets a segment of its own. Two layouts, each naming and dropping old
segments its own way:

:class:`NumberedSegments`
    ``PATH`` (the current segment), ``PATH.1`` (the one before) ...
    ``PATH.{max_files-1}``. Rotating renames each ``PATH.k`` to
    ``PATH.k+1`` and ``PATH`` to ``PATH.1``, dropping the oldest: at most
    ``max_files`` files. Used by sandbox output capture
    (``supervisor``'s ``OutputWriter``) and the event log (``plugins.eventlog``).
:class:`SeqSegments`
    ``DIR/{first:020d}{suffix}``: each segment named by the seq of its first
    record (20 digits, so names sort like numbers). Rotating starts a new
    file, then deletes the oldest until the others plus a full new one fit
    in ``max_bytes``. Used by :class:`events.Journal`.

A crash can leave the last record of the current segment torn. Opening
recovers the size from the file and deals with a torn tail in one of two
ways, chosen by the record format:

- *terminator* (records end with it, such as ``b"\\n"``): the next write
  starts with the terminator, so only the torn record is lost, not the one
  after it, which would be glued to it.
- *scan* (:class:`SeqSegments`, self-delimiting records such as msgpack):
  a function says where the last whole record of the newest segment ends;
  the segment is cut back to there, and deleted if nothing is left (then the
  one before is scanned).

A failed write is undone: the file is cut back to its size before the
write, so that it still holds whole records, and the ``OSError`` is raised
naming the file. Should cutting back fail too, records with a terminator
are ended with it before the next one; records without one are cut off
before anything more is written to the file (the write fails if that
fails), so a record is never glued to a torn one.

Nothing is fsync'd: the page cache survives a crash of the writing process,
which is what these files are for. Synchronous and without trio; not
thread-safe (one object per set of files, used from one thread).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = [
    "NumberedSegments",
    "Segment",
    "SegmentFiles",
    "SeqSegment",
    "SeqSegments",
    "rotated_numbers",
]


class Segment:
    """One segment file: its path and the bytes in it."""

    __slots__ = ("path", "size")

    def __init__(self, path: str, size: int = 0) -> None:
        self.path = path
        """Where the file is (it may not exist yet: it is created on the first write)."""
        self.size = size
        """Bytes in the file, as far as this process knows (it is the only writer)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, size={self.size})"


class SeqSegment(Segment):
    """A segment of :class:`SeqSegments`: also the seq of its first record.

    Subclass it to keep more per segment (the journal keeps a sparse index);
    the constructor's signature must stay ``(path, first, size=0)``.
    """

    __slots__ = ("first",)

    def __init__(self, path: str, first: int, size: int = 0) -> None:
        super().__init__(path, size)
        self.first = first
        """The seq of the segment's first record, the number in its name."""


S = TypeVar("S", bound=Segment)
SS = TypeVar("SS", bound=SeqSegment)


class SegmentFiles(Generic[S]):
    """What both layouts share: the current segment, written whole records at a time.

    Not made directly: use :class:`NumberedSegments` or :class:`SeqSegments`,
    which name, rotate and drop segments.
    """

    current: S | None
    """The segment appended to; None only in a :class:`SeqSegments` with none yet."""

    def __init__(
        self, where: str, *, segment_bytes: int, mode: int, terminator: bytes | None
    ) -> None:
        if segment_bytes < 1:
            raise ValueError(
                f"segments {where}: segment_bytes must be positive, got {segment_bytes}"
            )
        if terminator is not None and not terminator:
            raise ValueError(f"segments {where}: terminator must not be empty (None for none)")
        self._where = where  # for messages: the path or the directory
        self.segment_bytes = segment_bytes
        """The size a segment does not pass, unless a single record is larger."""
        self.mode = mode
        """File mode of new segments (before the umask)."""
        self.terminator = terminator
        """The bytes every record ends with, or None."""
        self.closed = False
        """True after :meth:`close`: writing is an error then."""
        self._fd = -1  # the current segment; opened on the first write, or open()
        # The current file does not end with the terminator: a record was
        # torn by a crash. The next write starts with the terminator, so
        # that only the torn record is lost, not the one glued to it.
        self._torn = False
        # Without a terminator a torn record cannot be ended, only cut off:
        # the size to cut the current file back to before anything more is
        # written to it, when cutting off a failed write failed (-1: none).
        self._cut = -1

    def needs_rotation(self, n: int, pending: int = 0) -> bool:
        """Whether a record of *n* bytes must start a new segment.

        So it must when there is no current segment, or when the current
        one, with the *pending* bytes the caller holds for it but has not
        written yet, is not empty and the record would take it past
        :attr:`segment_bytes`. An empty segment takes any record.
        """
        seg = self.current
        if seg is None:
            return True
        used = seg.size + pending
        return used > 0 and used + n > self.segment_bytes

    def open(self) -> None:
        """Open the current segment for appending (creating it) if it is not open.

        Writing opens it anyway; this is for making the file exist now. The
        size is read from the file and its tail checked for a torn record.
        ValueError after :meth:`close`, OSError (naming the file) from open(2).
        """
        if self._fd >= 0:
            return
        seg = self.current
        if self.closed or seg is None:
            what = "closed" if self.closed else "no current segment (rotate first)"
            raise ValueError(f"segments {self._where}: {what}")
        term = self.terminator
        # Reading back the last bytes needs a readable descriptor.
        access = os.O_RDWR if term else os.O_WRONLY
        fd = os.open(seg.path, access | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            size = os.fstat(fd).st_size
            torn = (
                term is not None and size > 0 and os.pread(fd, len(term), size - len(term)) != term
            )
        except BaseException:
            os.close(fd)
            raise
        self._fd, seg.size, self._torn = fd, size, torn

    def write(self, data: bytes | bytearray) -> None:
        """Append *data*, whole records, to the current segment with one write(2).

        No rotation here: see :meth:`needs_rotation`. More than one write
        only if the kernel takes part of the data (the disk is nearly full).
        If a write fails, the file is cut back to its size before this call
        and the OSError is raised, naming the file; ValueError after
        :meth:`close`.
        """
        if self._fd < 0:
            self.open()
        seg = self.current
        assert seg is not None  # open() succeeded
        if self._cut >= 0:
            # Never append after a torn record that has no terminator: a
            # reader would take the two for one garbled record.
            try:
                os.ftruncate(self._fd, self._cut)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, seg.path) from exc
            self._cut = -1
        if self._torn:
            assert self.terminator is not None
            data = self.terminator + data
        start = seg.size
        done = 0
        try:
            done = os.write(self._fd, data)
            if done < len(data):
                with memoryview(data) as view:  # released: a bytearray may be resized after
                    while done < len(data):
                        done += os.write(self._fd, view[done:])
        except OSError as exc:
            self._undo(seg, start, data[:done])
            raise OSError(exc.errno, exc.strerror, seg.path) from exc
        seg.size = start + done
        self._torn = False

    def _undo(self, seg: S, start: int, written: bytes | bytearray) -> None:
        """Cut off what a failed write wrote, so the segment holds whole records."""
        if not written:
            return
        try:
            os.ftruncate(self._fd, start)
        except OSError:
            if self.terminator is None:
                # Cut it off before the next write (or when the file is
                # closed); until then the file is not written to.
                self._cut = start
                return
            # Stuck with a torn record: account for it, and end it before
            # the next record.
            seg.size = start + len(written)
            self._torn = not written.endswith(self.terminator)

    def close(self) -> None:
        """Close the current segment; writing after this is an error. Idempotent."""
        self.closed = True
        self._close_fd()

    def let_go(self) -> None:
        """Close the current segment's descriptor for now: the next write
        opens it again (its size and tail read back, as :meth:`open`
        does). For many files written now and then, each holding a
        descriptor for nothing meanwhile."""
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._cut >= 0:
                # A last try: a reader stops at an incomplete last record of
                # a file, so if this fails too only the failed write is lost.
                try:
                    os.ftruncate(fd, self._cut)
                except OSError:
                    pass
                self._cut = -1
            os.close(fd)


def rotated_numbers(path: str) -> list[int]:
    """The k of the existing files ``PATH.k`` (k all digits), ascending."""
    d, base = os.path.split(path)
    prefix = base + "."
    ks = []
    for name in os.listdir(d or "."):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            ks.append(int(name[len(prefix) :]))
    return sorted(ks)


class NumberedSegments(SegmentFiles[Segment]):
    """``PATH``, ``PATH.1`` ... ``PATH.{max_files-1}``, newest first, at most *max_files*.

    The current segment is ``PATH``; opening creates it (or appends to the
    existing one) and deletes files ``PATH.k`` with ``k >= max_files``, left
    by an earlier, larger *max_files*. Records end with *terminator*, if
    given (see the module's description of torn records).
    """

    current: Segment

    def __init__(
        self,
        path: str,
        *,
        segment_bytes: int,
        max_files: int,
        mode: int = 0o640,
        terminator: bytes | None = None,
    ) -> None:
        super().__init__(path, segment_bytes=segment_bytes, mode=mode, terminator=terminator)
        if max_files < 1:
            raise ValueError(f"segments {path}: max_files must be positive, got {max_files}")
        self.path = path
        """The current segment's path, and the stem of the others'."""
        self.max_files = max_files
        """How many files there may be, the current one included."""
        self.current = Segment(path)
        # Leftovers of a larger max_files start at PATH.{max_files}, as
        # rotations keep the files numbered 1, 2, ... without a hole. Only
        # then is the directory listed: it holds a fleet's logs (one per
        # instance, each opening them all), and listing it for every one
        # made opening a fleet's logs quadratic.
        if os.path.lexists(f"{path}.{max_files}"):
            for k in rotated_numbers(path):
                if k >= max_files:
                    try:
                        os.unlink(f"{path}.{k}")
                    except FileNotFoundError:
                        pass
        self.open()

    def rotate(self) -> None:
        """Finish the current segment and start an empty ``PATH``.

        Renames oldest first, so that at every step each file has a name
        (a reader following the files relies on it); with ``max_files=1``
        the current file is deleted. OSError if a rename fails; the writer
        goes on with whatever is at ``PATH`` then.
        """
        self._close_fd()
        try:
            if self.max_files == 1:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            # PATH.{max_files-2} replaces (drops) the oldest.
            for k in range(self.max_files - 1, 0, -1):
                src = self.path if k == 1 else f"{self.path}.{k - 1}"
                try:
                    os.replace(src, f"{self.path}.{k}")
                except FileNotFoundError:
                    pass
        finally:
            # Even if a rename failed: keep writing somewhere.
            self.current = Segment(self.path)
            self.open()

    def write_records(self, records: Iterable[bytes]) -> None:
        """Append *records* (each whole, terminator included), rotating between them.

        Records that fit in the current segment go with one write(2);
        when the next one does not fit, the segment is rotated first, so a
        batch that spans a rotation takes one write per file. Errors as
        :meth:`write` and :meth:`rotate`.
        """
        batch: list[bytes] = []
        used = self.current.size
        for record in records:
            if used > 0 and used + len(record) > self.segment_bytes:
                if batch:
                    self.write(b"".join(batch))
                    batch.clear()
                self.rotate()
                used = 0
            batch.append(record)
            used += len(record)
        if batch:
            self.write(batch[0] if len(batch) == 1 else b"".join(batch))


class SeqSegments(SegmentFiles[SS]):
    """``DIRECTORY/{first:020d}{suffix}``, each named by the seq of its first record.

    *max_bytes* bounds the total: when a segment is started, the oldest are
    deleted until the rest plus a full new one fit (the new one is never
    deleted). *segment_type* makes the :class:`SeqSegment` objects (a
    subclass keeps more per segment).

    Opening lists the segments (the directory must exist). The newest may
    end in a torn record: *scan*, given the newest segment, returns where
    its last whole record ends (0: none); the file is cut back to there, or
    deleted when nothing is left and the next newest scanned. Without
    *scan*, only empty newest segments are deleted. Then the oldest are
    deleted while the total is over *max_bytes* (it may have shrunk since the
    files were written). OSError, naming the file, if any of it fails.
    """

    def __init__(
        self,
        directory: str,
        *,
        suffix: str,
        segment_bytes: int,
        max_bytes: int,
        segment_type: type[SS],
        mode: int = 0o640,
        scan: Callable[[SS], int] | None = None,
        terminator: bytes | None = None,
    ) -> None:
        super().__init__(directory, segment_bytes=segment_bytes, mode=mode, terminator=terminator)
        if max_bytes < segment_bytes:
            raise ValueError(
                f"segments {directory}: need segment_bytes <= max_bytes, got "
                f"segment_bytes={segment_bytes}, max_bytes={max_bytes}"
            )
        self.directory = directory
        """The directory holding the segments (and possibly other files)."""
        self.suffix = suffix
        """What segment names end with, after the 20 digits."""
        self.max_bytes = max_bytes
        """The bound on the segments' total size."""
        self.segments: list[SS] = []
        """Every segment, oldest first; the last is :attr:`current`."""
        self.current = None
        self._segment_type = segment_type
        self._recover(scan)

    def path_of(self, first: int) -> str:
        """The path of the segment whose first record is *first*."""
        return os.path.join(self.directory, f"{first:020d}{self.suffix}")

    def rotate(self, first: int) -> None:
        """Finish the current segment (if any) and start one for the record *first*.

        *first* must be above every seq written so far. The new file is
        created on the first write to it. OSError, naming the file, if
        deleting an old segment fails: the new segment is started all the
        same, and the old one kept (a later rotation tries again).
        """
        self._close_fd()
        seg = self._segment_type(self.path_of(first), first)
        self.segments.append(seg)
        self.current = seg
        # Room for the new segment to grow to segment_bytes without the total
        # passing max_bytes.
        total = sum(s.size for s in self.segments[:-1]) + self.segment_bytes
        while len(self.segments) > 1 and total > self.max_bytes:
            old = self.segments[0]
            try:
                os.unlink(old.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, old.path) from exc
            del self.segments[0]
            total -= old.size

    def _recover(self, scan: Callable[[SS], int] | None) -> None:
        name = re.compile(r"(\d{20})" + re.escape(self.suffix))
        firsts = sorted(int(m[1]) for n in os.listdir(self.directory) if (m := name.fullmatch(n)))
        for first in firsts:
            path = self.path_of(first)
            self.segments.append(self._segment_type(path, first, os.stat(path).st_size))
        # The newest segment may end in a torn record, or be empty (a crash
        # right after rotating): cut it back to its last whole record, and
        # drop it if nothing is left.
        while self.segments:
            seg = self.segments[-1]
            end = seg.size if scan is None else scan(seg)
            if end > 0:
                if end < seg.size:
                    os.truncate(seg.path, end)
                    seg.size = end
                break
            os.unlink(seg.path)
            self.segments.pop()
        total = sum(s.size for s in self.segments)
        while len(self.segments) > 1 and total > self.max_bytes:
            old = self.segments.pop(0)
            total -= old.size
            os.unlink(old.path)
        self.current = self.segments[-1] if self.segments else None
