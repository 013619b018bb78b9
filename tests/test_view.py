"""A sandbox's own view (issue 17, docs/view.md): lxcfs's /proc files and a
read-only cgroup view at /sys/fs/cgroup.

The view tests take their lxcfs from the session's (``CORRAL_LXCFS``, see
``conftest.session_lxcfs``); the tests of corral's own lxcfs (started,
taken back, killed, replaced, stopped) run it in their own run directory
with ``CORRAL_LXCFS=auto``, and stop what they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor import Runtime, Sandbox, SandboxSpec
from supervisor._core._supervisor import Supervisor as CoreSupervisor
from supervisor._runtime._linux._cgroups import V2Cgroups
from supervisor._runtime._linux._proc import starttime
from supervisor._runtime._lxcfs import view_mounts
from supervisor._runtime._spec import Limits

from .conftest import REPO, Dirs, requires_root
from .helpers import run_capture
from .supervising import fleet, run, wait_event

pytestmark = [requires_root]

LIMITS = Limits(memory=64 << 20, cpus=0.5)
VIEW = (
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
)


@pytest.fixture
def view() -> str:
    """The session's lxcfs mount point (skips without lxcfs)."""
    where = os.environ.get("CORRAL_LXCFS", "off")
    if where == "off":
        pytest.skip("lxcfs is not installed (make setup installs it): sandboxes have no view")
    return where


@pytest.fixture
def own(dirs: Dirs, session_keeper: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A runtime with corral's own lxcfs in the test's run directory; the
    lxcfs it started (if any) is stopped afterwards."""
    from supervisor import Keeper

    assert isinstance(session_keeper, Keeper)
    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("lxcfs is not installed (make setup installs it)")
    monkeypatch.setenv("CORRAL_LXCFS", "auto")
    rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=session_keeper.spawn)
    try:
        yield rt
    finally:
        assert rt.lxcfs.stop(force=True)


@pytest.fixture
def stops_lxcfs(dirs: Dirs) -> Iterator[None]:
    """Whatever happens in the test, no lxcfs of its run directory (one a
    `corral up` or `corral run` it ran started) is left running after it."""
    yield
    from supervisor._runtime._lxcfs import Lxcfs

    Lxcfs(str(dirs.run), "auto", say=lambda line: None).stop(force=True)


def _host_mem_total() -> str:
    return Path("/proc/meminfo").read_text().splitlines()[0]


def _exec(runtime: Runtime, sb: Sandbox, script: str) -> tuple[int, str]:
    """Run *script* in the running sandbox; its status and output (both streams)."""
    with tempfile.TemporaryFile() as out:
        with runtime.exec(sb, ["sh", "-c", script], stdio=(0, out.fileno(), out.fileno())) as p:
            status = p.wait()
        out.seek(0)
        return status, out.read().decode()


@contextlib.contextmanager
def _running(runtime: Runtime, spec: SandboxSpec) -> Iterator[Sandbox]:
    """A sandbox running *spec* (its command sleeps), destroyed after the block."""
    with (
        open("/dev/null", "rb") as null,
        runtime.create(spec, stdio=(null.fileno(), 2, 2), stdin_devnull=True) as sb,
    ):
        yield sb


def _sleeper(name: str, **kw: object) -> SandboxSpec:
    return SandboxSpec(name, ["sh", "-c", "while :; do sleep 1; done"], **kw)  # type: ignore[arg-type]


def _kill_recorded_lxcfs(run_dir: Path) -> int:
    """SIGKILL the lxcfs corral recorded in *run_dir*, by its PID once its
    start time says it is that one; its PID. Reaped here if it is ours (its
    starter died and this process, a subreaper, inherited it)."""
    record = json.loads((run_dir / "lxcfs" / "instance.json").read_text())
    pid = int(record["pid"])
    pidfd = os.pidfd_open(pid)
    try:
        assert starttime(pid) == record["starttime"]
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select_readable(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    finally:
        os.close(pidfd)
    return pid


def select_readable(fd: int, timeout: float = 10.0) -> None:
    import select

    assert select.select([fd], [], [], timeout)[0], "lxcfs did not end"


# -- the view ------------------------------------------------------------------


@pytest.mark.layout
@pytest.mark.parametrize("userns", [False, True], ids=["default", "userns"])
def test_proc_shows_the_sandboxs_memory_cpus_and_uptime(
    runtime: Runtime, view: str, userns: bool
) -> None:
    """With memory 64M and cpus 0.5, /proc/meminfo says 64 MiB, cpuinfo one
    CPU (stat too, on v1), cpu/online CPU 0, uptime the sandbox's own; nproc
    counts the CPUs of its affinity (the host's: a quota is time, not
    CPUs). The files are lxcfs's, mounted read-only."""
    from supervisor._runtime._security import make_security

    script = (
        "head -1 /proc/meminfo; grep -c ^processor /proc/cpuinfo; grep -c ^cpu /proc/stat;"
        " cat /sys/devices/system/cpu/online; cut -d' ' -f1 /proc/uptime; nproc;"
        " wc -w < /proc/loadavg; head -1 /proc/swaps | cut -c1-8;"
        " grep -c . /proc/diskstats > /dev/null && echo diskstats;"
        " echo x 2>/dev/null > /proc/meminfo || echo read-only"
    )
    spec = SandboxSpec(
        "view", ["sh", "-c", script], limits=LIMITS, security=make_security(userns=userns)
    )
    started = time.monotonic()
    result, out, err = run_capture(runtime, spec)
    elapsed = time.monotonic() - started
    assert result.status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MemTotal:", "65536", "kB"], out
    # /proc/stat: "cpu" and a line per CPU. lxcfs 5.0 counts the quota's
    # CPUs there from cpuacct.usage_all, which only cgroup v1 has; on v2 it
    # lists the CPUs of the sandbox's cpuset (docs/view.md).
    cpus = 1 if not isinstance(runtime.cgroups, V2Cgroups) else len(os.sched_getaffinity(0))
    assert lines[1:4] == ["1", str(1 + cpus), "0"], out
    assert float(lines[4]) <= elapsed + 0.5, (lines[4], elapsed)
    assert int(lines[5]) == len(os.sched_getaffinity(0)), out
    assert lines[6:] == ["5", "Filename", "diskstats", "read-only"], out


@pytest.mark.layout
def test_the_view_is_mounted_from_lxcfs_read_only(runtime: Runtime, view: str) -> None:
    """Each of the eight files is an lxcfs mount in the sandbox, read-only,
    nosuid, nodev and noexec."""
    with _running(runtime, _sleeper("mnt", limits=LIMITS)) as sb:
        mounts = view_mounts(sb.pid)
        assert sorted(mounts) == sorted("/" + f for f in VIEW)
        lines = Path(f"/proc/{sb.pid}/mountinfo").read_text().splitlines()
        for line in lines:
            if " - fuse.lxcfs " in line:
                flags = set(line.split()[5].split(","))
                assert {"ro", "nosuid", "nodev", "noexec"} <= flags, line


@pytest.mark.layout
def test_lxcfs_false_shows_the_hosts_files(runtime: Runtime, view: str) -> None:
    """`lxcfs = false`: no lxcfs mount; /proc/meminfo is the kernel's."""
    spec = SandboxSpec(
        "noview",
        ["sh", "-c", "head -1 /proc/meminfo; grep -c fuse.lxcfs /proc/self/mountinfo"],
        limits=LIMITS,
        lxcfs=False,
    )
    _, out, err = run_capture(runtime, spec)
    assert out.splitlines() == [_host_mem_total(), "0"], (out, err)


def test_corral_run_no_lxcfs_and_the_fleet_key(dirs: Dirs, view: str) -> None:
    """`corral run --no-lxcfs` and `lxcfs = false` in a fleet file turn the
    view off; anything but a boolean there is one line naming the key."""
    from supervisor import FleetError, parse_fleet

    done = _corral(
        dirs, "run", "--no-lxcfs", "--memory", "64M", "--", "head", "-1", "/proc/meminfo"
    )
    assert done.returncode == 0 and done.stdout.strip() == _host_mem_total(), done
    f = parse_fleet({"defaults": {"lxcfs": False}, "sandbox": [{"name": "a", "command": "true"}]})
    assert f.sandboxes[0].spec(0).lxcfs is False
    f = parse_fleet({"sandbox": [{"name": "a", "command": "true"}]})
    assert f.sandboxes[0].spec(0).lxcfs is True
    with pytest.raises(FleetError) as err:
        parse_fleet({"sandbox": [{"name": "a", "command": "true", "lxcfs": "no"}]})
    assert str(err.value) == "<fleet>: sandbox 'a': lxcfs: expected true or false, got 'no'"


# -- the cgroup view -------------------------------------------------------------


@pytest.mark.layout
def test_a_program_reads_its_own_limits_in_sys_fs_cgroup(runtime: Runtime) -> None:
    """/sys/fs/cgroup is the sandbox's own cgroup: memory, CPU quota and
    pids limit as it was given them (v2 files at its root; v1 one
    directory per controller)."""
    if isinstance(runtime.cgroups, V2Cgroups):
        files = "memory.max cpu.max pids.max"
        expected = ["67108864", "50000 100000", "100"]
    else:
        files = "memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us pids/pids.max"
        expected = ["67108864", "50000", "100"]
    spec = SandboxSpec(
        "cg",
        ["sh", "-c", f"cd /sys/fs/cgroup && cat {files}"],
        limits=Limits(memory=64 << 20, cpus=0.5, pids=100),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert out.splitlines() == expected


@pytest.mark.layout
@pytest.mark.parametrize("userns", [False, True], ids=["default", "userns"])
def test_nothing_can_be_written_or_made_in_sys_fs_cgroup(runtime: Runtime, userns: bool) -> None:
    """Raising a limit, joining or making a cgroup, or making a file in the
    view: each refused (a read-only file system), and the limits stay."""
    from supervisor._runtime._security import make_security

    v2 = isinstance(runtime.cgroups, V2Cgroups)
    memory = "memory.max" if v2 else "memory/memory.limit_in_bytes"
    pids = "pids.max" if v2 else "pids/pids.max"
    procs = "cgroup.procs" if v2 else "memory/cgroup.procs"
    attempts = [
        f"echo max > {memory}",
        f"echo 100000 > {pids}",
        f"echo 1 > {procs}",
        "mkdir child",
        "mkdir memory/child" if not v2 else "mkdir sub",
        "touch file",
    ]
    script = "cd /sys/fs/cgroup; " + "; ".join(
        f"{{ {a}; }} 2>/dev/null && echo 'allowed: {a}' || echo refused" for a in attempts
    )
    script += f"; cat {memory} {pids}"
    spec = SandboxSpec(
        "cgw",
        ["sh", "-c", script],
        limits=Limits(memory=64 << 20, pids=100),
        security=make_security(userns=userns),
    )
    _, out, err = run_capture(runtime, spec)
    assert out.splitlines() == ["refused"] * len(attempts) + ["67108864", "100"], (out, err)
    with _running(runtime, _sleeper("cgw2")) as sb:
        status, text = _exec(runtime, sb, f"echo max > /sys/fs/cgroup/{memory}")
        assert status != 0 and "Read-only file system" in text, text


# -- corral's own lxcfs ----------------------------------------------------------


def test_corral_starts_its_lxcfs_once_and_the_next_runtime_takes_it_back(
    own: Runtime, dirs: Dirs, session_keeper: object
) -> None:
    """The first sandbox starts lxcfs (recorded by PID and start time); a
    second runtime on the run directory (a new supervisor, a `corral run`)
    uses the same one; it is not stopped while a sandbox has its view."""
    from supervisor import Keeper

    assert isinstance(session_keeper, Keeper)
    with _running(own, _sleeper("a", limits=LIMITS)) as a:
        record = json.loads((dirs.run / "lxcfs" / "instance.json").read_text())
        assert record["pid"] == own.lxcfs.pid and starttime(own.lxcfs.pid) == record["starttime"]
        assert "--enable-cfs" in record["argv"]
        other = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=session_keeper.spawn)
        with _running(other, _sleeper("b", limits=LIMITS)) as b:
            assert other.lxcfs.pid == own.lxcfs.pid
            assert _exec(other, b, "head -1 /proc/meminfo")[1].split()[1] == "65536"
        assert not own.lxcfs.stop(), "stopped while sandbox 'a' has its view"
        assert _exec(own, a, "head -1 /proc/meminfo")[1].split()[1] == "65536"
    assert own.lxcfs.stop()
    assert not (dirs.run / "lxcfs" / "instance.json").exists()
    assert f"{dirs.run}/lxcfs/mnt" not in Path("/proc/self/mountinfo").read_text()


def test_lxcfs_holds_no_descriptor_its_starter_inherited(own: Runtime) -> None:
    """An lxcfs outlives the process that started it: a descriptor that
    process inherited without close-on-exec (a `flock LOCK corral ...`
    lock, once seen holding a lock for ever) is not passed on to it."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        with _running(own, _sleeper("a", limits=LIMITS)):
            target = os.readlink(f"/proc/self/fd/{w}")
            held = [os.readlink(f"/proc/{own.lxcfs.pid}/fd/{fd}")
                    for fd in os.listdir(f"/proc/{own.lxcfs.pid}/fd")]  # fmt: skip
            assert target not in held
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.layout
def test_a_killed_lxcfs_is_replaced_and_the_running_sandboxes_views_recover(
    own: Runtime, dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lxcfs SIGKILLed under two running sandboxes (one in a user
    namespace): their view answers ENOTCONN ("Transport endpoint is not
    connected") until a new lxcfs is started (what the supervisor's watch
    does: recover); then their mounts are the new lxcfs's, with their own
    numbers again (re-attached one helper run each, here). A sandbox
    without the view is left alone."""
    from supervisor._runtime import _lxcfs

    monkeypatch.setattr(_lxcfs, "REATTACH_BATCH", 1)
    from supervisor._runtime._security import make_security

    with (
        _running(own, _sleeper("k1", limits=LIMITS)) as k1,
        _running(
            own, _sleeper("k2", limits=Limits(memory=32 << 20), security=make_security(userns=True))
        ) as k2,
        _running(own, _sleeper("k3", lxcfs=False)) as k3,
    ):
        old = _kill_recorded_lxcfs(dirs.run)
        status, text = _exec(own, k1, "head -1 /proc/meminfo")
        assert status != 0 and "Transport endpoint is not connected" in text, text
        assert own.lxcfs.recover()
        assert own.lxcfs.pid not in (0, old)
        live = os.stat(f"{dirs.run}/lxcfs/mnt").st_dev
        for sb, kib in ((k1, "65536"), (k2, "32768")):
            assert set(view_mounts(sb.pid).values()) == {f"{os.major(live)}:{os.minor(live)}"}
            status, text = _exec(own, sb, "head -1 /proc/meminfo; grep -c ^processor /proc/cpuinfo")
            assert status == 0 and text.split()[1] == kib, text
        assert view_mounts(k3.pid) == {}
        assert _exec(own, k3, "head -1 /proc/meminfo")[1].strip() == _host_mem_total()


def test_a_reattach_helper_that_cannot_start_is_run_again(
    own: Runtime, dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-attach helper failing before it reaches any sandbox (here its
    interpreter says it cannot find the module, once) is run a second time."""
    wrapper = tmp_path / "python"
    runs = tmp_path / "runs"
    wrapper.write_text(
        f"#!/bin/sh\necho run >> {runs}\n"
        f'if [ $(wc -l < {runs}) = 1 ]; then echo "$0: No module named x" >&2; exit 1; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    with _running(own, _sleeper("h", limits=LIMITS)) as sb:
        _kill_recorded_lxcfs(dirs.run)
        with monkeypatch.context() as patch:
            patch.setattr(sys, "executable", str(wrapper))
            assert own.lxcfs.recover()
        assert runs.read_text() == "run\nrun\n"
        status, text = _exec(own, sb, "head -1 /proc/meminfo")
        assert status == 0 and text.split()[1] == "65536", text


def test_the_supervisor_restarts_a_killed_lxcfs(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch, stops_lxcfs: None
) -> None:
    """Under a supervisor, a killed lxcfs is restarted at once (its watch
    wakes on the pidfd) and the running sandbox's view re-attached; the
    supervisor stops its lxcfs with the fleet."""
    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("lxcfs is not installed (make setup installs it)")
    monkeypatch.setenv("CORRAL_LXCFS", "auto")
    meminfo: list[tuple[int, str]] = []
    new: list[int] = []

    async def body(sup: CoreSupervisor) -> None:
        await wait_event(sup, lambda e: e.kind == "started")
        assert sup.runtime is not None
        lxcfs = sup.runtime.lxcfs
        old = await trio.to_thread.run_sync(_kill_recorded_lxcfs, dirs.run)
        with trio.fail_after(30):
            while lxcfs.pid in (0, old) or not lxcfs._known_alive():
                await trio.sleep(0.01)
        sb = sup.instances[0].sandbox
        assert sb is not None
        live = os.stat(f"{dirs.run}/lxcfs/mnt").st_dev
        want = f"{os.major(live)}:{os.minor(live)}"
        with trio.fail_after(30):
            while set(view_mounts(sb.pid).values()) != {want}:
                await trio.sleep(0.01)
        assert sup.runtime is not None
        meminfo.append(
            await trio.to_thread.run_sync(_exec, sup.runtime, sb, "head -1 /proc/meminfo")
        )
        new.append(lxcfs.pid)

    f = fleet({"name": "w", "command": "while :; do sleep 1; done", "memory": "64M"})
    run(f, dirs, body)
    [(status, text)] = meminfo
    assert status == 0 and text.split()[1] == "65536", text
    assert not (dirs.run / "lxcfs" / "instance.json").exists()
    assert f"{dirs.run}/lxcfs/mnt" not in Path("/proc/self/mountinfo").read_text()
    with contextlib.suppress(ProcessLookupError):
        os.kill(new[0], 0)
        pytest.fail("the supervisor left its lxcfs running")


@pytest.mark.layout
def test_lxcfs_outlives_a_killed_supervisor_and_the_next_one_watches_it(
    dirs: Dirs, tmp_path: Path, stops_lxcfs: None
) -> None:
    """SIGKILL `corral up`: its lxcfs runs on with its sandbox; the next
    `corral up` takes both back, and, without starting any sandbox, still
    restarts that lxcfs when it is killed (its watch took it over); a
    clean stop of the fleet stops it."""
    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("lxcfs is not installed (make setup installs it)")
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[sandbox]]\nname = "w"\nmemory = "64M"\ncommand = "sleep 1000"\n')
    env = {**dirs.env, "CORRAL_LXCFS": "auto"}
    record = dirs.run / "lxcfs" / "instance.json"

    def up() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor", "up", str(fleet_file)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def until(proc: subprocess.Popen[str], event: str) -> dict[str, object]:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            assert line, f"corral up ended before {event}: {proc.communicate()[1]}"
            rec: dict[str, object] = json.loads(line)
            if rec.get("event") == event and rec.get("sandbox") == "w-0":
                return rec

    first = up()
    try:
        init = int(until(first, "started")["pid"])  # type: ignore[call-overload]
        lxcfs = json.loads(record.read_text())
    finally:
        first.kill()
        first.communicate()
    keeper = int((dirs.run / "keeper.lock").read_text().split()[0])
    assert starttime(lxcfs["pid"]) == lxcfs["starttime"], "lxcfs died with the supervisor"
    second = up()
    try:
        assert int(until(second, "adopted")["pid"]) == init  # type: ignore[call-overload]
        with open(f"/proc/{init}/mountinfo") as f:
            assert "fuse.lxcfs" in f.read()
        # The watch took it over: killed, it is replaced and the view mended.
        old = _kill_recorded_lxcfs(dirs.run)
        assert old == lxcfs["pid"]
        deadline = time.monotonic() + 60
        while True:
            try:
                new = json.loads(record.read_text())["pid"]
                live = os.stat(dirs.run / "lxcfs" / "mnt").st_dev
                if new != old and set(view_mounts(init).values()) == {
                    f"{os.major(live)}:{os.minor(live)}"
                }:
                    break
            except (OSError, ValueError, KeyError):
                pass  # between the old one's clean-up and the new one's record
            assert time.monotonic() < deadline, "the next supervisor did not restart lxcfs"
            time.sleep(0.01)
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    assert not record.exists(), "the supervisor left its lxcfs running"
    assert f"{dirs.run}/lxcfs/mnt" not in Path("/proc/self/mountinfo").read_text()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)  # the first supervisor's keeper, re-parented to us


def _corral(dirs: Dirs, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env={**dirs.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_corral_run_leaves_its_lxcfs_running_for_the_next(
    dirs: Dirs, view: str, stops_lxcfs: None
) -> None:
    """`corral run` starts lxcfs and leaves it running when it ends (as a
    supervisor killed would); the next `corral run` uses the same one."""
    from supervisor._runtime._lxcfs import Lxcfs

    pids = []
    for _ in range(2):
        done = _corral(
            dirs, "run", "--memory", "64M", "--", "head", "-1", "/proc/meminfo",
            CORRAL_LXCFS="auto",
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.split()[1] == "65536", done
        assert done.stderr == ""
        record = json.loads((dirs.run / "lxcfs" / "instance.json").read_text())
        pids.append(record["pid"])
        assert starttime(record["pid"]) == record["starttime"]
    assert pids[0] == pids[1]
    assert Lxcfs(str(dirs.run), "auto").stop()


def test_without_lxcfs_corral_says_so_once_and_runs(dirs: Dirs) -> None:
    """No lxcfs program: `corral run` says so in one line, and the sandbox
    runs, with the host's /proc/meminfo (and still its cgroup view)."""
    done = _corral(
        dirs, "run", "--memory", "64M", "--", "sh", "-c",
        "head -1 /proc/meminfo; ls /sys/fs/cgroup | grep -c .",
        CORRAL_LXCFS="auto", CORRAL_LXCFS_BINARY="/nonexistent/lxcfs",
    )  # fmt: skip
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == _host_mem_total() and int(lines[1]) > 0, done.stdout
    assert done.stderr.splitlines() == [
        "corral: lxcfs is not installed (/nonexistent/lxcfs): sandboxes see the host's"
        " /proc/meminfo, cpuinfo, uptime... (docs/view.md)"
    ]
    assert f"{dirs.run}/lxcfs/mnt" not in Path("/proc/self/mountinfo").read_text()


def test_a_runtime_without_lxcfs_says_it_once_for_many_sandboxes(
    dirs: Dirs, session_keeper: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor (one runtime) says it once, not at every start."""
    from supervisor import Keeper

    assert isinstance(session_keeper, Keeper)
    said: list[str] = []
    monkeypatch.setenv("CORRAL_LXCFS_BINARY", "/nonexistent/lxcfs")
    rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=session_keeper.spawn, lxcfs="auto")
    rt.lxcfs._say = said.append
    for n in range(3):
        result, out, _ = run_capture(rt, SandboxSpec(f"n{n}", ["head", "-1", "/proc/meminfo"]))
        assert result.status == 0 and out.strip() == _host_mem_total()
    assert len(said) == 1 and "lxcfs is not installed" in said[0], said


def test_an_lxcfs_that_fails_at_its_start_is_one_line(
    dirs: Dirs, session_keeper: object, tmp_path: Path
) -> None:
    """An lxcfs that ends at once (here a program that says why and exits)
    is one line quoting its last words; the sandbox runs without the view."""
    from supervisor import Keeper

    assert isinstance(session_keeper, Keeper)
    fake = tmp_path / "lxcfs"
    fake.write_text("#!/bin/sh\necho 'fuse: device not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    said: list[str] = []
    rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=session_keeper.spawn, lxcfs="auto")
    rt.lxcfs.binary = str(fake)
    rt.lxcfs._say = said.append
    result, out, _ = run_capture(rt, SandboxSpec("f", ["head", "-1", "/proc/meminfo"]))
    assert result.status == 0 and out.strip() == _host_mem_total()
    assert said == [
        "corral: lxcfs ended at its start: fuse: device not found: sandboxes see the host's"
        " /proc/meminfo, cpuinfo, uptime... (docs/view.md)"
    ]
    assert rt.lxcfs.pid == 0


# -- checkpoints ---------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.layout
def test_checkpoint_and_restore_keep_the_view(own: Runtime, criu: None, dirs: Dirs) -> None:
    """CRIU takes the lxcfs mounts as external and the cgroup view as the
    sandbox's own: the restored sandbox reads its 64 MiB and one CPU from
    a new lxcfs (the one it was dumped with was stopped meanwhile) and its
    limits in /sys/fs/cgroup, still read-only. Restored with `lxcfs =
    false`, it gets the kernel's files there instead."""
    v2 = isinstance(own.cgroups, V2Cgroups)
    memory = "memory.max" if v2 else "memory/memory.limit_in_bytes"
    r, w = os.pipe()
    try:
        spec = SandboxSpec("ck", ["sh", "-c", "echo go; while :; do sleep 1; done"], limits=LIMITS)
        with own.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 16) == b"go\n"
            info = own.checkpoint(sb, tag="v")
            assert sb.wait().signal == signal.SIGKILL
        first = json.loads((dirs.run / "lxcfs" / "instance.json").read_text())["pid"]
        assert own.lxcfs.stop()
        with own.restore(info, stdio=(0, 2, 2)) as back:
            assert own.lxcfs.pid not in (0, first)
            status, text = _exec(
                own,
                back,
                "head -1 /proc/meminfo; grep -c ^processor /proc/cpuinfo;"
                f" cat /sys/fs/cgroup/{memory}; echo 1 2>/dev/null > /sys/fs/cgroup/{memory}"
                " || echo read-only",
            )
            assert status == 0, text
            lines = text.splitlines()
            assert lines[0].split()[1] == "65536" and lines[1:] == ["1", "67108864", "read-only"]
            assert len(view_mounts(back.pid)) == len(VIEW)
            back.kill()
        # The same checkpoint without the view: the kernel's files in its place.
        with own.restore(info, info.spec._replace(name="ck2", lxcfs=False), stdio=(0, 2, 2)) as b:
            assert view_mounts(b.pid) == {}
            status, text = _exec(own, b, "head -1 /proc/meminfo")
            assert status == 0 and text.strip() == _host_mem_total(), text
            b.kill()
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


@pytest.mark.criu
@pytest.mark.layout
def test_a_sandbox_without_the_view_is_restored_without_it(
    runtime: Runtime, criu: None, view: str
) -> None:
    """`lxcfs = false`: nothing of lxcfs is dumped, and the restore (which
    names the view's files to CRIU whatever the checkpoint holds) leaves it
    with the kernel's /proc/meminfo."""
    r, w = os.pipe()
    try:
        spec = SandboxSpec(
            "nv", ["sh", "-c", "echo go; while :; do sleep 1; done"], limits=LIMITS, lxcfs=False
        )
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 16) == b"go\n"
            info = runtime.checkpoint(sb, tag="nv")
            assert sb.wait().signal == signal.SIGKILL
        with runtime.restore(info, stdio=(0, 2, 2)) as back:
            assert view_mounts(back.pid) == {}
            status, text = _exec(runtime, back, "head -1 /proc/meminfo")
            assert status == 0 and text.strip() == _host_mem_total(), text
            back.kill()
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


def test_a_fresh_run_directory_lets_user_namespace_sandboxes_reach_the_view(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`corral up` makes the run directory it is given when it is missing:
    0711, so a default sandbox's root (in a user namespace, an unprivileged
    host user) can bind the view from corral's lxcfs in it. (Made 0700, it
    failed every sandbox: "lxcfs: cannot bind-mount ...: Permission denied".)"""
    from supervisor._runtime._lxcfs import Lxcfs

    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("lxcfs is not installed (make setup installs it)")
    run = dirs.run / "fresh"
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[sandbox]]\nname = "w"\nmemory = "64M"\ncommand = "sleep 1000"\n')
    env = {**dirs.env, "CORRAL_LXCFS": "auto", "CORRAL_RUN_DIR": str(run)}
    up = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "up", str(fleet_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        while True:
            line = up.stdout.readline()
            assert line, f"corral up ended: {up.communicate()[1]}"
            rec = json.loads(line)
            if rec.get("sandbox") == "w-0" and rec.get("event") in ("started", "start_failed"):
                break
        assert rec["event"] == "started", rec
        with open(f"/proc/{rec['pid']}/mountinfo") as f:
            assert "fuse.lxcfs" in f.read()
        assert run.stat().st_mode & 0o777 == 0o711
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
        Lxcfs(str(run), "auto", say=lambda line: None).stop(force=True)
    assert up.returncode == 0, err
