"""Starting a sandbox's process tree: the spawn protocol and its spawners.

A request is a :class:`~._child.LaunchConfig` (a new sandbox, see
:mod:`._child`) or an :class:`~._exec.ExecConfig` (a new process in a
running sandbox, see :mod:`._exec`). Two spawners take both:

- :func:`spawn_direct` forks from the calling process. Only safe in a
  single-threaded process (the CLI, a benchmark, a test); it checks.
- :class:`Keeper` is a fork server: a small single-threaded helper process,
  started once with a clean ``exec``, which forks on request. A
  multi-threaded program (the trio supervisor) uses it, so that no Python
  code ever runs in a forked copy of a threaded process.

Either way the caller must be a child subreaper
(:func:`~._syscalls.set_child_subreaper`) so the sandbox init (or the exec'd
process) ends up as its child.

The keeper protocol: one ``SOCK_SEQPACKET`` message per request, a msgpack
map ``{"launch": config}`` or ``{"exec": config}`` with, as SCM_RIGHTS, the
report socket, the three stdio descriptors and, for an exec, the pidfd of
the sandbox's init.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Callable, Sequence

from .._dirs import make_run_dir
from ._child import LaunchConfig, SetupFailure, decode_failure, run_intermediate
from ._exec import ExecConfig, run_exec_intermediate
from ._proc import starttime as _starttime
from ._proc import zombie_status
from ._syscalls import set_name
from ._sysinfo import Context, context_of, fork_answerer, pidfd_pid

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple, NoReturn
else:
    from .._tuples import NamedTuple

__all__ = [
    "KEEPER_SOCKET",
    "LOST",
    "ExitStatus",
    "Keeper",
    "KeeperError",
    "OnPid",
    "Reaper",
    "SpawnFailed",
    "Spawned",
    "collect",
    "exit_status",
    "has_exited",
    "reaped_status",
    "spawn_direct",
]


class Spawned(NamedTuple):
    """A sandbox init (or exec'd process) that has exec'd: its host PID and a pidfd for it."""

    pid: int
    pidfd: int
    pty_master: int | None = None
    """The master of the process's terminal (an exec with ``tty``); the caller owns it."""
    starttime: int = 0
    """Its start time (see :mod:`._proc`): with the PID, its identity."""
    notify_fd: int = -1
    """The listener of its ``sysinfo`` filter (see :mod:`._sysinfo`), as
    :func:`collect` returns it; a spawner gives it to its answerer."""


class SpawnFailed(Exception):
    """The children reported a failure.

    If the init already existed, ``pid``/``pidfd`` are set and the caller
    must reap it (it exits by itself right after reporting).
    """

    def __init__(
        self,
        failure: SetupFailure,
        pid: int | None = None,
        pidfd: int | None = None,
        starttime: int = 0,
    ):
        super().__init__(failure.message)
        self.failure = failure
        self.pid = pid
        self.pidfd = pidfd
        self.starttime = starttime


class ExitStatus(NamedTuple):
    """How a process ended: exactly one field is set, or neither if that was lost.

    Lost means the process was nobody's child that could tell: the keeper
    that held it died while no supervisor ran, and the host's init reaped it.
    """

    exit_code: int | None
    signal: int | None

    @property
    def known(self) -> bool:
        """False if how it ended was lost."""
        return self.exit_code is not None or self.signal is not None

    @property
    def status(self) -> int:
        """Shell-style: the exit code, 128 + the signal, or -1 if lost."""
        if self.exit_code is not None:
            return self.exit_code
        return -1 if self.signal is None else 128 + self.signal


LOST = ExitStatus(None, None)
"""The status of a process whose end nobody could report."""


def exit_status(info: os.waitid_result) -> ExitStatus:
    """The :class:`ExitStatus` in a ``waitid`` result."""
    if info.si_code == os.CLD_EXITED:
        return ExitStatus(info.si_status, None)
    return ExitStatus(None, info.si_status)


_PIDFD_GET_INFO = 0xC040FF0B
"""``PIDFD_GET_INFO``: ``_IOWR(0xFF, 11, struct pidfd_info)``, the 64-byte
first version of the structure (Linux 6.13)."""
_PIDFD_INFO_EXIT = 1 << 3
"""The structure's ``exit_code`` is filled in (Linux 6.15)."""
_pidfd_info = True
"""False once the kernel turned the request down (older than 6.13)."""


def reaped_status(pidfd: int) -> int | None:
    """The wait status of the process behind *pidfd* once it has been
    reaped, by whoever its parent is (``PIDFD_INFO_EXIT``, Linux 6.15+);
    None before, or where the kernel cannot say."""
    global _pidfd_info
    if not _pidfd_info:
        return None
    import fcntl
    import struct

    info = bytearray(64)
    struct.pack_into("=Q", info, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info)
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            _pidfd_info = False  # this kernel has no such request
        return None
    if not struct.unpack_from("=Q", info, 0)[0] & _PIDFD_INFO_EXIT:
        return None  # running, or a zombie (see _proc.zombie_status)
    return int(struct.unpack_from("=i", info, 60)[0])


def has_exited(pidfd: int, timeout: float | None = 0) -> bool:
    """True once the process behind *pidfd* has exited (waiting up to
    *timeout* seconds, forever if None); never reaps it."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    # A pidfd polls readable once its process has exited (kernel 5.3+),
    # whoever its parent is.
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))


class Reaper:
    """Collects the exit statuses of the processes a runtime starts.

    This one reaps direct children with ``waitid`` (the caller is a child
    subreaper, so sandbox inits are its children). A process that is not
    our child is asked about elsewhere (:meth:`_not_ours`, which a
    :class:`Keeper` overrides); here its status is lost.
    """

    def reap(self, proc: Spawned, *, block: bool) -> ExitStatus | None:
        """How *proc* ended, reaping it if it is our child; None while it
        runs (only without *block*)."""
        if proc.pidfd < 0:  # taken back after it was gone: only others know
            return self._not_ours(proc, block)
        try:
            info = os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED | (0 if block else os.WNOHANG))
        except ChildProcessError:
            return self._not_ours(proc, block)
        if info is None or not info.si_pid:
            return None
        return exit_status(info)

    def _not_ours(self, proc: Spawned, block: bool) -> ExitStatus | None:
        if proc.pidfd >= 0 and not has_exited(proc.pidfd, None if block else 0):
            return None
        return LOST

    def forget(self, proc: Spawned) -> None:
        """*proc*'s status has been used: whoever kept it may drop it."""
        _reap_answerer(f"{proc.pid}:{proc.starttime}")


def recv_fds(sock: socket.socket, size: int, maxfds: int) -> tuple[bytes, list[int], int, object]:
    """``socket.recv_fds`` with every received descriptor close-on-exec.

    Received descriptors are inheritable, and Python's recvmsg does not
    honour MSG_CMSG_CLOEXEC; a report socket that survived the init's exec
    would never give the end-of-file that means "exec'd".
    """
    msg, fds, flags, addr = socket.recv_fds(sock, size, maxfds)
    for fd in fds:
        os.set_inheritable(fd, False)
    return msg, fds, flags, addr


def thread_count() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Threads:"):
                return int(line.split()[1])
    return 0


NO_REPORT = "the setup process died without a report"
"""The failure of a spawn whose report socket closed before any report."""


DROPPED = "a descriptor it sent was dropped here: Too many open files"
"""The failure of a spawn whose report came without the descriptor it carried."""


OnPid = Callable[[int], None]
"""Called with the new init's PID before it may exec (see :func:`collect`)."""


def collect(sock: socket.socket, on_pid: OnPid | None = None) -> Spawned:
    """Read the children's reports until the new process has exec'd (blocking).

    The reports, in order: ``P<pid>`` with a pidfd (or a failure ``E...``
    and nothing more); ``T`` with a pty master (an exec with a terminal
    only); ``N`` with the listener of its ``sysinfo`` filter (with
    ``sysinfo`` set only); then end-of-file, which means exec'd, or a
    failure ``E...``.

    With *on_pid* (a launch whose ``wait_go`` is set), it is called with
    the PID once the init exists and while it waits, before its exec, for
    ``G`` on this socket: what must be ready before the command runs (its
    network interface) is made there. If it raises, the init is told to
    give up (``X``) and the failure is a :class:`SpawnFailed` of step
    ``network`` with the init's PID, for the caller to reap.
    """
    pty_master: int | None = None
    notify = -1
    while True:
        msg, fds, flags, _ = recv_fds(sock, 65536, 1)
        # The init's listener may come before the intermediate's "P":
        # nothing orders the two processes' reports (taking it for a
        # missing "P" killed one start in about a hundred).
        if msg == b"N" and len(fds) == 1 and notify < 0:
            notify = fds[0]
            continue
        break
    if msg[:1] != b"P" or not fds:
        for fd in fds:
            os.close(fd)
        if notify >= 0:
            os.close(notify)
        if msg[:1] == b"E":
            # The init may fail and report before the intermediate's "P"
            # (nothing orders the two): that still comes, with the pidfd
            # the caller needs to reap the init. Without it the init would
            # be left a zombie.
            found = _drain(sock)
            if found is None:
                raise SpawnFailed(decode_failure(msg))
            raise SpawnFailed(decode_failure(msg), *found)
        if flags & socket.MSG_CTRUNC:
            # Its pidfd was dropped: we are at the open-file limit. The
            # child goes on; its cgroup's removal kills it.
            _drain(sock)
            raise SpawnFailed(SetupFailure("spawn", errno.EMFILE, DROPPED))
        raise SpawnFailed(SetupFailure("spawn", 0, NO_REPORT))
    pid_s, _, start_s = msg[1:].partition(b":")
    pid, start, pidfd = int(pid_s), int(start_s or 0), fds[0]
    if on_pid is not None:
        try:
            on_pid(pid)
        except Exception as exc:
            with contextlib.suppress(OSError):
                sock.send(b"X")
            _drain(sock)
            if notify >= 0:
                os.close(notify)
            raise SpawnFailed(SetupFailure("network", 0, str(exc)), pid, pidfd, start) from exc
        # An init that failed meanwhile has closed its end: its report follows.
        with contextlib.suppress(OSError):
            sock.send(b"G")
    try:
        while True:
            msg, fds, flags, _ = recv_fds(sock, 65536, 1)
            if msg == b"T" and len(fds) == 1 and pty_master is None:
                pty_master = fds[0]
                continue
            if msg == b"N" and len(fds) == 1 and notify < 0:
                notify = fds[0]
                continue
            for fd in fds:
                os.close(fd)
            if not msg:
                return Spawned(pid, pidfd, pty_master, start, notify)
            if msg[:1] == b"E":
                failure = decode_failure(msg)
            elif flags & socket.MSG_CTRUNC:
                failure = SetupFailure("spawn", errno.EMFILE, DROPPED)
            else:
                failure = SetupFailure("spawn", 0, f"unexpected report {msg[:40]!r}")
            # The failed process is about to exit, but is it ours to reap
            # yet? Only once the intermediate is gone (the end of file says
            # so, see keeper_main); reaping before would fail, and the
            # zombie left would keep its sandbox's init from ever exiting.
            _drain(sock)
            raise SpawnFailed(failure, pid, pidfd, start)
    except BaseException:
        if pty_master is not None:
            os.close(pty_master)
        if notify >= 0:
            os.close(notify)
        raise


def _drain(sock: socket.socket) -> tuple[int, int, int] | None:
    """Read reports until end of file; the (PID, pidfd, start time) of a
    "P" among them, if any (the pidfd is the caller's), else None."""
    found: tuple[int, int, int] | None = None
    while True:
        msg, fds, _, _ = recv_fds(sock, 65536, 1)
        if msg[:1] == b"P" and len(fds) == 1 and found is None:
            pid_s, _, start_s = msg[1:].partition(b":")
            found = (int(pid_s), fds[0], int(start_s or 0))
            continue
        for fd in fds:
            os.close(fd)
        if not msg:
            return found


def answer_context(cfg: LaunchConfig | ExecConfig, proc: Spawned) -> Context:
    """What the answerer of *proc*'s ``sysinfo`` needs: its sandbox's
    cgroup and the start of its sandbox's init (for an exec, read through
    the init's pidfd, which is the caller's)."""
    if isinstance(cfg, ExecConfig):
        try:
            start = _starttime(pidfd_pid(cfg.target_pidfd))
        except (OSError, ValueError, IndexError):
            start = proc.starttime  # the init is gone: the exec's own start
        return context_of(cfg.cgroup_procs, start)
    return context_of(cfg.cgroup_procs, proc.starttime)


_answerers: dict[str, int] = {}
"""The answerers :func:`spawn_direct` forked, by the key of the process
they answer for (its ``PID:STARTTIME``): their PIDs."""


def _reap_answerer(key: str, timeout: float = 1.0) -> None:
    """Reap the answerer of the process *key*, which has been reaped.

    Its filter's last task is gone once the init of a sandbox is reaped
    (every other task of its PID namespace went first), so the answerer
    sees POLLHUP and ends at once; an exec'd process may leave children
    behind, and its answerer serves them on (then reaped at our exit, or
    by whoever inherits it).
    """
    pid = _answerers.pop(key, None)
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if has_exited(pidfd, timeout):
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        else:
            _answerers[key] = pid
    finally:
        os.close(pidfd)


def _answer_direct(cfg: LaunchConfig | ExecConfig, proc: Spawned) -> Spawned:
    """Give *proc*'s ``sysinfo`` listener to an answerer forked for it."""
    if proc.notify_fd < 0:
        return proc
    key = f"{proc.pid}:{proc.starttime}"
    try:
        _answerers[key] = fork_answerer(key, proc.notify_fd, answer_context(cfg, proc))
    finally:
        # The answerer's alone: if it dies, sysinfo fails (ENOSYS) rather
        # than waiting for an answer nobody will give.
        os.close(proc.notify_fd)
    return proc._replace(notify_fd=-1)


SETUP_NAME = b"corral-setup"
"""The name (``comm``) of an intermediate, the process that sets up a
sandbox or an exec and ends: a zombie of that name handed on to the
supervisor is its to reap (see :meth:`Keeper._reap_orphans`)."""


def run_child(
    cfg: LaunchConfig | ExecConfig, report: socket.socket, stdio: tuple[int, int, int]
) -> NoReturn:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError):
        set_name(SETUP_NAME)  # the init or exec'd process execs before it runs anything
    if isinstance(cfg, ExecConfig):
        run_exec_intermediate(cfg, report, stdio)
    run_intermediate(cfg, report, stdio)


def spawn_direct(
    cfg: LaunchConfig | ExecConfig,
    stdio: tuple[int, int, int] = (0, 1, 2),
    *,
    on_pid: OnPid | None = None,
) -> Spawned:
    """Fork the sandbox (or the exec'd process) from this single-threaded
    process and wait for exec.

    *stdio* are the file descriptors the new process gets as 0, 1 and 2.
    """
    n = thread_count()
    if n != 1:
        raise RuntimeError(
            f"spawn_direct needs a single-threaded process (this one has {n} threads); use a Keeper"
        )
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent:
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                parent.close()
                run_child(cfg, child, stdio)
        finally:
            child.close()
        try:
            proc = collect(parent, on_pid)
        finally:
            os.waitpid(pid, 0)
        return _answer_direct(cfg, proc)


KEEPER_SOCKET = "keeper.sock"
"""The holder keeper's socket, in the run directory."""


class OutputPipes:
    """The read ends of a sandbox's stdout and stderr pipes, shared.

    Their reader (the supervisor's log pumps) and the keeper client
    (:meth:`Keeper.hold`, which gives them again to a keeper that replaces
    a dead one) use the same two descriptors; each end is closed once every
    holder has let go of it (:meth:`let_go`). Copies of their own would
    cost a fleet two descriptors per sandbox, and the open-file limit
    bounds a fleet (see ``docs/performance.md``). Thread-safe.
    """

    __slots__ = ("_lock", "_users", "fds")

    def __init__(self, out_r: int, err_r: int) -> None:
        import threading

        self.fds = (out_r, err_r)
        """stdout's read end, stderr's."""
        self._users = [1, 1]  # the reader's, until it lets go
        self._lock = threading.Lock()

    def share(self) -> None:
        """One more holder of both ends. Raises ValueError if an end is
        closed already (a holder must take its share before the reader
        can be done)."""
        with self._lock:
            if 0 in self._users:
                raise ValueError(f"output pipes {self.fds}: shared after they were closed")
            self._users = [n + 1 for n in self._users]

    def let_go(self, fd: int) -> None:
        """A holder is done with end *fd*; the last one closes it."""
        i = self.fds.index(fd)
        with self._lock:
            if self._users[i] == 0:
                return
            self._users[i] -= 1
            last = self._users[i] == 0
        if last:
            with contextlib.suppress(OSError):
                os.close(fd)

    def let_go_both(self) -> None:
        """A holder is done with both ends."""
        for fd in self.fds:
            self.let_go(fd)


class KeeperError(OSError):
    """The keeper could not be started or reached.

    An OSError: every caller that survives a keeper's death (an
    ``OSError`` on its connection) survives a keeper that cannot be
    replaced just now in the same way; the next call tries again.
    """


class Keeper(Reaper):
    """A fork server for spawning sandboxes from a multi-threaded process.

    Without *run_dir* it is a private helper: a child of this process (so
    the inits it creates are re-parented to us, a child subreaper) that
    exits when :meth:`close` closes its socket.

    With *run_dir* it is also the **holder** of the sandboxes: their
    parent (a child subreaper itself), the keeper of their exit statuses
    (in memory and as ``RUN_DIR/exits/PID-STARTTIME.json``) and of the read
    ends of their output pipes (:meth:`hold`), so that they outlive the
    supervisor without dying of SIGPIPE or losing how they ended. It
    answers the ``sysinfo`` calls of what it spawned with the view
    (:meth:`answer`, done by :meth:`spawn`; see :mod:`._sysinfo`). It
    listens on ``RUN_DIR/keeper.sock``; a keeper already running there is
    connected to (:attr:`reconnected`) rather than a new one started. It
    exits once no supervisor is connected and it holds nothing. If it dies,
    the next request starts another (:attr:`restarts` counts them) and is
    given every pipe and ``sysinfo`` listener held so far again; the sandboxes it was the parent of
    are re-parented to its own parent's subreaper, so this process reaps
    them directly (see :meth:`Reaper.reap`).
    """

    command: tuple[str, ...] = (sys.executable, "-m", "supervisor._runtime._linux._keeper")
    """The keeper's program; it is given its socket's descriptor and the
    run directory as arguments."""

    START_ATTEMPTS = 3
    """Keepers started, at most, for one start: one killed before it said
    it was ready is followed by another."""

    def __init__(self, run_dir: str | None = None) -> None:
        import threading

        self.run_dir = run_dir
        self.restarts = 0
        """How many times a dead keeper was replaced."""
        self.reconnected = False
        """True if the keeper was running already (a supervisor before us started it)."""
        self._lock = threading.Lock()
        self._proc: Any = None  # subprocess.Popen of a keeper we started
        self._pid = 0
        self._forker = -1  # a pidfd of its forker (see _collect_forker)
        # key -> the output pipes' read ends given to the keeper (shared
        # with their reader), to give them again to a keeper that replaces
        # a dead one.
        self._held: dict[str, OutputPipes] = {}
        # key -> our duplicate of a sysinfo listener given to the keeper and
        # its context: the same, and while we hold it a keeper's death makes
        # sysinfo wait for the next keeper instead of failing (ENOSYS).
        self._listeners: dict[str, tuple[int, Context]] = {}
        # Those copies in an epoll set: a copy polls POLLHUP once every
        # process of its filter has ended (see _forget_ended).
        import select

        self._hangups = select.epoll()
        self._listener_keys: dict[int, str] = {}
        # (PID, start time) of the processes whose status was read from
        # their zombie while a keeper was their parent (see _from_zombie).
        self._unreaped: set[tuple[int, int]] = set()
        self._sock = self._connect_or_start()

    # -- connection -------------------------------------------------------

    def _connect_or_start(self) -> socket.socket:
        if self.run_dir is not None:
            sock = self._connect()
            if sock is not None:
                self.reconnected = True
                return sock
        return self._start()

    def _connect(self) -> socket.socket | None:
        assert self.run_dir is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.path.join(self.run_dir, KEEPER_SOCKET))
            # A keeper on its way out may still accept: only an answer counts.
            answer = _answer(sock, {"hello": None})
        except OSError:
            sock.close()
            return None
        if not isinstance(answer, dict) or "pid" not in answer:
            sock.close()
            return None
        self._pid = int(answer["pid"])
        return sock

    def _start(self) -> socket.socket:
        import subprocess

        for _ in range(self.START_ATTEMPTS):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            argv = [*self.command, str(theirs.fileno())]
            if self.run_dir is not None:
                argv.append(self.run_dir)
            # A holder outlives us: it must not hold our stdout and stderr
            # (whoever reads them would wait for it); its own complaints
            # go to RUN_DIR/keeper.log.
            log: Any = None
            if self.run_dir is not None:
                make_run_dir(self.run_dir)
                log = open(  # noqa: SIM115 - closed below, once the child has it
                    os.path.join(self.run_dir, "keeper.log"), "ab"
                )
            with theirs, log or contextlib.nullcontext():
                # subprocess forks and execs in C (posix_spawn / vfork): no
                # Python runs in the child, so this is safe with threads around.
                proc = subprocess.Popen(
                    argv,
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL if log else None,
                    stderr=log,
                    # Its own session: a Ctrl-C or a hang-up on the
                    # supervisor's terminal must reach the supervisor (which
                    # stops sandboxes gracefully), not the keeper.
                    start_new_session=True,
                )
            msg = b""
            with contextlib.suppress(OSError):
                msg = ours.recv(64)
            if msg == b"ready" or msg.startswith(b"ready "):
                self._proc, self._pid = proc, proc.pid
                self._forker = _pidfd_of(msg[6:])
                return ours
            ours.close()
            proc.wait()
            if msg == b"busy" and self.run_dir is not None:
                # Another keeper holds the run directory (it was starting
                # while we looked): use it.
                sock = self._connect()
                if sock is not None:
                    self.reconnected = True
                    return sock
                continue
            if msg == b"" and proc.returncode < 0:
                # Killed before it could say ready (by a signal: an OOM
                # kill, an operator): a fresh one may well start.
                continue
            break
        raise KeeperError("the spawn keeper failed to start")

    def _current(self) -> socket.socket:
        with self._lock:
            return self._sock

    def _replace(self, dead: socket.socket) -> socket.socket:
        """A new keeper for the dead one behind *dead* (once, however many
        threads found it dead), given every held pipe again."""
        with self._lock:
            if self._sock is not dead:
                return self._sock
            # Closed even if no keeper can be started now: every later
            # call finds it closed (an OSError) and tries again.
            dead.close()
            if self._proc is not None:
                # Ours: collect it. It is dead (its socket said so).
                with contextlib.suppress(Exception):
                    self._proc.wait(timeout=5)
                self._proc = None
                self._collect_forker()
                # Reaped, so it has handed its children on to us.
                self._reap_orphans()
            self._unreaped.clear()
            sock = self._connect_or_start()
            # Open still: their share is let go of only by release(),
            # under this lock.
            for key, pipes in self._held.items():
                with contextlib.suppress(OSError):
                    _send(sock, {"hold": key}, list(pipes.fds))
            for key, (fd, ctx) in self._listeners.items():
                with contextlib.suppress(OSError):
                    _send(sock, {"sysinfo": [key, list(ctx)]}, [fd])
            self._sock = sock
            self.restarts += 1
            return sock

    def _send(self, payload: dict[str, Any], fds: Sequence[int] = ()) -> None:
        sock = self._current()
        try:
            _send(sock, payload, fds)
        except OSError:
            _send(self._replace(sock), payload, fds)

    def _ask(self, payload: dict[str, Any], fds: Sequence[int] = ()) -> Any:
        """Send a request with a reply socket; return the decoded answer,
        or None if the keeper died before answering."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with parent:
            with child:
                self._send(payload, [child.fileno(), *fds])
            msg = parent.recv(1 << 16)
        return _unpack(msg) if msg else None

    @property
    def pid(self) -> int:
        """The keeper's PID."""
        return self._pid

    def watch_fd(self) -> int:
        """A descriptor of the connection to the keeper, the caller's to
        close: it polls readable (end of file) only when that keeper has
        died; then call :meth:`check`. An OSError if there is no keeper
        (its replacement failed): call :meth:`check` to try again.

        A copy, not the connection itself: whichever thread finds the
        keeper dead closes the connection, and an event loop still
        polling a closed descriptor would poll whatever reuses its number.
        """
        with self._lock:
            return os.dup(self._sock.fileno())

    def check(self) -> bool:
        """Replace the keeper if it has died; True if it was replaced."""
        sock = self._current()
        try:
            dead = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            dead = False
        except OSError:
            dead = True
        if dead:
            self._replace(sock)
        return dead

    # -- spawning ---------------------------------------------------------

    def request(self, cfg: LaunchConfig | ExecConfig, stdio: tuple[int, int, int]) -> socket.socket:
        """Ask for a sandbox or an exec; returns the report socket to :func:`collect` from.

        *stdio* are the file descriptors the new process gets as 0, 1 and 2.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with child:
            fds = [child.fileno(), *stdio]
            payload: dict[str, Any]
            if isinstance(cfg, ExecConfig):
                payload = {"exec": cfg.to_dict()}
                fds.append(cfg.target_pidfd)
            else:
                payload = {"launch": cfg.to_dict()}
            try:
                self._send(payload, fds)
            except BaseException:
                parent.close()
                raise
        return parent

    def spawn(
        self,
        cfg: LaunchConfig | ExecConfig,
        stdio: tuple[int, int, int] = (0, 1, 2),
        *,
        on_pid: OnPid | None = None,
    ) -> Spawned:
        """Blocking convenience: request and collect.

        A request the keeper died with before it forked (the report socket
        closed with no report, and the keeper is dead: a forked
        intermediate would hold the socket and report) is made once more,
        to the keeper that replaces it: a keeper's death costs no sandbox.
        """
        for attempt in (1, 2):
            keeper = self._current()
            with self.request(cfg, stdio) as sock:
                try:
                    proc = collect(sock, on_pid)
                except SpawnFailed as exc:
                    if attempt == 2 or exc.pid is not None or exc.failure.message != NO_REPORT:
                        raise
                    if keeper is self._current() and not self.check():
                        raise  # the keeper lives: its child died (not a retry case)
                    continue
            if proc.notify_fd >= 0:
                # The process runs: a listener we could not hand over (out
                # of descriptors) costs it only its sysinfo (ENOSYS).
                with contextlib.suppress(OSError):
                    self.answer(f"{proc.pid}:{proc.starttime}", proc.notify_fd, cfg, proc)
                os.close(proc.notify_fd)
            return proc._replace(notify_fd=-1)
        raise AssertionError("unreachable")  # pragma: no cover

    def answer(
        self, key: str, listener: int, cfg: LaunchConfig | ExecConfig, proc: Spawned
    ) -> None:
        """Have the keeper answer ``sysinfo`` on *listener* (the caller's
        still) for *proc*, started from *cfg*; keep a copy of it. A keeper
        that cannot be reached leaves the process's ``sysinfo`` waiting for
        the next one (we hold the copy)."""
        self._forget_ended()
        ctx = answer_context(cfg, proc)
        dup = os.dup(listener)
        with self._lock:
            self._keep_listener(key, (dup, ctx))
        with contextlib.suppress(OSError):
            self._send({"sysinfo": [key, list(ctx)]}, [listener])

    def _keep_listener(self, key: str, entry: tuple[int, Context]) -> None:
        """Keep *entry* as the copy of *key*'s listener (under the lock),
        closing the one it replaces."""
        import select

        old = self._listeners.pop(key, None)
        if old is not None:
            self._drop_listener(old[0])
        if self._hangups.closed:  # closed meanwhile: nothing to keep it for
            _close([entry[0]])
            return
        self._listeners[key] = entry
        self._listener_keys[entry[0]] = key
        self._hangups.register(entry[0], select.EPOLLIN)

    def _drop_listener(self, fd: int) -> None:
        # Out of the epoll set before the number can be reused.
        with contextlib.suppress(OSError):
            self._hangups.unregister(fd)
        self._listener_keys.pop(fd, None)
        _close([fd])

    def _forget_ended(self) -> None:
        """Close our copies of listeners whose processes have all ended
        (their filter has no task left: the listener polls POLLHUP).

        One epoll_wait for the lot: polling each copy on every start and
        every reap cost milliseconds per sandbox at a thousand of them."""
        import select

        with self._lock:
            if self._hangups.closed:
                return
            for fd, events in self._hangups.poll(0):
                if events & (select.EPOLLHUP | select.EPOLLERR):
                    key = self._listener_keys.get(fd)
                    if key is not None and self._listeners.get(key, (-1,))[0] == fd:
                        del self._listeners[key]
                    self._drop_listener(fd)

    # -- holding ----------------------------------------------------------

    def hold(self, key: str, pipes: OutputPipes) -> None:
        """Have the keeper keep the read ends of sandbox *key*'s output
        pipes open until :meth:`release`, so that it never dies of SIGPIPE
        while no supervisor reads them (it blocks once a pipe is full).
        This client takes a share of *pipes* (see :class:`OutputPipes`)
        until then, taken even if the keeper cannot be told now."""
        pipes.share()
        with self._lock:
            old = self._held.pop(key, None)
            self._held[key] = pipes
        if old is not None:
            old.let_go_both()
        self._send({"hold": key}, list(pipes.fds))

    def release(self, key: str) -> None:
        """The keeper may close what it holds for sandbox *key*."""
        with self._lock:
            pipes = self._held.pop(key, None)
        if pipes is not None:
            pipes.let_go_both()
        with contextlib.suppress(OSError):
            self._send({"release": key})

    def held(self) -> tuple[dict[str, OutputPipes], dict[tuple[int, int], ExitStatus]]:
        """What the keeper holds: the pipes' read ends by key (new
        descriptors: the caller is their reader, and lets go of them), and
        the exit statuses it keeps by (PID, start time). Pipes listed are
        held on from now on (as if by :meth:`hold`); so are the
        ``sysinfo`` listeners it answers on (kept here, for a keeper that
        replaces it)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pipes: dict[str, OutputPipes] = {}
        exits: dict[tuple[int, int], ExitStatus] = {}
        listeners: dict[str, tuple[int, Context]] = {}
        with parent:
            with child:
                self._send({"list": None}, [child.fileno()])
            while True:
                msg, fds, _, _ = recv_fds(parent, 1 << 20, 2)
                if not msg:
                    break
                answer = _unpack(msg)
                if "held" in answer and len(fds) == 2:
                    pipes[str(answer["held"])] = OutputPipes(fds[0], fds[1])
                    continue
                if "sysinfo" in answer and len(fds) == 1:
                    key, ctx = answer["sysinfo"]
                    listeners[str(key)] = (fds[0], Context([str(c) for c in ctx[0]], int(ctx[1])))
                    continue
                _close(fds)
                for pid, start, code, sig in answer.get("exits", ()):
                    exits[(pid, start)] = ExitStatus(code, sig)
        with self._lock:
            for key, shared in pipes.items():
                shared.share()
                old = self._held.pop(key, None)
                if old is not None:
                    old.let_go_both()  # the same pipes: the keeper's copies replace them
                self._held[key] = shared
            for key, entry in listeners.items():
                self._keep_listener(key, entry)
        return pipes, exits

    # -- reaping ----------------------------------------------------------

    def _not_ours(self, proc: Spawned, block: bool) -> ExitStatus | None:
        if proc.starttime and proc.pidfd >= 0:
            # Ended: the kernel says how, without a round trip to the
            # keeper (which keeps the status until it is told to forget
            # it): from the zombie, or once the keeper reaped it (on
            # SIGCHLD) from the pidfd. In that order: a reap in between
            # is still seen.
            status = zombie_status(proc.pid, proc.starttime)
            if status is not None:
                self._from_zombie(proc)
            else:
                status = reaped_status(proc.pidfd)
            if status is not None and os.WIFEXITED(status):
                return ExitStatus(os.WEXITSTATUS(status), None)
            if status is not None:
                return ExitStatus(None, os.WTERMSIG(status))
        while True:
            answer = self._ask({"wait": [proc.pid, proc.starttime, block]})
            if answer is None:
                # The keeper died: its children are ours now (we are the
                # subreaper above it), or the host's init's.
                if proc.pidfd < 0:
                    return LOST
                try:
                    info = os.waitid(
                        os.P_PIDFD, proc.pidfd, os.WEXITED | (0 if block else os.WNOHANG)
                    )
                except ChildProcessError:
                    continue  # ask the keeper that replaced it
                if info is None or not info.si_pid:
                    return None
                return exit_status(info)
            if "exited" in answer:
                code, sig = answer["exited"]
                return ExitStatus(code, sig)
            if "running" in answer:
                return None
            return super()._not_ours(proc, block)

    def _from_zombie(self, proc: Spawned) -> None:
        """*proc*'s status was read from its zombie, which the keeper (its
        parent: ours it would have been reaped by ``waitid``) will reap.

        Unless the keeper dies first: then the zombie is handed on to us,
        the subreaper above it, and nobody would reap it. A zombie holds
        its PID, and an exec'd process's zombie holds its sandbox's PID
        namespace: the sandbox's init, when it ends, waits in the kernel
        until every process of its namespace is reaped (seen: a fleet's
        stop that never ended, its keeper having been killed). So it is
        noted, for :meth:`_replace` to reap if the keeper dies; and reaped
        here if that has happened already. Noted under the lock that
        :meth:`_replace` holds, then tried: one or the other reaps it.
        """
        with self._lock:
            self._unreaped.add((proc.pid, proc.starttime))
            if len(self._unreaped) > 1024:
                # Those reaped by the keeper meanwhile (as almost all are).
                self._unreaped = {
                    (pid, start) for pid, start in self._unreaped if zombie_status(pid, start)
                }
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED | os.WNOHANG)

    def _reap_orphans(self) -> None:
        """Reap the zombies a dead keeper handed on to us whose status was
        read already (see :meth:`_from_zombie`), and its intermediates.
        Called with the lock held, once the keeper is reaped.

        An intermediate caught mid-setup by its forker's death is ours
        now; nobody else waits for it. It ends within moments (it forks
        and reports): those still running are given a second, then left
        to the next keeper's death, or to our own end.
        """
        import time

        setups = []
        for child in _children():
            # A child's PID is not another's before we reap it: the name
            # first, a descriptor only for the few set-up processes.
            with contextlib.suppress(OSError), open(f"/proc/{child}/comm", "rb") as f:
                if f.read().rstrip(b"\n") == SETUP_NAME:
                    setups.append(os.pidfd_open(child))
        deadline = time.monotonic() + 1.0
        for pidfd in setups:
            with contextlib.suppress(ChildProcessError, OSError):
                if has_exited(pidfd, max(0.0, deadline - time.monotonic())):
                    os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            os.close(pidfd)
        for pid, start in self._unreaped:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # reaped: by the keeper, or by _from_zombie
            try:
                # The pidfd names one process; the start time says it is
                # that one (a zombie's PID cannot be another's meanwhile).
                if zombie_status(pid, start) is not None:
                    with contextlib.suppress(ChildProcessError):
                        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            finally:
                os.close(pidfd)

    def forget(self, proc: Spawned) -> None:
        # Its listener's last task may have been this one: our copy goes
        # now, not at the next spawn.
        self._forget_ended()
        with contextlib.suppress(OSError):
            self._send({"forget": [proc.pid, proc.starttime]})

    def forget_exit(self, pid: int, starttime: int) -> None:
        """Drop the exit status the keeper keeps for (*pid*, *starttime*)."""
        with contextlib.suppress(OSError):
            self._send({"forget": [pid, starttime]})

    # -- end --------------------------------------------------------------

    def close(self) -> None:
        """Disconnect. A keeper we started and that holds nothing exits;
        one that holds sandboxes runs on for the next supervisor."""
        import subprocess

        with self._lock:
            self._sock.close()
            held, self._held = self._held, {}
            listeners, self._listeners = self._listeners, {}
            self._listener_keys.clear()
            self._hangups.close()
        for pipes in held.values():
            pipes.let_go_both()
        _close([fd for fd, _ in listeners.values()])
        if self._proc is None:
            return
        if held and self.run_dir is not None:
            # A holder still holding sandboxes stays, for the next
            # supervisor (a hand-over must not wait for it).
            self._drop_forker()
            return
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if self.run_dir is None:
                self._proc.kill()
                self._proc.wait()
                self._collect_forker()
            # A holder still holding sandboxes stays, for the next supervisor.
        else:
            self._drop_forker()  # the keeper reaped its forker

    def _drop_forker(self) -> None:
        if self._forker >= 0:
            os.close(self._forker)
            self._forker = -1

    def _collect_forker(self) -> None:
        """Reap the forker of a keeper we started that was killed.

        The keeper forks sandboxes from a child of its own (see
        :mod:`._keeper`); killed with its keeper (a parent-death signal), it
        is handed on to us, a child subreaper, and would stay a zombie. A
        pidfd taken while the keeper lived names it, whatever reuses its PID.
        """
        fd, self._forker = self._forker, -1
        if fd < 0:
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PIDFD, fd, os.WEXITED)
        os.close(fd)

    def __enter__(self) -> Keeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _children() -> list[int]:
    """The PIDs of our children (those handed on to us included: to a
    thread of ours, whichever; hence every thread's list)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def _pidfd_of(pid: bytes) -> int:
    """A pidfd of the forker whose PID a keeper said (-1: an older keeper
    that forks itself, or the forker is gone already)."""
    try:
        return os.pidfd_open(int(pid))
    except (ValueError, OSError):
        return -1


def _send(sock: socket.socket, payload: dict[str, Any], fds: Sequence[int] = ()) -> None:
    import msgpack  # type: ignore[import-untyped]

    socket.send_fds(sock, [msgpack.packb(payload)], list(fds))


def _unpack(msg: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(msg)


def _answer(sock: socket.socket, payload: dict[str, Any]) -> Any:
    """Send *payload* on *sock* with a reply socket; the decoded answer."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent:
        with child:
            _send(sock, payload, [child.fileno()])
        parent.settimeout(10)
        msg = parent.recv(1 << 16)
    return _unpack(msg) if msg else None


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def decode_request(request: Any, extra_fds: list[int]) -> LaunchConfig | ExecConfig:
    """The config of a keeper request; *extra_fds* are the descriptors after stdio."""
    if not isinstance(request, dict) or len(request) != 1:
        raise ValueError("expected a map with one key, 'launch' or 'exec'")
    ((kind, config),) = request.items()
    if kind == "launch" and not extra_fds:
        return LaunchConfig.from_dict(config)
    if kind == "exec" and len(extra_fds) == 1:
        # The number the sender wrote is its own; the descriptor arrived as ours.
        return ExecConfig.from_dict(config)._replace(target_pidfd=extra_fds[0])
    raise ValueError(f"a {kind!r} request with {len(extra_fds)} extra descriptors")


def failure_json(step: str, message: str) -> bytes:
    """A failure report of the keeper itself (wire form, without the ``E``)."""
    import json

    return json.dumps({"step": step, "errno": 0, "message": message, "kind": "setup"}).encode()
