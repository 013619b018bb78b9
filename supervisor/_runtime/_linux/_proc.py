"""What ``/proc`` says about a process: the parts that make its identity.

A PID alone is never an identity: it is reused once its process has been
reaped. The pair (PID, start time) is: the start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot) of a reused PID differs.
"""

from __future__ import annotations

import os

__all__ = ["parent_pid", "starttime", "zombie_status"]


def _fields(pid: int, proc: int | None = None) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 on).

    *proc*, if given, is a descriptor of the ``/proc`` to read (one opened
    before joining another mount namespace, whose /proc shows other PIDs).
    """
    if proc is None:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    else:
        fd = os.open(f"{pid}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    # The command name (field 2) is in parentheses and may hold spaces and
    # parentheses itself: the fields proper start after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def starttime(pid: int, proc: int | None = None) -> int:
    """The start time of process *pid* (also of a zombie); raises OSError if there is none.

    *proc*: see :func:`_fields`.
    """
    return int(_fields(pid, proc)[19])


def parent_pid(pid: int, proc: int | None = None) -> int:
    """The PID of *pid*'s parent; raises OSError if there is no such process.

    *proc*: see :func:`_fields`.
    """
    return int(_fields(pid, proc)[1])


_CAP_SYS_PTRACE = 19


def _may_read_exit_codes() -> bool:
    """Whether this process sees other users' exit codes in ``/proc``: the
    kernel shows them only to who may ptrace-read the process (else 0)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


_readable: bool | None = None


def zombie_status(pid: int, start: int) -> int | None:
    """The wait status (as ``waitpid`` gives it) of process *pid*, started
    at *start*, if it has exited and is not reaped yet; None otherwise, or
    if this process may not read it.

    Field 52 of ``/proc/PID/stat`` (Linux 3.5+): whoever the parent is,
    the status is known from the moment the process is a zombie, which is
    when its pidfd polls readable, without asking the parent.
    """
    global _readable
    if _readable is None:
        _readable = _may_read_exit_codes()
    if not _readable:
        return None
    try:
        fields = _fields(pid)
        if fields[0] != b"Z" or int(fields[19]) != start:
            return None  # running, or reaped (the PID may be another's now)
        return int(fields[49])
    except (OSError, ValueError, IndexError):
        return None
