"""Takeover: a new ``corral up`` adopting 1,000 running sandboxes, one run.

Usage (as root; on a shared machine under the tests' lock)::

    .venv/bin/python benchmarks/takeover.py [--count 1000] [--keep] [--profile FILE]

What it does, against real ``corral up`` subprocesses in private state and
run directories (a temporary directory, removed at the end):

1. a fleet of one ``[[sandbox]]`` with ``replicas = COUNT`` running
   ``sleep 100000`` on the busybox rootfs;
2. **fresh start**: the first ``corral up``, from its launch until every
   instance's ``started`` has been read from its JSON log (stdout); its
   RSS (``VmRSS``) and open descriptors then. A ``start_failed`` is not
   what is measured here: it is reported and the instance started again
   (``corral start``), its time included;
3. SIGKILL of that supervisor: the sandboxes run on, held by the keeper
   (checked: every init alive);
4. **takeover**: a second ``corral up`` on the same fleet and directories,
   from its launch until COUNT ``adopted`` events have been read from its
   log (each with the PID the first one started and ``changed`` false; no
   ``started``); its RSS and descriptors then;
5. SIGTERM of the second supervisor, which must exit 0 having stopped every
   sandbox; then nothing may be left: the keeper exited, no init alive, no
   ``corral-NAME-*`` cgroup, no record.

Where the time goes: a ``corral up`` with ``replicas = 0`` (the start-up
every ``corral up`` pays: interpreter, imports, keeper, journal), and each
run's phases (:func:`phases`) from when the events were published (their
``wall`` time in the journal), when they were logged (the log line's ISO
timestamp) and when this process read them, all against the launch.
``--profile FILE`` runs the second supervisor under cProfile, from its
start until every sandbox is adopted, and writes the stats of its trio
thread to FILE and those of the survey (a worker thread) to FILE.survey;
its times are then inflated.

The benchmark process makes itself a child subreaper, so that the keeper,
orphaned when the first supervisor is killed, is re-parented to it and
reaped here, not by whatever PID 1 the machine has. The soft limit on open
files is raised for the supervisors if it is below what COUNT needs (a
supervisor holds about nine descriptors per sandbox: see the census).

The last two lines are exactly ``takeover_1000_s: X`` (the takeover time
in seconds, whatever COUNT is) and ``adopted: N``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from _corral import scratch_dir

import events
from supervisor._runtime._linux._syscalls import set_child_subreaper

FLEET = """
[supervisor]
grace_period = "5s"

[[sandbox]]
name = "{name}"
replicas = {count}
command = ["sleep", "100000"]
"""

# Measured on cgroup v1: 8 descriptors per sandbox after a fresh start, 9
# after a takeover; with room to spare. The keeper holds two per sandbox.
FDS_PER_SANDBOX = 12
FDS_BASE = 1024
TIMEOUT = 300.0

# The second supervisor under cProfile: `main`, not `entry`, which would
# leave with os._exit before the stats are written. The benchmark sends
# SIGUSR1 once every sandbox is adopted, which ends the profile there (the
# stop is another matter). The survey runs in a worker thread, out of sight
# of a profiler of the trio thread: it gets its own (FILE.survey).
PROFILED = """
import cProfile, signal, sys
from supervisor._cli import main
from supervisor._core import _supervisor as core

take_back = core.Supervisor._take_back

def profiled_take_back(self):
    prof = cProfile.Profile()
    try:
        return prof.runcall(take_back, self)
    finally:
        prof.dump_stats(sys.argv[1] + ".survey")

core.Supervisor._take_back = profiled_take_back
prof = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: prof.disable())
status = prof.runcall(main, sys.argv[2:])
prof.dump_stats(sys.argv[1])
sys.exit(status)
"""

Record = dict[str, object]


@dataclass
class Up:
    """One ``corral up`` subprocess, its JSON log read as it comes."""

    proc: subprocess.Popen[bytes]
    launched: float
    """time.perf_counter() just before the launch."""
    launched_wall: float
    """time.time() at the same moment, to compare with the supervisor's times."""
    log: list[Record] = field(default_factory=list)
    _buf: bytes = b""

    def read_until(
        self,
        done: Callable[[Record], bool],
        timeout: float = TIMEOUT,
        on_failed: Callable[[Record], None] | None = None,
    ) -> float:
        """Read log lines until *done* is true of one; return the
        perf_counter time at which that line had been read. A
        ``start_failed`` goes to *on_failed*, or ends the benchmark."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                rec: Record = json.loads(line)
                self.log.append(rec)
                if rec.get("event") == "start_failed":
                    if on_failed is None:
                        raise SystemExit(f"a sandbox failed to start: {json.dumps(rec)}")
                    on_failed(rec)
                if done(rec):
                    return time.perf_counter()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"corral up (pid {self.proc.pid}): timed out after {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise SystemExit(f"corral up (pid {self.proc.pid}) ended early")
                self._buf += chunk

    def count_until(
        self, kind: str, n: int, on_failed: Callable[[Record], None] | None = None
    ) -> float:
        """Read until *kind* events of *n* distinct sandboxes have been
        read; return that time."""
        seen = {r.get("sandbox") for r in self.log if r.get("event") == kind}

        def done(rec: Record) -> bool:
            if rec.get("event") == kind:
                seen.add(rec.get("sandbox"))
            return len(seen) >= n

        if len(seen) >= n:
            return time.perf_counter()
        return self.read_until(done, on_failed=on_failed)

    def of(self, kind: str) -> list[Record]:
        return [r for r in self.log if r.get("event") == kind]

    def stop(self, timeout: float = TIMEOUT) -> tuple[int, float]:
        """SIGTERM; wait for the exit (reading the log meanwhile, so that a
        full pipe never blocks it); return (status, seconds)."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self.log += [json.loads(line) for line in (self._buf + out).splitlines()]
        self._buf = b""
        return self.proc.returncode, time.perf_counter() - t0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate()

    def save(self, path: Path) -> None:
        """The log as read, for a look afterwards (``--keep``)."""
        path.write_text("".join(json.dumps(r) + "\n" for r in self.log))


def _raise_nofile(need: int) -> Callable[[], None]:
    """A preexec function that raises the child's soft open-file limit to
    *need* (bounded by the hard limit), leaving ours alone."""

    def preexec() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    return preexec


def launch(
    fleet: Path, env: dict[str, str], stderr: Path, nofile: int, profile: str | None = None
) -> Up:
    head = ["-c", PROFILED, profile] if profile else ["-m", "supervisor"]
    with open(stderr, "ab") as err:
        t0, wall = time.perf_counter(), time.time()
        proc = subprocess.Popen(
            [sys.executable, *head, "up", "--json", str(fleet)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            preexec_fn=_raise_nofile(nofile),
        )  # fmt: skip
    return Up(proc, t0, wall)


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_census(pid: int) -> Counter[str]:
    """A process's open descriptors by kind (pipe, pidfd, eventfd, file ...)."""
    kinds: Counter[str] = Counter()
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(folder, fd))
            if target.startswith("anon_inode:"):
                kinds[target.removeprefix("anon_inode:").strip("[]")] += 1
            elif target.startswith(("pipe:", "socket:")):
                kinds[target.split(":")[0]] += 1
            else:
                kinds["file"] += 1
    return kinds


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def logged_at(rec: Record) -> float:
    """A log line's ISO timestamp (when it was logged) as epoch seconds."""
    return datetime.fromisoformat(str(rec["timestamp"])).timestamp()


def published_at(journal: Path) -> dict[int, float]:
    """Each event's ``wall`` time (when it was published), by seq."""
    with events.Journal(str(journal)) as j:
        return {e.seq: e.wall for e in j.replay(1)}


def phases(
    up: Up, kind: str, read_at: float, published: dict[int, float]
) -> list[tuple[str, float]]:
    """Where the time from the launch to the last *kind* read here went.

    Up to ``supervisor_started``: the interpreter, imports, the keeper, the
    journal and, for a takeover, the survey of what the predecessor left
    (a worker thread). Then the instance tasks, up to the first and the last
    *kind* published; then the log task writing its line; then the pipe.
    """

    def pub(rec: Record) -> float:
        return published[int(rec["seq"])]  # type: ignore[call-overload]

    started = pub(up.of("supervisor_started")[0])
    evs = up.of(kind)
    first, last = min(map(pub, evs)), max(map(pub, evs))
    logged = max(map(logged_at, evs))
    read = up.launched_wall + (read_at - up.launched)
    return [
        ("launch -> supervisor_started", started - up.launched_wall),
        (f"-> first {kind} published", first - started),
        (f"-> last {kind} published", last - first),
        (f"-> last {kind} logged", logged - last),
        ("-> read here", read - logged),
    ]


def our_cgroups(name: str) -> list[str]:
    """Cgroup directories of our sandboxes (``corral-NAME-*``), anywhere in
    every hierarchy: what must be gone at the end."""
    prefix = f"corral-{name}-"
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d.startswith(prefix)]
        # Never below a sandbox's cgroup, ours or anyone else's.
        dirs[:] = [d for d in dirs if not d.startswith("corral-")]
    return found


def dirs_env(state: Path, run: Path) -> dict[str, str]:
    return {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_RUN_DIR": str(run)}


def empty_startup(scratch: Path, name: str) -> float:
    """Launch to ``supervisor_started`` published, of a ``corral up`` with no sandboxes."""
    fleet = scratch / "empty.toml"
    fleet.write_text(FLEET.format(name=name, count=0))
    env = dirs_env(scratch / "empty-state", scratch / "empty-run")
    up = launch(fleet, env, scratch / "empty.err", FDS_BASE)
    try:
        up.read_until(lambda r: r.get("event") == "supervisor_started")
    finally:
        status, _ = up.stop()
    if status != 0:
        raise SystemExit(f"the empty corral up exited {status}")
    seq = int(up.of("supervisor_started")[0]["seq"])  # type: ignore[call-overload]
    return published_at(scratch / "empty-state" / "journal")[seq] - up.launched_wall


@dataclass
class Result:
    fresh_s: float = 0.0
    takeover_s: float = 0.0
    stop_s: float = 0.0
    empty_s: float = 0.0
    adopted: int = 0
    rss_first_kb: int = 0
    rss_second_kb: int = 0
    hwm_second_kb: int = 0
    rss_keeper_kb: int = 0
    fds_first: Counter[str] = field(default_factory=Counter)
    fds_second: Counter[str] = field(default_factory=Counter)
    fds_keeper: Counter[str] = field(default_factory=Counter)
    start_failures: list[str] = field(default_factory=list)
    fresh_phases: list[tuple[str, float]] = field(default_factory=list)
    takeover_phases: list[tuple[str, float]] = field(default_factory=list)


def bench(
    scratch: Path, count: int, nofile: int, ups: list[Up], profile: str | None = None
) -> Result:
    name = "tk" + secrets.token_hex(3)
    state, run = scratch / "state", scratch / "run"
    env = dirs_env(state, run)
    fleet = scratch / "fleet.toml"
    fleet.write_text(FLEET.format(name=name, count=count))
    res = Result()
    res.empty_s = empty_startup(scratch, name)

    print(f"fresh start of {count} sandboxes ...", file=sys.stderr)
    first = launch(fleet, env, scratch / "first.err", nofile)
    ups.append(first)
    retries: list[subprocess.Popen[bytes]] = []

    def retry(rec: Record) -> None:
        # Not waited for here: the supervisor must never block on a full
        # log pipe while `corral start` waits for it.
        print(f"start_failed, started again: {rec.get('error')}", file=sys.stderr)
        res.start_failures.append(str(rec.get("error")))
        again = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "start", str(rec["sandbox"])],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        retries.append(again)

    first_read = first.count_until("started", count, on_failed=retry)
    res.fresh_s = first_read - first.launched
    res.rss_first_kb = status_kb(first.proc.pid, "VmRSS")
    res.fds_first = fd_census(first.proc.pid)
    for p in retries:
        if p.wait(timeout=TIMEOUT) != 0:
            raise SystemExit(f"corral start of a failed sandbox exited {p.returncode}")
    # The latest generation of each instance (a failed start was retried).
    pids = {str(r["sandbox"]): int(r["pid"]) for r in first.of("started")}  # type: ignore[call-overload]
    keeper = int((run / "keeper.lock").read_text().split()[0])
    res.rss_keeper_kb = status_kb(keeper, "VmRSS")
    res.fds_keeper = fd_census(keeper)

    first.kill()
    ups.remove(first)
    first.save(scratch / "first.jsonl")
    dead = [n for n, pid in pids.items() if not alive(pid)]
    if dead or not alive(keeper):
        raise SystemExit(f"the sandboxes did not outlive their supervisor: {dead[:5]} ...")

    print(f"takeover of {count} sandboxes ...", file=sys.stderr)
    second = launch(fleet, env, scratch / "second.err", nofile, profile)
    ups.append(second)
    second_read = second.count_until("adopted", count)
    res.takeover_s = second_read - second.launched
    if profile:
        second.proc.send_signal(signal.SIGUSR1)
    res.rss_second_kb = status_kb(second.proc.pid, "VmRSS")
    res.hwm_second_kb = status_kb(second.proc.pid, "VmHWM")
    res.fds_second = fd_census(second.proc.pid)
    adopted = {str(r["sandbox"]): r for r in second.of("adopted")}
    res.adopted = sum(
        1
        for n, pid in pids.items()
        if n in adopted and adopted[n]["pid"] == pid and adopted[n]["changed"] is False
    )
    if second.of("started"):
        raise SystemExit("the second supervisor started sandboxes instead of adopting them")

    status, res.stop_s = second.stop()
    ups.remove(second)
    second.save(scratch / "second.jsonl")
    if status != 0:
        raise SystemExit(f"the second corral up exited {status}; see {scratch}/second.err")
    check_clean(name, pids, keeper, run)

    published = published_at(state / "journal")
    res.fresh_phases = phases(first, "started", first_read, published)
    res.takeover_phases = phases(second, "adopted", second_read, published)
    return res


def check_clean(name: str, pids: dict[str, int], keeper: int, run_dir: Path) -> None:
    """Nothing of ours may be left: sandboxes, the keeper, cgroups, records."""
    # The keeper was re-parented to us (a subreaper) when its first
    # supervisor died: it is ours to reap once it has exited.
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(keeper, os.WNOHANG)[0] == keeper:
                break
        if not alive(keeper):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the keeper (pid {keeper}) did not exit")
        time.sleep(0.01)
    left = [n for n, pid in pids.items() if alive(pid)]
    cgroups = our_cgroups(name)
    records = os.listdir(run_dir / "sandboxes") if (run_dir / "sandboxes").exists() else []
    if left or cgroups or records:
        raise SystemExit(
            f"left behind: {len(left)} sandboxes, {len(cgroups)} cgroups"
            f" ({cgroups[:3]}), {len(records)} records"
        )


def cleanup(scratch: Path, ups: list[Up], nofile: int) -> None:
    """After a failure: stop what runs; if a killed supervisor's sandboxes
    may be left with the keeper, one more ``corral up`` takes them back
    and stops them."""
    for up in ups:
        try:
            up.stop(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
    records = scratch / "run" / "sandboxes"
    if records.exists() and os.listdir(records):
        env = dirs_env(scratch / "state", scratch / "run")
        up = launch(scratch / "fleet.toml", env, scratch / "cleanup.err", nofile)
        try:
            up.read_until(lambda r: r.get("event") == "supervisor_started")
        finally:
            up.stop(timeout=120)
    # The keeper, and any `corral start` of a retry: ours to reap.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _census(kinds: Counter[str]) -> str:
    return f"{sum(kinds.values())} (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + ")"


def report(res: Result, n: int) -> None:
    """The table, then what it is made of."""
    mib = 1 / 1024
    rows = [
        (f"launch -> all {n} (s)", f"{res.fresh_s:.3f}", f"{res.takeover_s:.3f}"),
        (
            "supervisor VmRSS (MiB)",
            f"{res.rss_first_kb * mib:.1f}",
            f"{res.rss_second_kb * mib:.1f}",
        ),
        ("supervisor fds", str(res.fds_first.total()), str(res.fds_second.total())),
    ]
    print(f"{'':26} {'fresh start':>12} {'takeover':>12}")
    for what, a, b in rows:
        print(f"{what:26} {a:>12} {b:>12}")
    print(f"takeover / fresh start: {res.takeover_s / res.fresh_s:.3f}")
    if res.start_failures:
        print(
            f"fresh start: {len(res.start_failures)} start_failed, started again (time included):"
        )
        for error in res.start_failures:
            print(f"  {error}")
    print(f"corral up of no sandboxes, launch -> supervisor_started: {res.empty_s:.3f} s")
    print(f"taking-over supervisor: VmHWM {res.hwm_second_kb * mib:.1f} MiB,", end=" ")
    print(f"SIGTERM -> exit 0 (all {n} stopped) in {res.stop_s:.2f} s")
    print(f"keeper holding {n}: VmRSS {res.rss_keeper_kb * mib:.1f} MiB")
    print(f"fds: fresh supervisor {_census(res.fds_first)}")
    print(f"     taking-over supervisor {_census(res.fds_second)}")
    print(f"     keeper {_census(res.fds_keeper)}")
    for title, ph in (("fresh start", res.fresh_phases), ("takeover", res.takeover_phases)):
        print(f"{title}, from the launch:")
        for what, dt in ph:
            print(f"  {what:38} {dt:8.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="sandboxes (at most 1000)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the taking-over supervisor")
    args = parser.parse_args()
    if not 1 <= args.count <= 1000:
        parser.error("--count: from 1 to 1000 (a fleet entry's most replicas)")

    set_child_subreaper()
    nofile = FDS_BASE + FDS_PER_SANDBOX * args.count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < nofile:
        if hard != resource.RLIM_INFINITY and hard < nofile:
            raise SystemExit(f"open files: need {nofile}, the hard limit is {hard}")
        print(f"open files: soft limit {soft} raised to {nofile} for corral up", file=sys.stderr)
    profile = os.path.abspath(args.profile) if args.profile else None

    scratch = scratch_dir("corral-bench-takeover-")
    ups: list[Up] = []
    ok = False
    try:
        res = bench(scratch, args.count, nofile, ups, profile)
        ok = True
    finally:
        if not ok:
            cleanup(scratch, ups, nofile)
        if args.keep or not ok:
            print(f"scratch directory kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    report(res, args.count)
    if profile:
        print(f"(profiled: the takeover time is inflated; stats in {profile})")
    print(f"takeover_1000_s: {res.takeover_s:.3f}")
    print(f"adopted: {res.adopted}")


if __name__ == "__main__":
    main()
