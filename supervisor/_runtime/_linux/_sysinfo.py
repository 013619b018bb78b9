"""Answering ``sysinfo(2)`` for a sandbox (docs/view.md).

lxcfs gives a sandbox its own ``/proc/meminfo``, but a program that asks
the kernel (busybox's ``free`` and ``uptime``, glibc's
``sysconf(_SC_PHYS_PAGES)``) would still see the host. So every process
started in a sandbox with the view loads, besides its seccomp filter, a
tiny one of its own (:data:`NOTIFY_FILTER`): ``sysinfo`` returns
``SECCOMP_RET_USER_NOTIF``, everything else ``SECCOMP_RET_ALLOW``. The
kernel runs every filter and takes the action of highest precedence, so
the main filter's KILL and ERRNO still win and its ALLOW loses to the
notification. The filter's *listener* goes up the report socket to the
spawner, which gives it to the process that answers (:class:`Answerer`):
the keeper (see :mod:`._keeper`), or for a direct spawn a forked answerer
of its own (:func:`fork_answerer`).

An answer: receive the notification, compute a ``struct sysinfo`` from
the sandbox's cgroup (read live: ``corral update --memory`` shows at
once), check the notification is still valid (its task may have died and
its memory belong to another), write the struct at the task's pointer
with ``process_vm_writev``, check again, then answer 0 (or EFAULT if the
pointer was bad). A task that died meanwhile is no error: its notification
is gone (ENOENT).

Standard library only, and nothing here blocks on one sandbox: the
keeper's one loop answers every sandbox and forks new ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import time

from ._cbpf import (
    AUDIT_ARCH_X86_64,
    JEQ_K,
    LD_W_ABS,
    RET_K,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    insn,
)

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from .._tuples import NamedTuple

__all__ = [
    "ANSWERER_NAME",
    "NOTIFY_FILTER",
    "Answerer",
    "Context",
    "fork_answerer",
    "supported",
]

_NR_SYSINFO = 99  # x86_64; an x32 call has bit 30 set, so it is not this


NOTIFY_FILTER = b"".join(
    (
        insn(LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),  # another arch: allow
        insn(LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        insn(JEQ_K, 0, 1, _NR_SYSINFO),
        insn(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    )
)
"""The filter whose listener answers ``sysinfo`` (x86_64 calls only: a
32-bit or x32 program's ``sysinfo`` is the kernel's, the host's numbers).
Found by its exact bytes in a checkpoint (see :mod:`.._checkpoint`)."""

ALLOW_ALL_FILTER = insn(RET_K, 0, 0, SECCOMP_RET_ALLOW) + NOTIFY_FILTER[8:]
""":data:`NOTIFY_FILTER` with its first instruction ``RET ALLOW``: the
same length, and it never notifies (what a restored sandbox gets)."""


def supported() -> bool:
    """True where :data:`NOTIFY_FILTER` means what it says (x86_64)."""
    return os.uname().machine == "x86_64"


class Context(NamedTuple):
    """What an answer is computed from: plain data (it crosses to the keeper)."""

    cgroups: list[str]
    """The sandbox's cgroup directories (one on v2, one per hierarchy on v1)."""
    start: int
    """The start time of the sandbox's init, in clock ticks since boot
    (``/proc/PID/stat``): ``uptime`` counts from there."""


# <linux/seccomp.h>: _IOWR('!', 0, struct seccomp_notif) and so on.
def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_NOTIF_SIZE = 80  # u64 id, u32 pid, u32 flags, struct seccomp_data (64)
_RESP_SIZE = 24  # u64 id, s64 val, s32 error, u32 flags
_IOCTL_RECV = _ioc(3, 0, _NOTIF_SIZE)
_IOCTL_SEND = _ioc(3, 1, _RESP_SIZE)
_IOCTL_ID_VALID = _ioc(1, 2, 8)


class _Sysinfo(ctypes.Structure):
    """``struct sysinfo`` (x86_64: 112 bytes)."""

    _fields_ = [
        ("uptime", ctypes.c_long),
        ("loads", ctypes.c_ulong * 3),
        ("totalram", ctypes.c_ulong),
        ("freeram", ctypes.c_ulong),
        ("sharedram", ctypes.c_ulong),
        ("bufferram", ctypes.c_ulong),
        ("totalswap", ctypes.c_ulong),
        ("freeswap", ctypes.c_ulong),
        ("procs", ctypes.c_ushort),
        ("pad", ctypes.c_ushort),
        ("totalhigh", ctypes.c_ulong),
        ("freehigh", ctypes.c_ulong),
        ("mem_unit", ctypes.c_uint),
        ("_f", ctypes.c_char * 4),
    ]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_writev.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_NAME = 15
ANSWERER_NAME = b"corral-sysinfo"
"""The command name (``comm``) of a forked answerer (:func:`fork_answerer`)."""
_UNLIMITED = 1 << 62  # v1 says "no limit" as a page-rounded LONG_MAX


def _read(path: str) -> bytes:
    """A cgroup file's bytes (empty if it cannot be read). Plain ``os``
    calls: Python's text files cost twice as much, once per file per call."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _number(path: str) -> int | None:
    """The number in a cgroup file; None if absent or ``max``."""
    text = _read(path).strip()
    if not text.isdigit():
        return None
    n = int(text)
    return None if n >= _UNLIMITED else n


def _stat(path: str, *keys: bytes) -> int:
    """The first of *keys* in a ``memory.stat`` (0 if none)."""
    found: dict[bytes, int] = {}
    for line in _read(path).splitlines():
        name, _, value = line.partition(b" ")
        if name in keys and value.strip().isdigit():
            found[name] = int(value)
    return next((found[k] for k in keys if k in found), 0)


class _Sandbox:
    """One sandbox's cgroup files, found once; read at every answer."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.memory = self.pids = ""
        self.v2 = False
        for d in ctx.cgroups:
            if not self.memory and os.path.exists(f"{d}/memory.max"):
                self.memory, self.v2 = d, True
            elif not self.memory and os.path.exists(f"{d}/memory.limit_in_bytes"):
                self.memory = d
            if not self.pids and os.path.exists(f"{d}/pids.current"):
                self.pids = d

    def answer(self) -> _Sysinfo:
        info = _Sysinfo()
        if _libc.sysinfo(ctypes.byref(info)) != 0:
            raise OSError(ctypes.get_errno(), "sysinfo")
        unit = info.mem_unit or 1
        host_ram, host_free = info.totalram * unit, info.freeram * unit
        host_swap, host_free_swap = info.totalswap * unit, info.freeswap * unit
        total, free = host_ram, host_free
        shared, swap, free_swap = info.sharedram * unit, host_swap, host_free_swap
        m = self.memory
        if m:
            if self.v2:
                limit = _number(f"{m}/memory.max")
                usage = _number(f"{m}/memory.current")
                swap_limit = _number(f"{m}/memory.swap.max")
                swap_usage = _number(f"{m}/memory.swap.current") or 0
                shared = _stat(f"{m}/memory.stat", b"shmem")
            else:
                limit = _number(f"{m}/memory.limit_in_bytes")
                usage = _number(f"{m}/memory.usage_in_bytes")
                memsw = _number(f"{m}/memory.memsw.limit_in_bytes")
                # v1 counts memory and swap together: the swap is the rest.
                swap_limit = None if memsw is None or limit is None else max(memsw - limit, 0)
                sw_usage = _number(f"{m}/memory.memsw.usage_in_bytes")
                swap_usage = max((sw_usage or 0) - (usage or 0), 0)
                shared = _stat(f"{m}/memory.stat", b"total_shmem", b"shmem")
            if limit is not None:
                total = min(limit, host_ram)
                # As lxcfs's MemFree: what the limit leaves.
                free = max(total - (usage or 0), 0)
            if swap_limit is not None:
                swap = min(swap_limit, host_swap)
                free_swap = max(swap - swap_usage, 0)
            else:
                # No limit of its own: the host's swap, less what it uses.
                free_swap = min(host_free_swap, max(host_swap - swap_usage, 0))
        procs = _number(f"{self.pids}/pids.current") if self.pids else None
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        uptime = now - self.ctx.start / _TICKS
        # The kernel rounds a started second up; so do we.
        info.uptime = max(int(uptime) + (1 if uptime % 1 else 0), 0)
        info.totalram, info.freeram, info.sharedram, info.bufferram = total, free, shared, 0
        info.totalswap, info.freeswap = swap, free_swap
        info.procs = min(procs if procs is not None else info.procs, 0xFFFF)
        info.totalhigh = info.freehigh = 0
        info.mem_unit = 1  # the host's loads are kept (docs/view.md says why)
        return info


class Answerer:
    """The listeners of some sandboxes' filters, and their answers.

    A poll loop registers :meth:`fds`; on an event for one of them it
    calls :meth:`serve`. A listener whose filter has no task left (the
    sandbox or the exec ended) polls POLLHUP and is dropped.
    """

    def __init__(self) -> None:
        self.listeners: dict[int, tuple[str, Context, _Sandbox]] = {}
        """Descriptor -> (key, context, its files)."""

    def add(self, key: str, fd: int, ctx: Context) -> None:
        """Answer for the listener *fd* (ours from now on) of *key*."""
        self.listeners[fd] = (key, ctx, _Sandbox(ctx))

    def drop(self, fd: int) -> None:
        """Stop answering on *fd*, and close it."""
        if self.listeners.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close every listener (only where another copy is held: else the
        sandboxes' ``sysinfo`` fails with ENOSYS from now on)."""
        for fd in list(self.listeners):
            self.drop(fd)

    def serve(self, fd: int, events: int) -> bool:
        """Answer what is waiting on *fd* (*events* as ``poll`` gave them);
        False if it is done with (its tasks are gone): the caller takes it
        out of its poll set and drops it (:meth:`drop`)."""
        if events & select.POLLIN:
            return self._answer_one(fd)
        return not events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)

    def _answer_one(self, fd: int) -> bool:
        entry = self.listeners.get(fd)
        if entry is None:
            return False
        notif = bytearray(_NOTIF_SIZE)  # the kernel wants it zeroed
        try:
            fcntl.ioctl(fd, _IOCTL_RECV, notif, True)
        except OSError as exc:
            # ENOENT: its task was interrupted (killed) before we got it.
            return exc.errno in (errno.ENOENT, errno.EINTR)
        ident, pid = struct.unpack_from("=QI", notif)
        (target,) = struct.unpack_from("=Q", notif, 16 + 16)  # seccomp_data.args[0]
        err = 0
        try:
            info = entry[2].answer()
        except OSError:
            info = None
            err = errno.EIO
        if info is not None:
            # Valid now: the PID is still the caller, so the write lands in
            # the caller's memory, not a newcomer's with a reused PID.
            if not _valid(fd, ident):
                return True
            size = ctypes.sizeof(info)
            local = _Iovec(ctypes.addressof(info), size)
            remote = _Iovec(target, size)
            if _libc.process_vm_writev(pid, local, 1, remote, 1, 0) != size:
                err = errno.EFAULT
            if not _valid(fd, ident):
                return True
        response = struct.pack("=QqiI", ident, 0, -err if err else 0, 0)
        with contextlib.suppress(OSError):  # ENOENT: it died meanwhile
            fcntl.ioctl(fd, _IOCTL_SEND, response)
        return True


def _valid(fd: int, ident: int) -> bool:
    try:
        fcntl.ioctl(fd, _IOCTL_ID_VALID, struct.pack("=Q", ident))
    except OSError:
        return False
    return True


def context_of(cgroup_procs: list[str], start: int) -> Context:
    """The context of a sandbox whose cgroup's ``cgroup.procs`` files are
    *cgroup_procs* and whose init started at *start*."""
    return Context([os.path.dirname(p) for p in cgroup_procs], start)


def pidfd_pid(pidfd: int) -> int:
    """The PID behind *pidfd* (``/proc/self/fdinfo``); -1 once it has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, f"descriptor {pidfd} is not a pidfd")


def fork_answerer(key: str, fd: int, ctx: Context) -> int:
    """Fork a process that answers on the listener *fd* until its tasks
    are gone; its PID. For a single-threaded caller (a direct spawn): the
    child runs this module's code only, never the caller's.

    The caller closes its own *fd* after this: the answerer must be the
    only holder, so that its death makes ``sysinfo`` fail (ENOSYS) rather
    than wait forever for an answer.
    """
    pid = os.fork()
    if pid != 0:
        return pid
    try:  # pragma: no cover - runs in the child
        # Out of the caller's session and signal handlers: a Ctrl-C meant
        # for `corral run` must not run its handler here, nor end us
        # before the sandbox (we end when it does).
        os.setsid()
        # Named for `ps` (and for whoever inherits it: a killed `corral
        # run` leaves it to the subreaper above, until its sandbox ends).
        _libc.prctl(_PR_SET_NAME, ANSWERER_NAME, 0, 0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGTSTP):
            signal.signal(sig, signal.SIG_IGN)
        # Nothing of the caller's: its pipes held here would keep a reader
        # waiting for their end of file.
        null = os.open("/dev/null", os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(null, n)
        os.closerange(3, fd)
        os.closerange(fd + 1, 1 << 20)
        answerer = Answerer()
        answerer.add(key, fd, ctx)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while answerer.listeners:
            for ready, events in poller.poll():
                if not answerer.serve(ready, events):
                    answerer.drop(ready)
        os._exit(0)
    except BaseException:  # pragma: no cover
        os._exit(1)


def restore_context(ctx: Any) -> Context:
    """A :class:`Context` from its plain-data form (``[cgroups, start]``)."""
    cgroups, start = ctx
    return Context([str(c) for c in cgroups], int(start))
