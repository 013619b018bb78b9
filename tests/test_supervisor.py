"""The supervisor end to end: a fleet, the kernel watchers and the events they produce."""

from __future__ import annotations

import signal

import pytest

import events
from supervisor import Supervisor

from .conftest import Dirs, requires_root
from .supervising import HOG, fleet, of, run, wait_event, wait_log

pytestmark = [requires_root, pytest.mark.layout]


def test_oom_kill_is_reported_for_the_right_sandbox(dirs: Dirs) -> None:
    """Of three sandboxes, the hog's oom_kill and exited(oom_killed) arrive; the others run on."""
    f = fleet(
        {"name": "web", "command": "while :; do sleep 1; done", "replicas": 2, "memory": "32M"},
        {"name": "hog", "command": HOG, "memory": "32M"},
    )

    async def body(sup: Supervisor) -> None:
        for name in ("web-0", "web-1"):

            def is_started(e: events.Event, n: str = name) -> bool:
                return isinstance(e, events.Started) and e.sandbox == n

            await wait_event(sup, is_started)
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "hog-0")
        assert [i.state for i in sup.instances if i.config.name == "web"] == ["running"] * 2

    evs = run(f, dirs, body)
    (kill,) = of(evs, events.OomKill, "hog-0")
    assert kill.count >= 1 and kill.instance == 0 and kill.generation == 0
    (exited,) = of(evs, events.Exited, "hog-0")
    assert exited.oom_killed and exited.status == 137
    assert exited.seq > kill.seq
    for web in ("web-0", "web-1"):
        assert not of(evs, events.OomKill, web)
        (web_exit,) = of(evs, events.Exited, web)
        assert not web_exit.oom_killed and web_exit.signal is None  # ended by the stop's SIGTERM
        assert web_exit.status == 143
        assert of(evs, events.Stopped, web)
    assert isinstance(evs[0], events.SupervisorStarted)
    assert isinstance(evs[-1], events.SupervisorStopped)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))


def test_exit_codes_and_signals_are_exact(dirs: Dirs) -> None:
    """Exit 0, exit 3 and death by SIGKILL are reported exactly."""
    f = fleet(
        {"name": "ok", "command": "true"},
        {"name": "three", "command": "exit 3"},
        {"name": "killed", "command": "kill -KILL $$"},
        {"name": "usr1", "command": ["sh", "-c", "kill -USR1 $$"]},
    )
    names = {"ok-0", "three-0", "killed-0", "usr1-0"}

    async def body(sup: Supervisor) -> None:
        seen: set[str] = set()
        while seen != names:
            e = await wait_event(
                sup, lambda e: isinstance(e, events.Exited) and e.sandbox in names - seen
            )
            seen.add(e.sandbox)

    evs = run(f, dirs, body)
    got = {
        e.sandbox: (e.status, e.exit_code, e.signal, e.oom_killed)
        for e in evs
        if isinstance(e, events.Exited)
    }
    # tini reports a child killed by signal N as exit status 128+N.
    assert got == {
        "ok-0": (0, 0, None, False),
        "three-0": (3, 3, None, False),
        "killed-0": (137, 137, None, False),
        "usr1-0": (128 + signal.SIGUSR1, 128 + signal.SIGUSR1, None, False),
    }


def test_start_failure_is_an_event_and_others_run(dirs: Dirs) -> None:
    """A sandbox that cannot start is reported; the supervisor and the others carry on."""
    f = fleet(
        {"name": "broken", "command": ["no-such-command"]},
        {"name": "fine", "command": "echo hello; while :; do sleep 1; done"},
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.StartFailed))
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "fine-0")
        await wait_log(dirs, "fine-0", "hello\n")

    evs = run(f, dirs, body)
    (failed,) = of(evs, events.StartFailed, "broken-0")
    assert "command not found" in failed.error
    assert of(evs, events.Stopped, "fine-0")


def test_graceful_stop_kills_a_sandbox_ignoring_sigterm(dirs: Dirs) -> None:
    """A sandbox that ignores SIGTERM is SIGKILLed after the grace period."""
    f = fleet(
        {"name": "stubborn", "command": "trap '' TERM; echo ready; while :; do sleep 1; done"},
        {"name": "polite", "command": "exec sleep 1000"},
        grace_period="1s",
    )

    async def body(sup: Supervisor) -> None:
        for name in ("stubborn-0", "polite-0"):

            def is_started(e: events.Event, n: str = name) -> bool:
                return isinstance(e, events.Started) and e.sandbox == n

            await wait_event(sup, is_started)
        # The trap must be in place before the stop's SIGTERM arrives.
        await wait_log(dirs, "stubborn-0", "ready\n")

    evs = run(f, dirs, body)
    (stopping,) = of(evs, events.Stopping, "stubborn-0")
    assert stopping.grace == 1.0
    (exited,) = of(evs, events.Exited, "stubborn-0")
    # tini forwards SIGTERM, which the shell ignores; then SIGKILL hits tini.
    assert exited.signal == signal.SIGKILL
    assert exited.mono - stopping.mono >= 1.0
    (polite,) = of(evs, events.Exited, "polite-0")
    assert polite.status == 143 and polite.mono - stopping.mono < 1.0
    assert of(evs, events.Stopped, "stubborn-0") and of(evs, events.Stopped, "polite-0")


def test_outside_consumer_gets_replay_then_live(dirs: Dirs) -> None:
    """A socket consumer with since=1 sees every event so far, in order, then live ones."""
    f = fleet({"name": "a", "command": "while :; do sleep 1; done"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert sup.bus is not None
        for i in range(1000):
            sup.publish(events.PluginEvent(sandbox="a-0", name="test", payload={"i": i}))
        got: list[events.Event] = []
        async with events.subscribe(sup.socket_path, since=1) as stream:
            async for ev in stream:
                got.append(ev)
                if len(got) == sup.bus.last_seq:
                    sup.publish(
                        events.PluginEvent(sandbox="a-0", name="test", payload={"i": "live"})
                    )
                if isinstance(ev, events.PluginEvent) and ev.payload["i"] == "live":
                    break
        assert [e.seq for e in got] == list(range(1, len(got) + 1))
        plugin = [e.payload["i"] for e in got if isinstance(e, events.PluginEvent)]
        assert plugin == [*range(1000), "live"]

    run(f, dirs, body)


def test_a_spec_refused_at_start_fails_that_instance_only(dirs: Dirs) -> None:
    """A runtime name grown too long (a generation past its room) is that
    instance's start_failed; the supervisor and the other sandboxes run on."""
    f = fleet(
        {"name": "a" * 50, "command": "exec sleep 1000"},
        {"name": "ok", "command": "exec sleep 1000"},
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.StartFailed))
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "ok-0")

    def setup(sup: Supervisor) -> None:
        sup.instances[0].generation = 10**11  # 12 digits: past the room kept for it

    evs = run(f, dirs, body, setup)
    failed = [e for e in evs if isinstance(e, events.StartFailed)]
    assert [e.sandbox for e in failed] == ["a" * 50 + "-0"]
    assert "name" in failed[0].error
    assert any(isinstance(e, events.Started) and e.sandbox == "ok-0" for e in evs)
