"""The kernel's own OOM-kill timestamps, for latency benchmarks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["oom_tracepoint", "parse_mark_victim", "read_victims"]

TRACEFS = "/sys/kernel/tracing"


@contextmanager
def oom_tracepoint() -> Iterator[int]:
    """A non-blocking trace_pipe of a private tracefs instance with only
    oom:mark_victim enabled, on the CLOCK_MONOTONIC trace clock."""
    mounted = False
    if not os.path.exists(f"{TRACEFS}/instances"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        mounted = True
    inst = f"{TRACEFS}/instances/corral-bench-{os.getpid()}"
    os.mkdir(inst)
    try:
        Path(inst, "trace_clock").write_text("mono")
        Path(inst, "events/oom/mark_victim/enable").write_text("1")
        fd = os.open(f"{inst}/trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        try:
            yield fd
        finally:
            os.close(fd)
            Path(inst, "events/oom/mark_victim/enable").write_text("0")
    finally:
        os.rmdir(inst)
        if mounted:
            subprocess.run(["umount", TRACEFS], check=False)


def parse_mark_victim(line: bytes) -> tuple[int, float] | None:
    """(pid, monotonic seconds) of an ``oom:mark_victim`` trace line, else None."""
    head, sep, rest = line.partition(b": mark_victim: ")
    if not sep:
        return None
    ts = float(head.rsplit(None, 1)[-1])
    pid = int(rest.split(b"pid=")[1].split()[0].rstrip(b","))
    return pid, ts


async def read_victims(pipe: int, victims: dict[int, float], notify: Callable[[], None]) -> None:
    """Fill *victims* (pid -> kill time) from the trace pipe, calling *notify*
    after each; runs until cancelled."""
    import trio

    buf = b""
    while True:
        await trio.lowlevel.wait_readable(pipe)
        try:
            buf += os.read(pipe, 65536)
        except BlockingIOError:
            continue
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if (hit := parse_mark_victim(line)) is not None:
                victims[hit[0]] = hit[1]
                notify()
