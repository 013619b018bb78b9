"""The checkpoint plugin's logic, against the fake handle (no CRIU needed).

The real thing (CRIU, the supervisor, disk) is tested in test_checkpoint.py;
here: settings, which checkpoints are pruned, and the periodic loop's
timing under trio's MockClock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import events
from plugins._settings import SettingsError
from plugins.checkpoint import CheckpointPolicy, parse_policy, plugin, to_prune
from plugins.testing import FakeCheckpoint, FakeHandle, FakeInstance


def ck(name: str, tag: str, created: float, size: int = 100) -> FakeCheckpoint:
    return FakeCheckpoint(name=name, tag=tag, created=created, size=size)


def test_settings_are_strict() -> None:
    assert parse_policy({}) == CheckpointPolicy()
    assert parse_policy({"interval": "30s", "keep": 5, "max_disk": "1G"}) == CheckpointPolicy(
        interval=30.0, keep=5, max_disk=1 << 30
    )
    with pytest.raises(SettingsError, match="intervall: unknown key"):
        parse_policy({"intervall": "1s"})
    with pytest.raises(SettingsError, match="keep"):
        parse_policy({"keep": 0})
    with pytest.raises(SettingsError, match="interval"):
        parse_policy({"interval": "soon"})


def test_prune_keeps_the_newest_k_per_instance() -> None:
    a = [ck("a", f"a{i}", i) for i in range(5)]
    b = [ck("b", f"b{i}", 10 + i) for i in range(2)]
    doomed = to_prune({"a": a, "b": b}, {"a": 2, "b": 3}, None)
    assert [c.tag for c in doomed] == ["a0", "a1", "a2"]


def test_prune_respects_the_disk_bound_but_never_an_instances_newest() -> None:
    a = [ck("a", "a0", 1, 400), ck("a", "a1", 3, 400)]
    b = [ck("b", "b0", 2, 400), ck("b", "b1", 4, 900)]
    doomed = to_prune({"a": a, "b": b}, {"a": 10, "b": 10}, 1000)
    # Oldest first (a0, b0), then nothing more can go: a1 and b1 are newest.
    assert [c.tag for c in doomed] == ["a0", "b0"]
    assert to_prune({"a": a}, {"a": 10}, 10**6) == []


def test_periodic_checkpoints_prune_and_report() -> None:
    handle = FakeHandle(
        [FakeInstance("web-0"), FakeInstance("db-0")],
        settings={"web-0": {"interval": "10s", "keep": 2}},
    )

    async def main() -> None:
        with handle.bus.subscribe(kinds=["plugin"]) as sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(plugin, handle, {})
                reports = []
                async for ev in sub:
                    assert isinstance(ev, events.PluginEvent)
                    reports.append(ev)
                    if len(reports) == 4:
                        break
                nursery.cancel_scope.cancel()
        assert [e.name for e in reports] == ["checkpoint.pruned"] * 4
        assert [e.payload["count"] for e in reports] == [1, 2, 3, 4]
        assert [e.payload["kept"] for e in reports] == [1, 2, 2, 2]
        assert [len(e.payload["deleted"]) for e in reports] == [0, 0, 1, 1]
        # 10 s apart on the (mock) clock, and only web-0 has an interval.
        assert trio.current_time() == pytest.approx(40.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    made = [c for c in handle.calls if c[0] == "checkpoint"]
    assert len(made) == 4 and all(c[1] == "web-0" and c[3] is True for c in made)
    assert all(c[2].startswith("auto-") for c in made)
    assert [c.tag for c in handle.checkpoints_["web-0"]] == [made[2][2], made[3][2]]


def test_a_stopped_instance_is_not_checkpointed() -> None:
    handle = FakeHandle(
        [FakeInstance("web-0", state="exited")], settings={"web-0": {"interval": 1}}
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plugin, handle, {})
            await trio.sleep(10)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not [c for c in handle.calls if c[0] == "checkpoint"]


def test_a_paused_instance_is_skipped_until_resumed() -> None:
    """Paused is neither hung nor dead: no checkpoint of it, and none missed
    once it runs again."""
    inst = FakeInstance("web-0", state="paused")
    handle = FakeHandle([inst], settings={"web-0": {"interval": 1}})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plugin, handle, {})
            await trio.sleep(10.5)
            assert not [c for c in handle.calls if c[0] == "checkpoint"]
            inst.state = "running"
            await trio.sleep(2)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len([c for c in handle.calls if c[0] == "checkpoint"]) == 2
