"""Small helpers shared by the tests (not fixtures)."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from supervisor import Runtime, SandboxExit, SandboxSpec

T = TypeVar("T")


def run_capture(runtime: Runtime, spec: SandboxSpec) -> tuple[SandboxExit, str, str]:
    """Run a sandbox to its end; return how it ended and its stdout, stderr."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        open("/dev/null", "rb") as null,
    ):
        with runtime.create(spec, stdio=(null.fileno(), out.fileno(), err.fileno())) as sb:
            result = sb.wait()
        out.seek(0)
        err.seek(0)
        return result, out.read().decode(), err.read().decode()


def wait_for(
    cond: Callable[[], T],
    timeout: float = 10.0,
    what: str = "condition",
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll *cond* until it returns something true, or fail after *timeout*;
    *detail*, if given, says what the failure message adds (a log, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(0.01)


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* (``"1m"``) mounted at *path* (made if missing) for the
    block, and unmounted after it."""
    path.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "corral-test", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill_up(directory: Path, name: str = "filler") -> Path:
    """Take every free block of *directory*'s file system with one file (its path).

    Other writers may free blocks a moment later (a failed write is cut
    back); calling this again takes those too.
    """
    filler = directory / name
    chunk = bytes(64 << 10)
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)  # a short write when the disk is nearly full
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler


def user_xattrs_work(directory: Path) -> bool:
    """Whether the file system of *directory* takes ``user.*`` attributes
    (tmpfs does only from Linux 6.6: the VM lanes' state directories)."""
    import os

    probe = directory / ".user-xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.corral-probe", b"1")
        return True
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        return False
    finally:
        probe.unlink()


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo ARGS`` (checked) where it leaves nothing on the host: as
    root it keeps a blob-info cache in ``/var/lib/containers/cache``, which no
    flag moves, so it runs in a mount namespace of its own with an empty
    tmpfs on ``/var/lib`` (which it needs nothing else of)."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount -t tmpfs corral-test /var/lib && exec skopeo "$@"', "skopeo", *args],
        check=True, capture_output=True, timeout=timeout,
    )  # fmt: skip


def reap_answerers(timeout: float = 30.0) -> list[int]:
    """Reap the ``sysinfo`` answerers a killed ``corral run`` left to this
    process (a subreaper): each ends once its sandbox has (POLLHUP on its
    listener). Their PIDs."""
    import select

    from supervisor._runtime._linux._sysinfo import ANSWERER_NAME

    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1 : data.rindex(b")")]
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        if comm == ANSWERER_NAME and ppid == me:
            found.append(int(entry))
    for pid in found:
        pidfd = os.pidfd_open(pid)
        try:
            assert select.select([pidfd], [], [], timeout)[0], f"answerer {pid} did not end"
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        finally:
            os.close(pidfd)
    return found


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for *proc* to end; the rest of its stdout and its stderr.

    For a process whose stdout was read line by line (``readline``):
    ``communicate()`` reads the descriptor itself and skips what the reader
    holds already, read ahead (whole lines, or one without its newline: a
    Python child with ``PYTHONUNBUFFERED`` writes a line and its newline in
    two writes). Killed, and TimeoutExpired, if it does not end in time.
    """
    assert proc.stdout is not None and proc.stderr is not None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        rest = pool.submit(proc.stdout.read)
        err = pool.submit(proc.stderr.read)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # ours: the reads end
            raise
        out = rest.result(), err.result()
    proc.stdout.close()
    proc.stderr.close()
    return out


def up_under_limit(env: dict[str, str], fleet: Path, nofile: int) -> subprocess.Popen[str]:
    """``corral up --json FLEET`` under an open-file limit of *nofile*
    (soft and hard), its events on its stdout."""
    import sys

    return subprocess.Popen(
        ["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "supervisor", "up",
         "--json", str(fleet)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def read_started(proc: subprocess.Popen[str], count: int) -> set[str]:
    """Read *proc*'s events (``corral up --json``) until *count* sandboxes
    have started; none may have failed to."""
    import json

    assert proc.stdout is not None
    started: set[str] = set()
    while len(started) < count:
        line = proc.stdout.readline()
        assert line, f"corral up ended: {proc.communicate()[1][-2000:]}"
        rec = json.loads(line)
        assert rec["event"] != "start_failed", rec
        if rec["event"] == "started":
            started.add(rec["sandbox"])
    return started
