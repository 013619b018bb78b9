"""The in-process bus: stamping, fan-out, filters, gaps and their recovery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import trio_test

from events import (
    Bus,
    Created,
    Event,
    EventsError,
    Exited,
    Gap,
    Journal,
    Started,
    SupervisorStarted,
)
from events.testing import capture_events, fake_event


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is waiting."""
    return trio.testing.MockClock(autojump_threshold=0)


def started(sandbox: str = "web-1") -> Started:
    return Started(sandbox=sandbox, pid=1)


def drain(sub: object) -> list[Event]:
    """Everything queued on a subscription right now."""
    out: list[Event] = []
    while True:
        try:
            out.append(sub.receive_nowait())  # type: ignore[attr-defined]
        except trio.WouldBlock:
            return out


def test_publish_stamps_and_returns_the_event() -> None:
    """seq counts from 1; wall and mono are taken at publish, in order."""
    bus = Bus()
    before = (time.time(), time.monotonic())
    a = bus.publish(started())
    b = bus.publish(started())
    assert (a.seq, b.seq, bus.last_seq) == (1, 2, 2)
    assert before[0] <= a.wall <= b.wall <= time.time()
    assert before[1] <= a.mono <= b.mono <= time.monotonic()


def test_seq_continues_from_the_journal(tmp_path: Path) -> None:
    """A bus on a reopened journal never reuses a seq."""
    with Journal(tmp_path) as j:
        bus = Bus(j)
        for _ in range(5):
            bus.publish(started())
    with Journal(tmp_path) as j:
        assert Bus(j).publish(started()).seq == 6


def test_publish_refuses_gaps_and_unencodable_events() -> None:
    """Gaps are made by the bus; a bad event does not use up a seq."""
    from events import PluginEvent

    bus = Bus()
    with pytest.raises(ValueError, match="Gap"):
        bus.publish(Gap(first=1, last=2))
    with pytest.raises(TypeError):
        bus.publish(PluginEvent(sandbox="", name="x", payload={"o": object()}))
    with pytest.raises(TypeError):
        bus.publish(Event(sandbox="x"))
    assert bus.publish(started()).seq == 1


@trio_test
async def test_slow_subscriber_does_not_delay_a_fast_one(tmp_path: Path) -> None:
    """A subscriber that never reads loses events; the fast one gets all of
    them; the slow one then gets one exact Gap and recovers the rest by replay."""
    n = 5000
    with Journal(tmp_path) as j:
        bus = Bus(j)
        fast_seen: list[int] = []

        async def fast(sub: object) -> None:
            async for e in sub:  # type: ignore[attr-defined]
                fast_seen.append(e.seq)
                if e.seq == n:
                    return

        with bus.subscribe(maxsize=100) as slow, bus.subscribe(maxsize=100) as quick:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fast, quick)
                await trio.sleep(0)
                for i in range(n):
                    bus.publish(started(f"web-{i % 3}"))
                    if i % 50 == 49:
                        await trio.sleep(0)  # let the fast one run
            assert fast_seen == list(range(1, n + 1))

            got = drain(slow)
            assert [e.seq for e in got[:100]] == list(range(1, 101))
            assert got[100:] == [Gap(first=101, last=n)]  # exactly one, exact range
            gaps = [gap for gap in got[100:] if isinstance(gap, Gap)]  # all of them, as asserted
            recovered = [e for gap in gaps for e in slow.replay(gap.first, gap.last)]
            assert [e.seq for e in got[:100] + recovered] == list(range(1, n + 1))


@trio_test
async def test_gap_comes_before_newer_events() -> None:
    """After an overflow, the gap is delivered first, then new events, in seq order."""
    bus = Bus()
    with bus.subscribe(maxsize=3) as sub:
        for _ in range(6):
            bus.publish(started())  # 1-3 queued, 4-6 lost
        assert sub.receive_nowait().seq == 1  # room: the gap goes in now
        assert sub.receive_nowait().seq == 2
        for _ in range(2):
            bus.publish(started())  # 7 fits after the gap, 8 is lost
        got = drain(sub)
        assert [(type(e).__name__, e.seq) for e in got] == [
            ("Started", 3), ("Gap", 0), ("Started", 7), ("Gap", 0),
        ]  # fmt: skip
        assert (got[1].first, got[1].last) == (4, 6)  # type: ignore[attr-defined]
        assert (got[3].first, got[3].last) == (8, 8)  # type: ignore[attr-defined]


@trio_test
async def test_gap_is_delivered_without_further_publishing() -> None:
    """A subscriber that drains its queue learns of the loss even if the bus goes quiet."""
    bus = Bus()
    with bus.subscribe(maxsize=2) as sub:
        for _ in range(5):
            bus.publish(started())
        got = [await sub.receive() for _ in range(3)]
        assert [e.seq for e in got[:2]] == [1, 2]
        assert got[2] == Gap(first=3, last=5)


@trio_test
async def test_filters_by_kind_and_sandbox_pattern() -> None:
    """kinds select exact kinds, sandboxes fnmatch patterns; "" needs a pattern matching it."""
    bus = Bus()
    with (
        bus.subscribe(kinds=["exited"]) as exits,
        bus.subscribe(sandboxes=["web-*", "db"]) as web,
        bus.subscribe(kinds=["created", "supervisor_started"], sandboxes=["*"]) as both,
        bus.subscribe(sandboxes=[]) as nothing,
    ):
        bus.publish(SupervisorStarted(pid=1, version="x"))
        bus.publish(Created(sandbox="web-1"))
        bus.publish(fake_event(Exited, sandbox="db"))
        bus.publish(fake_event(Exited, sandbox="dbx"))
        bus.publish(Created(sandbox="Web-2"))  # case-sensitive
        assert [(e.kind, e.sandbox) for e in drain(exits)] == [("exited", "db"), ("exited", "dbx")]
        assert [e.seq for e in drain(web)] == [2, 3]
        assert [e.seq for e in drain(both)] == [1, 2, 5]
        assert drain(nothing) == []


def test_a_string_is_not_a_list_of_kinds() -> None:
    """kinds="exited" would silently match nothing; it is refused instead."""
    with pytest.raises(TypeError, match="list of strings"):
        Bus().subscribe(kinds="exited")


@trio_test
async def test_order_is_preserved_per_subscriber() -> None:
    """Events arrive in publish order, for every sandbox."""
    bus = Bus()
    with bus.subscribe(maxsize=10_000) as sub:
        for i in range(1000):
            bus.publish(started(f"s{i % 7}"))
        got = drain(sub)
    assert [e.seq for e in got] == list(range(1, 1001))


def test_replay_filters_and_without_journal_is_a_gap(tmp_path: Path) -> None:
    """Bus.replay filters like subscribe; with no journal it reports the range as lost."""
    with Journal(tmp_path) as j:
        bus = Bus(j)
        for i in range(10):
            bus.publish(started(f"s{i % 2}"))
        assert [e.seq for e in bus.replay(1, sandboxes=["s1"])] == [2, 4, 6, 8, 10]
        assert [e.seq for e in bus.replay(3, 5)] == [3, 4, 5]
    bus = Bus()
    bus.publish(started())
    bus.publish(started())
    assert list(bus.replay(1)) == [Gap(first=1, last=2)]


@trio_test
async def test_close_ends_subscriptions_after_what_is_queued() -> None:
    """Closing the bus delivers what is queued and a final gap, then ends iteration."""
    bus = Bus()
    sub = bus.subscribe(maxsize=2)
    for _ in range(4):
        bus.publish(started())
    bus.close()
    got = [e async for e in sub]
    assert [e.seq for e in got] == [1, 2, 0]
    assert got[2] == Gap(first=3, last=4)
    with pytest.raises(EventsError, match="closed"):
        bus.publish(started())


def test_leaving_the_with_block_unsubscribes() -> None:
    """A closed subscription gets nothing more and costs the bus nothing."""
    bus = Bus()
    with bus.subscribe() as sub:
        assert bus._subs == [sub]
    assert bus._subs == []
    bus.publish(started())


@trio_test
async def test_a_cancelled_receive_loses_nothing() -> None:
    """Cancellation hits before an item is taken, never after."""
    bus = Bus()
    with bus.subscribe() as sub:
        bus.publish(started())
        with trio.CancelScope() as scope:
            scope.cancel()
            await sub.receive()
        assert scope.cancelled_caught
        assert sub.receive_nowait().seq == 1


@trio_test
async def test_flush_journal_writes_the_journal_out(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Buffered events reach the disk within the delay, without more
    publishing; the task returns by itself when the bus closes."""
    with Journal(tmp_path) as j:
        bus = Bus(j)
        bus.publish(started())
        assert list(tmp_path.glob("*.journal")) == []  # still buffered
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.flush_journal, 0.5)
            await trio.sleep(0.6)
            (segment,) = tmp_path.glob("*.journal")
            assert segment.stat().st_size > 0
            bus.publish(started())
            bus.close()
        assert trio.current_time() == pytest.approx(0.6)  # no wait for the next tick
        assert [e.seq for e in j.replay(1)] == [1, 2]


@trio_test
async def test_flush_journal_sleeps_while_nothing_is_published(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """With nothing published, the flush task does not wake up at all."""
    with Journal(tmp_path) as j:
        flushes = []
        real_flush = j.flush

        def flush() -> None:
            flushes.append(trio.current_time())
            real_flush()

        j.flush = flush  # type: ignore[method-assign]  # a spy on this one journal
        bus = Bus(j)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.flush_journal, 0.5)
            await trio.sleep(3600)
            assert flushes == []  # a periodic flush would have run 7,200 times
            bus.publish(started())
            await trio.sleep(1)
            (segment,) = tmp_path.glob("*.journal")
            assert segment.stat().st_size > 0
            bus.close()


def test_capture_events_collects_what_is_published() -> None:
    """capture_events sees stamped events synchronously, only inside the block."""
    bus = Bus()
    bus.publish(started())
    with capture_events(bus) as captured:
        bus.publish(Created(sandbox="a"))
        assert [(e.kind, e.seq) for e in captured] == [("created", 2)]
    bus.publish(started())
    assert len(captured) == 1


async def _throughput(subscribers: int, burst: int, journal: Journal | None) -> float:
    """Events/s published and consumed by every subscriber, publishing in bursts."""
    n = 50_000 // burst * burst
    bus = Bus(journal)
    base = bus.last_seq
    counts = [0] * subscribers

    async def consume(i: int, sub: object) -> None:
        async for e in sub:  # type: ignore[attr-defined]
            counts[i] += e.last - e.first + 1 if isinstance(e, Gap) else 1
            if counts[i] == n:
                return

    ev = fake_event(Exited, sandbox="web-1")
    async with trio.open_nursery() as nursery:
        for i in range(subscribers):
            nursery.start_soon(consume, i, bus.subscribe(maxsize=1024))
        await trio.sleep(0)
        t0 = time.perf_counter()
        for _ in range(n // burst):
            for _ in range(burst):
                bus.publish(ev)
            await trio.sleep(0)
    elapsed = time.perf_counter() - t0
    assert bus.last_seq == base + n
    return n / elapsed


def test_throughput_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Print bus throughput (1 and 10 subscribers, journaled); not a timed assertion."""
    lines = []
    for subscribers in (1, 10):
        for burst in (1, 64):
            with Journal(tmp_path / f"{subscribers}-{burst}") as j:
                rate = trio.run(_throughput, subscribers, burst, j)
            lines.append(
                f"bus throughput: {subscribers:2d} subscriber(s), bursts of {burst:2d}: "
                f"{rate:,.0f} events/s"
            )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
