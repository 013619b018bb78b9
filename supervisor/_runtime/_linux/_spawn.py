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

import os
import signal
import socket
import sys
from typing import Any, NamedTuple, NoReturn

from ._child import LaunchConfig, SetupFailure, decode_failure, run_intermediate
from ._exec import ExecConfig, run_exec_intermediate

__all__ = ["Keeper", "SpawnFailed", "Spawned", "collect", "spawn_direct"]


class Spawned(NamedTuple):
    """A sandbox init (or exec'd process) that has exec'd: its host PID and a pidfd for it."""

    pid: int
    pidfd: int
    pty_master: int | None = None
    """The master of the process's terminal (an exec with ``tty``); the caller owns it."""


class SpawnFailed(Exception):
    """The children reported a failure.

    If the init already existed, ``pid``/``pidfd`` are set and the caller
    must reap it (it exits by itself right after reporting).
    """

    def __init__(self, failure: SetupFailure, pid: int | None = None, pidfd: int | None = None):
        super().__init__(failure.message)
        self.failure = failure
        self.pid = pid
        self.pidfd = pidfd


def _recv_fds(sock: socket.socket, size: int, maxfds: int) -> tuple[bytes, list[int], int, object]:
    """``socket.recv_fds`` with every received descriptor close-on-exec.

    Received descriptors are inheritable, and Python's recvmsg does not
    honour MSG_CMSG_CLOEXEC; a report socket that survived the init's exec
    would never give the end-of-file that means "exec'd".
    """
    msg, fds, flags, addr = socket.recv_fds(sock, size, maxfds)
    for fd in fds:
        os.set_inheritable(fd, False)
    return msg, fds, flags, addr


def _threads() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Threads:"):
                return int(line.split()[1])
    return 0


def collect(sock: socket.socket) -> Spawned:
    """Read the children's reports until the new process has exec'd (blocking).

    The reports, in order: ``P<pid>`` with a pidfd (or a failure ``E...``
    and nothing more); ``T`` with a pty master (an exec with a terminal
    only); then end-of-file, which means exec'd, or a failure ``E...``.
    """
    msg, fds, _, _ = _recv_fds(sock, 65536, 1)
    if msg[:1] != b"P" or not fds:
        for fd in fds:
            os.close(fd)
        if msg[:1] == b"E":
            raise SpawnFailed(decode_failure(msg))
        raise SpawnFailed(SetupFailure("spawn", 0, "the setup process died without a report"))
    pid, pidfd = int(msg[1:]), fds[0]
    pty_master: int | None = None
    try:
        while True:
            msg, fds, _, _ = _recv_fds(sock, 65536, 1)
            if msg == b"T" and len(fds) == 1 and pty_master is None:
                pty_master = fds[0]
                continue
            for fd in fds:
                os.close(fd)
            if not msg:
                return Spawned(pid, pidfd, pty_master)
            failure = (
                decode_failure(msg)
                if msg[:1] == b"E"
                else SetupFailure("spawn", 0, f"unexpected report {msg[:40]!r}")
            )
            # The failed process is about to exit, but is it ours to reap
            # yet? Only once the intermediate is gone (the end of file says
            # so, see keeper_main); reaping before would fail, and the
            # zombie left would keep its sandbox's init from ever exiting.
            _drain(sock)
            raise SpawnFailed(failure, pid, pidfd)
    except BaseException:
        if pty_master is not None:
            os.close(pty_master)
        raise


def _drain(sock: socket.socket) -> None:
    """Read (and drop) reports until end of file."""
    while True:
        msg, fds, _, _ = _recv_fds(sock, 65536, 1)
        for fd in fds:
            os.close(fd)
        if not msg:
            return


def _run_child(
    cfg: LaunchConfig | ExecConfig, report: socket.socket, stdio: tuple[int, int, int]
) -> NoReturn:  # pragma: no cover - runs in the child
    if isinstance(cfg, ExecConfig):
        run_exec_intermediate(cfg, report, stdio)
    run_intermediate(cfg, report, stdio)


def spawn_direct(
    cfg: LaunchConfig | ExecConfig, stdio: tuple[int, int, int] = (0, 1, 2)
) -> Spawned:
    """Fork the sandbox (or the exec'd process) from this single-threaded
    process and wait for exec.

    *stdio* are the file descriptors the new process gets as 0, 1 and 2.
    """
    n = _threads()
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
                _run_child(cfg, child, stdio)
        finally:
            child.close()
        try:
            return collect(parent)
        finally:
            os.waitpid(pid, 0)


class Keeper:
    """A fork server for spawning sandboxes from a multi-threaded process.

    Start it before anything else needs it; it is a child of this process
    (so inits it creates are re-parented to us) and exits when the control
    socket closes.
    """

    def __init__(self) -> None:
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # subprocess forks and execs in C (posix_spawn / vfork): no
            # Python runs in the child, so this is safe with threads around.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor._runtime._linux._keeper", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C on the supervisor's terminal must
                # reach the supervisor (which stops sandboxes gracefully),
                # not the keeper and every sandbox directly.
                start_new_session=True,
            )
        self._sock = ours
        msg = self._sock.recv(16)
        if msg != b"ready":
            self.close()
            raise RuntimeError("the spawn keeper failed to start")

    @property
    def pid(self) -> int:
        """The keeper's PID."""
        return self._proc.pid

    def request(self, cfg: LaunchConfig | ExecConfig, stdio: tuple[int, int, int]) -> socket.socket:
        """Ask for a sandbox or an exec; returns the report socket to :func:`collect` from.

        *stdio* are the file descriptors the new process gets as 0, 1 and 2.
        """
        import msgpack  # type: ignore[import-untyped]

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with child:
            fds = [child.fileno(), *stdio]
            payload: dict[str, Any]
            if isinstance(cfg, ExecConfig):
                payload = {"exec": cfg.to_dict()}
                fds.append(cfg.target_pidfd)
            else:
                payload = {"launch": cfg.to_dict()}
            socket.send_fds(self._sock, [msgpack.packb(payload)], fds)
        return parent

    def spawn(
        self, cfg: LaunchConfig | ExecConfig, stdio: tuple[int, int, int] = (0, 1, 2)
    ) -> Spawned:
        """Blocking convenience: request and collect."""
        with self.request(cfg, stdio) as sock:
            return collect(sock)

    def close(self) -> None:
        """Stop the keeper (sandboxes it started keep running)."""
        import subprocess

        self._sock.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Keeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keeper_main(fd: int) -> None:
    """The keeper's loop: one request, one fork, until the socket closes."""
    import msgpack

    ctl = socket.socket(fileno=fd)
    n = _threads()
    if n != 1:
        raise SystemExit(f"corral keeper: expected one thread, found {n}")
    # The supervisor decides when we stop: when it closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl.send(b"ready")
    while True:
        try:
            msg, fds, _, _ = _recv_fds(ctl, 1 << 20, 5)
        except OSError:
            return
        if not msg:
            return
        if len(fds) < 4:  # not even a report socket and stdio: nobody to tell
            for fd in fds:
                os.close(fd)
            continue
        report = socket.socket(fileno=fds[0])
        try:
            cfg = _decode_request(msgpack.unpackb(msg), fds[4:])
        except Exception as exc:
            report.send(b"E" + _failure_json("keeper", f"bad request: {exc}"))
            report.close()
            for fd in fds[1:]:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            ctl.close()
            _run_child(cfg, report, (fds[1], fds[2], fds[3]))
        for fd in fds[1:]:
            os.close(fd)
        os.waitpid(pid, 0)
        # Only now, with the intermediate reaped, may the requester see the
        # end of file that means "exec'd": the intermediate closes its copy
        # of the socket before the kernel hands its child on to the
        # requester (a subreaper). A process that exits in between would be
        # nobody's child to the requester yet, and its waitid fails (ECHILD).
        report.close()


def _decode_request(request: Any, extra_fds: list[int]) -> LaunchConfig | ExecConfig:
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


def _failure_json(step: str, message: str) -> bytes:
    import json

    return json.dumps({"step": step, "errno": 0, "message": message, "kind": "setup"}).encode()
