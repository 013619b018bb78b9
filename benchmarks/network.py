"""Bridged sandbox lifecycle: corral's bridge mode against LXC's veth and
podman's bridge, side by side in one run.

Each sample is the full lifecycle of one ``/bin/true`` sandbox with a veth
on a bridge, an address and a default route: create, start, wait, delete.

- ``corral-lib``: ``Runtime.create(network="bridge")`` through the keeper,
  as the supervisor pays per sandbox; ``corral-none``: the same without a
  network (``lo`` only), to show what the network costs;
- ``lxc``: ``lxc-execute`` with ``lxc.net.0.type = veth`` on a bridge of
  its own, a static address and gateway (LXC has no IPAM: equal work but
  corral's lease file and its /etc/hosts and resolv.conf);
- ``podman``: ``podman run --rm --network bridge --rootfs DIR:O /bin/true``
  (Debian's podman 4.3 with runc and netavark: ``make setup-bench``), with
  the same limits, all of its state in the scratch directory, and the
  rlimits it can set here (``_podman.py`` says why it failed before).

The whole benchmark runs in a network and a mount namespace of its own (it
re-executes itself under ``unshare --net --mount``): the bridges, corral's
nftables table, podman's iptables rules and the forwarding switch are that
namespace's, never the host's, and ``/run`` and ``/dev/shm`` are tmpfs of
its own (podman writes there at paths no flag moves). One bridged sandbox
(an anchor) runs throughout for corral, and one container for podman, so
that each sample joins a network that exists, as in a fleet; the first
one's extra cost (the bridge, the rules) is printed apart.

Usage (as root)::

    .venv/bin/python benchmarks/network.py [--runs 50]

Ends with ``bridge_ratio_vs_podman: X`` (``n/a`` where podman cannot run),
``bridge_ratio_vs_lxc: X`` and ``bridge_start_p50_ms: X``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _corral import scratch_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import LxcPeer, PeerError
from _podman import PodmanPeer, outer_namespaces, private_run_dirs

from supervisor import Keeper, Limits, Runtime, SandboxSpec

LIMITS = Limits(memory=64 << 20, pids=64, cpus=0.5)
LXC_BRIDGE = "lxcbench0"


class LxcVethPeer(LxcPeer):
    """LXC with a veth on :data:`LXC_BRIDGE`, a static address and gateway."""

    def config_text(self) -> str:
        text = super().config_text()
        veth = "\n".join(
            [
                "lxc.net.0.type = veth",
                f"lxc.net.0.link = {LXC_BRIDGE}",
                "lxc.net.0.flags = up",
                "lxc.net.0.ipv4.address = 10.214.0.2/24",
                "lxc.net.0.ipv4.gateway = 10.214.0.1",
            ]
        )
        return text.replace("lxc.net.0.type = empty", veth)


def _in_own_netns() -> None:
    """Re-execute this script in a new network namespace (once)."""
    if os.environ.get("CORRAL_BENCH_NETNS") == "1":
        return
    env = {**os.environ, "CORRAL_BENCH_NETNS": "1", **outer_namespaces()}
    argv = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    os.execvpe("unshare", [*argv, sys.executable, *sys.argv], env)


def _own_sys_class_net(scratch: Path) -> None:
    """Show this network namespace's links in /sys/class/net (LXC looks its
    bridge up there): sysfs shows the namespace of whoever mounted it, so a
    fresh one is mounted aside and its net directories bound over the
    host's, in this process's private mount namespace only."""
    fresh = scratch / "sysfs"
    fresh.mkdir()
    subprocess.run(["mount", "-t", "sysfs", "sysfs", str(fresh)], check=True)
    for sub in ("class/net", "devices/virtual/net"):
        subprocess.run(["mount", "--bind", str(fresh / sub), f"/sys/{sub}"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="samples per contender")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    _in_own_netns()
    private_run_dirs()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "link", "add", LXC_BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "10.214.0.1/24", "dev", LXC_BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", LXC_BRIDGE, "up"], check=True)

    scratch = scratch_dir("corral-bench-net-")
    _own_sys_class_net(scratch)
    state, run = scratch / "state", scratch / "run"
    keeper = Keeper()
    peers: list[LxcPeer | PodmanPeer] = []
    podman: PodmanPeer | None = None
    podman_first_ms = 0.0
    failed: list[str] = []
    anchor = None
    try:
        runtime = Runtime(state_dir=state, run_dir=run, spawner=keeper.spawn)
        rootfs = runtime.resolve_rootfs("busybox")
        null = os.open("/dev/null", os.O_RDWR)
        counter = iter(range(10**9))

        t0 = time.perf_counter()
        anchor = runtime.create(
            SandboxSpec(name="anchor", argv=("sleep", "3600"), network="bridge"),
            stdio=(null, null, null),
        )
        first_ms = (time.perf_counter() - t0) * 1e3

        def corral(network: str) -> Callable[[], float]:
            def one() -> float:
                spec = SandboxSpec(
                    name=f"b{next(counter)}", argv=("/bin/true",), limits=LIMITS, network=network
                )
                t0 = time.perf_counter()
                sb = runtime.create(spec, stdio=(null, null, null))
                sb.wait()
                sb.destroy()
                return time.perf_counter() - t0

            return one

        contenders: dict[str, Callable[[], float]] = {
            "corral-lib": corral("bridge"),
            "corral-none": corral("none"),
        }
        lxc_ok = LxcVethPeer.available(rootfs)
        if lxc_ok:
            lxc = LxcVethPeer(rootfs, scratch / "lxc")
            lxc.setup()
            peers.append(lxc)
            contenders["lxc"] = lxc.run_once
        else:
            print(f"lxc: not working here ({lxc_ok.reason}); skipped", file=sys.stderr)
        podman_ok = PodmanPeer.available(rootfs)
        if podman_ok:
            podman = PodmanPeer(rootfs, scratch / "podman", anchor=True)
            peers.append(podman)
            t0 = time.perf_counter()
            podman.setup()  # starts its anchor: podman0 and netavark's rules
            podman_first_ms = (time.perf_counter() - t0) * 1e3
            contenders["podman"] = podman.run_once
        else:
            print(f"podman: not measured ({podman_ok.reason})", file=sys.stderr)

        samples: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(args.warmup + args.runs):
            for name, fn in contenders.items():
                dt = fn()
                if i >= args.warmup:
                    samples[name].append(dt)
    finally:
        if anchor is not None:
            anchor.kill()
            anchor.wait()
            anchor.destroy()
        for peer in peers:
            try:
                peer.teardown()
            except PeerError as exc:  # the others are still torn down
                failed.append(str(exc))
                print(f"teardown: {exc}", file=sys.stderr)
        keeper.close()
        subprocess.run(["umount", "-R", str(scratch / "sysfs")], check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'contender':12} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}   (n={args.runs})")
    med = {}
    for name, xs in samples.items():
        xs.sort()
        med[name] = statistics.median(xs)
        p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        print(f"{name:12} {med[name] * 1e3:10.2f} {p90 * 1e3:8.2f} {xs[0] * 1e3:8.2f}")
    print(f"first bridged sandbox (makes the bridge and the table): {first_ms:.1f} ms")
    if podman is not None:
        print(f"first podman container (detached, until started): {podman_first_ms:.1f} ms")
        if podman.last_stderr:
            print(f"podman's stderr on its last run: {podman.last_stderr}")
        left = "; ".join(podman.left_in_netns) or "nothing"
        print(f"podman left in the benchmark's network namespace after its last container: {left}")
    print(
        f"the network's cost per sandbox: {(med['corral-lib'] - med['corral-none']) * 1e3:.1f} ms"
    )
    ratio_podman = f"{med['corral-lib'] / med['podman']:.3f}" if "podman" in med else "n/a"
    print(f"bridge_ratio_vs_podman: {ratio_podman}")
    print(
        f"bridge_ratio_vs_lxc: {med['corral-lib'] / med['lxc']:.3f}"
        if "lxc" in med
        else "bridge_ratio_vs_lxc: n/a"
    )
    print(f"bridge_start_p50_ms: {med['corral-lib'] * 1e3:.1f}")
    if failed:
        sys.exit(1)  # said above: something of a peer's was left


if __name__ == "__main__":
    main()
