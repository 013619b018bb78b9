"""Each sandbox's output, captured to rotated log files, and `corral logs`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import events
from supervisor import Supervisor
from supervisor._cli._output_reader import read_records

from .conftest import Dirs, corral, requires_root
from .supervising import fleet, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]


@pytest.mark.host_only  # log rotation: no cgroup or kernel feature
def test_fifty_megabytes_rotate_within_bounds_in_whole_lines(dirs: Dirs) -> None:
    """~50 MB on stdout and stderr at once: at most 4 files of ~1 MiB, whole, ordered lines."""
    f = fleet(
        {"name": "chatty", "command": "seq 1 1000000 >&2 & seq 1 6000000; wait"},
        log_max_bytes="1M",
        log_max_files=4,
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Exited), timeout=120)

    run(f, dirs, body)
    logdir = dirs.state / "logs"
    files = sorted(p.name for p in logdir.iterdir())
    assert files == ["chatty-0.log", "chatty-0.log.1", "chatty-0.log.2", "chatty-0.log.3"]
    assert all((logdir / n).stat().st_size <= 1 << 20 for n in files)
    records = read_records(str(logdir / "chatty-0.log"))
    by_stream: dict[str, list[int]] = {"stdout": [], "stderr": []}
    for r in records:
        assert not r.partial
        by_stream[r.stream].append(int(r.content))  # a mixed-up line would not parse
    out = by_stream["stdout"]
    assert out[-1] == 6000000 and out == list(range(out[0], 6000001))
    err = by_stream["stderr"]
    assert not err or err == list(range(err[0], err[0] + len(err)))


def test_corral_logs_tail_and_follow(dirs: Dirs) -> None:
    """`corral logs NAME --tail 5` and `-f` print the sandbox's lines."""
    f = fleet(
        {
            "name": "talker",
            "command": "for i in $(seq 1 40); do echo line $i; usleep 20000; done; echo bye >&2",
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        follower = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "logs", "-f", "talker"],
            env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert follower.stdout is not None
            seen = []
            while "bye" not in seen:
                line = await trio_readline(follower)
                seen.append(line.strip())
            assert seen[:3] == ["line 1", "line 2", "line 3"]
            assert seen[-2:] == ["line 40", "bye"]
        finally:
            follower.kill()
            follower.communicate()

    run(f, dirs, body)
    p = corral(dirs, "logs", "talker-0", "--tail", "5")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == ["line 37", "line 38", "line 39", "line 40", "bye"]
    p = corral(dirs, "logs", "talker", "--tail", "1", "--timestamps")
    assert p.stdout.decode().endswith("Z bye\n") or " bye\n" in p.stdout.decode()


async def trio_readline(proc: subprocess.Popen[str]) -> str:
    import trio

    assert proc.stdout is not None
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(proc.stdout.readline)


def test_corral_logs_of_an_unknown_sandbox(dirs: Dirs) -> None:
    """No log: one line, status 125."""
    p = corral(dirs, "logs", "ghost")
    assert p.returncode == 125
    assert (
        p.stderr.decode().count("\n") == 1 and "no output logged for 'ghost'" in p.stderr.decode()
    )


_ = (os, Path)
