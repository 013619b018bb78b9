"""Where a sandbox's start goes, step by step, from the kernel's own trace.

Usage (as root)::

    .venv/bin/python benchmarks/start_trace.py [--runs 50] [--userns]

Each run is ``Runtime.create`` of a ``/bin/true`` sandbox through the keeper
(what a supervisor pays per sandbox), then its wait and destroy. Nothing in
corral is instrumented: a private tracefs instance records, on the
CLOCK_MONOTONIC trace clock, the keeper and every process it forks
(``set_event_pid`` with ``event-fork``): their forks, namespace unshares,
cgroup joins, mounts, ``pivot_root`` and execs; the benchmark writes a
marker into the trace before and after each create. The steps of one start:

=================  ======================================================
``prepare``        create called -> the keeper's forker forks: the caller's side
                   (spec, directories, cgroup, userns range, lease)
``namespaces``     -> the last ``unshare`` returned (the intermediate's
                   cgroup join and new namespaces; in a user namespace its
                   id maps and the idmapped layers' mounts)
``to mounts``      -> the first mount call of the init
``mounts``         first -> last mount call after it (overlay, /proc,
                   /dev, /sys, masks, views), each one's time included
``pivot``          -> ``pivot_root`` returned
``to tini``        -> tini exec'd (seccomp, capabilities, the report)
``return``         -> create returned (its record, the caller's side)
=================  ======================================================

and, beside them (create returns once tini runs), ``tini to cmd``: tini's
exec to the command's.

The median of each step over the runs is printed (their sum is not the
median total, which is printed too), with the number of mount calls per
start. The last line is ``start_trace_total_ms: X``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from _corral import scratch_dir

from supervisor import Keeper, Limits, Runtime, SandboxSpec
from supervisor._runtime._security import make_security

TRACEFS = "/sys/kernel/tracing"
MOUNT_CALLS = ("mount", "open_tree", "move_mount", "mount_setattr", "fsmount")
SYSCALLS = (
    "unshare", "setns", "mount", "open_tree", "move_mount", "mount_setattr", "fsmount",
    "pivot_root", "umount",
)  # fmt: skip
STEPS = ("prepare", "namespaces", "to mounts", "mounts", "pivot", "to tini", "return")
LINE_RE = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>[\d.]+):\s+(?P<body>.*)$"
)
SYSCALL_RE = re.compile(r"^sys_(?P<name>\w+)(?P<edge>\(| -> )")


@contextlib.contextmanager
def trace_instance(pids: list[int]) -> Iterator[Path]:
    """A private tracefs instance tracing *pids* and what they fork; removed after."""
    mounted = False
    if not os.path.exists(f"{TRACEFS}/instances"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        mounted = True
    inst = Path(f"{TRACEFS}/instances/corral-start-{os.getpid()}")
    inst.mkdir()
    try:
        (inst / "trace_clock").write_text("mono")
        (inst / "buffer_size_kb").write_text("16384")
        (inst / "options" / "event-fork").write_text("1")
        (inst / "set_event_pid").write_text(" ".join(map(str, pids)))
        events = [
            "sched/sched_process_fork",
            "sched/sched_process_exec",
            "cgroup/cgroup_attach_task",
        ]
        for name in SYSCALLS:
            for edge in ("enter", "exit"):
                events.append(f"syscalls/sys_{edge}_{name}")
        for event in events:
            enable = inst / "events" / event / "enable"
            if enable.exists():  # an older kernel may lack a syscall (fsmount)
                enable.write_text("1")
        (inst / "tracing_on").write_text("1")
        yield inst
    finally:
        with contextlib.suppress(OSError):
            (inst / "tracing_on").write_text("0")
        for _ in range(50):  # rmdir fails while the kernel still holds a reader
            try:
                inst.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        if mounted:
            subprocess.run(["umount", TRACEFS], check=False)


def steps_of(lines: list[tuple[float, int, str]], forkers: set[int]) -> dict[str, float] | None:
    """The steps (seconds) of one run's trace lines, or None if one is missing;
    *forkers*: the keeper and its forker (which forks the starts)."""
    t: dict[str, float] = {}
    mounts: list[float] = []
    for ts, pid, body in lines:
        call = SYSCALL_RE.match(body)
        if body.startswith("tracing_mark_write: "):
            t.setdefault(body.split()[1], ts)  # begin, end
        elif body.startswith("sched_process_fork:") and pid in forkers:
            t.setdefault("fork", ts)
        elif body.startswith("sched_process_exec:"):
            t.setdefault("cmd" if "tini" in t else "tini", ts)
        elif call is not None and call["name"] == "unshare" and call["edge"] != "(":
            t["unshared"] = ts
        elif call is not None and call["name"] in MOUNT_CALLS:
            if call["edge"] == "(":
                mounts.append(ts)
            else:
                t["last_mount"] = ts
        elif call is not None and call["name"] == "pivot_root" and call["edge"] != "(":
            t["pivot"] = ts
    # In a user namespace, the idmapped layers are mounted by a helper
    # before the last unshare: counted in namespaces, not in mounts.
    after = [m for m in mounts if m >= t.get("unshared", 0.0)]
    if after:
        t["first_mount"] = after[0]
    order = ("begin", "fork", "unshared", "first_mount", "last_mount", "pivot", "tini", "end")
    if any(k not in t for k in (*order, "cmd")):
        return None
    out = {name: t[b] - t[a] for name, a, b in zip(STEPS, order[:-1], order[1:], strict=True)}
    out["total"] = t["end"] - t["begin"]
    out["tini to cmd"] = t["cmd"] - t["tini"]
    out["mount calls"] = len(mounts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--userns", action="store_true", help="the default: a user namespace")
    args = parser.parse_args()

    scratch = scratch_dir("corral-bench-trace-")
    keeper = Keeper()
    runtime = None
    results: list[dict[str, float]] = []
    try:
        runtime = Runtime(
            state_dir=scratch / "state", run_dir=scratch / "run", spawner=keeper.spawn
        )
        null = os.open("/dev/null", os.O_RDWR)
        security = make_security(userns=args.userns)
        limits = Limits(memory=64 << 20, pids=64, cpus=0.5)

        def one(i: int, marker: TextIO | None = None) -> None:
            spec = SandboxSpec(name=f"t{i}", argv=("/bin/true",), limits=limits, security=security)
            # The context destroys it whatever happens: no cgroup is left.
            with runtime.create(spec, stdio=(null, null, null)) as sb:
                if marker is not None:
                    marker.write(f"end {i}\n")
                    marker.flush()
                sb.wait()

        for i in range(args.warmup):
            one(1000 + i)  # the keeper forks (and imports) before the trace starts
        pid = keeper.pid
        assert pid is not None, "the keeper is not running"
        # The keeper forks its forker first thing, and the forker forks the
        # starts: both are traced (the forker was forked before the trace).
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            forker = [int(p) for p in f.read().split()]
        with trace_instance([pid, *forker]) as inst, open(inst / "trace_marker", "w") as marker:
            for i in range(args.runs):
                marker.write(f"begin {i}\n")
                marker.flush()
                one(i, marker)
                marker.write(f"done {i}\n")  # the destroy's events stay out of the next run's
                marker.flush()
            (inst / "tracing_on").write_text("0")
            text = (inst / "trace").read_text()
            if os.environ.get("CORRAL_TRACE_DUMP"):
                Path(os.environ["CORRAL_TRACE_DUMP"]).write_text(text)
    finally:
        keeper.close()
        if runtime is not None:
            runtime.lxcfs.stop(force=True)
        shutil.rmtree(scratch, ignore_errors=True)

    run: list[tuple[float, int, str]] = []
    for line in text.splitlines():
        m = LINE_RE.match(line)
        if m is None:
            continue
        if m["body"].startswith("tracing_mark_write: done"):
            found = steps_of(run, {pid, *forker})
            if found is not None:
                results.append(found)
            run = []
            continue
        run.append((float(m["ts"]), int(m["pid"]), m["body"]))
    if not results:
        raise SystemExit("no complete start in the trace (is the keeper traced?)")
    kind = "userns" if args.userns else "root-mapped"
    print(f"{len(results)} starts of /bin/true ({kind}), through the keeper; medians:")
    for name in (*STEPS, "total", "tini to cmd"):
        ms = statistics.median(r[name] for r in results) * 1e3
        print(f"  {name:12} {ms:7.2f} ms")
    print(f"  mount calls  {statistics.median(r['mount calls'] for r in results):7.0f}")
    print(f"start_trace_total_ms: {statistics.median(r['total'] for r in results) * 1e3:.2f}")


if __name__ == "__main__":
    main()
