"""The keeper fork server: what a threaded supervisor spawns through."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from supervisor import Keeper, Runtime, SandboxError, SandboxSpec
from supervisor._runtime._linux._spawn import KeeperError, OutputPipes, reaped_status

from .conftest import Dirs, requires_root

pytestmark = [requires_root, pytest.mark.layout]


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    k = Keeper()
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (instead of hanging the suite) if the test blocks for 20 s."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("blocked for 20 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_create_returns_while_the_command_runs(dirs: Dirs, keeper: Keeper, alarm: None) -> None:
    """create() through the keeper returns once exec'd, not when the command ends."""
    rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
    r, w = os.pipe()
    try:
        with rt.create(
            SandboxSpec(name="long", argv=("sh", "-c", "echo up; exec sleep 60")), stdio=(0, w, 2)
        ) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 10) == b"up\n"
            assert sb.poll() is None
            # No descriptor of ours leaked into the sandbox's processes.
            assert len(os.listdir(f"/proc/{sb.pid}/fd")) == 3
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_concurrent_creates_from_threads(dirs: Dirs, keeper: Keeper, alarm: None) -> None:
    """Threads may create sandboxes concurrently through one keeper."""
    rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
    results: dict[int, int] = {}

    def one(i: int) -> None:
        with rt.create(
            SandboxSpec(name=f"t{i}", argv=("sh", "-c", f"exit {i}")), stdio=(0, 2, 2)
        ) as sb:
            results[i] = sb.wait().status

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i for i in range(8)}


def test_closed_keeper_exits(keeper: Keeper) -> None:
    """A keeper that is closed makes no more sandboxes and exits."""
    pid = keeper.pid
    keeper.close()
    # close() waits for it: the process is gone (reaped), not a zombie.
    assert not os.path.exists(f"/proc/{pid}")


def test_a_failure_reported_before_the_pid_still_gives_the_pid() -> None:
    """The init may fail and report before the intermediate has sent its
    PID (nothing orders the two): collect still returns the PID and pidfd
    with the failure, so that the caller reaps the init (seen as a zombie
    left in CI)."""
    import json
    import socket
    import subprocess

    from supervisor._runtime._linux._spawn import SpawnFailed, collect

    child = subprocess.Popen(["true"])
    child.wait()  # reaped: only its number matters here
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        failure = {"step": "mount /proc", "errno": 2, "message": "no", "kind": "setup"}
        theirs.send(b"E" + json.dumps(failure).encode())
        pidfd = os.pidfd_open(os.getpid())  # any pidfd will do
        socket.send_fds(theirs, [b"P%d:%d" % (child.pid, 42)], [pidfd])
        os.close(pidfd)
        theirs.close()
        with pytest.raises(SpawnFailed) as err:
            collect(ours)
    assert (err.value.pid, err.value.starttime) == (child.pid, 42)
    assert err.value.pidfd is not None
    os.close(err.value.pidfd)
    assert err.value.failure.step == "mount /proc"


def _flaky_keeper(counter: Path) -> type[Keeper]:
    """A Keeper class whose keeper process SIGKILLs itself before it says
    it is ready, as many times as *counter* says: a real process killed at
    the worst moment, at a moment of the test's choosing."""
    script = (
        'n=$(cat "$0"); if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$0"; kill -9 $$; fi; '
        'exec "$1" -m supervisor._runtime._linux._keeper "$2" "$3"'
    )

    class Flaky(Keeper):
        command = ("sh", "-c", script, str(counter), sys.executable)

    return Flaky


def test_a_keeper_killed_before_it_is_ready_is_followed_by_another(
    dirs: Dirs, tmp_path: Path, alarm: None
) -> None:
    """Seen in CI: the holder SIGKILLed between taking the run directory and
    saying ready ended the supervisor. Such a start is made again."""
    counter = tmp_path / "kills"
    counter.write_text("2")
    keeper = _flaky_keeper(counter)(str(dirs.run))
    try:
        assert counter.read_text().strip() == "0"  # two were killed, the third serves
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        with rt.create(SandboxSpec(name="after", argv=("sh", "-c", "exit 7"))) as sb:
            assert sb.wait().status == 7
    finally:
        keeper.close()


def test_a_keeper_that_cannot_be_replaced_now_is_replaced_later(
    dirs: Dirs, tmp_path: Path, alarm: None
) -> None:
    """A keeper whose replacement fails leaves no half state: the failure is
    each caller's own (a sandbox that cannot start), and the next check() replaces it."""
    counter = tmp_path / "kills"
    counter.write_text("0")
    keeper = _flaky_keeper(counter)(str(dirs.run))
    try:
        counter.write_text(str(Keeper.START_ATTEMPTS))  # every replacement dies
        fd = keeper.watch_fd()
        os.kill(keeper.pid, signal.SIGKILL)  # ours: we started it
        select.select([fd], [], [])  # its connection ends when it is dead
        os.close(fd)
        with pytest.raises(KeeperError, match="failed to start"):
            keeper.check()
        with pytest.raises(OSError):
            keeper.watch_fd()
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        counter.write_text(str(Keeper.START_ATTEMPTS))
        with pytest.raises(SandboxError, match="'none': the spawn keeper failed to start"):
            rt.create(SandboxSpec(name="none", argv=("true",)))
        assert not (dirs.state / "sandboxes" / "none").exists()
        counter.write_text("0")
        assert keeper.check()
        os.close(keeper.watch_fd())
        with rt.create(SandboxSpec(name="after", argv=("sh", "-c", "exit 7"))) as sb:
            assert sb.wait().status == 7
    finally:
        keeper.close()


def test_a_listener_reported_before_the_pid_is_taken_in_order() -> None:
    """The init (which sends its sysinfo listener, ``N``) and the
    intermediate (which sends ``P`` with the init's pidfd) are two
    processes: nothing orders their reports. An ``N`` first is the
    listener, not a missing ``P`` (that killed one crash-loop start in
    about a hundred)."""
    import socket

    from supervisor._runtime._linux._spawn import collect

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener_r, listener_w = os.pipe()  # stand-ins: any descriptors travel
    pidfd = os.pidfd_open(os.getpid())
    try:
        socket.send_fds(theirs, [b"N"], [listener_r])
        socket.send_fds(theirs, [f"P{os.getpid()}:42".encode()], [pidfd])
        theirs.close()
        proc = collect(ours)
        assert (proc.pid, proc.starttime) == (os.getpid(), 42)
        assert proc.notify_fd >= 0 and proc.pidfd >= 0
        os.write(listener_w, b"x")
        assert os.read(proc.notify_fd, 1) == b"x"  # the listener it was sent
        os.close(proc.notify_fd)
        os.close(proc.pidfd)
    finally:
        ours.close()
        for fd in (listener_r, listener_w, pidfd):
            os.close(fd)


def _forker_of(keeper_pid: int) -> int:
    """The keeper's forker: its child that is no sandbox (a Python process)."""
    kids = Path(f"/proc/{keeper_pid}/task/{keeper_pid}/children").read_text().split()
    forkers = [int(k) for k in kids if "_keeper" in Path(f"/proc/{k}/cmdline").read_text()]
    assert len(forkers) == 1, f"keeper {keeper_pid}: children {kids}"
    return forkers[0]


def test_a_forker_that_died_is_forked_again(dirs: Dirs, alarm: None) -> None:
    """The keeper forks sandboxes from a child of its own (the forker); one
    that was killed is replaced at the next start, which succeeds."""
    with Keeper(str(dirs.run)) as keeper:
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        with rt.create(SandboxSpec(name="before", argv=("true",))) as sb:
            assert sb.wait().status == 0
        forker = _forker_of(keeper.pid)
        pidfd = os.pidfd_open(forker)
        os.kill(forker, signal.SIGKILL)  # the keeper's child, started by our keeper
        select.select([pidfd], [], [])
        os.close(pidfd)
        with rt.create(SandboxSpec(name="after", argv=("sh", "-c", "exit 3"))) as sb:
            assert sb.wait().status == 3
        assert _forker_of(keeper.pid) != forker


def test_a_start_does_not_carry_the_pipes_the_keeper_holds(dirs: Dirs, alarm: None) -> None:
    """What the keeper holds for the sandboxes it keeps (two pipes and a
    listener each) stays out of every process it forks: the forker has
    only its own few descriptors, however many the keeper holds."""
    with Keeper(str(dirs.run)) as keeper:
        for i in range(100):
            r, w = os.pipe()
            mine = OutputPipes(r, w)
            keeper.hold(f"k{i}", mine)
            mine.let_go_both()  # the keeper client's share keeps them open
        pipes, _ = keeper.held()  # answered after every hold before it
        assert len(pipes) == 100
        for pair in pipes.values():
            pair.let_go_both()
        assert len(os.listdir(f"/proc/{keeper.pid}/fd")) >= 200
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        with rt.create(SandboxSpec(name="light", argv=("true",))) as sb:
            assert sb.wait().status == 0
        assert len(os.listdir(f"/proc/{_forker_of(keeper.pid)}/fd")) < 10
        for i in range(100):
            keeper.release(f"k{i}")


def _notify_fds() -> int:
    """Seccomp listeners among this process's descriptors."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
        except OSError:
            pass  # the listing's own descriptor, closed since
    return count


def test_the_copies_of_ended_sandboxes_listeners_are_closed(dirs: Dirs, alarm: None) -> None:
    """The keeper client keeps a copy of each sandbox's sysinfo listener
    until every process of its filter has ended (one epoll set for all:
    polling each copy at every start cost milliseconds per sandbox at a
    thousand); the copies of sandboxes that ended are closed."""
    from supervisor._runtime._linux._sysinfo import supported

    if not supported():
        pytest.skip("no sysinfo answerer on this architecture: no listener to keep")
    with Keeper(str(dirs.run)) as keeper:
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        before = _notify_fds()
        with rt.create(SandboxSpec(name="lives", argv=("sleep", "30"))) as alive:
            for i in range(20):
                with rt.create(SandboxSpec(name=f"s{i}", argv=("true",))) as sb:
                    assert sb.wait().status == 0
            # The live sandbox's copy, and at most the last one's, whose
            # filter may end just after the look that follows its reap.
            assert 1 <= _notify_fds() - before <= 2
            alive.kill()
            alive.wait()


def test_an_exit_is_read_from_the_kernel_while_the_keeper_cannot_answer(
    dirs: Dirs, alarm: None
) -> None:
    """How a sandbox ended comes from the kernel (its zombie's status), not
    a round trip to the keeper that is its parent: known, exit code or
    signal, while that keeper is stopped and neither reaps nor answers."""
    with Keeper(str(dirs.run)) as keeper:
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        r, w = os.pipe()
        with (
            rt.create(
                SandboxSpec(name="code", argv=("sh", "-c", "read x; exit 3")), stdio=(r, 1, 2)
            ) as a,
            rt.create(SandboxSpec(name="killed", argv=("sleep", "60"))) as b,
        ):
            os.close(r)
            assert a.poll(stats=False) is None  # running
            os.kill(keeper.pid, signal.SIGSTOP)
            try:
                os.close(w)
                b.kill()
                for sb in (a, b):
                    select.select([sb.pidfd], [], [])
                code, killed = a.poll(stats=False), b.poll(stats=False)
            finally:
                os.kill(keeper.pid, signal.SIGCONT)
            assert code is not None and (code.exit_code, code.signal) == (3, None)
            assert killed is not None and (killed.signal, killed.status) == (signal.SIGKILL, 137)


def test_a_zombie_a_killed_keeper_hands_on_is_reaped_and_its_sandbox_can_end(
    dirs: Dirs, alarm: None
) -> None:
    """An exec'd process ends while the keeper (its parent) is stopped: its
    status is read from its zombie. Then the keeper is killed, and the
    zombie, handed on to us, is reaped when the keeper is replaced. Left
    unreaped, it would hold the sandbox's PID namespace: the init, killed,
    would never finish exiting (seen: a fleet whose stop never ended)."""
    with Keeper(str(dirs.run)) as keeper:
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        with rt.create(SandboxSpec(name="s", argv=("sleep", "60"))) as sb:
            r, w = os.pipe()
            try:
                with rt.exec(sb, ["sh", "-c", "read x; exit 5"], stdio=(r, 1, 2)) as proc:
                    os.close(r)
                    r = -1
                    os.kill(keeper.pid, signal.SIGSTOP)
                    os.close(w)  # it ends, and nobody reaps it
                    w = -1
                    select.select([proc.pidfd], [], [])
                    assert proc.poll() == 5
                    assert Path(f"/proc/{proc.pid}/stat").read_text().split()[2] == "Z"
                    # The keeper is our child: its PID is not reused before we reap it.
                    held = os.pidfd_open(keeper.pid)
                    try:
                        signal.pidfd_send_signal(held, signal.SIGKILL)
                        select.select([held], [], [])
                    finally:
                        os.close(held)
                    assert keeper.check()  # found dead, and replaced
                    assert not Path(f"/proc/{proc.pid}").exists()
            finally:
                for fd in (r, w):
                    if fd >= 0:
                        os.close(fd)
            sb.kill()
            assert sb.wait().signal == signal.SIGKILL  # the init finished exiting


def test_a_status_reaped_by_another_process_is_read_through_the_pidfd() -> None:
    """Once its parent has reaped it, a process's status is still read
    through a pidfd taken before (Linux 6.15+; older kernels say None and
    the keeper is asked)."""
    go_r, go_w = os.pipe()
    say_r, say_w = os.pipe()
    parent = os.fork()
    if parent == 0:  # pragma: no cover - the other process
        child = os.fork()
        if child == 0:
            os.read(go_r, 1)
            os._exit(3)
        os.write(say_w, f"{child}\n".encode())
        os.waitpid(child, 0)  # reaped here, not by the test
        os.write(say_w, b"reaped\n")
        os.read(go_r, 1)  # the test is done
        os._exit(0)
    try:
        said = os.fdopen(os.dup(say_r), "rb")
        child = int(said.readline())
        pidfd = os.pidfd_open(child)
        try:
            assert reaped_status(pidfd) is None  # running
            os.write(go_w, b"g")
            assert said.readline() == b"reaped\n"
            status = reaped_status(pidfd)
        finally:
            os.close(pidfd)
            said.close()
        if status is None and _kernel_release() < (6, 15):
            pytest.skip(f"the kernel ({os.uname().release}) has no PIDFD_INFO_EXIT (6.15+)")
        assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    finally:
        os.write(go_w, b"g")
        os.waitpid(parent, 0)
        for fd in (go_r, go_w, say_r, say_w):
            os.close(fd)


def _kernel_release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
