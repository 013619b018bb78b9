"""Event latency, bus throughput and idle cost of the supervisor.

Usage (as root)::

    .venv/bin/python benchmarks/event_stream.py [--kills 200] [--ooms 40] [--idle-seconds 60]

What is measured, each against a real kernel and a real ``corral up``:

exit-to-event
    ``corral up`` runs 100 idle sandboxes plus one victim per kill. The
    benchmark SIGKILLs a victim's init (timestamp before the kill) and
    reads the ``exited`` event as an outside consumer on the event socket
    (timestamp on receipt); one kill at a time.
oom-to-event
    Hogs that outgrow a 32M limit, started 0.5 s apart. The kill time is
    the kernel's own: the ``oom:mark_victim`` tracepoint, read from a
    private tracefs instance with the ``mono`` trace clock (tracefs is
    mounted for the run if it was not, and everything is undone after).
    The event time is the receipt of the ``oom_kill`` event on the socket.
bus throughput
    In-process: events published (in bursts of 64, yielding between) until
    the last one is received, with 1 and with 10 subscribers.
socket throughput
    Events delivered to one consumer in another process (``iter_events``).
idle CPU
    CPU time (user+system, supervisor and keeper) of ``corral up`` with 100
    idle sandboxes, over --idle-seconds, as a percentage of one CPU.

CLOCK_MONOTONIC is system-wide, so timestamps from different processes
compare. The last five lines are exactly the ``name: value`` results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio
import trio.testing
from _corral import corral_up, scratch_dir
from _trace import oom_tracepoint, read_victims

import events

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def process_cpu(pid: int) -> float:
    """User+system seconds of a process and its children that it reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / CLK_TCK


def keeper_pid(supervisor: int) -> int | None:
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        if "supervisor._runtime._linux._keeper" in Path(f"/proc/{child}/cmdline").read_text():
            return int(child)
    return None


# -- exit and OOM latency ------------------------------------------------------


async def latencies(
    sock: str, kills: int, ooms: int, total: int
) -> tuple[list[float], list[float]]:
    exit_ms: list[float] = []
    oom_ms: list[float] = []
    started: dict[str, int] = {}
    exited_at: dict[str, float] = {}
    oom_at: dict[str, float] = {}
    changed = trio.Event()
    hog_killed_at: dict[str, float] = {}

    victims: dict[int, float] = {}  # pid -> kernel's mark_victim time

    def notify() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    async def watch_hog(name: str, init: int) -> None:
        # The hog's shell is tini's child; the OOM killer picks it.
        with trio.fail_after(10):
            while True:
                kids = Path(f"/proc/{init}/task/{init}/children").read_text().split()
                if kids:
                    break
                await trio.sleep(0.001)
        pid = int(kids[0])
        while pid not in victims:
            await changed.wait()
        hog_killed_at[name] = victims[pid]

    with oom_tracepoint() as pipe:
        async with trio.open_nursery() as nursery, events.subscribe(sock, since=1) as stream:
            nursery.start_soon(read_victims, pipe, victims, notify)

            async def read() -> None:
                async for ev in stream:
                    now = time.monotonic()
                    if isinstance(ev, events.Started):
                        started[ev.sandbox] = ev.pid
                        if ev.sandbox.startswith("hog-"):
                            nursery.start_soon(watch_hog, ev.sandbox, ev.pid)
                    elif isinstance(ev, events.Exited):
                        exited_at[ev.sandbox] = now
                    elif isinstance(ev, events.OomKill):
                        oom_at[ev.sandbox] = now
                    notify()

            nursery.start_soon(read)
            with trio.fail_after(120):
                while len(started) < total:
                    await changed.wait()
            print(
                f"  {total} sandboxes running; killing {kills} victims one at a time",
                file=sys.stderr,
            )
            for i in range(kills):
                name = f"victim-{i}"
                t0 = time.monotonic()
                os.kill(started[name], signal.SIGKILL)
                with trio.fail_after(10):
                    while name not in exited_at:
                        await changed.wait()
                exit_ms.append((exited_at[name] - t0) * 1e3)
            print(f"  waiting for {ooms} OOM kills (hogs start 0.5 s apart)", file=sys.stderr)
            with trio.fail_after(ooms * 0.5 + 60):
                while len(oom_at) < ooms or len(hog_killed_at) < ooms:
                    await changed.wait()
            for name, t_evt in oom_at.items():
                oom_ms.append((t_evt - hog_killed_at[name]) * 1e3)
            nursery.cancel_scope.cancel()
    return exit_ms, oom_ms


LATENCY_FLEET = """
[supervisor]
grace_period = "1s"

[[sandbox]]
name = "idle"
replicas = 100
command = ["sleep", "1000000"]

[[sandbox]]
name = "victim"
replicas = {kills}
command = ["sleep", "1000000"]

[[sandbox]]
name = "hog"
replicas = {ooms}
memory = "32M"
# Staggered, so that each OOM kill is measured on its own.
command = '''i=${{HOSTNAME##*-}}; sleep $((3 + i / 2)).$((i % 2 * 5))
x=0123456789abcdef; while :; do x=$x$x; done'''
"""


# -- throughput ------------------------------------------------------------------


async def bus_throughput(n: int, subscribers: int) -> float:
    bus = events.Bus()
    done = trio.Event()
    remaining = subscribers

    async def consume(sub: events.Subscription) -> None:
        nonlocal remaining
        count = 0
        async for _ in sub:
            count += 1
            if count == n:
                break
        remaining -= 1
        if remaining == 0:
            done.set()

    async with trio.open_nursery() as nursery:
        for _ in range(subscribers):
            nursery.start_soon(consume, bus.subscribe(maxsize=4096))
        await trio.testing.wait_all_tasks_blocked()
        t0 = time.perf_counter()
        for i in range(n):
            bus.publish(
                events.Exited(sandbox="s-0", status=0, exit_code=0, signal=None, oom_killed=False)
            )
            if i % 64 == 63:
                await trio.lowlevel.checkpoint()
        await done.wait()
        dt = time.perf_counter() - t0
    return n / dt


CONSUMER = """
import sys, time, events
n = int(sys.argv[2]); count = 0
for ev in events.iter_events(sys.argv[1], kinds=["exited"]):
    count += 1
    if count == n:
        break
print(time.monotonic())
"""


async def socket_throughput(n: int) -> float:
    scratch = scratch_dir("corral-bench-sock-")
    try:
        journal = events.Journal(scratch / "journal")
        bus = events.Bus(journal)
        sock = str(scratch / "events.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(events.serve_events, bus, sock)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", CONSUMER, sock, str(n)], stdout=subprocess.PIPE
            )
            # Wait until the consumer has subscribed (it then gets everything).
            while not bus._subs:
                await trio.sleep(0.001)
            t0 = time.monotonic()
            for i in range(n):
                bus.publish(
                    events.Exited(
                        sandbox="s-0", status=0, exit_code=0, signal=None, oom_killed=False
                    )
                )
                if i % 64 == 63:
                    await trio.lowlevel.checkpoint()
            assert proc.stdout is not None
            out = b""
            async for chunk in proc.stdout:
                out += chunk
            await proc.wait()
            t1 = float(out)
            bus.close()
        journal.close()
        return n / (t1 - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- main ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--ooms", type=int, default=40)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--throughput-runs", type=int, default=5, help="median of this many")
    args = parser.parse_args()

    # The median of the runs, not the best (issue 19): a best-of-N reports
    # the luckiest run, which no user gets more often than the others.
    print(f"bus throughput ({args.throughput_runs} runs each) ...", file=sys.stderr)
    runs = range(args.throughput_runs)
    bus1_runs = [trio.run(bus_throughput, args.events, 1) for _ in runs]
    bus10_runs = [trio.run(bus_throughput, args.events // 10, 10) for _ in runs]
    print("socket throughput ...", file=sys.stderr)
    sock_runs = [trio.run(socket_throughput, args.events) for _ in runs]
    bus1, bus10, sock_rate = (statistics.median(r) for r in (bus1_runs, bus10_runs, sock_runs))
    for name, values in (("bus, 1 subscriber", bus1_runs), ("bus, 10 subscribers", bus10_runs),
                         ("socket", sock_runs)):  # fmt: skip
        print(f"{name} events/s, each run: {', '.join(f'{v:,.0f}' for v in values)}")

    print(f"idle CPU: 100 sandboxes for {args.idle_seconds:.0f} s ...", file=sys.stderr)
    idle_fleet = '[[sandbox]]\nname = "idle"\nreplicas = 100\ncommand = ["sleep", "1000000"]\n'
    with corral_up(idle_fleet) as (proc, sock, _state):
        for n, _ in enumerate(events.iter_events(sock, kinds=["started"], since=1), 1):
            if n == 100:
                break
        keeper = keeper_pid(proc.pid)
        pids = [proc.pid] + ([keeper] if keeper else [])
        time.sleep(1)  # let the start-up burst (threads, journal flush) settle
        c0 = sum(process_cpu(p) for p in pids)
        t0 = time.monotonic()
        time.sleep(args.idle_seconds)
        c1 = sum(process_cpu(p) for p in pids)
        idle_pct = (c1 - c0) / (time.monotonic() - t0) * 100

    print("exit and OOM latency ...", file=sys.stderr)
    fleet = LATENCY_FLEET.format(kills=args.kills, ooms=args.ooms)
    with corral_up(fleet) as (_proc, sock, _state):
        exit_ms, oom_ms = trio.run(
            latencies, sock, args.kills, args.ooms, 100 + args.kills + args.ooms
        )

    print(
        f"exit-to-event ms (n={len(exit_ms)}): p50 {statistics.median(exit_ms):.2f}"
        f"  p90 {pct(exit_ms, 90):.2f}  p99 {pct(exit_ms, 99):.2f}  max {max(exit_ms):.2f}"
    )
    print(
        f"oom-to-event ms (n={len(oom_ms)}): p50 {statistics.median(oom_ms):.2f}"
        f"  p90 {pct(oom_ms, 90):.2f}  p99 {pct(oom_ms, 99):.2f}  max {max(oom_ms):.2f}"
    )
    print(f"bus events/s with 10 subscribers (each): {bus10:,.0f}")
    print(f"exit_to_event_p99_ms: {pct(exit_ms, 99):.2f}")
    print(f"oom_to_event_p99_ms: {pct(oom_ms, 99):.2f}")
    print(f"bus_events_per_s_1sub: {bus1:.0f}")
    print(f"socket_events_per_s: {sock_rate:.0f}")
    print(f"idle_cpu_percent_100: {idle_pct:.3f}")


if __name__ == "__main__":
    main()
