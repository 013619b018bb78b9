"""Crash-to-restart latency: corral against supervisord and circus, one run.

Usage (as root)::

    make setup-bench    # installs the peers (supervisord, circus); never done here
    .venv/bin/python benchmarks/restart.py [--samples 60] [--warmup 5] [--rounds 3] [--ooms 20]

crash loop
    The same static crasher (compiled here from 20 lines of C) under each
    supervisor: it appends ``start <ns>`` when it starts and ``death <ns>``
    right before it exits 1. Latency = a start minus the death before it,
    both CLOCK_MONOTONIC, written by the crashing program itself. corral
    runs it as a sandbox (its own rootfs holding only the crasher, all
    namespaces, a cgroup) under the restart plugin with ``policy =
    "always"`` and zero backoff; supervisord and circus run it as a plain
    process with their most aggressive settings (benchmarks/_restart_peers.py).
OOM kill to restarted
    Hogs that outgrow 32M, with ``on_oom = { grow = 2, max = "128M" }``:
    from the kernel's ``oom:mark_victim`` timestamp to the ``started`` event
    of the next generation (whose limit is already grown).

Equal work where it can be: every contender gives the same number of
samples after the same number of dropped warm-up restarts, in rounds that
alternate between them (each round begins with the next contender), and
p50/p90/p99 come from those samples; what still differs (a sandbox
against a plain process, the peers' polling) is printed beside the
ratios, with each contender's version. No polling anywhere in corral's
path: the exit wakes the supervisor through the init's pidfd. The last
five lines are exactly the ``name: value`` results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import trio
from _corral import corral_up, scratch_dir
from _restart_peers import (
    CIRCUS_CHECK_DELAY,
    DEFAULT_SITE,
    CircusPeer,
    DaemonPeer,
    SupervisordPeer,
    build_crasher,
    percentile_ms,
    read_latencies,
)
from _trace import oom_tracepoint, read_victims

import events
from supervisor import __version__

CRASH_FLEET = """
[[sandbox]]
name = "crash"
rootfs = "{rootfs}"
command = ["/crasher", "/dev/stdout", "{linger_us}"]

[sandbox.plugins.restart]
policy = "always"
delay = 0
jitter = 0
intensity = 1000000
standby = {standby}
"""

OOM_FLEET = """
[[sandbox]]
name = "hog"
replicas = {ooms}
memory = "32M"
# Staggered, so that each OOM kill is measured on its own; needs ~54M.
command = '''i=${{HOSTNAME##*-}}
sleep $((2 + i / 2)).$((i % 2 * 5))
x=0123456789abcdef; while [ ${{#x}} -lt 16777216 ]; do x=$x$x; done; x=$x${{x:0:6291456}}'''

[sandbox.plugins.restart]
policy = "on-failure"
delay = 0
jitter = 0
on_oom = {{ grow = 2, max = "128M" }}
"""


def corral_crash_loop(
    crasher: Path, scratch: Path, n: int, warmup: int, linger_us: int = 0, standby: bool = False
) -> list[float]:
    """*n* crash-to-restart latencies (s) of the crasher as a corral sandbox,
    after *warmup* restarts that are dropped (as the peers' are); each run
    of the crasher lives *linger_us*; with *standby* the restart plugin
    keeps the next generation made up to its exec."""
    rootfs = scratch / "crasher-root"
    rootfs.mkdir(parents=True)
    shutil.copy2(crasher, rootfs / "crasher")
    fleet = CRASH_FLEET.format(
        rootfs=rootfs, linger_us=linger_us, standby="true" if standby else "false"
    )
    with corral_up(fleet, scratch / "crash") as (_, sock, state):
        for ev in events.iter_events(sock, kinds=["started", "start_failed"], since=1):
            if isinstance(ev, events.StartFailed):
                raise SystemExit(f"corral: the crasher's sandbox did not start: {ev.error}")
            if ev.generation >= warmup + n:
                break
    logs = state / "logs"
    # The sandbox's output log has one record per line the crasher wrote;
    # take the lines back out to parse them like the peers' files.
    from supervisor._cli._output_reader import read_records

    plain = scratch / "crash" / "timestamps"
    plain.write_bytes(b"".join(r.content + b"\n" for r in read_records(str(logs / "crash-0.log"))))
    _, latencies = read_latencies(plain)
    return latencies[warmup : warmup + n]


STANDBY_FLEET = """
[[sandbox]]
name = "idle"
command = ["sleep", "1000000"]

[sandbox.plugins.restart]
policy = "always"
standby = true
"""


def standby_memory(scratch: Path) -> int:
    """Bytes the cgroup of a standby (``idle-0.1``) is charged while it waits."""
    from supervisor._runtime._linux._cgroups import open_cgroups

    with corral_up(STANDBY_FLEET, scratch) as (_, sock, _state):
        for _ in events.iter_events(sock, kinds=["started"], since=1):
            break
        cgroups = open_cgroups()
        deadline = time.monotonic() + 30
        while True:
            found = cgroups.existing("corral-idle-0.1")
            cg = found.get("corral-idle-0.1")
            # Waiting: its init alone, and no longer growing.
            if cg is not None and len(cg.pids()) == 1:
                first = cg.stats().memory_current
                time.sleep(0.2)
                if cg.stats().memory_current == first:
                    return first
            if time.monotonic() > deadline:
                raise SystemExit("corral: the standby was not made within 30 s")
            time.sleep(0.05)


async def _oom_latencies(sock: str, ooms: int) -> list[float]:
    victims: dict[int, float] = {}
    hog_pid: dict[str, int] = {}
    killed_at: dict[str, float] = {}
    restarted: dict[str, float] = {}
    changed = trio.Event()

    def notify() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    with oom_tracepoint() as pipe:
        async with trio.open_nursery() as nursery, events.subscribe(sock, since=1) as stream:

            async def find_hog(name: str, init: int) -> None:
                with trio.fail_after(10):
                    while not (
                        kids := Path(f"/proc/{init}/task/{init}/children").read_text().split()
                    ):
                        await trio.sleep(0.001)
                hog_pid[name] = int(kids[0])

            async def read() -> None:
                async for ev in stream:
                    if isinstance(ev, events.Started) and ev.generation == 0:
                        nursery.start_soon(find_hog, ev.sandbox, ev.pid)
                    elif isinstance(ev, events.Started) and ev.generation == 1:
                        restarted[ev.sandbox] = ev.mono
                    notify()

            nursery.start_soon(read_victims, pipe, victims, notify)
            nursery.start_soon(read)
            with trio.fail_after(ooms + 120):
                while len(restarted) < ooms:
                    await changed.wait()
            nursery.cancel_scope.cancel()
    for name, pid in hog_pid.items():
        if pid in victims:
            killed_at[name] = victims[pid]
    return [restarted[n] - killed_at[n] for n in restarted if n in killed_at]


def corral_oom(scratch: Path, ooms: int) -> list[float]:
    with corral_up(OOM_FLEET.format(ooms=ooms), scratch / "oom") as (_, sock, _state):
        return trio.run(_oom_latencies, sock, ooms)


DIFFERS = (
    "corral restarts a sandbox (its namespaces, a cgroup, an overlay root, tini) where"
    " supervisord and circus restart a plain process; circus polls every"
    f" {CIRCUS_CHECK_DELAY * 1000:g} ms (check_delay), supervisord wakes from a 1 s poll,"
    " corral does not poll (the pidfd wakes it)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--samples", type=int, default=60, help="restarts measured per contender (all the same)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="restarts dropped first, per contender and round"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="the contenders take turns this many times"
    )
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=50.0,
        help="how long each run of the crasher lives, under every contender",
    )
    parser.add_argument("--ooms", type=int, default=20)
    args = parser.parse_args()
    linger_us = round(args.linger_ms * 1000)
    if args.samples < args.rounds or min(args.samples, args.rounds, args.ooms) < 1:
        parser.error("--samples must be at least --rounds, and every count positive")

    # The peers are installed by `make setup-bench`, never here: a run
    # measures what is installed, and a missing peer still prints its
    # metric (nan) with the reason.
    peers: list[type[DaemonPeer]] = []
    versions = {"corral": f"corral {__version__}"}
    for cls in (SupervisordPeer, CircusPeer):
        ok, why = cls.available(DEFAULT_SITE)
        if ok:
            peers.append(cls)
            versions[cls.kind] = why
        else:
            print(f"{cls.kind}: not measured: {why} (make setup-bench installs it)")
    for text in versions.values():
        print(f"version: {text}")

    samples: dict[str, list[float]] = {
        "corral": [],
        "corral-standby": [],
        **{c.kind: [] for c in peers},
    }
    per_round = [
        args.samples // args.rounds + (r < args.samples % args.rounds) for r in range(args.rounds)
    ]
    scratch = scratch_dir("corral-bench-restart-")
    try:
        crasher = build_crasher(scratch)
        contenders: list[str] = list(samples)
        for r, n in enumerate(per_round):
            # Each round starts with the next contender: none is always first.
            turn = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for kind in turn:
                where = scratch / f"{kind}-{r}"
                print(f"round {r + 1}/{args.rounds}: {kind}, {n} restarts ...", file=sys.stderr)
                if kind.startswith("corral"):
                    samples[kind] += corral_crash_loop(
                        crasher, where, n, args.warmup, linger_us, standby=kind == "corral-standby"
                    )
                    continue
                peer_cls = next(c for c in peers if c.kind == kind)
                with peer_cls(where, crasher, site=DEFAULT_SITE, linger_us=linger_us) as peer:
                    samples[kind] += peer.collect(n, timeout=n * 3 + 30, skip=args.warmup)
        print("corral: what a standby costs ...", file=sys.stderr)
        standby_cost = standby_memory(scratch / "standby-memory")
        print(f"corral: {args.ooms} OOM kills with the grow reaction ...", file=sys.stderr)
        oom = corral_oom(scratch, args.ooms)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def line(name: str, xs: list[float]) -> str:
        p50, p90, p99 = (percentile_ms(xs, q) for q in (50, 90, 99))
        return f"{name:16} n={len(xs):<4} p50 {p50:8.2f}  p90 {p90:8.2f}  p99 {p99:8.2f} ms"

    print(
        f"{args.rounds} rounds, {args.warmup} warm-up restarts dropped per contender and round,"
        f" {args.samples} samples each; the crasher lives {args.linger_ms:g} ms each run"
    )
    for name, xs in samples.items():
        print(line(name, xs))
    print(line("corral-oom", oom))
    p50 = percentile_ms(samples["corral"], 50)

    def peer_p50(kind: str) -> float:
        return percentile_ms(samples[kind], 50) if samples.get(kind) else float("nan")

    sup, cir = peer_p50(SupervisordPeer.kind), peer_p50(CircusPeer.kind)
    standby_p50 = percentile_ms(samples["corral-standby"], 50)
    print(f"ratio corral/supervisord: {p50 / sup:.4f}  corral/circus: {p50 / cir:.3f}")
    print(f"ratio corral-standby/circus: {standby_p50 / cir:.3f}")
    print(f"differs: {DIFFERS}")
    print(
        f"a standby's memory (its cgroup, waiting): {standby_cost / 2**20:.2f} MiB;"
        " it also holds a thread, its pipes and an id range until it runs"
    )
    print(f"restart_p50_ms: {p50:.2f}")
    print(f"restart_p99_ms: {percentile_ms(samples['corral'], 99):.2f}")
    print(f"oom_restart_p50_ms: {percentile_ms(oom, 50):.2f}")
    print(f"standby_restart_p50_ms: {standby_p50:.2f}")
    print(f"supervisord_p50_ms: {sup:.2f}")
    print(f"circus_p50_ms: {cir:.2f}")


if __name__ == "__main__":
    main()
