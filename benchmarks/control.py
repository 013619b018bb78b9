"""Control verbs: ``corral exec``, ``pause`` and ``resume`` against runc, one run.

Usage (as root)::

    .venv/bin/python benchmarks/control.py [--runs 30] [--warmup 3]

One sandbox and one runc container run ``sleep 1000000`` on the same
busybox rootfs with the same limits (memory 64M, pids 64, CPU 0.5): the
sandbox under a ``corral up`` started here (private state and run
directories in a scratch directory), the container detached (``runc run
-d``) with its own ``--root`` (benchmarks/_peers.py, ``RuncServicePeer``).
Each sample times one contender; the contenders alternate sample by sample
(the order rotates every round) so that noise hits every one alike:

exec (each ends once ``/bin/true`` has run in the sandbox and exited)
    ``corral-cli``: ``corral exec NAME -- /bin/true`` as a user types it,
    interpreter start included (run as ``python -m supervisor``, as in
    ``start.py``); ``runc``: ``runc exec NAME /bin/true``;
    ``corral-lib``: the same request from a program that drives corral --
    a fresh connection to the control socket from this (running)
    interpreter, an ``exec`` request carrying three new pipes as the
    process's stdio (SCM_RIGHTS), wait for the answer, drain the pipes to
    end of file. That is what ``corral exec`` does after its start-up
    (``_exec_client.run_exec``, minus signal forwarding), and what any
    program pays per exec. runc has no such second form: every program
    that drives runc (containerd's shim, conmon) spawns the runc binary per
    verb, so ``runc`` is both its CLI and its "library" figure, and
    ``corral-lib`` against ``runc`` compares what a program pays in each
    case, as ``start.py``'s ``corral-lib`` does.
pause+resume (the sum of both; each returns once the kernel reports the
cgroup frozen, or after writing THAWED)
    ``corral-cli``: ``corral pause NAME`` then ``corral resume NAME``;
    ``runc``: ``runc pause NAME`` then ``runc resume NAME``;
    ``corral-lib``: ``call(socket, "pause", ...)`` then ``call(socket,
    "resume", ...)`` from this interpreter (one connection each).
start-up (references, to see where the CLI's time goes)
    ``python -c pass``, ``python -m supervisor --version`` (interpreter and
    the CLI's own imports, no verb) and ``runc --version`` (a Go binary).
CLI overhead (after the rounds above, the supervisor idle)
    ``python -m supervisor --version`` and ``python -c pass`` alone, more
    samples (``--overhead-runs``, equal counts), alternating: each round
    runs each once, the order rotating every round. What the CLI adds to
    a bare interpreter start before any verb runs. With the installed
    ``corral`` script beside the interpreter, its ``corral --version`` is
    a third in the rotation (pip's wrapper script imports ``re`` where
    ``-m`` imports ``runpy``).

Times are wall times (``time.perf_counter``) from spawning the command
(or connecting) until it has exited and its output is drained; the CLIs
run with stdin ``/dev/null`` and their output captured. Every sample's
outcome is checked (exit status 0, the state reported). Everything is
removed at the end, also on failure: the supervisor is stopped with
SIGTERM, the runc container deleted, no ``corral-*`` cgroup of ours may be
left, the scratch directory goes.

``cli_overhead_ms: X.XX`` is the median of ``python -m supervisor
--version`` less that of ``python -c pass`` from the CLI overhead samples;
a line before it gives each CLI verb's median less the ``python -c pass``
row's (the ``pause`` and ``resume`` rows are the two halves of the
pause+resume samples).
The last two lines are exactly ``exec_ratio_vs_runc: X.XX`` and
``pause_resume_ratio_vs_runc: X.XX``: median over median, the CLIs
against each other. Lower is better.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from _corral import scratch_dir
from _peers import (
    PeerError,
    RuncPeer,
    RuncServicePeer,
    leftover_cgroups,
    leftover_mounts,
    median_ms,
    p90_ms,
)

from rootfs import ensure_busybox
from supervisor._control._client import CONTROL_SOCKET, Client, call
from supervisor._errors import CorralError
from supervisor._runtime._lxcfs import Lxcfs

FLEET = """
[[sandbox]]
name = "{name}"
rootfs = "{rootfs}"
command = ["/bin/sleep", "1000000"]
memory = "64M"
pids = 64
cpus = 0.5
"""

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
PROBE = ["/bin/true"]


class BenchError(RuntimeError):
    """A contender failed, or something was left behind."""


def timed(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run *argv* to its end; (wall seconds, stdout). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(argv), env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(
            f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.decode().strip()}"
        )
    return dt, proc.stdout.decode()


class CorralFleet:
    """``corral up`` on a one-sandbox fleet, as a subprocess, in *scratch*."""

    def __init__(self, scratch: Path, name: str, rootfs: str) -> None:
        self.scratch = scratch
        self.name = name
        #: The sandbox's one instance, which every verb names.
        self.instance = f"{name}-0"
        self.env = {
            **os.environ,
            "CORRAL_STATE_DIR": str(scratch / "state"),
            "CORRAL_RUN_DIR": str(scratch / "run"),
        }
        #: The control socket.
        self.socket = str(scratch / "run" / CONTROL_SOCKET)
        self.log = scratch / "supervisor.log"
        self.fleet = scratch / "fleet.toml"
        self.fleet.write_text(FLEET.format(name=name, rootfs=rootfs))
        self.proc: subprocess.Popen[bytes] | None = None
        #: Each ``corral pause`` and ``corral resume`` of pause_resume_cli, apart.
        self.pause_cli: list[float] = []
        self.resume_cli: list[float] = []

    def __enter__(self) -> CorralFleet:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "up", str(self.fleet)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            self._wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_running(self) -> None:
        """Until ``ps`` (what ``corral ps`` asks) shows the instance running."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        state = "no control socket"
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"corral up exited ({self.proc.returncode}): {self._tail()}")
            if os.path.exists(self.socket):
                try:
                    rows = call(self.socket, "ps")
                except CorralError as exc:
                    state = str(exc)
                else:
                    states = {r["name"]: r["state"] for r in rows}
                    state = states.get(self.instance, "not listed")
                    if state == "running":
                        return
                    if state in ("failed", "exited", "stopped"):
                        raise BenchError(f"{self.instance} is {state}: {self._tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.instance} not running after {READY_TIMEOUT_S:g} s ({state})"
                )
            time.sleep(0.01)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the supervisor by its PID and wait (SIGKILL after a minute)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.proc = None

    # -- the contenders ---------------------------------------------------------------

    def cli(self, *args: str) -> tuple[float, str]:
        """Time ``corral ARGS`` (``python -m supervisor``, as start.py runs it)."""
        return timed([sys.executable, "-m", "supervisor", *args], self.env)

    def exec_cli(self) -> float:
        return self.cli("exec", self.instance, "--", *PROBE)[0]

    def exec_lib(self) -> float:
        """One ``exec`` request on a fresh connection, as ``run_exec`` sends it."""
        params: dict[str, Any] = {"name": self.instance, "argv": PROBE, "env": {}, "tty": False}
        t0 = time.perf_counter()
        with Client(self.socket) as client:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            try:
                rid = client.request("exec", params, fds=(stdin_r, out_w, err_w))
            finally:
                for fd in (stdin_r, out_w, err_w, stdin_w):  # stdin: at end of file
                    os.close(fd)
            try:
                result = client.answer(rid)
                for fd in (out_r, err_r):
                    while os.read(fd, 65536):
                        pass
            finally:
                os.close(out_r)
                os.close(err_r)
        dt = time.perf_counter() - t0
        if result.get("status") != 0:
            raise BenchError(f"exec {PROBE} in {self.instance}: status {result.get('status')}")
        return dt

    def pause_resume_cli(self) -> float:
        dt1, out1 = self.cli("pause", self.instance)
        dt2, out2 = self.cli("resume", self.instance)
        if " paused " not in out1 or " running " not in out2:
            raise BenchError(f"corral pause/resume reported:\n{out1}{out2}")
        self.pause_cli.append(dt1)
        self.resume_cli.append(dt2)
        return dt1 + dt2

    def pause_resume_lib(self) -> float:
        params = {"name": self.instance}
        t0 = time.perf_counter()
        paused = call(self.socket, "pause", params)
        t1 = time.perf_counter()
        resumed = call(self.socket, "resume", params)
        t2 = time.perf_counter()
        if paused[0]["state"] != "paused" or resumed[0]["state"] != "running":
            raise BenchError(f"pause/resume answered {paused} then {resumed}")
        return (t1 - t0) + (t2 - t1)


def runc_pause_resume(peer: RuncServicePeer) -> Callable[[], float]:
    def sample() -> float:
        return peer.pause_once() + peer.resume_once()

    return sample


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the clean-up below


def cli_overhead(runs: int, warmup: int) -> dict[str, list[float]]:
    """Samples of a bare interpreter start and of ``corral --version``, alternating.

    Each round runs every command once, the order rotated by one every
    round, so that each is sampled as often as the others, at every place
    in the round, and noise hits them alike.
    """
    py = sys.executable
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "python -m supervisor --version": [py, "-m", "supervisor", "--version"],
    }
    script = os.path.join(os.path.dirname(py), "corral")
    if os.access(script, os.X_OK):
        commands["corral --version (script)"] = [script, "--version"]
    order = list(commands)
    samples: dict[str, list[float]] = {k: [] for k in order}
    for i in range(warmup + runs):
        k = i % len(order)
        for key in order[k:] + order[:k]:
            dt = timed(commands[key])[0]
            if i >= warmup:
                samples[key].append(dt)
    return samples


def run(
    args: argparse.Namespace,
) -> tuple[dict[tuple[str, str], list[float]], dict[str, list[float]]]:
    scratch = scratch_dir("corral-bench-control-")
    scratch.chmod(0o711)  # a user-namespace sandbox's root mounts its layers below
    # Made here, searchable too: the supervisor would make it 0700, and the
    # sandbox's root could not reach corral's lxcfs, which runs below it.
    (scratch / "run").mkdir(mode=0o711)
    name = f"ctlbench-{os.getpid()}"
    runc: RuncServicePeer | None = None
    problems: list[str] = []
    try:
        rootfs = ensure_busybox(scratch / "state" / "images")
        if not (verdict := RuncPeer.available(rootfs)):
            raise BenchError(f"runc is not available ({verdict.reason}): no ratio possible")
        runc = peer = RuncServicePeer(rootfs, scratch / "runc")
        peer.setup()
        with CorralFleet(scratch, name, rootfs) as fleet:
            py = sys.executable
            contenders: dict[tuple[str, str], Callable[[], float]] = {
                ("exec", "corral-cli"): fleet.exec_cli,
                ("exec", "corral-lib"): fleet.exec_lib,
                ("exec", "runc"): peer.exec_once,
                ("pause+resume", "corral-cli"): fleet.pause_resume_cli,
                ("pause+resume", "corral-lib"): fleet.pause_resume_lib,
                ("pause+resume", "runc"): runc_pause_resume(peer),
                ("start-up", "python -c pass"): lambda: timed([py, "-c", "pass"])[0],
                ("start-up", "corral --version"): lambda: fleet.cli("--version")[0],
                ("start-up", "runc --version"): lambda: timed([peer.runc, "--version"])[0],
            }
            order = list(contenders)
            samples: dict[tuple[str, str], list[float]] = {k: [] for k in order}
            for i in range(args.warmup + args.runs):
                k = i % len(order)
                for key in order[k:] + order[:k]:
                    dt = contenders[key]()
                    if i >= args.warmup:
                        samples[key].append(dt)
                if i == 0:
                    # Once: both really are frozen in between, and back.
                    peer.pause_once()
                    paused = peer.state()
                    peer.resume_once()
                    if (paused, peer.state()) != ("paused", "running"):
                        raise BenchError(f"runc pause/resume: {paused}, then {peer.state()}")
            # The two verbs of the pause+resume samples, apart (rows of their own).
            samples["pause", "corral-cli"] = fleet.pause_cli[args.warmup :]
            samples["resume", "corral-cli"] = fleet.resume_cli[args.warmup :]
            overhead = cli_overhead(args.overhead_runs, args.warmup)
    finally:
        # The supervisor is stopped (CorralFleet's exit): its cgroups must be gone.
        if runc is not None:
            try:
                runc.teardown()
            except PeerError as exc:
                problems.append(str(exc))
        deadline = time.monotonic() + 5.0
        markers = [f"corral-{name}-"] + ([runc.prefix] if runc is not None else [])
        while (stale := [p for m in markers for p in leftover_cgroups(m)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)  # a cgroup goes a moment after its last task
        if stale:
            problems.append(f"cgroups left: {[str(p) for p in stale]}")
        # corral's lxcfs outlives its supervisor by design (the next one takes
        # it back): this run directory is about to go.
        Lxcfs(str(scratch / "run"), "auto", say=lambda line: None).stop(force=True)
        mounts = leftover_mounts(scratch)
        if mounts:
            problems.append(f"still mounted, {scratch} kept: {[str(m) for m in mounts]}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        if problems:
            print("control.py: clean-up incomplete: " + "; ".join(problems), file=sys.stderr)
    if problems:
        raise BenchError("clean-up incomplete (see above)")
    return samples, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="samples per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--overhead-runs",
        type=int,
        default=100,
        help="samples per command of the CLI overhead (interpreter start, --version)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("control.py: must run as root (sandboxes, runc)")
    if args.runs < 1 or args.warmup < 0 or args.overhead_runs < 1:
        raise SystemExit("control.py: --runs >= 1, --overhead-runs >= 1, --warmup >= 0, please")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        samples, overhead = run(args)
    except (BenchError, PeerError, CorralError) as exc:
        raise SystemExit(f"control.py: {exc}") from None

    head = f"{'verb':13} {'contender':17} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}"
    print(f"{head}   (n={args.runs})")
    med: dict[tuple[str, str], float] = {}
    for (verb, who), xs in samples.items():
        med[verb, who] = statistics.median(xs)
        print(f"{verb:13} {who:17} {median_ms(xs):10.2f} {p90_ms(xs):8.2f} {min(xs) * 1e3:8.2f}")
    head = f"{'CLI overhead':31} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}"
    print(f"{head}   (n={args.overhead_runs})")
    for who, xs in overhead.items():
        print(f"{who:31} {median_ms(xs):10.2f} {p90_ms(xs):8.2f} {min(xs) * 1e3:8.2f}")
    cli_ms = median_ms(overhead["python -m supervisor --version"]) - median_ms(
        overhead["python -c pass"]
    )
    lib_exec = med["exec", "corral-lib"] / med["exec", "runc"]
    lib_pr = med["pause+resume", "corral-lib"] / med["pause+resume", "runc"]
    print(f"exec_lib_ratio_vs_runc: {lib_exec:.2f}")
    print(f"pause_resume_lib_ratio_vs_runc: {lib_pr:.2f}")
    start = med["start-up", "python -c pass"]
    print(
        "the CLI verbs over a bare start:"
        + ",".join(
            f" {verb} {(med[verb, 'corral-cli'] - start) * 1e3:.2f} ms"
            for verb in ("exec", "pause", "resume")
        )
    )
    print(f"cli_overhead_ms: {cli_ms:.2f}")
    print(f"exec_ratio_vs_runc: {med['exec', 'corral-cli'] / med['exec', 'runc']:.2f}")
    print(
        "pause_resume_ratio_vs_runc:"
        f" {med['pause+resume', 'corral-cli'] / med['pause+resume', 'runc']:.2f}"
    )


if __name__ == "__main__":
    main()
