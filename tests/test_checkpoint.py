"""Checkpoint and restore with CRIU, end to end with the real kernel.

The tests marked ``criu`` need a kernel CRIU works on: they run in the VM
lanes (cgroup v2, and cgroup v1). On the host lane, whose kernel CRIU 3.17
cannot handle (``criu check`` fails), the tests of the unavailable path run
instead: one clear error quoting ``criu check`` and the sandbox untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import events
from supervisor import (
    CheckpointError,
    CorralError,
    CriuUnavailableError,
    Runtime,
    Sandbox,
    SandboxSpec,
    Supervisor,
)
from supervisor._core._fleet import parse_fleet
from supervisor._runtime._checkpoint import (
    CheckpointInfo,
    CheckpointStore,
    check_criu,
    validate_tag,
)
from supervisor._runtime._linux._cgroups import ALLOWED_DEVICES
from supervisor._runtime._security import make_security

from .conftest import Dirs, requires_root
from .supervising import fleet, of, output, run, wait_event

# /count is replaced whole (written aside, renamed): a checkpoint taken
# between a truncation and its write would otherwise hold an empty file.
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /count.new; mv -f /count.new /count; echo $i;"
    " usleep 50000; done"
)
# The same numbers, echoed back through a TCP connection on the sandbox's own
# loopback: they reach the log only while the connection works.
TCP_COUNTER = (
    "nc -l -p 9000 -e cat & i=0;"
    " while :; do i=$((i+1)); echo $i > /count.new; mv -f /count.new /count; echo $i;"
    " usleep 50000; done"
    " | { until nc 127.0.0.1 9000; do usleep 20000; done; }"
)


def values(dirs: Dirs, name: str) -> list[int]:
    """The numbers a counter printed, in order."""
    return [int(line) for line in output(dirs, name).split() if line.isdigit()]


async def wait_for(cond: Callable[[], bool], timeout: float = 120) -> None:
    """Wait for a condition of the file system (a log, a file), bounded."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


def ns_pid(host_pid: int) -> int:
    """A process's PID inside its own PID namespace."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError("no NSpid")


def confinement(host_pid: int) -> str:
    """A process's privilege lines and how its / and /dev are mounted."""
    status = [
        ln
        for ln in Path(f"/proc/{host_pid}/status").read_text().splitlines()
        if ln.startswith(("Cap", "NoNewPrivs", "Seccomp"))
    ]
    mounts = []
    for line in Path(f"/proc/{host_pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] in ("/", "/dev"):
            flags = set(fields[5].split(","))
            mounts.append(f"{fields[4]} {'ro' if 'ro' in flags else 'rw'}")
            if "nodev" in flags:
                mounts.append(f"{fields[4]} nodev")
    return "\n".join(status + mounts)


def frozen(sb: Sandbox) -> bool:
    """Whether the sandbox's cgroup is frozen (v1 freezer.state, v2 cgroup.events)."""
    d = Path(sb.cgroup.freezer_dir)
    if (d / "freezer.state").exists():
        return (d / "freezer.state").read_text().strip() != "THAWED"
    return "frozen 1" in (d / "cgroup.events").read_text()


@contextlib.contextmanager
def counting(runtime: Runtime, **kw: Any) -> Iterator[tuple[Sandbox, int]]:
    """A sandbox "c" running COUNTER (*kw* for its spec), once it counts;
    and its output pipe."""
    r, w = os.pipe()
    try:
        spec = SandboxSpec("c", ["sh", "-c", COUNTER], **kw)
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 16)
            yield sb, r
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


def command_pid(init: int) -> int:
    """The host PID of the sandbox's command (tini's child)."""
    (child,) = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return int(child)


async def corral(dirs: Dirs, *args: str) -> tuple[int, str, str]:
    r = await trio.run_process(
        [sys.executable, "-m", "supervisor", *args],
        env=dirs.env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


# -- everywhere: the store, tags, a missing CRIU ------------------------------


def test_tags_are_validated() -> None:
    assert validate_tag("before-upgrade.1") == "before-upgrade.1"
    for bad in ("", ".hidden", "a/b", "x" * 65, "sp ace"):
        with pytest.raises(CheckpointError, match="tag: expected"):
            validate_tag(bad)


def test_missing_and_corrupt_checkpoints_are_named(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        store.find("web-0")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        store.find("web-0", "nope")
    bad = tmp_path / "web-0" / "t1"
    (bad / "images").mkdir(parents=True)
    (bad / "upper").mkdir()
    with pytest.raises(CheckpointError, match=r"incomplete: no checkpoint\.json"):
        CheckpointInfo.load(str(bad))
    (bad / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"corrupt: checkpoint\.json"):
        CheckpointInfo.load(str(bad))
    assert store.list("web-0") == []  # a broken one is never "the latest"


@requires_root
def test_missing_criu_is_one_clear_error(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CRIU", "/nonexistent/criu")
    with runtime.create(SandboxSpec("c", ["sleep", "100"]), stdin_devnull=True) as sb:
        with pytest.raises(CriuUnavailableError) as err:
            runtime.checkpoint(sb)
        assert str(err.value) == (
            "checkpointing needs CRIU: CORRAL_CRIU='/nonexistent/criu' is not an executable file"
        )
        assert sb.poll() is None
    assert runtime.checkpoints.list("c") == []


@requires_root
def test_unavailable_criu_quotes_criu_check(runtime: Runtime, criu_broken: None) -> None:
    with runtime.create(SandboxSpec("c", ["sleep", "100"]), stdin_devnull=True) as sb:
        pid = sb.pid
        with pytest.raises(CriuUnavailableError) as err:
            runtime.checkpoint(sb)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("checkpointing is not available on this kernel: 'criu check'")
        assert sb.poll() is None and sb.pid == pid
        assert not frozen(sb)
    assert not os.path.exists(runtime.checkpoints.dir("c")) or not os.listdir(
        runtime.checkpoints.dir("c")
    )


@requires_root
def test_cli_and_plugin_on_a_host_without_criu(dirs: Dirs, criu_broken: None) -> None:
    """`corral checkpoint` fails with one line quoting criu check; the plugin
    disables itself once; the sandbox runs on, untouched."""
    f = parse_fleet(
        {
            "sandbox": [
                {
                    "name": "c",
                    "command": COUNTER,
                    "plugins": {"checkpoint": {"interval": "0.05s"}},
                }
            ]
        }
    )

    async def body(sup: Supervisor) -> None:
        started = await wait_event(
            sup, lambda e: isinstance(e, events.Started) and e.sandbox == "c-0"
        )
        assert isinstance(started, events.Started)  # the predicate made sure; for mypy
        await wait_event(
            sup, lambda e: isinstance(e, events.PluginEvent) and e.name == "checkpoint.disabled"
        )
        code, _, err = await corral(dirs, "checkpoint", "c")
        assert code == 125
        lines = err.splitlines()
        assert lines[0] == "corral: checkpointing c ..."
        assert len(lines) == 2 and "'criu check' failed" in lines[1], err
        code, _, err = await corral(dirs, "restore", "c")
        assert code == 125 and "'criu check' failed" in err
        inst = sup.instance("c-0")
        assert inst is not None and inst.state == "running"
        assert inst.sandbox is not None and inst.sandbox.pid == started.pid
        before = values(dirs, "c-0")[-1]
        await wait_for(lambda: values(dirs, "c-0")[-1] > before)

    evs = run(f, dirs, body)
    failed = of(evs, events.CheckpointFailed, "c-0")
    assert failed and all("'criu check' failed" in e.reason for e in failed)
    assert len([e for e in evs if isinstance(e, events.PluginEvent)]) == 1
    assert not of(evs, events.Exited, "c-0")[:-1]  # only the final stop


# -- where CRIU works (VM lanes) ------------------------------------------------


@pytest.mark.criu
@requires_root
def test_checkpoint_kill_restore_continues(dirs: Dirs, criu: None) -> None:
    """Checkpoint (stops it), restore: the counter goes on from the
    checkpointed value, not from zero, with the same PID inside."""
    f = fleet({"name": "c", "command": COUNTER, "memory": "64M"})
    seen: dict[str, Any] = {}

    async def body(sup: Supervisor) -> None:
        started = await wait_event(
            sup, lambda e: isinstance(e, events.Started) and e.sandbox == "c-0"
        )
        assert isinstance(started, events.Started)  # the predicate made sure; for mypy
        await wait_for(lambda: len(values(dirs, "c-0")) >= 3)
        seen["nspid"] = ns_pid(command_pid(started.pid))
        seen["confined"] = confinement(command_pid(started.pid))
        code, out, err = await corral(dirs, "checkpoint", "c", "--tag", "one")
        assert code == 0, err
        assert out.startswith("checkpointed c-0 as one: ") and out.rstrip().endswith("(stopped)")
        await wait_event(sup, lambda e: isinstance(e, events.Stopped) and e.sandbox == "c-0")
        inst = sup.instance("c-0")
        assert inst is not None and inst.state == "stopped" and inst.sandbox is None
        seen["at"] = int(
            Path(dirs.state, "checkpoints", "c-0", "one", "upper", "count").read_text()
        )
        code, out, err = await corral(dirs, "restore", "c")
        assert code == 0, err
        seen["restore_err"] = err
        restored = await wait_event(
            sup, lambda e: isinstance(e, events.Restored) and e.sandbox == "c-0"
        )
        assert isinstance(restored, events.Restored)  # the predicate made sure; for mypy
        assert restored.tag == "one" and restored.source == "c-0" and restored.generation == 1
        assert out.strip() == f"restored c-0 from c-0/one: pid {restored.pid}"
        await wait_for(lambda: values(dirs, "c-0")[-1] >= seen["at"] + 5)
        seen["nspid_after"] = ns_pid(command_pid(restored.pid))
        seen["confined_after"] = confinement(command_pid(restored.pid))
        inst = sup.instance("c-0")
        assert inst is not None and inst.sandbox is not None
        devices = [p for p in inst.sandbox.cgroup.paths if "/devices/" in p]
        for d in devices:  # cgroup v1: the restored cgroup has the device policy too
            assert sorted(filter(None, Path(d, "devices.list").read_text().split("\n"))) == sorted(
                ALLOWED_DEVICES
            )
        seen["host_pid_changed"] = restored.pid != started.pid
        upper = Path(dirs.state, "sandboxes", "c-0.1", "upper", "count")
        await wait_for(lambda: upper.exists() and int(upper.read_text()) >= seen["at"] + 5)

    evs = run(f, dirs, body)
    nums = values(dirs, "c-0")
    assert seen["at"] >= 3
    # One sequence: +1 at each step (one repeat at the seam at most), never
    # back to 1: the restored shell kept its counter in memory.
    steps = [b - a for a, b in itertools.pairwise(nums)]
    assert set(steps) <= {0, 1} and steps.count(0) <= 1, nums
    assert nums.count(1) == 1
    assert seen["nspid_after"] == seen["nspid"] and seen["host_pid_changed"]
    # Restored as restricted as it ran: capabilities, the seccomp filter,
    # the nodev root and the read-only /dev; no_new_privs too where CRIU
    # can (3.19 on), and where it cannot the loss is said, not silent.
    assert "Seccomp:\t2" in seen["confined"] and "NoNewPrivs:\t1" in seen["confined"]
    assert "/ nodev" in seen["confined"] and "/dev ro" in seen["confined"]
    (restored,) = of(evs, events.Restored, "c-0")
    expected = str(seen["confined"])
    if restored.weakened:
        assert restored.weakened.startswith("no_new_privs (CRIU ")
        assert "warning: c-0 was restored without no_new_privs" in str(seen["restore_err"])
        expected = expected.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")
    assert seen["confined_after"] == expected
    (ck,) = of(evs, events.Checkpointed, "c-0")
    assert ck.tag == "one" and not ck.leave_running and ck.size > 0
    assert 0 < ck.frozen_ms <= ck.duration_ms
    kinds = [e.kind for e in evs if e.sandbox == "c-0"]
    i = kinds.index("checkpointed")
    assert kinds[i : i + 3] == ["checkpointed", "exited", "stopped"]
    assert kinds[i + 3 : i + 6] == ["created", "restored", "started"]
    assert not [e for e in evs if isinstance(e, events.Restarting)]


@pytest.mark.criu
@requires_root
def test_leave_running_and_restore_as_a_second_instance(dirs: Dirs, criu: None) -> None:
    """The original runs on; the copy restored --as a second instance runs
    too, in its own namespaces, its TCP connection restored (established,
    with data in flight) and its network unlocked."""
    f = fleet({"name": "c", "command": TCP_COUNTER})
    seen: dict[str, object] = {}

    async def body(sup: Supervisor) -> None:
        started = await wait_event(
            sup, lambda e: isinstance(e, events.Started) and e.sandbox == "c-0"
        )
        assert isinstance(started, events.Started)  # the predicate made sure; for mypy
        await wait_for(lambda: len(values(dirs, "c-0")) >= 3)
        code, out, err = await corral(dirs, "checkpoint", "c-0", "--leave-running", "--tag", "lr")
        assert code == 0, err
        assert "(stopped)" not in out
        at = int(Path(dirs.state, "checkpoints", "c-0", "lr", "upper", "count").read_text())
        inst = sup.instance("c-0")
        assert inst is not None and inst.state == "running"
        assert inst.sandbox is not None and inst.sandbox.pid == started.pid
        # It runs on (not frozen, not restarted).
        now = values(dirs, "c-0")[-1]
        await wait_for(lambda: values(dirs, "c-0")[-1] >= now + 3)
        code, out, err = await corral(dirs, "restore", "c-0", "--from", "lr", "--as", "c2")
        assert code == 0, err
        restored = await wait_event(
            sup, lambda e: isinstance(e, events.Restored) and e.sandbox == "c2"
        )
        assert isinstance(restored, events.Restored)  # the predicate made sure; for mypy
        assert restored.source == "c-0" and restored.tag == "lr"
        await wait_for(lambda: len(values(dirs, "c2")) >= 5)
        copy = values(dirs, "c2")
        # Numbers in flight in the connection at the checkpoint come first.
        assert at - 20 <= copy[0] <= at + 1, (at, copy)
        assert [b - a for a, b in itertools.pairwise(copy)] == [1] * (len(copy) - 1)
        # Two sandboxes now, each in its own namespaces, both counting.
        a, b = started.pid, restored.pid
        for ns in ("pid", "net", "mnt", "uts", "ipc"):
            assert os.readlink(f"/proc/{a}/ns/{ns}") != os.readlink(f"/proc/{b}/ns/{ns}")
        n_a, n_b = values(dirs, "c-0")[-1], values(dirs, "c2")[-1]
        await wait_for(lambda: values(dirs, "c-0")[-1] > n_a and values(dirs, "c2")[-1] > n_b)
        c2 = sup.instance("c2")
        assert c2 is not None and c2.state == "running"
        seen["ok"] = True

    evs = run(f, dirs, body)
    assert seen.get("ok")
    assert [e.kind for e in evs if e.sandbox == "c-0"].count("exited") == 1  # the final stop
    (ck,) = of(evs, events.Checkpointed, "c-0")
    assert ck.leave_running


@pytest.mark.criu
@requires_root
def test_periodic_checkpoints_keep_the_last_k(dirs: Dirs, criu: None) -> None:
    f = parse_fleet(
        {
            "sandbox": [
                {
                    "name": "c",
                    "command": COUNTER,
                    "plugins": {"checkpoint": {"interval": "0.1s", "keep": 2}},
                }
            ]
        }
    )

    async def body(sup: Supervisor) -> None:
        # Three prunes show it: one checkpoint kept, then two, the oldest
        # of three deleted (each dump takes seconds in the VM lanes).
        for n in range(1, 4):
            await wait_event(
                sup,
                lambda e, n=n: (
                    isinstance(e, events.PluginEvent)
                    and e.name == "checkpoint.pruned"
                    and e.payload["count"] == n
                ),  # type: ignore[misc]
            )

    evs = run(f, dirs, body)
    pruned = [e for e in evs if isinstance(e, events.PluginEvent) and e.name == "checkpoint.pruned"]
    assert [e.payload["kept"] for e in pruned[:3]] == [1, 2, 2]
    assert [len(e.payload["deleted"]) for e in pruned[:3]] == [0, 0, 1]
    made = [e.tag for e in of(evs, events.Checkpointed, "c-0")]
    kept = [c.tag for c in CheckpointStore(str(dirs.state / "checkpoints")).list("c-0")]
    assert all(t.startswith("auto-") for t in made)
    assert kept == made[-len(kept) :] and len(kept) <= 3


@pytest.mark.criu
@requires_root
def test_periodic_checkpoints_respect_the_disk_bound(dirs: Dirs, criu: None) -> None:
    bound = 1 << 20
    f = parse_fleet(
        {
            "sandbox": [
                {
                    "name": "c",
                    "command": COUNTER,
                    "plugins": {"checkpoint": {"interval": "0.1s", "keep": 100}},
                }
            ],
            "plugins": {"checkpoint": {"max_disk": bound}},
        }
    )

    async def body(sup: Supervisor) -> None:
        # Until a prune has deleted one, and one more after it: each
        # checkpoint is some 600 KB, so the second already passes the
        # bound. Seconds a dump in the VM lanes (QEMU without KVM
        # emulates the CPU); the bound is for a hang, not a measure.
        deleted = await wait_event(
            sup,
            lambda e: (
                isinstance(e, events.PluginEvent)
                and e.name == "checkpoint.pruned"
                and bool(e.payload["deleted"])
            ),
            timeout=240,
        )
        assert isinstance(deleted, events.PluginEvent)
        await wait_event(
            sup,
            lambda e: (
                isinstance(e, events.PluginEvent)
                and e.name == "checkpoint.pruned"
                and e.payload["count"] > deleted.payload["count"]
            ),
            timeout=240,
        )

    evs = run(f, dirs, body)
    pruned = [e for e in evs if isinstance(e, events.PluginEvent) and e.name == "checkpoint.pruned"]
    assert any(e.payload["deleted"] for e in pruned), pruned
    for e in pruned:
        assert e.payload["bytes"] <= bound or e.payload["kept"] == 1, e.payload


@pytest.mark.criu
@requires_root
def test_oom_kill_restores_the_latest_checkpoint_with_a_grown_limit(dirs: Dirs, criu: None) -> None:
    """The hog is OOM-killed, the restart plugin grows its limit and restores
    it from the checkpoint plugin's latest checkpoint: it keeps its progress."""
    hog = (
        "i=0; s=; while :; do i=$((i+1));"
        " s=$s$(head -c 1048576 /dev/zero | tr '\\0' y); echo $i; usleep 200000; done"
    )
    f = parse_fleet(
        {
            "sandbox": [
                {
                    "name": "hog",
                    "command": hog,
                    "memory": "24M",
                    "plugins": {
                        "checkpoint": {"interval": "1s", "keep": 1},
                        "restart": {
                            "policy": "on-failure",
                            "on_oom": {"grow": 2, "max": "96M"},
                            "from_checkpoint": True,
                        },
                    },
                }
            ]
        }
    )

    seen: dict[str, list[int]] = {}

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup,
            lambda e: isinstance(e, events.Restored) and e.sandbox == "hog-0",
            timeout=300,
        )
        # The OOM-killed generation's output was drained long before.
        seen["before"] = values(dirs, "hog-0")
        n = len(seen["before"])
        await wait_for(lambda: len(values(dirs, "hog-0")) >= n + 3)
        seen["after"] = values(dirs, "hog-0")[n:]

    evs = run(f, dirs, body)
    # (The OOM killer may first pick a `head` or `tr` of the hog, which then
    # goes on; what counts is the exit of the generation.)
    assert of(evs, events.OomKill, "hog-0")
    death = next(e for e in of(evs, events.Exited, "hog-0") if e.oom_killed)
    grown = [e for e in of(evs, events.LimitChanged, "hog-0") if e.seq > death.seq]
    restored = of(evs, events.Restored, "hog-0")[0]
    assert grown and grown[0].new == 48 << 20 and grown[0].seq < restored.seq
    # The latest checkpoint there was when it was restored. (Not the latest
    # published before the death: seen in CI's v1 lane, a checkpoint whose
    # dump ended just before the OOM kill was published just after the
    # exit, its copy of the writable layer being slow; it is still the
    # newest state, and the one to restore.)
    ck = [e for e in of(evs, events.Checkpointed, "hog-0") if e.seq < restored.seq]
    assert ck and restored.tag == ck[-1].tag
    before, after = seen["before"], seen["after"]
    # It went on from its checkpoint (taken at most where it was killed),
    # not from 1: the restored shell still holds what it had allocated.
    assert before[0] == 1 and 1 < after[0] <= before[-1] + 1, (before, after)
    assert [b - a for a, b in itertools.pairwise(after)] == [1] * (len(after) - 1)


@pytest.mark.criu
@requires_root
def test_an_exit_during_a_checkpoint_comes_after_its_outcome(dirs: Dirs, criu: None) -> None:
    """A sandbox that dies after CRIU has dumped it, while the checkpoint is
    still being written down, has its exited after its checkpointed: a
    restart decided on the exit sees the checkpoint it died in."""
    f = fleet({"name": "d", "command": COUNTER})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "d-0")
        await wait_for(lambda: len(values(dirs, "d-0")) >= 3)
        assert sup.runtime is not None
        real = sup.runtime.checkpoint

        def dying(sb: Sandbox, **kw: Any) -> CheckpointInfo:
            on_dumped = kw.pop("on_dumped")

            def killed_first(info: CheckpointInfo) -> None:
                # Dumped and thawed: it dies before checkpointed is published
                # (the window in which an OOM kill can strike).
                sb.kill()
                assert select.select([sb.pidfd], [], [], 30)[0]
                # Let the supervisor see the death first, as it would.
                trio.from_thread.run(trio.testing.wait_all_tasks_blocked)
                on_dumped(info)

            return real(sb, on_dumped=killed_first, **kw)

        sup.runtime.checkpoint = dying  # type: ignore[method-assign]
        await sup.checkpoint("d-0", tag="last", leave_running=True)
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "d-0")

    evs = run(f, dirs, body)
    kinds = [e.kind for e in evs if e.sandbox == "d-0"]
    assert kinds.index("checkpointed") < kinds.index("exited"), kinds
    (died,) = of(evs, events.Exited, "d-0")
    assert died.signal == 9


@pytest.mark.criu
@requires_root
def test_a_sandbox_that_dies_under_a_hung_criu_has_its_exit_at_once(
    dirs: Dirs, criu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox dies on its own (as in an OOM kill: no kill of ours)
    while CRIU, hung, pre-dumps it: its exited comes at once, after the
    checkpoint's failure, not at CRIU's timeout (ten minutes; seen in CI,
    where a restore after an OOM kill waited for it); CRIU is gone."""
    hung = _hang_pre_dumps(tmp_path, monkeypatch)
    f = fleet({"name": "d", "command": COUNTER})
    failed: list[CorralError] = []

    async def take(sup: Supervisor) -> None:
        try:
            await sup.checkpoint("d-0", tag="t", leave_running=True)
        except CorralError as exc:
            failed.append(exc)

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.sandbox == "d-0")
        (inst,) = sup.instances
        assert inst.sandbox is not None
        pid = inst.sandbox.pid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, sup)
            await wait_for(lambda: hung.exists() and hung.read_text().strip() != "")
            os.kill(pid, signal.SIGKILL)  # the sandbox's init: ours, and still unreaped
            # A bound for a hang, not a measure: CRIU's timeout is 600 s.
            await wait_event(
                sup, lambda e: isinstance(e, events.Exited) and e.sandbox == "d-0", timeout=120
            )
        with pytest.raises(ProcessLookupError):
            os.kill(int(hung.read_text()), 0)  # the hung CRIU was killed (and reaped)

    evs = run(f, dirs, body)
    assert [str(e) for e in failed] == ["sandbox 'd-0' exited during the checkpoint"]
    kinds = [e.kind for e in evs if e.sandbox == "d-0"]
    assert kinds.index("checkpoint_failed") < kinds.index("exited"), kinds
    (died,) = of(evs, events.Exited, "d-0")
    assert died.signal == signal.SIGKILL


@pytest.mark.criu
@requires_root
def test_a_user_namespace_sandbox_is_restored_with_its_ids(
    runtime: Runtime, criu: None, tmp_path: Path
) -> None:
    """userns = true: the dump takes the host's device nodes bound in (and
    the masks bound from /dev/null) as externals; the restore claims the
    same id range, and CRIU makes the namespace with the same map. The
    counter goes on, as the same unprivileged host ids; its /dev/null is
    the host's node, and /proc/kcore is still masked by it. While the
    range is another sandbox's, the restore gets a range of its own and
    the checkpoint is moved into it (its userns image and the layer's owners).
    A host directory below one only root may search (pytest's) is a
    volume: copied by the host's side, idmapped where its file system can
    be, and the same after each restore."""
    from supervisor._runtime._mounts import parse_volume

    host = tmp_path / "host"
    host.mkdir()
    host.chmod(0o777)  # writable as the range's root too, where not idmapped
    os.chmod(tmp_path, 0o700)

    def write(sb: Sandbox, name: str) -> int:
        with runtime.exec(sb, ["sh", "-c", f"echo x > /h/{name}"]) as proc:
            assert proc.wait() == 0
        return (host / name).stat().st_uid

    def check(back: Sandbox, base: int, at: int, idmapped: bool) -> None:
        """*back* runs as the range from *base* and counts on from *at*."""
        uid_map = Path(f"/proc/{back.pid}/uid_map").read_text()
        assert uid_map.split() == ["0", str(base), "65536"]
        child = command_pid(back.pid)
        uids = next(
            ln
            for ln in Path(f"/proc/{child}/status").read_text().splitlines()
            if ln.startswith("Uid:")
        )
        assert uids.split()[1:] == [str(base)] * 4
        mounts = Path(f"/proc/{child}/mountinfo").read_text().splitlines()
        null = next(m.split() for m in mounts if m.split()[4] == "/dev/null")
        kcore = [m.split() for m in mounts if m.split()[4] == "/proc/kcore"]
        if kcore:
            assert kcore[-1][2:4] == null[2:4]  # the same node, bound over it
        count = Path(back.state_path, "upper", "count")
        assert count.stat().st_uid == base  # the layer is the range's
        deadline = time.monotonic() + 60
        while int(count.read_text() or 0) < at + 5:
            assert time.monotonic() < deadline, "the restored counter does not count"
            time.sleep(0.05)
        assert write(back, f"after-{base}") == (0 if idmapped else base)

    volumes = (parse_volume(f"{host}:/h"),)
    with counting(runtime, security=make_security(userns=True), mounts=volumes) as (sb, _):
        base = int(Path(f"/proc/{sb.pid}/uid_map").read_text().split()[1])
        assert base > 0
        owner = write(sb, "before")
        assert owner in (0, base)  # idmapped, or (file system cannot) the range's
        info = runtime.checkpoint(sb, tag="one")
        assert info.userns == (base, 65536)
        assert sb.wait().signal == 9
    at = int(Path(info.upper, "count").read_text())
    with runtime.create(
        SandboxSpec("other", ["sleep", "100"], security=make_security(userns=True)),
        stdin_devnull=True,
    ) as other:
        # The range was given back with the sandbox: the next one has it.
        assert int(Path(f"/proc/{other.pid}/uid_map").read_text().split()[1]) == base
        with runtime.restore(info) as back:
            moved = int(Path(f"/proc/{back.pid}/uid_map").read_text().split()[1])
            assert moved != base
            check(back, moved, at, owner == 0)
    with runtime.restore(info) as back:
        check(back, base, at, owner == 0)
    runtime.checkpoints.delete(info)


@pytest.mark.criu
@requires_root
def test_failed_restores_and_dumps_leave_nothing(runtime: Runtime, criu: None) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        runtime.restore(runtime.checkpoints.path("c", "nope"))
    with counting(runtime) as (sb, _):
        info = runtime.checkpoint(sb, tag="good")
        assert sb.wait().signal == 9
    # A damaged image (memory pages cut short): CRIU fails after it has
    # forked the tree; its reason, and nothing half-restored left behind.
    pages = max(Path(info.images).glob("pages-*.img"), key=lambda p: p.stat().st_size)
    os.truncate(pages, 4096)
    with pytest.raises(CheckpointError, match=r"restore of 'c' failed: criu restore: "):
        # CRIU 3.17 sometimes does not end after such a failure (seen in
        # the v2 VM lane): corral's timeout ends it, and what CRIU forked is
        # killed and reaped. 60 s, not the default 600, bounds the lane.
        runtime.restore(info, timeout=60)
    with runtime.create(SandboxSpec("d", ["true"]), stdin_devnull=True) as done:
        done.wait()
        with pytest.raises(CheckpointError, match="'d' has exited: there is nothing"):
            runtime.checkpoint(done)
    assert [c.tag for c in runtime.checkpoints.list("c")] == ["good"]
    assert runtime.checkpoints.list("d") == []
    assert not [n for n in os.listdir(runtime.checkpoints.dir("c")) if n.startswith(".")]


@pytest.mark.criu
@requires_root
def test_a_restore_that_hangs_is_ended_and_leaves_nothing(
    runtime: Runtime, criu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CRIU forks, then hangs (a wrapper: a child that exits at once and
    is never reaped, then a sleep): at the timeout it is killed, and what it
    forked, re-parented to us, is reaped: no zombie is left (the autouse
    fixture checks)."""
    with counting(runtime) as (sb, _):
        info = runtime.checkpoint(sb, tag="good")
        assert sb.wait().signal == 9
    real = check_criu().binary
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then (exit 255) & exec sleep 1000; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CORRAL_CRIU", str(wrapper))
    with pytest.raises(CheckpointError, match=r"restore of 'c' failed: criu restore: timed out"):
        runtime.restore(info, timeout=2)
    assert [c.tag for c in runtime.checkpoints.list("c")] == ["good"]


@pytest.mark.criu
@requires_root
def test_a_dump_that_hangs_is_ended_and_says_where(
    runtime: Runtime, criu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CRIU hangs in its dump, with the sandbox frozen (a wrapper that says
    where it is and sleeps): at the timeout it is killed, the error quotes
    its last words, the sandbox is thawed and runs on, nothing is stored."""
    real = check_criu().binary
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = dump ]; then echo "(00.5) waiting for the parasite" >&2;'
        " exec sleep 1000; fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CORRAL_CRIU", str(wrapper))
    monkeypatch.setattr("supervisor._runtime._sandbox.CRIU_TIMEOUT", 2.0)
    with counting(runtime) as (sb, _):
        with pytest.raises(CheckpointError) as err:
            # Not leave_running: no real pre-dump first, which could
            # take longer than the 2 s here (the VM lanes emulate the CPU).
            runtime.checkpoint(sb, tag="t")
        assert str(err.value) == (
            "checkpoint of 'c' failed: criu dump: timed out after 2 s;"
            " (00.5) waiting for the parasite"
        )
        assert sb.poll() is None and not frozen(sb)
    assert runtime.checkpoints.list("c") == []
    assert os.listdir(runtime.checkpoints.dir("c")) == []


@pytest.mark.criu
@requires_root
def test_a_checkpoint_whose_sandbox_dies_under_a_hung_criu_ends_at_once(
    runtime: Runtime, criu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library alone: CRIU hangs in the pre-dump, the init dies (killed
    from outside, as by an OOM kill): the checkpoint ends at once, saying
    why, not at CRIU's timeout; nothing is stored."""
    hung = _hang_pre_dumps(tmp_path, monkeypatch)
    with counting(runtime) as (sb, _):
        taker, failed = _checkpoint_in_a_thread(runtime, sb)
        try:
            deadline = time.monotonic() + 120
            while not (hung.exists() and hung.read_text().strip()):
                assert taker.is_alive() and time.monotonic() < deadline, failed
                time.sleep(0.01)
            os.kill(sb.pid, signal.SIGKILL)  # the init, unreaped: ours
        finally:
            taker.join(120)  # a bound for a hang: CRIU's timeout is 600 s
        assert not taker.is_alive(), "the checkpoint did not end after the death"
        assert [str(e) for e in failed] == ["sandbox 'c' exited during the checkpoint"]
        assert sb.wait().signal == signal.SIGKILL
    assert runtime.checkpoints.list("c") == []
    assert os.listdir(runtime.checkpoints.dir("c")) == []


def _checkpoint_in_a_thread(
    runtime: Runtime, sb: Sandbox
) -> tuple[threading.Thread, list[CheckpointError]]:
    """A leave-running checkpoint of *sb* (tag ``t``) taken in a thread,
    started; the list its failure is put in."""
    failed: list[CheckpointError] = []

    def take() -> None:
        try:
            runtime.checkpoint(sb, tag="t", leave_running=True)
        except CheckpointError as exc:
            failed.append(exc)

    taker = threading.Thread(target=take)
    taker.start()
    return taker, failed


def _hang_pre_dumps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Have every CRIU pre-dump hang (a wrapper as ``CORRAL_CRIU``); the
    file it writes the hung CRIU's PID to. Skips where CRIU cannot track
    memory (no pre-dump is made)."""
    if check_criu().crit is None:
        pytest.skip("this CRIU cannot track memory: a checkpoint has no pre-dump to hang in")
    real = check_criu().binary
    hung = tmp_path / "hung"
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = pre-dump ]; then echo $$ > {hung}; exec sleep 1000; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CORRAL_CRIU", str(wrapper))
    return hung


def _tracer(pid: int) -> int:
    """The PID of process *pid*'s tracer (0: none, or it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("TracerPid:")[1].split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _seized_by_criu(sb: Sandbox, step: str, taker: threading.Thread) -> None:
    """Wait until a CRIU running *step* holds every process of *sb* (each
    its tracee), while *taker*, the thread taking the checkpoint, runs."""
    deadline = time.monotonic() + 120
    while taker.is_alive() and time.monotonic() < deadline:
        tracer = _tracer(sb.pid)
        with contextlib.suppress(OSError, IndexError):
            argv = Path(f"/proc/{tracer}/cmdline").read_bytes().split(b"\0")
            if tracer and argv[1] == step.encode():
                pids = sb.cgroup.pids()
                if len(pids) > 1 and all(_tracer(p) == tracer for p in pids):
                    return
        time.sleep(0.001)
    raise AssertionError(f"no criu {step} was seen holding the sandbox's processes")


@pytest.mark.criu
@requires_root
@pytest.mark.parametrize("step", ["pre-dump", "dump"])
def test_a_sandbox_killed_under_criu_ends_its_checkpoint_at_once(
    runtime: Runtime, criu: None, step: str
) -> None:
    """The sandbox is killed while CRIU holds its init (its tracee), in the
    pre-dump or the dump of a leave-running checkpoint: the checkpoint fails
    at once, saying why, and leaves nothing. Killed under CRIU alone, the
    two could wait for each other until CRIU's timeout (ten minutes; seen
    on cgroup v1, where a periodic checkpoint met the fleet's stop)."""
    with counting(runtime) as (sb, _):
        taker, failed = _checkpoint_in_a_thread(runtime, sb)
        try:
            _seized_by_criu(sb, step, taker)
            sb.kill()
        finally:
            # A bound for a hang, not a measure: the kill ends CRIU at once.
            taker.join(120)
        assert not taker.is_alive(), "the checkpoint did not end after the kill"
        assert len(failed) == 1, failed
        assert re.fullmatch(
            r"sandbox 'c' (exited|was killed) during the checkpoint", str(failed[0])
        )
        assert sb.wait().signal == signal.SIGKILL
    assert runtime.checkpoints.list("c") == []
    assert os.listdir(runtime.checkpoints.dir("c")) == []


@pytest.mark.criu
@requires_root
@pytest.mark.parametrize("step", ["dump", "pre-dump"])
def test_a_failed_dump_leaves_the_sandbox_running(
    runtime: Runtime, criu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """CRIU fails mid-checkpoint (a wrapper makes `criu dump` or `criu
    pre-dump` fail): the sandbox runs on, thawed, and nothing is stored."""
    real = check_criu().binary
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = {step} ]; then\n'
        '  echo "Error (criu/cr-dump.c:1): injected failure" >&2; exit 1\n'
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CORRAL_CRIU", str(wrapper))
    with counting(runtime) as (sb, r):
        with pytest.raises(CheckpointError) as err:
            runtime.checkpoint(sb, tag="t", leave_running=True)
        assert str(err.value) == (f"checkpoint of 'c' failed: criu {step}: injected failure")
        assert sb.poll() is None and not frozen(sb)
        # Not frozen: it goes on counting (its output drives the wait).
        count = Path(sb.state_path, "upper", "count")
        now = int(count.read_text() or 0)
        deadline = time.monotonic() + 60
        while int(count.read_text() or 0) <= now + 2:
            left = max(0.0, deadline - time.monotonic())
            assert select.select([r], [], [], left)[0], "it stopped counting (frozen?)"
            os.read(r, 4096)
    assert runtime.checkpoints.list("c") == []
    assert os.listdir(runtime.checkpoints.dir("c")) == []


@pytest.mark.criu
@requires_root
def test_volumes_tmpfs_and_a_read_only_root_survive_a_checkpoint(
    runtime: Runtime, criu: None, tmp_path: Path
) -> None:
    """A host directory and a named volume are CRIU externals (their files
    stay where they are; the restore mounts them again); a tmpfs's files
    are dumped and come back; the root stays read-only."""
    from supervisor._runtime._mounts import parse_tmpfs, parse_volume

    host = tmp_path / "host"
    host.mkdir()
    script = "echo kept > /t/f; echo 1 > /v/n; echo go; while :; do sleep 1; done"
    spec = SandboxSpec(
        "vc",
        ["sh", "-c", script],
        mounts=(
            parse_volume(f"{host}:/h"),
            parse_volume("ckpt-vol:/v"),
            parse_tmpfs("/t:size=1M"),
        ),
        read_only=True,
    )
    r, w = os.pipe()
    try:
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 16) == b"go\n"
            info = runtime.checkpoint(sb, tag="v")
            assert sb.wait().signal == 9
        with runtime.restore(info, stdio=(0, 2, 2)) as back:
            with tempfile_out() as (fd, read):
                with runtime.exec(
                    back,
                    ["sh", "-c", "cat /t/f /v/n; echo h > /h/x; touch /y || echo ro"],
                    stdio=(0, fd, fd),
                ) as proc:
                    assert proc.wait() == 0
                lines = read().splitlines()
                assert lines[:2] == ["kept", "1"] and lines[-1] == "ro", lines
            back.kill()
        assert (host / "x").read_text() == "h\n"
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


@contextlib.contextmanager
def tempfile_out() -> Iterator[tuple[int, Callable[[], str]]]:
    """A temporary file's descriptor, and a function reading what was written to it."""
    import tempfile

    with tempfile.TemporaryFile() as f:

        def read() -> str:
            f.seek(0)
            return f.read().decode()

        yield f.fileno(), read
