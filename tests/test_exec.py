"""Runtime.exec: a new process in a running sandbox, like ``docker exec``."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import tempfile
import termios
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from supervisor import (
    CommandNotExecutableError,
    CommandNotFoundError,
    ExecProcess,
    Runtime,
    Sandbox,
    SandboxError,
    SandboxSpec,
    SpecError,
)
from supervisor._runtime._linux._spawn import Keeper

from .conftest import Dirs, requires_root
from .helpers import wait_for

pytestmark = [requires_root, pytest.mark.layout]

NAMESPACES = ("mnt", "uts", "ipc", "net", "pid", "cgroup")
PRIVILEGE_LINES = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


@pytest.fixture
def null() -> Iterator[int]:
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def sandbox(runtime: Runtime, null: int) -> Iterator[Sandbox]:
    """A running sandbox whose command sleeps; destroyed afterwards."""
    spec = SandboxSpec(
        name="target", argv=("sleep", "600"), env={"FROM_SPEC": "spec"}, workdir="/etc"
    )
    with runtime.create(spec, stdio=(null, null, null)) as sb:
        yield sb


def exec_capture(
    runtime: Runtime,
    sb: Sandbox,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> tuple[int, str, str]:
    """Exec *argv* in *sb* to its end; return its status, stdout and stderr."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        open("/dev/null", "rb") as inp,
    ):
        with runtime.exec(
            sb, argv, env=env, workdir=workdir, stdio=(inp.fileno(), out.fileno(), err.fileno())
        ) as proc:
            status = proc.wait()
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(), err.read().decode()


def status_lines(text: str, names: Sequence[str]) -> dict[str, str]:
    """The lines of a /proc/PID/status text for *names*, by name."""
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {n: lines[n].strip() for n in names}


def command_pid(sb: Sandbox) -> int:
    """Host PID of the sandbox's command: the only child of its init (tini)."""
    text = wait_for(
        lambda: Path(f"/proc/{sb.pid}/task/{sb.pid}/children").read_text().split(),
        what="tini to start the command",
    )
    return int(text[0])


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def read_until_eof(fd: int, timeout: float = 10.0) -> bytes:
    """Everything a pty master gives until the slave side is gone (EIO)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no end of output after {timeout}s: {data!r}"
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every slave descriptor is closed
            return data
        if not chunk:
            return data
        data += chunk


def test_joins_every_namespace_of_the_sandbox(runtime: Runtime, sandbox: Sandbox) -> None:
    """The exec'd process's namespaces are the sandbox init's, all six."""
    script = "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done"
    status, out, err = exec_capture(runtime, sandbox, ["sh", "-c", script])
    assert status == 0, err
    expected = [os.readlink(f"/proc/{sandbox.pid}/ns/{ns}") for ns in NAMESPACES]
    assert out.split() == expected


def test_joins_the_cgroup_root_and_workdir(runtime: Runtime, sandbox: Sandbox, null: int) -> None:
    """Same cgroup (host view and the namespace's view), the sandbox's root, the workdir as cwd."""
    script = "cat /proc/self/cgroup; echo ---; cat /proc/1/cgroup; echo ---; stat -c '%d %i' /; pwd"
    status, out, err = exec_capture(runtime, sandbox, ["sh", "-c", script])
    assert status == 0, err
    own, init, rest = out.split("---\n")
    assert own == init and "corral-" not in own  # relative to the cgroup namespace's root
    dev, ino, cwd = rest.split()
    root = os.stat(f"/proc/{sandbox.pid}/root")
    # setns() into the mount namespace made the pivoted root our root.
    assert (int(dev), int(ino)) == (root.st_dev, root.st_ino)
    assert cwd == "/etc"  # the spec's workdir
    with runtime.exec(sandbox, ["sleep", "600"], stdio=(null, null, null)) as proc:
        host_view = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert host_view == Path(f"/proc/{sandbox.pid}/cgroup").read_text()
        assert "corral-target" in host_view
        own_root = os.stat(f"/proc/{proc.pid}/root")
        assert (own_root.st_dev, own_root.st_ino) == (root.st_dev, root.st_ino)


def test_workdir_argument(runtime: Runtime, sandbox: Sandbox) -> None:
    """An explicit workdir overrides the spec's."""
    status, out, err = exec_capture(runtime, sandbox, ["pwd"], workdir="/tmp")
    assert (status, out, err) == (0, "/tmp\n", "")


def test_is_a_child_of_the_caller_in_a_session_of_its_own(
    runtime: Runtime, sandbox: Sandbox, null: int
) -> None:
    """The process is re-parented to us (not tini), so waiting on its pidfd works."""
    with runtime.exec(sandbox, ["sleep", "600"], stdio=(null, null, null)) as proc:
        ppid = status_lines(Path(f"/proc/{proc.pid}/status").read_text(), ["PPid"])["PPid"]
        assert int(ppid) == os.getpid()
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 128 + signal.SIGTERM
        assert proc.poll() == 128 + signal.SIGTERM
        proc.send_signal(signal.SIGTERM)  # exited: a no-op
    # Inside, its parent is outside the PID namespace: the PPID reads 0.
    status, out, _ = exec_capture(runtime, sandbox, ["sh", "-c", "echo $PPID"])
    assert (status, out) == (0, "0\n")


def test_exit_status(runtime: Runtime, sandbox: Sandbox) -> None:
    """The status is the command's exit code, or 128+N after signal N."""
    assert exec_capture(runtime, sandbox, ["sh", "-c", "exit 7"])[0] == 7
    assert exec_capture(runtime, sandbox, ["sh", "-c", "kill -USR1 $$"])[0] == 128 + signal.SIGUSR1


def test_close_kills_and_reaps(runtime: Runtime, sandbox: Sandbox, null: int) -> None:
    """close() kills a running process, reaps it and closes its pidfd; twice is fine."""
    before = open_fds()
    proc = runtime.exec(sandbox, ["sleep", "600"], stdio=(null, null, null))
    pid = proc.pid
    proc.close()
    proc.close()
    assert proc.poll() == 128 + signal.SIGKILL
    assert not os.path.exists(f"/proc/{pid}")
    assert open_fds() == before


def test_failures_leave_nothing(runtime: Runtime, sandbox: Sandbox, null: int) -> None:
    """Not found, not executable and a bad workdir raise clear errors; nothing is left."""
    stdio = (null, null, null)
    before = open_fds()
    with pytest.raises(CommandNotFoundError, match="'no-such-command': command not found"):
        runtime.exec(sandbox, ["no-such-command"], stdio=stdio)
    with pytest.raises(CommandNotExecutableError, match="'/etc/passwd' is not an executable"):
        runtime.exec(sandbox, ["/etc/passwd"], stdio=stdio)
    for bad in ("/no/such/dir", "/etc/passwd"):
        with pytest.raises(SandboxError, match=f"workdir {bad!r} is not a directory") as info:
            runtime.exec(sandbox, ["true"], workdir=bad, stdio=stdio)
        assert "\n" not in str(info.value)
    # Refused by execve itself, after the terminal's master was sent up.
    script = "printf junk > /bad; printf '#!/no/shell\\n' > /bad2; chmod +x /bad /bad2"
    assert exec_capture(runtime, sandbox, ["sh", "-c", script])[0] == 0
    with pytest.raises(CommandNotExecutableError, match="'/bad' cannot be run: Exec format error"):
        runtime.exec(sandbox, ["/bad"], tty=True)
    with pytest.raises(CommandNotFoundError, match="'/bad2': No such file"):
        runtime.exec(sandbox, ["/bad2"], tty=True)
    with pytest.raises(SpecError, match="argv"):
        runtime.exec(sandbox, [], stdio=stdio)
    assert open_fds() == before
    assert Path(f"/proc/{sandbox.pid}/task/{sandbox.pid}/children").read_text().split() == [
        str(command_pid(sandbox))
    ]


def test_many_quick_failures_leave_no_zombie(runtime: Runtime, null: int) -> None:
    """A process that fails right after it was forked must be reaped by us,
    never left a zombie: a zombie in the sandbox's PID namespace would keep
    its init from ever finishing its exit (seen once: a stop that hung)."""
    spec = SandboxSpec(name="quick", argv=("sleep", "600"))
    sb = runtime.create(spec, stdio=(null, null, null))
    try:
        for _ in range(100):
            with pytest.raises(CommandNotFoundError):
                runtime.exec(sb, ["no-such-command"], stdio=(null, null, null))
        sb.kill()
        # The init ends (its pidfd polls readable) only if no zombie is left.
        ended = select.select([sb.pidfd], [], [], 30)[0]
        if not ended:
            _reap_zombies(except_pid=sb.pid)
        assert ended, "the init could not finish exiting: a zombie was left in its PID namespace"
    finally:
        sb.destroy()


def _reap_zombies(except_pid: int) -> None:
    """Reap our zombie children (but *except_pid*), so a failed test can clean up."""
    for task in os.listdir("/proc/self/task"):
        for pid in Path(f"/proc/self/task/{task}/children").read_text().split():
            if int(pid) != except_pid and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                os.waitpid(int(pid), os.WNOHANG)


def test_exec_into_an_exited_sandbox(runtime: Runtime, null: int) -> None:
    """A sandbox whose init has exited (reaped or not) cannot be exec'd into."""
    gone = r"^sandbox 'gone': not running \(its init has exited\)$"
    with runtime.create(SandboxSpec(name="gone", argv=("true",)), stdio=(null, null, null)) as sb:
        # Exited, not yet reaped: exec must see it without reaping it.
        wait_for(lambda: select.select([sb.pidfd], [], [], 0)[0], what="the init to exit")
        with pytest.raises(SandboxError, match=gone):
            runtime.exec(sb, ["true"], stdio=(null, null, null))
        assert sb.exit is None
        assert sb.wait().status == 0
        with pytest.raises(SandboxError, match=gone):
            runtime.exec(sb, ["true"], stdio=(null, null, null))


def test_ending_sandbox_kills_exec_processes(runtime: Runtime, null: int) -> None:
    """Killing the sandbox kills its exec'd processes; once they are reaped the init ends."""
    with runtime.create(SandboxSpec(name="ending", argv=("sleep", "600")), stdio=(null,) * 3) as sb:
        with runtime.exec(sb, ["sleep", "600"], stdio=(null, null, null)) as proc:
            sb.kill()
            assert proc.wait() == 128 + signal.SIGKILL
        assert sb.wait().status == 128 + signal.SIGKILL


def test_no_more_privilege_than_the_sandbox(runtime: Runtime, sandbox: Sandbox, null: int) -> None:
    """Capabilities, no_new_privs and seccomp match the sandbox command's; no fd, ignored
    signal or odd umask is inherited from the spawner."""
    status, out, err = exec_capture(runtime, sandbox, ["cat", "/proc/self/status"])
    assert status == 0, err
    command = Path(f"/proc/{command_pid(sandbox)}/status").read_text()
    assert status_lines(out, PRIVILEGE_LINES) == status_lines(command, PRIVILEGE_LINES)
    assert status_lines(out, ["SigIgn", "SigBlk"]) == {
        "SigIgn": "0000000000000000",
        "SigBlk": "0000000000000000",
    }
    assert exec_capture(runtime, sandbox, ["sh", "-c", "umask"])[1] == "0022\n"
    with runtime.exec(sandbox, ["sleep", "600"], stdio=(null, null, null)) as proc:
        assert sorted(os.listdir(f"/proc/{proc.pid}/fd")) == ["0", "1", "2"]


def test_environment(runtime: Runtime, sandbox: Sandbox) -> None:
    """The sandbox's environment, updated with the caller's extra variables."""
    status, out, err = exec_capture(
        runtime,
        sandbox,
        ["sh", "-c", 'echo "$FROM_SPEC|$EXTRA|$HOSTNAME|$PATH"'],
        env={"EXTRA": "extra value"},
    )
    assert status == 0, err
    path = sandbox.spec.environment()["PATH"]
    assert out.rstrip("\n").split("|") == ["spec", "extra value", "target", path]
    status, out, _ = exec_capture(
        runtime, sandbox, ["sh", "-c", "echo $FROM_SPEC"], env={"FROM_SPEC": "override"}
    )
    assert (status, out) == (0, "override\n")


def test_tty(runtime: Runtime, sandbox: Sandbox) -> None:
    """With tty=True the process gets a terminal of the sandbox's devpts; its master
    relays output and window size changes."""
    script = "read go; tty; test -t 0 && echo isatty; stty size; echo hello"
    with runtime.exec(sandbox, ["sh", "-c", script], tty=True) as proc:
        master = proc.pty_master
        assert master is not None
        assert not os.get_inheritable(master)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        os.write(master, b"go\n")
        out = read_until_eof(master).decode().replace("\r\n", "\n")
        assert proc.wait() == 0
    # The pty's echo of our input, then the script's output.
    assert out.splitlines() == ["go", "/dev/pts/0", "isatty", "33 111", "hello"]
    assert proc.pty_master is None  # closed by close()


def test_tty_master_can_be_taken(runtime: Runtime, sandbox: Sandbox) -> None:
    """A taken pty master is the caller's: close() leaves it open."""
    with runtime.exec(sandbox, ["sh", "-c", "echo hi"], tty=True) as proc:
        master = proc.take_pty_master()
        assert master is not None and proc.pty_master is None
        assert proc.wait() == 0
    try:
        assert read_until_eof(master).replace(b"\r\n", b"\n") == b"hi\n"
    finally:
        os.close(master)


def test_exec_process_is_exported() -> None:
    """ExecProcess is public API."""
    import supervisor

    assert supervisor.ExecProcess is ExecProcess


def test_the_host_python_is_never_reachable_from_the_sandbox(runtime: Runtime, null: int) -> None:
    """runc CVE-2019-5736: from its fork to its exec, a process joining the
    sandbox is the host's Python, visible in the sandbox's /proc. A sandbox
    process watching /proc while 150 execs come in must never be able to
    follow one's /proc/PID/exe (it is undumpable until the exec)."""
    watch = (
        "while :; do ls -l /proc/[0-9]*/exe 2>/dev/null | grep -v -e /bin/busybox -e /dev/init;"
        " done"
    )  # what is left: links it may not follow (no "->"), and leaks
    with tempfile.TemporaryFile() as seen:
        spec = SandboxSpec(name="watcher", argv=("sh", "-c", watch))
        with runtime.create(spec, stdio=(null, seen.fileno(), null)) as sb:
            for _ in range(150):
                with runtime.exec(sb, ["true"], stdio=(null, null, null)) as proc:
                    assert proc.wait() == 0
            sb.kill()
            sb.wait()
        seen.seek(0)
        lines = seen.read().decode().splitlines()
    leaks = [ln for ln in lines if "->" in ln]
    assert not leaks, leaks[:5]
    # The watcher did see processes in the window, and could not follow them.
    assert lines, "the watcher never caught an exec between its fork and its exec"


def test_an_exec_without_a_keeper_is_one_line(
    runtime: Runtime, dirs: Dirs, null: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper it spawns through was killed and no new one starts: the
    exec fails with one SandboxError naming the sandbox (not a bare
    KeeperError, which the control server would log as a crash), and the
    sandbox runs on."""
    spec = SandboxSpec(name="ex-nokeeper", argv=("sleep", "600"))
    with runtime.create(spec, stdio=(null, null, null)) as sb:
        keeper = Keeper()
        try:
            other = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
            # Its replacement is a program that exits at once, never ready.
            monkeypatch.setattr(keeper, "command", ("false",))
            pidfd = os.pidfd_open(keeper.pid)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [])  # readable once it has exited
            finally:
                os.close(pidfd)
            with pytest.raises(SandboxError) as info:
                other.exec(sb, ["true"], stdio=(null, null, null))
            assert str(info.value) == (
                "sandbox 'ex-nokeeper': exec: the spawn keeper failed to start"
            )
            assert sb.poll() is None
        finally:
            keeper.close()
        sb.kill()
        sb.wait()
