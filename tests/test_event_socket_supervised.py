"""The supervisor's event socket under its fleet's settings: the idle bound,
and places the socket group cannot take from root."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import trio

import events
from events.unixsocket import MAX_CONNECTIONS
from supervisor import Supervisor
from supervisor._control._client import call

from .conftest import Dirs, requires_root
from .supervising import TIMEOUT, fleet, run, wait_event

pytestmark = requires_root


def test_a_silent_connection_is_closed_and_a_subscriber_is_kept(dirs: Dirs) -> None:
    """A connection that sends no request within socket_idle_timeout is
    closed; one that subscribed is receiving, never idle, and stays."""
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_idle_timeout="200ms")

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        async with events.subscribe(sup.socket_path, kinds=["stopped"], since=1) as stream:
            # Connected after the subscriber: were subscribers bound too, it
            # would have been closed first.
            async with await trio.open_unix_socket(sup.socket_path) as silent:
                # Half the default bound (10 s): the fleet's setting applies,
                # with ample room for a loaded host.
                with trio.fail_after(5):
                    assert await silent.receive_some(1) == b""
            control = str(dirs.run / "control.sock")
            await trio.to_thread.run_sync(call, control, "stop", {"name": "web-0"})
            with trio.fail_after(TIMEOUT):
                stopped = await stream.__anext__()
            assert (stopped.kind, stopped.sandbox) == ("stopped", "web-0")

    run(f, dirs, body)


# Run as a member of socket_group: holds N subscriptions, each served (its
# first replayed event arrived), then tries one more; prints "SERVED LAST",
# then keeps them all open until its stdin closes.
_HOLD_EVENTS = textwrap.dedent(
    """
    import socket, sys, msgpack
    path, n = sys.argv[1], int(sys.argv[2])

    def subscribe(s):
        try:
            s.sendall(msgpack.packb({"v": 1, "since": 1}))
            return "events" if s.recv(65536) else "closed"
        except (BrokenPipeError, ConnectionResetError):
            return "closed"

    held, got = [], []
    for _ in range(n + 1):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)  # blocking: waits for room in the listen backlog
        s.settimeout(30)
        held.append(s)
        got.append(subscribe(s))
    print(got[:n].count("events"), got[n], flush=True)
    sys.stdin.read()
    """
)


def test_root_subscribes_while_the_group_holds_every_place(dirs: Dirs) -> None:
    """Members of socket_group holding all their places get one more
    connection closed at once; root still subscribes and gets its events."""
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_group=4242)

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        for d in (dirs.run.parent, dirs.run):
            os.chmod(d, 0o755)

        def hold_every_place() -> None:
            # Leaving the block closes its stdin: it lets go and exits.
            with subprocess.Popen(
                [sys.executable, "-c", _HOLD_EVENTS, sup.socket_path, str(MAX_CONNECTIONS)],
                user=65534,
                group=65534,
                extra_groups=[4242],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            ) as holder:
                assert holder.stdout is not None
                assert holder.stdout.readline().split() == [str(MAX_CONNECTIONS), "closed"]
                stream = events.iter_events(sup.socket_path, since=1, timeout=TIMEOUT)
                with contextlib.closing(stream):
                    assert next(stream).seq == 1

        await trio.to_thread.run_sync(hold_every_place)

    run(f, dirs, body)
