"""The restart plugin's decisions: backoff, jitter, reset, intensity, OOM growth.

Deterministic: trio's MockClock (autojump) drives time; nothing sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import pytest
import trio
import trio.testing

import events
from plugins.restart import InstanceHistory, OomGrow, parse_policy, plugin
from plugins.testing import FakeHandle, exited, started

M = 1 << 20


def mock_clock_test(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    @wraps(fn)
    def run() -> None:
        trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))

    return run


def decide(
    policy: Any, history: InstanceHistory, ev: events.Exited, now: float, memory: int | None = None
) -> Any:
    from plugins.restart import decide as d

    return d(policy, history, ev, now=now, memory_limit=memory, rng=random.Random(1))


def test_parse_policy_defaults_and_errors() -> None:
    """Defaults are Docker-like; each bad setting names its field."""
    p = parse_policy({})
    assert (p.mode, p.delay, p.factor, p.max_delay, p.reset_after) == ("no", 0.1, 2.0, 60.0, 10.0)
    assert parse_policy({"policy": "on-failure:3"}).max_restarts == 3
    assert parse_policy({"on_oom": {"grow": 1.5, "max": "512M"}}).on_oom == OomGrow(1.5, 512 * M)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"policy": "sometimes"}, "policy: expected no, on-failure"),
        ({"policy": "always:3"}, "policy: expected"),
        ({"delay": "soon"}, "delay: expected a duration"),
        ({"factor": 0.5}, "factor: expected a number from 1 to 100"),
        ({"jitter": 2}, "jitter: expected a number from 0 to 1"),
        ({"intensity": 1.5}, "intensity: expected a whole number"),
        ({"on_oom": "grow"}, "on_oom: expected"),
        ({"on_oom": {"grow": 1.5}}, "on_oom: expected"),
        ({"retries": 3}, "retries: unknown key"),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_policy(settings)


def test_backoff_doubles_to_the_cap_within_jitter() -> None:
    """Delays follow delay * factor**n up to max_delay, each within +/- jitter."""
    policy = parse_policy({"policy": "always", "delay": "100ms", "factor": 2, "max_delay": "1s",
                           "jitter": 0.1, "intensity": 100})  # fmt: skip
    h = InstanceHistory()
    delays = [decide(policy, h, exited("a-0", 1), now=float(i)).delay for i in range(8)]
    expected = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for got, want in zip(delays, expected, strict=True):
        assert want * 0.9 <= got <= want * 1.1
    no_jitter = parse_policy({"policy": "always", "jitter": 0, "intensity": 100})
    h = InstanceHistory()
    assert [decide(no_jitter, h, exited("a-0", 1), now=float(i)).delay for i in range(3)] == [
        0.1,
        0.2,
        0.4,
    ]


def test_a_crash_loop_past_a_thousand_restarts_stays_at_the_cap() -> None:
    """factor ** attempt overflows a float at 1,025 doublings: the delay
    stays max_delay (once, this ended the plugin with an OverflowError)."""
    policy = parse_policy({"policy": "always", "delay": "1ms", "max_delay": "1ms",
                           "jitter": 0, "intensity": 1_000_000})  # fmt: skip
    h = InstanceHistory()
    delays = [decide(policy, h, exited("a-0", 1), now=i / 1e6).delay for i in range(1100)]
    assert delays[-1] == 0.001 and h.attempt == 1100


def test_stable_run_resets_the_backoff() -> None:
    """A run longer than reset_after starts the backoff from the beginning."""
    policy = parse_policy({"policy": "always", "jitter": 0, "reset_after": "10s"})
    h = InstanceHistory()
    h.started_at = 0.0
    assert decide(policy, h, exited("a-0", 1), now=1.0).delay == 0.1
    h.started_at = 2.0
    assert decide(policy, h, exited("a-0", 1), now=3.0).delay == 0.2
    h.started_at = 5.0
    d = decide(policy, h, exited("a-0", 1), now=20.0)  # ran 15 s: stable
    assert (d.delay, d.attempt) == (0.1, 1)


def test_intensity_limit_marks_failed() -> None:
    """More than N restarts within T seconds: the next exit is a failure."""
    policy = parse_policy({"policy": "always", "delay": 0, "intensity": 3, "period": "10s"})
    h = InstanceHistory()
    actions = [decide(policy, h, exited("a-0", 1), now=t).action for t in (0, 1, 2, 3)]
    assert actions == ["restart", "restart", "restart", "fail"]
    # Once the window has moved on, restarting is allowed again.
    h2 = InstanceHistory()
    actions = [decide(policy, h2, exited("a-0", 1), now=t).action for t in (0, 1, 2, 13)]
    assert actions == ["restart", "restart", "restart", "restart"]


def test_policies() -> None:
    """no never restarts; on-failure only after a failure; always after anything."""
    h = InstanceHistory()
    assert decide(parse_policy({"policy": "no"}), h, exited("a-0", 1), 0).action == "none"
    on_failure = parse_policy({"policy": "on-failure"})
    assert decide(on_failure, h, exited("a-0", 0), 0).action == "none"
    assert decide(on_failure, h, exited("a-0", 2), 0).action == "restart"
    assert decide(on_failure, h, exited("a-0", 0, oom_killed=True), 1).action == "restart"
    assert (
        decide(parse_policy({"policy": "always"}), InstanceHistory(), exited("a-0", 0), 0).action
        == "restart"
    )
    limited = parse_policy({"policy": "on-failure:2", "delay": 0})
    h = InstanceHistory()
    got = [decide(limited, h, exited("a-0", 1), float(t)) for t in range(3)]
    assert [d.action for d in got] == ["restart", "restart", "fail"]
    assert "on-failure:2 limit reached after 2 restarts (last status 1)" in got[-1].reason


def test_oom_grow_multiplies_the_limit_up_to_the_cap() -> None:
    """after an OOM kill: 32M -> 48M -> 72M -> ... capped at max."""
    policy = parse_policy({"policy": "on-failure", "on_oom": {"grow": 1.5, "max": "100M"}})
    h = InstanceHistory()
    oom = exited("a-0", 137, oom_killed=True)
    assert decide(policy, h, oom, 0, memory=32 * M).memory == 48 * M
    assert decide(policy, h, oom, 1, memory=48 * M).memory == 72 * M
    assert decide(policy, h, oom, 2, memory=72 * M).memory == 100 * M
    assert decide(policy, h, oom, 3, memory=100 * M).memory is None  # at the cap: unchanged
    stop = parse_policy({"policy": "always", "on_oom": "stop"})
    assert decide(stop, InstanceHistory(), oom, 0).action == "fail"


@mock_clock_test
async def test_plugin_restarts_after_the_backoff_delay() -> None:
    """The plugin publishes restarting, waits the delay, then restarts (MockClock)."""
    handle = FakeHandle(
        ["a-0", "b-0"],
        settings={"a-0": {"policy": "on-failure", "delay": "2s", "jitter": 0},
                  "b-0": {"policy": "no"}},
    )  # fmt: skip
    with handle.subscribe(kinds=["restarting"]) as seen:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plugin, handle, {})
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            handle.publish(started("a-0"))
            handle.publish(exited("a-0", 1, handle=handle))
            handle.publish(exited("b-0", 1, handle=handle))
            await trio.testing.wait_all_tasks_blocked()
            (ev,) = [seen.receive_nowait()]
            assert isinstance(ev, events.Restarting)
            assert (ev.sandbox, ev.delay, ev.attempt, ev.reason) == (
                "a-0",
                2.0,
                1,
                "exited with status 1",
            )
            assert handle.calls == []
            await trio.sleep(2.5)
            assert handle.calls == [("restart", "a-0")]
            assert trio.current_time() - t0 == pytest.approx(2.5)
            nursery.cancel_scope.cancel()


@mock_clock_test
async def test_plugin_marks_failed_and_grows_memory() -> None:
    """on-failure:1 fails the second exit; an OOM kill grows the limit first."""
    from plugins.testing import FakeInstance

    handle = FakeHandle(
        [FakeInstance("a-0", memory_limit=32 * M), FakeInstance("h-0", memory_limit=32 * M)],
        settings={
            "a-0": {"policy": "on-failure:1", "delay": 0},
            "h-0": {"policy": "on-failure", "delay": 0, "on_oom": {"grow": 1.5, "max": "1G"}},
        },
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin, handle, {})
        await trio.testing.wait_all_tasks_blocked()
        handle.publish(exited("a-0", 1, handle=handle))
        await trio.testing.wait_all_tasks_blocked()
        handle.publish(exited("a-0", 1, handle=handle))
        handle.publish(exited("h-0", 137, oom_killed=True, handle=handle))
        await trio.testing.wait_all_tasks_blocked()
        assert handle.calls[0] == ("restart", "a-0")
        assert handle.calls[1][:2] == ("failed", "a-0")
        assert handle.calls[2:] == [("memory", "h-0", 48 * M), ("restart", "h-0")]
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_plugin_leaves_stopped_instances_alone() -> None:
    """An instance being stopped (unless-stopped, or the fleet stopping) is not restarted."""
    from plugins.testing import FakeInstance

    handle = FakeHandle([FakeInstance("a-0", stop_requested=True)],
                        settings={"a-0": {"policy": "unless-stopped", "delay": 0}})  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin, handle, {})
        await trio.testing.wait_all_tasks_blocked()
        handle.publish(exited("a-0", 143, handle=handle))
        await trio.testing.wait_all_tasks_blocked()
        assert handle.calls == []
        nursery.cancel_scope.cancel()
