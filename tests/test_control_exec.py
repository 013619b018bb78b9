"""``corral exec`` end to end: the CLI, the control socket, a supervised sandbox.

The runtime layer is tested in test_exec.py; here the whole path: stdio
handed over as pipes, the exit status, signals forwarded, a pseudo-terminal
with window-size changes, the events, and the wrong-state refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import events
from supervisor import Supervisor

from .conftest import Dirs, requires_root
from .supervising import fleet, of, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]

PRIVILEGE_LINES = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def _cli(dirs: Dirs, verb: str, *args: str) -> list[str]:
    socket = str(dirs.run / "control.sock")
    return [sys.executable, "-m", "supervisor", verb, "--socket", socket, *args]


async def corral(
    dirs: Dirs, *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    verb, rest = args[0], args[1:]
    with trio.fail_after(60):
        return await trio.run_process(
            _cli(dirs, verb, *rest),
            stdin=input,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=dirs.env,
        )


def _status_lines(path: str) -> dict[str, str]:
    with open(path) as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in PRIVILEGE_LINES}


def _main_process(sup: Supervisor, name: str) -> int:
    inst = sup.instance(name)
    assert inst is not None and inst.sandbox is not None
    pid = inst.sandbox.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])


def test_exec_runs_in_the_sandbox_and_returns_its_status(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000", "env": {"FROM": "fleet"}})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        inst = sup.instance("web-0")
        assert inst is not None and inst.sandbox is not None
        init = inst.sandbox.pid

        r = await corral(
            dirs, "exec", "-e", "EXTRA=1", "-w", "/etc", "web", "--",
            "sh", "-c", "echo out $FROM $EXTRA; pwd; echo err >&2; exit 7",
        )  # fmt: skip
        assert r.returncode == 7, r.stderr
        assert r.stdout == b"out fleet 1\n/etc\n" and r.stderr == b"err\n"

        # Every namespace is the sandbox's.
        script = "for n in mnt uts ipc net pid cgroup; do readlink /proc/self/ns/$n; done"
        r = await corral(dirs, "exec", "web-0", "--", "sh", "-c", script)
        expect = [os.readlink(f"/proc/{init}/ns/{n}") for n in ("mnt", "uts", "ipc", "net", "pid", "cgroup")]  # fmt: skip
        assert r.stdout.decode().split() == expect

        # No more privilege than the sandbox's own processes.
        r = await corral(dirs, "exec", "web-0", "--", "cat", "/proc/self/status")
        mine = {
            k: v.strip()
            for k, v in (ln.split(":", 1) for ln in r.stdout.decode().splitlines())
            if k in PRIVILEGE_LINES
        }
        assert mine == _status_lines(f"/proc/{_main_process(sup, 'web-0')}/status")

        # stdin: end of file without -i; passed on with -i.
        r = await corral(dirs, "exec", "web-0", "--", "cat", input=b"ignored")
        assert (r.returncode, r.stdout) == (0, b"")
        r = await corral(dirs, "exec", "-i", "web-0", "--", "tr", "a-z", "A-Z", input=b"hi\n")
        assert (r.returncode, r.stdout) == (0, b"HI\n")

        # The statuses of a command that cannot run, like `docker exec`.
        r = await corral(dirs, "exec", "web-0", "--", "nosuch")
        assert r.returncode == 127
        assert r.stderr == b"corral: exec in 'web-0': 'nosuch': command not found\n"
        r = await corral(dirs, "exec", "web-0", "--", "/etc/passwd")
        assert r.returncode == 126
        r = await corral(dirs, "exec", "-w", "/nope", "web-0", "--", "true")
        assert r.returncode == 125
        assert r.stderr == (
            b"corral: exec in 'web-0': workdir '/nope' is not a directory in the sandbox\n"
        )
        r = await corral(dirs, "exec", "web-0")
        assert r.returncode == 125 and b"expected a command after '--'" in r.stderr
        r = await corral(dirs, "exec", "nope", "--", "true")
        assert r.returncode == 125 and b"'nope'" in r.stderr

    evs = run(f, dirs, body)
    started = of(evs, events.ExecStarted, "web-0")
    exited = of(evs, events.ExecExited, "web-0")
    assert started[0].command.startswith("sh -c 'echo out")
    assert (exited[0].exec_id, exited[0].status) == (started[0].exec_id, 7)
    assert len(started) == len(exited) == 5


def test_exec_i_streams_more_input_than_the_pipes_hold(dirs: Dirs) -> None:
    """`corral exec -i` through a filter that writes more than it reads: 1 MiB
    in, 3 MiB out, no deadlock (the pipes hold 128 KiB between them; the old
    relay stopped after 64 KiB, blocked writing input nobody read)."""
    f = fleet({"name": "web", "command": "exec sleep 1000"})
    data = os.urandom(1 << 20)
    expected = subprocess.run(
        ["od", "-An", "-tx1", "-v"], input=data, capture_output=True, check=True
    ).stdout

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        r = await corral(dirs, "exec", "-i", "web-0", "--", "od", "-An", "-tx1", "-v", input=data)
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected
        # A process that stops reading its input early does not hang the client.
        r = await corral(dirs, "exec", "-i", "web-0", "--", "head", "-c", "10", input=data)
        assert (r.returncode, r.stdout) == (0, data[:10])

    run(f, dirs, body)


def test_signals_to_the_client_reach_the_process(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})
    script = "trap 'echo got INT; exit 4' INT; echo ready; while :; do sleep 0.05; done"

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))

        def interrupt() -> tuple[int, bytes]:
            with subprocess.Popen(
                _cli(dirs, "exec", "web-0", "--", "sh", "-c", script),
                stdout=subprocess.PIPE,
                env=dirs.env,
            ) as p:
                assert p.stdout is not None
                assert p.stdout.readline() == b"ready\n"
                p.send_signal(signal.SIGINT)
                rest = p.stdout.read()
                return p.wait(timeout=30), rest

        status, rest = await trio.to_thread.run_sync(interrupt)
        assert (status, rest) == (4, b"got INT\n")

    run(f, dirs, body)


def _read_until(fd: int, text: bytes, timeout: float = 30) -> bytes:
    buf = b""
    while text not in buf:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"timed out waiting for {text!r}; got {buf!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            chunk = b""
        assert chunk, f"end of output before {text!r}; got {buf!r}"
        buf += chunk
    return buf


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _run_on_a_terminal(argv: Sequence[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run *argv* on a new pseudo-terminal of ours (as its controlling
    terminal, like a login shell); talk to it; return status and output."""
    master, slave = os.openpty()
    _set_size(slave, 24, 80)
    try:
        # `setsid -c`: a session of its own, the pty as controlling terminal,
        # so it gets SIGWINCH when we resize the pty.
        p = subprocess.Popen(
            ["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        try:
            return _talk(p, master)
        finally:
            if p.poll() is None:  # a failed test must not leave it running
                p.kill()
                p.wait()
    finally:
        os.close(master)


def _talk(p: subprocess.Popen[bytes], master: int) -> tuple[int, bytes]:
    """The size it starts with; a resize while it runs; its status and output."""
    out = _read_until(master, b"24 80")
    _set_size(master, 30, 100)
    os.write(master, b"go\n")
    out += _read_until(master, b"30 100")
    status = p.wait(timeout=30)
    try:
        while chunk := os.read(master, 4096):
            out += chunk
    except OSError:
        pass
    return status, out


def test_a_pseudo_terminal_with_window_size_changes(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})
    # The resize reaches the sandbox's terminal through the client and the
    # supervisor: after "go" it may not be there yet (seen under load), so
    # the script waits for it (bounded by the reader's timeout).
    script = (
        "tty; test -t 0 && echo is-a-tty; stty size; read x;"
        ' until [ "$(stty size)" = "30 100" ]; do :; done; stty size; exit 3'
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        argv = _cli(dirs, "exec", "-it", "web-0", "--", "sh", "-c", script)
        status, out = await trio.to_thread.run_sync(_run_on_a_terminal, argv, dirs.env)
        text = out.decode().replace("\r", "")
        assert status == 3, text
        # The sandbox's own terminal, not one of the host's.
        assert "/dev/pts/0\nis-a-tty\n24 80\n" in text
        assert text.rstrip().endswith("30 100")

    evs = run(f, dirs, body)
    (started,) = of(evs, events.ExecStarted, "web-0")
    assert started.tty is True


def test_the_cli_verbs(dirs: Dirs, tmp_path: Path) -> None:
    """Every verb as a user types it: tables, JSON, one-line errors, statuses."""
    f = fleet({"name": "web", "command": "exec sleep 1000", "replicas": 2, "memory": "64M"})
    extra = tmp_path / "extra.toml"
    extra.write_text('[[sandbox]]\nname = "extra"\ncommand = "exec sleep 1000"\n')

    async def body(sup: Supervisor) -> None:
        for i in range(2):

            def is_started(e: events.Event, i: int = i) -> bool:
                return isinstance(e, events.Started) and e.instance == i

            await wait_event(sup, is_started)

        r = await corral(dirs, "ps")
        lines = r.stdout.decode().splitlines()
        assert r.returncode == 0 and lines[0].split()[:5] == [
            "NAME",
            "STATE",
            "PID",
            "UPTIME",
            "RESTARTS",
        ]
        assert [ln.split()[:2] for ln in lines[1:]] == [["web-0", "running"], ["web-1", "running"]]
        assert "64.0 MiB" in lines[1]
        rows = json.loads((await corral(dirs, "ps", "--json")).stdout)
        assert [r["name"] for r in rows] == ["web-0", "web-1"]

        info = json.loads((await corral(dirs, "inspect", "web-1")).stdout)
        assert info["name"] == "web-1" and info["limits"]["memory"] == 64 << 20

        r = await corral(dirs, "stats", "web-0")
        header, row = r.stdout.decode().splitlines()
        assert header.split()[:4] == ["NAME", "STATE", "CPU", "%"]
        assert row.split()[:2] == ["web-0", "running"]
        (st,) = json.loads((await corral(dirs, "stats", "--json", "web-1")).stdout)
        assert st["name"] == "web-1" and st["memory_limit"] == 64 << 20

        r = await corral(dirs, "pause", "web")
        assert r.returncode == 0 and r.stdout.decode().count("paused") == 2
        r = await corral(dirs, "pause", "web-0")
        assert r.returncode == 125
        assert r.stderr == (
            b"corral: cannot pause 'web-0': it is paused (pause needs a running sandbox)\n"
        )
        assert (await corral(dirs, "resume", "web")).returncode == 0
        assert (await corral(dirs, "kill", "-s", "TERM", "web-1")).returncode == 0
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "web-1")
        r = await corral(dirs, "kill", "-s", "NOPE", "web-0")
        assert r.returncode == 125 and b"signal: expected a signal name" in r.stderr
        assert (await corral(dirs, "start", "web-1")).returncode == 0
        assert (await corral(dirs, "restart", "-t", "1", "web-1")).returncode == 0
        assert (await corral(dirs, "stop", "-t", "1", "web-1")).returncode == 0
        r = await corral(dirs, "stop", "web-1")
        assert (r.returncode, r.stderr) == (
            125,
            b"corral: cannot stop 'web-1': it is stopped already\n",
        )
        r = await corral(dirs, "add", str(extra))
        assert r.returncode == 0 and "extra-0" in r.stdout.decode()
        r = await corral(dirs, "rm", "-t", "0", "extra")
        assert (r.returncode, r.stdout) == (0, b"removed extra-0\n")

        def watch() -> tuple[int, bytes]:
            with subprocess.Popen(
                _cli(dirs, "stats", "--watch", "web-0"), stdout=subprocess.PIPE, env=dirs.env
            ) as p:
                assert p.stdout is not None
                first = p.stdout.readline() + p.stdout.readline()
                p.send_signal(signal.SIGINT)
                return p.wait(timeout=30), first

        status, first = await trio.to_thread.run_sync(watch)
        assert status == 130 and first.split()[:2] == [b"NAME", b"STATE"]

    run(f, dirs, body)
