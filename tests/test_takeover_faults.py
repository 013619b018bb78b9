"""Fault injection (issue 14): a busy fleet whose supervisor is SIGKILLed
at random moments, 50 times in a row, restarted each time; and one whose
keeper (the holder of the sandboxes) is SIGKILLed 50 times instead.

Afterwards every sandbox is accounted for (each generation that ran has
exactly one ``exited``), no instance ever ran twice at once, the journal's
sequence numbers are strictly increasing across all runs, no sandbox died
of SIGPIPE, and nothing leaked (the ``dirs`` fixture checks cgroups, layers,
records and the keeper).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import events
from supervisor._runtime._linux._proc import parent_pid, starttime

from .conftest import Dirs, requires_root

pytestmark = [requires_root]

ROUNDS = 50
FLEET = """
[supervisor]
grace_period = "1s"

[plugins.restart]
policy = "always"
delay = "10ms"
max_delay = "50ms"
intensity = 100000

[[sandbox]]
name = "crash"
replicas = 2
command = "sleep 0.05; exit 1"

[[sandbox]]
name = "hog"
memory = "32M"
command = "x=0123456789abcdef; while :; do x=$x$x; done"

[[sandbox]]
name = "talk"
command = "while :; do echo tick tick tick; sleep 0.005; done"

[[sandbox]]
name = "steady"
command = "sleep 100000"
"""


def _exec_in_steady(dirs: Dirs) -> subprocess.Popen[bytes]:
    """A `corral exec` into steady-0, not waited for (it may meet a dying
    supervisor or keeper: its outcome is not the point)."""
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "exec", "steady-0", "--", "true"],
        env=dirs.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _live(record: dict[str, object]) -> bool:
    """The record's init runs (same PID and start time)."""
    try:
        return bool(starttime(int(record["pid"])) == int(record["starttime"]))  # type: ignore[call-overload]
    except (OSError, ValueError, IndexError):
        return False


def _running_per_instance(run: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in (run / "sandboxes").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if _live(record):
                counts[str(record["labels"]["instance"])] += 1
    return counts


def test_a_supervisor_killed_fifty_times_loses_nothing(dirs: Dirs, tmp_path: Path) -> None:
    seed = int(os.environ.get("CORRAL_FAULT_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    argv = [sys.executable, "-m", "supervisor", "up", "--json", str(fleet_file)]
    execs: list[subprocess.Popen[bytes]] = []
    try:
        for n in range(ROUNDS):
            up = subprocess.Popen(
                argv, env=dirs.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            # A random moment: before, during or after it took the fleet back.
            time.sleep(rnd.uniform(0.05, 0.6))
            if rnd.random() < 0.3:
                execs.append(_exec_in_steady(dirs))
            up.kill()
            _, err = up.communicate()
            assert b"Traceback" not in err, (seed, n, err.decode())
            double = {k: v for k, v in _running_per_instance(dirs.run).items() if v > 1}
            assert not double, f"seed {seed}, round {n}: instances running twice: {double}"
        # A last one, stopped cleanly: it takes everything back and stops it.
        last = subprocess.Popen(
            argv, env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert last.stdout is not None
        adopted_or_started: set[str] = set()
        for line in last.stdout:
            rec = json.loads(line)
            if rec.get("event") in ("adopted", "started"):
                adopted_or_started.add(str(rec["sandbox"]))
            if {"steady-0", "talk-0"} <= adopted_or_started:
                break
        last.send_signal(signal.SIGTERM)
        _, last_err = last.communicate(timeout=60)
        assert last.returncode == 0, (seed, last_err)
    finally:
        for proc in execs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
    _reap_keeper(dirs)
    _check_journal(dirs, seed)


def _reap_keeper(dirs: Dirs) -> None:
    """Reap keepers that ended and were re-parented to us, a subreaper
    (each one whose supervisor died before it held anything)."""
    keeper_lock = dirs.run / "keeper.lock"
    keeper = int(keeper_lock.read_text().split()[0]) if keeper_lock.exists() else 0
    if keeper:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(keeper, 0)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _check_journal(dirs: Dirs, seed: int) -> None:
    """Every generation that ran has exactly one exit, none of SIGPIPE;
    the seqs strictly increase; the fleet was busy."""
    with events.Journal(str(dirs.state / "journal")) as journal:
        # A killed supervisor's unused reservation of seqs is a Gap.
        log = [e for e in journal.replay(1) if not isinstance(e, events.Gap)]
    seqs = [e.seq for e in log]
    assert seqs == sorted(set(seqs)), f"seed {seed}: seqs not strictly increasing"
    ran: set[tuple[str, int]] = set()
    exits: Counter[tuple[str, int]] = Counter()
    for e in log:
        key = (e.sandbox, e.generation)
        if e.kind in ("started", "adopted", "restored"):
            ran.add(key)
        elif e.kind == "exited":
            exits[key] += 1
            assert not (e.signal == signal.SIGPIPE or e.status == 128 + signal.SIGPIPE), (  # type: ignore[attr-defined]
                f"seed {seed}: {e.sandbox} died of SIGPIPE"
            )
    twice = {k: v for k, v in exits.items() if v > 1}
    assert not twice, f"seed {seed}: exits reported twice: {twice}"
    unaccounted = sorted(k for k in ran if exits[k] != 1)
    assert not unaccounted, f"seed {seed}: generations that ran with no exit: {unaccounted}"
    # The fleet was busy: crash loops and OOM kills restarted.
    kinds = Counter(e.kind for e in log)
    failures = [str(getattr(e, "error", "")) for e in log if e.kind == "start_failed"][-3:]
    assert len(ran) > ROUNDS, f"seed {seed}: {len(ran)} ran; {dict(kinds)}; {failures}"
    print(f"seed {seed}: {len(log)} events, {len(ran)} generations ran")


def _kill_keeper(up: subprocess.Popen[bytes], dirs: Dirs) -> bool:
    """SIGKILL the keeper of supervisor *up*, if one runs; True if killed.

    By pidfd, and only a child of *up*: a PID read from a file may be
    reused, and we kill only what our test started.
    """
    try:
        pid = int((dirs.run / "keeper.lock").read_text().split()[0])
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError, IndexError):
        return False
    try:
        if parent_pid(pid) != up.pid:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def test_a_keeper_killed_fifty_times_loses_nothing(dirs: Dirs, tmp_path: Path) -> None:
    """The holder dies at random moments: the supervisor replaces it each
    time, and no sandbox, exit or event is lost or doubled."""
    seed = int(os.environ.get("CORRAL_FAULT_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    argv = [sys.executable, "-m", "supervisor", "up", "--json", str(fleet_file)]
    # faulthandler: a supervisor that does not stop is asked for its threads' stacks.
    env = {**dirs.env, "PYTHONFAULTHANDLER": "1"}
    up = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    execs: list[subprocess.Popen[bytes]] = []
    killed = 0
    try:
        for n in range(ROUNDS):
            # A random moment: while it creates, restarts, reaps or execs.
            time.sleep(rnd.uniform(0.05, 0.4))
            if rnd.random() < 0.3:
                execs.append(_exec_in_steady(dirs))
            killed += _kill_keeper(up, dirs)
            if up.poll() is not None:
                tail = up.communicate()[1].decode()[-3000:]
                raise AssertionError(f"seed {seed}, round {n}: the supervisor ended: {tail}")
            double = {k: v for k, v in _running_per_instance(dirs.run).items() if v > 1}
            assert not double, f"seed {seed}, round {n}: instances running twice: {double}"
        up.send_signal(signal.SIGTERM)
        try:
            _, err = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.send_signal(signal.SIGABRT)  # ours, by its Popen: faulthandler dumps the stacks
            _, err = up.communicate(timeout=30)
            raise AssertionError(f"seed {seed}: not stopped within 60 s: {err.decode()}") from None
        assert up.returncode == 0, (seed, err.decode())
        assert b"Traceback" not in err, (seed, err.decode())
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        for proc in execs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
    assert killed > ROUNDS // 2, f"seed {seed}: only {killed} keepers were killed"
    _reap_keeper(dirs)
    _check_journal(dirs, seed)
