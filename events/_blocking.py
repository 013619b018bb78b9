"""The blocking socket client, for scripts: plain ``socket``, no trio.

Importing trio costs about 180 ms; a script that only reads events should
not pay it, so this module (and ``import events``) never imports trio.
"""

from __future__ import annotations

import socket
from collections.abc import Generator, Iterable

from ._codec import Decoder
from ._errors import DecodeError, SocketError
from ._protocol import encode_request
from ._types import Event

__all__ = ["iter_events"]

_READ_SIZE = 256 << 10


def iter_events(
    path: str,
    *,
    kinds: Iterable[str] | None = None,
    sandboxes: Iterable[str] | None = None,
    since: int | None = None,
    timeout: float | None = None,
) -> Generator[Event, None, None]:
    """Events from the supervisor's socket at *path*, as a blocking iterator.

    Filters as ``Bus.subscribe``; with *since*, the journaled events from
    that seq come first, then live ones, without duplicates. The iterator
    ends when the supervisor closes the stream. If no data arrives for
    *timeout* seconds, ``TimeoutError`` is raised. Connecting happens at the
    first ``next()``; close the iterator (or use ``contextlib.closing``) to
    disconnect early.

    Raises :class:`SocketError` if the socket cannot be reached or breaks,
    :class:`DecodeError` if the stream is not valid events.
    """
    request = encode_request(kinds=kinds, sandboxes=sandboxes, since=since)
    return _events(path, request, timeout)


def _events(path: str, request: bytes, timeout: float | None) -> Generator[Event, None, None]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(request)
        except TimeoutError:
            raise
        except OSError as exc:
            raise SocketError(f"cannot subscribe at {path}: {exc}") from exc
        decoder = Decoder()
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except TimeoutError:
                raise
            except OSError as exc:
                raise SocketError(f"event stream from {path} broke: {exc}") from exc
            if not data:
                if decoder.pending:
                    raise DecodeError(f"the stream from {path} ended in the middle of an event")
                return
            decoder.feed(data)
            yield from decoder
