"""Pressure to event: how long after a sandbox's memory crosses its mark
a subscriber has the ``memory_pressure`` event (docs/fleet.md#memory-pressure).

A fleet of S sandboxes (``exec sleep``, memory 256M, ``memory_high``
48M) runs under an in-process supervisor. For each, a small static C
program (compiled here with gcc) joins the sandbox's cgroup and, on
request, touches anonymous memory: first to about 256 KiB below the mark
(all the cgroup uses counted), then 1 MiB past it, stamping
CLOCK_MONOTONIC just before the crossing touch. The
latency is the event's own ``mono`` stamp (taken as the supervisor
publishes it, the clock the C program used) less that stamp, plus what
the subscriber then adds (reported apart). Samples go round the sandboxes,
each sandbox at most once a second (a level repeated within a second under
the same limits is folded into the next second's event, by design).

The floor, side by side in the same run and alternating sample by sample:
the same crossing in a bare cgroup (no supervisor, no sandbox) made by
corral's cgroup backend, its pressure watch's descriptor waited on
directly in the same trio loop: the kernel's notification and a wake-up,
nothing else. Their difference is what the supervisor's watch, the event
and the bus add.

Usage (as root)::

    .venv/bin/python benchmarks/pressure.py [--samples 200] [--sandboxes 30]

The last line is exactly ``pressure_to_event_p99_ms: X``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import trio
from _corral import scratch_dir

import events
from supervisor import Supervisor
from supervisor._core._fleet import parse_fleet
from supervisor._runtime._limits import Limits
from supervisor._runtime._linux._cgroups import Cgroup
from supervisor._runtime._lxcfs import Lxcfs

M = 1 << 20
MARK = 48 * M
LIMIT = 256 * M
BELOW = 256 * 1024
"""Where a sample starts: about this far below the mark, counting what the
cgroup uses besides (the kernel charges a cgroup 32 pages at a time, so
its usage moves in 128 KiB steps): the stamp taken before the crossing
touch is some 64 pages (about 0.05 ms of page faults) early."""
ABOVE = M
"""Where it ends: this far past the mark, more than the kernel's batching
of charges (v1 checks thresholds every 128 page events per CPU)."""

TOUCHER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* Reads lines: "u BYTES" grows its anonymous memory to BYTES (printing
   the CLOCK_MONOTONIC ns at which the growth starts), "d" frees it all;
   answers each with a line. */
int main(void) {
    char line[64];
    char *mem = NULL;
    size_t have = 0, cap = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'u') {
            size_t want = strtoull(line + 2, NULL, 10);
            if (!mem) {
                cap = 1UL << 30;
                mem = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
                if (mem == MAP_FAILED) { perror("mmap"); return 1; }
            }
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            for (size_t i = have; i < want; i += 4096) mem[i] = 1;
            have = want > have ? want : have;
            printf("%lld\n", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
        } else if (line[0] == 'd') {
            if (mem) madvise(mem, cap, MADV_DONTNEED);
            have = 0;
            printf("ok\n");
        }
    }
    return 0;
}
"""


class Toucher:
    """The C program, in a cgroup, driven over a pipe (blocking: the
    benchmark runs it from worker threads)."""

    def __init__(self, binary: Path, cgroup: Cgroup) -> None:
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.cgroup = cgroup
        for path in cgroup.procs_files():
            Path(path).write_text(str(self.proc.pid))

    def approach(self) -> tuple[int, bool]:
        """Grow to just below the mark (at most 512 KiB under it, counting
        all the cgroup uses: the sandbox, the toucher's own pages and page
        tables, which move as it grows); return the size that crosses it
        by :data:`ABOVE`, and whether it got there without going over."""
        have, clean = 0, True
        for _ in range(20):
            gap = MARK - self.cgroup.stats().memory_current
            if 0 < gap <= 2 * BELOW:
                return have + gap + ABOVE, clean
            if gap <= 0:
                self.ask("d")
                have, clean = 0, False
            else:
                have += gap - BELOW
                self.ask(f"u {have}")
        raise SystemExit("the cgroup's usage would not settle below the mark")

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace, scratch: Path, binary: Path) -> dict[str, list[float]]:
    doc = {
        "supervisor": {"grace_period": "1s"},
        "sandbox": [
            {
                "name": "p",
                "replicas": args.sandboxes,
                "command": "exec sleep 100000",
                "memory": str(LIMIT),
                "memory_high": str(MARK),
            }
        ],
    }
    sup = Supervisor(
        parse_fleet(doc), state_dir=str(scratch / "state"), run_dir=str(scratch / "run")
    )
    out: dict[str, list[float]] = {"corral": [], "floor": [], "subscriber": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sup.bus is not None and sup.runtime is not None
        names = [f"p-{i}" for i in range(args.sandboxes)]
        with trio.fail_after(60):
            while not all(
                (inst := sup.instance(n)) is not None and inst.state == "running" for n in names
            ):
                await trio.sleep(0.01)
        touchers = {}
        for n in names:
            inst = sup.instance(n)
            sb = getattr(inst, "sandbox", None)  # (the core's Instance, not a plugin's view)
            assert sb is not None
            touchers[n] = Toucher(binary, sb.cgroup)
        layout = sup.runtime.cgroups.layout
        bare: Cgroup = sup.runtime.cgroups.create(
            "corral-bench-pressure-floor", Limits(memory=LIMIT, memory_high=MARK)
        )
        floor = Toucher(binary, bare)
        try:
            last: dict[str, float] = {}
            with sup.bus.subscribe(kinds=["memory_pressure"], maxsize=10000) as sub:
                for i in range(args.warmup + args.samples):
                    name = names[i % len(names)]
                    wait = last.get(name, 0) + 1.05 - trio.current_time()
                    if wait > 0:
                        await trio.sleep(wait)
                    ms, delivered = await _sample(touchers[name], name, sub)
                    last[name] = trio.current_time()
                    floor_ms = await _floor_sample(floor, bare, layout)
                    if i >= args.warmup:
                        out["corral"].append(ms)
                        out["subscriber"].append(delivered)
                        out["floor"].append(floor_ms)
        finally:
            for t in [*touchers.values(), floor]:
                t.close()
            bare.remove()
            sup.stop("benchmark done")
    return out


async def _sample(t: Toucher, name: str, sub: events.Subscription) -> tuple[float, float]:
    while True:
        above, clean = await trio.to_thread.run_sync(t.approach)
        if clean:
            break
        # It went over on the way: that event's level would fold the
        # crossing measured next into the end of its second.
        await trio.to_thread.run_sync(t.ask, "d")
        await trio.sleep(1.05)
    replies: list[str] = []
    seen: list[tuple[events.MemoryPressure, float]] = []
    done = trio.Event()

    def check() -> None:
        # (An event of an earlier crossing, still queued, is not this one.)
        if replies and any(e.mono >= int(replies[0]) / 1e9 for e, _ in seen):
            done.set()

    async def cross() -> None:
        replies.append(await trio.to_thread.run_sync(t.ask, f"u {above}"))
        check()

    async def listen() -> None:
        async for ev in sub:
            if isinstance(ev, events.MemoryPressure) and ev.sandbox == name:
                seen.append((ev, time.monotonic()))
                check()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cross)
        nursery.start_soon(listen)
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(t.ask, "d")
    t0 = int(replies[0]) / 1e9
    ev, got = next((e, g) for e, g in seen if e.mono >= t0)
    return (ev.mono - t0) * 1e3, (got - ev.mono) * 1e3


async def _floor_sample(t: Toucher, bare: Cgroup, layout: str) -> float:
    """The same crossing in a bare cgroup, its descriptor waited on directly."""
    above, _ = await trio.to_thread.run_sync(t.approach)  # (no watch open on the way)
    replies: list[str] = []

    async def cross() -> None:
        replies.append(await trio.to_thread.run_sync(t.ask, f"u {above}"))

    if layout == "v1":
        watch = bare.open_pressure_watch(Limits(memory=LIMIT, memory_high=MARK))
        fd = watch.fds[0]

        def crossed() -> bool:
            return bool(watch.read(fd))

        close = watch.close
    else:
        oom = bare.open_oom_watch()
        oom.read()
        fd, base = oom.fd, oom.pressure.get("high", 0)

        def crossed() -> bool:
            oom.read()
            return oom.pressure.get("high", 0) > base

        close = oom.close
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cross)
            while True:
                await trio.lowlevel.wait_readable(fd)
                seen = time.monotonic()
                if crossed():
                    break
    finally:
        close()
    await trio.to_thread.run_sync(t.ask, "d")
    return (seen - int(replies[0]) / 1e9) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sandboxes", type=int, default=30)
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed for the memory toucher (make setup-bench installs it)")
    scratch = scratch_dir("corral-bench-pressure-")
    scratch.chmod(0o711)
    binary = scratch / "toucher"
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(binary), "-x", "c", "-"],
        input=TOUCHER.encode(),
        check=True,
    )
    try:
        out = trio.run(bench, args, scratch, binary)
    finally:
        # The supervisor's lxcfs outlives it by design (the next supervisor
        # takes it back): this one's run directory is about to go.
        Lxcfs(str(scratch / "run"), "auto", say=lambda line: None).stop(force=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"memory over memory_high to the event, ms (n={args.samples}, {args.sandboxes} sandboxes)"
    )
    print(f"{'path':34} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    rows = {
        "corral (watch, event, bus)": out["corral"],
        "floor (kernel + a bare wake-up)": out["floor"],
        "subscriber delivery after publish": out["subscriber"],
    }
    for name, values in rows.items():
        cells = " ".join(f"{pct(values, p):7.3f}" for p in (50, 90, 99, 100))
        print(f"{name:34} {cells}")
    p99, floor99 = pct(out["corral"], 99), pct(out["floor"], 99)
    print(f"pressure_to_event_p99_ratio_vs_floor: {p99 / floor99:.2f}")
    print(f"pressure_to_event_p50_ms: {statistics.median(out['corral']):.3f}")
    print(f"pressure_to_event_p99_ms: {p99:.3f}")


if __name__ == "__main__":
    main()
