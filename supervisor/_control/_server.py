"""The control socket: verbs on a running supervisor, msgpack request/response.

Protocol (``docs/control.md``): a Unix stream socket at
``RUN_DIR/control.sock``; the client sends msgpack maps back to back,
``{"id": int, "method": str, "params": map}``, and gets one answer per
request, ``{"id": int, "ok": true, "result": ...}`` or ``{"id": int, "ok":
false, "error": {"code": str, "message": str}}``, possibly preceded by
``{"id": int, "progress": map}`` messages (``exec``: the process started).
Requests on one connection run concurrently; answers come as each finishes
(match them by ``id``).

File descriptors travel as SCM_RIGHTS: a request that carries some says how
many in ``params.fds`` and sends them with its first byte; they are taken,
in order, from what the connection received. ``exec`` uses them for the
process's stdio, and its ``progress`` message carries the pty master back.

Peers are admitted by SO_PEERCRED (root, our user, or a member of the
fleet's ``socket_group``), not by file modes alone. Anything malformed gets
an ``invalid`` answer or the connection is dropped; nothing a client sends
can stop the supervisor or affect other clients, and what one connection
may hold is bounded (a frame, requests in flight, descriptors, connections,
time: a connection with nothing in flight that sends no complete request
within the idle bound is told ``idle`` and closed). Root and our own user
have places of their own, which the group's members cannot fill.

This module is the transport: connections, framing, descriptors, bounds and
error codes. What each method does is :mod:`._methods`'.
"""

from __future__ import annotations

import array
import logging
import math
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]
import trio

from events.unixsocket import (
    MAX_CONNECTIONS,
    MAX_PRIVILEGED_CONNECTIONS,
    ConnectionSlots,
    bind_socket,
    peer_allowed,
    peer_privileged,
    unbind_socket,
)

from .._core._policy import PolicyRefused
from .._errors import (
    CheckpointError,
    CommandNotExecutableError,
    CommandNotFoundError,
    CorralError,
    CriuUnavailableError,
    SpecError,
    StateError,
)
from ._client import ControlError, received_fds
from ._methods import METHODS, Context

if TYPE_CHECKING:
    from .._core._supervisor import Supervisor

__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "MAX_PRIVILEGED_CONNECTIONS", "serve_control"]

log = logging.getLogger("corral.control")

MAX_FRAME = 256 << 10
"""The largest request accepted (bytes); a bigger one drops the connection."""
MAX_PENDING = 64
"""Requests one connection may have in flight; more wait for one to finish."""
MAX_FDS = 16
"""Descriptors one connection may have sent and not yet used."""
# MAX_CONNECTIONS (128, the group's members) and MAX_PRIVILEGED_CONNECTIONS
# (1024, root and our user) come from events.unixsocket: connections served
# at once, each class counted apart; one more is told ``busy`` and closed.
IDLE_TIMEOUT = 10.0
"""Default idle bound (seconds): how long a connection with nothing in
flight may go without sending a complete request (the fleet's
``socket_idle_timeout``)."""
SEND_TIMEOUT = 30.0
"""A client that does not read its answers for this long is dropped."""
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


def _code(exc: CorralError) -> str:
    if isinstance(exc, ControlError):
        return exc.code
    if isinstance(exc, PolicyRefused):
        return "forbidden"
    if isinstance(exc, CriuUnavailableError):
        return "criu_unavailable"
    if isinstance(exc, CheckpointError):
        return "checkpoint_failed"
    if isinstance(exc, StateError):
        return "wrong_state"
    if isinstance(exc, CommandNotFoundError):
        return "not_found"
    if isinstance(exc, CommandNotExecutableError):
        return "not_executable"
    if isinstance(exc, SpecError):
        return "invalid"
    return "failed"


# -- the server ---------------------------------------------------------------------


async def serve_control(
    sup: Supervisor,
    path: str,
    *,
    group: int | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control protocol at *path* until cancelled.

    A connection that has nothing in flight and has not sent a complete
    request for *idle_timeout* seconds (since it connected, or since its
    last answer) is told ``idle`` and closed.
    """
    sock = await bind_socket(path, group, 0o660, what="control")
    ino = os.stat(path).st_ino
    slots = ConnectionSlots(MAX_CONNECTIONS, MAX_PRIVILEGED_CONNECTIONS)
    try:
        async with trio.open_nursery() as conns:
            task_status.started()
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    log.warning("control socket accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                conns.start_soon(_serve_one, sup, conn, group, slots, idle_timeout)
    finally:
        unbind_socket(sock, path, ino)


def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


class _Connection:
    """One client: its socket, the descriptors it sent, one writer at a time,
    and its idle clock."""

    def __init__(self, sock: trio.socket.SocketType, idle_timeout: float) -> None:
        self.sock = sock
        self.fds: deque[int] = deque()
        self._lock = trio.Lock()
        self.dead = False
        self.idle_timeout = idle_timeout
        self._in_flight = 0
        self._idle_since = trio.current_time()
        self.privileged = False
        """The peer is root or our own user (some methods are theirs only)."""
        self.reading: trio.CancelScope | None = None
        """The scope of the read that waits for the next request, if one
        waits: its deadline is the idle deadline, moved as requests begin
        and end."""

    def idle_deadline(self) -> float:
        """When the connection will have been idle too long (never while a
        request is in flight: then its client waits for us, not we for it)."""
        return math.inf if self._in_flight else self._idle_since + self.idle_timeout

    def begin(self) -> None:
        """A complete request arrived: not idle until it is answered."""
        self._in_flight += 1
        if self.reading is not None:
            self.reading.deadline = self.idle_deadline()

    def end(self) -> None:
        """A request was answered; with none left, the idle clock starts again."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle_since = trio.current_time()
        if self.reading is not None:
            self.reading.deadline = self.idle_deadline()

    async def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = memoryview(msgpack.packb(msg, use_bin_type=True))
        async with self._lock:
            if self.dead:
                return
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                try:
                    if fds:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        sent = await self.sock.sendmsg([data], anc)
                        data = data[sent:]
                    while data:
                        sent = await self.sock.send(data)
                        data = data[sent:]
                except OSError:
                    # The client went away: what it asked for goes on (an
                    # exec runs to its end, its pty master closed: a hangup).
                    self.abort()
                    return
            if scope.cancelled_caught:
                # It does not read: a half-sent message cannot be finished
                # or taken back, so the connection ends.
                self.abort()

    def abort(self) -> None:
        self.dead = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def take_fds(self, n: int) -> list[int]:
        if n > len(self.fds):
            raise SpecError("fds", f"the request says {n} descriptors, {len(self.fds)} arrived")
        return [self.fds.popleft() for _ in range(n)]

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.popleft())


async def _serve_one(
    sup: Supervisor,
    sock: trio.socket.SocketType,
    group: int | None,
    slots: ConnectionSlots,
    idle_timeout: float,
) -> None:
    conn = _Connection(sock, idle_timeout)
    try:
        if not peer_allowed(sock, group):
            await conn.send(_error(None, "forbidden", "permission denied"))
            return
        privileged = conn.privileged = peer_privileged(sock)
        slot = slots.take(privileged)
        if slot is None:
            await conn.send(_error(None, "busy", slots.busy_message(privileged)))
            return
        with slot:
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME, strict_map_key=False)
            pending = trio.Semaphore(MAX_PENDING)
            async with trio.open_nursery() as requests:
                # Inside the nursery: an error here must end this connection
                # only, not come out of the nursery as a group nobody expects.
                try:
                    await _read_requests(sup, conn, unpacker, pending, requests)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                except Exception:  # a bug here must end this connection only
                    log.exception("control connection failed")
                # Requests already running still answer (if the peer reads).
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        conn.close_fds()
        conn.dead = True
        sock.close()


async def _read_requests(
    sup: Supervisor,
    conn: _Connection,
    unpacker: msgpack.Unpacker,
    pending: trio.Semaphore,
    requests: trio.Nursery,
) -> None:
    sock = conn.sock
    while not conn.dead:
        # Only the wait for bytes is under the idle deadline: cancelled
        # there, nothing has been read and no answer is cut in half.
        with trio.CancelScope(deadline=conn.idle_deadline()) as reading:
            conn.reading = reading
            try:
                data, ancdata, flags, _ = await sock.recvmsg(
                    65536, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            finally:
                conn.reading = None
        if reading.cancelled_caught:
            message = f"no request for {conn.idle_timeout:g}s; the connection is closed"
            await conn.send(_error(None, "idle", message))
            return
        conn.fds.extend(received_fds(ancdata))
        if flags & socket.MSG_CTRUNC or len(conn.fds) > MAX_FDS:
            await conn.send(_error(None, "invalid", f"more than {MAX_FDS} descriptors"))
            return
        if not data:
            return
        try:
            unpacker.feed(data)
            for req in unpacker:
                # Only a complete request stops the idle clock: a client
                # that trickles bytes, or stalls mid-request, is idle.
                conn.begin()
                try:
                    fds = conn.take_fds(_fd_count(req))
                except SpecError as exc:
                    try:
                        await conn.send(_error(_rid(req), "invalid", str(exc)))
                    finally:
                        conn.end()
                    continue
                try:
                    await pending.acquire()
                except BaseException:
                    for fd in fds:
                        os.close(fd)
                    conn.end()
                    raise
                requests.start_soon(_answer, sup, conn, pending, req, fds)
        except msgpack.BufferFull:
            await conn.send(_error(None, "invalid", "request too large"))
            return
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # TypeError: a map whose key is a list or a map (unhashable).
            await conn.send(_error(None, "invalid", f"bad msgpack: {exc}"))
            return


def _rid(req: Any) -> Any:
    rid = req.get("id") if isinstance(req, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _fd_count(req: Any) -> int:
    params = req.get("params") if isinstance(req, dict) else None
    n = params.get("fds", 0) if isinstance(params, dict) else 0
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 3:
        raise SpecError("fds", f"expected 0 to 3 descriptors, got {n!r:.40}")
    return n


async def _answer(
    sup: Supervisor,
    conn: _Connection,
    pending: trio.Semaphore,
    req: Any,
    fds: list[int],
) -> None:
    ctx = Context(conn.send, _rid(req) or 0, fds, privileged=conn.privileged)
    try:
        rid = _rid(req)
        if rid is None:
            reply = _error(rid, "invalid", "expected a map with an integer 'id'")
        elif not isinstance(req.get("method"), str):
            reply = _error(rid, "invalid", "method: expected a string")
        elif not isinstance(req.get("params", {}), dict):
            reply = _error(rid, "invalid", "params: expected a map")
        elif req["method"] not in METHODS:
            reply = _error(rid, "unknown_method", f"unknown method {req['method']!r:.60}")
        else:
            try:
                result = await METHODS[req["method"]](sup, req.get("params", {}), ctx)
                reply = {"id": rid, "ok": True, "result": result}
            except CorralError as exc:
                reply = _error(rid, _code(exc), str(exc))
            except Exception as exc:  # a bug in a verb must not end the server
                log.exception("control method %s failed", req["method"])
                reply = _error(rid, "internal", f"{type(exc).__name__}: {exc}")
        try:
            await conn.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    finally:
        ctx.close_fds()
        pending.release()
        conn.end()
