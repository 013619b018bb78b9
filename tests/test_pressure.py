"""Memory pressure before the OOM kill (issue 17): ``memory_pressure``
events from the kernel's own signals (v1: a threshold notification at
``memory_high``; v2: ``memory.events`` high and max, a PSI trigger), the
restart plugin growing a limit live so that no kill happens, and the
near-miss ``oom`` event, end to end on the real kernel."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import trio

import events
from plugins.restart import PressureGrow, grown_limits, parse_policy
from plugins.testing import FakeHandle, FakeInstance
from supervisor import Supervisor
from supervisor._core._fleet import FleetError, parse_fleet
from supervisor._runtime._limits import parse_limit

from .conftest import Dirs, corral, requires_root
from .supervising import fleet, of, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]

M = 1 << 20
V2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def _fill(mb: int, pause: float = 0) -> str:
    """A command writing *mb* MiB to the tmpfs at /t, one MiB at a time
    (tmpfs pages cannot be reclaimed without swap: they count as a hog's
    memory, exactly), then staying."""
    step = f"; sleep {pause}" if pause else ""
    return (
        f"i=0; while [ $i -lt {mb} ]; do"
        f" dd if=/dev/zero of=/t/f bs=1M count=1 seek=$i conv=notrunc 2>/dev/null{step};"
        " i=$((i+1)); done; echo filled; exec sleep 1000"
    )


def _pressure(evs: list[events.Event], name: str, level: str) -> list[events.MemoryPressure]:
    return [e for e in of(evs, events.MemoryPressure, name) if e.level == level]


def test_crossing_memory_high_is_a_memory_pressure_event(dirs: Dirs) -> None:
    """Usage over memory_high: one memory_pressure event (level high) with
    the usage, the limit and the mark; no OOM kill (v1: the threshold
    notification; v2: memory.events high, while the kernel throttles)."""
    f = fleet(
        {"name": "fill", "command": _fill(24), "memory": "64M", "memory_high": "16M",
         "tmpfs": ["/t"]},
    )  # fmt: skip

    async def body(sup: Supervisor) -> None:
        ev = await wait_event(
            sup, lambda e: isinstance(e, events.MemoryPressure) and e.level == "high"
        )
        assert isinstance(ev, events.MemoryPressure)
        assert ev.sandbox == "fill-0" and ev.high == 16 * M and ev.limit == 64 * M
        # Usage as read when the event is made: the crossing may have been
        # dd's 1 MiB buffer, freed by then (and charges come in batches).
        assert ev.usage >= 16 * M - 2 * M, ev
        assert ev.count >= 1

    evs = run(f, dirs, body)
    assert not of(evs, events.OomKill, "fill-0")


def test_memory_pressure_repeats_are_folded_into_one_event_a_second(dirs: Dirs) -> None:
    """A sandbox held over its mark signals many times; the events of a
    level come at most once a second, the rest counted in them."""
    if not V2:
        pytest.skip("v1's threshold signals once per crossing; v2 signals every throttled charge")
    f = fleet(
        {"name": "fill", "command": _fill(40), "memory": "64M", "memory_high": "8M",
         "tmpfs": ["/t"]},
    )  # fmt: skip

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup,
            lambda e: isinstance(e, events.MemoryPressure) and e.level == "high" and e.count > 1,
        )

    evs = run(f, dirs, body)
    highs = _pressure(evs, "fill-0", "high")
    stamps = [e.mono for e in highs]
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(stamps)), stamps


def test_a_stall_over_memory_stall_is_a_memory_pressure_event(dirs: Dirs) -> None:
    """memory_stall: a PSI trigger on memory.pressure; memory.high's
    throttling makes the writer stall, and the event says so (v2)."""
    if not V2:
        pytest.skip("PSI per cgroup is cgroup v2's; v1 refuses memory_stall (tested there)")
    f = fleet(
        {"name": "stall", "command": _fill(40), "memory": "128M", "memory_high": "8M",
         "memory_stall": "20ms", "tmpfs": ["/t"]},
    )  # fmt: skip

    async def body(sup: Supervisor) -> None:
        ev = await wait_event(
            sup, lambda e: isinstance(e, events.MemoryPressure) and e.level == "stall"
        )
        assert isinstance(ev, events.MemoryPressure) and ev.usage >= 8 * M - M

    run(f, dirs, body)


def test_reaching_the_limit_is_a_memory_pressure_event_before_the_kill(dirs: Dirs) -> None:
    """A hog reaching memory.max: the kernel reclaims there first (the max
    counter's rise, a memory_pressure event of level max), then, finding
    nothing to reclaim, OOM-kills; the events come in that order (v2).
    (Page cache reaching the limit raises it too, and is reclaimed; the
    VM lane's root file systems are on tmpfs, which cannot be.)"""
    if not V2:
        pytest.skip("cgroup v1 has no notification for reclaim at the limit")
    hog = "x=0123456789abcdef; while :; do x=$x$x; done"
    f = fleet({"name": "hog", "command": hog, "memory": "32M"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.OomKill))

    evs = run(f, dirs, body)
    (first_max, *_) = _pressure(evs, "hog-0", "max")
    assert first_max.limit == 32 * M and first_max.high is None
    (kill, *_) = of(evs, events.OomKill, "hog-0")
    assert first_max.seq < kill.seq


def test_on_pressure_grows_a_slow_hog_s_limit_before_any_oom_kill(dirs: Dirs) -> None:
    """The restart plugin's on_pressure: memory_high set at 'at' of the
    limit; each crossing grows memory (and the mark) live; the hog, which
    needs 80 MiB under a 32 MiB limit, finishes with no OOM kill."""
    f = fleet(
        {
            "name": "hog",
            "command": _fill(80, pause=0.05).replace("exec sleep 1000", "exit 0"),
            "memory": "32M",
            "tmpfs": ["/t"],
            "plugins": {
                "restart": {"policy": "no", "on_pressure": {"grow": 1.5, "max": "256M", "at": 0.75}}
            },
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Exited), timeout=120)

    evs = run(f, dirs, body)
    (exited,) = of(evs, events.Exited, "hog-0")
    assert (exited.status, exited.oom_killed) == (0, False)
    assert not of(evs, events.OomKill, "hog-0")
    assert _pressure(evs, "hog-0", "high")
    changes = [(e.limit, e.new) for e in of(evs, events.LimitChanged, "hog-0")]
    assert changes[0] == ("memory_high", 24 * M)  # set at start: 0.75 of 32M
    memory = [new for key, new in changes if key == "memory"]
    assert memory[:2] == [48 * M, 72 * M] and memory[-1] is not None and memory[-1] >= 80 * M
    assert all(e.generation == 0 for e in of(evs, events.LimitChanged, "hog-0"))


def _can_lower_oom_score_adj() -> bool:
    """Lowering an oom_score_adj takes CAP_SYS_RESOURCE, which the root of
    a container host may lack (this one's does)."""
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> 24 & 1)


def test_a_near_miss_is_an_oom_event_without_a_kill(dirs: Dirs) -> None:
    """The OOM killer runs but may kill nothing (v1: the cgroup's
    oom_kill_disable; v2: the hog's oom_score_adj at -1000): an ``oom``
    event and no ``oom_kill``; the hog waits in the kernel until the
    limit is raised, then finishes."""
    if V2 and not _can_lower_oom_score_adj():
        pytest.skip("lowering oom_score_adj takes CAP_SYS_RESOURCE, which this root lacks")
    # The hog is shell builtins only (no child the killer could pick); it
    # waits on a fifo until the test has made it unkillable.
    hog = (
        "mkfifo /t/go; read line < /t/go; x=0123456789abcdef;"
        " while [ ${#x} -lt 8388608 ]; do x=$x$x; done; x=$x$x; echo done ${#x}"
    )
    f = fleet({"name": "miss", "command": hog, "memory": "16M", "tmpfs": ["/t"]})

    async def body(sup: Supervisor) -> None:
        started = await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert isinstance(started, events.Started)
        fifo = Path(f"/proc/{started.pid}/root/t/go")
        with trio.fail_after(30):
            while not fifo.exists():
                await trio.sleep(0.01)
        inst = sup.instance("miss-0")
        sb = inst.sandbox  # type: ignore[union-attr]
        assert sb is not None
        if V2:
            for pid in Path(sb.cgroup.paths[0], "cgroup.procs").read_text().split():
                Path(f"/proc/{pid}/oom_score_adj").write_text("-1000")
        else:
            memdir = next(p for p in sb.cgroup.paths if "/memory/" in p)
            Path(memdir, "memory.oom_control").write_text("1")
        fd = await trio.to_thread.run_sync(os.open, str(fifo), os.O_WRONLY)
        os.write(fd, b"go\n")
        os.close(fd)
        await wait_event(sup, lambda e: isinstance(e, events.Oom))
        await sup.update_limits("miss-0", {"memory": 64 * M}, reason="test: room")
        await wait_event(sup, lambda e: isinstance(e, events.Exited))

    evs = run(f, dirs, body)
    assert of(evs, events.Oom, "miss-0")
    assert not of(evs, events.OomKill, "miss-0")
    (exited,) = of(evs, events.Exited, "miss-0")
    assert (exited.status, exited.oom_killed) == (0, False)


def test_memory_stall_is_refused_in_one_line_where_it_cannot_be(dirs: Dirs) -> None:
    """Bad values name the key; on cgroup v1 (no PSI per cgroup) the key
    itself is refused, as every limit a layout cannot have."""
    for value, expected in (
        ("1s", "memory_stall: expected a stall time per second from 1ms to 999ms"),
        ("0", "memory_stall: expected a stall time per second from 1ms to 999ms"),
        ("fast", "memory_stall: expected a duration"),
    ):
        with pytest.raises(FleetError, match=f"sandbox 'w': {expected}"):
            parse_fleet({"sandbox": [{"name": "w", "command": "true", "memory_stall": value}]})
    assert parse_limit("memory_stall", "100ms") == 100_000
    assert parse_limit("memory_stall", "off", live=True) is None
    if V2:
        return
    fleet_file = dirs.state / "fleet.toml"
    fleet_file.write_text('[[sandbox]]\nname = "w"\ncommand = "true"\nmemory_stall = "100ms"\n')
    p = corral(dirs, "up", str(fleet_file))
    assert p.returncode != 0
    lines = p.stderr.decode().strip().splitlines()
    assert any(
        "sandbox 'w': memory_stall: cgroup v1 has no per-cgroup pressure stall" in line
        for line in lines
    ), p.stderr


def test_on_pressure_settings_and_growth() -> None:
    """The grammar of on_pressure, and what a growth makes of the limits."""
    grow = parse_policy({"on_pressure": {"grow": 1.5, "max": "100M"}}).on_pressure
    assert grow == PressureGrow(1.5, 100 * M, 0.9)
    for bad in (
        {"grow": 1.5},
        {"grow": 1.5, "max": "1G", "by": 2},
        "grow",
        {"grow": 1, "max": "1G"},
    ):
        with pytest.raises(ValueError, match=r"^on_pressure"):
            parse_policy({"on_pressure": bad})
    assert grown_limits(grow, 40 * M, 30 * M) == {"memory": 60 * M, "memory_high": 45 * M}
    assert grown_limits(grow, 80 * M, None) == {"memory": 100 * M, "memory_high": 90 * M}
    assert grown_limits(grow, 100 * M, 90 * M) is None  # at max already
    assert grown_limits(grow, None, None) is None  # nothing to grow


def test_on_pressure_reacts_to_pressure_of_the_current_generation_only() -> None:
    """With the fake handle: the mark is set at start, each pressure event
    of the running generation grows the limit, a stale one does nothing."""
    from plugins import restart

    inst = FakeInstance(name="w-0", memory_limit=40 * M, generation=3)
    handle = FakeHandle(
        [inst], settings={"w-0": {"on_pressure": {"grow": 2, "max": "100M", "at": 0.5}}}
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart.plugin, handle, {})
            await trio.testing.wait_all_tasks_blocked()
            handle.publish(events.Started(sandbox="w-0", generation=3, pid=1))
            await trio.testing.wait_all_tasks_blocked()
            assert (inst.memory_limit, inst.memory_high) == (40 * M, 20 * M)
            stale = events.MemoryPressure(
                sandbox="w-0", generation=2, level="high", usage=0, limit=None, high=None
            )
            handle.publish(stale)
            await trio.testing.wait_all_tasks_blocked()
            assert inst.memory_limit == 40 * M
            fresh = events.MemoryPressure(
                sandbox="w-0", generation=3, level="high", usage=21 * M, limit=40 * M, high=20 * M
            )
            handle.publish(fresh)
            await trio.testing.wait_all_tasks_blocked()
            assert (inst.memory_limit, inst.memory_high) == (80 * M, 40 * M)
            handle.publish(events.Oom(sandbox="w-0", generation=3, count=1))
            await trio.testing.wait_all_tasks_blocked()
            assert (inst.memory_limit, inst.memory_high) == (100 * M, 50 * M)
            nursery.cancel_scope.cancel()

    import trio.testing

    trio.run(main)


def test_a_mark_moved_below_the_usage_is_news_at_once(dirs: Dirs) -> None:
    """A mark moved below what the sandbox already uses is news at once
    (the kernel would signal only the next crossing)."""
    f = fleet({"name": "over", "command": _fill(24), "memory": "64M", "tmpfs": ["/t"]})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        inst = sup.instance("over-0")
        assert inst is not None
        with trio.fail_after(60):
            while True:
                sb = inst.sandbox
                if sb is not None and sb.cgroup.stats().memory_current >= 20 * M:
                    break
                await trio.sleep(0.01)
        await sup.update_limits("over-0", {"memory_high": 8 * M}, reason="test: a low mark")
        ev = await wait_event(
            sup, lambda e: isinstance(e, events.MemoryPressure) and e.level == "high"
        )
        assert isinstance(ev, events.MemoryPressure) and ev.high == 8 * M

    run(f, dirs, body)
