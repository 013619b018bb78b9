"""Where a live sandbox's record lives, and when a leftover is a crash's.

A sandbox is recorded in ``RUN_DIR/sandboxes/NAME.json`` (its init's PID
and cgroup) once it is created; what is made for it before that (its
directories, a user-namespace id claim) has no record for a few
milliseconds. One rule says when such a thing is a crash's leftover, for
every kind of leftover: no record, and older than :data:`STALE_AFTER`.
(A user-namespace id claim must also have lost the process that made it:
a range is worse to share than a directory to reuse; see :mod:`._userns`.)
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["STALE_AFTER", "abandoned", "record_path", "write_atomic"]

STALE_AFTER = 60.0
"""Seconds after which something made for a sandbox that still has no
record is taken for a crash's leftover (creation writes the record within
milliseconds; a minute leaves room for a loaded host)."""


def record_path(run_dir: str, name: str) -> str:
    """The record of sandbox *name* (``RUN_DIR/sandboxes/NAME.json``)."""
    return os.path.join(run_dir, "sandboxes", f"{name}.json")


def abandoned(path: str, record: str) -> bool:
    """True if *path*, made while a sandbox was being created, is a crash's
    leftover: the sandbox has no *record* and *path* is older than
    :data:`STALE_AFTER` (or *path* is gone already)."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return True
    return age > STALE_AFTER and not os.path.exists(record)


def write_atomic(path: str, text: str) -> None:
    """Write *path* whole or not at all (a temporary file renamed over it):
    a reader, or a successor after a crash, sees the old content or the
    new, never half of it. An OSError names *path*, whichever step failed
    (a full disk fails the write, which names nothing). Not synced."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise
