"""Restarts under load: a crash loop must not starve the rest of the fleet.

Not in the VM lane: this is about the supervisor's scheduling, not the
cgroup layout, and software emulation is too slow for its loose bound.
"""

from __future__ import annotations

import events
from supervisor import Supervisor

from .conftest import Dirs, requires_root
from .supervising import fleet, of, run, wait_event

pytestmark = requires_root


def restart(**settings: object) -> dict[str, object]:
    return {"restart": {"delay": 0, "jitter": 0, **settings}}


def test_a_crash_loop_does_not_delay_the_others(dirs: Dirs) -> None:
    """One sandbox crash-looping with no backoff; 20 others still restart promptly."""
    f = fleet(
        {"name": "loop", "command": "exit 1", "plugins": restart(policy="always", intensity=10**6)},
        {"name": "other", "replicas": 20, "command": "sleep 0.3; exit 2",
         "plugins": restart(policy="on-failure:1")},
    )  # fmt: skip
    names = {f"other-{i}" for i in range(20)}

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup,
            lambda e: (
                isinstance(e, events.Started) and e.sandbox == "loop-0" and e.generation >= 10
            ),
        )
        seen: set[str] = set()
        while seen != names:
            e = await wait_event(
                sup,
                lambda e: (
                    isinstance(e, events.Started)
                    and e.generation == 1
                    and e.sandbox in names - seen
                ),
            )
            seen.add(e.sandbox)

    evs = run(f, dirs, body)
    assert len(of(evs, events.Exited, "loop-0")) > 5  # it really was looping
    for name in names:
        exited = of(evs, events.Exited, name)[0]
        restarted = next(e for e in of(evs, events.Started, name) if e.generation == 1)
        # Loose on purpose: this is about not being starved, not a benchmark.
        assert restarted.mono - exited.mono < 2.0, name
