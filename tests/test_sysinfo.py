"""``sysinfo(2)`` answered for the sandbox (issue 17, docs/view.md): what
busybox's ``free`` and ``uptime`` print in the default image.

A process of the sandbox's own tree is asked through two FIFOs in its
root (:data:`LOOP`): the sandbox's shell waits for a line on ``/q``, then
writes one ``free -b`` and ``uptime`` to ``/p``; the test writes the line
and reads ``/p`` to its end (through ``/proc/PID/root``). No sleeps: each
question is one run, by the sandbox's own shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import Keeper, Runtime, Sandbox, SandboxSpec
from supervisor._runtime._linux._sysinfo import ALLOW_ALL_FILTER, NOTIFY_FILTER, supported
from supervisor._runtime._spec import Limits

from .conftest import REPO, Dirs, requires_root
from .helpers import run_capture, wait_for

pytestmark = [requires_root]

MIB = 1 << 20
LOOP = "mkfifo /p /q 2>/dev/null; while read x < /q; do { free -b; uptime; } > /p; done"


@pytest.fixture
def view() -> None:
    """Skip where sandboxes get no view (``CORRAL_LXCFS=off``: the session
    found no lxcfs), or where the filter is not built (not x86_64)."""
    if os.environ.get("CORRAL_LXCFS", "off") == "off":
        pytest.skip("CORRAL_LXCFS=off: sandboxes have no view (make setup installs lxcfs)")
    if not supported():
        pytest.skip("sysinfo is answered on x86_64 only")


def _host_total() -> int:
    """The host's RAM as ``sysinfo`` gives it (``MemTotal`` is the same number)."""
    first = Path("/proc/meminfo").read_text().splitlines()[0]
    return int(first.split()[1]) * 1024


def _free(out: str) -> tuple[int, int]:
    """Total and free of busybox ``free -b``'s ``Mem:`` line."""
    for line in out.splitlines():
        if line.startswith("Mem:"):
            fields = line.split()
            return int(fields[1]), int(fields[3])
    raise AssertionError(f"no Mem: line in {out!r}")


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _ask(pid: int, timeout: int = 30) -> str:
    """One ``free -b`` and ``uptime`` of the :data:`LOOP` of sandbox init *pid*."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"the sandbox's loop did not answer in {timeout}s")

    # Made by the loop's start (/q last): nothing to wait for afterwards.
    wait_for(lambda: _is_fifo(f"/proc/{pid}/root/q"), what="the loop's /q")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(timeout)
    try:
        with open(f"/proc/{pid}/root/q", "w") as q:
            q.write("x\n")
        with open(f"/proc/{pid}/root/p") as p:
            return p.read()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _exec(runtime: Runtime, sb: Sandbox, script: str) -> str:
    with tempfile.TemporaryFile() as out:
        with runtime.exec(sb, ["sh", "-c", script], stdio=(0, out.fileno(), out.fileno())) as p:
            assert p.wait() == 0
        out.seek(0)
        return out.read().decode()


@contextlib.contextmanager
def _looping(runtime: Runtime, name: str, **kw: object) -> Iterator[Sandbox]:
    """A sandbox running :data:`LOOP`, its output a pipe (which CRIU can
    dump, unlike the test's stderr), destroyed after the block."""
    spec = SandboxSpec(name, ["sh", "-c", LOOP], **kw)  # type: ignore[arg-type]
    r, w = os.pipe()
    try:
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            yield sb
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


def test_the_filter_and_its_disarmed_twin_have_one_length() -> None:
    """The restore's rewrite (see _checkpoint) keeps the program's length:
    the checkpoint's protobuf stays intact."""
    assert len(ALLOW_ALL_FILTER) == len(NOTIFY_FILTER) == 6 * 8
    assert ALLOW_ALL_FILTER[:8] == NOTIFY_FILTER[-8:]  # RET ALLOW


@pytest.mark.layout
@pytest.mark.parametrize(
    ("security", "user"),
    [
        ({}, None),
        ({"userns": True}, None),
        ({"no_new_privs": False}, None),
        ({}, "1000"),
        ({"no_new_privs": False}, "1000"),
    ],
    ids=["default", "userns", "no-nnp", "user", "user-no-nnp"],
)
def test_busybox_free_and_uptime_show_the_sandbox(
    runtime: Runtime, view: None, security: dict[str, object], user: str | None
) -> None:
    """In the default busybox image, with memory 64M, busybox's `free`
    (sysinfo, not /proc/meminfo) shows 64 MiB total and less free, and
    `uptime` the sandbox's own (under a minute): with or without
    no_new_privs (the filter is loaded before or after the capabilities
    go), and as another user."""
    from supervisor._runtime._security import make_security

    spec = SandboxSpec(
        "si",
        ["sh", "-c", "free -b; uptime"],
        limits=Limits(memory=64 * MIB),
        security=make_security(**security),  # type: ignore[arg-type]
        user=user,
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    total, free = _free(out)
    assert total == 64 * MIB and 0 < free < total, out
    assert " up 0 min," in out, out


@pytest.mark.layout
def test_free_follows_an_update_and_exec_sees_it_too(runtime: Runtime, view: None) -> None:
    """Read live: after `update` to 96M the sandbox's own `free` shows the
    new limit at once; a `corral exec` process sees the same."""
    with _looping(runtime, "upd", limits=Limits(memory=64 * MIB)) as sb:
        assert _free(_ask(sb.pid))[0] == 64 * MIB
        runtime.update(sb, Limits(memory=96 * MIB))
        assert _free(_ask(sb.pid))[0] == 96 * MIB
        out = _exec(runtime, sb, "free -b; uptime")
        assert _free(out)[0] == 96 * MIB and " up 0 min," in out, out
        sb.kill()


@pytest.mark.layout
def test_no_limit_shows_the_hosts_memory_and_no_view_the_hosts_everything(
    runtime: Runtime, view: None
) -> None:
    """Without a memory limit `free` shows the host's total (the sandbox's
    own uptime still); with `lxcfs = false` sysinfo is the kernel's: the
    host's total and uptime."""
    host_up = float(Path("/proc/uptime").read_text().split()[0])
    result, out, err = run_capture(runtime, SandboxSpec("nolimit", ["sh", "-c", "free -b; uptime"]))
    assert result.status == 0 and _free(out)[0] == _host_total() and " up 0 min," in out, err
    spec = SandboxSpec(
        "off", ["sh", "-c", "free -b; uptime"], limits=Limits(memory=64 * MIB), lxcfs=False
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0 and _free(out)[0] == _host_total(), (out, err)
    if host_up > 120:  # the host's uptime, as busybox prints it
        assert " up 0 min," not in out and " up 1 min," not in out, out


@pytest.mark.parametrize("security", [{"privileged": True}, {"seccomp": "unconfined"}])
def test_a_sandbox_without_seccomp_has_no_filter_and_the_hosts_sysinfo(
    runtime: Runtime, view: None, security: dict[str, object]
) -> None:
    """Privileged or unconfined: no seccomp filter at all (`Seccomp: 0`),
    so a program in it may install one with a listener of its own; its
    sysinfo is the kernel's."""
    from supervisor._runtime._security import make_security

    spec = SandboxSpec(
        "nofilter",
        ["sh", "-c", "free -b; grep '^Seccomp:' /proc/self/status"],
        limits=Limits(memory=64 * MIB),
        security=make_security(**security),  # type: ignore[arg-type]
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert _free(out)[0] == _host_total() and out.split()[-1] == "0", out


def test_corral_run_answers_without_a_keeper(dirs: Dirs, view: None) -> None:
    """`corral run` spawns directly, with no keeper: a forked answerer
    serves its sandbox, and ends with it."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--memory", "48M", "--", "free", "-b"],
        env=dirs.env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0 and _free(done.stdout)[0] == 48 * MIB, done
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--no-lxcfs", "--memory", "48M", "--",
         "free", "-b"],
        env=dirs.env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0 and _free(done.stdout)[0] == _host_total(), done


@pytest.mark.layout
def test_a_replaced_keeper_answers_for_the_sandboxes_of_the_dead_one(
    dirs: Dirs, view: None
) -> None:
    """The keeper answers; SIGKILLed, its listeners live on in the
    supervisor's copies, and the keeper that replaces it is given them and
    answers the same sandbox (which never sees ENOSYS)."""
    keeper = Keeper(str(dirs.run))
    try:
        rt = Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=keeper.spawn)
        with _looping(rt, "kp", limits=Limits(memory=64 * MIB)) as sb:
            assert _free(_ask(sb.pid))[0] == 64 * MIB
            old = keeper.pid
            pidfd = os.pidfd_open(old)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                assert select.select([pidfd], [], [], 10)[0], "the keeper did not die"
            finally:
                os.close(pidfd)
            assert keeper.check()  # replaced, given the listener again
            assert keeper.pid != old
            assert _free(_ask(sb.pid))[0] == 64 * MIB
            sb.kill()
    finally:
        keeper.close()


@pytest.mark.layout
def test_the_sandbox_keeps_answering_while_no_supervisor_runs(dirs: Dirs, view: None) -> None:
    """SIGKILL `corral up`: the keeper it left answers its sandbox's `free`;
    the next `corral up` takes it back (the keeper lists its listener) and
    it still answers, then stops the fleet cleanly."""
    fleet_file = dirs.state / "fleet.toml"
    fleet_file.write_text(f'[[sandbox]]\nname = "w"\nmemory = "64M"\ncommand = "{LOOP}"\n')

    def up() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor", "up", str(fleet_file)],
            env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def until(proc: subprocess.Popen[str], event: str) -> int:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            assert line, f"corral up ended before {event}: {proc.communicate()[1]}"
            rec = json.loads(line)
            if rec.get("event") == event and rec.get("sandbox") == "w-0":
                return int(rec["pid"])

    first = up()
    try:
        init = until(first, "started")
        assert _free(_ask(init))[0] == 64 * MIB
    finally:
        first.kill()
        first.communicate()
    keeper = int((dirs.run / "keeper.lock").read_text().split()[0])
    assert _free(_ask(init))[0] == 64 * MIB  # nobody supervises: the keeper answers
    second = up()
    try:
        assert until(second, "adopted") == init
        assert _free(_ask(init))[0] == 64 * MIB
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)  # the first supervisor's keeper, re-parented to us


@pytest.mark.criu
@pytest.mark.layout
def test_a_restored_sandbox_never_gets_enosys(runtime: Runtime, criu: None, view: None) -> None:
    """CRIU restores the filter without its listener: rewritten in the
    checkpoint to allow everything, the restored tree's `free` gets the
    kernel's answer (the host's numbers, a documented limit), not ENOSYS;
    a process exec'd into it has a listener again, and the sandbox's."""
    with _looping(runtime, "ck", limits=Limits(memory=64 * MIB)) as sb:
        assert _free(_ask(sb.pid))[0] == 64 * MIB
        info = runtime.checkpoint(sb, tag="si")
        assert sb.wait().signal == signal.SIGKILL
    r, w = os.pipe()
    try:
        with runtime.restore(info, stdio=(0, w, w)) as back:
            total, free = _free(_ask(back.pid))
            assert total == _host_total() and 0 < free < total
            assert _free(_exec(runtime, back, "free -b"))[0] == 64 * MIB
            back.kill()
    finally:
        os.close(w)
        os.close(r)
