"""Standby generations (the restart plugin's ``standby``): the next
generation is made up to its exec while the current one runs, a restart
execs it, and a standby that cannot serve is undone without a trace."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

import events
from plugins import restart as restart_plugin
from plugins._settings import SettingsError
from supervisor import Supervisor

from .conftest import Dirs, requires_root
from .supervising import fleet, of, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]  # cgroups and the spawn path


def _in_cgroup(name: str) -> list[int]:
    """Host PIDs whose cgroup is sandbox *name*'s (``corral-NAME``), any layout."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/cgroup").read_text()
        except OSError:
            continue  # it ended meanwhile
        if any(line.endswith(f"/corral-{name}") for line in text.splitlines()):
            found.append(int(entry))
    return found


def _is_init(pid: int) -> bool:
    """Whether *pid* is PID 1 of a PID namespace of its own."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    (nspid,) = (ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:"))
    return len(nspid) > 1 and nspid[-1] == "1"


async def _standby_of(name: str) -> int:
    """The PID of sandbox *name*'s init once it exists (the process that
    made it, which is in its cgroup too, ends by itself)."""
    with trio.fail_after(30):
        while True:
            inits = [pid for pid in _in_cgroup(name) if _is_init(pid)]
            if inits:
                return inits[0]
            await trio.sleep(0.01)


def _policy(**extra: object) -> dict[str, object]:
    return {"restart": {"policy": "always", "delay": 0, "jitter": 0, "standby": True, **extra}}


def test_a_restart_execs_the_standby_made_while_the_generation_ran(dirs: Dirs) -> None:
    f = fleet({"name": "w", "command": "exec sleep 1000", "plugins": _policy()})
    seen: dict[str, int] = {}

    async def body(sup: Supervisor) -> None:
        first = await wait_event(sup, lambda e: isinstance(e, events.Started))
        # Generation 1 stands by: its init exists, in its own cgroup, and
        # has not exec'd (no tini yet: it is still corral's child code).
        standby = await _standby_of("w-0.1")
        assert Path(f"/proc/{standby}/exe").resolve() != Path("/usr/bin/tini-static")
        assert (dirs.state / "sandboxes" / "w-0.1").is_dir()
        assert not (dirs.run / "sandboxes" / "w-0.1.json").exists()  # no record yet
        seen["standby"] = standby
        os.kill(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        started = await wait_event(
            sup, lambda e: isinstance(e, events.Started) and e.generation == 1
        )
        seen["started"] = started.pid  # type: ignore[attr-defined]
        # ...and generation 2 stands by in turn, until the stop undoes it.
        seen["next"] = await _standby_of("w-0.2")

    evs = run(f, dirs, body)
    assert seen["started"] == seen["standby"]  # the standby's init is the new generation's
    assert [e.generation for e in of(evs, events.Started, "w-0")] == [0, 1]
    # Nothing is left of the standby that never ran: its init, cgroup, layer.
    assert not os.path.exists(f"/proc/{seen['next']}")
    assert _in_cgroup("w-0.2") == []
    assert not (dirs.state / "sandboxes" / "w-0.2").exists()


def test_a_standby_made_for_other_limits_is_dropped_and_the_restart_starts_afresh(
    dirs: Dirs,
) -> None:
    f = fleet({"name": "w", "command": "exec sleep 1000", "memory": "64M", "plugins": _policy()})
    seen: dict[str, int] = {}

    async def body(sup: Supervisor) -> None:
        first = await wait_event(sup, lambda e: isinstance(e, events.Started))
        seen["standby"] = await _standby_of("w-0.1")
        await sup.update_limits("w-0", {"memory": 96 << 20})  # later generations too
        os.kill(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        started = await wait_event(
            sup, lambda e: isinstance(e, events.Started) and e.generation == 1
        )
        seen["started"] = started.pid  # type: ignore[attr-defined]

    run(f, dirs, body)
    assert seen["started"] != seen["standby"]
    assert not os.path.exists(f"/proc/{seen['standby']}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"standby": "yes"}, "expected true or false, got 'yes'"),
        ({"standby": True, "from_checkpoint": True}, "not with from_checkpoint"),
        ({"standby": True}, 'nothing to stand by for with policy = "no"'),
    ],
)
def test_standby_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        restart_plugin.parse_policy(settings)
    assert info.value.field == "standby" and message in str(info.value)
