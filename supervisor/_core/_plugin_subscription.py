"""A plugin's subscriptions, which resume where they stopped when the plugin
is restarted.

:func:`~._plugin_host.run_plugin` restarts a plugin that raised. A plain new
subscription would start at the live edge, and the events published while
the plugin was down (and those still queued for it when it raised) would be
lost: an ``exited`` among them is a sandbox the restart plugin never
restarts. So each subscription keeps a cursor, the seq of the last event it
gave the plugin. A subscription the error closed (it left its ``with``
block with the exception), or that was still open when the run ended,
leaves its cursor behind; in the plugin's next run, the first subscription
with the same filter takes it and gets every event after it from the
journal, then the live ones: nothing lost, nothing twice. A filter with no
cursor left starts where the failed run ended (what was published while
the plugin was down); a subscription closed on purpose leaves none, as the
plugin had stopped listening.

Reading the journal is disk I/O, so it runs in a worker thread (under the
limiter of disk work, as the event socket's replays), a chunk at a time;
the trio thread only makes the reader, which flushes the journal's buffer
(the journal's writes all stay on the trio thread).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator

import trio

import events
from events._filter import Filter

__all__ = ["REPLAY_CHUNK", "PluginSubscription", "PluginSubscriptions"]

REPLAY_CHUNK = 512
"""Events read from the journal per trip to a worker thread: enough to
amortise the trip, few enough that a chunk is quick to read."""

# A receiver takes at most this many backlog events before letting other
# tasks run (as events.Subscription does with queued ones).
_RUN = 64

# A subscription's filter: its kinds and sandbox patterns.
_Key = tuple[frozenset[str] | None, tuple[str, ...] | None]


class _Cursor:
    """The seq of the last event a subscription gave the plugin (or up to
    which nothing more was due to it)."""

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq


class PluginSubscriptions:
    """One plugin's subscriptions over all its runs (a handle has one).

    ``run_plugin`` calls :meth:`begin_run` before each start of the plugin
    and :meth:`end_run` once it has returned or raised; in between, the
    plugin's ``handle.subscribe`` is :meth:`open`.
    """

    def __init__(self) -> None:
        self._runs = 0
        self._ended = False
        self._opens = 0  # subscriptions opened so far: their order
        self._open: set[PluginSubscription] = set()
        # Cursors left by subscriptions of ended runs, for the next run to
        # take: per filter, in the order the subscriptions were opened, so
        # that the first one opened again continues the first one opened
        # before (whatever order the error closed them in). And those this
        # run leaves, with that order.
        self._resumable: dict[_Key, list[_Cursor]] = {}
        self._left: dict[_Key, list[tuple[int, _Cursor]]] = {}
        # Filters opened in this run: a filter without a cursor resumes only
        # the first time (a plugin that closes and reopens a subscription in
        # one run expects it live).
        self._opened: set[_Key] = set()
        # The bus's last seq when the previous run ended.
        self._ended_at = 0

    def begin_run(self) -> None:
        """The plugin is about to start (again)."""
        self._runs += 1
        self._ended = False
        self._opened.clear()

    def end_run(self, bus: events.Bus | None) -> None:
        """The plugin returned or raised: close what it left open (leaving
        their cursors) and note where the bus was. Once per run."""
        if self._ended:
            return
        self._ended = True
        for sub in list(self._open):
            sub._close(resume=True)
        # Cursors no run has taken yet stay: a run that fails before it
        # subscribes again must not lose its predecessor's place.
        for key, left in self._left.items():
            self._resumable.setdefault(key, []).extend(cursor for _, cursor in left)
        self._left = {}
        if bus is not None:
            self._ended_at = bus.last_seq

    def open(
        self,
        bus: events.Bus,
        kinds: Iterable[str] | None,
        sandboxes: Iterable[str] | None,
        maxsize: int,
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> PluginSubscription:
        """A subscription for the plugin: live, or in a restarted run, the
        missed events from the journal first, read in threads of *limiter*
        (default: trio's)."""
        live = bus.subscribe(kinds, sandboxes, maxsize)
        # Nothing can be published between subscribing and reading this (no
        # await): every event after it arrives live, every one up to it is
        # in the journal.
        upto = bus.last_seq
        f = live.filter
        key = (f.kinds, f.sandboxes)
        since = upto
        if self._runs > 1:
            waiting = self._resumable.get(key)
            if waiting:
                since = waiting.pop(0).seq
                if not waiting:
                    del self._resumable[key]
            elif key not in self._opened:
                since = self._ended_at
        self._opened.add(key)
        left = self._left.get(key)
        if left:
            # Opened again in the same run (the plugin caught its own error
            # and subscribed anew): this one takes that one's place.
            left.pop(0)
        backlog = _Backlog(bus, live.filter, since + 1, upto, limiter) if since < upto else None
        self._opens += 1
        sub = PluginSubscription(
            self, key, self._opens, bus, live, _Cursor(since), backlog, limiter
        )
        self._open.add(sub)
        return sub

    def _closed(self, sub: PluginSubscription, cursor: _Cursor, resume: bool) -> None:
        self._open.discard(sub)
        if resume:
            bisect.insort(self._left.setdefault(sub._key, []), (sub._order, cursor))


class _Backlog:
    """The journaled events ``first..upto`` that pass *live*'s filter, read
    in a worker thread a chunk at a time; a Gap for what the journal lacks."""

    def __init__(
        self,
        bus: events.Bus,
        filter: Filter,
        first: int,
        upto: int,
        limiter: trio.CapacityLimiter | None,
    ) -> None:
        self._bus = bus
        self._filter = filter
        self._limiter = limiter
        self._next = first  # the first seq not yet read
        self.upto = upto
        self._items: deque[events.Event] = deque()
        self._reader: Iterator[events.Event] | None = None
        self._start()

    def _start(self) -> None:
        # On the trio thread: the journal flushes its buffer here, and only
        # the trio thread may write it.
        journal = self._bus.journal
        if journal is None:
            self._give_up()
            return
        try:
            self._reader = journal.replay(self._next, self.upto)
        except events.JournalError:
            self._give_up()

    def _give_up(self) -> None:
        """Account for the rest of the range with one Gap."""
        self._reader = None
        if self._next <= self.upto:
            self._items.append(events.Gap(first=self._next, last=self.upto))
            self._next = self.upto + 1

    @property
    def exhausted(self) -> bool:
        """Every event of the range has been handed out."""
        return not self._items and self._reader is None

    def take_nowait(self) -> events.Event | None:
        """The next event if one has been read, else None."""
        return self._items.popleft() if self._items else None

    async def fill(self) -> None:
        """Read the next chunk (in a worker thread), unless exhausted."""
        while not self._items and self._reader is not None:
            reader = self._reader
            try:
                chunk = await trio.to_thread.run_sync(_read_chunk, reader, limiter=self._limiter)
            except (events.JournalError, OSError):
                self._give_up()
                continue
            if len(chunk) < REPLAY_CHUNK:
                self._reader = None
            for ev in chunk:
                self._next = (ev.last if isinstance(ev, events.Gap) else ev.seq) + 1
                if isinstance(ev, events.Gap) or self._filter.matches(ev.kind, ev.sandbox):
                    self._items.append(ev)
            if self._reader is None and self._next <= self.upto:
                # Ended early (cut short on disk): the rest is missing.
                self._give_up()


async def replay(
    bus: events.Bus,
    filter: Filter,
    since: int,
    until: int | None,
    limiter: trio.CapacityLimiter | None,
) -> AsyncIterator[events.Event]:
    """The journaled events *since*..*until* (default: the last published)
    that pass *filter*, read a chunk at a time in a worker thread (a
    replay may be the whole journal, never read on the trio thread); a
    Gap for what the journal lacks."""
    upto = bus.last_seq if until is None else min(until, bus.last_seq)
    if max(since, 1) > upto:
        return
    backlog = _Backlog(bus, filter, max(since, 1), upto, limiter)
    while True:
        await backlog.fill()
        ev = backlog.take_nowait()
        if ev is None:
            return
        yield ev


def _read_chunk(reader: Iterator[events.Event]) -> list[events.Event]:
    # In a worker thread, one at a time per reader (the caller awaits it).
    return list(itertools.islice(reader, REPLAY_CHUNK))


def _last_seq(ev: events.Event) -> int:
    return ev.last if isinstance(ev, events.Gap) else ev.seq


class PluginSubscription:
    """What a plugin's ``handle.subscribe`` returns: an
    ``events.Subscription``'s interface, plus the resume.

    In a restarted plugin's run, the events after its cursor come first,
    from the journal (a :class:`events.Gap` where it no longer has them),
    then the live ones, which start right after the last journaled one.
    """

    def __init__(
        self,
        owner: PluginSubscriptions,
        key: _Key,
        order: int,
        bus: events.Bus,
        live: events.Subscription,
        cursor: _Cursor,
        backlog: _Backlog | None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._limiter = limiter
        self._owner = owner
        self._key = key
        self._order = order
        self._bus = bus
        self._live = live
        self._cursor = cursor
        self._backlog = backlog
        self._closed = False
        self._run = 0  # backlog events taken since the last schedule point

    async def receive(self) -> events.Event:
        """The next event (a :class:`events.Gap` after a loss), waiting for
        one; ``trio.EndOfChannel`` once the bus has closed and all is received."""
        backlog = self._backlog
        if backlog is not None:
            # The cancel check before taking: a cancelled receive loses nothing.
            await trio.lowlevel.checkpoint_if_cancelled()
            await backlog.fill()
            ev = backlog.take_nowait()
            if ev is not None:
                self._cursor.seq = _last_seq(ev)
                self._run += 1
                if self._run >= _RUN:
                    self._run = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return ev
            self._backlog_done(backlog)
        ev = await self._live.receive()
        self._cursor.seq = _last_seq(ev)
        return ev

    def receive_nowait(self) -> events.Event:
        """The next event if one is at hand, else ``trio.WouldBlock`` (also
        while the next must first be read from the journal)."""
        backlog = self._backlog
        if backlog is not None:
            ev = backlog.take_nowait()
            if ev is not None:
                self._cursor.seq = _last_seq(ev)
                return ev
            if not backlog.exhausted:
                raise trio.WouldBlock
            self._backlog_done(backlog)
        ev = self._live.receive_nowait()
        self._cursor.seq = _last_seq(ev)
        return ev

    def _backlog_done(self, backlog: _Backlog) -> None:
        # Everything up to the subscription point has been given.
        self._cursor.seq = max(self._cursor.seq, backlog.upto)
        self._backlog = None

    def replay(self, since: int, until: int | None = None) -> AsyncIterator[events.Event]:
        """:meth:`events.Bus.replay` with this subscription's filter, read
        in a worker thread: ``async for ev in sub.replay(gap.first, gap.last)``."""
        return replay(self._bus, self._live.filter, since, until, self._limiter)

    def close(self) -> None:
        """Unsubscribe: the plugin has stopped listening, and a run after a
        restart does not resume from here."""
        self._close(resume=False)

    def _close(self, resume: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._backlog is not None and self._backlog.exhausted:
            self._backlog_done(self._backlog)
        if resume and self._backlog is None:
            # If nothing was left for the plugin, the cursor moves up to now:
            # a quiet subscription must not make the next run read the
            # journal from far back for nothing.
            try:
                self._live.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                self._cursor.seq = self._bus.last_seq
        self._backlog = None
        self._live.close()
        self._owner._closed(self, self._cursor, resume)

    def __enter__(self) -> PluginSubscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        # Left with an exception: the plugin's error, and its next run
        # resumes from here.
        self._close(resume=exc_type is not None)

    def __aiter__(self) -> PluginSubscription:
        return self

    async def __anext__(self) -> events.Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
