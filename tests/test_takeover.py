"""A supervisor that dies does not take its sandboxes with it, and the next
one takes them back (issue 14): re-adoption through the keeper."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import events
from supervisor import Supervisor
from supervisor._runtime._linux._proc import parent_pid

from .conftest import Dirs, corral, requires_root
from .helpers import finish, wait_for
from .supervising import fleet, run, wait_event

pytestmark = [requires_root, pytest.mark.layout]

FLEET = """
[supervisor]
grace_period = "2s"

[[sandbox]]
name = "w"
replicas = 2
command = "while :; do echo tick; sleep 0.1; done"

[[sandbox]]
name = "quit"
command = "trap 'exit 3' TERM; echo trapped; while :; do sleep 0.1; done"
"""
TIMEOUT = 60


class Up:
    """`corral up` as a subprocess, its JSON log read line by line."""

    def __init__(self, dirs: Dirs, fleet_file: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "up", *args, str(fleet_file)],
            env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[dict[str, object]] = []

    def until(self, pred: object) -> dict[str, object]:
        """The first log record (read already, or next) matching *pred*."""
        assert self.proc.stdout is not None
        for old in self.log:
            if pred(old):  # type: ignore[operator]
                return old
        while True:
            line = self.proc.stdout.readline()
            assert line, f"corral up ended; log: {self.log}"
            rec: dict[str, object] = json.loads(line)
            self.log.append(rec)
            assert rec.get("event") != "start_failed", json.dumps(rec)
            if pred(rec):  # type: ignore[operator]
                return rec

    def events(self, kind: str) -> dict[str, dict[str, object]]:
        return {str(r["sandbox"]): r for r in self.log if r.get("event") == kind}

    def stop(self) -> str:
        """SIGTERM; the rest of the log, read to its end; its stderr."""
        self.proc.send_signal(signal.SIGTERM)
        # Not communicate(): see finish (the log was read line by line).
        out, err = finish(self.proc, TIMEOUT)
        assert self.proc.returncode == 0, err
        for n, line in enumerate(out.splitlines()):
            try:
                self.log.append(json.loads(line))
            except ValueError:
                raise AssertionError(
                    f"line {n + 1} of the rest of corral up's log is not JSON: {line!r}"
                    f"\nstderr: {err[-2000:]}"
                ) from None
        return err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate()

    def abort(self) -> None:
        """A failed test: stop it (and its sandboxes) as cleanly as it can."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


def _up_and_running(dirs: Dirs, fleet_file: Path, *args: str) -> Up:
    """A `corral up` of FLEET, once its three sandboxes have started."""
    up = Up(dirs, fleet_file, *args)
    try:
        for name in ("w-0", "w-1", "quit-0"):
            up.until(lambda r, n=name: r["event"] == "started" and r["sandbox"] == n)
    except BaseException:
        up.abort()
        raise
    return up


def _keeper_pid(dirs: Dirs) -> int:
    """The PID of the keeper of *dirs*' run directory."""
    return int((dirs.run / "keeper.lock").read_text().split()[0])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.01)


def _wait_output(dirs: Dirs, name: str, text: str) -> None:
    """Wait until sandbox *name*'s output log has *text*."""
    log = dirs.state / "logs" / f"{name}.log"
    deadline = time.monotonic() + TIMEOUT
    while not (log.exists() and text in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{name} never wrote {text!r}"
        time.sleep(0.01)


def _log_size(dirs: Dirs, name: str) -> int:
    return (dirs.state / "logs" / f"{name}.log").stat().st_size


def test_a_killed_supervisor_s_sandboxes_are_taken_back(dirs: Dirs, tmp_path: Path) -> None:
    """SIGKILL `corral up`: its sandboxes run on, held by the keeper; one
    that ends meanwhile is reported late with its real status; the next
    `corral up` adopts the others (same processes), continues the sequence
    and their output, and stops them all cleanly."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    first = _up_and_running(dirs, fleet_file)
    # Its trap is set only once its shell says so: a SIGTERM before
    # would kill it (143), not make it exit 3.
    _wait_output(dirs, "quit-0", "trapped")
    pids = {n: int(r["pid"]) for n, r in first.events("started").items()}  # type: ignore[call-overload]
    last_seq = max(int(r["seq"]) for r in first.log)  # type: ignore[call-overload]
    first.kill()

    # Nobody supervises them now; the keeper is their parent.
    keeper = _keeper_pid(dirs)
    assert keeper != first.proc.pid
    for pid in pids.values():
        assert not _gone(pid)
        assert parent_pid(pid) == keeper
    os.kill(pids["quit-0"], signal.SIGTERM)  # it exits with status 3, unsupervised
    _wait_gone(pids["quit-0"])  # reaped: by the keeper, which keeps the status
    size = _log_size(dirs, "w-0")

    second = Up(dirs, fleet_file)
    try:
        second.until(lambda r: r["event"] == "exited" and r["sandbox"] == "quit-0")
        for name in ("w-0", "w-1"):
            second.until(lambda r, n=name: r["event"] == "adopted" and r["sandbox"] == n)
        adopted = second.events("adopted")
        assert {n: adopted[n]["pid"] for n in ("w-0", "w-1")} == {
            n: pids[n] for n in ("w-0", "w-1")
        }
        assert all(adopted[n]["changed"] is False for n in ("w-0", "w-1"))
        exited = second.events("exited")["quit-0"]
        assert (exited["status"], exited["exit_code"], exited["late"]) == (3, 3, True)
        assert not [r for r in second.log if r["event"] == "started" and r["sandbox"] != "quit-0"]
        # The sequence continues where the first supervisor's ended.
        seqs = [int(r["seq"]) for r in second.log]  # type: ignore[call-overload]
        assert min(seqs) > last_seq
        assert seqs == sorted(seqs)
        # The adopted sandboxes' output is read again (it never stopped being held).
        deadline = time.monotonic() + TIMEOUT
        grown = size
        while grown <= size + 100:
            assert time.monotonic() < deadline, "the adopted sandbox's output is not read"
            time.sleep(0.05)
            grown = _log_size(dirs, "w-0")
        ps = corral(dirs, "ps", "--json")
        states = {r["name"]: r["state"] for r in json.loads(ps.stdout)}
        assert states == {"w-0": "running", "w-1": "running", "quit-0": "exited"}
        second.stop()
    except BaseException:
        second.abort()
        raise
    for pid in pids.values():
        assert _gone(pid)
    stopped = {str(r["sandbox"]) for r in second.log if r.get("event") == "stopped"}
    assert {"w-0", "w-1"} <= stopped
    # Exactly one exited per generation across both runs, in the journal.
    with events.Journal(str(dirs.state / "journal")) as journal:
        # A killed supervisor's unused reservation of seqs is a Gap.
        everything = [e for e in journal.replay(1) if not isinstance(e, events.Gap)]
    seqs = [e.seq for e in everything]
    assert seqs == sorted(set(seqs))
    quit_exits = [e for e in everything if e.kind == "exited" and e.sandbox == "quit-0"]
    assert len(quit_exits) == 1
    # The keeper, with nothing left to hold, ended. (Its first supervisor
    # died, so it was re-parented to the nearest subreaper: this test.)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)


@pytest.mark.parametrize("recreate", [False, True])
def test_a_sandbox_the_fleet_file_changed_is_reported_or_recreated(
    dirs: Dirs, tmp_path: Path, recreate: bool
) -> None:
    """The fleet file changed while no supervisor ran: the sandbox it
    changed is adopted as it is and flagged, or with --recreate-changed
    restarted as the file now says; the one it did not change just runs on."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    first = _up_and_running(dirs, fleet_file)
    first.kill()
    keeper = _keeper_pid(dirs)
    fleet_file.write_text(FLEET.replace('sleep 0.1; done"\n', 'sleep 0.2; done"\n', 1))
    second = Up(dirs, fleet_file, *(["--recreate-changed"] if recreate else []))
    try:
        for name in ("w-0", "w-1", "quit-0"):
            second.until(lambda r, n=name: r["event"] == "adopted" and r["sandbox"] == n)
        adopted = second.events("adopted")
        assert (adopted["w-0"]["changed"], adopted["w-1"]["changed"]) == (True, True)
        assert adopted["quit-0"]["changed"] is False
        if recreate:
            for name in ("w-0", "w-1"):
                second.until(
                    lambda r, n=name: (
                        r["event"] == "started" and r["sandbox"] == n and r["generation"] == 1
                    )
                )
        second.stop()
    except BaseException:
        second.abort()
        raise
    restarted = {str(r["sandbox"]) for r in second.log if r["event"] == "started"}
    assert restarted == ({"w-0", "w-1"} if recreate else set())
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)


def test_a_second_supervisor_of_a_live_fleet_refuses(dirs: Dirs, tmp_path: Path) -> None:
    """Two supervisors would fight over the sandboxes: the second says so in one line."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    first = Up(dirs, fleet_file)
    try:
        first.until(lambda r: r["event"] == "started" and r["sandbox"] == "w-0")
        second = subprocess.run(
            [sys.executable, "-m", "supervisor", "up", str(fleet_file)],
            env=dirs.env, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"(pid {first.proc.pid}) already runs the sandboxes of {dirs.run}" in lines[0]
        ps = corral(dirs, "ps", "--json")
        assert {r["state"] for r in json.loads(ps.stdout) if r["name"] != "quit-0"} == {"running"}
        first.stop()
    except BaseException:
        first.abort()
        raise


def test_a_dead_keeper_is_replaced_and_its_sandboxes_are_not_lost(dirs: Dirs) -> None:
    """SIGKILL the keeper: a new one takes its place for new sandboxes; the
    old ones (re-parented to the supervisor) still report how they end."""
    f = fleet(
        {"name": "a", "command": "trap 'exit 5' TERM; echo trapped; while :; do sleep 0.1; done"},
        {"name": "b", "command": "sleep 1000"},
    )

    async def body(sup: Supervisor) -> None:
        assert sup.keeper is not None
        started = await wait_event(sup, lambda e: e.kind == "started" and e.sandbox == "a-0")
        await wait_event(sup, lambda e: e.kind == "started" and e.sandbox == "b-0")
        await trio.to_thread.run_sync(_wait_output, dirs, "a-0", "trapped")
        old = sup.keeper.pid
        os.kill(old, signal.SIGKILL)
        with trio.fail_after(TIMEOUT):
            while sup.keeper.restarts == 0:
                await trio.sleep(0.01)
        assert sup.keeper.pid != old
        # An old sandbox: its end is still seen, with its status.
        os.kill(started.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        ended = await wait_event(sup, lambda e: e.kind == "exited" and e.sandbox == "a-0")
        assert (ended.status, ended.late) == (5, False)  # type: ignore[attr-defined]
        # A new one is started through the new keeper.
        await sup.restart_sandbox("b-0")
        again = await wait_event(
            sup, lambda e: e.kind == "started" and e.sandbox == "b-0" and e.generation == 1
        )
        assert parent_pid(again.pid) == sup.keeper.pid  # type: ignore[attr-defined]

    run(f, dirs, body)


def _reap_strays() -> None:
    """Reap what was re-parented to us, a subreaper, and has ended (a
    keeper whose supervisor was killed, a CRIU cut off from its caller)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def test_a_paused_sandbox_is_taken_back_paused(dirs: Dirs, tmp_path: Path) -> None:
    """A paused sandbox stays paused across a supervisor's death: the next
    one adopts it as paused (not as running while its processes are
    frozen), and it resumes on request."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    first = _up_and_running(dirs, fleet_file)
    try:
        p = corral(dirs, "pause", "w-0")
        assert p.returncode == 0, p.stderr
        first.until(lambda r: r["event"] == "paused" and r["sandbox"] == "w-0")
    except BaseException:
        first.abort()
        raise
    first.kill()
    keeper = _keeper_pid(dirs)
    second = Up(dirs, fleet_file)
    try:
        for name in ("w-0", "w-1", "quit-0"):
            second.until(lambda r, n=name: r["event"] == "adopted" and r["sandbox"] == n)
        adopted = second.events("adopted")
        assert (adopted["w-0"]["paused"], adopted["w-1"]["paused"]) == (True, False)
        ps = corral(dirs, "ps", "--json")
        states = {r["name"]: r["state"] for r in json.loads(ps.stdout)}
        assert (states["w-0"], states["w-1"]) == ("paused", "running")
        p = corral(dirs, "resume", "w-0")
        assert p.returncode == 0, p.stderr
        second.until(lambda r: r["event"] == "resumed" and r["sandbox"] == "w-0")
        size = _log_size(dirs, "w-0")
        _wait_output_grows(dirs, "w-0", size)
        second.stop()
    except BaseException:
        second.abort()
        raise
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)


def _wait_output_grows(dirs: Dirs, name: str, size: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _log_size(dirs, name) <= size:
        assert time.monotonic() < deadline, f"{name} writes nothing: is it still frozen?"
        time.sleep(0.02)


@pytest.mark.criu
def test_a_supervisor_killed_during_a_checkpoint(dirs: Dirs, tmp_path: Path, criu: None) -> None:
    """SIGKILL `corral up` while CRIU dumps a sandbox (frozen for it): the
    next one lets that CRIU finish, removes the partial checkpoint, thaws
    the sandbox (it was not paused) and says the checkpoint failed."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        '[[sandbox]]\nname = "c"\n'
        'command = "i=0; while :; do i=$((i+1)); echo $i; usleep 50000; done"\n'
    )
    first = Up(dirs, fleet_file)
    try:
        first.until(lambda r: r["event"] == "started" and r["sandbox"] == "c-0")
        _wait_output(dirs, "c-0", " 3\n")  # its third line
        checkpoint = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "checkpoint", "c-0", "--tag", "cut"],
            env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        # CRIU is dumping it (frozen: no pre-dump without --leave-running).
        criu_pid = dirs.state / "checkpoints" / "c-0" / ".cut.partial" / "criu.pid"
        deadline = time.monotonic() + TIMEOUT
        while not criu_pid.exists():
            assert time.monotonic() < deadline, "the checkpoint never started CRIU"
            assert checkpoint.poll() is None, checkpoint.communicate()
            time.sleep(0.005)
    except BaseException:
        first.abort()
        raise
    first.kill()
    assert checkpoint.wait(TIMEOUT) != 0  # its supervisor died under it
    checkpoint.communicate()
    keeper = _keeper_pid(dirs)
    second = Up(dirs, fleet_file)
    try:
        adopted = second.until(lambda r: r["event"] == "adopted" and r["sandbox"] == "c-0")
        assert adopted["paused"] is False
        failed = second.until(lambda r: r["event"] == "checkpoint_failed")
        assert (failed["sandbox"], failed["tag"]) == ("c-0", "cut")
        assert "supervisor ended during the checkpoint" in str(failed["reason"])
        assert list((dirs.state / "checkpoints" / "c-0").iterdir()) == []
        # Thawed: it counts on.
        _wait_output_grows(dirs, "c-0", _log_size(dirs, "c-0"))
        ps = corral(dirs, "ps", "--json")
        assert {r["name"]: r["state"] for r in json.loads(ps.stdout)} == {"c-0": "running"}
        second.stop()
    except BaseException:
        second.abort()
        raise
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)
    _reap_strays()


def test_sandboxes_added_at_run_time_are_taken_back(dirs: Dirs, tmp_path: Path) -> None:
    """`corral add` is recorded in the state directory: the next supervisor
    adopts the added sandbox like the fleet file's (not stopped as a
    stranger), and `corral rm` drops the record."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    extra = tmp_path / "extra.toml"
    extra.write_text('[[sandbox]]\nname = "extra"\ncommand = "while :; do sleep 0.1; done"\n')
    first = Up(dirs, fleet_file)
    try:
        first.until(lambda r: r["event"] == "started" and r["sandbox"] == "w-0")
        p = corral(dirs, "add", str(extra))
        assert p.returncode == 0, p.stderr
        started = first.until(lambda r: r["event"] == "started" and r["sandbox"] == "extra-0")
    except BaseException:
        first.abort()
        raise
    first.kill()
    keeper = _keeper_pid(dirs)
    second = Up(dirs, fleet_file)
    try:
        adopted = second.until(lambda r: r["event"] == "adopted" and r["sandbox"] == "extra-0")
        assert adopted["pid"] == started["pid"]
        ps = corral(dirs, "ps", "--json")
        assert {r["name"]: r["state"] for r in json.loads(ps.stdout)}["extra-0"] == "running"
        p = corral(dirs, "rm", "extra")
        assert p.returncode == 0, p.stderr
        second.until(lambda r: r["event"] == "removed" and r["sandbox"] == "extra-0")
        assert not (dirs.state / "added.json").exists()
        second.stop()
    except BaseException:
        second.abort()
        raise
    # Taken back, never stopped as a stranger to the fleet file.
    reasons = [r["reason"] for r in second.log if r["event"] == "stopping"]
    assert "not in the fleet file" not in reasons
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)


def test_what_a_killed_corral_run_left_is_swept_and_reported_by_up(
    dirs: Dirs, tmp_path: Path
) -> None:
    """A `corral run` killed by SIGKILL takes its sandbox along; `corral up`
    removes what it left and names it in supervisor_started.swept."""
    run = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "--name", "lost", "--",
         "sh", "-c", "echo ready; sleep 1000"],
        env=dirs.env, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert run.stdout is not None and run.stdout.readline() == b"ready\n"
        # Written once the init has exec'd: its command may say "ready" first.
        path = dirs.run / "sandboxes" / "lost.json"
        wait_for(path.exists, what="its record")
        init = os.pidfd_open(int(json.loads(path.read_text())["pid"]))
    except BaseException:
        run.kill()
        run.communicate()
        raise
    try:
        run.kill()
        run.communicate()
        assert select.select([init], [], [], TIMEOUT)[0], "the sandbox outlived its corral run"
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, init, os.WEXITED)  # re-parented to us, a subreaper
    finally:
        os.close(init)
    assert (dirs.state / "sandboxes" / "lost").exists()
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    up = Up(dirs, fleet_file)
    try:
        started = up.until(lambda r: r["event"] == "supervisor_started")
        assert started["swept"] == ["lost"] and started["problems"] == []
        assert not (dirs.state / "sandboxes" / "lost").exists()
        up.stop()
    except BaseException:
        up.abort()
        raise
    _reap_strays()


def test_a_live_upgrade_replaces_the_supervisor_without_stopping_anything(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`corral up --takeover` on a live fleet: the running supervisor hands
    over (its last events say so; it stops nothing) and ends; the new one
    adopts every sandbox (same processes), and the sequence continues."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    first = _up_and_running(dirs, fleet_file)
    pids = {n: int(r["pid"]) for n, r in first.events("started").items()}  # type: ignore[call-overload]
    keeper = _keeper_pid(dirs)
    second = Up(dirs, fleet_file, "--takeover")
    try:
        out, err = first.proc.communicate(timeout=TIMEOUT)
        assert first.proc.returncode == 0, err
        first.log += [json.loads(line) for line in out.splitlines()]
        (stopping,) = [r for r in first.log if r["event"] == "supervisor_stopping"]
        assert stopping["reason"] == "handed over to a new supervisor"
        kinds = {str(r["event"]) for r in first.log if r.get("sandbox")}
        assert kinds == {"created", "started"}, first.log
        for name in ("w-0", "w-1", "quit-0"):
            second.until(lambda r, n=name: r["event"] == "adopted" and r["sandbox"] == n)
        adopted = second.events("adopted")
        assert {n: adopted[n]["pid"] for n in pids} == pids
        seqs = [int(r["seq"]) for r in first.log + second.log]  # type: ignore[call-overload]
        assert seqs == sorted(set(seqs))
        _wait_output_grows(dirs, "w-0", _log_size(dirs, "w-0"))
        second.stop()
    except BaseException:
        second.abort()
        raise
    stopped = {str(r["sandbox"]) for r in second.log if r.get("event") == "stopped"}
    assert stopped == set(pids)
    # The keeper the first supervisor started, re-parented to us when it
    # ended, ends once nothing is held.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)
    _wait_gone(keeper)
