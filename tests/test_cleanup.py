"""Nothing is left behind: cgroups, mounts, layers, records, processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from supervisor import CommandNotFoundError, Limits, Runtime, SandboxError, SandboxSpec

from .conftest import Dirs, requires_root

pytestmark = [requires_root, pytest.mark.layout]


def test_hundred_sandboxes_leave_nothing(runtime: Runtime, dirs: Dirs) -> None:
    """After 100 sandboxes (ok, failing, not found, killed, OOM) nothing is left.

    The ``dirs`` fixture then checks cgroups, layers, records and mounts; the
    autouse fixture checks for unreaped children.
    """
    outcomes: dict[str, int] = {}
    for i in range(100):
        kind = ("ok", "fail", "notfound", "killed", "oom")[i % 5]
        argv = {
            "ok": ("true",),
            "fail": ("sh", "-c", "exit 3"),
            "notfound": ("no-such-command",),
            "killed": ("sleep", "60"),
            "oom": ("sh", "-c", "x=a; while :; do x=$x$x; done"),
        }[kind]
        limits = Limits(memory=16 << 20, pids=32, cpus=1)
        spec = SandboxSpec(name=f"c{i}", argv=argv, limits=limits)
        try:
            sb = runtime.create(spec, stdio=(0, 2, 2))
        except CommandNotFoundError:
            outcomes[kind] = outcomes.get(kind, 0) + 1
            continue
        with sb:
            if kind == "killed":
                sb.send_signal(signal.SIGKILL)
            status = sb.wait().status
        assert status == {"ok": 0, "fail": 3, "killed": 137, "oom": 137}[kind], kind
        outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes == {"ok": 20, "fail": 20, "notfound": 20, "killed": 20, "oom": 20}
    assert os.listdir(dirs.state / "sandboxes") == []


def test_failed_setup_leaves_nothing(runtime: Runtime, dirs: Dirs, tmp_path: Path) -> None:
    """A rootfs without a shell or a bad workdir fails cleanly, nothing half-made."""
    empty = tmp_path / "emptyroot"
    empty.mkdir()
    with pytest.raises(CommandNotFoundError):
        runtime.create(SandboxSpec(name="empty", argv=("sh",), rootfs=str(empty)))
    with pytest.raises(SandboxError, match="workdir '/nope' is not a directory"):
        runtime.create(SandboxSpec(name="wd", argv=("true",), workdir="/nope"))


def test_rootfs_with_symlinked_proc_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    """A rootfs whose /proc is a symlink (pointing at the host) is refused."""
    root = tmp_path / "evil"
    root.mkdir()
    (root / "proc").symlink_to("/tmp")
    with pytest.raises(SandboxError, match="/proc in the rootfs is not a directory"):
        runtime.create(SandboxSpec(name="evil", argv=("true",), rootfs=str(root)))


def test_destroy_kills_a_running_sandbox(runtime: Runtime) -> None:
    """destroy() on a running sandbox kills every process and removes the cgroup."""
    spec = SandboxSpec(name="busy", argv=("sh", "-c", "sleep 100 & sleep 100 & wait"))
    sb = runtime.create(spec, stdio=(0, 2, 2))
    paths = sb.cgroup.paths
    sb.destroy()
    assert sb.exit is not None and sb.exit.signal == signal.SIGKILL
    assert not any(os.path.exists(p) for p in paths)


def test_leftovers_of_a_crash_are_taken_over(runtime: Runtime, dirs: Dirs) -> None:
    """Directories, record and an empty cgroup left by a killed corral do not block the name."""
    spec = SandboxSpec(name="phoenix", argv=("true",))
    sb = runtime.create(spec, stdio=(0, 2, 2))
    sb.wait()
    # What a SIGKILLed `corral run` leaves: everything but the processes.
    sb._destroyed = True
    os.close(sb.pidfd)
    with runtime.create(spec, stdio=(0, 2, 2)) as again:
        assert again.wait().status == 0


def test_a_live_sandbox_name_is_not_taken_over(runtime: Runtime) -> None:
    """A name whose sandbox is running stays refused."""
    spec = SandboxSpec(name="alive", argv=("sleep", "30"))
    with runtime.create(spec, stdio=(0, 2, 2)), pytest.raises(SandboxError, match="is in use"):
        runtime.create(SandboxSpec(name="alive", argv=("true",)))


def _age(path: str, seconds: float) -> None:
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_one_rule_says_when_a_leftover_without_record_is_stale(tmp_path: Path) -> None:
    """Unrecorded and older than STALE_AFTER is a crash's leftover; younger, or recorded, is not."""
    from supervisor._runtime._records import STALE_AFTER, abandoned, record_path

    made = tmp_path / "made"
    made.mkdir()
    record = record_path(str(tmp_path), "x")
    assert record == str(tmp_path / "sandboxes" / "x.json")
    assert not abandoned(str(made), record)  # just made: being created
    _age(str(made), STALE_AFTER + 5)
    assert abandoned(str(made), record)
    os.makedirs(os.path.dirname(record))
    Path(record).write_text("{}")
    assert not abandoned(str(made), record)  # recorded: it is someone's
    assert abandoned(str(tmp_path / "gone"), record)


def test_a_crashed_creations_directories_are_reused_only_once_stale(runtime: Runtime) -> None:
    """A sandbox directory without a record blocks its name until it is STALE_AFTER old."""
    from supervisor._runtime._records import STALE_AFTER

    sdir = os.path.join(runtime.state_dir, "sandboxes", "crashed")
    os.mkdir(sdir, 0o700)  # what a `corral run` killed mid-creation leaves
    spec = SandboxSpec(name="crashed", argv=("true",))
    with pytest.raises(SandboxError, match="is in use"):
        runtime.create(spec, stdio=(0, 2, 2))
    _age(sdir, STALE_AFTER + 5)
    with runtime.create(spec, stdio=(0, 2, 2)) as sb:
        assert sb.wait().status == 0
    assert not os.path.exists(sdir)


def test_a_leftover_is_not_taken_for_live_by_a_longer_names_cgroup(runtime: Runtime) -> None:
    """A record pointing at the init of 'w-0.10' does not keep 'w-0.1' in use."""
    with runtime.create(
        SandboxSpec(name="w-0.10", argv=("sleep", "100")), stdio=(0, 2, 2)
    ) as other:
        os.mkdir(os.path.join(runtime.state_dir, "sandboxes", "w-0.1"), 0o700)
        record = os.path.join(runtime.run_dir, "sandboxes", "w-0.1.json")
        Path(record).write_text(f'{{"pid": {other.pid}}}')
        with runtime.create(SandboxSpec(name="w-0.1", argv=("true",)), stdio=(0, 2, 2)) as sb:
            assert sb.wait().status == 0
        other.kill()
        other.wait()


def _held_namespaces() -> set[str]:
    """The namespaces this process holds a descriptor of (``net:[N]``...)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed since
        if link.startswith(("net:[", "mnt:[")):
            held.add(link)
    return held


def test_an_ended_sandbox_keeps_its_namespaces_until_it_is_destroyed(runtime: Runtime) -> None:
    """Its mount and network namespaces are torn down at destroy(), not at
    the init's exit: their teardown stays off the path of a restart."""
    with runtime.create(SandboxSpec(name="ns", argv=("sleep", "60"))) as sb:
        own = {f"{kind}:[{os.stat(f'/proc/{sb.pid}/ns/{kind}').st_ino}]" for kind in ("mnt", "net")}
        sb.kill()
        sb.wait()
        assert own <= _held_namespaces()
    assert not own & _held_namespaces()
