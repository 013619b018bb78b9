"""A full disk: the journal degrades and recovers, never corrupts, and stops nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from events.segments import SeqSegment, SeqSegments

from .conftest import requires_root
from .helpers import fill_up, small_tmpfs

pytestmark = requires_root


def test_a_torn_record_that_cannot_be_cut_off_is_never_appended_to(tmp_path: Path) -> None:
    """If cutting back a failed write fails too (an append-only file refuses
    ftruncate), nothing is written after the torn record until it is cut off,
    so the segment never holds a garbled record."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        files = SeqSegments(
            str(disk), suffix=".seg", segment_bytes=1 << 20, max_bytes=1 << 20,
            segment_type=SeqSegment,
        )  # fmt: skip
        try:
            files.rotate(1)
            files.write(b"a" * 100)
            path = files.path_of(1)
            subprocess.run(["chattr", "+a", path], check=True)
            try:
                filler = fill_up(disk)
                with pytest.raises(OSError, match="No space left"):
                    files.write(b"b" * 20_000)  # part of it fits in the last block
                torn = os.stat(path).st_size
                assert torn > 100  # the part that fitted: it could not be cut off
                filler.unlink()
                with pytest.raises(OSError, match="Operation not permitted"):
                    files.write(b"c" * 10)  # refused: it would follow the torn record
                assert os.stat(path).st_size == torn
            finally:
                subprocess.run(["chattr", "-a", path], check=True)
            files.write(b"c" * 10)
            with open(path, "rb") as f:
                assert f.read() == b"a" * 100 + b"c" * 10
        finally:
            files.close()
