"""Checkpoint and restore: corral's CRIU checkpoint/restore against plain CRIU.

Usage (as root, where ``criu check`` passes; on the dev host that is the VM
lane)::

    tests/vm/run --memory 3G -- .venv/bin/python benchmarks/checkpoint.py [--runs 3]

Every sample uses a fresh sandbox made by corral (the busybox rootfs plus
``/hog``, all namespaces, a cgroup) running ``/hog MB``: a static C program,
compiled here, that mallocs MB megabytes, writes every byte, prints
``ready`` and pauses. The benchmark waits for ``ready`` on the stdout pipe.
Sizes: 16 MB and 256 MB. Plain CRIU is run on the same kind of sandbox, so
both dump the same process tree (tini and the hog) with the same options.

checkpoint (kill mode)
    corral: wall time of ``Runtime.checkpoint(sb, tag=...)``: freeze the
    cgroup, ``criu dump --leave-running`` and, alongside, ``cp -a`` of the
    writable layer, checkpoint.json (fsync), rename, SIGKILL.
    plain: wall time of running ``criu dump`` from here (fork, exec, dump,
    exit), measured as corral's own call is, with corral's options minus
    ``--leave-running``, so CRIU kills the tree itself, as ``runc
    checkpoint`` does: ``--tree PID --images-dir D --log-file dump.log
    --network-lock L --external mnt[/dev/init]:corral-init --freeze-cgroup
    CG --manage-cgroups=soft --tcp-established --file-locks --ext-unix-sk``.
    CRIU then freezes the cgroup itself (corral freezes it first). So the
    ratio includes what corral's choice of always dumping with
    ``--leave-running`` (and killing afterwards) costs inside CRIU: curing
    and resuming the tree and unlocking the network instead of a kill.
restore
    corral: wall time of ``Runtime.restore(info)``: state dir, ``cp -a`` of
    the layer, cgroup, fork of the restorer (private mount namespace,
    overlay mount), ``criu restore``, pidfile, removal of CRIU's leftover
    network lock (``nsenter ... nft``), record.
    plain: the least a caller of CRIU has to do to restore the plain dump:
    mkdir of the cgroup, fork; in the child unshare(CLONE_NEWNS), make /
    private, mount the overlay (the rootfs below a copy of the dumped
    sandbox's writable layer, copied beforehand, untimed), exec ``criu
    restore`` with corral's options (``--root --restore-detached --pidfile
    --external mnt[corral-init]:TINI --manage-cgroups=soft --cgroup-root
    --tcp-established --file-locks --ext-unix-sk --inherit-fd`` for the
    stdout pipe); wall time until CRIU exits with the tree running.
frozen (leave-running)
    ``Runtime.checkpoint(sb, leave_running=True)``, which pre-dumps memory
    while the sandbox runs (``criu pre-dump --track-mem``), then freezes it
    for the final dump of what changed: how long the sandbox stood still =
    from the call of corral's cgroup freeze to the return of its first thaw
    (both wrapped here) + the pre-dump's own freeze (CRIU's ``frozen_time``
    in the pre-dump's stats-dump image, read with ``crit``).
    ``CheckpointInfo.frozen`` (corral's own account of the same) and CRIU's
    ``frozen_time`` of the final dump are shown beside it.

A warm-up round (16 MB, not counted) fills corral's ``criu check`` cache
and the page cache, as in a long-running supervisor. corral and plain
alternate in which goes first. Medians over ``--runs`` samples.

Under the VM lane's emulation every exec costs ~50-150 ms and the samples
swing with the host's load (ratios moved by +-0.3 between runs on a busy
host), so the report adds a noise check: the ratio of the minimums, and
1 + corral's own steps / plain CRIU, which does not depend on how long
CRIU itself happened to take.

To show where corral's time goes, its internal steps (``criu`` process,
``cp -a``, nft unlock) are timed by wrapping the module functions of
``supervisor._runtime._sandbox`` for the duration of the run; "other" is the rest.

The last three lines are exactly ``checkpoint_overhead_ratio: X``,
``restore_overhead_ratio: X`` (corral/plain, the worse of the 16 MB and
256 MB medians; target <= 1.2) and ``frozen_ms_256M: X``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _corral import scratch_dir

import supervisor._runtime._sandbox as _rt
from supervisor._runtime._checkpoint import (
    CRIU_OPTIONS,
    INIT_KEY,
    CheckpointInfo,
    CriuInfo,
    check_criu,
    criu_frozen_seconds,
    dir_size,
)
from supervisor._runtime._linux import _syscalls as sc
from supervisor._runtime._linux._cgroups import V2Cgroup
from supervisor._runtime._linux._child import INIT_PATH
from supervisor._runtime._sandbox import Runtime, Sandbox
from supervisor._runtime._spec import SandboxSpec

SIZES = (16, 256)
MB = 1 << 20
HOG_C = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t n = (size_t)strtoul(argc > 1 ? argv[1] : "16", 0, 10) << 20;
    char *p = malloc(n);
    if (!p) return 1;
    memset(p, 0x5a, n);
    if (write(1, "ready\n", 6) != 6) return 1;
    for (;;) pause();
}
"""


class Phases:
    """Seconds spent in wrapped functions since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def reset(self) -> None:
        self.t = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0

        return timed


def build_hog(scratch: Path) -> Path:
    src = scratch / "hog.c"
    src.write_text(HOG_C)
    binary = scratch / "hog"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("a C compiler is needed for the memory hog (apt-get install gcc)")
    proc = subprocess.run(
        [cc, "-O2", "-static", "-o", str(binary), str(src)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"cannot build the hog (static; needs libc6-dev): {proc.stderr}")
    return binary


def wait_ready(fd: int, timeout: float = 300.0) -> None:
    """Read the hog's stdout until it says ``ready``."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"ready\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise SystemExit(f"the hog was not ready after {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise SystemExit(f"the hog ended before it was ready (output {buf!r})")
        buf += chunk


def criu_frozen_ms(images: str) -> float | None:
    """CRIU's own frozen_time from the stats-dump image (None without crit)."""
    crit = shutil.which("crit")
    seconds = criu_frozen_seconds(crit, images) if crit else None
    return None if seconds is None else seconds * 1e3


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def fd_key(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


class Bench:
    def __init__(self, rt: Runtime, criu: CriuInfo, rootfs: str, scratch: Path) -> None:
        self.rt = rt
        self.criu = criu
        self.rootfs = rootfs
        self.scratch = scratch
        self.null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.phases = Phases()
        self.cleanup = contextlib.ExitStack()
        self.samples: dict[tuple[int, str], list[float]] = {}
        self.n = 0

    def add(self, mb: int, key: str, value: float) -> None:
        self.samples.setdefault((mb, key), []).append(value)

    def median(self, mb: int, key: str) -> float:
        return statistics.median(self.samples[(mb, key)])

    def instrument(self) -> None:
        """Time corral's internal steps (the wrappers stay for the whole run)."""
        p = self.phases
        _rt._run_criu = p.wrap("criu", _rt._run_criu)
        _rt._copy_tree = p.wrap("cp", _rt._copy_tree)
        _rt._drop_network_lock = p.wrap("nft", _rt._drop_network_lock)
        self.rt._wait_timeout = p.wrap("criu", self.rt._wait_timeout)  # type: ignore[method-assign]
        self.rt._spawn = p.wrap("criu", self.rt._spawn)

    def drop(self, info: CheckpointInfo) -> None:
        """Delete a checkpoint and its sandbox's (then empty) checkpoint directory."""
        self.rt.checkpoints.delete(info)
        with contextlib.suppress(OSError):
            os.rmdir(self.rt.checkpoints.dir(info.name))

    def name(self, what: str, mb: int) -> str:
        self.n += 1
        return f"bench-{what}{mb}-{self.n}"

    def start_hog(self, what: str, mb: int) -> tuple[Sandbox, int]:
        """A fresh sandbox with *mb* MB touched; its stdout's read end."""
        spec = SandboxSpec(self.name(what, mb), ["/hog", str(mb)], rootfs=self.rootfs)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.cleanup.callback(os.close, r)
        try:
            sb = self.rt.create(spec, stdio=(self.null, w, w), stdin_devnull=True)
        finally:
            os.close(w)
        self.cleanup.callback(sb.destroy)
        wait_ready(r)
        return sb, r

    # -- corral ----------------------------------------------------------------

    def corral_checkpoint(self, mb: int) -> CheckpointInfo:
        sb, _ = self.start_hog("c", mb)
        self.phases.reset()
        t0 = time.perf_counter()
        info = self.rt.checkpoint(sb, tag="kill")
        dt = time.perf_counter() - t0
        self.cleanup.callback(self.drop, info)
        sb.wait()
        sb.destroy()
        self.add(mb, "ckpt", dt)
        criu, cp = self.phases.t.get("criu", 0.0), self.phases.t.get("cp", 0.0)
        self.add(mb, "ckpt:criu", criu)
        self.add(mb, "ckpt:cp", cp)
        self.add(mb, "ckpt:other", dt - criu - cp)
        self.add(mb, "ckpt:extra", dt - criu)
        self.add(mb, "ckpt:size", info.size)
        return info

    def corral_restore(self, mb: int, info: CheckpointInfo) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        self.cleanup.callback(os.close, r)
        self.phases.reset()
        try:
            t0 = time.perf_counter()
            sb = self.rt.restore(info, stdio=(self.null, w, w))
            dt = time.perf_counter() - t0
        finally:
            os.close(w)
        self.cleanup.callback(sb.destroy)
        if sb.poll() is not None:
            raise SystemExit(f"the restored sandbox {sb.name} is not running")
        sb.destroy()
        self.drop(info)
        self.add(mb, "restore", dt)
        t = {phase: self.phases.t.get(phase, 0.0) for phase in ("criu", "cp", "nft")}
        for phase, seconds in t.items():
            self.add(mb, f"restore:{phase}", seconds)
        self.add(mb, "restore:other", dt - sum(t.values()))
        self.add(mb, "restore:extra", dt - t["criu"])

    def corral_leave_running(self, mb: int) -> None:
        sb, _ = self.start_hog("l", mb)
        cg: Any = sb.cgroup
        marks: dict[str, float] = {}
        freeze, thaw = cg.freeze, cg.thaw

        def timed_freeze(*args: Any, **kwargs: Any) -> None:
            marks["freeze"] = time.perf_counter()
            freeze(*args, **kwargs)

        def timed_thaw() -> None:
            thaw()
            marks.setdefault("thaw", time.perf_counter())  # the first one counts

        cg.freeze, cg.thaw = timed_freeze, timed_thaw
        info = self.rt.checkpoint(sb, tag="live", leave_running=True)
        self.cleanup.callback(self.drop, info)
        if sb.poll() is not None:
            raise SystemExit(f"{sb.name} did not survive a --leave-running checkpoint")
        # A leave-running checkpoint pre-dumps memory first (CRIU freezes
        # the tree briefly for that too): its frozen time counts as well.
        pre = os.path.join(info.path, "pre")
        pre_ms = (criu_frozen_ms(pre) or 0.0) if os.path.isdir(pre) else 0.0
        self.add(mb, "frozen:ours", marks["thaw"] - marks["freeze"])
        self.add(mb, "frozen:pre", pre_ms / 1e3)
        self.add(mb, "frozen", marks["thaw"] - marks["freeze"] + pre_ms / 1e3)
        self.add(mb, "frozen:info", info.frozen)
        criu_ms = criu_frozen_ms(info.images)
        if criu_ms is not None:
            self.add(mb, "frozen:criu", criu_ms / 1e3)
        sb.destroy()
        self.drop(info)

    # -- plain CRIU ------------------------------------------------------------

    def plain_dump(self, mb: int) -> tuple[Path, str, str]:
        """Dump a fresh hog with plain criu; (its dir, stdout key, cgroup parent)."""
        sb, _ = self.start_hog("p", mb)
        d = self.scratch / sb.name
        images = d / "images"
        images.mkdir(parents=True)
        self.cleanup.callback(shutil.rmtree, d, True)
        key = fd_key(sb.pid, 1)
        (cgdir,) = sb.cgroup.paths
        argv = [
            self.criu.binary,
            "dump",
            "--tree",
            str(sb.pid),
            "--images-dir",
            str(images),
            "--log-file",
            "dump.log",
            "--network-lock",
            self.criu.network_lock,
            "--external",
            f"mnt[{INIT_PATH}]:{INIT_KEY}",
            "--freeze-cgroup",
            cgdir,
            *CRIU_OPTIONS,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            log = read_log(images / "dump.log") or proc.stderr
            raise SystemExit(f"plain criu dump failed ({proc.returncode}):\n{log[-3000:]}")
        sb.wait()
        # The layer the restore will mount (untimed: runc restores onto the
        # container's own rootfs; corral copies, and that is timed for it).
        subprocess.run(
            ["cp", "-a", os.path.join(sb.state_path, "upper"), str(d / "upper")], check=True
        )
        sb.destroy()
        self.add(mb, "dump", dt)
        self.add(mb, "dump:size", dir_size(str(images)))
        return d, key, os.path.dirname(cgdir)

    def plain_restore(self, mb: int, d: Path, key: str, cg_parent: str) -> None:
        (d / "work").mkdir()
        (d / "merged").mkdir()
        cg_dir = os.path.join(cg_parent, f"{d.name}-restored")
        cg_rel = "/" + os.path.relpath(cg_dir, "/sys/fs/cgroup")
        pidfile = d / "restore.pid"
        r, w = os.pipe()  # inheritable: --inherit-fd fd[w]
        self.cleanup.callback(os.close, r)
        argv = [
            self.criu.binary,
            "restore",
            "--images-dir",
            str(d / "images"),
            "--work-dir",
            str(d),
            "--log-file",
            "restore.log",
            "--root",
            str(d / "merged"),
            "--restore-detached",
            "--pidfile",
            str(pidfile),
            "--external",
            f"mnt[{INIT_KEY}]:{self.rt.init_binary}",
            *CRIU_OPTIONS,
            "--cgroup-root",
            cg_rel,
            "--inherit-fd",
            f"fd[{w}]:{key}",
        ]
        merged = str(d / "merged")
        opts = f"lowerdir={self.rootfs},upperdir={d / 'upper'},workdir={d / 'work'}"

        def private_root() -> None:
            # In the forked child, before exec: what corral's restorer does.
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            sc.mount("overlay", merged, "overlay", 0, opts)

        try:
            t0 = time.perf_counter()
            os.mkdir(cg_dir)
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(w,),
                preexec_fn=private_root,
                check=False,
            )
            dt = time.perf_counter() - t0
        finally:
            os.close(w)
        self.cleanup.callback(remove_cgroup, cg_dir)
        if proc.returncode != 0:
            log = read_log(d / "restore.log") or proc.stderr
            raise SystemExit(f"plain criu restore failed ({proc.returncode}):\n{log[-3000:]}")
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"the tree restored by plain criu (pid {pid}) is gone") from None
        remove_cgroup(cg_dir, pid)
        shutil.rmtree(d, ignore_errors=True)
        self.add(mb, "prestore", dt)

    # -- one round ---------------------------------------------------------------

    def round(self, mb: int, corral_first: bool) -> None:
        def dumps() -> tuple[CheckpointInfo, tuple[Path, str, str]]:
            if corral_first:
                info = self.corral_checkpoint(mb)
                return info, self.plain_dump(mb)
            plain = self.plain_dump(mb)
            return self.corral_checkpoint(mb), plain

        info, plain = dumps()
        if corral_first:
            self.corral_restore(mb, info)
            self.plain_restore(mb, *plain)
        else:
            self.plain_restore(mb, *plain)
            self.corral_restore(mb, info)
        self.corral_leave_running(mb)
        self.cleanup.close()  # the pipes' read ends; the rest is gone already


def remove_cgroup(path: str, pid: int | None = None) -> None:
    """Kill what is in a cgroup we made, reap *pid* (our orphan), rmdir it."""
    if not os.path.isdir(path):
        return
    cgroup = V2Cgroup(os.path.basename(path), path)
    cgroup.kill()
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    cgroup.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="samples per size and contender")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted 16 MB rounds first")
    args = parser.parse_args()

    started = time.monotonic()
    rt = Runtime()
    criu = check_criu()  # raises with CRIU's reason where it does not work
    if rt.cgroups.layout != "v2":
        raise SystemExit("the plain-CRIU restore here is written for cgroup v2 (the default lane)")
    scratch = scratch_dir("corral-bench-ckpt-")
    try:
        hog = build_hog(scratch)
        rootfs = scratch / "rootfs"
        subprocess.run(["cp", "-a", rt.resolve_rootfs("busybox"), str(rootfs)], check=True)
        shutil.copy2(hog, rootfs / "hog")
        bench = Bench(rt, criu, rt.resolve_rootfs(str(rootfs)), scratch)
        bench.instrument()
        try:
            for i in range(args.warmup):
                bench.round(16, corral_first=i % 2 == 0)
            bench.samples.clear()
            for i in range(args.runs):
                for mb in SIZES:
                    bench.round(mb, corral_first=i % 2 == 0)
        finally:
            bench.cleanup.close()
            os.close(bench.null)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def ms(mb: int, key: str) -> float:
        return bench.median(mb, key) * 1e3

    print(f"CRIU {criu.version}, network lock {criu.network_lock}; medians of {args.runs} runs, ms")
    print()
    print(
        f"{'size':>5} {'corral ckpt':>12} {'criu dump':>10} {'ratio':>6}"
        f" {'corral restore':>15} {'criu restore':>13} {'ratio':>6} {'frozen':>7}"
    )
    ckpt_ratio: dict[int, float] = {}
    restore_ratio: dict[int, float] = {}
    for mb in SIZES:
        ckpt_ratio[mb] = bench.median(mb, "ckpt") / bench.median(mb, "dump")
        restore_ratio[mb] = bench.median(mb, "restore") / bench.median(mb, "prestore")
        print(
            f"{mb:>4}M {ms(mb, 'ckpt'):12.1f} {ms(mb, 'dump'):10.1f} {ckpt_ratio[mb]:6.2f}"
            f" {ms(mb, 'restore'):15.1f} {ms(mb, 'prestore'):13.1f} {restore_ratio[mb]:6.2f}"
            f" {ms(mb, 'frozen'):7.1f}"
        )
    print()
    print("where corral's time goes (medians, ms; 'criu' = its criu process, fork to exit;")
    print("'extra' = total minus that: what corral adds to the CRIU it runs)")
    print(
        f"{'size':>5} {'ckpt: criu':>11} {'cp -a':>7} {'other':>7} {'extra':>7}"
        f" {'restore: criu':>14} {'cp -a':>7} {'nft unlock':>11} {'other':>7} {'extra':>7}"
    )
    for mb in SIZES:
        print(
            f"{mb:>4}M {ms(mb, 'ckpt:criu'):11.1f} {ms(mb, 'ckpt:cp'):7.1f}"
            f" {ms(mb, 'ckpt:other'):7.1f} {ms(mb, 'ckpt:extra'):7.1f}"
            f" {ms(mb, 'restore:criu'):14.1f} {ms(mb, 'restore:cp'):7.1f}"
            f" {ms(mb, 'restore:nft'):11.1f} {ms(mb, 'restore:other'):7.1f}"
            f" {ms(mb, 'restore:extra'):7.1f}"
        )
    print()
    print("noise check: ratio of minimums; 1 + extra / plain median (corral's own steps only)")
    for mb in SIZES:
        low = {k: min(bench.samples[(mb, k)]) for k in ("ckpt", "dump", "restore", "prestore")}
        print(
            f"{mb:>4}M ckpt {low['ckpt'] / low['dump']:.2f}"
            f" {1 + bench.median(mb, 'ckpt:extra') / bench.median(mb, 'dump'):.2f}"
            f"   restore {low['restore'] / low['prestore']:.2f}"
            f" {1 + bench.median(mb, 'restore:extra') / bench.median(mb, 'prestore'):.2f}"
        )
    print()
    print("frozen by a --leave-running checkpoint (medians, ms): 'stood still' = corral's")
    print("freeze call to its first thaw's return, plus the pre-dump's freeze (CRIU's")
    print("stats-dump frozen_time of the pre-dump); CheckpointInfo.frozen; CRIU's frozen_time")
    print("of the final dump")
    print(
        f"{'size':>5} {'ours':>8} {'pre-dump':>9} {'stood still':>12} {'info.frozen':>12}"
        f" {'criu frozen':>12}"
    )
    for mb in SIZES:
        has_criu = (mb, "frozen:criu") in bench.samples
        criu_frozen = f"{ms(mb, 'frozen:criu'):12.1f}" if has_criu else f"{'n/a':>12}"
        print(
            f"{mb:>4}M {ms(mb, 'frozen:ours'):8.1f} {ms(mb, 'frozen:pre'):9.1f}"
            f" {ms(mb, 'frozen'):12.1f} {ms(mb, 'frozen:info'):12.1f} {criu_frozen}"
        )
    print()
    sizes = [
        f"{mb}M {bench.median(mb, 'ckpt:size') / MB:.1f}/{bench.median(mb, 'dump:size') / MB:.1f}"
        for mb in SIZES
    ]
    print("checkpoint sizes, MB (corral with its layer copy / plain images):", ", ".join(sizes))
    print(f"wall time {time.monotonic() - started:.0f} s")
    print(
        "overhead ratios = corral / plain CRIU, the worse (max) of the 16M and 256M medians;"
        " target <= 1.2"
    )
    print(f"checkpoint_overhead_ratio: {max(ckpt_ratio.values()):.2f}")
    print(f"restore_overhead_ratio: {max(restore_ratio.values()):.2f}")
    print(f"frozen_ms_256M: {ms(256, 'frozen'):.1f}")


if __name__ == "__main__":
    main()
