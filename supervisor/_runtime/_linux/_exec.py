"""What runs in the forked children that add a process to a running sandbox.

The arrangement, for a spawner process S (see :mod:`._child`; always
single-threaded) given a pidfd of the sandbox's init::

    S ──fork──> intermediate: join the sandbox's cgroup, close other fds,
                 │            become undumpable,
                 │            setns(pidfd, every namespace) at once, fork,
                 │            send the new process's PID and a pidfd up,
                 │            open the gate, exit
                 └─fork──> the new process (in the sandbox's PID namespace):
                           wait at the gate, setsid, chdir to the workdir,
                           find the command; with a terminal, open one on the
                           sandbox's own /dev/ptmx and send the master up;
                           restrict like the sandbox; exec

The cgroup is joined first: after ``setns`` the host's ``/sys/fs/cgroup``
is out of sight. The intermediate is needed because joining a PID namespace
only applies to children (as with ``unshare``). Joining the mount namespace
also sets the root and the working directory to the namespace's root, which
is the pivoted sandbox root (the tests check this).

Messages on the report socket, in this order:

1. ``P<pid>`` with a pidfd of the new process, from the intermediate; or a
   failure ``E{json}`` and nothing more.
2. With a terminal only: ``T`` with the pty master, from the new process.
3. End-of-file once the new process has exec'd (the socket is
   close-on-exec), or a failure ``E{json}`` from it.

The order is enforced by a gate: the new process waits for the
intermediate to write to a pipe after step 1 before it reports anything.
If the intermediate fails after the fork, it kills and reaps the new
process itself and reports only the failure.

Nothing is imported once the sandbox's mount namespace is joined (every
import of this module is at its top): an import there would read Python
files of the sandbox's root into a process with the host's privileges.

Where the new process ends up: when the intermediate exits, the kernel
re-parents the orphan to the nearest child subreaper among the
intermediate's ancestors in the intermediate's *own* PID namespace (the
host's), not to the sandbox's init (``find_new_reaper`` in
kernel/exit.c), so, like a sandbox init, it becomes a child of the process
that owns the sandbox, which waits on its pidfd and gets its exit status.
Its parent is outside its PID namespace: inside, its PPID reads 0. The
flip side: when the sandbox's init dies the kernel kills the process, and
the init does not finish exiting until its owner has reaped it
(``zap_pid_namespace`` waits for every PID of the namespace).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import termios

from . import _syscalls as sc
from ._child import (
    _NS_FLAGS,
    _install_stdio,
    _join_cgroup,
    _report,
    _Step,
    become_userns_root,
    close_fds_except,
    enter_workdir_and_find,
    resolve_user,
    restrict_like_sandbox,
)
from ._proc import starttime

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple, NoReturn
else:
    from .._tuples import NamedTuple

__all__ = ["ExecConfig", "run_exec_intermediate"]

# <asm-generic/ioctls.h>; termios lacks these two.
_TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock/unlock the pty slave
_TIOCGPTPEER = 0x5441  # _IO('T', 0x41): open the slave through the master (Linux 4.13)


class ExecConfig(NamedTuple):
    """Everything the exec children need, as plain data (it crosses to the keeper)."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    cgroup_procs: list[str]
    target_pidfd: int
    """A pidfd of the sandbox's init, as a descriptor number of the spawner's
    process. A forked child inherits it; the keeper protocol sends the
    descriptor itself (SCM_RIGHTS) and the keeper puts its own number here.
    A pidfd, never a PID: a PID could be reused by another process."""
    caps: list[int] | None = None
    """The sandbox's capabilities, as its own processes have them (None: all)."""
    last_cap: int = -1
    """The host kernel's highest capability number."""
    no_new_privs: bool = False
    """Set ``no_new_privs`` before the exec, as the sandbox's init did."""
    seccomp: list[bytes] | None = None
    """The sandbox's seccomp programs, loaded in order."""
    rlimits: list[list[int]] | None = None
    """The sandbox's rlimits, ``[resource, soft, hard]``."""
    userns: bool = False
    """The sandbox has a user namespace of its own: join it too, as its root."""
    tty: bool = False
    """Give the process a new terminal of the sandbox's devpts as 0, 1, 2
    and send its master up, instead of using the spawner's stdio."""
    winsize: list[int] | None = None
    """The terminal's initial rows and columns: set before the command runs,
    which may ask at once (the client's SIGWINCH updates come later)."""
    user: str | None = None
    """``UID[:GID]`` or ``NAME[:GROUP]`` to run as, resolved in the
    sandbox's ``/etc/passwd`` (None: root)."""
    sysinfo: bool = False
    """Trap ``sysinfo(2)`` for the spawner to answer, as the sandbox's init
    does (see :mod:`._sysinfo`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for the keeper protocol."""
        return self._asdict()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def run_exec_intermediate(
    cfg: ExecConfig, report: socket.socket, stdio: tuple[int, int, int] = (0, 1, 2)
) -> NoReturn:
    """Body of the intermediate child of an exec; never returns, never raises.

    *stdio* become the new process's file descriptors 0, 1 and 2 (unless
    ``cfg.tty``).
    """
    step = "set up stdio"
    pid = 0
    try:
        _install_stdio(stdio)
        step = "join cgroup"
        _join_cgroup(cfg.cgroup_procs)
        step = "close descriptors"
        # Our child will hold whatever we hold while it is visible in the
        # sandbox, before restrict_like_sandbox closes the rest: keep only
        # stdio, the report socket and the pidfd (a direct spawner's fork
        # inherits every descriptor of its process).
        # The host's /proc, to read our child's start time once we are in
        # the sandbox's mount namespace (its /proc shows its own PIDs).
        proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        close_fds_except(report.fileno(), cfg.target_pidfd, proc)
        step = "join namespaces"
        # From the fork below until its exec, our child is a copy of the
        # host's Python visible in the sandbox's /proc. Undumpable, its
        # /proc/PID/exe, mem, fd... are closed to the sandbox's processes
        # (runc CVE-2019-5736: a sandbox overwriting the host binary
        # through /proc/PID/exe). The flag is inherited by the fork.
        sc.set_dumpable(False)
        sc.setns(cfg.target_pidfd, _NS_FLAGS | (sc.CLONE_NEWUSER if cfg.userns else 0))
        os.close(cfg.target_pidfd)
        if cfg.userns:
            become_userns_root()
        step = "fork"
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(gate_w)
            os.close(proc)  # the host's /proc stays out of the sandbox
            _run_exec_child(cfg, report, gate_r)
        os.close(gate_r)
        step = "report"
        pidfd = os.pidfd_open(pid)
        socket.send_fds(report, [b"P%d:%d" % (pid, starttime(pid, proc))], [pidfd])
        os.write(gate_w, b"go")
        os._exit(0)
    except BaseException as exc:
        if pid > 0:
            # Our own unreaped child: its PID cannot have been reused.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        _report(report, exc, step)
        os._exit(1)


def _run_exec_child(cfg: ExecConfig, report: socket.socket, gate: int) -> NoReturn:
    step = "start"
    try:
        # Report nothing before the intermediate's "P" message. Without
        # "go" the intermediate failed: it kills and reaps us.
        if os.read(gate, 2) != b"go":
            os._exit(1)
        os.close(gate)
        # Never in the caller's session nor under its controlling terminal
        # (with a terminal, the session is needed to acquire the new one).
        os.setsid()
        identity = None
        if cfg.user is not None:
            step = "user"
            identity = resolve_user(cfg.user)
            cfg.env.setdefault("HOME", identity.home)
        step = "workdir"
        path = enter_workdir_and_find(cfg.workdir, cfg.argv[0], cfg.env)
        if cfg.tty:
            step = "open a terminal"
            _open_tty(report, cfg.winsize)
            if identity is not None:
                # The terminal is the user's, as a login would make it.
                os.fchown(0, identity.uid, -1)
        step = "restrict"
        restrict_like_sandbox(report, cfg, identity)
        step = "exec"
        try:
            os.execve(path, cfg.argv, cfg.env)
        except OSError as exc:
            raise _exec_failure(cfg.argv[0], exc) from exc
    except BaseException as exc:
        _report(report, exc, step)
        os._exit(127)


def _open_tty(report: socket.socket, winsize: list[int] | None) -> None:
    """A new terminal of the sandbox's devpts as our controlling terminal
    and fds 0, 1, 2; its master goes up the *report* socket."""
    # Our root is the sandbox's: this is the sandbox's /dev/ptmx (a link to
    # its private devpts's pts/ptmx), so the slave is a /dev/pts/N inside.
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISCHR(os.fstat(master).st_mode):
            raise _Step("open a terminal", "/dev/ptmx in the sandbox is not a character device")
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        if winsize:
            rows, cols = winsize
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        # Through the master, not a path: nothing in the sandbox can put
        # another file where the slave should be.
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        try:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for n in (0, 1, 2):
                os.dup2(slave, n)
        finally:
            if slave > 2:
                os.close(slave)
        socket.send_fds(report, [b"T"], [master])
    finally:
        os.close(master)


def _exec_failure(cmd: str, exc: OSError) -> _Step:
    """``execve`` refused a file that :func:`._child._resolve` found: classify
    like a shell does (127 for a missing file or interpreter, 126 otherwise)."""
    err = exc.errno or 0
    reason = exc.strerror or str(exc)
    if err in (errno.ENOENT, errno.ENOTDIR):
        return _Step("exec", f"{cmd!r}: {reason} (or its interpreter)", err, kind="notfound")
    if err in (errno.EACCES, errno.ENOEXEC, errno.EPERM, errno.EISDIR, errno.ETXTBSY):
        return _Step("exec", f"{cmd!r} cannot be run: {reason}", err, kind="noexec")
    return _Step("exec", f"{cmd!r}: {reason}", err)
