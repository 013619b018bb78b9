"""corral's lxcfs: what a sandbox reads about its memory, CPUs, uptime and
load in ``/proc`` is its own (docs/view.md).

lxcfs (Debian's ``lxcfs`` package) is a FUSE file system whose
``proc/meminfo``, ``cpuinfo``, ``stat``, ``uptime``, ``loadavg``,
``diskstats``, ``swaps`` and ``sys/devices/system/cpu/online`` answer each
reader with the numbers of its own cgroup, found through the init of the
reader's PID namespace (a sandbox's tini). Each sandbox gets those files
bind-mounted, read-only, over its own (``_mount_lxcfs`` in
``_linux/_child.py``).

One instance serves every sandbox of a run directory::

    RUN_DIR/lxcfs/mnt            its mount point, in the host's mount namespace
    RUN_DIR/lxcfs/instance.json  its PID and start time (its identity)
    RUN_DIR/lxcfs/lxcfs.pid      lxcfs's own pid file (lxcfs locks it)
    RUN_DIR/lxcfs/lxcfs.log      what it said since its last start
    RUN_DIR/lxcfs/lock           flock: shared while a sandbox is made with
                                 the view, exclusive to start or stop lxcfs

It is started when the first sandbox needs it and outlives whoever started
it (a SIGKILLed supervisor, a finished ``corral run``), as the sandboxes
do: the next runtime finds it by its record and takes it if its process is
the one recorded (PID and start time) and its mount answers. An lxcfs that
died leaves every running sandbox's view of it answering ENOTCONN
("Transport endpoint is not connected": the FUSE connection is gone, and a
new lxcfs is a new connection); whoever starts the next one re-attaches
fresh mounts in each running sandbox (:meth:`Lxcfs.reattach`, through an
exec'd helper: ``_linux/_reattach.py``).

The shared lock closes the one race in that: a sandbox whose child
bind-mounted the files of an lxcfs that then died, but which has no record
yet, would be missed by the re-attachment. Its creator holds the lock
shared until the record is written; a restart takes it exclusively, so it
sees every record of a sandbox made from the old instance.

``CORRAL_LXCFS`` chooses: ``auto`` (the default: corral's own), ``off`` (no
view for any sandbox), or the absolute path where a running lxcfs is
mounted (used as it is: corral never starts, restarts or stops that one).
``CORRAL_LXCFS_BINARY`` names the program (default: ``lxcfs`` on ``PATH``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .._errors import CorralError
from ._linux import _syscalls
from ._linux._child import LXCFS_FILES
from ._linux._proc import starttime
from ._records import write_atomic

__all__ = ["LXCFS_FILES", "LXCFS_OPTIONS", "Lxcfs", "LxcfsError"]

LXCFS_OPTIONS = ("--enable-cfs", "--enable-pidfd", "--enable-loadavg")
"""How corral runs lxcfs 5: the CPU count (``cpuinfo``, ``stat``) follows
the sandbox's CPU quota; its cache of readers' inits is keyed by pidfds
(no PID-reuse mix-up); ``loadavg`` is the sandbox's own (a thread of
lxcfs's recomputes it every few seconds for the cgroups that read it)."""

START_TIMEOUT = 10.0
"""Seconds an lxcfs may take to mount itself before it is given up."""
REATTACH_BATCH = 256
"""Sandboxes re-attached per run of the helper (one pidfd each, passed to it)."""
RETRY_AFTER = 10.0
"""Seconds before a runtime whose lxcfs failed to start tries again (a
create in between runs without the view; the supervisor's watch retries
on its own schedule)."""

_SIGNALS_TO_DEFAULT = {
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
}
"""What lxcfs gets with the default action whatever its starter ignored
(it reloads itself on SIGUSR1; fuse ends it cleanly on SIGTERM)."""


class LxcfsError(CorralError):
    """lxcfs could not be started (the message says why, in one line)."""


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Lxcfs:
    """The lxcfs of one run directory: found, started, re-attached, stopped.

    Thread-safe: the supervisor's worker threads make sandboxes at the same
    time. *setting* is ``CORRAL_LXCFS``'s (see the module); *say* gets the
    one-line notes a user must see (each said once per reason).
    """

    def __init__(
        self,
        run_dir: str,
        setting: str | None = None,
        binary: str | None = None,
        say: Callable[[str], None] = _say,
    ) -> None:
        setting = (os.environ.get("CORRAL_LXCFS", "") if setting is None else setting) or "auto"
        if setting not in ("auto", "off") and not os.path.isabs(setting):
            raise CorralError(
                "CORRAL_LXCFS: expected 'auto', 'off' or the absolute path of a running"
                f" lxcfs's mount point, got {setting!r}"
            )
        self.setting = setting
        self.run_dir = run_dir
        # As the mount table names them (no symlinks on the way).
        self.dir = os.path.join(os.path.realpath(run_dir), "lxcfs")
        if os.path.isabs(setting):
            parent, base = os.path.split(setting.rstrip("/") or "/")
            self.mountpoint = os.path.join(os.path.realpath(parent), base)
        else:
            self.mountpoint = os.path.join(self.dir, "mnt")
        """Where the lxcfs whose files the sandboxes get is mounted."""
        self.binary = (
            binary
            or os.environ.get("CORRAL_LXCFS_BINARY")
            or shutil.which("lxcfs")
            or "/usr/bin/lxcfs"
        )
        self.on_found: Callable[[], None] | None = None
        """Called (in the thread that found it) once this runtime knows an
        lxcfs it did not know before: started, or taken over from a
        predecessor: what the supervisor's watch then waits on."""
        self._say = say
        self._said: set[str] = set()
        self._lock = threading.Lock()
        self._pid = 0
        self._pidfd = -1
        # Counts the lxcfs processes this object has known (started or
        # taken over): a view made under one is stale under the next.
        self._incarnation = 0
        # The shared lock a thread holds in held(), for held_off().
        self._holding = threading.local()
        self._failed_at: float | None = None
        self._failure = ""

    @property
    def own(self) -> bool:
        """True if corral runs this lxcfs itself (not ``off``, not someone else's)."""
        return self.setting == "auto"

    @property
    def pid(self) -> int:
        """The PID of the lxcfs this runtime uses now (0: none known)."""
        return self._pid

    # -- for a sandbox's start ---------------------------------------------------

    @contextlib.contextmanager
    def held(self) -> Iterator[str | None]:
        """The mount point to bind the view from while a sandbox is made (its
        record written), or None: no view (why is said once).

        Starts corral's lxcfs, or takes over the one a predecessor left,
        if there is none known alive (blocking: run it in a thread)."""
        if self.setting == "off":
            yield None
            return
        if not self.own:
            yield self._external()
            return
        try:
            os.makedirs(self.dir, mode=0o711, exist_ok=True)
            lock = os.open(
                os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            self._note("dir", f"cannot use {self.dir}: {exc.strerror}")
            yield None
            return
        self._holding.fd = lock
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if not self._known_alive():
                fcntl.flock(lock, fcntl.LOCK_EX)  # gives up the shared lock first
                try:
                    up = self._ensure(force=False)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_SH)  # a downgrade keeps it
                if not up:
                    yield None
                    return
            yield self.mountpoint
        finally:
            self._holding.fd = -1
            os.close(lock)

    @contextlib.contextmanager
    def held_off(self) -> Iterator[Callable[[], bool]]:
        """Within :meth:`held`, on its thread: let go of the hold for a
        while (a standby waiting to be started, which must not keep an
        lxcfs that died from being replaced), and take it back after.
        Yields a check for after the block: True if the lxcfs the view was
        made from still serves it (else the view is stale: start afresh)."""
        lock = getattr(self._holding, "fd", -1)
        if lock < 0:
            yield lambda: True  # no view of ours: nothing to let go of
            return
        with self._lock:
            before = self._incarnation
        fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            yield lambda: self._incarnation == before and self._known_alive()
        finally:
            fcntl.flock(lock, fcntl.LOCK_SH)

    def _external(self) -> str | None:
        """Someone else's lxcfs, if its mount answers."""
        try:
            if _syscalls.fs_type(self.mountpoint) != _syscalls.FUSE_SUPER_MAGIC:
                raise OSError(errno.EINVAL, "not a FUSE mount")
            os.stat(os.path.join(self.mountpoint, "proc", "meminfo"))
        except OSError as exc:
            self._note(
                "external", f"the lxcfs at {self.mountpoint} does not answer ({exc.strerror})"
            )
            return None
        return self.mountpoint

    def _note(self, key: str, reason: str) -> None:
        """Say once per *key* why sandboxes run without the view."""
        if key in self._said:
            return
        self._said.add(key)
        self._say(
            f"corral: {reason}: sandboxes see the host's /proc/meminfo, cpuinfo, uptime..."
            " (docs/view.md)"
        )

    def _known_alive(self) -> bool:
        with self._lock:
            return self._pidfd >= 0 and not _exited(self._pidfd)

    # -- finding, starting, stopping ---------------------------------------------

    def _ensure(self, *, force: bool) -> bool:
        """Under the exclusive lock: make sure an lxcfs of ours runs and is
        mounted; re-attach the running sandboxes' views if it is a new one.
        False if there is none (said why). *force*: try even within
        :data:`RETRY_AFTER` of a failure."""
        with self._lock:
            self._forget_dead()
            if self._pidfd >= 0:
                return True
            record = self._read_record()
            adopted = record is not None and self._adopt(record)
            if not adopted:
                failed_at = self._failed_at
                if (
                    not force
                    and failed_at is not None
                    and time.monotonic() - failed_at < RETRY_AFTER
                ):
                    return False
                self._clean_up(record)
                if not os.access(self.binary, os.X_OK):
                    return self._failed("binary", f"lxcfs is not installed ({self.binary})")
                try:
                    self._start()
                except LxcfsError as exc:
                    return self._failed(f"start: {exc}", str(exc))
                self._failed_at = None
                self._said.clear()  # a later failure is news again
        if not adopted:
            self.reattach()
        if self.on_found is not None:
            self.on_found()
        return True

    def _failed(self, key: str, reason: str) -> bool:
        self._failed_at = time.monotonic()
        self._failure = reason
        self._note(key, reason)
        return False

    def _read_record(self) -> dict[str, int] | None:
        try:
            with open(os.path.join(self.dir, "instance.json")) as f:
                data = json.load(f)
            return {"pid": int(data["pid"]), "starttime": int(data["starttime"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _adopt(self, record: dict[str, int]) -> bool:
        """Take the recorded lxcfs if it is that process and its mount answers."""
        pid = record["pid"]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            ok = starttime(pid) == record["starttime"] and self._mounted()
            if ok:
                os.stat(os.path.join(self.mountpoint, "proc", "meminfo"))
        except OSError:
            ok = False
        if not ok:
            os.close(pidfd)
            return False
        self._pid, self._pidfd = pid, pidfd
        self._incarnation += 1
        return True

    def _mounted(self) -> bool:
        """Whether an lxcfs is mounted at our mount point now (the topmost
        mount there), read from the mount table: no FUSE request."""
        found = False
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == self.mountpoint:
                    found = right.startswith("fuse.lxcfs ")
        return found

    def _forget_dead(self) -> None:
        """Let go of a known lxcfs that has ended (reaping it if ours)."""
        if self._pidfd >= 0 and _exited(self._pidfd):
            _reap(self._pidfd)
            os.close(self._pidfd)
            self._pid, self._pidfd = 0, -1

    def _clean_up(self, record: dict[str, int] | None) -> None:
        """What a dead (or unanswering) lxcfs left: its process, if it is
        still the recorded one, and its mount."""
        _unmount_all(self.mountpoint)
        if record is not None:
            _kill_recorded(record["pid"], record["starttime"])
        for name in ("instance.json", "lxcfs.pid"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, name))

    def _start(self) -> None:
        """Start lxcfs on our mount point; return once it is mounted."""
        os.makedirs(self.mountpoint, mode=0o755, exist_ok=True)
        log = os.path.join(self.dir, "lxcfs.log")
        argv = [
            self.binary,
            *LXCFS_OPTIONS,
            "--pidfile",
            os.path.join(self.dir, "lxcfs.pid"),
            self.mountpoint,
        ]
        try:
            # posix_spawn: fork and exec in C, safe in a threaded process.
            # A session of its own: a terminal's Ctrl-C is not for it. It
            # must outlive us; its cwd goes to / (its setns back into our
            # mount namespace moves it there), and it gets the three
            # descriptors given here only: ours are close-on-exec, and
            # those we inherited without the flag are closed for it (a
            # `flock LOCK cmd`'s lock, held by an lxcfs that outlives cmd,
            # would never be released).
            pid = os.posix_spawn(
                self.binary,
                argv,
                {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                file_actions=[
                    *_close_inherited(),
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,
                setsigdef=_SIGNALS_TO_DEFAULT,
                setsigmask=(),
            )
        except OSError as exc:
            raise LxcfsError(f"cannot start {self.binary}: {exc.strerror}") from None
        pidfd = os.pidfd_open(pid)
        try:
            self._wait_mounted(pid, pidfd, log)
            write_atomic(
                os.path.join(self.dir, "instance.json"),
                json.dumps(
                    {
                        "pid": pid,
                        "starttime": starttime(pid),
                        "mountpoint": self.mountpoint,
                        "argv": argv,
                        "started": time.time(),
                    }
                ),
            )
        except BaseException:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _exited(pidfd, 5.0)
            _reap(pidfd)
            os.close(pidfd)
            _unmount_all(self.mountpoint)
            raise
        self._pid, self._pidfd = pid, pidfd
        self._incarnation += 1

    def _wait_mounted(self, pid: int, pidfd: int, log: str) -> None:
        """Wait until lxcfs has mounted itself: woken by the kernel when the
        mount table changes (POLLPRI on /proc/self/mountinfo) or lxcfs ends."""
        table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(table, select.POLLPRI | select.POLLERR)
            deadline = time.monotonic() + START_TIMEOUT
            while not self._mounted():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LxcfsError(
                        f"lxcfs did not mount {self.mountpoint} within {START_TIMEOUT:g} s"
                    )
                for fd, _ in poller.poll(left * 1000):
                    if fd == pidfd:
                        raise LxcfsError(f"lxcfs ended at its start: {_last_line(log)}")
            # Mounted; and it answers (a FUSE request, served once its loop runs).
            os.stat(os.path.join(self.mountpoint, "proc", "meminfo"))
        except OSError as exc:
            raise LxcfsError(f"lxcfs at {self.mountpoint}: {exc.strerror}") from None
        finally:
            os.close(table)

    def watch_fd(self) -> int:
        """A pidfd of the lxcfs we know alive (ours to close; readable when
        it ends), or -1: none known (not started yet, or not ours)."""
        with self._lock:
            return os.dup(self._pidfd) if self._pidfd >= 0 else -1

    def recover(self) -> bool:
        """Make sure the running sandboxes' views are served: after the
        lxcfs we used ended, or when a supervisor starts (its predecessor's
        may have ended meanwhile). Takes the recorded lxcfs if it runs;
        else, if a sandbox of the run directory has the view, starts a new
        one and re-attaches their views; else clears up (the next start of
        a sandbox with the view starts one). True if one runs now; raises
        :class:`LxcfsError` if one is needed and cannot be started
        (blocking)."""
        if not self.own:
            return False
        with self._exclusive():
            with self._lock:
                self._forget_dead()
                if self._pidfd >= 0:
                    return True  # restarted meanwhile (by a sandbox's start)
                record = self._read_record()
                if record is not None and self._adopt(record):
                    return True
            if not self._sandboxes_with_view():
                with self._lock:
                    self._clean_up(record)
                return False
            if not self._ensure(force=True):
                raise LxcfsError(self._failure)
            return True

    def stop(self, *, force: bool = False) -> bool:
        """Stop corral's lxcfs unless a running sandbox of the run directory
        has its view (or *force*): unmount it, then kill it (by its pidfd,
        once its start time says it is the recorded one). True if none runs
        any more (blocking)."""
        if not self.own or not os.path.isdir(self.dir):
            return True
        with self._exclusive():
            if not force and self._sandboxes_with_view():
                return False
            with self._lock:
                record = self._read_record()
                if self._pidfd >= 0:
                    _unmount_all(self.mountpoint)
                    _kill(self._pidfd)
                    os.close(self._pidfd)
                    self._pid, self._pidfd = 0, -1
                self._clean_up(record)
        return True

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        lock = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    # -- the running sandboxes' views ------------------------------------------

    def _live_sandboxes(self) -> list[tuple[str, int, int]]:
        """(name, PID, start time) of every sandbox of the run directory
        whose recorded init still ran when looked at."""
        out = []
        folder = os.path.join(self.run_dir, "sandboxes")
        with contextlib.suppress(OSError):
            for entry in sorted(os.listdir(folder)):
                if not entry.endswith(".json"):
                    continue
                try:
                    with open(os.path.join(folder, entry)) as f:
                        record = json.load(f)
                    pid, start = int(record["pid"]), int(record["starttime"])
                    if starttime(pid) == start:
                        out.append((entry[: -len(".json")], pid, start))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return out

    def _sandboxes_with_view(self) -> bool:
        return any(view_mounts(pid) for _, pid, _ in self._live_sandboxes())

    def reattach(self) -> list[str]:
        """Give every running sandbox whose view is of another (dead) lxcfs
        fresh mounts of ours, in its own mount namespace; return the names
        of those re-attached (blocking). Failures are said, one line each.
        The helper is run once per :data:`REATTACH_BATCH` sandboxes, which
        bounds the descriptors open at once and its command line."""
        try:
            st = os.stat(self.mountpoint)
        except OSError:
            return []
        live = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        stale = [
            (name, pid, start, targets)
            for name, pid, start in self._live_sandboxes()
            if (targets := [t for t, dev in view_mounts(pid).items() if dev != live])
        ]
        done: list[str] = []
        for n in range(0, len(stale), REATTACH_BATCH):
            done += self._reattach_batch(stale[n : n + REATTACH_BATCH])
        return done

    def _reattach_batch(self, batch: list[tuple[str, int, int, list[str]]]) -> list[str]:
        import subprocess

        work: list[tuple[str, int, list[str]]] = []
        try:
            for name, pid, start, targets in batch:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    continue  # ended meanwhile
                # The pidfd pins the process: it is the sandbox's init only
                # if the start time still is the recorded one.
                try:
                    same = starttime(pid) == start
                except OSError:
                    same = False
                if same:
                    work.append((name, pidfd, targets))
                else:
                    os.close(pidfd)
            if not work:
                return []
            argv = [sys.executable, "-m", "supervisor._runtime._linux._reattach", self.mountpoint]
            argv += [f"{fd}:{','.join(targets)}" for _, fd, targets in work]
            names = {str(fd): name for name, fd, _ in work}
            # A second try if the helper did not get as far as a sandbox
            # (it could not start: seen once in the VM lane, whose shared
            # file system then missed its module); a re-attach is
            # idempotent, so one done by the first try is only redone.
            for _ in range(2):
                try:
                    proc = subprocess.run(
                        argv,
                        pass_fds=[fd for _, fd, _ in work],
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=False,
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    self._say(f"corral: the sandboxes' lxcfs views could not be re-attached: {exc}")
                    return []
                lines = proc.stderr.splitlines()
                started = any(line.partition(": ")[0] in names for line in lines)
                if proc.returncode == 0 or started:
                    break
            failed = set()
            for line in lines:
                key, _, message = line.partition(": ")
                if key in names:
                    failed.add(names[key])
                    self._say(f"corral: sandbox {names[key]!r}: its lxcfs view: {message}")
                elif line.strip():
                    self._say(f"corral: re-attaching lxcfs views: {line}")
            if proc.returncode != 0 and not failed:
                return []  # the helper failed before any sandbox (it said why)
            return [name for name, _, _ in work if name not in failed]
        finally:
            for _, pidfd, _ in work:
                os.close(pidfd)


def view_mounts(pid: int) -> dict[str, str]:
    """The lxcfs mounts of the view in the mount namespace of process
    *pid*: ``{"/proc/meminfo": "0:45", ...}`` (target in the sandbox, the
    device of the lxcfs mounted there: a dead lxcfs's differs from the
    live one's). Empty if it has none or is gone."""
    wanted = {"/" + f for f in LXCFS_FILES}
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5:
                    continue
                target = _unescape(fields[4])
                if target in wanted:
                    if right.startswith("fuse.lxcfs "):
                        out[target] = fields[2]
                    else:
                        out.pop(target, None)  # something else over it
    except OSError:
        return {}
    return out


def _unescape(field: str) -> str:
    """A mountinfo path field as the path (octal escapes of space, tab,
    newline and backslash undone)."""
    if "\\" not in field:
        return field
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")).replace(
        "\\134", "\\"
    )


def _exited(pidfd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _reap(pidfd: int) -> None:
    """Collect the exit status of the process, if it is our child (an
    lxcfs this process started, or one re-parented to it as a subreaper)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


def _kill(pidfd: int) -> None:
    """SIGKILL an lxcfs whose mount is detached already: it keeps nothing
    that needs a clean exit (a SIGTERM waits up to five seconds for its
    loadavg thread's sleep), and its pid file is removed by the caller."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _exited(pidfd, 5.0)
    _reap(pidfd)


def _kill_recorded(pid: int, start: int) -> None:
    """End the lxcfs of a record if that process still runs (its mount
    does not answer, or is gone): by pidfd, once its start time says it is
    the recorded one."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if starttime(pid) == start:
            _kill(pidfd)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _close_inherited() -> list[tuple[int, int]]:
    """posix_spawn file actions closing each descriptor from 3 up that
    would survive an exec (not close-on-exec)."""
    actions = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd < 3:
            continue
        try:
            inheritable = os.get_inheritable(fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if inheritable:
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
    return actions


def _unmount_all(path: str) -> None:
    """Detach whatever is mounted at *path* (a dead FUSE mount answers
    nothing: a lazy unmount is the only kind that works)."""
    for _ in range(16):
        try:
            _syscalls.umount2(path, _syscalls.MNT_DETACH | _syscalls.UMOUNT_NOFOLLOW)
        except OSError:
            return  # EINVAL: nothing (more) mounted; ENOENT: no mount point


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(it said nothing)"
