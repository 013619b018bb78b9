"""Work in threads: the supervisor's limiter per kind of thread work, and
what threads share (a sandbox's pidfd, a worker thread's namespaces)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

import events
from supervisor import Runtime, SandboxSpec, Supervisor

from .conftest import Dirs, requires_root
from .helpers import wait_for
from .supervising import TIMEOUT, fleet, of, run, wait_event

pytestmark = [requires_root]


def _fd_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def _pending(pid: int) -> int:
    """The signals pending for process *pid* (its shared pending set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no ShdPnd line")


def test_a_destroy_in_another_thread_never_frees_a_pidfd_in_use(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal on its way while another thread destroys the sandbox cannot
    reach whatever gets the pidfd's number next (here: another process)."""
    # The bystander: stopped, so that a SIGTERM sent to it stays pending,
    # visible at once in /proc, instead of killing it some time later.
    victim = subprocess.Popen(["sleep", "600"])
    victim_fd = os.pidfd_open(victim.pid)
    try:
        os.kill(victim.pid, signal.SIGSTOP)
        wait_for(
            lambda: Path(f"/proc/{victim.pid}/stat").read_text().split()[2] == "T",
            what="the bystander to stop",
        )
        with open(os.devnull, "rb") as null:
            sb = runtime.create(
                SandboxSpec(name="held", argv=("sleep", "600")), stdio=(null.fileno(),) * 3
            )
        number = sb.pidfd
        real: Callable[[int, int], None] = signal.pidfd_send_signal
        destroyed: list[BaseException | None] = []
        reused: list[int] = []

        def racing_send(fd: int, sig: int) -> None:
            # The first signal is between taking the pidfd and the system
            # call when another thread destroys the sandbox; then the next
            # descriptor opened takes the lowest free number, which is ours
            # if the destroy closed it (dup2 makes that certain).
            if threading.current_thread() is threading.main_thread() and not destroyed:

                def destroy() -> None:
                    try:
                        sb.destroy()
                        destroyed.append(None)
                    except BaseException as exc:  # reported by the assert below
                        destroyed.append(exc)

                worker = threading.Thread(target=destroy)
                worker.start()
                worker.join(timeout=30)
                assert destroyed == [None], "the destroy did not finish"
                if not _fd_open(fd):
                    reused.append(os.dup2(victim_fd, fd))
            real(fd, sig)

        monkeypatch.setattr(signal, "pidfd_send_signal", racing_send)
        sb.send_signal(signal.SIGTERM)
        monkeypatch.undo()
        assert not _pending(victim.pid) & (1 << (signal.SIGTERM - 1)), (
            "the signal went to another process through a reused descriptor"
        )
        assert not _fd_open(number), "the last holder closes the pidfd"
        sb.send_signal(signal.SIGTERM)  # destroyed: a no-op, no EBADF
    finally:
        for fd in (*reused, victim_fd):
            os.close(fd)
        victim.kill()
        victim.wait()


def _net(path: str) -> int:
    return os.stat(path).st_ino


def test_removing_the_network_lock_never_moves_the_calling_thread(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restored sandbox's leftover CRIU lock goes, and the thread that
    asked (on the supervisor, a pooled worker thread) stays in the host's
    network namespace, also while ``nft`` is being spawned."""
    from supervisor._runtime import _sandbox

    with open(os.devnull, "rb") as null:
        sb = runtime.create(
            SandboxSpec(name="netlock", argv=("sleep", "600")), stdio=(null.fileno(),) * 3
        )
    with sb, ThreadPoolExecutor(max_workers=1) as worker:
        in_sandbox = ["nsenter", f"--net=/proc/{sb.pid}/ns/net", "--", "nft"]
        subprocess.run([*in_sandbox, "add", "table", "inet", "CRIU-4242"], check=True)
        host = _net("/proc/self/ns/net")
        assert _net(f"/proc/{sb.pid}/ns/net") != host
        tid = worker.submit(threading.get_native_id).result()
        real_popen = subprocess.Popen
        seen: list[int] = []

        def watching_popen(*args: Any, **kwargs: Any) -> Any:
            seen.append(_net(f"/proc/self/task/{tid}/ns/net"))
            return real_popen(*args, **kwargs)

        monkeypatch.setattr(subprocess, "Popen", watching_popen)
        worker.submit(_sandbox._drop_network_lock, sb.pid, 4242).result()
        monkeypatch.undo()
        assert seen == [host], "the calling thread was moved to spawn nft"
        assert worker.submit(_net, "/proc/thread-self/ns/net").result() == host
        tables = subprocess.run(
            [*in_sandbox, "list", "tables"], check=True, capture_output=True, text=True
        ).stdout
        assert "CRIU-4242" not in tables


def test_checkpoints_holding_every_checkpoint_thread_starve_no_create_or_stop(
    dirs: Dirs,
) -> None:
    """With every slot of the checkpoint limiter taken (say, slow CRIU dumps),
    a sandbox is still created, signalled, stopped and created again."""
    f = fleet({"name": "a", "command": "sleep 600"})

    async def body(sup: Supervisor) -> None:
        lims = sup.limiters
        kinds = [lims.lifecycle, lims.checkpoint, lims.signals, lims.disk]
        assert len({id(k) for k in [*kinds, trio.to_thread.current_default_thread_limiter()]}) == 5
        holders = [object() for _ in range(int(lims.checkpoint.total_tokens))]
        for holder in holders:
            await lims.checkpoint.acquire_on_behalf_of(holder)
        try:
            with trio.fail_after(TIMEOUT):
                await wait_event(sup, lambda e: isinstance(e, events.Started))
                await sup.kill_sandbox("a", int(signal.SIGWINCH))  # tini ignores it
                await sup.stop_sandbox("a")
                (inst,) = await sup.start_sandbox("a")
                assert inst.state == "running"
        finally:
            for holder in holders:
                lims.checkpoint.release_on_behalf_of(holder)

    evs = run(f, dirs, body)
    assert [e.generation for e in of(evs, events.Started, "a-0")] == [0, 1]
    assert len(of(evs, events.Stopped, "a-0")) == 2  # on request, then at the end


def test_a_stop_waits_for_a_new_init_in_a_worker_thread(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SIGTERM of a stop may wait (up to 1 s) for a just-started init to be
    ready for it: that wait never runs on the trio thread."""
    from supervisor._runtime._sandbox import Sandbox

    real_wait = Sandbox._wait_signals_ready
    waited_on: list[threading.Thread] = []

    def recording_wait(self: Sandbox, sig: int) -> None:
        waited_on.append(threading.current_thread())
        real_wait(self, sig)

    monkeypatch.setattr(Sandbox, "_wait_signals_ready", recording_wait)

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        with trio.fail_after(TIMEOUT):
            await sup.stop_sandbox("a")

    run(fleet({"name": "a", "command": "sleep 600"}), dirs, body)  # trio.run in this thread
    assert waited_on, "the stop sent no SIGTERM"
    assert threading.current_thread() not in waited_on


def _fake_checkpoint(state: Path, name: str, tag: str) -> Path:
    """A checkpoint directory that the store lists (never restored: no images)."""
    from supervisor._runtime._checkpoint import CheckpointInfo

    path = state / "checkpoints" / name / tag
    (path / "images").mkdir(parents=True)
    (path / "upper").mkdir()
    (path / "images" / "inventory.img").write_bytes(b"")
    info = CheckpointInfo(
        name=name, tag=tag, path=str(path), created=time.time(), size=1, duration=0.0,
        frozen=0.0, criu_seconds=0.0, leave_running=True,
        spec=SandboxSpec(name=name, argv=("true",)), lowerdir="/nonexistent", root_pid=1,
        stdio=("", "", ""), network_lock="nftables",
    )  # fmt: skip
    (path / "checkpoint.json").write_text(json.dumps(info.to_json()))
    return path


def _record_threads(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[bool]:
    """Wrap *cls.method* to record, per call, whether it ran on this (the trio) thread."""
    real = getattr(cls, method)
    here = threading.current_thread()
    calls: list[bool] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread() is here)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, method, recording)
    return calls


def test_plugins_list_and_delete_checkpoints_off_the_trio_thread(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin's checkpoint list and deletion (the checkpoint plugin's
    pruning: a removal of CRIU images can take long) run in worker threads."""
    from supervisor._core._plugin_host import PluginHandle
    from supervisor._runtime._checkpoint import CheckpointStore

    listed = _record_threads(monkeypatch, CheckpointStore, "list")
    deleted = _record_threads(monkeypatch, CheckpointStore, "delete")
    path = _fake_checkpoint(dirs.state, "a-0", "auto-1")

    async def body(sup: Supervisor) -> None:
        handle = PluginHandle(sup, "test")
        assert [c.tag for c in await handle.checkpoints("a-0")] == ["auto-1"]
        await handle.delete_checkpoint("a-0", "auto-1")
        assert await handle.checkpoints("a-0") == []

    run(fleet({"name": "a", "command": "sleep 600"}), dirs, body)
    assert not path.exists()
    assert listed and deleted
    assert not any(listed) and not any(deleted), "on the trio thread"


def test_a_restart_from_the_latest_checkpoint_looks_for_it_off_the_trio_thread(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """restart(from_checkpoint=True), a plain call of the restart plugin, finds
    the latest checkpoint in a worker thread; with none, it starts afresh."""
    from supervisor._runtime._checkpoint import CheckpointStore

    listed = _record_threads(monkeypatch, CheckpointStore, "list")

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Exited))
        assert sup.restart("a-0", from_checkpoint=True)
        await wait_event(sup, lambda e: isinstance(e, events.Started) and e.generation == 1)

    evs = run(fleet({"name": "a", "command": "true"}), dirs, body)
    assert listed, "no checkpoint was looked for"
    assert not any(listed), "on the trio thread"
    assert not of(evs, events.CheckpointFailed, "a-0")
