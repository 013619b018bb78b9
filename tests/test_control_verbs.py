"""The control verbs end to end: a real supervisor, real sandboxes, the socket.

ps, inspect, stats, stop/start/restart, kill, pause/resume (the freezer of
either cgroup layout: these run in both lanes), add/rm, and the one state
machine that refuses a verb in the wrong state.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

import events
from supervisor import Supervisor
from supervisor._control._client import ControlError, result_of
from supervisor._runtime._spec import DEFAULT_PIDS

from .conftest import Dirs, requires_root
from .supervising import fleet, of, output, request, run, wait_event, wait_log

pytestmark = [requires_root, pytest.mark.layout]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.05; done"


def _sock(dirs: Dirs) -> str:
    return str(dirs.run / "control.sock")


async def acall(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """The result of one request, or its error raised as ControlError."""
    return result_of(await request(path, method, params))


async def expect_error(path: str, code: str, method: str, params: dict[str, Any]) -> str:
    with pytest.raises(ControlError) as err:
        await acall(path, method, params)
    assert err.value.code == code, err.value
    return str(err.value)


def _count(dirs: Dirs, runtime_name: str) -> list[int]:
    """The counter's lines, read from the sandbox's writable layer on the host."""
    p = Path(dirs.state, "sandboxes", runtime_name, "upper", "tmp", "count")
    try:
        return [int(x) for x in p.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


async def _wait_count(dirs: Dirs, runtime_name: str, above: int) -> list[int]:
    with trio.fail_after(30):
        while True:
            values = _count(dirs, runtime_name)
            if values and values[-1] > above:
                return values
            await trio.sleep(0.01)


def test_ps_inspect_and_stats_describe_the_fleet(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000", "replicas": 2, "memory": "64M"})

    async def body(sup: Supervisor) -> None:
        for i in range(2):

            def is_started(e: events.Event, i: int = i) -> bool:
                return isinstance(e, events.Started) and e.instance == i

            await wait_event(sup, is_started)
        path = _sock(dirs)
        rows = await acall(path, "ps")
        assert [r["name"] for r in rows] == ["web-0", "web-1"]
        for r in rows:
            inst = sup.instance(r["name"])
            assert inst is not None and inst.sandbox is not None
            assert r["state"] == "running" and r["pid"] == inst.sandbox.pid
            assert r["memory_limit"] == 64 << 20 and r["memory"] > 0
            assert r["restarts"] == 0 and r["last_exit"] is None and r["uptime"] >= 0

        info = await acall(path, "inspect", {"name": "web-1"})
        inst = sup.instance("web-1")
        assert inst is not None and inst.sandbox is not None
        pid = inst.sandbox.pid
        assert info["namespaces"]["pid"] == os.readlink(f"/proc/{pid}/ns/pid")
        assert info["namespaces"]["net"] != os.readlink("/proc/self/ns/net")
        assert info["cgroup"] == list(inst.sandbox.cgroup.paths)
        assert all(os.path.isdir(p) for p in info["cgroup"])
        assert pid in info["pids"]
        assert info["spec"]["command"] == ["/bin/sh", "-c", "exec sleep 1000"]
        assert info["limits"]["memory"] == 64 << 20
        # What the cgroup enforces: the default task limit, not "unlimited".
        assert info["limits"]["pids"] == DEFAULT_PIDS
        assert [e["kind"] for e in info["events"]] == ["created", "started"]
        assert info["stats"]["pids_current"] >= 1

        stats = await acall(path, "stats", {"names": ["web"]})
        assert [s["name"] for s in stats] == ["web-0", "web-1"]
        for s in stats:
            assert s["memory_current"] > 0 and s["cpu_usage_ns"] > 0
            assert s["oom_kill"] == 0 and s["memory_limit"] == 64 << 20
        assert "no sandbox or instance 'nope'" in await expect_error(
            path, "invalid", "stats", {"names": ["nope"]}
        )
        assert "'nope'" in await expect_error(path, "invalid", "inspect", {"name": "nope"})

    run(f, dirs, body)


def test_stop_start_restart_and_the_state_machine(dirs: Dirs) -> None:
    f = fleet(
        {
            "name": "web",
            "command": "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
            "plugins": {"restart": {"policy": "always", "delay": "0s"}},
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_log(dirs, "web-0", "ready\n")
        path = _sock(dirs)
        inst = sup.instance("web-0")
        assert inst is not None and inst.sandbox is not None
        first_pid = inst.sandbox.pid

        (row,) = await acall(path, "stop", {"name": "web", "timeout": 5})
        assert row["state"] == "stopped" and row["pid"] is None
        assert row["last_exit"]["status"] == 0  # its TERM trap ran
        # Stopped on request: the "always" policy leaves it alone.
        assert inst.state == "stopped"
        msg = await expect_error(path, "wrong_state", "stop", {"name": "web-0"})
        assert msg == "cannot stop 'web-0': it is stopped already"
        msg = await expect_error(path, "wrong_state", "pause", {"name": "web-0"})
        assert msg == "cannot pause 'web-0': it is stopped (pause needs a running sandbox)"
        await expect_error(
            path, "wrong_state", "exec", {"name": "web-0", "argv": ["true"], "tty": True}
        )
        await expect_error(path, "wrong_state", "kill", {"name": "web-0"})

        (row,) = await acall(path, "start", {"name": "web-0"})
        assert row["state"] == "running" and row["generation"] == 1
        assert row["pid"] not in (None, first_pid)
        msg = await expect_error(path, "wrong_state", "start", {"name": "web-0"})
        assert msg == "cannot start 'web-0': it is running: restart it instead"

        await wait_log(dirs, "web-0", "ready\nbye\nready\n")
        (row,) = await acall(path, "restart", {"name": "web-0", "timeout": 5})
        assert row["state"] == "running" and row["generation"] == 2
        await wait_log(dirs, "web-0", "ready\nbye\nready\nbye\nready\n")

    evs = run(f, dirs, body)
    kinds = [e.kind for e in evs if e.sandbox == "web-0"]
    # No restart policy reaction to the requested stops: no "restarting".
    assert "restarting" not in kinds
    assert kinds[:9] == [
        "created", "started", "stopping", "exited", "stopped",
        "created", "started", "stopping", "exited",
    ]  # fmt: skip
    stopping = of(evs, events.Stopping, "web-0")
    assert [s.reason for s in stopping[:2]] == ["requested", "restart requested"]
    assert [s.grace for s in stopping[:2]] == [5.0, 5.0]


def test_kill_signals_the_main_process_through_the_init(dirs: Dirs) -> None:
    f = fleet(
        {
            "name": "web",
            "command": "trap 'echo got HUP' HUP; echo ready; while :; do sleep 0.05; done",
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_log(dirs, "web-0", "ready\n")
        path = _sock(dirs)
        (row,) = await acall(path, "kill", {"name": "web-0", "signal": "HUP"})
        assert row["state"] == "running"
        await wait_log(dirs, "web-0", "ready\ngot HUP\n")
        ev = await wait_event(sup, lambda e: isinstance(e, events.Signaled))
        assert isinstance(ev, events.Signaled)
        assert (ev.signal, ev.name) == (signal.SIGHUP, "SIGHUP")
        assert "signal: expected a signal name" in await expect_error(
            path, "invalid", "kill", {"name": "web-0", "signal": "NOPE"}
        )
        await acall(path, "kill", {"name": "web-0", "signal": 9})
        ex = await wait_event(sup, lambda e: isinstance(e, events.Exited))
        assert isinstance(ex, events.Exited) and ex.signal == signal.SIGKILL

    run(f, dirs, body)
    assert output(dirs, "web-0") == "ready\ngot HUP\n"


def test_pause_freezes_and_resume_continues_where_it_left(dirs: Dirs) -> None:
    f = fleet({"name": "c", "command": COUNTER})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)
        inst = sup.instance("c-0")
        assert inst is not None and inst.sandbox is not None
        rt = inst.spec().name
        await _wait_count(dirs, rt, 3)

        (row,) = await acall(path, "pause", {"name": "c"})
        assert row["state"] == "paused"
        cg = inst.sandbox.cgroup
        if sup.runtime is not None and sup.runtime.cgroups.layout == "v2":
            assert "frozen 1" in Path(cg.freezer_dir, "cgroup.events").read_text()
        else:
            assert Path(cg.freezer_dir, "freezer.state").read_text().strip() == "FROZEN"
        frozen_at = _count(dirs, rt)
        # An observation window, not a synchronisation: a frozen counter
        # must not move during it.
        await trio.sleep(0.5)
        assert _count(dirs, rt) == frozen_at
        assert inst.state == "paused"

        # Wrong-state verbs are refused while paused; nothing changes.
        assert "resume it first" in await expect_error(
            path, "wrong_state", "exec", {"name": "c-0", "argv": ["true"], "tty": True}
        )
        await expect_error(path, "wrong_state", "pause", {"name": "c-0"})
        await expect_error(path, "wrong_state", "checkpoint", {"name": "c-0"})

        (row,) = await acall(path, "resume", {"name": "c-0"})
        assert row["state"] == "running"
        after = await _wait_count(dirs, rt, frozen_at[-1] + 2)
        # It went on from where it stopped: no restart, no gap.
        assert after == list(range(1, len(after) + 1))
        await expect_error(path, "wrong_state", "resume", {"name": "c-0"})

        # A paused sandbox stops promptly (thawed first, then SIGTERM).
        await acall(path, "pause", {"name": "c-0"})
        (row,) = await acall(path, "stop", {"name": "c-0", "timeout": 10})
        assert row["state"] == "stopped" and row["last_exit"]["status"] == 143

    evs = run(f, dirs, body)
    kinds = [e.kind for e in evs if e.sandbox == "c-0"]
    assert kinds == [
        "created", "started", "paused", "checkpoint_failed", "resumed", "paused",
        "resumed", "stopping", "exited", "stopped",
    ]  # fmt: skip
    paused = of(evs, events.Paused, "c-0")[0]
    resumed = of(evs, events.Resumed, "c-0")[0]
    assert paused.freeze_ms >= 0 and resumed.paused_ms >= 500


def test_add_and_rm_change_the_running_fleet(dirs: Dirs, tmp_path: Path) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})
    extra = tmp_path / "extra.toml"
    extra.write_text('[[sandbox]]\nname = "extra"\ncommand = "exec sleep 1000"\nreplicas = 2\n')
    clash = tmp_path / "clash.toml"
    clash.write_text(
        '[[sandbox]]\nname = "other"\ncommand = "true"\n'
        '[[sandbox]]\nname = "web"\ncommand = "true"\n'
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)
        rows = await acall(path, "add", {"path": str(extra)})
        assert [(r["name"], r["state"]) for r in rows] == [
            ("extra-0", "running"),
            ("extra-1", "running"),
        ]
        assert [r["name"] for r in await acall(path, "ps")] == ["web-0", "extra-0", "extra-1"]
        # All or nothing: one clash, nothing added.
        msg = await expect_error(path, "invalid", "add", {"path": str(clash)})
        assert "'web' is already in the fleet" in msg
        assert sup.instance("other-0") is None
        assert "absolute path" in await expect_error(path, "invalid", "add", {"path": "x.toml"})
        assert "no such file" in await expect_error(
            path, "invalid", "add", {"path": str(tmp_path / "missing.toml")}
        )

        inst = sup.instance("extra-1")
        assert inst is not None and inst.sandbox is not None
        cgroup_paths = inst.sandbox.cgroup.paths
        assert await acall(path, "rm", {"name": "extra", "timeout": 0}) == ["extra-0", "extra-1"]
        assert [r["name"] for r in await acall(path, "ps")] == ["web-0"]
        assert not any(os.path.exists(p) for p in cgroup_paths)
        assert [c.name for c in sup.fleet.sandboxes] == ["web"]
        await expect_error(path, "invalid", "rm", {"name": "extra"})
        # The name is free again.
        rows = await acall(path, "add", {"path": str(extra)})
        assert [r["state"] for r in rows] == ["running", "running"]

    evs = run(f, dirs, body)
    kinds = [e.kind for e in evs if e.sandbox == "extra-1"]
    assert kinds == [
        "added", "created", "started", "stopping", "exited", "stopped", "removed",
        "added", "created", "started", "stopping", "exited", "stopped",
    ]  # fmt: skip
    added = of(evs, events.Added, "extra-0")[0]
    assert added.source == str(extra)
