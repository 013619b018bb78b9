"""The sandbox's own view (docs/view.md): what it adds to a start, and what
reading lxcfs's /proc/meminfo costs against the kernel's.

Start: the full lifecycle of a ``/bin/true`` sandbox (create, start, wait,
delete; memory 64M, pids 64, CPU 0.5, the library path through the keeper,
as ``benchmarks/start.py``), in four variants alternating round by round
so that noise hits each alike:

``view``      the default: lxcfs's eight files and the cgroup view mounted,
              ``sysinfo`` trapped and answered by the keeper;
``nosysinfo`` the same without the ``sysinfo`` filter (the runtime's
              switch, off only here);
``cgroup``    the cgroup view only (``lxcfs = false``: no lxcfs, no filter);
``bare``      neither (the runtime's cgroup view switched off).

corral's own lxcfs runs in the benchmark's run directory (started by the
warm-up, stopped at the end). The start overhead is the median, over the
rounds, of a round's ``view`` less its ``bare`` (and the difference of the
medians, for comparison).

Read: a static C program (compiled here with gcc) opens, reads whole and
closes ``/proc/meminfo`` N times and prints the mean time per read: on the
host (the kernel's file), in a sandbox without lxcfs (the kernel's again,
through its own procfs) and in a sandbox with the view (a FUSE round trip
to lxcfs, which computes the file from the sandbox's cgroup).

sysinfo: a static C program calls ``sysinfo`` N times and prints the mean
time per call (equal work everywhere): on the host, in a sandbox without
the view (the kernel answers) and in one with it (the keeper answers,
through seccomp user notification).

Recovery: with M sandboxes running, lxcfs is SIGKILLed and the time until
a new one runs and every sandbox's view is re-attached is measured (the
supervisor's watch does the same when the pidfd wakes it).

Usage (as root)::

    .venv/bin/python benchmarks/view.py [--runs 100] [--reads 2000]

The last line is exactly ``view_start_overhead_ms: X``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator

from _corral import scratch_dir

from supervisor import Keeper, Limits, Runtime, SandboxSpec
from supervisor._runtime._mounts import Mount, parse_volume

LIMITS = Limits(memory=64 << 20, pids=64, cpus=0.5)

READER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = atoi(argv[2]);
    char buf[16384];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) { perror(argv[1]); return 1; }
        while (read(fd, buf, sizeof buf) > 0) {}
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.0f\n", ns / n);
    return 0;
}
"""


CALLER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/sysinfo.h>
#include <time.h>

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    struct sysinfo s;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        if (sysinfo(&s) != 0) { perror("sysinfo"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.0f %lu\n", ns / n, s.totalram * s.mem_unit);
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="samples per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reads", type=int, default=2000, help="reads per read sample")
    parser.add_argument("--read-runs", type=int, default=9, help="read samples per place")
    parser.add_argument("--calls", type=int, default=1000, help="sysinfo calls per sample")
    parser.add_argument(
        "--sandboxes", type=int, default=20, help="running sandboxes when lxcfs is killed"
    )
    parser.add_argument("--kills", type=int, default=5, help="lxcfs kills to recover from")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed for the reader (make setup-bench installs it)")

    scratch = scratch_dir("corral-bench-view-")
    scratch.chmod(0o711)
    state, run, tools = scratch / "state", scratch / "run", scratch / "tools"
    tools.mkdir()
    for name, source in (("reader", READER), ("caller", CALLER)):
        subprocess.run(
            ["gcc", "-O2", "-static", "-o", str(tools / name), "-x", "c", "-"],
            input=source.encode(),
            check=True,
        )
    keeper = Keeper()
    runtime = Runtime(state_dir=state, run_dir=run, spawner=keeper.spawn, lxcfs="auto")
    try:
        null = os.open("/dev/null", os.O_RDWR)
        counter = iter(range(10**9))

        def lifecycle(lxcfs: bool, cgroup_view: bool, sysinfo: bool) -> tuple[float, float]:
            runtime._cgroup_view = cgroup_view
            runtime._sysinfo_view = sysinfo
            spec = SandboxSpec(f"v{next(counter)}", ("/bin/true",), limits=LIMITS, lxcfs=lxcfs)
            t0 = time.perf_counter()
            sb = runtime.create(spec, stdio=(null, null, null))
            t1 = time.perf_counter()
            sb.wait()
            sb.destroy()
            return time.perf_counter() - t0, t1 - t0

        variants = {
            "view": (True, True, True),
            "nosysinfo": (True, True, False),
            "cgroup": (False, True, False),
            "bare": (False, False, False),
        }
        whole: dict[str, list[float]] = {k: [] for k in variants}
        create: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(args.warmup + args.runs):
            for name, (lxcfs, cgroup_view, sysinfo) in variants.items():
                total, made = lifecycle(lxcfs, cgroup_view, sysinfo)
                if i >= args.warmup:
                    whole[name].append(total)
                    create[name].append(made)
        runtime._cgroup_view = runtime._sysinfo_view = True
        if runtime.lxcfs.pid == 0:
            raise SystemExit("lxcfs did not start: no view to measure (is it installed?)")

        volume = parse_volume(f"{tools}:/tools:ro")
        reads: dict[str, list[float]] = {"host": [], "sandbox, kernel": [], "sandbox, lxcfs": []}
        for _ in range(args.read_runs):
            host = subprocess.run(
                [str(tools / "reader"), "/proc/meminfo", str(args.reads)],
                capture_output=True,
                text=True,
                check=True,
            )
            reads["host"].append(float(host.stdout))
            for name, lxcfs in (("sandbox, kernel", False), ("sandbox, lxcfs", True)):
                reads[name].append(_read_in_sandbox(runtime, volume, lxcfs, args.reads, counter))
        calls: dict[str, list[float]] = {"host": [], "sandbox, kernel": [], "sandbox, corral": []}
        for _ in range(args.read_runs):
            host = subprocess.run(
                [str(tools / "caller"), str(args.calls)], capture_output=True, text=True, check=True
            )
            calls["host"].append(float(host.stdout.split()[0]))
            for name, lxcfs in (("sandbox, kernel", False), ("sandbox, corral", True)):
                argv = ("/tools/caller", str(args.calls))
                out = _run_in_sandbox(runtime, volume, lxcfs, argv, counter)
                calls[name].append(float(out.split()[0]))
                if lxcfs and int(out.split()[1]) != LIMITS.memory:
                    raise SystemExit(f"sysinfo was not answered for the sandbox: {out!r}")
        recoveries = _recoveries(runtime, args.sandboxes, args.kills, counter)
    finally:
        runtime.lxcfs.stop(force=True)
        keeper.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"start, full lifecycle   (n={args.runs} each; create = until the command's exec)")
    print(f"{'variant':9} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'create ms':>10}")
    med = {}
    raw = {name: list(xs) for name, xs in whole.items()}
    for name, xs in whole.items():
        xs.sort()
        med[name] = statistics.median(xs)
        p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        made = statistics.median(create[name])
        ms = [med[name] * 1e3, p90 * 1e3, xs[0] * 1e3, made * 1e3]
        print(f"{name:9} {ms[0]:10.2f} {ms[1]:8.2f} {ms[2]:8.2f} {ms[3]:10.2f}")
    # The variants ran side by side, round by round: the median of each
    # round's difference is steadier than a difference of medians when the
    # machine's load drifts (both are shown).
    paired = {
        "lxcfs": statistics.median(
            a - b for a, b in zip(raw["nosysinfo"], raw["cgroup"], strict=True)
        ),
        "sysinfo": statistics.median(
            a - b for a, b in zip(raw["view"], raw["nosysinfo"], strict=True)
        ),
        "cgroup view": statistics.median(
            a - b for a, b in zip(raw["cgroup"], raw["bare"], strict=True)
        ),
        "both": statistics.median(a - b for a, b in zip(raw["view"], raw["bare"], strict=True)),
    }
    for name, value in paired.items():
        print(f"added by {name + ':':13} {value * 1e3:6.2f} ms per start (median of paired rounds)")
    print(f"lxcfs_start_overhead_ms: {(med['nosysinfo'] - med['cgroup']) * 1e3:.2f}")
    print(f"sysinfo_start_overhead_ms: {(med['view'] - med['nosysinfo']) * 1e3:.2f}")
    print(f"cgroup_view_start_overhead_ms: {(med['cgroup'] - med['bare']) * 1e3:.2f}")
    print(f"view_start_ratio: {med['view'] / med['bare']:.3f}")
    print()
    print(f"reading /proc/meminfo whole, {args.reads} times per sample (n={args.read_runs})")
    rmed = {name: statistics.median(xs) for name, xs in reads.items()}
    for name, value in rmed.items():
        print(f"{name:16} {value / 1e3:8.1f} us per read")
    print(f"meminfo_read_ratio_lxcfs_vs_host: {rmed['sandbox, lxcfs'] / rmed['host']:.1f}")
    print()
    print(f"sysinfo(2), {args.calls} calls per sample (n={args.read_runs})")
    cmed = {name: statistics.median(xs) for name, xs in calls.items()}
    for name, value in cmed.items():
        print(f"{name:16} {value / 1e3:8.2f} us per call")
    print(f"sysinfo_call_ratio_sandbox_vs_host: {cmed['sandbox, corral'] / cmed['host']:.1f}")
    print()
    print(
        f"lxcfs killed under {args.sandboxes} running sandboxes (n={args.kills}): a new one"
        " started and every view re-attached in"
    )
    print(
        f"  median {statistics.median(recoveries) * 1e3:.1f} ms, max {max(recoveries) * 1e3:.1f} ms"
    )
    print(f"view_start_overhead_ms: {paired['both'] * 1e3:.2f}")


def _recoveries(runtime: Runtime, count: int, kills: int, counter: Iterator[int]) -> list[float]:
    """Seconds from an lxcfs's death (SIGKILL) to every one of *count*
    running sandboxes' views answering again from a new one: what the
    supervisor's watch runs (:meth:`Lxcfs.recover`) when the pidfd wakes it."""
    import signal

    from supervisor._runtime._lxcfs import view_mounts

    out = []
    with contextlib.ExitStack() as stack:
        sandboxes = []
        null = stack.enter_context(open("/dev/null", "rb"))
        for _ in range(count):
            spec = SandboxSpec(f"k{next(counter)}", ("sh", "-c", "sleep 1000"), limits=LIMITS)
            sb = stack.enter_context(runtime.create(spec, stdio=(null.fileno(), 2, 2)))
            sandboxes.append(sb)
        for _ in range(kills):
            pidfd = runtime.lxcfs.watch_fd()
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                t0 = time.perf_counter()
                select.select([pidfd], [], [])
            finally:
                os.close(pidfd)
            if not runtime.lxcfs.recover():
                raise SystemExit("lxcfs was not started again")
            out.append(time.perf_counter() - t0)
            live = os.stat(runtime.lxcfs.mountpoint).st_dev
            want = {f"{os.major(live)}:{os.minor(live)}"}
            if any(set(view_mounts(sb.pid).values()) != want for sb in sandboxes):
                raise SystemExit("a sandbox's view was not re-attached")
    return out


def _read_in_sandbox(
    runtime: Runtime, volume: Mount, lxcfs: bool, reads: int, counter: Iterator[int]
) -> float:
    """Mean ns per read of /proc/meminfo in a new sandbox (with or without lxcfs)."""
    argv = ("/tools/reader", "/proc/meminfo", str(reads))
    return float(_run_in_sandbox(runtime, volume, lxcfs, argv, counter))


def _run_in_sandbox(
    runtime: Runtime, volume: Mount, view: bool, argv: tuple[str, ...], counter: Iterator[int]
) -> str:
    """The output of *argv* run in a new sandbox (with or without the view)."""
    spec = SandboxSpec(f"r{next(counter)}", argv, limits=LIMITS, mounts=(volume,), lxcfs=view)
    with open("/dev/null", "rb") as null, tempfile.TemporaryFile() as out:
        with runtime.create(spec, stdio=(null.fileno(), out.fileno(), 2)) as sb:
            if sb.wait().status != 0:
                raise SystemExit(f"{argv[0]} failed in the sandbox")
        out.seek(0)
        return out.read().decode()


if __name__ == "__main__":
    main()
