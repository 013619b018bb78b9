"""10,000 sandboxes under one supervisor: start, idle, ``ps``, events, a storm, stop.

Usage (as root; on a shared machine under the tests' lock)::

    .venv/bin/python benchmarks/scale.py [--count 10000] [--storm 1000] [--idle-seconds 20]

One real ``corral up`` in private state and run directories (a temporary
directory, removed at the end) runs a fleet of ``--count`` sandboxes
(entries ``s0``, ``s1`` ... of at most 1,000 replicas, a fleet entry's
most), each ``sleep 1000000`` on the busybox rootfs with the defaults (a
user namespace, lxcfs's view, the seccomp filter, memory and pids limits as
corral sets them by default) and the restart plugin's ``on-failure`` policy
with its default backoff (the first restart after 100 ms +/- 10 %). The
benchmark reads every event as an outside consumer on the event socket,
from seq 1, and measures:

start
    from the launch of ``corral up`` until the ``started`` of the last
    sandbox is received: ``start_per_s`` is the count over that time (the
    supervisor's own start-up included);
resident memory
    VmRSS of the supervisor and its helpers (the spawn keeper and corral's
    lxcfs) once all run;
idle CPU
    user+system time of the same processes over ``--idle-seconds`` while
    nothing happens, as a percentage of one CPU;
``corral ps``
    the command as typed (interpreter start included), median of 5, each
    listing every sandbox;
events
    one sandbox at a time (``--probes`` of them, distinct, so that no
    backoff grows), the benchmark SIGKILLs the sandbox's command (tini's
    child) and times the ``exited`` event's receipt, then the next
    generation's ``started`` (the default 100 ms delay included);
restart storm
    the commands of ``--storm`` sandboxes are SIGKILLed at once; the time
    from the first kill until every one of them has been received
    ``started`` again. Each must have exactly one ``exited``, one
    ``restarting`` and one new ``started``; none ``failed``;
stop
    SIGTERM to the supervisor until its exit (0), every sandbox stopped.

No event may be lost: the consumer must receive every seq from 1 to the
supervisor's last event with no ``gap``. At the end nothing may be left: no
init alive, no ``corral-*`` cgroup of the fleet, no record.

Kernel limits that a fleet of this size meets are printed first, with what
the run needs (PIDs: two per sandbox). The supervisor holds about five
descriptors per sandbox: where the hard open-file limit cannot hold
``--count`` (it cannot be raised without ``CAP_SYS_RESOURCE``), the run is
cut to the largest fleet it can hold, and says so (``--force`` tries all).

The last lines are exactly ``sandboxes: N``, ``start_per_s: X``,
``rss_mb: X`` (the supervisor and its helpers), ``idle_cpu_percent: X``,
``ps_ms: X``, ``stop_all_s: X``, ``storm_1000_s: X`` (the storm's time,
whatever ``--storm`` is).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import trio
from _corral import scratch_dir
from takeover import fd_census, our_cgroups, status_kb

import events
from supervisor._runtime._linux._syscalls import set_child_subreaper

CLK_TCK = os.sysconf("SC_CLK_TCK")

# ``--profile FILE``: the supervisor's trio thread under cProfile, from its
# start until every sandbox has started (the benchmark sends SIGUSR1 then).
# `main`, not `entry`, which would leave with os._exit before the dump.
PROFILED = """
import cProfile, signal, sys
from supervisor._cli import main
prof = cProfile.Profile()
def done(*_):
    prof.disable()
    prof.dump_stats(sys.argv[1])
signal.signal(signal.SIGUSR1, done)
sys.exit(prof.runcall(main, sys.argv[2:]))
"""
ENTRY = 1000  # a fleet entry's most replicas
FDS_MEASURED = {"v1": 6, "v2": 7}
"""Descriptors the supervisor holds per sandbox in a large fleet, measured,
plus one: 5 on cgroup v1 (two pipes, a pidfd, an eventfd, a sysinfo
listener; the namespaces and the logs of only some), 6 on v2 (its OOM
watch is an epoll set and memory.events)."""

FLEET_HEAD = """
[supervisor]
grace_period = "5s"

[defaults.plugins.restart]
policy = "on-failure"
"""

ENTRY_TEXT = """
[[sandbox]]
name = "{name}"
replicas = {count}
command = ["sleep", "1000000"]
"""


def fleet_text(prefix: str, count: int) -> tuple[str, list[str]]:
    """The fleet file, and every instance's sandbox name in order."""
    parts, names = [FLEET_HEAD], []
    for i in range(math.ceil(count / ENTRY)):
        n = min(ENTRY, count - i * ENTRY)
        entry = f"{prefix}{i}"
        parts.append(ENTRY_TEXT.format(name=entry, count=n))
        names += [f"{entry}-{j}" for j in range(n)]
    return "".join(parts), names


def read_int(path: str) -> int:
    return int(Path(path).read_text().split()[0])


def limits(count: int) -> list[str]:
    """The kernel limits a fleet of *count* meets, one line each: what is
    set, what the run needs."""
    pids_now = len([d for d in os.listdir("/proc") if d.isdigit()])
    lines = [
        f"kernel.pid_max {read_int('/proc/sys/kernel/pid_max')}:"
        f" {2 * count} PIDs for the sandboxes (tini and sleep), {pids_now} in use now",
        f"kernel.threads-max {read_int('/proc/sys/kernel/threads-max')}",
        f"user.max_user_namespaces {read_int('/proc/sys/user/max_user_namespaces')},"
        f" user.max_net_namespaces {read_int('/proc/sys/user/max_net_namespaces')},"
        f" user.max_mnt_namespaces {read_int('/proc/sys/user/max_mnt_namespaces')}: {count} each",
        f"fs.inotify.max_user_instances {read_int('/proc/sys/fs/inotify/max_user_instances')}",
        f"open files: hard limit {os.sysconf('SC_OPEN_MAX')} here"
        " (corral up raises its soft limit to its hard one)",
    ]
    return lines


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def helpers(run_dir: Path) -> dict[str, int]:
    """The supervisor's helpers by role, from their files in the run
    directory: the spawn keeper (``keeper.lock``), corral's lxcfs (its pid
    file). Neither is the supervisor's child: both outlive it by design."""
    found = {}
    for role, path in (("keeper", "keeper.lock"), ("lxcfs", "lxcfs/lxcfs.pid")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[role] = int((run_dir / path).read_text().split()[0])
    return found


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


@dataclass
class Consumer:
    """Every event received on the socket, and what the benchmark waits on."""

    received: list[events.Event] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    """time.monotonic() of each receipt."""
    started: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    """sandbox -> (generation, pid, receipt) of its latest ``started``."""
    exited: dict[str, float] = field(default_factory=dict)
    """sandbox -> receipt of its latest ``exited``."""
    by_kind: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failed: list[events.StartFailed] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    stopped: bool = False

    async def run(self, sock: str) -> None:
        async with events.subscribe(sock, since=1) as stream:
            async for ev in stream:
                now = time.monotonic()
                self.received.append(ev)
                self.at.append(now)
                self.by_kind[ev.kind][ev.sandbox] += 1
                if isinstance(ev, events.Started):
                    self.started[ev.sandbox] = (ev.generation, ev.pid, now)
                elif isinstance(ev, events.Exited):
                    self.exited[ev.sandbox] = now
                elif isinstance(ev, events.StartFailed):
                    self.failed.append(ev)
                elif isinstance(ev, events.SupervisorStopped):
                    self.stopped = True
                self.changed.set()
                self.changed = trio.Event()

    async def until(self, done: object, timeout: float, what: str) -> None:
        """Wait until *done()*; a ``start_failed`` or a timeout ends the run."""
        assert callable(done)
        with trio.move_on_after(timeout) as scope:
            while not done():
                if failed := self.failed:
                    raise SystemExit(
                        f"{len(failed)} start_failed while waiting for {what}, the first:"
                        f" {failed[0].sandbox}: {failed[0].error}"
                    )
                await self.changed.wait()
        if scope.cancelled_caught:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")

    def lost(self) -> list[str]:
        """Seqs not received, gaps received: what a consumer lost."""
        problems = []
        seqs = [e.seq for e in self.received if not isinstance(e, events.Gap)]
        gaps = [e for e in self.received if isinstance(e, events.Gap)]
        if gaps:
            problems.append(f"{len(gaps)} gap events, the first {gaps[0]}")
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            problems.append(
                f"seqs not contiguous: {len(missing)} missing, e.g. {missing[:5]}"
                f"; {len(seqs) - len(set(seqs))} duplicates"
            )
        return problems


@dataclass
class Result:
    count: int = 0
    start_s: float = 0.0
    to_supervisor_started_s: float = 0.0
    rss_kb: dict[str, int] = field(default_factory=dict)
    fds: dict[str, Counter[str]] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    ps_ms: list[float] = field(default_factory=list)
    exit_ms: list[float] = field(default_factory=list)
    restart_ms: list[float] = field(default_factory=list)
    storm: int = 0
    storm_s: float = 0.0
    storm_first_s: float = 0.0
    stop_s: float = 0.0
    events: int = 0
    host_mem_used_kb: int = 0


def meminfo_used_kb() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        info[key] = int(value.split()[0])
    return info["MemTotal"] - info["MemAvailable"]


def command_pid(init: int) -> int:
    """The sandbox's command: tini's only child."""
    kids = children(init)
    if len(kids) != 1:
        raise SystemExit(f"init {init}: expected one child (the command), found {kids}")
    return kids[0]


async def bench(args: argparse.Namespace, scratch: Path, res: Result) -> None:
    prefix = "sc" + secrets.token_hex(2)
    text, names = fleet_text(prefix, args.count)
    (scratch / "fleet.toml").write_text(text)
    env = {**os.environ, "CORRAL_STATE_DIR": str(scratch / "state"),
           "CORRAL_RUN_DIR": str(scratch / "run")}  # fmt: skip
    sock = str(scratch / "run" / "events.sock")
    res.count = args.count
    mem_before = meminfo_used_kb()
    consumer = Consumer()

    head = ["-c", PROFILED, os.path.abspath(args.profile)] if args.profile else ["-m", "supervisor"]
    print(f"starting {args.count} sandboxes ...", file=sys.stderr)
    with open(scratch / "up.err", "wb") as err:
        t_launch = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, *head, "up", str(scratch / "fleet.toml")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                while not os.path.exists(sock):
                    if proc.poll() is not None:
                        raise SystemExit(f"corral up exited {proc.returncode}; see {err.name}")
                    await trio.sleep(0.01)
            nursery.start_soon(consumer.run, sock)

            def all_started() -> bool:
                return len(consumer.started) == int(args.count)

            await consumer.until(all_started, args.count / 20 + 60, "every sandbox started")
            res.start_s = max(t for _, _, t in consumer.started.values()) - t_launch
            first = next(e for e in consumer.received if e.kind == "supervisor_started")
            res.to_supervisor_started_s = first.mono - t_launch
            if consumer.by_kind["start_failed"]:
                raise SystemExit(f"start_failed: {dict(consumer.by_kind['start_failed'])}")
            print(f"  all started in {res.start_s:.2f} s", file=sys.stderr)
            if args.profile:
                proc.send_signal(signal.SIGUSR1)

            roles = {"supervisor": proc.pid, **helpers(scratch / "run")}
            for role, pid in roles.items():
                res.rss_kb[role] = status_kb(pid, "VmRSS")
                res.fds[role] = fd_census(pid)
            res.host_mem_used_kb = meminfo_used_kb() - mem_before

            # Idle: nothing happens, the benchmark included (it sleeps).
            before = {r: cpu_seconds(p) for r, p in roles.items()}
            t0 = time.monotonic()
            await trio.sleep(args.idle_seconds)
            wall = time.monotonic() - t0
            res.idle_cpu = {r: (cpu_seconds(p) - before[r]) / wall * 100 for r, p in roles.items()}

            for _ in range(5):
                t0 = time.monotonic()
                out = await trio.run_process(
                    [sys.executable, "-m", "supervisor", "ps"], env=env, capture_stdout=True
                )
                res.ps_ms.append((time.monotonic() - t0) * 1e3)
                rows = out.stdout.decode().splitlines()
                if len(rows) != args.count + 1:
                    raise SystemExit(f"corral ps listed {len(rows) - 1} of {args.count}")

            # Events, one kill at a time, on the last entry's instances.
            probes = names[-args.probes :]
            for name in probes:
                gen, init, _ = consumer.started[name]
                t0 = time.monotonic()
                os.kill(command_pid(init), signal.SIGKILL)
                await consumer.until(
                    lambda n=name, t=t0: consumer.exited.get(n, 0) > t, 30, f"{name} exited"
                )
                res.exit_ms.append((consumer.exited[name] - t0) * 1e3)
                await consumer.until(
                    lambda n=name, g=gen: consumer.started[n][0] > g, 30, f"{name} restarted"
                )
                res.restart_ms.append((consumer.started[name][2] - t0) * 1e3)

            # The storm: the first entry's instances, all at once.
            victims = names[: args.storm]
            before_gen = {n: consumer.started[n][0] for n in victims}
            pids = [command_pid(consumer.started[n][1]) for n in victims]
            print(f"  storm: killing {len(pids)} commands", file=sys.stderr)
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            res.storm_first_s = time.monotonic() - t0

            def storm_done() -> bool:
                return all(consumer.started[n][0] > before_gen[n] for n in victims)

            await consumer.until(storm_done, 120, f"{len(victims)} restarts")
            res.storm = len(victims)
            res.storm_s = max(consumer.started[n][2] for n in victims) - t0
            bad = [
                n
                for n in victims
                if consumer.by_kind["exited"][n] != 1
                or consumer.by_kind["restarting"][n] != 1
                or consumer.by_kind["started"][n] != 2
            ]
            if bad or consumer.by_kind["failed"]:
                raise SystemExit(
                    f"storm: {len(bad)} sandboxes without exactly one exited, restarting and"
                    f" started (e.g. {bad[:3]}); failed: {dict(consumer.by_kind['failed'])}"
                )
            print(f"  storm done in {res.storm_s:.2f} s; stopping", file=sys.stderr)

            inits = [pid for _, pid, _ in consumer.started.values()]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(args.count / 100 + 120):
                while proc.poll() is None:
                    await trio.sleep(0.05)
            res.stop_s = time.monotonic() - t0
            if proc.returncode != 0:
                raise SystemExit(f"corral up exited {proc.returncode}; see {err.name}")
            await consumer.until(lambda: consumer.stopped, 30, "supervisor_stopped")
            nursery.cancel_scope.cancel()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()

    res.events = len(consumer.received)
    lost = consumer.lost()
    if lost:
        raise SystemExit("events lost: " + "; ".join(lost))
    left = [p for p in inits if Path(f"/proc/{p}").exists()]
    cgroups = our_cgroups(prefix)
    records = scratch / "run" / "sandboxes"
    kept = os.listdir(records) if records.exists() else []
    if left or cgroups or kept:
        raise SystemExit(
            f"left behind: {len(left)} inits, {len(cgroups)} cgroups, {len(kept)} records"
        )


def report(res: Result) -> None:
    n = res.count
    mib = 1 / 1024
    print(f"{n} sandboxes: launch -> all started {res.start_s:.2f} s"
          f" (launch -> supervisor_started {res.to_supervisor_started_s:.2f} s)")  # fmt: skip
    for role, kb in res.rss_kb.items():
        print(
            f"  {role:10} VmRSS {kb * mib:7.1f} MiB, idle CPU {res.idle_cpu[role]:.3f} %,"
            f" {res.fds[role].total()} fds ("
            + ", ".join(f"{k} {v}" for k, v in res.fds[role].most_common())
            + ")"
        )
    print(f"  host memory in use grew by {res.host_mem_used_kb * mib / 1024:.2f} GiB"
          f" ({res.host_mem_used_kb / n:.0f} KiB per sandbox)")  # fmt: skip
    print(f"corral ps: median {statistics.median(res.ps_ms):.1f} ms,"
          f" all {', '.join(f'{x:.0f}' for x in res.ps_ms)} ms")  # fmt: skip
    for what, xs in (("kill -> exited received", res.exit_ms),
                     ("kill -> restarted received", res.restart_ms)):  # fmt: skip
        print(f"{what}: p50 {pct(xs, 50):.2f} ms, p99 {pct(xs, 99):.2f} ms, n={len(xs)}")
    print(f"storm of {res.storm}: all killed in {res.storm_first_s * 1e3:.0f} ms,"
          f" all restarted {res.storm_s:.2f} s after the first kill")  # fmt: skip
    print(f"events received: {res.events}, none lost")
    print(f"sandboxes: {n}")
    print(f"start_per_s: {n / res.start_s:.1f}")
    print(f"rss_mb: {sum(res.rss_kb.values()) / 1024:.1f}")
    print(f"idle_cpu_percent: {sum(res.idle_cpu.values()):.3f}")
    print(f"ps_ms: {statistics.median(res.ps_ms):.1f}")
    print(f"stop_all_s: {res.stop_s:.2f}")
    print(f"storm_1000_s: {res.storm_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10000, help="sandboxes")
    parser.add_argument("--storm", type=int, default=1000, help="sandboxes killed at once")
    parser.add_argument("--probes", type=int, default=50, help="single kills timed")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument(
        "--force", action="store_true", help="run --count even beyond the open-file limit"
    )
    parser.add_argument("--profile", metavar="FILE", help="cProfile the supervisor's start")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count: at least 1")
    if not 1 <= args.storm <= args.count or args.probes < 1:
        parser.error("--storm: from 1 to --count; --probes: at least 1")
    if args.storm + args.probes > args.count:
        parser.error("--storm plus --probes: at most --count (distinct sandboxes)")

    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    each = FDS_MEASURED["v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"]
    room = (hard - 1024) // each if hard != resource.RLIM_INFINITY else args.count
    if args.count > room and not args.force:
        # Raising it needs CAP_SYS_RESOURCE, which these machines' root lacks.
        print(
            f"open files: the hard limit {hard} allows about {room} sandboxes"
            f" ({each} descriptors each in the supervisor); running {room}"
            f" of {args.count} (--force tries all)"
        )
        args.count = room
        args.storm = min(args.storm, room - args.probes)
    for line in limits(args.count):
        print(line)
    set_child_subreaper()  # the keeper is ours to reap if the supervisor dies
    scratch = scratch_dir("corral-bench-scale-")
    res = Result()
    ok = False
    try:
        try:
            trio.run(bench, args, scratch, res)
        except BaseExceptionGroup as group:
            # A SystemExit from a task: its line, not a nursery's traceback.
            sub = group.subgroup(SystemExit)
            if sub is None:
                raise
            first: BaseException = sub
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        ok = True
    finally:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        if args.keep or not ok:
            print(f"scratch directory kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report(res)


if __name__ == "__main__":
    main()
