"""``corral update`` (and a plugin's ``update``): a running sandbox's limits
changed live in its cgroup, a ``limit_changed`` event per value, kept for
its later generations and across a take-over; refusals in one line."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

import events
from supervisor import Supervisor
from supervisor._control._client import ControlError, result_of
from supervisor._core._plugin_host import PluginHandle
from supervisor._runtime._limits import parse_limit

from .conftest import Dirs, corral, requires_root
from .supervising import fleet, of, request, run, wait_event, wait_log
from .test_more_limits import loop_device  # noqa: F401 (a fixture)
from .test_takeover import TIMEOUT, Up, _keeper_pid, _wait_gone

pytestmark = [requires_root, pytest.mark.layout]

M = 1 << 20


def _cg(sup: Supervisor, name: str, v1: str, v2: str) -> str:
    """A cgroup file of instance *name*'s running generation, read now."""
    inst = sup.instance(name)
    assert inst is not None and inst.sandbox is not None and sup.runtime is not None
    file = v2 if sup.runtime.cgroups.layout == "v2" else v1
    for path in inst.sandbox.cgroup.paths:
        if os.path.exists(os.path.join(path, file)):
            return Path(path, file).read_text().strip()
    raise AssertionError(f"{name} has no {file}")


async def _corral(dirs: Dirs, *args: str) -> tuple[int, list[str], list[str]]:
    """The CLI, in a thread (the supervisor answers it meanwhile): status,
    stdout lines, stderr lines."""
    p = await trio.to_thread.run_sync(lambda: corral(dirs, *args))
    return p.returncode, p.stdout.decode().splitlines(), p.stderr.decode().splitlines()


async def _error(dirs: Dirs, params: dict[str, Any]) -> str:
    with pytest.raises(ControlError) as err:
        result_of(await request(str(dirs.run / "control.sock"), "update", params))
    assert err.value.code == "invalid", err.value
    return str(err.value)


def _changes(evs: list[events.Event], name: str) -> list[tuple[str, str, int | None, int | None]]:
    return [(e.limit, e.device, e.old, e.new) for e in of(evs, events.LimitChanged, name)]


def test_update_changes_a_running_sandbox_s_cgroup(dirs: Dirs) -> None:
    """`corral update` writes memory, CPU quota, tasks, memory.high and the
    CPU weight into the running sandbox's cgroup, says what changed, and
    publishes one limit_changed per value; the plugin handle does the same;
    bad values and keys that cannot change live are one line each."""
    f = fleet({"name": "web", "command": "exec sleep 1000", "memory": "64M", "cpus": 0.5})
    v1 = False

    async def body(sup: Supervisor) -> None:
        nonlocal v1
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert sup.runtime is not None
        v1 = sup.runtime.cgroups.layout == "v1"
        status, out, err = await _corral(
            dirs, "update", "web", "--memory", "128M", "--cpus", "1", "--pids", "100",
            "--memory-high", "96M", "--cpu-weight", "200",
        )  # fmt: skip
        assert status == 0, err
        assert out == [
            "web-0: memory 64.0 MiB -> 128.0 MiB",
            "web-0: cpus 0.5 CPUs -> 1 CPU",
            "web-0: pids 4096 -> 100",
            "web-0: memory_high unlimited -> 96.0 MiB",
            "web-0: cpu_weight 100 -> 200",
        ]
        assert _cg(sup, "web-0", "memory.limit_in_bytes", "memory.max") == str(128 * M)
        assert _cg(sup, "web-0", "memory.soft_limit_in_bytes", "memory.high") == str(96 * M)
        assert _cg(sup, "web-0", "pids.max", "pids.max") == "100"
        if v1:
            assert _cg(sup, "web-0", "cpu.cfs_quota_us", "") == "100000"
            assert _cg(sup, "web-0", "cpu.shares", "") == "2048"
        else:
            assert _cg(sup, "web-0", "", "cpu.max") == "100000 100000"
            assert _cg(sup, "web-0", "", "cpu.weight") == "200"
        # The same again is no change, and no event.
        status, out, err = await _corral(dirs, "update", "web-0", "--memory", "128M")
        assert (status, out) == (0, ["web-0: no change"]), err
        # A plugin's handle: values as a fleet file has them.
        handle = PluginHandle(sup, "test")
        (ev,) = await handle.update("web-0", memory="192M", reason="more room")
        assert (ev.limit, ev.old, ev.new, ev.reason) == ("memory", 128 * M, 192 * M, "more room")
        assert _cg(sup, "web-0", "memory.limit_in_bytes", "memory.max") == str(192 * M)
        info = result_of(await request(str(dirs.run / "control.sock"), "inspect", {"name": "web"}))
        assert info["limits"]["memory"] == 192 * M and info["limits"]["cpu_weight"] == 200
        assert info["limits_changed"] == [
            "cpu_weight", "cpus", "memory", "memory_high", "pids",
        ]  # fmt: skip

        # Refusals: one line each, nothing changed.
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"limits": {"memory": "1x"}}, "memory: expected a size like 64M or 1G, got '1x'"),
            ({"limits": {"cpuset_cpus": "0"}}, "cpuset_cpus: cannot be changed on a running"),
            ({"limits": {"bogus": 1}}, "bogus: not a limit (expected one of: memory, cpus,"),
            ({"limits": {"memory_high": "256M"}}, "memory_high: expected at most memory"),
            ({"limits": {}}, "limits: expected a map of limit keys to values"),
        ]
        for params, message in refusals:
            assert (await _error(dirs, {"name": "web", **params})).startswith(message)
        if v1:
            message = "io_weight: expected at most 1000 on cgroup v1"
            assert (await _error(dirs, {"name": "web", "limits": {"io_weight": 2000}})).startswith(
                message
            )
        status, _, err = await _corral(dirs, "update", "web", "--cpu-weight", "0")
        assert status == 125 and err == [
            "corral: --cpu-weight: expected a whole number from 1 to 10000, got '0'"
        ]
        status, _, err = await _corral(dirs, "update", "web")
        assert status == 125 and len(err) == 1 and "expected a limit to change" in err[0]
        assert _cg(sup, "web-0", "memory.limit_in_bytes", "memory.max") == str(192 * M)

    evs = run(f, dirs, body)
    assert _changes(evs, "web-0") == [
        ("memory", "", 64 * M, 128 * M),
        ("cpus", "", 500, 1000),
        ("pids", "", 4096, 100),
        ("memory_high", "", None, 96 * M),
        ("cpu_weight", "", 100, 200),
        ("memory", "", 128 * M, 192 * M),
    ]


FAT = "x=$(head -c 16777216 /dev/zero | tr '\\0' a); echo ready; sleep 1000; echo ${#x}"


def test_a_memory_limit_below_use_is_refused_unless_forced(dirs: Dirs) -> None:
    """Below what the sandbox uses, a memory limit is refused in one line
    (nothing changes, no event); with --force it is set and the kernel
    OOM-kills what it cannot reclaim (v2), or v1 says it cannot get there."""
    f = fleet({"name": "fat", "command": FAT, "memory": "64M"})

    async def body(sup: Supervisor) -> None:
        await wait_log(dirs, "fat-0", "ready")
        assert sup.runtime is not None
        status, _, err = await _corral(dirs, "update", "fat", "--memory", "8M")
        assert status == 125 and len(err) == 1, err
        assert err[0].startswith("corral: memory: sandbox 'fat-0' uses ")
        assert "more than the 8.0 MiB asked for: --force sets it anyway" in err[0]
        assert _cg(sup, "fat-0", "memory.limit_in_bytes", "memory.max") == str(64 * M)
        status, _, err = await _corral(dirs, "update", "fat", "--memory", "8M", "--force")
        if sup.runtime.cgroups.layout == "v1":
            assert status == 125 and len(err) == 1, err
            assert err[0].startswith("corral: memory: cgroup v1 cannot set a limit below")
            assert _cg(sup, "fat-0", "memory.limit_in_bytes", "") == str(64 * M)
        else:
            assert status == 0, err
            await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.oom_killed)

    evs = run(f, dirs, body)
    changes = _changes(evs, "fat-0")
    assert changes in ([], [("memory", "", 64 * M, 8 * M)])


def test_io_limits_change_per_device(dirs: Dirs, loop_device: str) -> None:  # noqa: F811
    """--io-read-bps DEVICE:RATE sets one device's rate in the running
    sandbox's cgroup; RATE max lifts it again; each is a limit_changed
    naming the device."""
    f = fleet({"name": "disk", "command": "exec sleep 1000"})
    dev = parse_limit("io_read_bps", [f"{loop_device}:1"])[0][0]

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        status, out, err = await _corral(
            dirs, "update", "disk", "--io-read-bps", f"{loop_device}:1M",
            "--io-write-iops", f"{dev}:50",
        )  # fmt: skip
        assert status == 0, err
        assert out == [
            f"disk-0: io_read_bps {dev} unlimited -> 1.0 MiB/s",
            f"disk-0: io_write_iops {dev} unlimited -> 50/s",
        ]
        assert sup.runtime is not None
        if sup.runtime.cgroups.layout == "v1":
            assert _cg(sup, "disk-0", "blkio.throttle.read_bps_device", "") == f"{dev} {M}"
            assert _cg(sup, "disk-0", "blkio.throttle.write_iops_device", "") == f"{dev} 50"
        else:
            line = f"{dev} rbps={M} wbps=max riops=max wiops=50"
            assert line in _cg(sup, "disk-0", "", "io.max").splitlines()
        status, out, err = await _corral(dirs, "update", "disk", "--io-read-bps", f"{dev}:max")
        assert status == 0, err
        assert out == [f"disk-0: io_read_bps {dev} 1.0 MiB/s -> unlimited"]
        if sup.runtime.cgroups.layout == "v1":
            assert _cg(sup, "disk-0", "blkio.throttle.read_bps_device", "") == ""
        else:
            line = f"{dev} rbps=max wbps=max riops=max wiops=50"
            assert line in _cg(sup, "disk-0", "", "io.max").splitlines()

    evs = run(f, dirs, body)
    assert _changes(evs, "disk-0") == [
        ("io_read_bps", dev, None, M),
        ("io_write_iops", dev, None, 50),
        ("io_read_bps", dev, M, None),
    ]


FLEET = """
[supervisor]
grace_period = "2s"

[[sandbox]]
name = "w"
command = "exec sleep 1000"
memory = "{memory}"
"""


def _inspect(dirs: Dirs, name: str) -> dict[str, Any]:
    p = corral(dirs, "inspect", name)
    assert p.returncode == 0, p.stderr
    info: dict[str, Any] = json.loads(p.stdout)
    return info


def _cgroup_file(info: dict[str, Any], *names: str) -> str:
    for path in info["cgroup"]:
        for name in names:
            if os.path.exists(os.path.join(path, name)):
                return Path(path, name).read_text().strip()
    raise AssertionError(f"none of {names} in {info['cgroup']}")


def test_updated_limits_stay_for_restarts_and_across_a_takeover(dirs: Dirs, tmp_path: Path) -> None:
    """A limit changed live holds for the instance's next generation, under
    the supervisor that takes over (its sandbox adopted unchanged) and the
    one after; a fleet file that now says otherwise for a key wins for it."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET.format(memory="64M"))
    first = Up(dirs, fleet_file)
    try:
        first.until(lambda r: r["event"] == "started" and r["sandbox"] == "w-0")
        p = corral(dirs, "update", "w", "--memory", "96M", "--cpu-weight", "300")
        assert p.returncode == 0, p.stderr
        first.until(lambda r: r["event"] == "limit_changed" and r["limit"] == "cpu_weight")
    except BaseException:
        first.abort()
        raise
    keeper = _keeper_pid(dirs)
    second = Up(dirs, fleet_file, "--takeover")
    try:
        _, err = first.proc.communicate(timeout=TIMEOUT)
        assert first.proc.returncode == 0, err
        adopted = second.until(lambda r: r["event"] == "adopted" and r["sandbox"] == "w-0")
        assert adopted["changed"] is False
        p = corral(dirs, "restart", "w-0")
        assert p.returncode == 0, p.stderr
        info = _inspect(dirs, "w-0")
        assert info["generation"] == 1
        assert info["limits"]["memory"] == 96 * M and info["limits"]["cpu_weight"] == 300
        assert _cgroup_file(info, "memory.max", "memory.limit_in_bytes") == str(96 * M)
        assert _cgroup_file(info, "cpu.weight", "cpu.shares") in ("300", "3072")
        second.stop()
    except BaseException:
        second.abort()
        raise
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)
    # The file now says 128M: its word for memory; the CPU weight it never
    # named stays as changed.
    fleet_file.write_text(FLEET.format(memory="128M"))
    third = Up(dirs, fleet_file)
    try:
        third.until(lambda r: r["event"] == "started" and r["sandbox"] == "w-0")
        info = _inspect(dirs, "w-0")
        assert info["limits"]["memory"] == 128 * M and info["limits"]["cpu_weight"] == 300
        assert info["limits_changed"] == ["cpu_weight"]
        keeper = _keeper_pid(dirs)
        third.stop()
    except BaseException:
        third.abort()
        raise
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)


def test_the_fake_handle_updates_like_the_real_one() -> None:
    """plugins.testing's FakeHandle has update too (both are plugins.Handle,
    which mypy checks here): a memory change is applied and published."""
    from plugins import Handle
    from plugins.testing import FakeHandle, FakeInstance

    fake = FakeHandle(instances=[FakeInstance("web-0", memory_limit=64 * M)])
    handle: Handle = fake

    async def main() -> None:
        with fake.subscribe(["limit_changed"]) as sub:
            (ev,) = await handle.update("web-0", memory=128 * M, cpu_weight=200)
            assert await sub.receive() == ev

    trio.run(main)
    assert fake.instances_["web-0"].memory_limit == 128 * M
    assert fake.calls == [("update", "web-0", {"memory": 128 * M, "cpu_weight": 200}, False)]


def _real_handle_is_a_handle(handle: PluginHandle) -> None:
    """Never called: mypy checks that the supervisor's handle is a plugins.Handle."""
    from plugins import Handle

    checked: Handle = handle
    del checked


def test_the_sandbox_s_view_follows_an_update(dirs: Dirs) -> None:
    """Inside, /proc/meminfo, top -bn1 and /proc/cpuinfo (lxcfs's view,
    computed from the cgroup at each read) show the new memory limit and
    CPU quota as soon as `corral update` has said it changed them."""
    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("lxcfs is not installed (make setup installs it): sandboxes have no view")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the CPU count can grow only on a host with two CPUs or more")
    f = fleet({"name": "v", "command": "exec sleep 1000", "memory": "64M", "cpus": 0.5})
    script = "head -1 /proc/meminfo; top -bn1 | head -1; grep -c ^processor /proc/cpuinfo"

    async def view() -> tuple[int, int, int]:
        status, out, err = await _corral(dirs, "exec", "v-0", "--", "sh", "-c", script)
        assert status == 0, err
        total = int(out[0].split()[1])
        # busybox top: "Mem: 2668K used, 62868K free, ..." from /proc/meminfo
        used, free = (int(w.rstrip("K,")) for w in (out[1].split()[1], out[1].split()[3]))
        return total, used + free, int(out[2])

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert await view() == (65536, 65536, 1)
        status, _, err = await _corral(dirs, "update", "v", "--memory", "128M", "--cpus", "2")
        assert status == 0, err
        assert await view() == (131072, 131072, 2)

    run(f, dirs, body)
