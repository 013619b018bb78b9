"""The in-process event bus: publish without blocking, fan out to subscribers.

Each subscriber has its own bounded trio memory channel. :meth:`Bus.publish`
is synchronous and uses only ``send_nowait``, so the supervisor never waits
for anyone. A subscriber that falls behind loses events instead of slowing
others; it learns exactly which ones from a :class:`Gap`, delivered before
anything newer, and can fetch them from the journal with :meth:`Bus.replay`.

The journal never stops the bus: when it cannot be written (a full disk)
it is *degraded* and keeps what it can in memory; the bus goes on assigning
seqs and delivering, publishes ``journal_degraded`` once, retries the
journal from :meth:`Bus.flush_journal` and publishes ``journal_recovered``
(with the seqs that could not be written) once a write succeeds again.

How the gap gets in first: the subscription counts what is queued and admits
an event only while fewer than ``maxsize`` are. Once one is refused, every
later event is refused too (extending the lost range) until there is room;
then the Gap goes in, then new events again. The channel holds one slot more
than ``maxsize``, so the Gap always fits, even when the bus closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trio

from ._codec import encode
from ._errors import EventsError, JournalError
from ._filter import Filter
from ._journal import Journal
from ._types import Event, Gap, JournalDegraded, JournalRecovered, stamped

__all__ = ["Bus", "Subscription"]

log = logging.getLogger("corral.events")

DEFAULT_MAXSIZE = 1024
# A receiver takes at most this many queued events before letting other
# tasks run (see Subscription._next).
_RUN = 64


class Bus:
    """Publish/subscribe for events, optionally journaled.

    With a *journal*, every published event is appended to it and seqs
    continue after the journal's ``last_seq``; without one, seqs start at 1
    and gaps cannot be recovered (:meth:`replay` yields them back as a Gap).
    The caller owns the journal: close it after the bus. With
    *write_through*, each event is written to the journal file (not
    synced) as it is published, before any subscriber sees it; else
    appends are buffered (see :meth:`flush_journal`).
    """

    def __init__(self, journal: Journal | None = None, *, write_through: bool = False) -> None:
        self._journal = journal
        # Each event written (to the page cache: no fsync) before anyone
        # sees it: a process killed right after cannot lose an event a
        # consumer saw, so a successor never hands its seq out again.
        self._write_through = write_through
        self._seq = journal.last_seq if journal is not None else 0
        self._subs: list[Subscription] = []
        # Synchronous observers (events.testing.capture_events).
        self._taps: list[Callable[[Event], None]] = []
        self._closed = False
        self._closed_event = trio.Event()
        # Set by publish when the journal has unwritten appends.
        self._dirty = trio.Event()

    @property
    def journal(self) -> Journal | None:
        """The journal events are appended to, if any."""
        return self._journal

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: publishing is an error then."""
        return self._closed

    @property
    def last_seq(self) -> int:
        """The seq of the last published event (0 before the first)."""
        return self._seq

    def publish(self, event: Event) -> Event:
        """Stamp *event* with the next seq and the times, journal it, and
        deliver it to every matching subscriber. Never blocks.

        Returns the stamped event. Raises ``TypeError`` for an event that
        cannot be encoded (before using up a seq) and ``ValueError`` for a
        :class:`Gap` (gaps are made per subscriber, not published). Never
        raises for the journal: one that cannot be written is degraded
        (``journal_degraded`` is published after this event) and the event
        is delivered all the same.
        """
        if self._closed:
            raise EventsError("publish on a closed bus")
        if type(event) is Gap:
            raise ValueError("a Gap is made by the bus for one subscriber; it is not published")
        seq = self._seq + 1
        event = stamped(event, seq, time.time(), time.monotonic())
        # Encoded once, here: the journal stores these bytes and the socket
        # server sends them, so no event is encoded twice.
        record = encode(event)
        self._seq = seq
        journal = self._journal
        if journal is not None:
            # Journaled before it is delivered: the journal reserves the seq
            # first, so that no one sees a seq a crash could hand out again.
            try:
                journal.append_encoded(seq, record)
                if self._write_through and journal.failure is None:
                    journal.flush()
            except JournalError as exc:
                self._journal_error(exc)
            if not self._dirty.is_set():
                self._dirty.set()
        kind = event.kind
        sandbox = event.sandbox
        for sub in self._subs:
            if sub._filter.matches(kind, sandbox):
                sub._offer(record if sub._raw else event, seq)
        for tap in self._taps:
            tap(event)
        if journal is not None and journal._changes:
            self._report_journal(journal)
        return event

    def _journal_error(self, exc: JournalError) -> None:
        # A degraded journal is reported as an event (by _report_journal);
        # anything else (an old segment that could not be deleted) loses
        # nothing, so a log line says it.
        assert self._journal is not None
        if self._journal.failure is None:
            log.warning("event journal: %s", exc)

    def _report_journal(self, journal: Journal) -> None:
        """Publish the journal's changes of health, oldest first."""
        # One at a time: publishing one may append the next (nested calls
        # then publish it), and each is published once, in order.
        while (change := journal._take_change()) is not None:
            if self._closed:
                continue  # nobody is left to tell
            if change.failure is not None:
                self.publish(JournalDegraded(error=change.failure))
            else:
                self.publish(JournalRecovered(first=change.first, last=change.last))

    def subscribe(
        self,
        kinds: Iterable[str] | None = None,
        sandboxes: Iterable[str] | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription:
        """A new subscription to events of *kinds* (all if None) about
        sandboxes matching any of the fnmatch patterns *sandboxes* (all if
        None). It receives every matching event published from now on, up to
        *maxsize* queued; beyond that, a :class:`Gap`.

        Use it as a context manager (``with bus.subscribe() as sub:``) to
        unsubscribe on exit, and as an async iterator of events.
        """
        return self._subscribe(Filter(kinds, sandboxes), maxsize, raw=False)

    def _subscribe(self, filter: Filter, maxsize: int, *, raw: bool) -> Subscription:
        # raw=True (the socket server): events arrive as their encoded bytes,
        # gaps still as Gap records.
        if maxsize < 1:
            raise ValueError(f"maxsize: expected at least 1, got {maxsize}")
        sub = Subscription(self, filter, maxsize, raw)
        if self._closed:
            sub._send.close()
        else:
            self._subs.append(sub)
        return sub

    def replay(
        self,
        since: int,
        until: int | None = None,
        *,
        kinds: Iterable[str] | None = None,
        sandboxes: Iterable[str] | None = None,
    ) -> Iterator[Event]:
        """Published events with ``since <= seq <= until`` (default: up to
        :attr:`last_seq`) from the journal, filtered like :meth:`subscribe`.

        What the journal no longer holds (or everything, without a journal)
        comes out as a :class:`Gap`, so every seq is accounted for.
        """
        return self._replay(Filter(kinds, sandboxes), since, until)

    def _replay(self, filter: Filter, since: int, until: int | None) -> Iterator[Event]:
        end = self._seq if until is None else min(until, self._seq)
        if self._journal is None:
            if max(since, 1) <= end:
                yield Gap(first=max(since, 1), last=end)
            return
        for event in self._journal.replay(since, end):
            if type(event) is Gap or filter.matches(event.kind, event.sandbox):
                yield event

    async def flush_journal(self, delay: float = 0.2, retry: float = 1.0) -> None:
        """Write buffered journal appends at most *delay* seconds after
        they were published; return (after a last flush) when the bus closes.

        Appends are buffered (written at 64 KiB, on close, and before a
        replay); run this in the supervisor's nursery so that a quiet
        period's events reach the disk soon even if the process is killed.
        It sleeps until something is published: an idle supervisor does
        not wake up for it. While the journal is degraded it tries again
        every *retry* seconds, events or not, so that it recovers as soon
        as the disk takes writes again. It never raises for the journal.
        """
        journal = self._journal
        while not self._closed:
            if journal is not None and journal.failure is not None:
                with trio.move_on_after(retry):
                    await self._closed_event.wait()
            else:
                await self._dirty.wait()
                with trio.move_on_after(delay):
                    await self._closed_event.wait()
            self._dirty = trio.Event()
            if journal is not None:
                try:
                    journal.flush()
                except JournalError as exc:
                    self._journal_error(exc)
                if journal._changes:
                    self._report_journal(journal)

    async def _wait_closed(self) -> None:
        await self._closed_event.wait()

    def close(self) -> None:
        """End every subscription: each receives what is queued (and a final
        Gap if it lost events), then its iteration ends. Publishing on a
        closed bus is an error. The journal is left open."""
        self._closed = True
        self._closed_event.set()
        self._dirty.set()
        subs, self._subs = self._subs, []
        for sub in subs:
            if sub._lost_first:
                sub._flush_gap()
            sub._send.close()


class Subscription:
    """One subscriber's queue on a :class:`Bus` (from :meth:`Bus.subscribe`).

    ``async for event in sub`` yields the matching events in publish order,
    with a :class:`Gap` where it fell behind; it ends when the bus closes.
    One task receives from a subscription.
    """

    def __init__(self, bus: Bus, filter: Filter, maxsize: int, raw: bool) -> None:
        self._bus = bus
        self._filter = filter
        self._maxsize = maxsize
        self._raw = raw
        # One slot beyond maxsize so a final Gap fits even into a full queue.
        self._send, self._receive = trio.open_memory_channel[Any](maxsize + 1)
        # Queued or handed to a waiting receiver, not yet returned by receive.
        self._queued = 0
        # The lost range not yet reported (0: none).
        self._lost_first = 0
        self._lost_last = 0
        self._run = 0  # items taken since the last schedule point

    @property
    def filter(self) -> Filter:
        """What this subscription selects."""
        return self._filter

    def _offer(self, item: Any, seq: int) -> None:
        # The hot path of Bus.publish: no allocation, no await.
        if self._lost_first:
            if self._queued >= self._maxsize:
                self._lost_last = seq
                return
            self._flush_gap()
        if self._queued < self._maxsize:
            self._send.send_nowait(item)
            self._queued += 1
        else:
            self._lost_first = self._lost_last = seq

    def _flush_gap(self) -> None:
        gap = Gap(first=self._lost_first, last=self._lost_last)
        self._lost_first = self._lost_last = 0
        self._send.send_nowait(gap)
        self._queued += 1

    def _took(self) -> None:
        self._queued -= 1
        if self._lost_first and not self._bus._closed:
            # Room again: report the loss now rather than at the next
            # publish, which may be long in coming.
            self._flush_gap()

    async def receive(self) -> Event:
        """The next event (a :class:`Gap` after a loss), waiting for one.

        Raises ``trio.EndOfChannel`` when the bus has closed and everything
        queued has been received. Always a cancel point; a schedule point
        when it waits and every 64th event otherwise (see :meth:`_next`).
        """
        item: Event = await self._next()
        return item

    def receive_nowait(self) -> Event:
        """The next event if one is queued, else raise ``trio.WouldBlock``
        (``trio.EndOfChannel`` once the bus has closed and all is received)."""
        item: Event = self._receive.receive_nowait()
        self._took()
        return item

    async def _next(self) -> Any:
        # trio's own receive() yields to the scheduler once per item, so a
        # consumer would take one event per scheduling round while the
        # publisher adds many, and overflow for nothing. Queued items are
        # therefore taken in a run, yielding every _RUN items; the cancel
        # check comes first, so a cancelled receive never loses an item.
        if self._queued:
            # Something is queued (one receiver: nobody else takes it), so
            # receive_nowait cannot fail.
            await trio.lowlevel.checkpoint_if_cancelled()
            item = self._receive.receive_nowait()
            self._run += 1
            if self._run >= _RUN:
                self._run = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            item = await self._receive.receive()
            self._run = 0
        self._took()
        return item

    # The socket server's subscription is raw: encoded bytes, or a Gap.

    async def _receive_raw(self) -> bytes | Gap:
        item: bytes | Gap = await self._next()
        return item

    def _receive_raw_nowait(self) -> bytes | Gap:
        item: bytes | Gap = self._receive.receive_nowait()
        self._took()
        return item

    def replay(self, since: int, until: int | None = None) -> Iterator[Event]:
        """:meth:`Bus.replay` with this subscription's filter: recovers a Gap."""
        return self._bus._replay(self._filter, since, until)

    def close(self) -> None:
        """Unsubscribe; what is still queued is discarded."""
        try:
            self._bus._subs.remove(self)
        except ValueError:
            pass  # closed before, or the bus closed
        self._send.close()
        self._receive.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
