"""Restart policies, OOM reactions and plugin failures, end to end on the real kernel."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

import pytest
import trio

import events
from plugins import Handle
from plugins import restart as restart_plugin
from supervisor import SpecError, Supervisor
from supervisor._core._fleet import parse_fleet

from .conftest import Dirs, requires_root
from .supervising import fleet, of, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]

M = 1 << 20
# Needs about 54 MiB: OOM-killed under 32M and under 48M, fine under 72M.
HOG_60M = (
    "x=0123456789abcdef; while [ ${#x} -lt 16777216 ]; do x=$x$x; done;"
    " x=$x${x:0:6291456}; echo done ${#x}"
)


def restart(**settings: object) -> dict[str, object]:
    return {"restart": {"delay": 0, "jitter": 0, **settings}}


def test_on_failure_3_restarts_exactly_three_times(dirs: Dirs) -> None:
    """exit 1 under on-failure:3: generations 0-3 run, then `failed` with the last status."""
    f = fleet({"name": "flaky", "command": "exit 1", "plugins": restart(policy="on-failure:3")})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Failed))

    evs = run(f, dirs, body)
    exits = of(evs, events.Exited, "flaky-0")
    assert [(e.generation, e.status) for e in exits] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert [e.attempt for e in of(evs, events.Restarting, "flaky-0")] == [1, 2, 3]
    (failed,) = of(evs, events.Failed, "flaky-0")
    assert "on-failure:3 limit reached after 3 restarts (last status 1)" in failed.reason
    assert failed.seq > exits[-1].seq


def test_always_restarts_after_success_and_unless_stopped_stays_stopped(dirs: Dirs) -> None:
    """`always` restarts after exit 0; `unless-stopped` stays stopped after a stop."""
    f = fleet(
        {"name": "job", "command": "true", "plugins": restart(policy="always", intensity=1000)},
        {"name": "svc", "command": "exec sleep 1000", "plugins": restart(policy="unless-stopped")},
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup,
            lambda e: isinstance(e, events.Started) and e.sandbox == "job-0" and e.generation >= 2,
        )
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "svc-0")
        sup.stop_instance("svc-0")
        await wait_event(sup, lambda e: isinstance(e, events.Stopped) and e.sandbox == "svc-0")
        instance = sup.instance("svc-0")
        assert instance is not None and instance.state == "stopped"
        # A restart request for a stopped instance is refused.
        assert not sup.restart("svc-0")

    evs = run(f, dirs, body)
    assert [e.generation for e in of(evs, events.Started, "svc-0")] == [0]
    assert not of(evs, events.Restarting, "svc-0")


def test_oom_kill_grows_the_memory_limit_until_it_fits(dirs: Dirs) -> None:
    """32M: OOM-killed, restarted at 48M, OOM-killed, restarted at 72M, runs to completion."""
    f = fleet(
        {
            "name": "hog",
            "command": HOG_60M,
            "memory": "32M",
            "plugins": restart(policy="on-failure", on_oom={"grow": 1.5, "max": "512M"}),
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.status == 0, timeout=120)

    evs = run(f, dirs, body)
    steps = [
        (type(e).__name__, e.generation, getattr(e, "new", None))
        for e in evs
        if e.sandbox == "hog-0"
        and isinstance(e, events.OomKill | events.LimitChanged | events.Exited)
    ]
    assert steps == [
        ("OomKill", 0, None),
        ("Exited", 0, None),
        ("LimitChanged", 0, 48 * M),
        ("OomKill", 1, None),
        ("Exited", 1, None),
        ("LimitChanged", 1, 72 * M),
        ("Exited", 2, None),
    ]
    final = of(evs, events.Exited, "hog-0")[-1]
    assert (final.status, final.oom_killed) == (0, False)
    assert [r.reason for r in of(evs, events.Restarting, "hog-0")] == ["OOM-killed", "OOM-killed"]


async def boom(handle: object, config: object) -> None:
    """A plugin that raises on every event."""
    with handle.subscribe() as sub:  # type: ignore[attr-defined]
        async for _ in sub:
            raise RuntimeError("boom")


def test_a_raising_plugin_is_reported_and_the_rest_goes_on(dirs: Dirs) -> None:
    """A plugin that raises: plugin_failed events (restart, then disable); others unaffected."""
    doc_plugins = {"boom": {"module": "tests.test_restart:boom"}}
    from supervisor._core._fleet import parse_fleet

    f = parse_fleet(
        {
            "plugins": doc_plugins,
            "supervisor": {"grace_period": "1s"},
            "sandbox": [
                {"name": "flaky", "command": "sleep 0.2; exit 1",
                 "plugins": restart(policy="on-failure:2")},
            ],
        }
    )  # fmt: skip

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Failed))

        async def poke() -> None:
            # Events for the restarted plugin to choke on again.
            while True:
                sup.publish(events.PluginEvent(sandbox="", name="test.poke", payload={}))
                await trio.sleep(0.2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poke)
            await wait_event(
                sup, lambda e: isinstance(e, events.PluginFailed) and e.action == "disable"
            )
            nursery.cancel_scope.cancel()

    evs = run(f, dirs, body)
    failures = [e for e in evs if isinstance(e, events.PluginFailed)]
    assert [(e.plugin, e.action) for e in failures] == [
        ("boom", "restart"),
        ("boom", "restart"),
        ("boom", "disable"),
    ]
    assert failures[0].error == "RuntimeError: boom"
    # The restart plugin kept working throughout.
    assert [e.generation for e in of(evs, events.Exited, "flaky-0")] == [0, 1, 2]


class _Gate:
    """Holds the `unchecked_restart` plugin down after its first failure."""

    runs = 0
    back = trio.Event()


async def unchecked_restart(handle: Handle, config: Mapping[str, Any]) -> None:
    """The restart plugin as a third-party copy without its settings check, so a bad
    per-sandbox table fails it at that sandbox's first exit; once restarted, it stays
    down until the test opens the gate."""
    _Gate.runs += 1
    if _Gate.runs > 1:
        await _Gate.back.wait()
    await restart_plugin.plugin(handle, config)


def test_the_restart_plugin_restarts_what_exited_while_it_was_down(dirs: Dirs) -> None:
    """The restart plugin fails on one sandbox's bad table; a sandbox that exits while it is
    down is restarted once it is back: it resumes from the last event it was given."""
    _Gate.runs, _Gate.back = 0, trio.Event()
    plugin = {"module": "tests.test_restart:unchecked_restart"}
    f = parse_fleet(
        {
            "plugins": {"unchecked_restart": plugin},
            "supervisor": {"grace_period": "1s"},
            "sandbox": [
                {"name": "svc", "command": "exec sleep 1000",
                 "plugins": {"unchecked_restart": {"policy": "on-failure", "delay": 0}}},
                {"name": "bad", "command": "exit 1",
                 "plugins": {"unchecked_restart": {"policy": "sometimes"}}},
            ],
        }
    )  # fmt: skip

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup, lambda e: isinstance(e, events.PluginFailed) and e.plugin == "unchecked_restart"
        )
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "svc-0")
        # As a plugin would pass it: an IntEnum, encoded as the int it is.
        await sup.kill_sandbox("svc-0", signal.SIGTERM)
        with pytest.raises(SpecError, match="signal: expected a signal number, got 999"):
            await sup.kill_sandbox("svc-0", 999)
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "svc-0")
        _Gate.back.set()
        await wait_event(
            sup,
            lambda e: isinstance(e, events.Started) and e.sandbox == "svc-0" and e.generation == 1,
        )

    evs = run(f, dirs, body)
    (failure,) = [e for e in evs if isinstance(e, events.PluginFailed)]
    (signaled,) = of(evs, events.Signaled, "svc-0")
    assert (type(signaled.signal), signaled.signal, signaled.name) == (int, 15, "SIGTERM")
    assert (failure.plugin, failure.action) == ("unchecked_restart", "restart")
    assert "policy: sandbox 'bad-0': expected no, on-failure" in failure.error
    (exit0,) = [e for e in of(evs, events.Exited, "svc-0") if e.generation == 0]
    assert exit0.seq > failure.seq  # it exited while the plugin was down
    (restarting,) = of(evs, events.Restarting, "svc-0")
    assert (restarting.generation, restarting.reason) == (0, "exited with status 143")
    assert _Gate.runs == 2
