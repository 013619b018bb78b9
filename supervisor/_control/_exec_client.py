"""The client half of ``corral exec``: hand over stdio, relay, return the status.

Without ``-t`` the process gets three pipes of ours (never our own
descriptors: a sandbox must not hold the user's terminal, where it could
push input with TIOCSTI); we copy between them and our stdio. With ``-t``
the supervisor sends back the master of a pseudo-terminal made inside the
sandbox; our terminal goes raw, bytes are copied both ways, and window-size
changes (SIGWINCH) are set on the master, which passes them on to the
process. Signals we get (without ``-t``) are forwarded to the process.
Single-threaded, one ``poll`` loop; no trio. What only ``-t`` needs
(termios, tty) is imported with ``-t``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import sys

from .._errors import CommandNotExecutableError, CommandNotFoundError
from .._runtime._signals import FORWARDED_SIGNALS
from ._client import Client, ControlError, result_of

TYPE_CHECKING = False  # typing's, without importing typing: see supervisor._cli._common
if TYPE_CHECKING:
    import signal
    from collections.abc import Iterator, Sequence
    from typing import Any
else:
    # signal's functions and numbers without its enums (~2 ms of start-up
    # with enum's import): see supervisor._runtime._signals.
    import _signal as signal

__all__ = ["run_exec"]

_CHUNK = 65536


def run_exec(
    path: str,
    name: str,
    argv: Sequence[str],
    *,
    env: dict[str, str],
    workdir: str | None,
    interactive: bool,
    tty: bool,
    user: str | None = None,
) -> int:
    """Run *argv* in sandbox *name* through the supervisor at *path*; its status."""
    params: dict[str, Any] = {"name": name, "argv": list(argv), "env": env, "tty": tty}
    if workdir is not None:
        params["workdir"] = workdir
    if user is not None:
        params["user"] = user
    with Client(path) as client, _signals() as wakeup:
        if tty:
            size = _winsize()
            if size is not None:
                params["winsize"] = list(size)
            rid = client.request("exec", params)
            return _Relay(client, rid, wakeup, interactive=interactive).run_tty()
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            rid = client.request("exec", params, fds=(stdin_r, out_w, err_w))
        finally:
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
        if not interactive:
            os.close(stdin_w)
            stdin_w = -1
        relay = _Relay(client, rid, wakeup, interactive=interactive)
        try:
            return relay.run_pipes(stdin_w, out_r, err_r)
        finally:
            for fd in (stdin_w, out_r, err_r):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)


@contextlib.contextmanager
def _signals() -> Iterator[int]:
    """Catch the forwarded signals and SIGWINCH; yield the fd they wake."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old = {s: signal.signal(s, lambda *_: None) for s in (*FORWARDED_SIGNALS, signal.SIGWINCH)}
    try:
        yield r
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(r)
        os.close(w)


class _Relay:
    def __init__(self, client: Client, rid: int, wakeup: int, *, interactive: bool) -> None:
        self.client = client
        self.rid = rid
        self.wakeup = wakeup
        self.interactive = interactive
        self.exec_id: int | None = None
        self.pending_signals: list[int] = []
        self.result: dict[str, Any] | None = None

    # -- the socket ---------------------------------------------------------------

    def _on_socket(self) -> list[int]:
        """Handle what the supervisor sent; return descriptors it handed over."""
        handed: list[int] = []
        for msg, fds in self.client.receive():
            if msg.get("id") == self.rid and "progress" in msg:
                self.exec_id = msg["progress"].get("exec_id")
                for sig in self.pending_signals:
                    self._forward(sig)
                self.pending_signals.clear()
                handed += fds
                continue
            for fd in fds:
                os.close(fd)
            if msg.get("id") in (self.rid, None):
                self.result = msg
            # Else the answer to a forwarded signal: nothing to do.
        return handed

    def _status(self) -> int:
        assert self.result is not None
        try:
            result = result_of(self.result)
        except ControlError as exc:
            if exc.code == "not_found":
                raise CommandNotFoundError(str(exc)) from None
            if exc.code == "not_executable":
                raise CommandNotExecutableError(str(exc)) from None
            raise
        return int(result["status"])

    def _on_wakeup(self, master: int | None) -> None:
        try:
            data = os.read(self.wakeup, 64)
        except BlockingIOError:
            return
        for sig in data:
            if sig == signal.SIGWINCH:
                if master is not None:
                    _copy_winsize(master)
            elif master is None:
                # With a pty, ^C reaches the process through the terminal.
                self._forward(sig)

    def _forward(self, sig: int) -> None:
        if self.exec_id is None:
            self.pending_signals.append(sig)
            return
        self.client.request("exec_signal", {"exec_id": self.exec_id, "signal": sig})

    # -- without a terminal ----------------------------------------------------------

    def run_pipes(self, stdin_w: int, out_r: int, err_r: int) -> int:
        sock = self.client.sock.fileno()
        outputs = {out_r: sys.stdout.buffer, err_r: sys.stderr.buffer}
        stdin = sys.stdin.fileno() if stdin_w >= 0 else -1
        poller = select.poll()
        for fd in (sock, self.wakeup, *outputs):
            poller.register(fd, select.POLLIN)
        # The process's input is written without blocking: a chunk read
        # from our stdin waits here until its pipe takes it, and our stdin
        # is not read meanwhile. A blocking write would stop the loop from
        # draining the output, and a filter (cat, tr) whose output pipe is
        # full stops reading its input: both would wait for ever.
        pending = b""
        if stdin >= 0:
            os.set_blocking(stdin_w, False)
            poller.register(stdin, select.POLLIN)

        def close_input() -> None:
            nonlocal stdin_w, stdin, pending
            if stdin >= 0:
                with contextlib.suppress(KeyError):
                    poller.unregister(stdin)
            if stdin_w >= 0:
                with contextlib.suppress(KeyError):
                    poller.unregister(stdin_w)
                os.close(stdin_w)
            stdin_w = stdin = -1
            pending = b""

        while self.result is None:
            for fd, _ in _poll(poller):
                if fd == sock:
                    for extra in self._on_socket():
                        os.close(extra)
                elif fd == self.wakeup:
                    self._on_wakeup(None)
                elif fd in outputs:
                    if not _copy_out(fd, outputs[fd]):
                        poller.unregister(fd)
                        del outputs[fd]
                elif fd == stdin and stdin >= 0:
                    data = _read(stdin)
                    if data is None:
                        continue
                    if not data:
                        close_input()  # end of file: the process sees it too
                        continue
                    pending = data
                    poller.unregister(stdin)
                    poller.register(stdin_w, select.POLLOUT)
                elif fd == stdin_w and stdin_w >= 0:
                    try:
                        pending = pending[os.write(stdin_w, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # it closed its input: nothing more to give it
                        close_input()
                        continue
                    if not pending:
                        poller.unregister(stdin_w)
                        poller.register(stdin, select.POLLIN)
        # It has ended: what it wrote is in the pipes now. Take that, but do
        # not wait for a background process that still holds them.
        for fd, out in outputs.items():
            os.set_blocking(fd, False)
            while _copy_out(fd, out):
                pass
        return self._status()

    # -- with a terminal --------------------------------------------------------------

    def run_tty(self) -> int:
        import termios
        import tty as ttymod

        sock = self.client.sock.fileno()
        master: int | None = None
        stdin = sys.stdin.fileno()
        out = sys.stdout.buffer
        raw = self.interactive and os.isatty(stdin)
        saved = termios.tcgetattr(stdin) if raw else None
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self.wakeup, select.POLLIN)
        try:
            while self.result is None:
                for fd, _ in _poll(poller):
                    if fd == sock:
                        for got in self._on_socket():
                            if master is not None:
                                os.close(got)
                                continue
                            master = got
                            _copy_winsize(master)
                            poller.register(master, select.POLLIN)
                            if self.interactive:
                                if raw:
                                    ttymod.setraw(stdin)
                                poller.register(stdin, select.POLLIN)
                    elif fd == self.wakeup:
                        self._on_wakeup(master)
                    elif fd == master:
                        if not _copy_out(master, out):
                            poller.unregister(master)
                    elif fd == stdin and master is not None:
                        data = _read(stdin)
                        if data is None:
                            continue
                        if not data or not _write_all(master, data):
                            poller.unregister(stdin)
            if master is not None:
                os.set_blocking(master, False)
                while _copy_out(master, out):
                    pass
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            if master is not None:
                os.close(master)
        return self._status()


def _poll(poller: select.poll) -> list[tuple[int, int]]:
    try:
        return poller.poll()
    except InterruptedError:  # pragma: no cover - PEP 475 retries
        return []


def _read(fd: int) -> bytes | None:
    """A chunk; b"" at end of file; None if there is nothing after all."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:  # a pty master once every slave is closed
            return b""
        raise


def _copy_out(fd: int, out: Any) -> bool:
    """Copy one chunk from *fd* to *out*; False at end of file (or nothing left)."""
    try:
        data = os.read(fd, _CHUNK)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EIO:
            return False
        raise
    if not data:
        return False
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> bool:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except (BrokenPipeError, OSError):
        return False
    return True


def _winsize() -> tuple[int, int] | None:
    """Our terminal's rows and columns (None without a terminal)."""
    import termios

    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        try:
            size = fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        except OSError:
            continue
        rows, cols, _, _ = struct.unpack("HHHH", size)
        return rows, cols
    return None


def _copy_winsize(master: int) -> None:
    import termios

    size = _winsize()
    if size is not None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
