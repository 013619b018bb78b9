"""What ``/proc`` says about a process: the parts that make its identity.

A PID alone is never an identity: it is reused once its process has been
reaped. The pair (PID, start time) is: the start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot) of a reused PID differs.
"""

from __future__ import annotations

import os

__all__ = ["parent_pid", "starttime"]


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
