"""The keeper process (see :class:`._spawn.Keeper`): forks sandboxes and,
as their holder, keeps them while no supervisor runs.

Started with ``python -m supervisor._runtime._linux._keeper FD [RUN_DIR]``.
It imports only the standard library, msgpack and the spawn code, and
checks that it is single-threaded before it forks anything.

One loop, one thread, ``epoll`` on: the connections of supervisors (the
socket it was started with, and with *RUN_DIR* those accepted on
``RUN_DIR/keeper.sock``), the listening socket, a wake-up pipe for SIGCHLD
and the ``sysinfo`` listeners, one per sandbox (``poll`` looked at every
one of them on every request: at 10,000 sandboxes, milliseconds per
request).

Sandboxes are forked by the *forker*, a child the keeper forks first
thing, while it holds nothing: forking from the keeper itself copied its
descriptor table (two pipes and a listener per sandbox it holds) and page
tables into every intermediate, which then closed them one by one, a cost
that grew with the fleet (at 1,000 sandboxes, 2,000 ``close`` calls per
start). The keeper forwards a ``launch`` or ``exec`` request with its
descriptors to the forker as it came; the forker forks the intermediate at
once (several run side by side), reaps it on SIGCHLD, and only then closes
its copy of the report socket. The
intermediate's child (the init) is handed on to the keeper, the child
subreaper, when the intermediate exits. A forker that died is forked again
on the next request. Requests are msgpack maps with one key, descriptors as
SCM_RIGHTS:

- ``launch`` / ``exec``: fork a sandbox or an exec (see :mod:`._spawn`);
- ``hold`` KEY + the two read ends of a sandbox's output pipes; ``release`` KEY;
- ``sysinfo`` [KEY, CONTEXT] + the listener of a process's ``sysinfo``
  filter: answer its ``sysinfo`` calls (see :mod:`._sysinfo`) until every
  task of that filter has ended (the listener polls POLLHUP);
- ``wait`` [PID, STARTTIME, BLOCK] + a reply socket: the exit status of a
  child (``exited``), or ``running``, or ``unknown`` (not ours); with BLOCK
  the answer waits for the exit;
- ``forget`` [PID, STARTTIME]: the status has been used;
- ``list`` + a reply socket: one ``held`` message per held key with its
  pipes, one ``sysinfo`` message per listener with it, then the kept exit
  statuses, then end of file;
- ``hello`` + a reply socket: the keeper's PID (a supervisor connecting
  checks that the keeper it reached is alive).

As holder (with *RUN_DIR*) it is a child subreaper: every sandbox init
and exec'd process ends up its child. It reaps each on SIGCHLD, keeps the
status until forgotten, and writes it to ``RUN_DIR/exits/PID-START.json``
(atomically) so that a keeper started after this one dies knows it too.
It exits once no supervisor is connected and it holds no pipes and no
listener. Answers never wait on a sandbox: a notification is only read
once its listener polls readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from .._dirs import make_run_dir
from .._records import write_atomic
from ._child import close_fds_except
from ._proc import parent_pid, starttime
from ._spawn import KEEPER_SOCKET, decode_request, failure_json, recv_fds, run_child, thread_count
from ._sysinfo import Answerer, restore_context

Key = tuple[int, int]


class _Keeper:
    def __init__(self, first: socket.socket, run_dir: str | None) -> None:
        self.run_dir = run_dir
        self.forker, self.forker_pid = _start_forker()
        self.poller = select.epoll()
        self.conns: dict[int, socket.socket] = {}
        self.held: dict[str, list[int]] = {}
        self.exits: dict[Key, tuple[int | None, int | None]] = {}
        self.waiters: dict[Key, list[socket.socket]] = {}
        self.listener: socket.socket | None = None
        self.answerer = Answerer()
        self.exits_dir = os.path.join(run_dir, "exits") if run_dir else None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        # A handler (not SIG_DFL, which discards SIGCHLD) so the wake-up
        # fd is written; the work is done in the loop.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller.register(self.wake_r, select.EPOLLIN)
        self._add(first)

    def _add(self, conn: socket.socket) -> None:
        self.conns[conn.fileno()] = conn
        self.poller.register(conn, select.EPOLLIN)

    def _drop(self, conn: socket.socket) -> None:
        self.poller.unregister(conn)
        del self.conns[conn.fileno()]
        conn.close()

    # -- holder set-up ------------------------------------------------------

    def become_holder(self) -> bool:
        """Lock the run directory, listen, load kept statuses; False if
        another keeper holds the run directory already."""
        assert self.run_dir is not None and self.exits_dir is not None
        make_run_dir(self.run_dir)
        lock = os.open(
            os.path.join(self.run_dir, "keeper.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return False
        # Held for our lifetime (the descriptor stays open): the socket
        # path below is ours to replace. Our PID in it, for people.
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        from . import _syscalls

        _syscalls.set_child_subreaper()
        path = os.path.join(self.run_dir, KEEPER_SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(64)
        self.listener = listener
        self.poller.register(listener, select.EPOLLIN)
        os.makedirs(self.exits_dir, mode=0o700, exist_ok=True)
        for name in os.listdir(self.exits_dir):
            try:
                with open(os.path.join(self.exits_dir, name)) as f:
                    d = json.load(f)
                self.exits[(int(d["pid"]), int(d["starttime"]))] = (d["exit_code"], d["signal"])
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.exits_dir, name))
        return True

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        self._reap()
        while self.conns or self.held or self.answerer.listeners:
            for fd, events in self.poller.poll():
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 512):
                            pass
                    self._reap()
                elif self.listener is not None and fd == self.listener.fileno():
                    with contextlib.suppress(OSError):
                        conn, _ = self.listener.accept()
                        self._add(conn)
                elif fd in self.conns:
                    self._serve(self.conns[fd])
                elif fd in self.answerer.listeners and not self.answerer.serve(fd, events):
                    self._drop_listener(fd)
        if self.listener is not None:
            # Gone from the path first: a supervisor arriving now starts a
            # new keeper instead of talking to one on its way out.
            assert self.run_dir is not None
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.run_dir, KEEPER_SOCKET))
            self.listener.close()

    def _serve(self, conn: socket.socket) -> None:
        import msgpack  # type: ignore[import-untyped]

        msg, fds = _receive(conn)
        if not msg:
            self._drop(conn)
            return
        try:
            request = msgpack.unpackb(msg)
            if not isinstance(request, dict) or not request:
                raise ValueError("expected a map")
            kind = next(iter(request))
        except Exception:
            _close(fds)
            return
        handler = getattr(self, f"_do_{kind}", None)
        if kind in ("launch", "exec"):
            self._forward(msg, fds)
        elif handler is not None:
            try:
                handler(request[kind], fds)
            except Exception:
                _close(fds)
        else:
            _close(fds)

    # -- requests -------------------------------------------------------------

    def _forward(self, msg: bytes, fds: list[int]) -> None:
        """Hand a ``launch`` or ``exec`` request to the forker (forked again
        if it died); our copies of its descriptors are closed."""
        try:
            for attempt in (1, 2):
                try:
                    socket.send_fds(self.forker, [msg], fds)
                    return
                except OSError:
                    if attempt == 2:
                        raise
                    self.forker.close()
                    self.forker, self.forker_pid = _start_forker()
        except OSError as exc:
            if fds:
                with socket.socket(fileno=os.dup(fds[0])) as report, contextlib.suppress(OSError):
                    report.send(b"E" + failure_json("keeper", f"cannot fork: {exc}"))
        finally:
            _close(fds)

    def _do_hello(self, _: Any, fds: list[int]) -> None:
        self._reply(fds, {"pid": os.getpid(), "held": len(self.held), "forker": self.forker_pid})

    def close_forker(self) -> None:
        """End the forker (it ends at the end of file) and reap it."""
        self.forker.close()
        if self.forker_pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.forker_pid, 0)
            self.forker_pid = 0

    def _do_hold(self, key: Any, fds: list[int]) -> None:
        if len(fds) != 2:
            _close(fds)
            return
        old = self.held.pop(str(key), None)
        if old is not None:
            _close(old)
        self.held[str(key)] = fds

    def _do_sysinfo(self, args: Any, fds: list[int]) -> None:
        if len(fds) != 1:
            _close(fds)
            return
        key, ctx = str(args[0]), restore_context(args[1])
        for fd, (other, _, _) in list(self.answerer.listeners.items()):
            if other == key:  # given again: the new copy replaces it
                self._drop_listener(fd)
        self.answerer.add(key, fds[0], ctx)
        self.poller.register(fds[0], select.EPOLLIN)

    def _drop_listener(self, fd: int) -> None:
        # Out of the poll set before the number can be reused.
        self.poller.unregister(fd)
        self.answerer.drop(fd)

    def _do_release(self, key: Any, fds: list[int]) -> None:
        _close(fds)
        _close(self.held.pop(str(key), []))

    def _do_forget(self, ident: Any, fds: list[int]) -> None:
        _close(fds)
        key = (int(ident[0]), int(ident[1]))
        if self.exits.pop(key, None) is not None and self.exits_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.exits_dir, f"{key[0]}-{key[1]}.json"))

    def _do_wait(self, args: Any, fds: list[int]) -> None:
        pid, start, block = int(args[0]), int(args[1]), bool(args[2])
        key = (pid, start)
        if key in self.exits:
            self._reply(fds, {"exited": list(self.exits[key])})
        elif not self._running_child(pid, start):
            self._reply(fds, {"unknown": True})
        elif not block:
            self._reply(fds, {"running": True})
        else:
            if len(fds) != 1:
                _close(fds)
                return
            self.waiters.setdefault(key, []).append(socket.socket(fileno=fds[0]))

    def _do_list(self, _: Any, fds: list[int]) -> None:
        import msgpack

        if len(fds) != 1:
            _close(fds)
            return
        with socket.socket(fileno=fds[0]) as reply:
            try:
                for key, pipes in self.held.items():
                    socket.send_fds(reply, [msgpack.packb({"held": key})], pipes)
                for fd, (key, ctx, _) in self.answerer.listeners.items():
                    packed = msgpack.packb({"sysinfo": [key, list(ctx)]})
                    socket.send_fds(reply, [packed], [fd])
                items = [[p, s, c, g] for (p, s), (c, g) in self.exits.items()]
                for i in range(0, len(items), 1000):
                    reply.send(msgpack.packb({"exits": items[i : i + 1000]}))
            except OSError:
                pass  # the asker is gone

    @staticmethod
    def _running_child(pid: int, start: int) -> bool:
        try:
            return parent_pid(pid) == os.getpid() and (not start or starttime(pid) == start)
        except (OSError, ValueError, IndexError):
            return False

    @staticmethod
    def _reply(fds: list[int], answer: dict[str, Any]) -> None:
        import msgpack

        if not fds:
            return
        with socket.socket(fileno=fds[0]) as reply, contextlib.suppress(OSError):
            reply.send(msgpack.packb(answer))
        _close(fds[1:])

    # -- reaping --------------------------------------------------------------

    def _reap(self) -> None:
        """Reap every child that has exited, keeping its status."""
        while True:
            try:
                # Look first (WNOWAIT): the start time must be read while
                # the zombie still has its /proc entry.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or not info.si_pid:
                return
            pid = info.si_pid
            if pid == self.forker_pid:
                os.waitid(os.P_PID, pid, os.WEXITED)  # not a sandbox: forked again when needed
                self.forker_pid = 0
                continue
            try:
                start = starttime(pid)
            except (OSError, ValueError, IndexError):
                start = 0
            os.waitid(os.P_PID, pid, os.WEXITED)
            if info.si_code == os.CLD_EXITED:
                status: tuple[int | None, int | None] = (info.si_status, None)
            else:
                status = (None, info.si_status)
            self._keep((pid, start), status)

    def _keep(self, key: Key, status: tuple[int | None, int | None]) -> None:
        import msgpack

        self.exits[key] = status
        if self.exits_dir is not None:
            path = os.path.join(self.exits_dir, f"{key[0]}-{key[1]}.json")
            record = {
                "pid": key[0],
                "starttime": key[1],
                "exit_code": status[0],
                "signal": status[1],
                "at": time.time(),
            }
            # Kept in memory still if this fails; only a keeper that
            # replaces this one would not know it.
            with contextlib.suppress(OSError):
                write_atomic(path, json.dumps(record))
        for reply in self.waiters.pop(key, []):
            with reply, contextlib.suppress(OSError):
                reply.send(msgpack.packb({"exited": list(status)}))


def _start_forker() -> tuple[socket.socket, int]:
    """Fork the forker; return our end of its socket and its PID."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forker
        try:
            ours.close()
            _forker(theirs)
        finally:
            os._exit(0)
    theirs.close()
    return ours, pid


def _forker(sock: socket.socket) -> None:  # pragma: no cover - runs in the forker
    """Fork what the keeper forwards until the keeper closes its end.

    The intermediates run side by side: each request is forked at once, and
    each intermediate's report socket is closed when it is reaped (on
    SIGCHLD). Waiting for each in turn made the forker the fleet's
    bottleneck: the keeper waited to hand it the next request, and the
    supervisor's creates waited on the keeper.
    """
    import msgpack

    from ._syscalls import set_parent_death_signal

    keeper = os.getppid()
    # Killed with the keeper: a forker outliving it would be nobody's to
    # end (its supervisor reaps it: see Keeper._collect_forker).
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != keeper:
        return  # the keeper died before the signal was set
    close_fds_except(sock.fileno())  # the keeper's: connections, pipes, listeners
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the work is done in the loop
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    pending: dict[int, socket.socket] = {}  # intermediate -> its report socket
    own = (sock, wake_r, wake_w)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap_intermediates(pending, block=False)
                continue
            msg, fds = _receive(sock)
            if not msg:
                _reap_intermediates(pending, block=True)
                return
            try:
                request = msgpack.unpackb(msg)
            except Exception:
                _close(fds)
                continue
            _spawn(own, request, fds, pending)


def _reap_intermediates(pending: dict[int, socket.socket], *, block: bool) -> None:
    """Reap ended intermediates (with *block*, all of them) and close their
    report sockets.

    Only then may the requester see the end of file that means "exec'd":
    the intermediate closes its copy of the socket before the kernel hands
    its child on to the subreaper. A process that exits in between would
    be nobody's child yet, and a waitid for it would fail (ECHILD)."""
    while pending:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            return
        report = pending.pop(pid, None)
        if report is not None:
            report.close()


def _spawn(
    own: tuple[socket.socket, int, int],
    request: dict[str, Any],
    fds: list[int],
    pending: dict[int, socket.socket],
) -> None:  # pragma: no cover - runs in the forker
    if len(fds) < 4:  # not even a report socket and stdio: nobody to tell
        _close(fds)
        return
    report = socket.socket(fileno=fds[0])
    try:
        cfg = decode_request(request, fds[4:])
    except Exception as exc:
        with contextlib.suppress(OSError):
            report.send(b"E" + failure_json("keeper", f"bad request: {exc}"))
        report.close()
        _close(fds[1:])
        return
    try:
        pid = os.fork()
    except OSError as exc:
        with contextlib.suppress(OSError):
            report.send(b"E" + failure_json("keeper", f"cannot fork: {exc}"))
        report.close()
        _close(fds[1:])
        return
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        own[0].close()
        _close([own[1], own[2]])
        for other in pending.values():
            other.close()  # the reports of the intermediates before us
        run_child(cfg, report, (fds[1], fds[2], fds[3]))
    _close(fds[1:])
    pending[pid] = report


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request and its descriptors; (b"", []) at the end of file or on
    an error (any descriptors that came with an empty message closed)."""
    try:
        msg, fds, _, _ = recv_fds(sock, 1 << 20, 8)
    except OSError:
        return b"", []
    if not msg:
        _close(fds)
        return b"", []
    return msg, fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def main(argv: list[str]) -> None:
    """Run the keeper on the inherited socket *argv[1]* (and as holder of *argv[2]*)."""
    first = socket.socket(fileno=int(argv[1]))
    n = thread_count()
    if n != 1:
        raise SystemExit(f"corral keeper: expected one thread, found {n}")
    # Supervisors decide when we stop: when they close their sockets.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    keeper = _Keeper(first, argv[2] if len(argv) > 2 else None)
    if keeper.run_dir is not None and not keeper.become_holder():
        first.send(b"busy")
        return
    try:
        first.send(b"ready %d" % keeper.forker_pid)
    except OSError:
        # Whoever started us died meanwhile: serve whoever comes next (or
        # nobody: with no connection and nothing held, run() returns).
        keeper._drop(first)
    keeper.run()
    keeper.close_forker()


if __name__ == "__main__":
    main(sys.argv)
