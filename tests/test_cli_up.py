"""`corral up` and `corral events` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rootfs import ImageStore, busybox_image

from .conftest import Dirs, corral, requires_root
from .helpers import finish, read_started, up_under_limit

pytestmark = [requires_root, pytest.mark.layout]

FLEET = """
[supervisor]
grace_period = "2s"

[[sandbox]]
name = "web"
command = "while :; do sleep 1; done"

[[sandbox]]
name = "hog"
memory = "32M"
command = "x=0123456789abcdef; while :; do x=$x$x; done"
"""


def read_until(stream: object, pred: object, limit: int = 200) -> list[dict[str, object]]:
    lines = []
    for _ in range(limit):
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            break
        rec = json.loads(line)
        lines.append(rec)
        if pred(rec):  # type: ignore[operator]
            return lines
        # A sandbox that cannot start will never print what is awaited:
        # fail now, not at the next line that never comes.
        assert rec.get("event") != "start_failed", rec
    raise AssertionError(f"condition not met; got {lines}")


@contextmanager
def corral_up(
    dirs: Dirs, tmp_path: Path, *args: str, text: str = FLEET
) -> Iterator[subprocess.Popen[str]]:
    """`corral up` on a fleet (FLEET unless *text*) as a subprocess; killed if
    the test leaves it running."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(text)
    up = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "up", *args, str(fleet)],
        env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield up
    finally:
        if up.poll() is None:
            up.kill()
        up.communicate()


def test_up_streams_events_and_stops_cleanly(dirs: Dirs, tmp_path: Path) -> None:
    """`corral up` logs JSON events; `corral events` replays them; SIGTERM stops all, exit 0."""
    with corral_up(dirs, tmp_path) as up:
        assert up.stdout is not None
        log = read_until(
            up.stdout, lambda r: r["event"] == "exited" and r.get("sandbox") == "hog-0"
        )
        assert any(r["event"] == "oom_kill" and r["sandbox"] == "hog-0" for r in log)
        ev = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "events", "--since", "1", "--json",
             "--sandbox", "hog-*"],
            env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert ev.stdout is not None
            got = read_until(ev.stdout, lambda r: r["kind"] == "exited")
            # (On cgroup v2 the hog's reclaim at its limit comes first, as
            # memory_pressure events: that is news too, but not this test's.)
            kinds = [r["kind"] for r in got if r["kind"] != "memory_pressure"]
            assert kinds == ["created", "started", "oom_kill", "exited"]
            assert got[-1]["data"]["oom_killed"] is True  # type: ignore[index]
            up.send_signal(signal.SIGTERM)
            # The stream ends when the supervisor stops.
            ev.communicate(timeout=30)
            assert ev.returncode == 0
        finally:
            if ev.poll() is None:
                ev.kill()
            ev.communicate()
        out, err = finish(up, 30)  # not communicate(): its stdout was read line by line
        assert up.returncode == 0, err
        tail = [json.loads(line)["event"] for line in out.splitlines()]
        assert tail[-1] == "supervisor_stopped"
        assert "stopped" in tail


@pytest.mark.host_only  # a closed pipe: no cgroup or kernel feature
def test_up_runs_on_when_its_stdout_goes_away(dirs: Dirs, tmp_path: Path) -> None:
    """`corral up | head`: when the reader leaves, the log is switched off, the fleet runs on."""
    with corral_up(dirs, tmp_path) as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "started" and r.get("sandbox") == "web-0")
        up.stdout.close()  # what `head` does when it has its lines
        restart = corral(dirs, "restart", "web")  # more events to log, into the closed pipe
        assert restart.returncode == 0, restart.stderr
        ps = corral(dirs, "ps", "--json")
        assert ps.returncode == 0, ps.stderr
        assert {r["name"]: r["state"] for r in json.loads(ps.stdout)}["web-0"] == "running"
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
        assert "corral: the supervisor log is off: cannot write it: Broken pipe" in err
        assert "Traceback" not in err


def _stop_reason(out: str) -> str:
    stopping = [json.loads(line) for line in out.splitlines() if "supervisor_stopping" in line]
    assert len(stopping) == 1, out
    return str(stopping[0]["reason"])


def test_sighup_stops_the_fleet_like_sigterm(dirs: Dirs, tmp_path: Path) -> None:
    """A closed ssh session (SIGHUP) stops the fleet gracefully, not by dying."""
    with corral_up(dirs, tmp_path) as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "started" and r.get("sandbox") == "web-0")
        up.send_signal(signal.SIGHUP)
        out, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
        assert _stop_reason(out) == "SIGHUP received"
        assert out.splitlines()[-1].count("supervisor_stopped") == 1


def test_ignore_sighup_runs_on(dirs: Dirs, tmp_path: Path) -> None:
    """With --ignore-sighup a SIGHUP is ignored: the SIGTERM after it is what stops the fleet."""
    with corral_up(dirs, tmp_path, "--ignore-sighup") as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "started" and r.get("sandbox") == "web-0")
        # Both pending at once are delivered lowest number first: HUP (1), then TERM (15).
        os.kill(up.pid, signal.SIGSTOP)
        up.send_signal(signal.SIGHUP)
        up.send_signal(signal.SIGTERM)
        os.kill(up.pid, signal.SIGCONT)
        out, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
        assert _stop_reason(out) == "SIGTERM received"


def test_up_with_a_bad_fleet_reports_every_problem(dirs: Dirs, tmp_path: Path) -> None:
    """A bad fleet file: one line per problem, status 125, nothing started."""
    fleet = tmp_path / "bad.toml"
    fleet.write_text('[[sandbox]]\nname = "web"\ncommand = ["true"]\nmemory = "12Q"\ncolour = 1\n')
    p = corral(dirs, "up", str(fleet))
    assert p.returncode == 125
    lines = p.stderr.decode().splitlines()
    assert lines == [
        f"corral: {fleet}: sandbox 'web': colour: unknown key (expected one of: cap_add, cap_drop, command, cpu_weight, cpus, cpuset_cpus, cpuset_mems, egress, env, hostname, image, io_read_bps, io_read_iops, io_weight, io_write_bps, io_write_iops, lxcfs, memory, memory_high, memory_stall, memory_swap, name, network, no_new_privs, oom_group, pids, plugins, ports, privileged, read_only_rootfs, replicas, rlimits, rootfs, seccomp, tmpfs, user, userns, userns_base, userns_size, volumes, workdir)",
        f"corral: {fleet}: sandbox 'web': memory: expected a size like 64M or 1G, got '12Q'",
    ]


def test_events_without_a_supervisor_is_one_line(dirs: Dirs) -> None:
    """`corral events` with nothing listening says so in one line."""
    p = corral(dirs, "events")
    assert p.returncode == 125
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "no supervisor is listening" in err


def test_oom_alert_example_reacts_to_an_oom_kill(dirs: Dirs, tmp_path: Path) -> None:
    """examples/oom_alert.py, run as written, prints one alert for the hog."""
    with corral_up(dirs, tmp_path) as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "supervisor_started")
        alert = subprocess.run(
            [sys.executable, str(Path(__file__).parent.parent / "examples" / "oom_alert.py"),
             "--count", "1"],
            env=dirs.env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert alert.returncode == 0, alert.stderr
        assert "ALERT sandbox hog-0 (generation 0): 1 OOM kill(s); it died of it" in alert.stdout
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=30)
        assert up.returncode == 0


# One sandbox that can never start: nothing of it exists to outlive a
# killed supervisor, and `corral start` makes events on demand.
GHOST = """
[[sandbox]]
name = "ghost"
rootfs = "/nonexistent-corral-rootfs"
command = "true"
"""


def _keeper(dirs: Dirs) -> int:
    """The PID of the keeper of *dirs*' run directory."""
    return int((dirs.run / "keeper.lock").read_text().split()[0])


def test_seqs_a_client_saw_are_not_reused_after_a_sigkill(dirs: Dirs, tmp_path: Path) -> None:
    """A supervisor SIGKILLed right after an event reached a socket client
    (its journal write still buffered): the next supervisor's first seq is
    greater than any the client saw."""
    import events

    sock = str(dirs.run / "events.sock")
    with corral_up(dirs, tmp_path, text=GHOST) as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "supervisor_started")
        # The client is subscribed once the replay brings it ghost's first failure.
        stream = events.iter_events(sock, since=1, timeout=30)
        for e in stream:
            if e.kind == "start_failed":
                break
        start = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "start", "ghost"],
            env=dirs.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            seen = next(stream)  # created, live: journaled but not yet flushed
            assert seen.kind == "created"
            keeper = _keeper(dirs)
            up.kill()
            up.wait()
        finally:
            start.communicate(timeout=30)
            stream.close()
    with corral_up(dirs, tmp_path, text=GHOST) as up:
        assert up.stdout is not None
        first = json.loads(up.stdout.readline())
        assert first["event"] == "supervisor_started"
        assert first["seq"] > seen.seq
        read_until(up.stdout, lambda r: r["event"] == "start_failed")  # signals handled now
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
    # The first keeper ends once it holds nothing and no supervisor is
    # connected: at once, or (if the kill came while it held ghost's pipes
    # for a start under way) once the second supervisor has let them go
    # and left. An orphan, it is ours to reap (we are a subreaper).
    try:
        os.waitpid(keeper, 0)
    except ChildProcessError:
        pass


def test_running_out_of_descriptors_fails_starts_not_the_supervisor(
    dirs: Dirs, tmp_path: Path
) -> None:
    """With too few descriptors for what is added (each sandbox takes about
    five, and more while it starts), the instances that cannot get theirs
    fail to start, one line each, leaving nothing behind; those running
    already run on, and the supervisor stops them all cleanly."""
    busybox_image(ImageStore(dirs.state / "images"))  # built: nothing waits for it
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[sandbox]]\nname = "base"\nreplicas = 4\ncommand = "sleep 1000"\n')
    more = tmp_path / "more.toml"
    more.write_text('[[sandbox]]\nname = "m"\nreplicas = 60\ncommand = "sleep 1000"\n')
    proc = up_under_limit(dirs.env, fleet_file, 256)
    try:
        started = read_started(proc, 4)
        corral(dirs, "add", str(more), timeout=120)  # answers once each is up or failed
        ps = {r["name"]: r["state"] for r in json.loads(corral(dirs, "ps", "--json").stdout)}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert {n: ps[n] for n in started} == dict.fromkeys(started, "running")
    log = [json.loads(x) for x in out.splitlines()]
    failed = [r for r in log if r["event"] == "start_failed"]
    assert failed and all("Too many open files" in str(r["error"]) for r in failed), failed[:3]
    assert {r["sandbox"] for r in failed} == {n for n, state in ps.items() if state == "failed"}
    stopped = {r["sandbox"] for r in log if r["event"] == "stopped"}
    assert started <= stopped


@pytest.mark.host_only  # a pipe and the journal: no cgroup or kernel feature
def test_a_log_reader_that_stops_reading_does_not_stop_the_supervisor(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`corral up | less`, paused: the log's pipe fills, and the supervisor
    goes on (a crash loop keeps restarting, `ps` answers); its log falls
    behind and catches up from the journal; it still ends on SIGTERM."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        '[plugins.restart]\npolicy = "always"\ndelay = "1ms"\nmax_delay = "1ms"\n'
        "intensity = 1000000\n\n"
        '[[sandbox]]\nname = "loop"\ncommand = "exit 1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "up", "--json", str(fleet_file)],
        env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # A pipe holds 64 KiB, some 400 lines: 200 restarts (5 lines each)
        # are well past the point where an unread log would block it.
        restarts = 0
        for _ in range(1000):  # each `ps` takes tens of ms: a bound, not a wait
            p = corral(dirs, "ps", "--json", timeout=30)
            if p.returncode == 0:
                restarts = int(json.loads(p.stdout)[0]["restarts"])
                if restarts >= 200:
                    break
        assert restarts >= 200, restarts
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    log = [json.loads(line) for line in out.decode().splitlines()]
    # Everything up to its end, in order (caught up from the journal).
    seqs = [int(r["seq"]) for r in log]
    assert seqs == list(range(1, len(seqs) + 1)) and log[-1]["event"] == "supervisor_stopped"
