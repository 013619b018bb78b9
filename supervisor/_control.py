"""The control socket: verbs on a running supervisor, msgpack request/response.

Protocol (``docs/control.md``): a Unix stream socket at
``RUN_DIR/control.sock``; the client sends msgpack maps back to back,
``{"id": int, "method": str, "params": map}``, and gets one map per request,
``{"id": int, "ok": true, "result": ...}`` or ``{"id": int, "ok": false,
"error": {"code": str, "message": str}}``. Requests on one connection run
concurrently; answers come as each finishes (match them by ``id``).

Peers are admitted by SO_PEERCRED (root, our user, or a member of the
fleet's ``socket_group``), not by file modes alone. Anything malformed gets
an ``invalid`` answer or the connection is dropped; nothing a client sends
can stop the supervisor or affect other clients.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]
import trio

from events._server import bind_socket, peer_allowed, unbind_socket

from ._errors import CheckpointError, CorralError, CriuUnavailableError, SpecError

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["CONTROL_SOCKET", "ControlError", "call", "serve_control"]

log = logging.getLogger("corral.control")

CONTROL_SOCKET = "control.sock"
MAX_FRAME = 1 << 20
"""The largest request accepted (bytes); a bigger one drops the connection."""
MAX_PENDING = 64
"""Requests one connection may have in flight."""

Method = Callable[["Supervisor", dict[str, Any]], Awaitable[Any]]


class ControlError(CorralError):
    """The supervisor answered a control request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _code(exc: CorralError) -> str:
    if isinstance(exc, ControlError):
        return exc.code
    if isinstance(exc, CriuUnavailableError):
        return "criu_unavailable"
    if isinstance(exc, CheckpointError):
        return "checkpoint_failed"
    if isinstance(exc, SpecError):
        return "invalid"
    return "failed"


def _str(params: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None:
        if required:
            raise SpecError(key, "expected a string, got nothing")
        return None
    if not isinstance(value, str):
        raise SpecError(key, f"expected a string, got {type(value).__name__}")
    return value


def _checkpoint_result(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "tag": info.tag,
        "path": info.path,
        "created": info.created,
        "size": info.size,
        "duration_ms": round(info.duration * 1000, 3),
        "frozen_ms": round(info.frozen * 1000, 3),
        "criu_ms": round(info.criu_seconds * 1000, 3),
        "leave_running": info.leave_running,
    }


async def _ping(sup: Supervisor, params: dict[str, Any]) -> Any:
    return {"pid": os.getpid()}


async def _checkpoint(sup: Supervisor, params: dict[str, Any]) -> Any:
    name = _str(params, "name", required=True)
    assert name is not None
    leave = params.get("leave_running", False)
    if not isinstance(leave, bool):
        raise SpecError("leave_running", f"expected true or false, got {leave!r}")
    info = await sup.checkpoint(name, tag=_str(params, "tag"), leave_running=leave)
    return _checkpoint_result(info)


async def _restore(sup: Supervisor, params: dict[str, Any]) -> Any:
    name = _str(params, "name", required=True)
    assert name is not None
    sb = await sup.restore(name, tag=_str(params, "tag"), as_name=_str(params, "as"))
    info = sb.restored_from
    return {
        "name": _str(params, "as") or sup.resolve(name).name,
        "pid": sb.pid,
        "tag": info.tag if info else None,
        "source": info.name if info else name,
    }


async def _checkpoints(sup: Supervisor, params: dict[str, Any]) -> Any:
    assert sup.runtime is not None
    store = sup.runtime.checkpoints
    name = _str(params, "name")
    names = [name] if name else list(store.names())
    return [_checkpoint_result(i) for n in names for i in store.list(n)]


METHODS: dict[str, Method] = {
    "ping": _ping,
    "checkpoint": _checkpoint,
    "restore": _restore,
    "checkpoints": _checkpoints,
}


async def serve_control(
    sup: Supervisor,
    path: str,
    *,
    group: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control protocol at *path* until cancelled."""
    sock = await bind_socket(path, group, 0o660, what="control")
    ino = os.stat(path).st_ino
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
                conns.start_soon(_serve_one, sup, conn, group)
    finally:
        unbind_socket(sock, path, ino)


async def _serve_one(sup: Supervisor, conn: trio.socket.SocketType, group: int | None) -> None:
    stream = trio.SocketStream(conn)
    try:
        if not peer_allowed(conn, group):
            await _send(stream, trio.Lock(), _error(None, "forbidden", "permission denied"))
            return
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME, strict_map_key=False)
        lock = trio.Lock()
        pending = trio.Semaphore(MAX_PENDING)
        async with trio.open_nursery() as requests:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                try:
                    unpacker.feed(data)
                    for req in unpacker:
                        await pending.acquire()
                        requests.start_soon(_answer, sup, stream, lock, pending, req)
                except msgpack.BufferFull:
                    await _send(stream, lock, _error(None, "invalid", "request too large"))
                    break
                except (ValueError, msgpack.UnpackException) as exc:
                    await _send(stream, lock, _error(None, "invalid", f"bad msgpack: {exc}"))
                    break
            # Requests already running still answer (if the peer reads).
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


async def _send(stream: trio.SocketStream, lock: trio.Lock, msg: dict[str, Any]) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    async with lock:
        await stream.send_all(data)


async def _answer(
    sup: Supervisor,
    stream: trio.SocketStream,
    lock: trio.Lock,
    pending: trio.Semaphore,
    req: Any,
) -> None:
    try:
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(rid, int) or isinstance(rid, bool):
            reply = _error(rid, "invalid", "expected a map with an integer 'id'")
        elif not isinstance(req.get("method"), str):
            reply = _error(rid, "invalid", "method: expected a string")
        elif not isinstance(req.get("params", {}), dict):
            reply = _error(rid, "invalid", "params: expected a map")
        elif req["method"] not in METHODS:
            reply = _error(rid, "unknown_method", f"unknown method {req['method']!r}")
        else:
            try:
                result = await METHODS[req["method"]](sup, req.get("params", {}))
                reply = {"id": rid, "ok": True, "result": result}
            except CorralError as exc:
                reply = _error(rid, _code(exc), str(exc))
            except Exception as exc:  # a bug in a verb must not end the server
                log.exception("control method %s failed", req["method"])
                reply = _error(rid, "internal", f"{type(exc).__name__}: {exc}")
        try:
            await _send(stream, lock, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    finally:
        pending.release()


def call(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """Blocking client: send one request, return its result.

    Raises :class:`ControlError` with the supervisor's code and message, or
    :class:`CorralError` if the supervisor cannot be reached.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise CorralError(
                f"no supervisor at {path} (is `corral up` running? see --socket)"
            ) from None
        except OSError as exc:
            raise CorralError(f"cannot reach the supervisor at {path}: {exc.strerror}") from None
        try:
            s.sendall(msgpack.packb({"id": 1, "method": method, "params": params or {}}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered (forbidden) and closed: read that
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20, strict_map_key=False)
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise CorralError(f"the supervisor at {path} closed the connection")
            unpacker.feed(data)
            for reply in unpacker:
                if not isinstance(reply, dict):
                    continue
                if reply.get("ok"):
                    return reply.get("result")
                err = reply.get("error") or {}
                raise ControlError(str(err.get("code", "failed")), str(err.get("message", "")))
