"""Rotated segment files (events.segments): writing, rotating, naming, pruning, recovery."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from events.segments import NumberedSegments, SeqSegment, SeqSegments, rotated_numbers


def names(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def lines(path: Path) -> list[bytes]:
    """The records of a numbered log, oldest file first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [line for f in [*files, path] for line in f.read_bytes().splitlines()]


@pytest.fixture
def umask0() -> Iterator[None]:
    """Let file modes through unmasked, so that a test sees exactly the mode asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the write(2) calls made from now on."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return sizes


def failing_write(monkeypatch: pytest.MonkeyPatch, take: int) -> None:
    """Make write(2) take *take* bytes, then fail with ENOSPC."""
    real = os.write
    calls = [0]

    def write(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] == 1 and take:
            return real(fd, bytes(data)[:take])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)


# --- NumberedSegments ----------------------------------------------------------


def test_numbered_creates_the_current_file_with_its_mode(tmp_path: Path, umask0: None) -> None:
    """Opening creates PATH (empty) with the mode asked for."""
    path = tmp_path / "out.log"
    with_mode = NumberedSegments(str(path), segment_bytes=100, max_files=3, mode=0o600)
    assert names(tmp_path) == ["out.log"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with_mode.close()
    other = tmp_path / "events.jsonl"
    NumberedSegments(str(other), segment_bytes=100, max_files=3).close()
    assert stat.S_IMODE(other.stat().st_mode) == 0o640  # the default


def test_numbered_rotates_between_records_and_keeps_max_files(tmp_path: Path) -> None:
    """Files stay within segment_bytes, at most max_files of them, the newest records kept."""
    path = tmp_path / "out.log"
    files = NumberedSegments(str(path), segment_bytes=100, max_files=3, terminator=b"\n")
    for i in range(100):
        files.write_records([b"record %03d\n" % i])  # 11 bytes: 9 per file
    files.close()
    assert names(tmp_path) == ["out.log", "out.log.1", "out.log.2"]
    assert all(0 < (tmp_path / n).stat().st_size <= 100 for n in names(tmp_path))
    got = lines(path)
    assert got == [b"record %03d" % i for i in range(100 - len(got), 100)]
    assert len(got) == 9 + 9 + 100 % 9


def test_numbered_one_write_per_file_touched(tmp_path: Path, count_writes: list[int]) -> None:
    """A batch goes with one write(2), or one per file when it spans a rotation."""
    path = tmp_path / "out.log"
    with_files = NumberedSegments(str(path), segment_bytes=50, max_files=5)
    with_files.write_records([b"0123456789"] * 4)
    assert count_writes == [40]
    with_files.write_records([b"0123456789"] * 4)  # 10 fit, 30 go to a new file
    assert count_writes == [40, 10, 30]
    with_files.close()
    assert [os.path.getsize(f"{path}{s}") for s in ("", ".1")] == [30, 50]


def test_numbered_oversized_record_gets_a_file_of_its_own(tmp_path: Path) -> None:
    """A record larger than segment_bytes is written whole, alone in its file."""
    path = tmp_path / "out.log"
    files = NumberedSegments(str(path), segment_bytes=10, max_files=5)
    files.write_records([b"ab", b"x" * 30, b"cd"])
    files.close()
    assert [(path.parent / n).read_bytes() for n in ("out.log.2", "out.log.1", "out.log")] == [
        b"ab",
        b"x" * 30,
        b"cd",
    ]


def test_numbered_single_file_is_replaced(tmp_path: Path) -> None:
    """With max_files=1 a full file is deleted and a new one started."""
    path = tmp_path / "out.log"
    files = NumberedSegments(str(path), segment_bytes=10, max_files=1)
    for i in range(7):
        files.write_records([b"%04d" % i])
    files.close()
    assert names(tmp_path) == ["out.log"]
    assert path.read_bytes() == b"0006"


def test_numbered_open_removes_files_beyond_max_files(tmp_path: Path) -> None:
    """Files PATH.k with k >= max_files (an earlier, larger max_files) are deleted."""
    path = tmp_path / "out.log"
    for k in (1, 2, 3, 7):
        Path(f"{path}.{k}").write_bytes(b"old\n")
    (tmp_path / "out.log.x").write_bytes(b"not ours\n")
    NumberedSegments(str(path), segment_bytes=100, max_files=3).close()
    assert names(tmp_path) == ["out.log", "out.log.1", "out.log.2", "out.log.x"]
    assert rotated_numbers(str(path)) == [1, 2]


def test_numbered_reopen_appends_and_counts_what_is_there(tmp_path: Path) -> None:
    """An existing file is appended to; its size counts towards the bound."""
    path = tmp_path / "out.log"
    path.write_bytes(b"x" * 8)
    files = NumberedSegments(str(path), segment_bytes=10, max_files=2)
    assert files.current.size == 8
    files.write_records([b"12"])
    files.write_records([b"3"])
    files.close()
    assert path.read_bytes() == b"3"
    assert Path(f"{path}.1").read_bytes() == b"x" * 8 + b"12"


def test_a_torn_record_is_ended_before_the_next(tmp_path: Path) -> None:
    """With a terminator, a file not ending with it gets it before the next record."""
    path = tmp_path / "out.log"
    path.write_bytes(b"whole\ntorn by a cra")
    files = NumberedSegments(str(path), segment_bytes=100, max_files=2, terminator=b"\n")
    files.write_records([b"next\n"])
    files.write_records([b"and more\n"])
    files.close()
    assert path.read_bytes() == b"whole\ntorn by a cra\nnext\nand more\n"


def test_without_a_terminator_nothing_is_added(tmp_path: Path) -> None:
    """Records without a terminator are appended as they are."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"abc")
    files = NumberedSegments(str(path), segment_bytes=100, max_files=2)
    files.write_records([b"def"])
    files.close()
    assert path.read_bytes() == b"abcdef"


def test_a_failed_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way leaves the file as it was; the error names the file."""
    path = tmp_path / "out.log"
    files = NumberedSegments(str(path), segment_bytes=100, max_files=2, terminator=b"\n")
    files.write_records([b"one\n"])
    with monkeypatch.context() as m:
        failing_write(m, take=3)
        with pytest.raises(OSError, match="No space left") as info:
            files.write_records([b"two\n", b"three\n"])
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path)
    assert path.read_bytes() == b"one\n"
    assert files.current.size == 4
    files.write_records([b"four\n"])
    files.close()
    assert path.read_bytes() == b"one\nfour\n"


def test_a_failed_write_that_cannot_be_cut_back_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the cut fails too, the torn record stays and is ended before the next."""
    path = tmp_path / "out.log"
    files = NumberedSegments(str(path), segment_bytes=100, max_files=2, terminator=b"\n")
    with monkeypatch.context() as m:
        failing_write(m, take=3)

        def ftruncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        m.setattr(os, "ftruncate", ftruncate)
        with pytest.raises(OSError, match="No space left"):
            files.write_records([b"two\n"])
    assert files.current.size == 3
    files.write_records([b"four\n"])
    files.close()
    assert path.read_bytes() == b"two\nfour\n"


def test_closed_segments_refuse_writes(tmp_path: Path) -> None:
    """Writing after close is a ValueError; closing twice is harmless."""
    files = NumberedSegments(str(tmp_path / "out.log"), segment_bytes=100, max_files=2)
    files.close()
    files.close()
    with pytest.raises(ValueError, match=r"out\.log: closed"):
        files.write_records([b"x"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: NumberedSegments(d + "/f", segment_bytes=0, max_files=1), "segment_bytes"),
        (lambda d: NumberedSegments(d + "/f", segment_bytes=1, max_files=0), "max_files"),
        (
            lambda d: NumberedSegments(d + "/f", segment_bytes=1, max_files=1, terminator=b""),
            "terminator",
        ),
        (
            lambda d: SeqSegments(
                d, suffix=".s", segment_bytes=10, max_bytes=9, segment_type=SeqSegment
            ),
            "segment_bytes <= max_bytes",
        ),
    ],
)
def test_bad_bounds_are_refused(
    tmp_path: Path, make: Callable[[str], object], message: str
) -> None:
    """Sizes and counts that cannot work are a ValueError naming the files."""
    with pytest.raises(ValueError, match=message):
        make(str(tmp_path))


# --- SeqSegments -----------------------------------------------------------------


def seq(d: Path, **kw: object) -> SeqSegments[SeqSegment]:
    options: dict[str, object] = {"suffix": ".seg", "segment_bytes": 100, "max_bytes": 300}
    options.update(kw)
    return SeqSegments(str(d), segment_type=SeqSegment, **options)  # type: ignore[arg-type]


def append(files: SeqSegments[SeqSegment], first: int, record: bytes) -> None:
    """What the journal does: rotate when the record does not fit, then write it."""
    if files.needs_rotation(len(record)):
        files.rotate(first)
    files.write(record)


def test_seq_names_segments_by_their_first_record(tmp_path: Path) -> None:
    """Each segment is named by the 20-digit seq of its first record; created on first write."""
    files = seq(tmp_path)
    assert files.current is None and files.needs_rotation(1)
    files.rotate(1)
    assert names(tmp_path) == []  # not before the first write
    for i in range(1, 16):
        append(files, i, b"r" * 20)  # 5 records per segment
    files.close()
    assert names(tmp_path) == [
        "00000000000000000001.seg",
        "00000000000000000006.seg",
        "00000000000000000011.seg",
    ]
    assert [s.first for s in files.segments] == [1, 6, 11]
    assert [s.size for s in files.segments] == [100, 100, 100]


def test_seq_drops_the_oldest_to_stay_within_max_bytes(tmp_path: Path) -> None:
    """Starting a segment deletes the oldest until the rest and a full new one fit."""
    files = seq(tmp_path, segment_bytes=100, max_bytes=250)
    for i in range(1, 41):
        append(files, i, b"r" * 30)  # 3 records per segment
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
        assert on_disk <= 250
    files.close()
    # 90 bytes a segment: one full one and a new one fit in 250 bytes.
    assert [s.first for s in files.segments] == [37, 40]
    assert names(tmp_path) == [f"{f:020d}.seg" for f in (37, 40)]


def test_seq_never_drops_the_current_segment(tmp_path: Path) -> None:
    """A record larger than max_bytes still gets its segment."""
    files = seq(tmp_path, segment_bytes=10, max_bytes=10)
    append(files, 1, b"a" * 5)
    append(files, 2, b"b" * 50)
    files.close()
    assert [s.first for s in files.segments] == [2]
    assert names(tmp_path) == [f"{2:020d}.seg"]


def test_seq_recovery_cuts_a_torn_tail_and_drops_empty_segments(tmp_path: Path) -> None:
    """scan says where the last whole record ends: the newest is cut there or dropped."""
    for first, data in [(1, b"aaaa"), (3, b"bbbb"), (5, b"cc+torn"), (7, b"garbage")]:
        (tmp_path / f"{first:020d}.seg").write_bytes(data)
    (tmp_path / "unrelated").write_bytes(b"kept")

    def scan(seg: SeqSegment) -> int:
        # Records are two letters; anything else ends what is whole.
        data = Path(seg.path).read_bytes()
        end = 0
        while end + 2 <= len(data) and data[end : end + 2].isalpha() and data[end] == data[end + 1]:
            end += 2
        return end

    files = SeqSegments(
        str(tmp_path),
        suffix=".seg",
        segment_bytes=10,
        max_bytes=100,
        segment_type=SeqSegment,
        scan=scan,
    )
    assert [(s.first, s.size) for s in files.segments] == [(1, 4), (3, 4), (5, 2)]
    assert files.current is files.segments[-1]
    assert (tmp_path / f"{5:020d}.seg").read_bytes() == b"cc"
    assert "unrelated" in names(tmp_path)
    files.write(b"dd")
    files.close()
    assert (tmp_path / f"{5:020d}.seg").read_bytes() == b"ccdd"


def test_seq_recovery_drops_the_oldest_when_max_bytes_shrank(tmp_path: Path) -> None:
    """Reopened with a smaller max_bytes, the oldest segments go (never the newest)."""
    for first in (1, 11, 21, 31):
        (tmp_path / f"{first:020d}.seg").write_bytes(b"x" * 100)
    files = seq(tmp_path, segment_bytes=100, max_bytes=250)
    assert [s.first for s in files.segments] == [21, 31]
    files.close()
    assert names(tmp_path) == [f"{f:020d}.seg" for f in (21, 31)]


def test_needs_rotation_counts_pending_bytes(tmp_path: Path) -> None:
    """Bytes the caller buffers for the segment count; an empty segment takes any record."""
    files = seq(tmp_path, segment_bytes=100, max_bytes=300)
    files.rotate(1)
    assert not files.needs_rotation(500)  # empty: takes anything
    assert not files.needs_rotation(40, pending=60)
    assert files.needs_rotation(41, pending=60)
    files.write(b"x" * 60)
    assert not files.needs_rotation(40)
    assert files.needs_rotation(41)
    files.close()


def test_seq_failed_write_leaves_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a terminator too, a failed write is cut back to the last whole record."""
    files = seq(tmp_path)
    append(files, 1, b"aa")
    with monkeypatch.context() as m:
        failing_write(m, take=1)
        with pytest.raises(OSError, match="No space left"):
            append(files, 2, b"bb")
    append(files, 3, b"cc")
    files.close()
    assert (tmp_path / f"{1:020d}.seg").read_bytes() == b"aacc"


def test_rotated_numbers_lists_only_numbered_siblings(tmp_path: Path) -> None:
    """Only PATH.<digits> count, in numeric order."""
    for name in ("log", "log.10", "log.2", "log.x", "log.1.gz", "logx.3", "other.4"):
        (tmp_path / name).write_bytes(b"")
    assert rotated_numbers(str(tmp_path / "log")) == [2, 10]
