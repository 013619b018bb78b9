"""The event socket: outside consumers subscribe over a Unix stream socket.

Per connection: check the peer (SO_PEERCRED), take a place among the
connections its class may hold (root and our user apart from the group's
members, so that they can never lock root out), read one request map (see
``_protocol``) within the request timeout, subscribe to the bus, replay
from the journal what the client asked for up to the moment of subscribing,
then stream live events. Every event is sent as its msgpack map, back to
back; what is ready is sent in one write.

A client that reads slowly only slows its own connection task: the bus
never waits for it, its subscription overflows instead, and the task fills
the gap from the journal before sending anything newer. A Gap is forwarded
only for events that are no longer on disk. The journal is read in worker
threads, a batch at a time, never on the trio thread: a replay from the
start reads up to the journal's whole size (256 MiB by default).

Each connection lives in its own task and any failure closes that
connection only; nothing a client sends can stop the server.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from ._bus import Bus, Subscription
from ._codec import encode
from ._errors import DecodeError
from ._filter import Filter
from ._protocol import MAX_REQUEST_BYTES, Request, decode_request
from ._types import Gap
from .unixsocket import (
    MAX_CONNECTIONS,
    MAX_PRIVILEGED_CONNECTIONS,
    ConnectionSlots,
    bind_socket,
    peer_allowed,
    peer_privileged,
    unbind_socket,
)

__all__ = ["serve_events"]

log = logging.getLogger("corral.events")

# One send carries at most about this much: large enough to amortise the
# syscall (and, replaying, the trip to a worker thread), small enough not
# to keep other connections waiting.
_BATCH_BYTES = 256 << 10
# A socket subscriber's queue holds references to encoded bytes; deep, as
# each overflow means a trip to the journal.
_QUEUE = 4096
# accept() errors that mean "out of resources", where retrying later helps
# (as trio.serve_listeners does).
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def serve_events(
    bus: Bus,
    path: str,
    *,
    group: int | None = None,
    mode: int = 0o660,
    request_timeout: float = 10.0,
    drain_timeout: float = 5.0,
    max_connections: int = MAX_CONNECTIONS,
    max_privileged_connections: int = MAX_PRIVILEGED_CONNECTIONS,
    limiter: trio.CapacityLimiter | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *bus* on a Unix stream socket at *path*.

    A stale socket file at *path* is replaced; a live one (another server
    answers) or a file that is not a socket is a :class:`SocketError`. The
    file gets *mode* and, with *group*, that group. Peers are admitted by
    SO_PEERCRED: root, the server's own user, or (with *group*) a process
    whose primary or supplementary groups include *group*. A client must
    send its request within *request_timeout* seconds; once subscribed it
    is never idle (it receives) and stays until it or the server leaves.

    At most *max_connections* connections of peers other than root and the
    server's user are served at once, and apart from them at most
    *max_privileged_connections* of those two: one more of a full class is
    closed at once, without a word (the protocol has none before the
    events), and the group's members can never take root's places.
    Replays read the journal in worker threads under *limiter* (default:
    trio's).

    Start it with ``await nursery.start(serve_events, bus, path)``: it
    reports started once the socket accepts connections. It runs until
    cancelled, or until ``bus.close()``: then it stops accepting, removes
    the socket file, lets every connection send what it has left (the
    supervisor's last events) for up to *drain_timeout* seconds, and returns.
    """
    sock = await bind_socket(path, group, mode, what="events")
    ino = os.stat(path).st_ino
    slots = ConnectionSlots(max_connections, max_privileged_connections)
    try:
        async with trio.open_nursery() as connections:
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        _accept,
                        bus,
                        sock,
                        path,
                        connections,
                        group,
                        slots,
                        request_timeout,
                        limiter,
                    )
                    task_status.started()
                    await bus._wait_closed()
                    accepting.cancel_scope.cancel()
            finally:
                unbind_socket(sock, path, ino)
            # Connections end by themselves once their queues are drained;
            # one whose client stopped reading is cut off at the deadline.
            connections.cancel_scope.deadline = trio.current_time() + drain_timeout
    finally:
        unbind_socket(sock, path, ino)


async def _accept(
    bus: Bus,
    sock: trio.socket.SocketType,
    path: str,
    connections: trio.Nursery,
    group: int | None,
    slots: ConnectionSlots,
    request_timeout: float,
    limiter: trio.CapacityLimiter | None,
) -> None:
    while True:
        try:
            conn, _ = await sock.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            log.warning("event socket %s: accept failed (%s); retrying", path, exc)
            await trio.sleep(0.1)
            continue
        connections.start_soon(_serve_one, bus, conn, group, slots, request_timeout, limiter)


async def _serve_one(
    bus: Bus,
    conn: trio.socket.SocketType,
    group: int | None,
    slots: ConnectionSlots,
    request_timeout: float,
    limiter: trio.CapacityLimiter | None,
) -> None:
    stream = trio.SocketStream(conn)
    try:
        async with stream:
            if not peer_allowed(conn, group):
                return
            slot = slots.take(peer_privileged(conn))
            if slot is None:
                return  # busy: closed before the request, as for a bad one
            with slot:
                request = await _read_request(stream, request_timeout)
                if request is None:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_hangup, stream, nursery.cancel_scope)
                    await _stream_events(bus, stream, request, limiter)
                    nursery.cancel_scope.cancel()
    # except*: errors from the connection's nursery arrive in a group.
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except* Exception:
        log.exception("event socket: a connection failed")


async def _read_request(stream: trio.SocketStream, timeout: float) -> Request | None:
    """The client's request, or None (garbage, too large, too slow, gone)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_REQUEST_BYTES)
    fed = 0
    with trio.move_on_after(timeout):
        while True:
            data = await stream.receive_some(MAX_REQUEST_BYTES)
            if not data:
                return None
            try:
                unpacker.feed(data)  # BufferFull past MAX_REQUEST_BYTES
                fed += len(data)
                obj = next(unpacker)
            except StopIteration:
                continue  # not complete yet
            except (ValueError, TypeError, msgpack.UnpackException):
                return None
            if unpacker.tell() != fed:
                return None  # bytes after the request: not our protocol
            try:
                return decode_request(obj)
            except DecodeError:
                return None
    return None


async def _watch_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Stop serving when the client hangs up (or sends anything more)."""
    try:
        data = await stream.receive_some(4096)
    except trio.BrokenResourceError:
        scope.cancel()
        return
    if data:
        scope.cancel()  # a client sends one request, nothing after it
        return
    # End of file: a full close, or only shutdown(SHUT_WR) by a client that
    # still reads. Only the former sets POLLHUP on our end.
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLHUP)
    if poller.poll(0):
        scope.cancel()


async def _stream_events(
    bus: Bus, stream: trio.SocketStream, request: Request, limiter: trio.CapacityLimiter | None
) -> None:
    # Subscribe first, then replay up to the subscription point: everything
    # after it arrives live, so nothing falls between and nothing comes twice.
    with bus._subscribe(request.filter, _QUEUE, raw=True) as sub:
        upto = bus.last_seq
        if request.since is not None and request.since <= upto:
            await _send_replay(bus, stream, request.filter, request.since, upto, limiter)
        await _send_live(bus, stream, sub, limiter)


async def _send_live(
    bus: Bus, stream: trio.SocketStream, sub: Subscription, limiter: trio.CapacityLimiter | None
) -> None:
    batch: list[bytes] = []
    size = 0
    while True:
        try:
            item = await sub._receive_raw()
        except trio.EndOfChannel:
            return  # the bus closed: end of stream
        while True:
            if isinstance(item, Gap):
                if batch:
                    await stream.send_all(b"".join(batch))
                    batch.clear()
                    size = 0
                await _send_replay(bus, stream, sub.filter, item.first, item.last, limiter)
            else:
                batch.append(item)
                size += len(item)
                if size >= _BATCH_BYTES:
                    await stream.send_all(b"".join(batch))
                    batch.clear()
                    size = 0
            try:
                item = sub._receive_raw_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if batch:
            await stream.send_all(b"".join(batch))
            batch.clear()
            size = 0


async def _send_replay(
    bus: Bus,
    stream: trio.SocketStream,
    filter: Filter,
    first: int,
    last: int,
    limiter: trio.CapacityLimiter | None,
) -> None:
    """Send the journaled events first..last that pass *filter*; a Gap for
    what is not on disk."""
    journal = bus.journal
    if journal is None:
        if max(first, 1) <= last:
            await stream.send_all(encode(Gap(first=max(first, 1), last=last)))
        return
    # Made here: it writes out the journal's buffer first, which is the
    # writer's business and stays on this thread. Only reading moves.
    records = journal.replay_records(first, last)
    try:
        while True:
            batch, more = await trio.to_thread.run_sync(
                _read_batch, records, filter, limiter=limiter
            )
            if batch:
                await stream.send_all(b"".join(batch))
            if not more:
                return
    finally:
        # A generator: closing it closes the segment file it reads.
        close = getattr(records, "close", None)
        if close is not None:
            close()


def _read_batch(
    records: Iterator[dict[str, Any] | Gap], filter: Filter
) -> tuple[list[bytes], bool]:
    """The next records that pass *filter*, encoded, about one send's worth;
    and whether more may follow. In a worker thread."""
    batch: list[bytes] = []
    size = 0
    for record in records:
        if isinstance(record, Gap):
            data = encode(record)
        elif filter.matches(record["kind"], record["sandbox"]):
            data = msgpack.packb(record)
        else:
            continue
        batch.append(data)
        size += len(data)
        if size >= _BATCH_BYTES:
            return batch, True
    return batch, False
