"""Sandboxes that die with the process that made them, and the sweep of
what a dead one left.

A ``corral run`` holds its sandbox itself: no supervisor, no keeper. Its
sandbox's init gets SIGKILL as its parent-death signal (see
``_child._die_with``), so a ``corral run`` killed by SIGKILL takes its
sandbox with it, but it cannot remove what it made (cgroup, writable
layer, record). For that it holds a *claim* from before the first thing
is made until the last is removed: ``RUN_DIR/claims/NAME.json``, locked
with ``flock``. The kernel drops the lock when the process dies, however
it dies, and never mistakes another process for it (a PID could be
reused). Whoever takes the lock of a claim that still exists knows its
maker is dead and sweeps what the claim names.

The claim's content, written under the lock before anything is made,
says where to look: the state directory and the cgroup parent of the
runtime that made it (the sweeper's may differ).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CLAIMS", "Claim", "ClaimInUse", "dead_claims"]

CLAIMS = "claims"
"""The folder of the claims, in the run directory."""


class ClaimInUse(Exception):
    """A live process holds the claim of that name."""


class Claim:
    """The claim on sandbox *name* of this process: taken (locked, with
    *where* written in it) by the constructor, dropped by :meth:`release`."""

    def __init__(self, run_dir: str, name: str, where: dict[str, Any]) -> None:
        folder = os.path.join(run_dir, CLAIMS)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.path = os.path.join(folder, f"{name}.json")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ClaimInUse(name) from None
            except BaseException:
                os.close(fd)
                raise
            # A sweeper may have removed the file between our open and our
            # lock: a lock on a removed file holds nothing; take a new one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(where).encode())
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the claim (everything it named is gone) and unlock it."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def _locked_if_dead(path: str) -> Iterator[dict[str, Any] | None]:
    """Lock claim *path* if its maker is dead; yield what it says (None if
    it is held by a live process or gone); remove it if the body succeeds."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        if not _same_file(fd, path):
            yield None  # swept by another process meanwhile
            return
        try:
            where = json.loads(os.read(fd, 65536) or b"{}")
        except ValueError:
            where = {}  # killed before writing it: nothing was made yet
        yield where if isinstance(where, dict) else {}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def dead_claims(run_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The claims in *run_dir* whose makers are dead, as (name, where),
    each locked while the caller removes what it names, and removed after
    (unless the caller raises)."""
    folder = os.path.join(run_dir, CLAIMS)
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.endswith(".json"):
            continue
        with _locked_if_dead(os.path.join(folder, entry)) as where:
            if where is not None:
                yield entry[: -len(".json")], where
