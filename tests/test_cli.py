"""``corral run`` as a user types it: exit statuses, signals, errors, stdio."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import Dirs, corral, requires_root
from .helpers import wait_for

pytestmark = requires_root


def test_run_passes_stdout_stderr_and_status(dirs: Dirs) -> None:
    """stdout/stderr reach the caller and the status is the command's."""
    p = corral(dirs, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (p.returncode, p.stdout, p.stderr) == (3, b"out\n", b"err\n")


def test_run_passes_stdin(dirs: Dirs) -> None:
    """stdin is passed through to the command."""
    p = corral(dirs, "run", "--", "tr", "a-z", "A-Z", input=b"hello\n")
    assert (p.returncode, p.stdout) == (0, b"HELLO\n")


def test_killed_by_signal_is_128_plus_n(dirs: Dirs) -> None:
    """A command killed by signal N gives 128+N."""
    p = corral(dirs, "run", "--", "sh", "-c", "kill -USR1 $$")
    assert p.returncode == 128 + signal.SIGUSR1


@pytest.mark.layout
def test_oom_kill_is_137_with_a_message(dirs: Dirs) -> None:
    """An OOM-killed sandbox exits 137 and corral says it was OOM-killed, in one line."""
    p = corral(dirs, "run", "--memory", "32M", "--", "sh", "-c", "x=a; while :; do x=$x$x; done")
    assert p.returncode == 137
    assert p.stderr.decode().count("\n") == 1
    assert "OOM-killed" in p.stderr.decode() and "32M" in p.stderr.decode()


def test_sigterm_reaches_the_command_through_pid_1(dirs: Dirs) -> None:
    """SIGTERM to `corral run` is forwarded by tini to the command, which handles it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "--", "sh", "-c",
         "trap 'echo got-term; exit 42' TERM; echo ready; while :; do usleep 10000; done"],
        env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 42, err
    assert out == b"got-term\n"


def test_sigterm_default_action_gives_143(dirs: Dirs) -> None:
    """A command without a TERM handler dies of the forwarded SIGTERM: 143."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "--", "sh", "-c", "echo ready; exec sleep 100"],
        env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 143


def one_line_error(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("corral: "), err
    return err


def test_unknown_command_is_127_with_a_clear_message(dirs: Dirs) -> None:
    """A command that does not exist in the sandbox: 127 and 'command not found'."""
    p = corral(dirs, "run", "--", "no-such-command", "arg")
    assert p.returncode == 127
    assert "'no-such-command': command not found" in one_line_error(p)


def test_non_executable_command_is_126(dirs: Dirs) -> None:
    """A command that exists but is not executable: 126."""
    p = corral(dirs, "run", "--", "/etc/passwd")
    assert p.returncode == 126
    assert "not an executable" in one_line_error(p)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--memory", "12Q"], "--memory: expected a size like 64M or 1G, got '12Q'"),
        (["--cpus", "-1"], "--cpus: expected a positive number of CPUs like 0.5, got '-1'"),
        (["--pids", "lots"], "--pids: expected a whole number of tasks >= 2, got 'lots'"),
        (
            ["--rootfs", "/no/such/rootfs"],
            "rootfs: expected 'busybox', an image or a directory, got '/no/such/rootfs'",
        ),
        (["--name", "bad name"], "--name: expected 1-63 letters"),
        (["--env", "NOEQUALS"], "--env: expected KEY=VALUE, got 'NOEQUALS'"),
        (["--workdir", "/no/such/dir"], "workdir '/no/such/dir' is not a directory in the sandbox"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_input_is_one_line_and_status_125(dirs: Dirs, args: list[str], expected: str) -> None:
    """Bad options give one line naming the option and what was expected, status 125."""
    p = corral(dirs, "run", *args, "--", "true")
    assert p.returncode == 125
    assert expected in one_line_error(p)


def test_missing_command_is_an_error(dirs: Dirs) -> None:
    """`corral run` without a command says what it expected."""
    p = corral(dirs, "run")
    assert p.returncode == 125
    assert "expected a command" in one_line_error(p)


@contextmanager
def waiting_run(dirs: Dirs, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """A `corral run` (with *options*) whose command waits for a line on stdin.

    Yields once it runs; leaving the block without answering it kills it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", *options, "--",
         "sh", "-c", "echo ready; read x"],
        env=dirs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_duplicate_name_is_refused(dirs: Dirs) -> None:
    """A name in use is refused without touching the running sandbox."""
    with waiting_run(dirs, "--name", "twin") as proc:
        p = corral(dirs, "run", "--name", "twin", "--", "true")
        assert p.returncode == 125
        assert "sandbox name 'twin' is in use" in one_line_error(p)
        proc.communicate(b"go\n", timeout=20)
        assert proc.returncode == 0


def test_an_ulimit_does_not_rename_the_sandbox(dirs: Dirs) -> None:
    """--ulimit NAME=... sets a limit, not the sandbox's name: two such runs do not collide."""
    p = corral(dirs, "run", "--ulimit", "nofile=2048", "--", "sh", "-c", "hostname; ulimit -n")
    assert p.returncode == 0, p.stderr
    host, limit = p.stdout.decode().split()
    assert host.startswith("run-") and limit == "2048"
    with waiting_run(dirs, "--ulimit", "nofile=2048") as proc:
        p = corral(dirs, "run", "--ulimit", "nofile=2048", "--", "true")
        assert p.returncode == 0, p.stderr
        proc.communicate(b"go\n", timeout=20)
        assert proc.returncode == 0


def test_a_killed_run_takes_its_sandbox_along_and_the_next_run_sweeps(dirs: Dirs) -> None:
    """SIGKILL of a `corral run` kills its sandbox (parent-death signal);
    the next `corral run` removes the cgroup, layer and record it left."""
    with waiting_run(dirs, "--name", "orphan") as proc:
        claim = json.loads((dirs.run / "claims" / "orphan.json").read_text())
        # Written once the init has exec'd: its command may say "ready" first.
        path = dirs.run / "sandboxes" / "orphan.json"
        wait_for(path.exists, what="its record")
        record = json.loads(path.read_text())
        init = os.pidfd_open(record["pid"])
        try:
            proc.kill()
            proc.wait()
            # A bound, not a wait: the kernel kills it as its parent dies.
            readable, _, _ = select.select([init], [], [], 30)
            assert readable, "the sandbox outlived its corral run"
            try:
                # Re-parented to us (the test session is a subreaper).
                info = os.waitid(os.P_PIDFD, init, os.WEXITED)
                assert info is not None and info.si_status == signal.SIGKILL
            except ChildProcessError:
                pass  # re-parented to another subreaper, which reaps it
        finally:
            os.close(init)
    left = [Path(p) for p in claim["cgroup"]] + [dirs.state / "sandboxes" / "orphan"]
    assert all(p.exists() for p in left)
    p = corral(dirs, "run", "--", "true")
    assert p.returncode == 0, p.stderr
    assert [p for p in left if p.exists()] == []
    assert not (dirs.run / "sandboxes" / "orphan.json").exists()
    assert list((dirs.run / "claims").iterdir()) == []


def test_not_root_is_refused(dirs: Dirs) -> None:
    """Run as an unprivileged user, corral says it needs root (one line, 125)."""
    # The file-access capabilities are kept (ambient) only so that the
    # interpreter and the checkout are readable wherever CI cloned them; the
    # user is still not root.
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "--inh-caps=+dac_override,+dac_read_search",
         "--ambient-caps=+dac_override,+dac_read_search",
         sys.executable, "-m", "supervisor", "run", "--", "true"],
        env={**dirs.env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert p.returncode == 125, p.stderr
    assert "must run as root" in one_line_error(p)


def test_run_does_not_import_trio_or_pyroute2(dirs: Dirs) -> None:
    """`corral run` does not pay for importing trio or pyroute2 (~180 ms each)."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "supervisor", "run", "--", "echo", "ran"],
        capture_output=True, check=False, env=dirs.env,
    )  # fmt: skip
    assert p.stdout == b"ran\n"
    imported = {line.split("|")[-1].strip() for line in p.stderr.decode().splitlines()}
    assert "trio" not in imported and "pyroute2" not in imported
