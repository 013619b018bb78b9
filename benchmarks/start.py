"""Sandbox start-up: corral against runc (and LXC where installed), one run.

Each sample is the full lifecycle of one ``/bin/true`` sandbox on the same
busybox rootfs with the same limits (memory 64M, pids 64, CPU 0.5) and all
namespaces including net: create, start, wait, delete. Measured, alternating
so that noise hits every contender alike:

(a) ``corral-lib``: the library path the supervisor uses, in a running
    interpreter, spawning through the keeper fork server (what a fleet pays
    per sandbox, as containerd pays one ``runc`` run per container);
(b) ``corral-cli``: ``corral run -- /bin/true`` as a user types it,
    interpreter start included;
both root-mapped (``userns = false``), the work runc does with its
default configuration; ``corral-userns``: (a) as a sandbox is by default,
in a user namespace of its own (the id maps, the idmapped rootfs), whose
cost over (a) the line ``userns_cost_vs_root_mapped`` gives;
``runc``: ``runc run`` on an OCI bundle of the same rootfs (its default
namespaces, including net); ``lxc``: ``lxc-execute`` (if installed).

Usage (as root)::

    .venv/bin/python benchmarks/start.py [--runs 50]

Before them, one row for the device policy every non-privileged sandbox
gets (``Cgroup.restrict_devices`` on an empty cgroup: on cgroup v2 the
load and attach of the eBPF device program, on v1 the ``devices.*``
writes; the program's load, which a process does once, is shown apart),
measured apart because it is a fraction of the run-to-run noise
of a whole start; and one for the default seccomp filter (the programs
loaded into a fresh process with no_new_privs, and what a syscall then
costs: ``getppid``, which the kernel's per-filter cache lets through
without running a program, and ``ioctl(FIONREAD)``, whose argument every
program looks at), against the same process without a filter.

The last two lines are exactly ``start_ratio_vs_runc: X.XX`` (a) and
``cli_ratio_vs_runc: X.XX`` (b): median over median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from _peers import LxcPeer, LxcSecurity, RuncPeer

from supervisor import Keeper, Limits, Runtime, SandboxSpec
from supervisor._runtime._linux._devices import load_device_program
from supervisor._runtime._security import Security, make_security

LIMITS = Limits(memory=64 << 20, pids=64, cpus=0.5)
CLI_ARGS = ["--memory", "64M", "--pids", "64", "--cpus", "0.5", "--no-userns", "--", "/bin/true"]
ROOT_MAPPED = make_security(userns=False)
USERNS = make_security(userns=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="samples per contender")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    scratch = scratch_dir("corral-bench-start-")
    state, run = scratch / "state", scratch / "run"
    env = {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_RUN_DIR": str(run)}
    keeper = Keeper()
    peers: list[RuncPeer | LxcPeer] = []
    try:
        runtime = Runtime(state_dir=state, run_dir=run, spawner=keeper.spawn)
        rootfs = runtime.resolve_rootfs("busybox")
        null = os.open("/dev/null", os.O_RDWR)
        counter = iter(range(10**9))

        def corral_lib(security: Security = ROOT_MAPPED) -> float:
            spec = SandboxSpec(
                name=f"b{next(counter)}", argv=("/bin/true",), limits=LIMITS, security=security
            )
            t0 = time.perf_counter()
            sb = runtime.create(spec, stdio=(null, null, null))
            sb.wait()
            sb.destroy()
            return time.perf_counter() - t0

        def corral_cli() -> float:
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "supervisor", "run", *CLI_ARGS],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"corral run failed ({p.returncode}): {p.stderr.decode()}")
            return dt

        contenders: dict[str, Callable[[], float]] = {
            "corral-lib": corral_lib,
            "corral-cli": corral_cli,
            "corral-userns": lambda: corral_lib(USERNS),
        }
        runc = RuncPeer(rootfs, scratch / "runc")
        if RuncPeer.available(rootfs):
            runc.setup()
            peers.append(runc)
            contenders["runc"] = runc.run_once
        else:
            raise SystemExit("runc is not available (apt-get install runc): no ratio possible")
        if LxcPeer.available(rootfs):
            lxc = LxcPeer(rootfs, scratch / "lxc")
            lxc.setup()
            peers.append(lxc)
            contenders["lxc"] = lxc.run_once
            # The same again with a default sandbox's confinement: its
            # capabilities, no_new_privs, an allow-list of the same calls,
            # loopback up.
            equal = LxcPeer(rootfs, scratch / "lxc-equal", security=lxc_security())
            equal.setup()
            peers.append(equal)
            contenders["lxc-equal"] = equal.run_once
        else:
            print("lxc: not installed or not working here; skipped", file=sys.stderr)

        devices = device_policy_cost(runtime, args.runs * 4)
        seccomp = seccomp_filter_cost(args.runs * 4)
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(args.warmup + args.runs):
            for name, fn in contenders.items():
                dt = fn()
                if i >= args.warmup:
                    samples[name].append(dt)
    finally:
        for peer in peers:
            peer.teardown()
        keeper.close()
        with contextlib.suppress(NameError):
            runtime.lxcfs.stop(force=True)  # corral's lxcfs outlives its starter otherwise
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'contender':14} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}   (n={args.runs})")
    med = {}
    for name, xs in samples.items():
        xs.sort()
        med[name] = statistics.median(xs)
        p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        print(f"{name:14} {med[name] * 1e3:10.2f} {p90 * 1e3:8.2f} {xs[0] * 1e3:8.2f}")
    print(devices)
    print(seccomp)
    if "lxc" in med:
        print(
            "differs: lxc runs with LXC's defaults here (no capability dropped, no seccomp,"
            f" loopback down); lxc-equal as corral's default sandbox, but {LXC_EQUAL_DIFFERS}"
        )
        print(f"lib_ratio_vs_lxc: {med['corral-lib'] / med['lxc']:.2f}")
        print(f"lib_ratio_vs_lxc_equal: {med['corral-lib'] / med['lxc-equal']:.2f}")
    print(f"userns_cost_vs_root_mapped: {med['corral-userns'] / med['corral-lib']:.2f}")
    print(f"start_ratio_vs_runc: {med['corral-lib'] / med['runc']:.2f}")
    print(f"cli_ratio_vs_runc: {med['corral-cli'] / med['runc']:.2f}")


LXC_EQUAL_DIFFERS = (
    "its allow-list lets clone and personality through without corral's argument checks"
    " (and refuses clone3 with EPERM, corral with ENOSYS), its root is read-only where"
    " corral's has a writable overlay layer, and /proc is LXC's proc:mixed, not corral's"
    " masks; corral-lib is root-mapped, as LXC's container is"
)


def lxc_security() -> LxcSecurity:
    """A default sandbox's capabilities and allowed system calls, as LXC names them."""
    from supervisor._runtime._seccomp import _ALLOWED_FROM_KERNEL, _ALLOWED_WITH, DEFAULT_ALLOWED
    from supervisor._runtime._security import CAPABILITIES, DEFAULT_CAPABILITIES

    caps = tuple(sorted(n.lower() for n in DEFAULT_CAPABILITIES))
    syscalls = set(DEFAULT_ALLOWED) | {"arch_prctl", "modify_ldt", "clone", "personality"}
    for cap, names in _ALLOWED_WITH.items():
        if cap in DEFAULT_CAPABILITIES:
            syscalls |= set(names)
    for _, names in _ALLOWED_FROM_KERNEL:
        syscalls |= set(names)
    assert all(n in CAPABILITIES for n in DEFAULT_CAPABILITIES)
    return LxcSecurity(caps, tuple(sorted(syscalls)))


def device_policy_cost(runtime: Runtime, runs: int) -> str:
    """One line: what ``restrict_devices`` costs a start on this layout
    (median, p90, min), and on v2 the program's load alone (paid once per
    process, before the first sample here)."""
    whole: list[float] = []
    for i in range(runs + 1):
        cg = runtime.cgroups.create(f"corral-bench-devices-{os.getpid()}-{i}", Limits())
        try:
            t0 = time.perf_counter()
            cg.restrict_devices()
            if i > 0:  # the first one loads the program the process keeps
                whole.append(time.perf_counter() - t0)
        finally:
            cg.remove()
    line = f"device policy ({runtime.cgroups.layout}): {_us(whole)}"
    if runtime.cgroups.layout == "v2":
        load: list[float] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fd = load_device_program()
            load.append(time.perf_counter() - t0)
            os.close(fd)
        line += f"; the load, once per process: {_us(load)}"
    return line


_FILTER_PROBE = r"""
import ctypes, fcntl, json, os, sys, termios, time
from supervisor._runtime._seccomp import compile_filter
from supervisor._runtime._linux._syscalls import load_seccomp
caps, runs, load = json.loads(sys.argv[1])
programs = compile_filter("default", caps)
programs = (programs,) if isinstance(programs, bytes) else programs  # older trees: one
if ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) != 0:
    raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
t0 = time.perf_counter()
for p in programs if load else ():
    load_seccomp(p)
took = time.perf_counter() - t0
r, w = os.pipe()
buf = bytearray(4)
def per_call(fn):
    t = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t) / runs
getppid = min(per_call(os.getppid) for _ in range(5))
ioctl = min(per_call(lambda: fcntl.ioctl(r, termios.FIONREAD, buf)) for _ in range(5))
print(json.dumps([took, getppid, ioctl, sum(len(p) // 8 for p in programs)]))
"""


def seccomp_filter_cost(runs: int) -> str:
    """One line: loading the default filter (median of *runs* fresh
    processes, each with Docker's capabilities), and the per-syscall cost
    with the filter against without (medians of the per-process minimums)."""
    from supervisor._runtime._security import DEFAULT_SECURITY, cap_last_cap, kept_capabilities

    caps = kept_capabilities(DEFAULT_SECURITY, cap_last_cap())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    results: dict[bool, list[list[float]]] = {True: [], False: []}
    for i in range(max(runs // 10, 5) * 2):
        load = i % 2 == 0
        out = subprocess.run(
            [sys.executable, "-c", _FILTER_PROBE, json.dumps([caps, 20000, load])],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[load].append(json.loads(out.stdout))
    size = int(results[True][0][3])
    loads = [r[0] for r in results[True]]

    def ns(i: int, load: bool) -> float:
        return statistics.median(r[i] for r in results[load]) * 1e9

    return (
        f"seccomp filter ({size} instructions): load {_us(loads)};"
        f" getppid {ns(1, True):.0f} ns vs {ns(1, False):.0f} ns without;"
        f" ioctl {ns(2, True):.0f} ns vs {ns(2, False):.0f} ns without"
    )


def _us(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return (
        f"median {statistics.median(xs) * 1e6:.0f} us, p90 {p90 * 1e6:.0f} us,"
        f" min {xs[0] * 1e6:.0f} us (n={len(xs)})"
    )


if __name__ == "__main__":
    main()
