"""One cgroup interface, two backends: cgroup v1 and the unified v2 hierarchy.

:func:`open_cgroups` looks at the cgroup file systems mounted below a root
path (``/sys/fs/cgroup`` by default, any path in tests) and returns the
backend that fits: a pure ``cgroup2`` mount gives :class:`V2Cgroups`; v1
controller hierarchies (the legacy and the *hybrid* layouts) give
:class:`V1Cgroups`. Both create sandbox cgroups *below the caller's own
cgroup* unless a parent is given, the way systemd delegation expects.

Errors are :class:`~supervisor.CgroupError` naming the path and operation.
A limit this layout (or this host) cannot enforce is refused by
:meth:`Cgroups.check` with a :class:`~supervisor.SpecError` naming the key
and the reason, never silently ignored.

Limit keys and their files:

===============  ==============================  ====================================
key              v2                              v1
===============  ==============================  ====================================
memory           memory.max                      memory.limit_in_bytes
memory_swap      memory.swap.max                 memory.memsw.limit_in_bytes (sum)
memory_high      memory.high                     memory.soft_limit_in_bytes
cpus             cpu.max                         cpu.cfs_quota_us / cfs_period_us
cpu_weight       cpu.weight                      cpu.shares (weight * 1024 / 100)
pids             pids.max                        pids.max
cpuset_*         cpuset.cpus / cpuset.mems       cpuset.cpus / cpuset.mems
io_weight        io.weight                       blkio.weight (CFQ) / blkio.bfq.weight
io_*_bps, iops   io.max                          blkio.throttle.*_device
oom_group        memory.oom.group                (refused)
===============  ==============================  ====================================
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence

from ..._errors import CgroupError, SpecError
from .._limits import (
    DEFAULT_WEIGHT,
    DEVICE_KEYS,
    STALL_WINDOW_US,
    Limits,
    cpu_shares,
    format_list,
    parse_list,
)
from ._devices import DEVICE_RULES, attach_device_program, attached_device_programs, v1_lines

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Literal, NamedTuple
else:
    from .._tuples import NamedTuple

__all__ = [
    "Cgroup",
    "CgroupStats",
    "Cgroups",
    "PressureWatch",
    "V1Cgroups",
    "V2Cgroups",
    "open_cgroups",
]

CPU_PERIOD_US = 100_000
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "devices", "blkio", "cpuset")
_V1_REQUIRED = ("memory", "cpu", "cpuacct", "pids")
_V1_OPTIONAL = ("blkio", "cpuset")
"""Hierarchies a sandbox's cgroup may lack: blkio where it is not mounted
(or the sandbox was made by an older corral), cpuset unless its limits
name CPUs or memory nodes (a v1 cpuset cgroup needs its sets copied down
from the parent before anything joins: not worth it for every sandbox)."""
_V2_CONTROLLERS = ("memory", "cpu", "pids")
_V2_OPTIONAL = ("io", "cpuset")
"""Enabled for sandbox cgroups where the parent has them; limits that need
one the parent lacks are refused."""
_FRESH = Limits(memory_swap=None)
"""What a new cgroup enforces (swap included: unlimited until told)."""
_IO_MAX_KEYS = {
    "io_read_bps": "rbps",
    "io_write_bps": "wbps",
    "io_read_iops": "riops",
    "io_write_iops": "wiops",
}
_BLKIO_FILES = {
    "io_read_bps": "blkio.throttle.read_bps_device",
    "io_write_bps": "blkio.throttle.write_bps_device",
    "io_read_iops": "blkio.throttle.read_iops_device",
    "io_write_iops": "blkio.throttle.write_iops_device",
}
_IO_KEYS = ("io_weight", *DEVICE_KEYS)

ALLOWED_DEVICES = v1_lines(DEVICE_RULES)
"""The cgroup v1 device policy of a sandbox (``devices.allow`` lines after
``devices.deny a``), from the one table both layouts use
(:data:`~._devices.DEVICE_RULES`): the standard character devices and ptys."""


class CgroupStats(NamedTuple):
    """Counters of one sandbox cgroup, read at one moment."""

    cpu_usage_ns: int
    memory_current: int
    memory_peak: int | None
    """Highest memory use seen; ``None`` where the kernel does not track it."""
    pids_current: int
    pids_limit_hits: int
    """How many times a fork failed because of the pids limit."""
    memory_limit_hits: int
    """How many times memory use ran into the limit (v1 failcnt, v2 ``max``)."""
    oom_kill: int
    """How many processes the OOM killer killed in this cgroup."""


class Cgroup(ABC):
    """One sandbox's cgroup (in each v1 hierarchy, or the one v2 directory)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The directory name, unique on the host."""

    @property
    @abstractmethod
    def paths(self) -> tuple[str, ...]:
        """The cgroup's directories (several on v1, one on v2)."""

    @abstractmethod
    def procs_files(self) -> tuple[str, ...]:
        """Files a single-threaded process writes ``0`` to in order to join."""

    @abstractmethod
    def apply(self, limits: Limits, old: Limits | None = None) -> None:
        """Enforce *limits*.

        A new cgroup (*old* None) is given what differs from a new cgroup's
        defaults; a live one only what differs from *old* (its limits
        until now), a key back at its default being reset. Raises
        :class:`SpecError` for a key this cgroup cannot enforce and
        :class:`CgroupError` (naming the key) if the kernel refuses a value.
        """

    @abstractmethod
    def stats(self) -> CgroupStats:
        """Read the counters now."""

    @abstractmethod
    def memory_current(self) -> int:
        """The memory in use now (bytes): one file, where :meth:`stats`
        reads seven (``ps`` of 10,000 sandboxes wants only this)."""

    @abstractmethod
    def pids(self) -> list[int]:
        """The processes in the cgroup (host PIDs)."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in the cgroup, without racing new forks."""

    @abstractmethod
    def remove(self) -> None:
        """Remove the cgroup; kills what is left in it first."""

    @abstractmethod
    def open_oom_watch(self) -> OomWatch:
        """A pollable descriptor that wakes when the cgroup's OOM counters change."""

    @abstractmethod
    def open_pressure_watch(self, limits: Limits) -> PressureWatch:
        """A :class:`PressureWatch` for this cgroup under *limits* (the
        marks it watches for are ``memory_high`` and ``memory_stall``)."""

    def lacks_device_policy(self) -> bool:
        """True where this cgroup should hold the device policy and does
        not: on cgroup v2, no device program attached to it (a sandbox made
        by a corral older than the program, adopted now). On v1 the
        ``devices`` files are the cgroup's own and came with it: False."""
        return False

    @abstractmethod
    def restrict_devices(self) -> None:
        """Allow the sandbox only the device nodes of
        :data:`~._devices.DEVICE_RULES`: making any node, opening only the
        standard character devices and ptys. Call it while the cgroup is
        still empty; a privileged sandbox gets no policy.

        cgroup v1: its ``devices`` controller, ``devices.deny a`` then
        :data:`ALLOWED_DEVICES`. cgroup v2: a ``BPF_PROG_TYPE_CGROUP_DEVICE``
        program built from the same table and attached to the cgroup
        (:mod:`._devices`); the attachment outlives corral's process.
        Raises :class:`CgroupError` if the kernel does not let us: a
        sandbox must not run without its policy.
        """

    @property
    @abstractmethod
    def freezer_dir(self) -> str:
        """The directory whose freezer file freezes the cgroup (CRIU's ``--freeze-cgroup``)."""

    @abstractmethod
    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every process of the cgroup; return once the kernel reports
        them frozen. Raises :class:`CgroupError` (after thawing) on timeout."""

    @abstractmethod
    def thaw(self) -> None:
        """Let the cgroup's processes run again."""

    @abstractmethod
    def is_frozen(self) -> bool:
        """True if the cgroup is frozen, or being frozen (its freezer says so)."""

    @abstractmethod
    def relative_paths(self) -> dict[str, str]:
        """The cgroup's path below each hierarchy's root, keyed by the
        hierarchy's controllers (``"memory"``, ``"cpu,cpuacct"``; ``""`` on v2)."""


class OomWatch(ABC):
    """Wakes up (``fd`` readable) when the kernel's OOM handling ran in a cgroup.

    No polling: the descriptor polls readable when ``memory.events``
    changes (v2, see :class:`_Notified`) or is an eventfd registered on
    ``memory.oom_control`` (v1). After a wake-up, :meth:`read` drains it
    and returns the counters, which are what count: a notification says
    only that something changed.
    """

    fd: int
    pressure: dict[str, int]
    """Counters of memory pressure that come with the OOM counters, as of
    the last :meth:`read`: v2's ``high`` and ``max`` (see
    :class:`PressureWatch`); none on v1."""

    @abstractmethod
    def read(self) -> tuple[int, int]:
        """Drain the descriptor; return (OOM events, OOM kills) so far."""

    def close(self) -> None:
        """Release the descriptor(s). Call before the cgroup is removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PressureWatch(ABC):
    """Wakes (one of ``fds`` readable) when a cgroup's memory comes under pressure.

    No polling, as for :class:`OomWatch`; what each layout can say:

    - ``high``: usage went over ``memory_high`` (v2: the ``high`` counter
      of ``memory.events``, the kernel throttling the sandbox; v1: a
      threshold notification on ``memory.usage_in_bytes`` at that size);
    - ``max``: usage reached the memory limit and the kernel reclaimed to
      make room (v2's ``max`` counter; v1 has no notification for it);
      v2's two counters come through :attr:`OomWatch.pressure`, as they
      share ``memory.events`` with the OOM counters;
    - ``stall``: tasks waited for memory longer than ``memory_stall`` in a
      second (a PSI trigger on v2's ``memory.pressure``).

    After a wake-up, :meth:`read` of that descriptor drains it and says
    which levels were reached, and how many times, since the last read.
    """

    fds: tuple[int, ...] = ()

    @abstractmethod
    def read(self, fd: int) -> dict[str, int]:
        """Drain *fd*; the levels it reports reached (level: times), maybe none."""

    @abstractmethod
    def usage(self) -> int:
        """Bytes of memory the cgroup uses now."""

    @abstractmethod
    def marks(self) -> tuple[int | None, int | None]:
        """The memory limit and ``memory_high`` the kernel holds now (None:
        none): read back, since during a change the kernel has the new
        values before the supervisor's books do, and its signals follow them."""

    @abstractmethod
    def close(self) -> None:
        """Release the descriptors. Call before the cgroup is removed."""


class Cgroups(ABC):
    """A cgroup backend: where and how sandbox cgroups are made."""

    layout: Literal["v1", "v2"]

    @abstractmethod
    def check(self, limits: Limits) -> None:
        """Raise :class:`SpecError` (naming the key and the reason) if this
        layout, below this parent, cannot enforce *limits*."""

    @abstractmethod
    def create(self, name: str, limits: Limits) -> Cgroup:
        """Make a new cgroup for a sandbox, limits checked and applied; fails if it exists."""

    @abstractmethod
    def existing(self, prefix: str) -> dict[str, Cgroup]:
        """The cgroups below the parent whose names start with *prefix*, by name."""

    @abstractmethod
    def paths_of(self, name: str, limits: Limits) -> tuple[str, ...]:
        """The :attr:`Cgroup.paths` that :meth:`create` of *name* with *limits* makes."""

    @abstractmethod
    def attach(self, name: str, paths: Sequence[str]) -> Cgroup:
        """The existing cgroup *name* at *paths* (its :attr:`Cgroup.paths`,
        as recorded when it was made); raises :class:`CgroupError` if it is
        gone or does not belong to this layout."""


# -- small file helpers ------------------------------------------------------


def _write(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"failed to write {value!r} to {path}: {exc.strerror}") from exc


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise CgroupError(f"failed to read {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _setting(key: str) -> Iterator[None]:
    """Name the limit key in a write the kernel refused."""
    try:
        yield
    except CgroupError as exc:
        raise CgroupError(f"{key}: {exc}") from exc


def _changes(limits: Limits, old: Limits | None) -> tuple[Limits, set[str], bool]:
    """(what was enforced before, the keys that changed, whether the swap
    limit changed) for :meth:`Cgroup.apply`."""
    before = old if old is not None else _FRESH
    return before, set(limits.changed(before)), limits.swap_limit != before.swap_limit


def _cpuset_subset(limits: Limits, parent_cpus: str, parent_mems: str) -> None:
    """Refuse CPUs or memory nodes the parent cgroup does not have."""
    for key, value, have, what in (
        ("cpuset_cpus", limits.cpuset_cpus, parent_cpus, "CPUs"),
        ("cpuset_mems", limits.cpuset_mems, parent_mems, "memory nodes"),
    ):
        if value is None or not have.strip():
            continue
        allowed = parse_list(have.strip(), key, what)
        if not parse_list(value, key, what) <= allowed:
            raise SpecError(
                key,
                f"expected {what} of the parent cgroup ({format_list(allowed)}), got {value!r}",
            )


def _read_int(path: str, default: int = 0) -> int:
    text = _read(path).strip()
    return default if text in ("", "max") else int(text)


def _keyed(path: str) -> dict[str, int]:
    """Parse ``key value`` lines (memory.events, cpu.stat, pids.events, ...)."""
    return _parse_keyed(_read(path))


def _parse_keyed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, val = line.partition(" ")
        if val.strip().lstrip("-").isdigit():
            out[key] = int(val)
    return out


def _pids_in(path: str) -> list[int]:
    return [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError as exc:
        # An empty one is a leftover of a crash (ours, or the host's): take
        # it over. One with processes belongs to a live sandbox.
        try:
            if not _pids_in(path):
                os.rmdir(path)
                os.mkdir(path)
                return
        except (OSError, CgroupError):
            pass
        raise CgroupError(
            f"cgroup {path} already exists and has processes"
            " (a sandbox of the same name run by another corral?)"
        ) from exc
    except OSError as exc:
        raise CgroupError(f"failed to create cgroup {path}: {exc.strerror}") from exc


def _has_processes(paths: Iterable[str]) -> bool:
    """Whether a process is left in one of a cgroup's *paths*; False if
    that cannot be read (no descriptor left: a fleet at its open-file
    limit). The removal then tells, needing none: an ``rmdir`` refuses a
    cgroup with processes (EBUSY), and succeeds on an empty one."""
    try:
        return any(os.path.isdir(p) and _pids_in(p) for p in paths)
    except CgroupError:
        return False


def _rmdir(path: str, kill: Iterable[str] = ()) -> None:
    """Remove a cgroup directory, waiting out tasks that are still exiting.

    After a sandbox's init is reaped its other processes are already gone
    (the kernel empties a PID namespace before its init's exit completes),
    but the cgroup may still count them for a moment; EBUSY then clears by
    itself. Anything really left is killed first by the caller.
    """
    deadline = time.monotonic() + 5.0
    delay = 0.0002
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"failed to remove cgroup {path}: {exc.strerror}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _mountinfo(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount."""
    out = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4].replace("\\040", " ")
            fields = right.split()
            out.append((mnt, fields[0], fields[2] if len(fields) > 2 else ""))
    return out


def _self_cgroups(path: str = "/proc/self/cgroup") -> dict[str, str]:
    """Map each v1 controller (and ``""`` for v2) to our own cgroup path."""
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            _, ctrls, cg = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(","):
                out[c] = cg
    return out


def _freeze_and_kill(path: str, freezer: str | None) -> None:
    """Kill every process in a v1 cgroup (or a v2 one without cgroup.kill).

    Frozen tasks cannot fork, so the list of PIDs read while frozen is
    complete; SIGKILL is delivered when they are thawed. Both files are
    opened once, before the freeze, and read and written in place: the
    thaw needs no new descriptor, so it cannot fail for want of one (a
    fleet at its open-file limit) and leave the cgroup frozen for ever.
    """
    procs = _open(os.path.join(path, "cgroup.procs"), os.O_RDONLY)
    try:
        if freezer is not None:
            state_path = os.path.join(freezer, "freezer.state")
            state = _open(state_path, os.O_RDWR)
            try:
                _freeze_fd(state, state_path)
                try:
                    _kill_pids(_pids_from(procs, path))
                finally:
                    _rewrite(state, b"THAWED", state_path)
            finally:
                os.close(state)
        for _ in range(100):
            pids = _pids_from(procs, path)
            if not pids:
                return
            _kill_pids(pids)
            time.sleep(0.001)
    finally:
        os.close(procs)


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"failed to open {path}: {exc.strerror}") from exc


def _freeze_fd(state: int, path: str) -> None:
    """Freeze through *state*, ``freezer.state`` (*path*) open, and wait (up
    to 2 s) for FROZEN: v1 says nothing when FREEZING ends."""
    _rewrite(state, b"FROZEN", path)
    deadline = time.monotonic() + 2.0
    while os.pread(state, 64, 0).strip() != b"FROZEN":
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)


def _rewrite(fd: int, value: bytes, path: str) -> None:
    """Write *value* to *fd*, cgroup file *path* open."""
    try:
        os.pwrite(fd, value, 0)
    except OSError as exc:
        raise CgroupError(f"failed to write {value.decode()!r} to {path}: {exc.strerror}") from exc


def _pids_from(procs: int, path: str) -> list[int]:
    """The PIDs in the open ``cgroup.procs`` *procs* (of *path*), read from its start."""
    chunks: list[bytes] = []
    offset = 0
    try:
        while True:
            chunk = os.pread(procs, 65536, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise CgroupError(f"failed to read {path}/cgroup.procs: {exc.strerror}") from exc
    return [int(p) for p in b"".join(chunks).split()]


# -- OOM watches -------------------------------------------------------------


def _v1_event(memdir: str, file: str, args: str = "") -> int:
    """A new eventfd the kernel signals for *file* of the v1 memory cgroup
    *memdir* (``cgroup.event_control``: ``EVENTFD FD ARGS``); the caller's."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _write(os.path.join(memdir, "cgroup.event_control"), f"{efd} {fd}{args}")
        finally:
            os.close(fd)
    except BaseException:
        os.close(efd)
        raise
    return efd


class _V1OomWatch(OomWatch):
    """cgroup v1: an eventfd registered through ``cgroup.event_control``.

    The eventfd counts OOM notifications (it also fires once when the cgroup
    is removed, which is why the watch is closed before removal). The
    ``oom_kill`` line of ``memory.oom_control`` tells a kill from a near miss.
    """

    def __init__(self, memdir: str) -> None:
        self._file = os.path.join(memdir, "memory.oom_control")
        self.pressure = {}
        self._ooms = 0
        self._kills = 0
        self.fd = _v1_event(memdir, self._file)
        self.read()

    def read(self) -> tuple[int, int]:
        try:
            self._ooms += os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        try:
            self._kills = _keyed(self._file).get("oom_kill", self._kills)
        except CgroupError:
            pass  # the cgroup is gone: keep the last counters
        return self._ooms, self._kills


class _Notified:
    """A cgroup v2 file the kernel notifies about (``memory.events``,
    ``cgroup.events``), open, with a descriptor (``fd``) that polls readable
    exactly when the file changed since it was last read.

    Not inotify: each inotify watch costs an inotify instance, of which a
    user has ``fs.inotify.max_user_instances`` (128 by default), and a
    supervisor of more sandboxes than that could not watch them. The
    kernel wakes pollers of the file itself with POLLPRI (and notes, per
    open file, which change was last read); the file always polls readable,
    so it sits in an epoll set of its own, registered for EPOLLPRI, as a
    PSI trigger does (:class:`_V2PressureWatch`). Reading it through
    :meth:`text` marks the change seen.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cannot watch {path}: {exc.strerror}") from exc
        try:
            self._epoll = select.epoll()
            self._epoll.register(self._file, select.EPOLLPRI)
        except BaseException:
            os.close(self._file)
            raise
        self.fd = self._epoll.fileno()

    def text(self) -> str:
        """The file's content now (and the change marked seen)."""
        try:
            return os.pread(self._file, 4096, 0).decode()
        except OSError as exc:
            raise CgroupError(f"failed to read {self.path}: {exc.strerror}") from exc

    def keyed(self) -> dict[str, int]:
        return _parse_keyed(self.text())

    def close(self) -> None:
        if self._file >= 0:
            self._epoll.close()
            os.close(self._file)
            self._file = -1
            self.fd = -1


class _V2OomWatch(OomWatch):
    """cgroup v2: ``memory.events``, watched as a :class:`_Notified` file.

    ``oom_kill`` is the counter that matters: ``oom`` can stay put when a
    parent with the same limit is the one whose OOM killer ran.
    """

    def __init__(self, path: str) -> None:
        self._events = _Notified(os.path.join(path, "memory.events"))
        self.fd = self._events.fd
        self._last = (0, 0)
        self.pressure = {}

    def read(self) -> tuple[int, int]:
        try:
            ev = self._events.keyed()
            self._last = (ev.get("oom", 0), ev.get("oom_kill", 0))
            self.pressure = {"high": ev.get("high", 0), "max": ev.get("max", 0)}
        except CgroupError:
            pass
        return self._last

    def close(self) -> None:
        self._events.close()
        self.fd = -1


# -- pressure watches ----------------------------------------------------------


def _v1_bytes(path: str) -> int | None:
    """A v1 memory limit file: None for unlimited (the page-rounded maximum)."""
    value = _read_int(path)
    return None if value >= 1 << 62 else value


class _V1PressureWatch(PressureWatch):
    """cgroup v1: an eventfd registered through ``cgroup.event_control`` on
    ``memory.usage_in_bytes`` with ``memory_high`` as the threshold.
    Without ``memory_high`` there is nothing to watch.

    The kernel signals each crossing, both ways, and the eventfd counts
    them. Usage read after the wake-up cannot tell which way: a crossing
    up by a short-lived process (``dd``'s buffer) is often below the mark
    again by then. So the watch keeps the side of the mark it is on and
    counts: from below, any signal means it went over (maybe and back);
    from above, it takes two."""

    def __init__(self, memdir: str, high: int | None) -> None:
        self._usage = os.path.join(memdir, "memory.usage_in_bytes")
        self._fd = -1
        self._above = False
        if high is None:
            return
        self._fd = _v1_event(memdir, self._usage, f" {high}")
        try:
            self._above = self.usage() >= high
        except BaseException:
            self.close()
            raise
        self.fds = (self._fd,)

    def read(self, fd: int) -> dict[str, int]:
        try:
            crossings = os.eventfd_read(self._fd)
        except BlockingIOError:
            return {}
        went_over = crossings >= (2 if self._above else 1)
        self._above ^= crossings % 2 == 1
        return {"high": 1} if went_over else {}

    def usage(self) -> int:
        return _read_int(self._usage)

    def marks(self) -> tuple[int | None, int | None]:
        memdir = os.path.dirname(self._usage)
        return (
            _v1_bytes(os.path.join(memdir, "memory.limit_in_bytes")),
            _v1_bytes(os.path.join(memdir, "memory.soft_limit_in_bytes")),
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.fds = ()


class _V2PressureWatch(PressureWatch):
    """cgroup v2: with *stall_us*, a PSI trigger on ``memory.pressure``.
    (The ``high`` and ``max`` counters are in ``memory.events``, which the
    :class:`_V2OomWatch` already watches: it reports them, so that a
    sandbox watches the file once.)

    A PSI trigger signals with POLLPRI while always polling readable, and
    trio waits for readability only: the trigger sits in an epoll set of
    its own, registered for EPOLLPRI, whose descriptor is readable exactly
    when the trigger fired (polling it consumes the trigger's event)."""

    def __init__(self, path: str, stall_us: int | None) -> None:
        self._current = os.path.join(path, "memory.current")
        self._psi = -1
        self._epoll: select.epoll | None = None
        if stall_us is None:
            return
        try:
            self._psi = os.open(
                os.path.join(path, "memory.pressure"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            )
            os.write(self._psi, f"some {stall_us} {STALL_WINDOW_US}".encode())
            self._epoll = select.epoll()
            self._epoll.register(self._psi, select.EPOLLPRI)
        except OSError as exc:
            self.close()
            raise CgroupError(f"cannot watch the memory stalls of {path}: {exc.strerror}") from exc
        except BaseException:
            self.close()
            raise
        self.fds = (self._epoll.fileno(),)

    def read(self, fd: int) -> dict[str, int]:
        if self._epoll is None:
            return {}
        self._epoll.poll(0)  # whatever is left of the wake-up
        return {"stall": 1}

    def usage(self) -> int:
        return _read_int(self._current)

    def marks(self) -> tuple[int | None, int | None]:
        path = os.path.dirname(self._current)
        limit = _read(os.path.join(path, "memory.max")).strip()
        high = _read(os.path.join(path, "memory.high")).strip()
        return (None if limit == "max" else int(limit), None if high == "max" else int(high))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._psi >= 0:
            os.close(self._psi)
            self._psi = -1
        self.fds = ()


# -- cgroup v1 ---------------------------------------------------------------

_V1_NO_OOM_GROUP = (
    "cgroup v1 has no memory.oom.group: its OOM killer kills one process at a time"
    " (this host's cgroups are v1; oom_group needs cgroup v2)"
)
_V1_NO_PSI = (
    "cgroup v1 has no per-cgroup pressure stall information (memory.pressure is"
    " cgroup v2's); memory_high's threshold still raises memory_pressure events"
)
_V1_NO_MEMSW = (
    "this kernel does not account swap (no memory.memsw.limit_in_bytes: booted with"
    " swapaccount=0?), so swap cannot be limited to a size: use 0 or unlimited"
)
_V1_WEIGHT_RANGE = (
    "expected at most 1000 on cgroup v1 (its BFQ and CFQ weights go up to 1000), got {value}"
)
_V1_NO_WEIGHT = (
    "cgroup v1 has neither blkio.weight (CFQ) nor blkio.bfq.weight (BFQ) here:"
    " no I/O scheduler of this kernel takes weights"
)


def _write_v1_limit(path: str, limit: int) -> None:
    """Write a v1 memory limit: the kernel refuses one below what it cannot
    reclaim (EBUSY) instead of OOM-killing, as v2 does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(limit).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise SpecError(
                "memory",
                "cgroup v1 cannot set a limit below what the sandbox uses and the kernel"
                " cannot reclaim (it said: busy); v1 never OOM-kills to get there",
            ) from None
        raise CgroupError(f"failed to write {limit!r} to {path}: {exc.strerror}") from exc


def _inherit_cpuset(parent: str, child: str) -> None:
    """Give a new v1 cpuset cgroup its parent's CPUs and memory nodes:
    it starts with none, and nothing can join it until it has some."""
    for file, effective in (
        ("cpuset.cpus", "cpuset.effective_cpus"),
        ("cpuset.mems", "cpuset.effective_mems"),
    ):
        value = _read(os.path.join(parent, file)).strip()
        if not value:
            value = _read(os.path.join(parent, effective)).strip()
        _write(os.path.join(child, file), value)


def _max(value: int | None) -> str:
    return "max" if value is None else str(value)


def _rate_changes(
    old: Iterable[tuple[str, int]], new: dict[str, int]
) -> list[tuple[str, int | None]]:
    """The devices whose rate changed: (device, new rate or None: no limit)."""
    before = dict(old)
    out: list[tuple[str, int | None]] = [(d, None) for d in before if d not in new]
    out += [(d, r) for d, r in new.items() if before.get(d) != r]
    return sorted(out)


class V1Cgroup(Cgroup):
    """A sandbox cgroup on cgroup v1: one directory per controller hierarchy."""

    def __init__(
        self, name: str, dirs: dict[str, str], mounts: dict[str, str] | None = None
    ) -> None:
        self._name = name
        self._dirs = dirs  # controller -> directory
        self._mounts = mounts or {}  # controller -> hierarchy mount point
        self._paths = tuple(dict.fromkeys(dirs.values()))

    @property
    def name(self) -> str:
        return self._name

    @property
    def paths(self) -> tuple[str, ...]:
        return self._paths

    def procs_files(self) -> tuple[str, ...]:
        # "tasks", not "cgroup.procs": writing "0" (the calling thread) to
        # it skips the global cgroup_threadgroup_rwsem, whose write side
        # waits for an RCU grace period: measured here 0.5 ms against 6-13
        # ms per join. The joining spawn process is single-threaded, so
        # moving its one thread moves the whole process.
        return tuple(os.path.join(p, "tasks") for p in self._paths)

    def _f(self, controller: str, file: str) -> str:
        return os.path.join(self._dirs[controller], file)

    def restrict_devices(self) -> None:
        if "devices" not in self._dirs:
            return  # no devices hierarchy mounted: nothing to enforce with
        _write(self._f("devices", "devices.deny"), "a")
        for rule in ALLOWED_DEVICES:
            _write(self._f("devices", "devices.allow"), rule)

    def apply(self, limits: Limits, old: Limits | None = None) -> None:
        before, changed, swap_changed = _changes(limits, old)
        if "oom_group" in changed and limits.oom_group:
            raise SpecError("oom_group", _V1_NO_OOM_GROUP)
        if "memory" in changed or swap_changed:
            with _setting("memory"):
                self._apply_memory(limits, swap_changed)
        if "memory_high" in changed:
            soft = limits.memory_high if limits.memory_high is not None else -1
            with _setting("memory_high"):
                _write(self._f("memory", "memory.soft_limit_in_bytes"), str(soft))
        if "cpus" in changed:
            quota = round(limits.cpus * CPU_PERIOD_US) if limits.cpus is not None else -1
            with _setting("cpus"):
                _write(self._f("cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                _write(self._f("cpu", "cpu.cfs_quota_us"), str(quota))
        if "cpu_weight" in changed:
            with _setting("cpu_weight"):
                _write(self._f("cpu", "cpu.shares"), str(cpu_shares(limits.cpu_weight)))
        if "pids" in changed:
            with _setting("pids"):
                _write(self._f("pids", "pids.max"), _max(limits.pids))
        for key, file in (("cpuset_cpus", "cpuset.cpus"), ("cpuset_mems", "cpuset.mems")):
            if key in changed:
                value = getattr(limits, key)
                if "cpuset" not in self._dirs:
                    raise SpecError(key, "this sandbox has no cpuset cgroup (cgroup v1)")
                if value is None:  # the parent's again
                    value = _read(os.path.join(os.path.dirname(self._dirs["cpuset"]), file))
                with _setting(key):
                    _write(self._f("cpuset", file), value.strip())
        if changed & set(_IO_KEYS) and "blkio" not in self._dirs:
            key = sorted(changed & set(_IO_KEYS))[0]
            raise SpecError(
                key,
                "this sandbox has no blkio cgroup (blkio is not mounted, or it was"
                " started by an older corral): restart it to set I/O limits",
            )
        if "io_weight" in changed:
            self._apply_io_weight(limits.io_weight)
        for key in DEVICE_KEYS:
            if key in changed:
                now = dict(getattr(limits, key))
                for device, rate in _rate_changes(getattr(before, key), now):
                    with _setting(key):
                        # 0 removes the device's rule.
                        _write(self._f("blkio", _BLKIO_FILES[key]), f"{device} {rate or 0}")

    def _apply_memory(self, limits: Limits, swap_changed: bool) -> None:
        limit_file = self._f("memory", "memory.limit_in_bytes")
        memsw = self._f("memory", "memory.memsw.limit_in_bytes")
        limit = limits.memory if limits.memory is not None else -1
        swap = limits.swap_limit
        if not os.path.exists(memsw):
            # No swap accounting (swapaccount=0): swap cannot be limited,
            # only kept away with swappiness.
            if swap not in (0, None):
                raise SpecError("memory_swap", _V1_NO_MEMSW)
            _write_v1_limit(limit_file, limit)
            if swap_changed:
                # 0: keep the kernel from swapping this cgroup out, so an
                # overrun is an OOM kill and not a hog that survives in swap
                # (what the seed observed). Unlimited: as its parent does.
                parent = os.path.join(os.path.dirname(self._dirs["memory"]), "memory.swappiness")
                value = "0" if swap == 0 else _read(parent).strip()
                _write(self._f("memory", "memory.swappiness"), value)
            return
        total = -1 if limits.memory is None or swap is None else limits.memory + swap
        # The kernel keeps limit <= memsw at every step: raise memsw first
        # when the limit grows past it, else lower (or set) the limit first.
        current = _read_int(memsw, -1)
        if limit < 0 or (current >= 0 and limit > current):
            _write(memsw, str(total))
            _write_v1_limit(limit_file, limit)
        else:
            _write_v1_limit(limit_file, limit)
            _write(memsw, str(total))

    def _apply_io_weight(self, weight: int | None) -> None:
        value = DEFAULT_WEIGHT if weight is None else weight
        cfq, bfq = self._f("blkio", "blkio.weight"), self._f("blkio", "blkio.bfq.weight")
        if value > 1000:
            raise SpecError("io_weight", _V1_WEIGHT_RANGE.format(value=value))
        if os.path.exists(cfq):
            if value < 10:
                raise SpecError(
                    "io_weight", f"CFQ's blkio.weight goes from 10 to 1000, got {value}"
                )
            target = cfq
        elif os.path.exists(bfq):
            target = bfq
        else:
            raise SpecError("io_weight", _V1_NO_WEIGHT)
        with _setting("io_weight"):
            _write(target, str(value))

    def memory_current(self) -> int:
        return _read_int(self._f("memory", "memory.usage_in_bytes"))

    def stats(self) -> CgroupStats:
        oom_control = _keyed(self._f("memory", "memory.oom_control"))
        return CgroupStats(
            cpu_usage_ns=_read_int(self._f("cpuacct", "cpuacct.usage")),
            memory_current=_read_int(self._f("memory", "memory.usage_in_bytes")),
            memory_peak=_read_int(self._f("memory", "memory.max_usage_in_bytes")),
            pids_current=_read_int(self._f("pids", "pids.current")),
            pids_limit_hits=_keyed(self._f("pids", "pids.events")).get("max", 0),
            memory_limit_hits=_read_int(self._f("memory", "memory.failcnt")),
            oom_kill=oom_control.get("oom_kill", 0),
        )

    def pids(self) -> list[int]:
        return _pids_in(self._dirs["memory"])

    def kill(self) -> None:
        _freeze_and_kill(self._dirs["memory"], self._dirs.get("freezer"))

    def open_oom_watch(self) -> OomWatch:
        return _V1OomWatch(self._dirs["memory"])

    def open_pressure_watch(self, limits: Limits) -> PressureWatch:
        return _V1PressureWatch(self._dirs["memory"], limits.memory_high)

    @property
    def freezer_dir(self) -> str:
        try:
            return self._dirs["freezer"]
        except KeyError:
            raise CgroupError("cgroup v1: the freezer controller is not mounted") from None

    def freeze(self, timeout: float = 10.0) -> None:
        # v1 has no notification for FREEZING -> FROZEN; the state file is
        # re-read (and the write repeated, which retries stuck tasks).
        state = os.path.join(self.freezer_dir, "freezer.state")
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            _write(state, "FROZEN")
            if _read(state).strip() == "FROZEN":
                return
            if time.monotonic() > deadline:
                self.thaw()
                raise CgroupError(f"{self._name}: not frozen after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def thaw(self) -> None:
        _write(os.path.join(self.freezer_dir, "freezer.state"), "THAWED")

    def is_frozen(self) -> bool:
        return _read(os.path.join(self.freezer_dir, "freezer.state")).strip() != "THAWED"

    def relative_paths(self) -> dict[str, str]:
        by_dir: dict[str, list[str]] = {}
        for c, d in self._dirs.items():
            by_dir.setdefault(d, []).append(c)
        out = {}
        for d, ctrls in by_dir.items():
            mount = self._mounts.get(ctrls[0])
            if mount is None:
                continue
            out[",".join(ctrls)] = "/" + os.path.relpath(d, mount).lstrip("./")
        return out

    def remove(self) -> None:
        if _has_processes(self._paths):
            self.kill()
        errors: list[CgroupError] = []
        for p in self._paths:
            try:
                _rmdir(p)
            except CgroupError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


class V1Cgroups(Cgroups):
    """cgroup v1 (legacy or hybrid layout): one hierarchy per controller group."""

    layout: Literal["v1", "v2"] = "v1"

    def __init__(
        self,
        mounts: dict[str, str],
        own: dict[str, str],
        parent: str | None = None,
    ) -> None:
        missing = [c for c in _V1_REQUIRED if c not in mounts]
        if missing:
            raise CgroupError(
                f"cgroup v1: controller(s) {', '.join(missing)} not mounted under the cgroup root"
            )
        self._mounts = mounts
        # The parent in each hierarchy: the given one, or where we run now.
        self._parents = {
            c: os.path.join(m, (parent if parent is not None else own.get(c, "/")).lstrip("/"))
            for c, m in mounts.items()
        }
        for c, p in list(self._parents.items()):
            if not os.path.isdir(p):
                if c in _V1_OPTIONAL:
                    del self._parents[c]  # limits that need it are refused
                    continue
                raise CgroupError(f"cgroup parent {p} (controller {c}) does not exist")

    def check(self, limits: Limits) -> None:
        if limits.oom_group:
            raise SpecError("oom_group", _V1_NO_OOM_GROUP)
        if limits.memory_stall is not None:
            raise SpecError("memory_stall", _V1_NO_PSI)
        if limits.cpuset_cpus is not None or limits.cpuset_mems is not None:
            key = "cpuset_cpus" if limits.cpuset_cpus is not None else "cpuset_mems"
            parent = self._parents.get("cpuset")
            if parent is None:
                raise SpecError(key, "the cpuset controller is not mounted (cgroup v1)")
            _cpuset_subset(
                limits,
                _read(os.path.join(parent, "cpuset.effective_cpus")),
                _read(os.path.join(parent, "cpuset.effective_mems")),
            )
        io = [k for k in _IO_KEYS if getattr(limits, k) != Limits._field_defaults[k]]
        if io:
            blkio = self._parents.get("blkio")
            if blkio is None:
                raise SpecError(io[0], "the blkio controller is not mounted (cgroup v1)")
            if limits.io_weight is not None:
                if limits.io_weight > 1000:
                    raise SpecError("io_weight", _V1_WEIGHT_RANGE.format(value=limits.io_weight))
                # A child gets blkio.bfq.weight where BFQ is there, which its
                # statistics files in the parent show.
                files = ("blkio.weight", "blkio.bfq.weight", "blkio.bfq.io_service_bytes")
                if not any(os.path.exists(os.path.join(blkio, f)) for f in files):
                    raise SpecError("io_weight", _V1_NO_WEIGHT)
        if limits.swap_limit not in (0, None):
            memsw = os.path.join(self._parents["memory"], "memory.memsw.limit_in_bytes")
            if not os.path.exists(memsw):
                raise SpecError("memory_swap", _V1_NO_MEMSW)

    def create(self, name: str, limits: Limits) -> V1Cgroup:
        self.check(limits)
        wanted = self._wanted(limits)
        dirs: dict[str, str] = {}
        made: list[str] = []
        try:
            for c, parent in wanted.items():
                d = os.path.join(parent, name)
                if d not in made:
                    _mkdir(d)
                    made.append(d)
                    if c == "cpuset":
                        _inherit_cpuset(parent, d)
                dirs[c] = d
            cg = V1Cgroup(name, dirs, self._mounts)
            cg.apply(limits)
            return cg
        except BaseException:
            for d in reversed(made):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise

    # -- cgroup v2 ---------------------------------------------------------------

    def existing(self, prefix: str) -> dict[str, Cgroup]:
        found: dict[str, dict[str, str]] = {}
        for c, parent in self._parents.items():
            with contextlib.suppress(OSError):
                for entry in os.listdir(parent):
                    if entry.startswith(prefix) and os.path.isdir(os.path.join(parent, entry)):
                        found.setdefault(entry, {})[c] = os.path.join(parent, entry)
        return {name: V1Cgroup(name, dirs, self._mounts) for name, dirs in found.items()}

    def paths_of(self, name: str, limits: Limits) -> tuple[str, ...]:
        dirs = {c: os.path.join(parent, name) for c, parent in self._wanted(limits).items()}
        return V1Cgroup(name, dirs, self._mounts).paths

    def _wanted(self, limits: Limits) -> dict[str, str]:
        """The hierarchies a sandbox with *limits* joins: their parents."""
        wanted = {c: p for c, p in self._parents.items() if c != "cpuset"}
        if limits.cpuset_cpus is not None or limits.cpuset_mems is not None:
            wanted["cpuset"] = self._parents["cpuset"]
        elif limits.cpus is not None and "cpuset" in self._parents:
            # lxcfs 5.0 reads a v1 CPU quota at the path of the reader's
            # cpuset cgroup: without one of its own, /proc/cpuinfo in the
            # sandbox would count the host's CPUs (docs/view.md).
            wanted["cpuset"] = self._parents["cpuset"]
        return wanted

    def attach(self, name: str, paths: Sequence[str]) -> V1Cgroup:
        dirs: dict[str, str] = {}
        for c, mount in self._mounts.items():
            for p in paths:
                if p.startswith(mount.rstrip("/") + "/") and os.path.basename(p) == name:
                    dirs[c] = p
                    break
            else:
                if c in _V1_OPTIONAL:
                    continue  # made without it (see _V1_OPTIONAL)
                raise CgroupError(f"cgroup {name}: no directory in the {c} hierarchy")
        for d in set(dirs.values()):
            if not os.path.isdir(d):
                raise CgroupError(f"cgroup {d} is gone")
        return V1Cgroup(name, dirs, self._mounts)


class V2Cgroup(Cgroup):
    """A sandbox cgroup in the unified (v2) hierarchy."""

    def __init__(self, name: str, path: str, mount: str = "/sys/fs/cgroup") -> None:
        self._name = name
        self._path = path
        self._mount = mount

    @property
    def name(self) -> str:
        return self._name

    @property
    def paths(self) -> tuple[str, ...]:
        return (self._path,)

    def procs_files(self) -> tuple[str, ...]:
        return (os.path.join(self._path, "cgroup.procs"),)

    def _f(self, file: str) -> str:
        return os.path.join(self._path, file)

    def restrict_devices(self) -> None:
        attach_device_program(self._path)

    def lacks_device_policy(self) -> bool:
        return attached_device_programs(self._path) == 0

    def apply(self, limits: Limits, old: Limits | None = None) -> None:
        before, changed, swap_changed = _changes(limits, old)
        if "memory" in changed:
            with _setting("memory"):
                _write(self._f("memory.max"), _max(limits.memory))
        if swap_changed:
            swap = limits.swap_limit
            if os.path.exists(self._f("memory.swap.max")):
                with _setting("memory_swap"):
                    _write(self._f("memory.swap.max"), _max(swap))
            elif swap not in (0, None):
                # Without swap accounting nothing is swapped in a way
                # memory.max does not see; a size cannot be enforced.
                raise SpecError(
                    "memory_swap",
                    "this kernel does not account swap (no memory.swap.max), so swap"
                    " cannot be limited to a size: use 0 or unlimited",
                )
        if "memory_high" in changed:
            with _setting("memory_high"):
                _write(self._f("memory.high"), _max(limits.memory_high))
        if "cpus" in changed:
            quota = _max(round(limits.cpus * CPU_PERIOD_US) if limits.cpus is not None else None)
            with _setting("cpus"):
                _write(self._f("cpu.max"), f"{quota} {CPU_PERIOD_US}")
        if "cpu_weight" in changed:
            weight = limits.cpu_weight if limits.cpu_weight is not None else DEFAULT_WEIGHT
            with _setting("cpu_weight"):
                _write(self._f("cpu.weight"), str(weight))
        if "pids" in changed:
            with _setting("pids"):
                _write(self._f("pids.max"), _max(limits.pids))
        for key, file in (("cpuset_cpus", "cpuset.cpus"), ("cpuset_mems", "cpuset.mems")):
            if key in changed:
                self._need(key, file, "the cpuset controller is not enabled for it")
                with _setting(key):
                    # Empty: the parent's (effective) set again.
                    _write(self._f(file), getattr(limits, key) or "")
        if "io_weight" in changed:
            self._need(
                "io_weight",
                "io.weight",
                "no io.weight here (the io controller is not enabled for it, or this"
                " kernel has no io cost controller)",
            )
            weight = limits.io_weight if limits.io_weight is not None else DEFAULT_WEIGHT
            with _setting("io_weight"):
                _write(self._f("io.weight"), f"default {weight}")
        for key in DEVICE_KEYS:
            if key in changed:
                self._need(key, "io.max", "the io controller is not enabled for it")
                now = dict(getattr(limits, key))
                for device, rate in _rate_changes(getattr(before, key), now):
                    with _setting(key):
                        _write(self._f("io.max"), f"{device} {_IO_MAX_KEYS[key]}={_max(rate)}")
        if "oom_group" in changed:
            self._need("oom_group", "memory.oom.group", "this kernel has no memory.oom.group")
            with _setting("oom_group"):
                _write(self._f("memory.oom.group"), "1" if limits.oom_group else "0")

    def _need(self, key: str, file: str, why: str) -> None:
        if not os.path.exists(self._f(file)):
            raise SpecError(key, f"{why} ({self._path})")

    def memory_current(self) -> int:
        return _read_int(self._f("memory.current"))

    def stats(self) -> CgroupStats:
        events = _keyed(self._f("memory.events"))
        peak = self._f("memory.peak")
        return CgroupStats(
            cpu_usage_ns=_keyed(self._f("cpu.stat")).get("usage_usec", 0) * 1000,
            memory_current=_read_int(self._f("memory.current")),
            memory_peak=_read_int(peak) if os.path.exists(peak) else None,
            pids_current=_read_int(self._f("pids.current")),
            pids_limit_hits=_keyed(self._f("pids.events")).get("max", 0),
            memory_limit_hits=events.get("max", 0),
            oom_kill=events.get("oom_kill", 0),
        )

    def pids(self) -> list[int]:
        return _pids_in(self._path)

    def kill(self) -> None:
        kill_file = self._f("cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        _freeze_and_kill(self._path, None)

    def open_oom_watch(self) -> OomWatch:
        return _V2OomWatch(self._path)

    def open_pressure_watch(self, limits: Limits) -> PressureWatch:
        return _V2PressureWatch(self._path, limits.memory_stall)

    @property
    def freezer_dir(self) -> str:
        return self._path

    def freeze(self, timeout: float = 10.0) -> None:
        _write(self._f("cgroup.freeze"), "1")
        if not self._wait_events("frozen", 1, timeout):
            self.thaw()
            raise CgroupError(f"{self._name}: not frozen after {timeout:g} s")

    def thaw(self) -> None:
        _write(self._f("cgroup.freeze"), "0")

    def is_frozen(self) -> bool:
        return _read(self._f("cgroup.freeze")).strip() == "1"

    def relative_paths(self) -> dict[str, str]:
        return {"": "/" + os.path.relpath(self._path, self._mount).lstrip("./")}

    def remove(self) -> None:
        if _has_processes((self._path,)):
            self.kill()
        # Unreadable at the open-file limit: the rmdir's retries wait then.
        with contextlib.suppress(CgroupError, OSError):
            self.wait_unpopulated()
        _rmdir(self._path)

    def wait_unpopulated(self, timeout: float = 5.0) -> bool:
        """Wait until ``cgroup.events`` says ``populated 0``; False on timeout.
        Exiting tasks leave the cgroup a moment after their parent learns
        of the exit."""
        return self._wait_events("populated", 0, timeout)

    def _wait_events(self, key: str, value: int, timeout: float) -> bool:
        """Wait until ``cgroup.events`` shows *key* = *value* (no polling:
        the kernel notifies about the file on every change; see
        :class:`_Notified`)."""
        try:
            events = _Notified(self._f("cgroup.events"))
        except (OSError, CgroupError):
            return False  # gone already, or not a v2 cgroup: the caller decides
        try:
            # poll, not select: a supervisor of many sandboxes has
            # descriptors past select's 1024.
            poller = select.poll()
            poller.register(events.fd, select.POLLIN)
            deadline = time.monotonic() + timeout
            while events.keyed().get(key, 0) != value:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(max(1, int(left * 1000)))
            return True
        except (OSError, CgroupError):
            return False
        finally:
            events.close()


_V2_NO_PSI = (
    "this kernel keeps no pressure stall information for cgroups (no memory.pressure"
    " below {parent}: booted with psi=0, or built without CONFIG_PSI)"
)
_V2_NOT_ENABLED = (
    "the {c} controller cannot be enabled for sandboxes below {parent}"
    " (not in its cgroup.controllers: enable it in its parent's cgroup.subtree_control)"
)


class V2Cgroups(Cgroups):
    """The unified hierarchy (cgroup v2)."""

    layout: Literal["v1", "v2"] = "v2"

    def __init__(self, mount: str, own: str, parent: str | None = None) -> None:
        self._mount = mount
        if parent is not None:
            self._parent = self._prepare(os.path.join(mount, parent.lstrip("/")), fallback=False)
        else:
            self._parent = self._prepare(os.path.join(mount, own.lstrip("/")), fallback=True)

    @property
    def parent(self) -> str:
        """The directory sandbox cgroups are created in."""
        return self._parent

    def _prepare(self, parent: str, fallback: bool) -> str:
        """Make sure *parent* can hold sandbox cgroups with our controllers.

        v2 forbids enabling controllers for children of a cgroup that has
        processes of its own (unless it is the root). When our own cgroup
        is such a one, say a login session's scope, we fall back to a
        ``corral`` cgroup below the root, as Docker's cgroupfs driver does.
        """
        if not os.path.isdir(parent):
            raise CgroupError(f"cgroup parent {parent} does not exist")
        try:
            self._enable_controllers(parent)
            return parent
        except CgroupError:
            if not fallback:
                raise
        top = os.path.join(self._mount, "corral")
        try:
            os.mkdir(top)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"failed to create cgroup {top}: {exc.strerror}") from exc
        self._enable_controllers(self._mount)
        self._enable_controllers(top)
        return top

    @staticmethod
    def _enable_controllers(path: str) -> None:
        available = _read(os.path.join(path, "cgroup.controllers")).split()
        missing = [c for c in _V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup {path}: controller(s) {', '.join(missing)} not available"
                " (not enabled in the parent's cgroup.subtree_control)"
            )
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = _read(control).split()
        want = [c for c in _V2_CONTROLLERS if c not in enabled]
        if want:
            _write(control, " ".join("+" + c for c in want))
        # The optional ones where they can be had; limits that need one
        # that could not be enabled are refused (see check).
        for c in _V2_OPTIONAL:
            if c in available and c not in enabled:
                with contextlib.suppress(CgroupError):
                    _write(control, "+" + c)

    def _enabled(self) -> list[str]:
        return _read(os.path.join(self._parent, "cgroup.subtree_control")).split()

    def check(self, limits: Limits) -> None:
        if limits.memory_stall is not None and not os.path.exists(
            os.path.join(self._parent, "memory.pressure")
        ):
            raise SpecError("memory_stall", _V2_NO_PSI.format(parent=self._parent))
        cpuset = [k for k in ("cpuset_cpus", "cpuset_mems") if getattr(limits, k) is not None]
        io = [k for k in _IO_KEYS if getattr(limits, k) != Limits._field_defaults[k]]
        if not cpuset and not io:
            return
        enabled = self._enabled()
        if cpuset:
            if "cpuset" not in enabled:
                raise SpecError(cpuset[0], _V2_NOT_ENABLED.format(c="cpuset", parent=self._parent))
            _cpuset_subset(
                limits,
                _read(os.path.join(self._parent, "cpuset.cpus.effective")),
                _read(os.path.join(self._parent, "cpuset.mems.effective")),
            )
        if io and "io" not in enabled:
            raise SpecError(io[0], _V2_NOT_ENABLED.format(c="io", parent=self._parent))

    def create(self, name: str, limits: Limits) -> V2Cgroup:
        self.check(limits)
        path = os.path.join(self._parent, name)
        _mkdir(path)
        cg = V2Cgroup(name, path, self._mount)
        try:
            cg.apply(limits)
        except BaseException:
            try:
                os.rmdir(path)
            except OSError:
                pass
            raise
        return cg

    def existing(self, prefix: str) -> dict[str, Cgroup]:
        out: dict[str, Cgroup] = {}
        with contextlib.suppress(OSError):
            for entry in os.listdir(self._parent):
                path = os.path.join(self._parent, entry)
                if entry.startswith(prefix) and os.path.isdir(path):
                    out[entry] = V2Cgroup(entry, path, self._mount)
        return out

    def paths_of(self, name: str, limits: Limits) -> tuple[str, ...]:
        return (os.path.join(self._parent, name),)

    def attach(self, name: str, paths: Sequence[str]) -> V2Cgroup:
        if len(paths) != 1 or os.path.basename(paths[0]) != name:
            raise CgroupError(f"cgroup {name}: expected one cgroup v2 directory, got {list(paths)}")
        path = paths[0]
        if not path.startswith(self._mount.rstrip("/") + "/") or not os.path.isdir(path):
            raise CgroupError(f"cgroup {path} is gone")
        return V2Cgroup(name, path, self._mount)


# -- detection ---------------------------------------------------------------


def open_cgroups(
    root: str = "/sys/fs/cgroup",
    parent: str | None = None,
    *,
    mountinfo: str = "/proc/self/mountinfo",
    self_cgroup: str = "/proc/self/cgroup",
) -> V1Cgroups | V2Cgroups:
    """Detect the cgroup layout below *root* and return its backend.

    *parent* is a cgroup path (like ``/corral``) relative to each
    hierarchy's root; by default sandbox cgroups go below our own cgroup.
    """
    root = os.path.realpath(root)
    own = _self_cgroups(self_cgroup)
    table = _mountinfo(mountinfo)
    if any(mnt == root and fstype == "cgroup2" for mnt, fstype, _ in table):
        return V2Cgroups(root, own.get("", "/"), parent)
    mounts: dict[str, str] = {}
    for mnt, fstype, opts in table:
        if fstype != "cgroup" or not (mnt == root or mnt.startswith(root + "/")):
            continue
        for opt in opts.split(","):
            if opt in _V1_CONTROLLERS:
                mounts.setdefault(opt, mnt)
    if not mounts:
        raise CgroupError(f"no cgroup v1 or v2 file system mounted at {root}")
    return V1Cgroups(mounts, own, parent)
