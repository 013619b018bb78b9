"""A full disk: the journal degrades and recovers, never corrupts, and stops nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

import events
from events import Event, Gap, Journal, JournalError, Started, encode, stamped
from events.segments import SeqSegment, SeqSegments
from supervisor import Keeper, Runtime, SandboxError, SandboxSpec, Supervisor
from supervisor._runtime._security import make_security

from .conftest import Dirs, requires_root
from .helpers import fill_up, small_tmpfs
from .supervising import TIMEOUT, fleet, of, run, wait_event

pytestmark = requires_root


def ev(seq: int) -> Event:
    """A stamped event with this seq (all encode to the same size)."""
    return stamped(Started(sandbox="web", pid=seq), seq, 1.0 + seq, 2.0 + seq)


RECORD = len(encode(ev(100)))


def seqs(items: Iterable[Event]) -> list[int | tuple[int, int]]:
    """Seqs of events, (first, last) for gaps."""
    return [(e.first, e.last) if isinstance(e, Gap) else e.seq for e in items]


def covered(items: Iterable[Event]) -> list[int]:
    """Every seq an event or a gap accounts for, in order."""
    return [
        s for e in items for s in (range(e.first, e.last + 1) if isinstance(e, Gap) else [e.seq])
    ]


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.journal"))


def test_a_failed_write_is_cut_back_and_written_when_there_is_room(tmp_path: Path) -> None:
    """On a full disk a flush fails part way: the segment keeps only whole
    records, the journal is degraded, and once there is room again the same
    events are written, none lost."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        with Journal(disk / "journal") as j:
            for i in range(1, 11):
                j.append(ev(i))
            j.flush()
            (seg,) = segment_files(disk / "journal")
            filler = fill_up(disk)
            # More than the rest of the segment's last block holds: the write
            # gets part way before the disk says no.
            for i in range(11, 111):
                j.append(ev(i))
            with pytest.raises(JournalError, match=r"No space left on device"):
                j.flush()
            assert seg.stat().st_size == 10 * RECORD
            assert j.failure is not None and str(seg) in j.failure
            # What waits in memory is not on disk yet: a replay says so.
            assert seqs(j.replay(1)) == [*range(1, 11), (11, 110)]
            filler.unlink()
            j.flush()
            assert j.failure is None
            assert seqs(j.replay(1)) == list(range(1, 111))
        with Journal(disk / "journal") as j:
            assert j.last_seq == 110
            assert seqs(j.replay(1)) == list(range(1, 111))


def test_a_torn_record_that_cannot_be_cut_off_is_never_appended_to(tmp_path: Path) -> None:
    """If cutting back a failed write fails too (an append-only file refuses
    ftruncate), nothing is written after the torn record until it is cut off,
    so the segment never holds a garbled record."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        files = SeqSegments(
            str(disk), suffix=".seg", segment_bytes=1 << 20, max_bytes=1 << 20,
            segment_type=SeqSegment,
        )  # fmt: skip
        try:
            files.rotate(1)
            files.write(b"a" * 100)
            path = files.path_of(1)
            subprocess.run(["chattr", "+a", path], check=True)
            try:
                filler = fill_up(disk)
                with pytest.raises(OSError, match="No space left"):
                    files.write(b"b" * 20_000)  # part of it fits in the last block
                torn = os.stat(path).st_size
                assert torn > 100  # the part that fitted: it could not be cut off
                filler.unlink()
                with pytest.raises(OSError, match="Operation not permitted"):
                    files.write(b"c" * 10)  # refused: it would follow the torn record
                assert os.stat(path).st_size == torn
            finally:
                subprocess.run(["chattr", "-a", path], check=True)
            files.write(b"c" * 10)
            with open(path, "rb") as f:
                assert f.read() == b"a" * 100 + b"c" * 10
        finally:
            files.close()


# Opens the journal at PATH, then fills its disk, appends N events (the
# writes fail) and is killed: a supervisor SIGKILLed on a full disk.
CRASH_ON_A_FULL_DISK = """
import os, signal, sys
from events import Journal, Started, stamped
j = Journal(os.path.join(sys.argv[1], "journal"))
with open(os.path.join(sys.argv[1], "filler"), "ab", buffering=0) as f:
    try:
        while True:
            f.write(bytes(65536))
    except OSError:
        pass
for seq in range(1, int(sys.argv[2]) + 1):
    try:
        j.append(stamped(Started(sandbox="web", pid=seq), seq, 1.0, 2.0))
    except Exception:
        pass
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_seqs_stay_unique_across_a_crash_on_a_full_disk(tmp_path: Path) -> None:
    """The high-water file has its block from the start, so reserving seqs
    works on a full disk: after a crash there, with nothing written, the
    next journal still continues above every seq handed out."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        proc = subprocess.run(
            [sys.executable, "-c", CRASH_ON_A_FULL_DISK, str(disk), "3000"], check=False
        )
        assert proc.returncode == -signal.SIGKILL
        (disk / "filler").unlink()
        with Journal(disk / "journal") as j:
            assert j.last_seq >= 3000
            assert seqs(j.replay(1)) == [(1, j.last_seq)]


def test_an_older_segment_with_a_torn_tail_replays_with_a_gap(tmp_path: Path) -> None:
    """A record torn at the end of a finished segment (left by a crash) is a
    Gap on replay, not an error, and the journal opens and replays the rest."""
    with Journal(tmp_path, segment_bytes=10 * RECORD, max_bytes=100 * RECORD) as j:
        for i in range(1, 26):
            j.append(ev(i))
    first, second, _ = segment_files(tmp_path)
    os.truncate(first, 10 * RECORD - 5)
    with Journal(tmp_path) as j:
        assert seqs(j.replay(1)) == [*range(1, 10), (10, 10), *range(11, 26)]
    assert second.stat().st_size == 10 * RECORD


def test_the_bus_and_the_socket_run_on_while_the_journal_disk_is_full(tmp_path: Path) -> None:
    """With the journal's disk full, every event is still delivered to a
    subscriber and a socket client; journal_degraded comes once; when space
    returns the journal recovers by itself (journal_recovered names the
    events it had to give up); a replay then shows exactly those as a Gap,
    and the journal reopens cleanly and continues."""
    sock = str(tmp_path / "events.sock")
    got_sub: list[Event] = []
    got_socket: list[Event] = []
    got_replaying: list[Event] = []

    async def collect(
        into: list[Event], since: int | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        async with events.subscribe(sock, since=since) as stream:
            task_status.started()
            async for e in stream:  # until the bus closes
                into.append(e)

    async def main(disk: Path) -> tuple[int, events.JournalRecovered]:
        journal = Journal(disk / "journal")
        bus = events.Bus(journal)
        recovered: events.JournalRecovered | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(events.serve_events, bus, sock)
                nursery.start_soon(partial(bus.flush_journal, retry=0.05))
                with bus.subscribe(maxsize=100_000) as sub:
                    await nursery.start(collect, got_socket, None)
                    await trio.testing.wait_all_tasks_blocked()  # the server subscribed
                    for i in range(10):
                        bus.publish(Started(sandbox="web", pid=i))
                    journal.flush()  # on disk before the disk fills (the flusher waits 0.2 s)
                    assert journal.failure is None
                    filler = fill_up(disk)
                    # Past the write buffer, then past what is kept in memory:
                    # some events must be given up.
                    n = 0
                    while n * RECORD < events._journal.KEEP_BYTES + 2 * 65536:
                        for _ in range(500):
                            bus.publish(Started(sandbox="web", pid=n))
                            n += 1
                        # The socket client reads everything before more come.
                        await trio.testing.wait_all_tasks_blocked()
                    assert journal.failure is not None
                    await nursery.start(collect, got_replaying, 1)
                    await trio.testing.wait_all_tasks_blocked()
                    bus.publish(Started(sandbox="web", pid=-1))
                    filler.unlink()
                    with trio.fail_after(30):
                        async for e in sub:
                            got_sub.append(e)
                            if isinstance(e, events.JournalRecovered):
                                recovered = e
                                break
                    bus.publish(Started(sandbox="web", pid=-2))
                    last = bus.last_seq
                    while got_sub[-1].seq != last:
                        got_sub.append(sub.receive_nowait())
                    bus.close()
        finally:
            journal.close()
        assert recovered is not None
        return last, recovered

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        last, recovered = trio.run(main, disk)
        # Everything reached the subscriber and the live socket client, in order.
        assert [e.seq for e in got_sub] == list(range(1, last + 1))
        assert [e.seq for e in got_socket] == list(range(1, last + 1))
        kinds = [e.kind for e in got_sub]
        assert kinds.count("journal_degraded") == kinds.count("journal_recovered") == 1
        (degraded,) = [e for e in got_sub if isinstance(e, events.JournalDegraded)]
        assert "No space left on device" in degraded.error
        assert 10 < recovered.first <= recovered.last < recovered.seq
        # The client that asked for a replay while the disk was full got the
        # journal's part, a gap for the rest, then everything live: each
        # seq once.
        assert covered(got_replaying) == list(range(1, last + 1))
        # The journal: what it gave up is one gap, everything else is there
        # and decodes; it reopens at the last seq and continues.
        with Journal(disk / "journal") as j:
            assert j.last_seq == last
            replayed = list(j.replay(1))
            assert [e for e in replayed if isinstance(e, Gap)] == [
                Gap(first=recovered.first, last=recovered.last)
            ]
            assert covered(replayed) == list(range(1, last + 1))
            j.append(ev(last + 1))


# --- one sandbox's disk writes -----------------------------------------------------


def test_a_record_that_cannot_be_written_fails_that_create_and_leaves_nothing(
    dirs: Dirs, session_keeper: Keeper
) -> None:
    """RUN_DIR on a full disk: create fails with one line naming the record
    and the reason; the init it had started is killed and reaped, and its
    cgroup and directories are gone (the fixtures check those)."""
    with small_tmpfs(dirs.run.parent / "run-disk", "64k") as disk:
        runtime = Runtime(state_dir=dirs.state, run_dir=disk, spawner=session_keeper.spawn)
        fill_up(disk)
        with pytest.raises(SandboxError) as err:
            # Root-mapped: a user-namespace sandbox's first write is its id
            # range's claim, whose failure the next test names.
            root_mapped = make_security(userns=False)
            runtime.create(SandboxSpec(name="rec", argv=("sleep", "100"), security=root_mapped))
        assert str(err.value) == (
            f"sandbox 'rec': cannot write its record {disk}/sandboxes/rec.json:"
            " No space left on device"
        )
        assert os.listdir(disk / "sandboxes") == []


def test_an_id_claim_that_cannot_be_written_fails_that_create_and_leaves_nothing(
    dirs: Dirs, session_keeper: Keeper
) -> None:
    """RUN_DIR on a full disk, a sandbox in a user namespace: its id claim,
    written there first, fails the create with one line naming it, and no
    empty claim is left (it would name no owner to release it)."""
    with small_tmpfs(dirs.run.parent / "run-disk", "64k") as disk:
        runtime = Runtime(state_dir=dirs.state, run_dir=disk, spawner=session_keeper.spawn)
        fill_up(disk)
        with pytest.raises(SandboxError) as err:
            runtime.create(
                SandboxSpec(name="ids", argv=("true",), security=make_security(userns=True))
            )
        assert str(err.value) == f"sandbox 'ids': {disk}/userns/0: No space left on device"
        assert os.listdir(disk / "userns") == []


def test_a_rootfs_that_cannot_be_built_fails_that_create_and_leaves_nothing(
    dirs: Dirs, session_keeper: Keeper
) -> None:
    """STATE_DIR too small for the busybox base: create fails with one line
    naming the cache and the reason, and no half-built base is left."""
    with small_tmpfs(dirs.state.parent / "state-disk", "256k") as disk:
        runtime = Runtime(state_dir=disk, run_dir=dirs.run, spawner=session_keeper.spawn)
        with pytest.raises(SandboxError) as err:
            runtime.create(SandboxSpec(name="rfs", argv=("true",)))
        assert str(err.value) == (
            f"rootfs: cannot build the busybox base in {disk}/images: No space left on device"
        )
        # Nothing of the build is left: no layer, no image, no scratch (a
        # build's lock file, empty, may stay).
        left = [
            str(p.relative_to(disk / "images"))
            for p in (disk / "images").rglob("*")
            if p.is_file() and p.parent.name != "locks"
        ]
        assert left == []
        assert os.listdir(disk / "sandboxes") == []


# --- the supervisor ---------------------------------------------------------------------


def test_a_chatty_sandbox_fills_the_state_disk_and_stops_nothing(dirs: Dirs) -> None:
    """STATE_DIR and RUN_DIR on a small tmpfs that one sandbox's output fills:
    the supervisor runs on (journal_degraded), the chatty sandbox too, and
    another sandbox's next start fails alone, naming its record and the
    reason. With room again the journal recovers and that sandbox starts;
    the fleet stops cleanly and the journal holds every event."""
    disk = dirs.state.parent / "disk"
    with small_tmpfs(disk, "8m"):
        here = Dirs(disk / "state", disk / "run")
        here.state.mkdir()
        here.run.mkdir()
        # The session's busybox base, as the dirs fixture shares it.
        shutil.copytree(dirs.state / "images", here.state / "images", symlinks=True)
        f = fleet(
            {"name": "chatty", "command": "yes 0123456789abcdef0123456789abcdef"},
            {"name": "victim", "command": "true"},
            log_max_bytes="64M",  # one file, never rotated: it fills the disk
        )
        record = here.run / "sandboxes" / "victim-0.1.json"

        async def body(sup: Supervisor) -> None:
            assert sup.bus is not None
            await wait_event(
                sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "victim-0"
            )
            with trio.fail_after(TIMEOUT):
                # Its first generation's record and layer go before the disk fills.
                while (here.run / "sandboxes" / "victim-0.0.json").exists() or (
                    here.state / "sandboxes" / "victim-0.0"
                ).exists():
                    await trio.sleep(0.01)
                while os.statvfs(disk).f_bavail > 16:
                    await trio.sleep(0.01)
            # The blocks that failed writes gave back: now nothing is free
            # (the output pumps and the journal write from this thread).
            filler = fill_up(disk)
            seen: list[events.Event] = []
            with sup.bus.subscribe() as sub:

                async def until(pred: Callable[[events.Event], bool]) -> events.Event:
                    """The first event since subscribing that matches, waiting for it."""
                    for e in seen:
                        if pred(e):
                            return e
                    with trio.fail_after(TIMEOUT):
                        async for e in sub:
                            seen.append(e)
                            if pred(e):
                                return e
                    raise AssertionError("unreachable")

                # Larger than what is left in the last block of the journal's
                # segment: its next write must fail.
                sup.publish(
                    events.PluginEvent(sandbox="", name="test.big", payload={"b": 8192 * b"x"})
                )
                (victim,) = await sup.start_sandbox("victim")
                assert victim.state == "failed"
                failed = await until(lambda e: isinstance(e, events.StartFailed))
                assert (failed.sandbox, failed.generation) == ("victim-0", 1)
                assert isinstance(failed, events.StartFailed)
                # The first write of a start that fails: the note of its
                # generation (before its record, which would fail alike).
                note = here.state / "generations" / "victim-0"
                assert failed.error in (
                    f"sandbox 'victim-0.1': cannot write its record {record}:"
                    " No space left on device",
                    f"sandbox 'victim-0.1': cannot write {note}: No space left on device",
                )
                degraded = await until(lambda e: isinstance(e, events.JournalDegraded))
                assert isinstance(degraded, events.JournalDegraded)
                assert "No space left on device" in degraded.error
                chatty = sup.instance("chatty-0")
                assert chatty is not None and chatty.state == "running"
                # Room again: the journal recovers by itself, the victim starts.
                await sup.stop_sandbox("chatty")
                for log in (here.state / "logs").glob("chatty-0.log*"):
                    os.truncate(log, 0)
                filler.unlink()
                await until(lambda e: isinstance(e, events.JournalRecovered))
                await sup.start_sandbox("victim")
                await until(lambda e: isinstance(e, events.Started) and e.sandbox == "victim-0")

        evs = run(f, here, body)
        kinds = [e.kind for e in evs]
        assert kinds[-1] == "supervisor_stopped"
        assert kinds.count("journal_degraded") == kinds.count("journal_recovered") == 1
        assert not [e for e in evs if isinstance(e, Gap)]  # kept in memory, then written
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        assert of(evs, events.StartFailed, "chatty-0") == []
        assert os.listdir(here.state / "sandboxes") == []
        assert os.listdir(here.run / "sandboxes") == []
