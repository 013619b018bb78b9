"""The trio socket client: ``async with subscribe(path) as stream``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from ._codec import Decoder
from ._errors import DecodeError, SocketError
from ._protocol import encode_request
from ._types import Event

__all__ = ["EventStream", "subscribe"]

_READ_SIZE = 256 << 10
_RUN = 64


@asynccontextmanager
async def subscribe(
    path: str,
    *,
    kinds: Iterable[str] | None = None,
    sandboxes: Iterable[str] | None = None,
    since: int | None = None,
) -> AsyncIterator[EventStream]:
    """Connect to the supervisor's event socket at *path* and subscribe.

    ::

        async with events.subscribe(path, kinds=["exited"]) as stream:
            async for event in stream:
                ...

    An async context manager rather than an async generator: trio cannot
    guarantee when an abandoned async generator is finalised, while the
    ``async with`` block closes the connection deterministically.

    Filters as ``Bus.subscribe``; with *since*, journaled events from that
    seq come first, then live ones, without duplicates. Raises
    :class:`SocketError` if the socket cannot be reached.
    """
    request = encode_request(kinds=kinds, sandboxes=sandboxes, since=since)
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise SocketError(f"cannot connect to {path}: {exc}") from exc
    async with stream:
        try:
            await stream.send_all(request)
        except trio.BrokenResourceError as exc:
            raise SocketError(f"cannot subscribe at {path}: {exc}") from exc
        yield EventStream(stream, path)


class EventStream:
    """The events arriving on one connection; an async iterator.

    Iteration ends when the supervisor closes the stream (it stopped).
    """

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self._stream = stream
        self._path = path
        self._decoder = Decoder()
        self._run = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        # Cancel check first: an event taken from the decoder is never lost.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                event = next(self._decoder)
            except StopIteration:
                pass
            else:
                # Events already received come out without a receive; let
                # other tasks run every _RUN of them, as Subscription does.
                self._run += 1
                if self._run >= _RUN:
                    self._run = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return event
            try:
                data = await self._stream.receive_some(_READ_SIZE)
            except trio.BrokenResourceError as exc:
                raise SocketError(f"event stream from {self._path} broke: {exc}") from exc
            self._run = 0
            if not data:
                if self._decoder.pending:
                    raise DecodeError(
                        f"the stream from {self._path} ended in the middle of an event"
                    )
                raise StopAsyncIteration
            self._decoder.feed(data)
