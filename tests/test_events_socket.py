"""The event socket: replay then live, bad clients, slow clients, both clients."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from trio.testing import trio_test

from events import (
    Bus,
    Created,
    Decoder,
    Event,
    EventStream,
    Exited,
    Gap,
    Journal,
    SocketError,
    Started,
    SupervisorStopped,
    iter_events,
    serve_events,
    subscribe,
)
from events.testing import fake_event

REPO = Path(__file__).resolve().parent.parent
GOOD_REQUEST = msgpack.packb({"v": 1, "kinds": None, "sandboxes": None, "since": None})

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client as another user"
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory (socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="corral-ev-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture(autouse=True)
def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client misbehaving or going away is routine: the server logs no error."""
    yield
    errors = [r for r in caplog.records if r.name.startswith("corral") and r.levelno >= 30]
    assert not errors, errors


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is waiting."""
    return trio.testing.MockClock(autojump_threshold=0)


def started(i: int = 0) -> Started:
    return Started(sandbox=f"web-{i % 3}", pid=i)


def seqs(evs: list[Event]) -> list[int | tuple[int, int]]:
    return [(e.first, e.last) if isinstance(e, Gap) else e.seq for e in evs]


async def read_all(stream: trio.SocketStream) -> tuple[list[Event], bool]:
    """Everything until the server closes: (events, whether it reset instead of EOF)."""
    dec = Decoder()
    out: list[Event] = []
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            return out, True
        if not data:
            return out, False
        dec.feed(data)
        out.extend(dec)


async def take(stream: object, n: int) -> list[Event]:
    """The next *n* events from a client stream."""
    out: list[Event] = []
    async for e in stream:  # type: ignore[attr-defined]
        out.append(e)
        if len(out) == n:
            break
    return out


@trio_test
async def test_since_replays_the_journal_then_streams_live(sock_dir: Path) -> None:
    """A consumer asking for since=1 after 1,000 events gets all of them, in
    order, then the live ones, with no duplicates."""
    path = str(sock_dir / "events.sock")
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        for i in range(1000):
            bus.publish(started(i))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            async with subscribe(path, since=1) as stream:
                got = await take(stream, 1000)
                assert seqs(got) == list(range(1, 1001))
                assert got[17] == next(j.replay(18))
                for i in range(5):
                    bus.publish(started(i))
                assert seqs(await take(stream, 5)) == list(range(1001, 1006))
            nursery.cancel_scope.cancel()


@trio_test
async def test_replays_read_the_journal_in_worker_threads(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads the journal's files in worker threads, under the limiter
    the server was given, never on the trio thread."""
    path = str(sock_dir / "events.sock")
    limiter = trio.CapacityLimiter(1)
    reads: list[tuple[threading.Thread, int]] = []
    real_read = Journal._read

    def recording_read(self: Journal, seg: Any, want: int) -> Iterator[dict[str, Any]]:
        reads.append((threading.current_thread(), int(limiter.borrowed_tokens)))
        return real_read(self, seg, want)

    monkeypatch.setattr(Journal, "_read", recording_read)
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        for i in range(1000):
            bus.publish(started(i))
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_events, bus, path, limiter=limiter))
            async with subscribe(path, since=1) as stream:
                assert seqs(await take(stream, 1000)) == list(range(1, 1001))
            nursery.cancel_scope.cancel()
    assert reads
    assert all(t is not threading.current_thread() and borrowed == 1 for t, borrowed in reads)


@trio_test
async def test_connecting_while_publishing_loses_and_repeats_nothing(sock_dir: Path) -> None:
    """Subscribe-then-replay leaves no hole and no duplicate at the switch to live."""
    path = str(sock_dir / "events.sock")
    n = 3000
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)

        async def publish() -> None:
            for i in range(n):
                bus.publish(started(i))
                if i % 10 == 9:
                    await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            nursery.start_soon(publish)
            for _ in range(30):
                await trio.sleep(0)  # let some events go out before connecting
            assert 0 < bus.last_seq < n
            async with subscribe(path, since=1) as stream:
                assert seqs(await take(stream, n)) == list(range(1, n + 1))
            nursery.cancel_scope.cancel()


BAD_REQUESTS = {
    "garbage": b"\xc1garbage",
    "not a map": msgpack.packb([1, 2, 3]),
    "wrong version": msgpack.packb({"v": 2}),
    "no version": msgpack.packb({"kinds": None}),
    "kinds as a string": msgpack.packb({"v": 1, "kinds": "exited"}),
    "sandboxes of ints": msgpack.packb({"v": 1, "sandboxes": [1]}),
    "negative since": msgpack.packb({"v": 1, "since": -1}),
    "since as bool": msgpack.packb({"v": 1, "since": True}),
    "bytes after the request": GOOD_REQUEST + b"\x00",
    "too many patterns": msgpack.packb({"v": 1, "sandboxes": ["a"] * 1025}),
    "oversized": b"\xdb" + (200_000).to_bytes(4, "big") + b"x" * 100_000,
}


@trio_test
async def test_bad_requests_close_only_their_connection(sock_dir: Path) -> None:
    """Garbage, truncated, malformed and oversized requests are closed
    without a reply; the server and its other clients carry on."""
    path = str(sock_dir / "events.sock")
    bus = Bus(Journal(sock_dir / "journal"))
    bus.publish(started())
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_events, bus, path)
        async with subscribe(path, since=1) as good:
            assert seqs(await take(good, 1)) == [1]  # subscribed now
            for name, request in [*BAD_REQUESTS.items(), ("truncated", GOOD_REQUEST[:7])]:
                bad = await trio.open_unix_socket(path)
                async with bad:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await bad.send_all(request)
                        await bad.send_eof()  # so a truncated request cannot wait
                    got, _ = await read_all(bad)
                    assert got == [], name
            bus.publish(started())
            assert seqs(await take(good, 1)) == [2]
        async with subscribe(path, since=2) as again:
            assert seqs(await take(again, 1)) == [2]
        nursery.cancel_scope.cancel()
    bus.journal.close()  # type: ignore[union-attr]


@trio_test
async def test_a_silent_client_is_closed_after_the_timeout(
    sock_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A client that connects and sends nothing is dropped after request_timeout."""
    path = str(sock_dir / "events.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_events, Bus(), path)
        async with await trio.open_unix_socket(path) as silent:
            t0 = trio.current_time()
            assert await read_all(silent) == ([], False)
            assert trio.current_time() - t0 == pytest.approx(10.0)
        nursery.cancel_scope.cancel()


@trio_test
async def test_connections_past_the_bound_are_closed_at_once(sock_dir: Path) -> None:
    """Past max_privileged_connections (the test's peers are root or the
    server's own user), one more connection is closed without a word; once
    a client leaves, its place is served again."""
    path = str(sock_dir / "events.sock")

    async def connect() -> tuple[trio.SocketStream, bool]:
        """A connection asking for a replay, and whether it is served (an
        admitted one gets the journal's event at once)."""
        stream = await trio.open_unix_socket(path)
        try:
            await stream.send_all(msgpack.packb({"v": 1, "since": 1}))
            data = await stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        return stream, bool(data)

    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        bus.publish(started())
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_events, bus, path, max_connections=1, max_privileged_connections=2)
            )
            (a, a_served), (b, b_served) = await connect(), await connect()
            refused, served = await connect()
            assert (a_served, b_served, served) == (True, True, False)
            await refused.aclose()
            await a.aclose()
            with trio.fail_after(10):
                while True:  # until the server has seen a leave
                    c, served = await connect()
                    if served:
                        break
                    await c.aclose()
            for stream in (b, c):
                await stream.aclose()
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_client_that_never_reads_blocks_nothing(sock_dir: Path) -> None:
    """Publishing and other clients go on while one client's socket is full."""
    path = str(sock_dir / "events.sock")
    n = 30_000  # about 4 MB: far more than a socket buffer holds
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            stuck = await trio.open_unix_socket(path)
            await stuck.send_all(msgpack.packb({"v": 1, "since": 1}))
            async with subscribe(path, since=1) as reader:

                async def publish() -> None:
                    for i in range(n):
                        bus.publish(started(i))
                        if i % 100 == 99:
                            await trio.sleep(0)

                nursery.start_soon(publish)
                assert seqs(await take(reader, n)) == list(range(1, n + 1))
            # The stuck client's server side holds a bounded queue, no more.
            assert all(sub._queued <= 4096 for sub in bus._subs)
            await stuck.aclose()
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_client_that_hangs_up_is_forgotten(sock_dir: Path) -> None:
    """Closing, idle or in the middle of a send, ends the connection's task and
    its subscription, quietly; a half-close (shutdown for writing) does not."""
    path = str(sock_dir / "events.sock")
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            idle = await trio.open_unix_socket(path)
            busy = await trio.open_unix_socket(path)
            half = await trio.open_unix_socket(path)
            for client in (idle, busy, half):
                await client.send_all(GOOD_REQUEST)
            await half.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            assert len(bus._subs) == 3
            await idle.aclose()
            for i in range(30_000):  # fills busy's socket: the server blocks sending
                bus.publish(started(i))
                if i % 100 == 99:
                    await trio.sleep(0)
            await busy.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert len(bus._subs) == 1  # half's
            assert seqs(await take(EventStream(half, path), 3)) == [1, 2, 3]
            await half.aclose()
            nursery.cancel_scope.cancel()


@trio_test
async def test_overflow_is_filled_from_the_journal(sock_dir: Path) -> None:
    """A socket consumer never loses an event that is on disk, even after its
    subscription overflowed."""
    path = str(sock_dir / "events.sock")
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        bus.publish(started())
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            async with subscribe(path, since=1) as stream:
                await take(stream, 1)
                for i in range(20_000):  # one burst: the server's queue overflows
                    bus.publish(started(i))
                assert seqs(await take(stream, 20_000)) == list(range(2, 20_002))
            nursery.cancel_scope.cancel()


@trio_test
async def test_only_what_is_not_on_disk_comes_as_a_gap(sock_dir: Path) -> None:
    """Overflowed events the journal has rotated away are forwarded as one Gap."""
    path = str(sock_dir / "events.sock")
    record = 70  # roughly; the journal keeps a few thousand of these
    with Journal(sock_dir / "journal", segment_bytes=1000 * record, max_bytes=3000 * record) as j:
        bus = Bus(j)
        bus.publish(started())
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            async with subscribe(path, since=1) as stream:
                await take(stream, 1)
                for i in range(20_000):
                    bus.publish(started(i))
                last = bus.last_seq
                got: list[Event] = []
                while not got or got[-1].seq != last:
                    got += await take(stream, 1)
            nursery.cancel_scope.cancel()
        gaps = [e for e in got if isinstance(e, Gap)]
        assert len(gaps) == 1
        assert gaps[0].last == j.first_seq - 1  # the gap ends where the disk begins
        covered = [
            s for e in got for s in (range(e.first, e.last + 1) if isinstance(e, Gap) else [e.seq])
        ]
        assert covered == list(range(2, last + 1))


@trio_test
async def test_without_a_journal_overflow_is_a_gap(sock_dir: Path) -> None:
    """With nothing on disk, the consumer learns exactly which events it lost."""
    path = str(sock_dir / "events.sock")
    bus = Bus()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_events, bus, path)
        async with subscribe(path, since=0) as stream:
            bus.publish(started())
            await take(stream, 1)
            for i in range(10_000):
                bus.publish(started(i))
            got = await take(stream, 4097)
            assert seqs(got) == [*range(2, 4098), (4098, 10_001)]
        nursery.cancel_scope.cancel()


@trio_test
async def test_trio_client_filters(sock_dir: Path) -> None:
    """kinds and sandbox patterns apply to replay and live events alike."""
    path = str(sock_dir / "events.sock")
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        bus.publish(fake_event(Exited, sandbox="web-1"))
        bus.publish(fake_event(Exited, sandbox="db"))
        bus.publish(Created(sandbox="web-2"))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            async with subscribe(path, kinds=["exited"], sandboxes=["web-*"], since=1) as stream:
                assert seqs(await take(stream, 1)) == [1]
                bus.publish(fake_event(Exited, sandbox="db"))
                bus.publish(fake_event(Exited, sandbox="web-9"))
                assert seqs(await take(stream, 1)) == [5]
            nursery.cancel_scope.cancel()


@trio_test
async def test_blocking_client(sock_dir: Path) -> None:
    """iter_events reads the same stream without trio, and ends when the server stops."""
    path = str(sock_dir / "events.sock")
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        for i in range(100):
            bus.publish(started(i))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)

            def first_ten() -> list[int]:
                with contextlib.closing(iter_events(path, since=50, timeout=10)) as it:
                    return [e.seq for e in islice(it, 10)]

            assert await trio.to_thread.run_sync(first_ten) == list(range(50, 60))

            def everything() -> list[int]:
                got = []
                for e in iter_events(path, since=1, timeout=10):
                    got.append(e.seq)
                    if e.seq == 100:
                        trio.from_thread.run_sync(bus.close)  # ends the stream
                return got

            assert await trio.to_thread.run_sync(everything) == list(range(1, 101))
            nursery.cancel_scope.cancel()


@trio_test
async def test_closing_the_bus_drains_and_stops_the_server(
    sock_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    """After bus.close() every reading client gets the last events and then
    end of stream; the socket file goes at once; serve_events returns, cutting
    off a client that does not read at the drain deadline."""
    path = str(sock_dir / "events.sock")
    # Virtual time stands still until the reading client has everything:
    # while a replay is read in a worker thread every task waits, and an
    # autojump would reach the drain deadline in the middle.
    mock_clock.autojump_threshold = math.inf
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            stuck = await trio.open_unix_socket(path)
            await stuck.send_all(GOOD_REQUEST)
            async with subscribe(path) as stream:
                await trio.testing.wait_all_tasks_blocked()  # both subscribed
                for i in range(30_000):
                    bus.publish(started(i))
                bus.publish(SupervisorStopped())
                bus.close()
                t0 = trio.current_time()
                got = [e async for e in stream]
                assert not os.path.exists(path)
            assert seqs(got) == list(range(1, 30_002))
            mock_clock.autojump_threshold = 0
            # No cancel: the server returns by itself, after the drain timeout.
        assert trio.current_time() - t0 == pytest.approx(5.0)
        await stuck.aclose()


def test_blocking_client_errors(sock_dir: Path) -> None:
    """A missing socket is a SocketError naming it; bad arguments fail before connecting."""
    with pytest.raises(SocketError, match=r"cannot subscribe at .*nothing.sock"):
        next(iter_events(str(sock_dir / "nothing.sock")))
    with pytest.raises(TypeError, match="list of strings"):
        iter_events("x", kinds="exited")
    with pytest.raises(ValueError, match="since"):
        iter_events("x", since=-1)


@trio_test
async def test_socket_file_lifecycle(sock_dir: Path) -> None:
    """A stale socket is replaced, a live one or a plain file refused; the
    file gets the mode and group and is removed when the server stops."""
    path = str(sock_dir / "events.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    # Only root may give a file to a group it is not in.
    group = 4242 if os.geteuid() == 0 else os.getegid()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_events(Bus(), path, group=group, task_status=task_status)
        )
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
        with pytest.raises(SocketError, match="another server is listening"):
            await serve_events(Bus(), path)
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)
    Path(path).write_text("not a socket")
    with pytest.raises(SocketError, match="not a socket"):
        await serve_events(Bus(), path)


_CLIENT = textwrap.dedent(
    """
    import itertools, sys, events
    try:
        print(len(list(itertools.islice(events.iter_events(sys.argv[1], since=1, timeout=10), 1))))
    except events.SocketError:  # closed on before the request was sent
        print(0)
    """
)


@requires_root
@trio_test
async def test_peer_credentials_decide_who_is_served(sock_dir: Path) -> None:
    """With the file open to all, only root, the server's user and members of
    the group get events; anyone else is closed on at once."""
    os.chmod(sock_dir, 0o755)
    path = str(sock_dir / "events.sock")
    bus = Bus(Journal(sock_dir / "journal"))
    bus.publish(started())

    async def count_as(
        user: int | None = None, group: int | None = None, extra_groups: list[int] | None = None
    ) -> int:
        cmd = [sys.executable, "-c", _CLIENT, path]
        env = {"PYTHONPATH": str(REPO)}
        result = await trio.run_process(
            cmd,
            capture_stdout=True,
            cwd=str(REPO),
            env=env,
            user=user,  # None (Popen's default): unchanged
            group=group,
            extra_groups=extra_groups,
        )
        return int(result.stdout)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_events(
                bus, path, group=4242, mode=0o666, task_status=task_status
            )
        )
        assert await count_as(user=65534, group=65534) == 0
        assert await count_as(user=65534, group=65534, extra_groups=[4242]) == 1
        assert await count_as(user=65534, group=4242) == 1
        assert await count_as() == 1  # root
        nursery.cancel_scope.cancel()
    bus.journal.close()  # type: ignore[union-attr]


_CONSUMER = textwrap.dedent(
    """
    import sys, time, events
    path, since, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    it = events.iter_events(path, since=since, timeout=30)
    print("ready", flush=True)
    first = next(it)
    t0 = time.perf_counter()
    count, last = 1, first.seq
    for e in it:
        count += 1
        assert e.seq == last + 1, (e, last)
        last = e.seq
        if count == n:
            break
    print(count, n / (time.perf_counter() - t0), flush=True)
    """
)


@trio_test
async def test_socket_throughput_is_reported(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Print events/s delivered to a consumer in another process; not a timed assertion."""
    path = str(sock_dir / "events.sock")
    n = 100_000
    with Journal(sock_dir / "journal") as j:
        bus = Bus(j)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_events, bus, path)
            cmd = [sys.executable, "-c", _CONSUMER, path, "1", str(n)]
            proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, cwd=str(REPO))
            assert proc.stdout is not None
            out = b""
            while b"ready\n" not in out:
                out += await proc.stdout.receive_some()
            ev = fake_event(Exited, sandbox="web-1")
            for i in range(n):
                bus.publish(ev)
                if i % 64 == 63:
                    await trio.sleep(0)
            while (data := await proc.stdout.receive_some()) != b"":
                out += data
            assert await proc.wait() == 0
            await proc.stdout.aclose()
            nursery.cancel_scope.cancel()
    count, rate = out.split(b"ready\n")[1].split()
    assert int(count) == n
    with capsys.disabled():
        print(f"\nsocket throughput to one consumer process: {float(rate):,.0f} events/s")
