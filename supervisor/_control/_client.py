"""The client side of the control socket: blocking, no trio.

A CLI verb imports only this (and msgpack): trio and the server code cost
~100 ms of start-up that a one-shot ``corral pause`` should not pay, and
so, at a smaller scale, do typing (~4 ms with re) and the socket module
(~3 ms, see below), which it does not import either. The protocol is
described in :mod:`supervisor._control._server` and ``docs/control.md``.
"""

from __future__ import annotations

# The C module under `socket`, whose socket type socket.socket only
# extends (with makefile, dup and enum-typed properties, none used here):
# importing socket builds its enums from _socket's constants at start-up,
# ~3 ms with enum's own import, more than a `corral pause` round trip.
import _socket
import array
import os

import msgpack  # type: ignore[import-untyped]

from .._errors import CorralError

TYPE_CHECKING = False  # typing's, without importing typing: see supervisor._cli._common
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

__all__ = ["CONTROL_SOCKET", "Client", "ControlError", "call", "received_fds", "result_of"]

CONTROL_SOCKET = "control.sock"
"""The socket's file name in the run directory."""


class ControlError(CorralError):
    """The supervisor answered a control request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> Iterator[int]:
    """The descriptors in a ``recvmsg`` result's ancillary data."""
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            yield from fds


class Client:
    """A blocking connection to a supervisor's control socket.

    ``request`` sends; ``replies`` yields what comes back (progress
    messages, with any descriptors they carry, and answers).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise CorralError(
                f"no supervisor at {path} (is `corral up` running? see --socket)"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise CorralError(f"cannot reach the supervisor at {path}: {exc.strerror}") from None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20, strict_map_key=False)
        self._next = 0

    def request(
        self, method: str, params: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> int:
        """Send one request (with *fds*); return its id."""
        self._next += 1
        params = dict(params or {})
        if fds:
            params["fds"] = len(fds)
        data = msgpack.packb({"id": self._next, "method": method, "params": params})
        try:
            if fds:
                sent = self.sock.sendmsg(
                    [data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
                )
                data = data[sent:]
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered (forbidden) and closed: read that
        return self._next

    def replies(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """Each message from the supervisor, with the descriptors it carried."""
        while True:
            yield from self.receive()

    def receive(self) -> list[tuple[dict[str, Any], list[int]]]:
        """The messages of one read from the socket (blocks if none has come).

        Call it when the socket is readable, and handle every message it
        returns: one read may bring several.
        """
        try:
            data, ancdata, _, _ = self.sock.recvmsg(
                65536, _socket.CMSG_SPACE(4 * 4), _socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError:
            data, ancdata = b"", []
        fds = list(received_fds(ancdata))
        if not data:
            for fd in fds:
                os.close(fd)
            raise CorralError(f"the supervisor at {self.path} closed the connection")
        self._unpacker.feed(data)
        msgs = [m for m in self._unpacker if isinstance(m, dict)]
        if fds and not msgs:
            for fd in fds:
                os.close(fd)
        # A read ends with the message its descriptors came with (the
        # kernel never reads past a message that carries descriptors).
        return [(msg, fds if i == len(msgs) - 1 else []) for i, msg in enumerate(msgs)]

    def answer(self, rid: int) -> Any:
        """Wait for the answer to request *rid*; its result, or raise."""
        for msg, fds in self.replies():
            for fd in fds:
                os.close(fd)
            if msg.get("id") == rid or msg.get("id") is None:
                if "progress" in msg:
                    continue
                return result_of(msg)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def result_of(msg: dict[str, Any]) -> Any:
    """The result of an answer, or its error raised as :class:`ControlError`."""
    if msg.get("ok"):
        return msg.get("result")
    err = msg.get("error") or {}
    raise ControlError(str(err.get("code", "failed")), str(err.get("message", "")))


def call(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """Blocking client: send one request, return its result.

    Raises :class:`ControlError` with the supervisor's code and message, or
    :class:`CorralError` if the supervisor cannot be reached.
    """
    with Client(path) as client:
        return client.answer(client.request(method, params))
