"""A sandbox is isolated: its own PID, UTS, mount, IPC, net and cgroup namespaces."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from supervisor import Keeper, Runtime, SandboxSpec
from supervisor._runtime._security import make_security

from .conftest import Dirs, requires_root
from .helpers import run_capture

pytestmark = [requires_root, pytest.mark.layout]

NAMESPACES = ("mnt", "uts", "ipc", "net", "pid", "cgroup")


def sh(name: str, script: str, **kw: object) -> SandboxSpec:
    return SandboxSpec(name=name, argv=("sh", "-c", script), **kw)  # type: ignore[arg-type]


def test_every_namespace_differs_from_the_host(runtime: Runtime) -> None:
    """The command's namespaces are all new: none is the host's."""
    script = "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done"
    result, out, err = run_capture(runtime, sh("ns", script))
    assert result.status == 0, err
    inside = out.split()
    assert len(inside) == len(NAMESPACES)
    for ns, link in zip(NAMESPACES, inside, strict=True):
        assert link != os.readlink(f"/proc/self/ns/{ns}"), f"{ns} namespace is the host's"


def test_command_runs_under_tini_as_pid_1(runtime: Runtime) -> None:
    """PID 1 is tini, the command is its child, ps sees only the sandbox."""
    script = (
        "echo ppid=$(cut -d' ' -f4 /proc/$$/stat);"
        " echo init=$(tr '\\0' ' ' < /proc/1/cmdline);"
        " echo pids=$(ls -d /proc/[0-9]* | wc -l);"
        " ps -o pid,comm"
    )
    result, out, err = run_capture(runtime, sh("pid1", script))
    assert result.status == 0, err
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines["ppid"] == "1"
    assert lines["init"].startswith("init -- ")
    # sh, the subshell, ls and wc: nothing of the host's hundreds.
    assert int(lines["pids"]) <= 6, out
    ps = [line.split() for line in out.splitlines() if line.strip() and "=" not in line][1:]
    assert [p[0] for p in ps][:1] == ["1"] and len(ps) <= 4, out


def test_orphaned_grandchild_is_reaped(runtime: Runtime) -> None:
    """An orphan that exits is reaped by PID 1: no zombie remains."""
    # The inner shell starts `true` in the background and exits; `true` is
    # re-parented to PID 1. Without a reaping init it stays a zombie (its
    # /proc entry never goes away) and the loop reports that.
    script = (
        "sh -c 'true & echo $! > /tmp/orphan'; o=$(cat /tmp/orphan); i=0;"
        " while [ -e /proc/$o ] && [ $i -lt 1000 ]; do i=$((i+1)); usleep 5000; done;"
        " if [ -e /proc/$o ]; then echo zombie $(cat /proc/$o/stat); else echo reaped; fi"
    )
    result, out, err = run_capture(runtime, sh("reap", script))
    assert result.status == 0, err
    assert out.strip() == "reaped"


def test_hostname_is_private(runtime: Runtime) -> None:
    """The sandbox's host name is its own; changing it inside (with the
    capability to, which a default sandbox lacks) leaves the host alone."""
    host = socket.gethostname()
    script = "hostname; hostname changed-inside; hostname"
    result, out, err = run_capture(runtime, sh("uts0", script, hostname="box-1"))
    assert out.split() == ["box-1", "box-1"]
    assert "Operation not permitted" in err
    admin = make_security(cap_add=["SYS_ADMIN"])
    result, out, err = run_capture(runtime, sh("uts", script, hostname="box-1", security=admin))
    assert result.status == 0, err
    assert out.split() == ["box-1", "changed-inside"]
    assert socket.gethostname() == host


def test_host_files_are_invisible(runtime: Runtime, tmp_path: Path) -> None:
    """Files of the host outside the rootfs cannot be seen inside."""
    marker = tmp_path / "host-secret"
    marker.write_text("secret")
    script = f"test -e {marker} && echo visible || echo hidden"
    result, out, err = run_capture(runtime, sh("mnt", script))
    assert result.status == 0, err
    assert out.split() == ["hidden"]


def test_only_loopback_and_it_is_up(runtime: Runtime) -> None:
    """The network namespace has only lo, and lo is up."""
    result, out, err = run_capture(
        runtime, sh("net", "ip -o link; ping -c1 -W1 127.0.0.1 >/dev/null && echo pong")
    )
    assert result.status == 0, err
    links = [line for line in out.splitlines() if ": " in line]
    assert len(links) == 1 and links[0].split(": ")[1] == "lo", out
    assert "UP" in links[0]
    assert out.splitlines()[-1] == "pong"


def test_mounts_inside(runtime: Runtime) -> None:
    """/proc is nosuid,nodev,noexec; /sys read-only; /dev a small tmpfs with the usual nodes."""
    script = "cat /proc/mounts; echo ---; ls -l /dev"
    result, out, err = run_capture(runtime, sh("mounts", script))
    assert result.status == 0, err
    mounts_text, dev = out.split("---\n")
    mounts = {m.split()[1]: m.split() for m in mounts_text.splitlines()}
    assert mounts["/"][2] == "overlay"
    assert mounts["/proc"][2] == "proc"
    assert {"nosuid", "nodev", "noexec"} <= set(mounts["/proc"][3].split(","))
    assert mounts["/sys"][2] == "sysfs" and "ro" in mounts["/sys"][3].split(",")
    assert mounts["/dev"][2] == "tmpfs"
    assert mounts["/dev/pts"][2] == "devpts"
    assert mounts["/dev/shm"][2] == "tmpfs"
    names = {
        line.split()[-1] if "->" not in line else line.split()[-3] for line in dev.splitlines()[1:]
    }
    for node in ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
                 "fd", "stdin", "stdout", "stderr"):  # fmt: skip
        assert node in names, f"/dev/{node} missing: {dev}"
    assert not {"sda", "vda", "mem", "kmsg"} & names


def test_writes_go_to_a_private_layer(runtime: Runtime) -> None:
    """A file written in one sandbox is not in the base nor in the next sandbox."""
    first, _, err = run_capture(runtime, sh("w1", "echo data > /etc/written && cat /etc/written"))
    assert first.status == 0, err
    _, out, _ = run_capture(runtime, sh("w2", "test -e /etc/written && echo leaked || echo clean"))
    assert out.strip() == "clean"


def test_env_and_workdir(runtime: Runtime) -> None:
    """--env and --workdir reach the command."""
    result, out, err = run_capture(
        runtime, sh("envwd", "echo $GREETING; pwd", env={"GREETING": "hi there"}, workdir="/tmp")
    )
    assert result.status == 0, err
    assert out.splitlines() == ["hi there", "/tmp"]


def test_stdin_is_passed_through(runtime: Runtime, tmp_path: Path) -> None:
    """The sandbox reads the stdin it is given."""
    src = tmp_path / "in"
    src.write_text("line one\nline two\n")
    import tempfile

    with open(src, "rb") as inp, tempfile.TemporaryFile() as out:
        with runtime.create(
            SandboxSpec(name="stdin", argv=("wc", "-l")), stdio=(inp.fileno(), out.fileno(), 2)
        ) as sb:
            assert sb.wait().status == 0
        out.seek(0)
        assert out.read().split() == [b"2"]


def test_the_command_starts_with_every_signal_at_its_default(dirs: Dirs) -> None:
    """No ignored signal crosses into a sandbox: not one the supervisor's
    ancestors ignored (here SIGUSR1, ignored when the keeper starts), not
    Python's SIGPIPE, not the 32 and 33 some harnesses ignore. An ignored
    signal survives exec, and tini passes on what it got: a command that
    ignores a signal would shrug off a `corral kill`."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        keeper = Keeper()
    finally:
        signal.signal(signal.SIGUSR1, old)
    with keeper:
        assert _sigign(keeper.pid) & (1 << (signal.SIGUSR1 - 1))
        runtime = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        spec = SandboxSpec(name="sigs", argv=("cat", "/proc/self/status"))
        result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    lines = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    assert lines["SigIgn"].strip() == "0000000000000000"
    assert lines["SigBlk"].strip() == "0000000000000000"


def _sigign(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")
