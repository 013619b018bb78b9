"""The limits of issue 17 beyond memory, CPU quota and tasks: each enforced
by the cgroup backend of this host where the kernel lets a test measure it
(a cpuset pin, CPU weights, I/O throttles on a loop device, memory.high,
oom_group), written where it does not (swap, I/O weight), and refused in
one line where the layout cannot have it or the value is bad."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import Keeper, Limits, Runtime, SandboxSpec, SpecError
from supervisor._core._fleet import FleetError, parse_fleet
from supervisor._runtime._checkpoint import CheckpointInfo, spec_from_dict, spec_to_dict
from supervisor._runtime._limits import parse_limit
from supervisor._runtime._linux._cgroups import V1Cgroups, V2Cgroups
from supervisor._runtime._mounts import parse_volume
from supervisor._runtime._security import make_security

from .conftest import Dirs, corral, requires_root
from .helpers import run_capture, wait_for

pytestmark = [requires_root, pytest.mark.layout]

M = 1 << 20
HOG = "x=0123456789abcdef; while :; do x=$x$x; done"


def _file(runtime: Runtime, sb_paths: tuple[str, ...], v1: str, v2: str) -> str:
    """A cgroup file of a sandbox, by its v1 or v2 name, read now."""
    name = v2 if runtime.cgroups.layout == "v2" else v1
    for path in sb_paths:
        candidate = os.path.join(path, name)
        if os.path.exists(candidate):
            return Path(candidate).read_text().strip()
    raise AssertionError(f"no {name} in {sb_paths}")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# -- cpuset -------------------------------------------------------------------


def test_a_cpuset_pins_every_process_of_the_sandbox(runtime: Runtime) -> None:
    """With cpuset_cpus naming one CPU, the sandbox's processes may run on
    that CPU only (Cpus_allowed_list, nproc); without, on all of them."""
    cpus = _cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned sandbox from a free one")
    script = "grep Cpus_allowed_list /proc/self/status; nproc"
    pinned = SandboxSpec(
        name="pinned",
        argv=("sh", "-c", script),
        limits=Limits(cpuset_cpus=str(cpus[-1]), cpuset_mems="0"),
    )
    result, out, err = run_capture(runtime, pinned)
    assert result.status == 0, err
    assert out.split() == ["Cpus_allowed_list:", str(cpus[-1]), "1"]
    free = SandboxSpec(name="free", argv=("sh", "-c", script))
    result, out, err = run_capture(runtime, free)
    assert result.status == 0, err
    assert out.split()[-1] == str(len(cpus))


@contextlib.contextmanager
def _parent_with_one_cpu(runtime: Runtime) -> Iterator[str]:
    """A cgroup parent (in every hierarchy corral uses) whose cpuset is the
    first CPU only; removed afterwards."""
    name = f"corral-test-parent-{os.getpid()}"
    cgroups = runtime.cgroups
    if isinstance(cgroups, V2Cgroups):
        control = Path("/sys/fs/cgroup/cgroup.subtree_control")
        if "cpuset" not in control.read_text().split():
            control.write_text("+cpuset")
        roots = ["/sys/fs/cgroup"]
    else:
        assert isinstance(cgroups, V1Cgroups)
        roots = sorted({os.path.realpath(m) for m in cgroups._mounts.values()})
    made: list[str] = []
    try:
        for root in roots:
            made.append(os.path.join(root, name))
            os.mkdir(made[-1])
        for d in made:
            if os.path.exists(os.path.join(d, "cpuset.cpus")):
                if isinstance(cgroups, V1Cgroups):  # v1: nothing joins a cpuset without nodes
                    mems = Path(os.path.dirname(d), "cpuset.mems").read_text()
                    Path(d, "cpuset.mems").write_text(mems)
                Path(d, "cpuset.cpus").write_text(str(_cpus()[0]))
        yield "/" + name
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def test_a_cpuset_beyond_the_parent_cgroup_s_is_refused(
    dirs: Dirs, runtime: Runtime, session_keeper: Keeper
) -> None:
    """Under a parent cgroup that has only the first CPU, a sandbox asking
    for another is refused in one line naming the key; nothing is left."""
    cpus = _cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to restrict a parent to one of them")
    with _parent_with_one_cpu(runtime) as parent:
        narrow = Runtime(
            state_dir=dirs.state,
            run_dir=dirs.run,
            cgroup_parent=parent,
            spawner=session_keeper.spawn,
        )
        spec = SandboxSpec(name="wide", argv=("true",), limits=Limits(cpuset_cpus=str(cpus[-1])))
        with pytest.raises(SpecError) as info:
            narrow.create(spec)
        assert str(info.value) == (
            f"cpuset_cpus: expected CPUs of the parent cgroup ({cpus[0]}), got '{cpus[-1]}'"
        )
        # The parent's own CPU is fine.
        ok = SandboxSpec(name="narrow", argv=("true",), limits=Limits(cpuset_cpus=str(cpus[0])))
        result, _, err = run_capture(narrow, ok)
        assert result.status == 0, err


# -- CPU weight ---------------------------------------------------------------


def test_cpu_weight_shares_a_contended_cpu(runtime: Runtime) -> None:
    """Two busy loops on one CPU, weights 100 and 400: the heavier gets
    clearly more of it (about four times; more than twice is asked)."""
    cpu = str(_cpus()[0])
    loop = "(while :; do :; done) & sleep 2; kill $!"
    stats = {}
    with (
        runtime.create(
            SandboxSpec(
                name="light",
                argv=("sh", "-c", loop),
                limits=Limits(cpu_weight=100, cpuset_cpus=cpu),
            ),
            stdio=(0, 2, 2),
        ) as light,
        runtime.create(
            SandboxSpec(
                name="heavy",
                argv=("sh", "-c", loop),
                limits=Limits(cpu_weight=400, cpuset_cpus=cpu),
            ),
            stdio=(0, 2, 2),
        ) as heavy,
    ):
        assert _file(runtime, heavy.cgroup.paths, "cpu.shares", "cpu.weight") == (
            "4096" if runtime.cgroups.layout == "v1" else "400"
        )
        for sb in (light, heavy):
            result = sb.wait()
            assert result.stats is not None
            stats[sb.name] = result.stats.cpu_usage_ns
    ratio = stats["heavy"] / max(stats["light"], 1)
    assert ratio > 2, f"weight 400 against 100 got {ratio:.2f} times the CPU"


# -- block I/O on a loop device -----------------------------------------------


@pytest.fixture
def loop_device() -> Iterator[str]:
    """A 16 MiB loop device on a file of the test's, detached afterwards."""
    if not os.path.exists("/dev/loop-control"):
        subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    if not os.path.exists("/dev/loop-control"):
        pytest.fail("no loop devices here (modprobe loop failed)")
    with tempfile.NamedTemporaryFile(prefix="corral-io-", dir=os.environ.get("TMPDIR")) as f:
        f.truncate(16 * M)
        f.flush()
        p = subprocess.run(
            ["losetup", "--show", "-f", f.name], check=True, capture_output=True, text=True
        )
        device = p.stdout.strip()
        try:
            yield device
        finally:
            subprocess.run(["losetup", "-d", device], check=False)


def _disk_spec(name: str, device: str, script: str, limits: Limits) -> SandboxSpec:
    """A sandbox that sees *device* at /disk (privileged: a device node
    inside needs it, in either layout)."""
    return SandboxSpec(
        name=name,
        argv=("sh", "-c", script),
        limits=limits,
        mounts=[parse_volume(f"{device}:/disk")],
        security=make_security(privileged=True, no_new_privs=False),
    )


@pytest.mark.parametrize(
    ("key", "script", "amount", "limit"),
    [
        # 2 MiB written at 1 MiB/s, direct (no page cache between).
        ("io_write_bps", "dd if=/dev/zero of=/disk bs=64k count=32 oflag=direct", 2 * M, M),
        ("io_read_bps", "dd if=/disk of=/dev/null bs=64k count=32 iflag=direct", 2 * M, M),
        # 40 writes of 4 KiB at 20 per second.
        ("io_write_iops", "dd if=/dev/zero of=/disk bs=4k count=40 oflag=direct", 40, 20),
        ("io_read_iops", "dd if=/disk of=/dev/null bs=4k count=40 iflag=direct", 40, 20),
    ],
)
def test_an_io_throttle_holds_dd_to_its_rate(
    runtime: Runtime, loop_device: str, key: str, script: str, amount: int, limit: int
) -> None:
    """dd against a throttled loop device moves well under twice the limit
    per second (unthrottled, the same takes a few milliseconds)."""
    limits = Limits(**{key: parse_limit(key, {loop_device: limit})})
    result, _, err = run_capture(runtime, _disk_spec("io", loop_device, script, limits))
    assert result.status == 0, err
    rate = amount / result.duration
    assert rate < 2 * limit, f"{key} {limit}: moved {rate:.0f} per second"


def test_io_limits_and_weight_are_written_per_device(runtime: Runtime, loop_device: str) -> None:
    """Every I/O key lands in the layout's files for that device (v2
    io.max/io.weight, v1 blkio.throttle.*/the BFQ weight)."""
    dev = parse_limit("io_read_bps", [f"{loop_device}:1M"])[0][0]
    limits = Limits(
        io_weight=300,
        io_read_bps=((dev, M),),
        io_write_bps=((dev, 2 * M),),
        io_read_iops=((dev, 100),),
        io_write_iops=((dev, 200),),
    )
    cgroups = runtime.cgroups
    blkio = cgroups._parents.get("blkio") if isinstance(cgroups, V1Cgroups) else None
    weights = ("blkio.weight", "blkio.bfq.weight", "blkio.bfq.io_service_bytes")
    if blkio is not None and not any(os.path.exists(os.path.join(blkio, f)) for f in weights):
        # A v1 kernel without CFQ or BFQ (seen on a host lane): no file
        # takes a weight, which is one clear line; the rest is written.
        with pytest.raises(SpecError) as err:
            runtime.create(SandboxSpec(name="iofiles", argv=("true",), limits=limits))
        assert str(err.value).startswith("io_weight: cgroup v1 has neither blkio.weight (CFQ)")
        limits = limits._replace(io_weight=None)
    spec = SandboxSpec(name="iofiles", argv=("sleep", "1000"), limits=limits)
    with runtime.create(spec, stdio=(0, 2, 2)) as sb:
        paths = sb.cgroup.paths
        if runtime.cgroups.layout == "v2":
            assert f"{dev} rbps={M} wbps={2 * M} riops=100 wiops=200" in _file(
                runtime, paths, "", "io.max"
            )
            assert _file(runtime, paths, "", "io.weight").splitlines()[0] == "default 300"
        else:
            for file, value in (
                ("blkio.throttle.read_bps_device", M),
                ("blkio.throttle.write_bps_device", 2 * M),
                ("blkio.throttle.read_iops_device", 100),
                ("blkio.throttle.write_iops_device", 200),
            ):
                assert _file(runtime, paths, file, "") == f"{dev} {value}"
            if limits.io_weight is not None:
                weight = (
                    "blkio.weight"
                    if any(os.path.exists(os.path.join(p, "blkio.weight")) for p in paths)
                    else "blkio.bfq.weight"
                )
                assert _file(runtime, paths, weight, "").split()[-1] == "300"
        sb.kill()


# -- memory -------------------------------------------------------------------


def test_swap_and_the_soft_limit_are_written(runtime: Runtime) -> None:
    """memory_swap is swap on top of memory (v2 memory.swap.max; v1 the
    memory+swap sum), memory_high is memory.high or v1's soft limit."""
    limits = Limits(memory=64 * M, memory_swap=32 * M, memory_high=48 * M)
    with runtime.create(SandboxSpec(name="swap", argv=("sleep", "1000"), limits=limits)) as sb:
        paths = sb.cgroup.paths
        assert _file(runtime, paths, "memory.soft_limit_in_bytes", "memory.high") == str(48 * M)
        if runtime.cgroups.layout == "v2":
            assert _file(runtime, paths, "", "memory.swap.max") == str(32 * M)
        else:
            assert _file(runtime, paths, "memory.memsw.limit_in_bytes", "") == str(96 * M)
        sb.kill()
    # The default: no swap at all under a memory limit.
    with runtime.create(
        SandboxSpec(name="noswap", argv=("sleep", "1000"), limits=Limits(memory=64 * M))
    ) as sb:
        if runtime.cgroups.layout == "v2":
            assert _file(runtime, sb.cgroup.paths, "", "memory.swap.max") == "0"
        else:
            assert _file(runtime, sb.cgroup.paths, "memory.memsw.limit_in_bytes", "") == str(64 * M)
        sb.kill()


def test_memory_high_throttles_a_hog_without_killing_it(runtime: Runtime) -> None:
    """A hog over memory_high (and no memory limit) is held back by the
    kernel (memory.events high rises) but not OOM-killed (cgroup v2)."""
    if runtime.cgroups.layout != "v2":
        pytest.skip(
            "memory.high is cgroup v2's; v1's soft limit acts only when the host runs short"
        )
    # The memory limit is a net: a hog that memory.high did not hold back
    # would be OOM-killed there, and the test fail, before it took the VM.
    limits = Limits(memory=256 * M, memory_high=16 * M)
    spec = SandboxSpec(name="high", argv=("sh", "-c", HOG), limits=limits)
    with runtime.create(spec, stdio=(0, 2, 2)) as sb:
        events = os.path.join(sb.cgroup.paths[0], "memory.events")

        def high() -> int:
            for line in Path(events).read_text().splitlines():
                if line.startswith("high "):
                    return int(line.split()[1])
            return 0

        wait_for(lambda: high() >= 3, 30, "memory.high to throttle the hog")
        assert sb.poll() is None, "the hog ended under memory.high"
        assert sb.cgroup.stats().oom_kill == 0
        sb.kill()
        sb.wait()


OOM_SCRIPT = "sleep 1000 & (" + HOG + "); echo main-survived; wait"


def test_without_oom_group_the_oom_killer_takes_one_worker(runtime: Runtime) -> None:
    """The control for oom_group: the hog is killed alone and the sandbox's
    main process carries on (both layouts)."""
    spec = SandboxSpec(name="lone", argv=("sh", "-c", OOM_SCRIPT), limits=Limits(memory=32 * M))
    with runtime.create(spec, stdio=(0, 2, 2)) as sb:
        wait_for(lambda: sb.cgroup.stats().oom_kill >= 1, 30, "the hog to be OOM-killed")
        assert sb.poll() is None
        assert len(sb.cgroup.pids()) >= 3  # tini, sh, sleep
        sb.kill()
        sb.wait()


def test_oom_group_kills_every_process_of_the_sandbox(runtime: Runtime) -> None:
    """With oom_group an OOM kill takes the whole sandbox: init and every
    process end, the main process never goes on (cgroup v2)."""
    if runtime.cgroups.layout != "v2":
        pytest.skip("memory.oom.group is cgroup v2's; v1 refuses oom_group (tested there)")
    spec = SandboxSpec(
        name="group", argv=("sh", "-c", OOM_SCRIPT), limits=Limits(memory=32 * M, oom_group=True)
    )
    result, out, _ = run_capture(runtime, spec)
    assert "main-survived" not in out
    assert result.signal == 9 and result.oom_killed
    assert result.stats is not None and result.stats.oom_kill >= 3


def test_oom_group_is_refused_on_cgroup_v1(runtime: Runtime, dirs: Dirs) -> None:
    """cgroup v1 has no group OOM kill: oom_group is refused in one line
    naming the key and why (runtime and corral run), never ignored."""
    if runtime.cgroups.layout != "v1":
        pytest.skip("cgroup v2 enforces oom_group (tested there)")
    spec = SandboxSpec(name="nogroup", argv=("true",), limits=Limits(memory=32 * M, oom_group=True))
    with pytest.raises(SpecError, match=r"^oom_group: cgroup v1 has no memory\.oom\.group"):
        runtime.create(spec)
    p = corral(dirs, "run", "--memory", "32M", "--oom-group", "--", "true")
    assert p.returncode == 125
    (line,) = p.stderr.decode().splitlines()
    assert line.startswith("corral: --oom-group: cgroup v1 has no memory.oom.group:")


# -- bad values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpu-weight", "0"], "--cpu-weight: expected a whole number from 1 to 10000, got '0'"),
        (["--cpu-weight", "lots"], "--cpu-weight: expected a whole number from 1 to 10000"),
        (["--io-weight", "10001"], "--io-weight: expected a whole number from 1 to 10000"),
        (["--cpuset-cpus", "0-4096"], "--cpuset-cpus: expected CPUs of this machine"),
        (["--cpuset-cpus", "3-1"], "--cpuset-cpus: expected a list of CPUs like 0-2,5, got '3-1'"),
        (["--cpuset-mems", "x"], "--cpuset-mems: expected a list of memory nodes like 0-2,5"),
        (["--memory-high", "1x"], "--memory-high: expected a size like 64M or 1G, got '1x'"),
        (
            ["--memory", "64M", "--memory-high", "128M"],
            "--memory-high: expected at most memory (64M), got 128M",
        ),
        (["--memory-swap", "1G"], "--memory-swap: needs memory"),
        (
            ["--memory", "64M", "--memory-swap", "lots"],
            "--memory-swap: expected a size like 1G, 0 (no swap) or unlimited, got 'lots'",
        ),
        (
            ["--io-read-bps", "/dev/null:1M"],
            "--io-read-bps: expected a block device, but /dev/null",
        ),
        (["--io-read-bps", "nodevice"], "--io-read-bps: expected DEVICE:RATE like /dev/sda:10M"),
        (["--io-write-bps", "999:999:1M"], "--io-write-bps: no block device 999:999 on this host"),
        (["--io-read-iops", "/dev/x:1"], "--io-read-iops: /dev/x: No such file or directory"),
    ],
)
def test_bad_limit_options_are_one_line_naming_the_option(
    dirs: Dirs, args: list[str], message: str
) -> None:
    """corral run refuses a bad limit before anything is made: status 125,
    one line naming the option and what was expected."""
    p = corral(dirs, "run", *args, "--", "true")
    assert p.returncode == 125
    (line,) = p.stderr.decode().splitlines()
    assert line.startswith(f"corral: {message}"), line


def test_bad_limit_keys_in_a_fleet_file_are_one_line_each() -> None:
    """A fleet file's bad limits are reported together, one line per key."""
    doc = {
        "sandbox": [
            {
                "name": "w",
                "command": "true",
                "oom_group": 1,
                "io_read_bps": "/dev/sda:1M",
                "cpu_weight": 0,
                "memory_swap": "1G",
            }
        ]
    }
    with pytest.raises(FleetError) as info:
        parse_fleet(doc, "f.toml")
    assert info.value.problems == [
        "sandbox 'w': cpu_weight: expected a whole number from 1 to 10000, got 0",
        "sandbox 'w': io_read_bps: expected a table of device = rate like"
        ' { "/dev/sda" = "10M" }, got \'/dev/sda:1M\'',
        "sandbox 'w': oom_group: expected true or false, got 1",
    ]


def test_checkpoints_keep_the_new_limits_and_old_ones_still_read() -> None:
    """A checkpoint's spec carries every limit; one written before these
    keys existed reads as it did (no swap, default weights)."""
    limits = Limits(
        memory=64 * M, memory_high=32 * M, memory_swap=None, cpu_weight=300, cpuset_cpus="0",
        io_weight=50, io_read_bps=(("7:0", M),), oom_group=True,
    )  # fmt: skip
    spec = SandboxSpec(name="c", argv=("true",), limits=limits)
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec))))
    assert again.limits == limits
    old = spec_to_dict(SandboxSpec(name="c", argv=("true",)))
    old["limits"] = {"memory": 64 * M, "cpus": 0.5, "pids": None}
    assert spec_from_dict(old).limits == Limits(memory=64 * M, cpus=0.5)
    assert spec_to_dict(spec_from_dict(old))["limits"] == old["limits"]


@pytest.mark.criu
def test_a_restored_checkpoint_runs_under_its_spec_s_limits(runtime: Runtime, criu: None) -> None:
    """checkpoint.json carries every limit, and the restore makes the new
    cgroup with them (CRIU's soft mode leaves them as they are)."""
    limits = Limits(
        memory=64 * M, memory_high=48 * M, pids=50, cpu_weight=300, cpuset_cpus=str(_cpus()[0])
    )
    spec = SandboxSpec("ck", ["sh", "-c", "echo up; exec sleep 1000"], limits=limits)
    r, w = os.pipe()
    try:
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            assert os.read(r, 16) == b"up\n"
            info = runtime.checkpoint(sb, tag="t")
            assert sb.wait().signal == 9
        assert CheckpointInfo.load(info.path).spec.limits == limits
        with runtime.restore(info, stdio=(0, w, w)) as restored:
            paths = restored.cgroup.paths
            assert restored.spec.limits == limits
            assert _file(runtime, paths, "memory.soft_limit_in_bytes", "memory.high") == str(48 * M)
            assert _file(runtime, paths, "pids.max", "pids.max") == "50"
            assert _file(runtime, paths, "cpu.shares", "cpu.weight") in ("3072", "300")
            assert _file(runtime, paths, "cpuset.cpus", "cpuset.cpus") == str(_cpus()[0])
            status = Path(f"/proc/{restored.pid}/status").read_text()
            assert f"Cpus_allowed_list:\t{_cpus()[0]}\n" in status
            restored.kill()
            restored.wait()
    finally:
        os.close(r)
        os.close(w)
