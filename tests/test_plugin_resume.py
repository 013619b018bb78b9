"""A restarted plugin's subscriptions resume where they stopped: the bookkeeping
behind the handle's ``subscribe``, on a real bus and journal (no supervisor).

End to end, with a supervisor that restarts a failing plugin: test_plugins.py
and test_restart.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import events
from supervisor._core._plugin_subscription import (
    REPLAY_CHUNK,
    PluginSubscription,
    PluginSubscriptions,
)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[events.Journal]:
    with events.Journal(tmp_path / "journal") as j:
        yield j


def tick(n: int) -> events.PluginEvent:
    return events.PluginEvent(sandbox="", name="test.tick", payload={"n": n})


def exited(name: str) -> events.Exited:
    return events.Exited(
        sandbox=name, generation=0, status=1, exit_code=1, signal=None, oom_killed=False
    )


def fail_after(main: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """*main* under a deadline: a test that would wait for an event that never comes fails."""

    async def bounded() -> None:
        with trio.fail_after(10):
            await main()

    return bounded


async def take(sub: PluginSubscription, count: int) -> list[events.Event]:
    """The next *count* events (read from the journal as needed)."""
    return [await sub.receive() for _ in range(count)]


def drain(sub: PluginSubscription) -> list[events.Event]:
    """Everything at hand without waiting."""
    out = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except trio.WouldBlock:
            return out


def ticks(evs: list[events.Event]) -> list[int]:
    return [e.payload["n"] if isinstance(e, events.PluginEvent) else -1 for e in evs]


def test_each_subscription_resumes_after_the_last_event_it_gave(journal: events.Journal) -> None:
    """Two subscriptions with one filter, one behind the other, and one with another filter:
    in the next run each first gets what it had not given (queued ones included), filtered as
    before; a filter the plugin did not have starts where the failed run ended."""

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        ahead = subs.open(bus, ["plugin"], None, 100)
        behind = subs.open(bus, ["plugin"], None, 100)
        for n in range(10):
            bus.publish(tick(n))
            bus.publish(exited(f"x-{n}"))
        assert ticks(drain(ahead)) == list(range(10))
        assert ticks(await take(behind, 3)) == [0, 1, 2]
        subs.end_run(bus)  # the plugin raised; its subscriptions are closed

        bus.publish(exited("while-down-0"))
        for n in range(10, 15):
            bus.publish(tick(n))
        subs.begin_run()
        ahead = subs.open(bus, ["plugin"], None, 100)
        behind = subs.open(bus, ["plugin"], None, 100)
        new = subs.open(bus, ["exited"], None, 100)
        bus.publish(tick(15))  # live
        assert ticks(await take(ahead, 6)) == list(range(10, 16))
        assert ticks(await take(behind, 13)) == list(range(3, 16))
        assert [e.sandbox for e in await take(new, 1)] == ["while-down-0"]
        for sub in (ahead, behind, new):
            assert drain(sub) == []

        # Closed and opened again in the same run: live, as any subscription.
        ahead.close()
        again = subs.open(bus, ["plugin"], None, 100)
        bus.publish(tick(16))
        assert ticks(drain(again)) == [16]
        subs.end_run(bus)
        bus.close()

    trio.run(fail_after(main))


def test_only_what_the_error_closed_resumes_from_its_place(journal: events.Journal) -> None:
    """A subscription the error closed resumes after its last event, even past a run that
    failed before subscribing; one closed on purpose does not: its filter starts where the
    last run ended."""

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        with subs.open(bus, ["exited"], None, 10) as quit:
            bus.publish(exited("discarded-0"))  # queued, but it stopped listening
        bus.publish(exited("unheard-0"))
        with pytest.raises(RuntimeError), subs.open(bus, ["plugin"], None, 10) as sub:
            for n in range(3):
                bus.publish(tick(n))
            assert ticks([await sub.receive()]) == [0]
            raise RuntimeError("the plugin's bug")
        subs.end_run(bus)

        bus.publish(tick(3))
        bus.publish(exited("unheard-1"))
        subs.begin_run()  # fails before it subscribes
        subs.end_run(bus)

        bus.publish(tick(4))
        bus.publish(exited("missed-0"))
        subs.begin_run()
        sub = subs.open(bus, ["plugin"], None, 10)
        quit = subs.open(bus, ["exited"], None, 10)
        assert ticks(await take(sub, 4)) == [1, 2, 3, 4]
        assert [e.sandbox for e in await take(quit, 1)] == ["missed-0"]
        assert drain(sub) == drain(quit) == []
        subs.end_run(bus)
        bus.close()

    trio.run(fail_after(main))


def test_subscriptions_with_one_filter_resume_in_the_order_they_were_opened(
    journal: events.Journal,
) -> None:
    """Nested subscriptions with the same filter are closed by the error inner first; in the
    next run the first one opened continues the first one opened before."""

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        with (
            pytest.raises(RuntimeError),
            subs.open(bus, ["plugin"], None, 10) as outer,
            subs.open(bus, ["plugin"], None, 10) as inner,  # left first
        ):
            for n in range(3):
                bus.publish(tick(n))
            assert ticks(await take(outer, 1)) == [0]
            assert ticks(await take(inner, 2)) == [0, 1]
            raise RuntimeError("the plugin's bug")
        subs.end_run(bus)
        subs.begin_run()
        outer = subs.open(bus, ["plugin"], None, 10)
        inner = subs.open(bus, ["plugin"], None, 10)
        assert ticks(await take(outer, 2)) == [1, 2]
        assert ticks(await take(inner, 1)) == [2]
        subs.end_run(bus)
        bus.close()

    trio.run(fail_after(main))


def test_a_subscription_opened_again_in_the_same_run_takes_the_old_ones_place(
    journal: events.Journal,
) -> None:
    """A plugin that catches its own error and subscribes anew resumes, after a later
    failure, from the new subscription's place, not the old one's: nothing twice."""

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        for n in range(3):
            with pytest.raises(RuntimeError), subs.open(bus, ["plugin"], None, 10) as sub:
                bus.publish(tick(n))
                assert ticks([await sub.receive()]) == [n]
                raise RuntimeError("caught by the plugin, which subscribes again")
        subs.end_run(bus)
        bus.publish(tick(3))
        subs.begin_run()
        sub = subs.open(bus, ["plugin"], None, 10)
        assert ticks(await take(sub, 1)) == [3]
        assert drain(sub) == []
        subs.end_run(bus)
        bus.close()

    trio.run(fail_after(main))


def test_a_long_backlog_is_read_in_chunks_without_loss(journal: events.Journal) -> None:
    """Several chunks' worth of missed events come in order, then the live ones; what is
    read so far is at hand without waiting, the rest only by awaiting."""
    missed = 2 * REPLAY_CHUNK + 7

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        subs.open(bus, None, None, 10)
        subs.end_run(bus)
        for n in range(missed):
            bus.publish(tick(n))
        subs.begin_run()
        sub = subs.open(bus, None, None, 10)
        with pytest.raises(trio.WouldBlock):  # nothing read yet
            sub.receive_nowait()
        bus.publish(tick(missed))
        first = await sub.receive()
        assert ticks([first, *drain(sub)]) == list(range(REPLAY_CHUNK))
        assert ticks(await take(sub, missed + 1 - REPLAY_CHUNK)) == list(
            range(REPLAY_CHUNK, missed + 1)
        )
        bus.close()
        with pytest.raises(trio.EndOfChannel):
            await sub.receive()
        subs.end_run(bus)

    trio.run(fail_after(main))


def test_the_journal_is_read_in_threads_of_the_limiter_given(journal: events.Journal) -> None:
    """The backlog's reads take the limiter they are given (the supervisor's disk work):
    while it has no thread to spare, the restarted plugin waits, and the trio thread does not."""

    async def main() -> None:
        bus = events.Bus(journal)
        subs = PluginSubscriptions()
        subs.begin_run()
        subs.open(bus, None, None, 10)
        subs.end_run(bus)
        bus.publish(tick(0))
        disk = trio.CapacityLimiter(1)
        got: list[events.Event] = []
        async with trio.open_nursery() as nursery:
            await disk.acquire()  # every thread of the kind busy elsewhere
            subs.begin_run()
            sub = subs.open(bus, None, None, 10, limiter=disk)

            async def plugin() -> None:
                got.append(await sub.receive())

            nursery.start_soon(plugin)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and disk.statistics().tasks_waiting == 1
            disk.release()
        assert ticks(got) == [0]
        subs.end_run(bus)
        bus.close()

    trio.run(fail_after(main))


def test_what_the_journal_no_longer_holds_is_a_gap(tmp_path: Path) -> None:
    """Missed events the journal has rotated away come as one Gap, then the rest."""

    async def main() -> None:
        with events.Journal(tmp_path / "j", segment_bytes=2048, max_bytes=4096) as journal:
            bus = events.Bus(journal)
            subs = PluginSubscriptions()
            subs.begin_run()
            subs.open(bus, ["plugin"], None, 10)
            start = bus.last_seq
            subs.end_run(bus)
            for n in range(300):
                bus.publish(tick(n))
            assert journal.first_seq > start + 1
            subs.begin_run()
            sub = subs.open(bus, ["plugin"], None, 10)
            gap = await sub.receive()
            assert gap == events.Gap(first=start + 1, last=journal.first_seq - 1)
            rest = await take(sub, bus.last_seq - journal.first_seq + 1)
            assert [e.seq for e in rest] == list(range(journal.first_seq, bus.last_seq + 1))
            subs.end_run(bus)
            bus.close()

    trio.run(fail_after(main))


def test_without_a_journal_the_missed_events_are_a_gap() -> None:
    """A bus without a journal cannot replay: the restarted run learns what it missed."""

    async def main() -> None:
        bus = events.Bus()
        subs = PluginSubscriptions()
        subs.begin_run()
        sub = subs.open(bus, None, None, 10)
        bus.publish(tick(0))
        assert (await sub.receive()).seq == 1  # given
        bus.publish(tick(1))  # queued when it raised
        subs.end_run(bus)
        bus.publish(tick(2))
        subs.begin_run()
        sub = subs.open(bus, None, None, 10)
        assert await sub.receive() == events.Gap(first=2, last=3)
        subs.end_run(bus)

    trio.run(fail_after(main))


def test_a_plugin_s_replay_reads_the_journal_in_chunks_off_the_trio_thread(
    journal: events.Journal,
) -> None:
    """handle.replay (and a subscription's) is an async iterator: the
    range, filtered, read REPLAY_CHUNK at a time in a worker thread."""
    from events._filter import Filter
    from supervisor._core._plugin_subscription import replay

    bus = events.Bus(journal)
    total = REPLAY_CHUNK * 3 + 7
    for n in range(total):
        bus.publish(exited("a") if n % 2 else tick(n))
    threads: set[object] = set()
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., object], *args: object, **kw: object) -> object:
        threads.add(fn)
        return await real(fn, *args, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        trio.to_thread.run_sync = spy  # type: ignore[assignment]
        try:
            every = [e.seq async for e in replay(bus, Filter(None, None), 5, None, None)]
            assert every == list(range(5, total + 1))
            a = [e.seq async for e in replay(bus, Filter(None, ["a"]), 1, 20, None)]
            assert a == list(range(2, 21, 2))
            assert [e async for e in replay(bus, Filter(None, None), total + 1, None, None)] == []
        finally:
            trio.to_thread.run_sync = real

    trio.run(fail_after(main))
    assert threads, "the journal was read on the trio thread"
