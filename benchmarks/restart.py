"""Crash-to-restart latency: corral against supervisord and circus, one run.

Usage (as root)::

    .venv/bin/python benchmarks/restart.py [--restarts 200] [--ooms 20]

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

No polling anywhere in corral's path: the exit wakes the supervisor through
the init's pidfd. The last five lines are exactly the ``name: value``
results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import trio
from _corral import corral_up
from _restart_peers import (
    CircusPeer,
    SupervisordPeer,
    build_crasher,
    install_peers,
    percentile_ms,
    read_latencies,
)
from _trace import oom_tracepoint, read_victims

import events

CRASH_FLEET = """
[[sandbox]]
name = "crash"
rootfs = "{rootfs}"
command = ["/crasher", "/dev/stdout"]

[sandbox.plugins.restart]
policy = "always"
delay = 0
jitter = 0
intensity = 1000000
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


def corral_crash_loop(crasher: Path, scratch: Path, n: int) -> list[float]:
    rootfs = scratch / "crasher-root"
    rootfs.mkdir()
    shutil.copy2(crasher, rootfs / "crasher")
    with corral_up(CRASH_FLEET.format(rootfs=rootfs), scratch / "crash") as (_, sock, state):
        for ev in events.iter_events(sock, kinds=["started"], since=1):
            if ev.generation >= n + 5:
                break
    logs = state / "logs"
    # The sandbox's output log has one record per line the crasher wrote;
    # take the lines back out to parse them like the peers' files.
    from supervisor._cli._output_reader import read_records

    plain = scratch / "crash" / "timestamps"
    plain.write_bytes(b"".join(r.content + b"\n" for r in read_records(str(logs / "crash-0.log"))))
    _, latencies = read_latencies(plain)
    return latencies[5 : 5 + n]  # the first few warm the caches


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--restarts", type=int, default=200)
    parser.add_argument("--ooms", type=int, default=20)
    parser.add_argument(
        "--peer-restarts", type=int, default=30, help="samples per peer (each ~1 s for supervisord)"
    )
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-restart-"))
    try:
        crasher = build_crasher(scratch)
        print(f"corral: {args.restarts} restarts of a crash loop ...", file=sys.stderr)
        corral = corral_crash_loop(crasher, scratch, args.restarts)
        print(f"corral: {args.ooms} OOM kills with the grow reaction ...", file=sys.stderr)
        oom = corral_oom(scratch, args.ooms)
        site = install_peers()
        peers: dict[str, list[float]] = {}
        for cls in (SupervisordPeer, CircusPeer):
            ok, why = cls.available(site)
            if not ok:
                print(f"{cls.__name__}: not available: {why}", file=sys.stderr)
                continue
            print(f"{cls.__name__}: {args.peer_restarts} restarts ...", file=sys.stderr)
            with cls(scratch / cls.__name__, crasher, site=site) as peer:
                peers[cls.__name__] = peer.collect(
                    args.peer_restarts, timeout=args.peer_restarts * 3 + 30
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def line(name: str, xs: list[float]) -> str:
        p50, p90, p99 = (percentile_ms(xs, q) for q in (50, 90, 99))
        return f"{name:16} n={len(xs):<4} p50 {p50:8.2f}  p90 {p90:8.2f}  p99 {p99:8.2f} ms"

    print(line("corral", corral))
    print(line("corral-oom", oom))
    for name, xs in peers.items():
        print(line(name, xs))
    p50 = percentile_ms(corral, 50)
    sup = (
        percentile_ms(peers["SupervisordPeer"], 50) if "SupervisordPeer" in peers else float("nan")
    )
    cir = percentile_ms(peers["CircusPeer"], 50) if "CircusPeer" in peers else float("nan")
    print(f"ratio corral/supervisord: {p50 / sup:.4f}  corral/circus: {p50 / cir:.3f}")
    print(f"restart_p50_ms: {p50:.2f}")
    print(f"restart_p99_ms: {percentile_ms(corral, 99):.2f}")
    print(f"oom_restart_p50_ms: {percentile_ms(oom, 50):.2f}")
    print(f"supervisord_p50_ms: {sup:.2f}")
    print(f"circus_p50_ms: {cir:.2f}")


if __name__ == "__main__":
    main()
