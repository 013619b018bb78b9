"""The supervisor: one trio nursery, one task per sandbox instance.

Each instance task creates its sandbox (the blocking runtime call runs in a
worker thread; the fork itself happens in the keeper, never in this
threaded process), then waits on two kernel descriptors and nothing else:

- the init's pidfd, readable once it has exited;
- the cgroup's OOM watch (inotify on ``memory.events`` on v2, an eventfd on
  ``memory.oom_control`` on v1), readable when the OOM killer ran.

So the supervisor is idle when nothing happens: no polling loop anywhere.
What the kernel reports becomes typed events on the bus; the journal and the
event socket are fed from there.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict

import trio

import events
from events import (
    Added,
    Checkpointed,
    CheckpointFailed,
    Created,
    ExecExited,
    ExecStarted,
    Exited,
    Failed,
    LimitChanged,
    Oom,
    OomKill,
    Paused,
    PluginFailed,
    Removed,
    Restored,
    Resumed,
    Signaled,
    Started,
    StartFailed,
    Stopped,
    Stopping,
    SupervisorStarted,
    SupervisorStopped,
    SupervisorStopping,
)

from .._errors import CheckpointError, CorralError, SandboxError, SpecError, StateError
from .._runtime._checkpoint import CheckpointInfo, check_criu, restore_weakens
from .._runtime._linux._cgroups import OomWatch
from .._runtime._linux._spawn import Keeper
from .._runtime._sandbox import Runtime, Sandbox
from .._runtime._spec import Limits, SandboxSpec, validate_name
from ._fleet import Fleet, SandboxConfig
from ._output import LogWriter, pump
from ._plugin_host import DEFAULT_PLUGINS, PluginFn, PluginHandle, load_plugin
from ._states import check_transition, guard

if TYPE_CHECKING:
    from .._runtime._sandbox import ExecProcess

__all__ = ["Instance", "Supervisor"]

# A wake-up of the OOM watch that shows no kill yet may be the notification
# that precedes the kill (v1 signals before the victim is chosen). Only if
# the kill counter is still unchanged this long after is it a near miss.
NEAR_MISS_DELAY = 0.05
# A plugin that raises is restarted after 1 s, 2 s, ...; after this many
# failures it is disabled.
PLUGIN_MAX_FAILURES = 3
PLUGIN_RESTART_DELAY = 1.0
PLUGIN_DRAIN_TIMEOUT = 5.0
RECENT_EVENTS = 20
"""Events kept per instance for ``inspect``."""
BUSY_CHECKPOINT = "a checkpoint is being taken"
BUSY_PAUSE = "it is being paused or resumed"


class RestoreError(CheckpointError):
    """A restore asked of the supervisor failed (the instance is as it was)."""


@dataclass(eq=False)
class _PendingRestore:
    """A restore the next generation performs instead of a fresh start."""

    info: CheckpointInfo
    fallback: bool
    """Start fresh if the restore fails (restart-by-restore); else stay as before."""
    prev_state: str = "exited"
    prev_checkpoint_stopped: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    sandbox: Sandbox | None = None
    error: CorralError | None = None


class _Ident(TypedDict):
    sandbox: str
    instance: int
    generation: int


@dataclass(eq=False)
class Instance:
    """One replica of a sandbox, as the supervisor tracks it.

    Its read-only properties are what plugins see (``plugins.InstanceView``).
    Its state changes only through :meth:`set_state`, along the life cycle
    of :mod:`supervisor._core._states`.
    """

    config: SandboxConfig
    index: int
    generation: int = 0
    state: str = "pending"
    """One of :data:`supervisor._core._states.STATES`."""
    sandbox: Sandbox | None = None
    grace: float = 10.0
    memory_override: int | None = None
    memory_overridden: bool = False
    oom_kills_reported: int = 0
    oom_events_seen: int = 0
    alias: str | None = None
    """Its name when it is not ``NAME-INDEX`` (an instance restored ``--as``)."""
    busy: str | None = None
    """An operation in progress that excludes other verbs (a checkpoint, a
    pause), as words for an error message."""
    checkpoint_stopped: bool = False
    """It was stopped by a checkpoint (not ``leave_running``); a restore
    brings it back, a restart policy leaves it alone."""
    stop_reason: str = "requested"
    started_at: float | None = None
    """Wall-clock time its current generation started running."""
    paused_at: float | None = None
    """Monotonic time it was paused, while it is."""
    last_exit: dict[str, Any] | None = None
    """How its last generation ended (the ``exited`` event's fields, and when)."""
    recent: deque[events.Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    """Its last events, newest last (for ``inspect``)."""
    execs: dict[int, ExecProcess] = field(default_factory=dict)
    """Processes started in it by ``exec`` that still run, by exec id."""
    _pending_restore: _PendingRestore | None = None
    _idle: trio.Event = field(default_factory=trio.Event)
    _stop: trio.Event = field(default_factory=trio.Event)
    _halt: trio.Event = field(default_factory=trio.Event)
    _wake: trio.Event = field(default_factory=trio.Event)
    _up: trio.Event = field(default_factory=trio.Event)
    _ended: trio.Event = field(default_factory=trio.Event)
    _restart: bool = False
    _cycle: bool = False
    _task_alive: bool = False

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def name(self) -> str:
        """The instance's name in events (``NAME-INDEX``)."""
        return self.alias or self.config.instance_name(self.index)

    @property
    def sandbox_name(self) -> str:
        """The fleet entry it belongs to."""
        return self.config.name

    @property
    def checkpointing(self) -> bool:
        """A checkpoint of it is being taken."""
        return self.busy == BUSY_CHECKPOINT

    @property
    def stop_requested(self) -> bool:
        """True once this instance (or the fleet) is being stopped or
        restarted on request, or a checkpoint stopped it: restart policies
        must leave it alone."""
        return self._stop.is_set() or self.checkpoint_stopped or self._cycle

    @property
    def memory_limit(self) -> int | None:
        """The memory limit its next (or current) generation runs with."""
        return self.memory_override if self.memory_overridden else self.config.limits.memory

    def set_state(self, new: str) -> None:
        """Move to state *new*; a change the life cycle does not have is a bug."""
        check_transition(self.name, self.state, new)
        self.state = new

    def begin(self, busy: str) -> None:
        """Mark an exclusive operation as running (see :attr:`busy`)."""
        self.busy = busy
        self._idle = trio.Event()

    def end(self) -> None:
        """The exclusive operation is over."""
        self.busy = None
        self._idle.set()

    def spec(self) -> SandboxSpec:
        """The runtime spec of the current generation.

        The runtime name carries the generation, so a restart never waits
        for the previous generation's cgroup and layer to be removed.
        """
        base = self.config.spec(self.index)
        limits = base.limits._replace(memory=self.memory_limit)
        return SandboxSpec(
            name=f"{self.name}.{self.generation}",
            argv=base.argv,
            rootfs=base.rootfs,
            hostname=self.config.hostname or _hostname(self.name),
            env=base.env,
            workdir=base.workdir,
            limits=limits,
            security=base.security,
        )

    def request_stop(self, reason: str | None = None) -> None:
        """Stop it for good (until started again)."""
        if reason is not None and not self._stop.is_set():
            self.stop_reason = reason
        self._stop.set()
        self._halt.set()
        self._wake.set()

    def request_restart(self) -> None:
        """Start the next generation of an exited, failed or stopped instance."""
        self._restart = True
        self._wake.set()

    def request_cycle(self) -> None:
        """Stop the running generation, then start the next at once."""
        self._cycle = True
        self.stop_reason = "restart requested"
        self._halt.set()


def _hostname(name: str) -> str:
    return SandboxSpec(name=name, argv=("x",)).effective_hostname


class Supervisor:
    """Runs a fleet and turns what the kernel reports into events.

    ``await Supervisor(fleet).run()`` runs until :meth:`stop` is called (or
    SIGINT/SIGTERM arrives, with ``handle_signals``), then stops every
    sandbox gracefully and returns once all are gone and cleaned up.
    Plugins (restart policies, ...) run alongside and act through
    :class:`~supervisor._core._plugin_host.PluginHandle`.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        state_dir: str | None = None,
        run_dir: str | None = None,
        handle_signals: bool = False,
        log: bool = False,
    ) -> None:
        self.fleet = fleet
        self._state_dir = state_dir
        self._run_dir = run_dir
        self._handle_signals = handle_signals
        self._log = log
        self.instances: list[Instance] = [
            Instance(cfg, i, grace=fleet.supervisor.grace_period) for cfg, i in fleet.instances()
        ]
        self._by_name = {inst.name: inst for inst in self.instances}
        self.bus: events.Bus | None = None
        self.runtime: Runtime | None = None
        self._stopping = trio.Event()
        self._stop_reason = "requested"
        self._logs: dict[str, LogWriter] = {}
        self._janitor: trio.Nursery | None = None
        self._fleet_nursery: trio.Nursery | None = None
        self._exec_ids = 0
        self._execs: dict[int, ExecProcess] = {}
        # Resolve every plugin now: a typo in a fleet file is an error at
        # start-up, not a surprise at the first crash.
        names = dict.fromkeys([*DEFAULT_PLUGINS, *fleet.plugins])
        for cfg in fleet.sandboxes:
            names.update(dict.fromkeys(cfg.plugins))
        base = os.path.dirname(os.path.abspath(fleet.source)) if fleet.source != "<fleet>" else "."
        self._plugins = {
            name: load_plugin(name, fleet.plugins.get(name, {}), base) for name in names
        }

    @property
    def socket_path(self) -> str:
        """Where outside consumers connect for the event stream."""
        assert self.runtime is not None
        return os.path.join(self.runtime.run_dir, "events.sock")

    def publish(self, event: events.Event) -> events.Event:
        """Publish on the bus (stamping sequence number and times)."""
        assert self.bus is not None
        published = self.bus.publish(event)
        inst = self._by_name.get(event.sandbox) if event.sandbox else None
        if inst is not None:
            inst.recent.append(published)
        return published

    def instance(self, name: str) -> Instance | None:
        """An instance by its name (``web-0``)."""
        return self._by_name.get(name)

    # -- verbs (used by plugins through their handle, and by the CLI later) --

    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool:
        """Start the next generation of an exited or failed instance.

        With *from_checkpoint* the generation is restored from the
        instance's latest checkpoint if it has one (a fresh start if it has
        none, or if the restore fails: ``checkpoint_failed`` says why).
        """
        inst = self._by_name.get(name)
        if inst is None or inst.stop_requested or inst.state not in ("exited", "failed"):
            return False
        if from_checkpoint and self.runtime is not None:
            found = self.runtime.checkpoints.list(inst.name)
            if found:
                inst._pending_restore = _PendingRestore(found[-1], fallback=True)
        inst.request_restart()
        return True

    def resolve(self, name: str) -> Instance:
        """An instance by name; a sandbox's name means its first instance."""
        inst = self._by_name.get(name)
        if inst is None:
            for cfg in self.fleet.sandboxes:
                if cfg.name == name:
                    inst = self._by_name.get(cfg.instance_name(0))
        if inst is None:
            raise SpecError("name", f"no sandbox instance {name!r} in this fleet")
        return inst

    async def checkpoint(
        self, name: str, *, tag: str | None = None, leave_running: bool = False
    ) -> CheckpointInfo:
        """Checkpoint a running instance with CRIU (see :meth:`Runtime.checkpoint`).

        Publishes ``checkpointed``; without *leave_running* the instance is
        then stopped (``exited``, ``stopped``) until restored. On failure it
        publishes ``checkpoint_failed`` and raises; the instance runs on.
        """
        assert self.runtime is not None
        runtime = self.runtime
        inst = self.resolve(name)
        ident = self._ident(inst)
        sb = inst.sandbox
        try:
            guard("checkpoint", inst.name, inst.state, inst.busy)
        except StateError as exc:
            self.publish(
                CheckpointFailed(**ident, operation="checkpoint", tag=tag or "", reason=str(exc))
            )
            raise
        assert sb is not None
        token = trio.lowlevel.current_trio_token()

        def on_dumped(info: CheckpointInfo) -> None:
            # In the worker thread, before the kill: checkpointed comes
            # before the exited it causes, and no restart policy reacts.
            if not leave_running:
                inst.checkpoint_stopped = True
            trio.from_thread.run_sync(self._published_checkpoint, inst, info, trio_token=token)

        inst.begin(BUSY_CHECKPOINT)
        try:
            with trio.CancelScope(shield=True):
                info: CheckpointInfo = await trio.to_thread.run_sync(
                    partial(
                        runtime.checkpoint,
                        sb,
                        name=inst.name,
                        tag=tag,
                        leave_running=leave_running,
                        on_dumped=on_dumped,
                    )
                )
            return info
        except CorralError as exc:
            self.publish(
                CheckpointFailed(**ident, operation="checkpoint", tag=tag or "", reason=str(exc))
            )
            raise
        finally:
            inst.end()

    def _published_checkpoint(self, inst: Instance, info: CheckpointInfo) -> None:
        self.publish(
            Checkpointed(
                **self._ident(inst),
                tag=info.tag,
                size=info.size,
                duration_ms=round(info.duration * 1000, 3),
                frozen_ms=round(info.frozen * 1000, 3),
                leave_running=info.leave_running,
            )
        )

    async def restore(
        self, name: str, *, tag: str | None = None, as_name: str | None = None
    ) -> Sandbox:
        """Restore instance *name* from its checkpoint *tag* (default: the latest).

        Without *as_name* the instance itself comes back as its next
        generation; it must not be running. With *as_name* a new instance
        of that name is added to the fleet and restored (the original may
        run on). Publishes ``restored`` and ``started``; on failure
        ``checkpoint_failed`` and raises, leaving everything as it was.
        """
        assert self.runtime is not None and self._fleet_nursery is not None
        runtime = self.runtime
        source = self.resolve(name)

        def find() -> CheckpointInfo:
            check_criu()  # "CRIU cannot work here" first, whatever else is wrong
            return runtime.checkpoints.find(source.name, tag)

        try:
            info = await trio.to_thread.run_sync(find)
            if as_name is not None:
                validate_name(as_name, "as")
                if as_name in self._by_name or any(
                    c.name == as_name or c.instance_name(0) == as_name for c in self.fleet.sandboxes
                ):
                    raise SpecError("as", f"{as_name!r} is already a sandbox of this fleet")
                if self._stopping.is_set():
                    raise CheckpointError("the fleet is stopping")
                target = Instance(
                    SandboxConfig(
                        name=as_name,
                        command=source.config.command,
                        rootfs=source.config.rootfs,
                        limits=source.config.limits._replace(memory=source.memory_limit),
                        env=source.config.env,
                        workdir=source.config.workdir,
                        hostname=source.config.hostname,
                        plugins=source.config.plugins,
                        security=source.config.security,
                    ),
                    0,
                    grace=source.grace,
                )
                target.alias = as_name
                pending = _PendingRestore(info, fallback=False)
                target._pending_restore = pending
                target.set_state("starting")
                self.instances.append(target)
                self._by_name[target.name] = target
                self._fleet_nursery.start_soon(self._supervise, target)
            else:
                target = source
                if target._stop.is_set():
                    raise CheckpointError(
                        f"{name!r} was stopped (or the fleet is stopping): restore it under a"
                        " new name (--as)"
                    )
                guard("restore", target.name, target.state, target.busy)
                if target._pending_restore is not None:
                    raise StateError(
                        "restore", target.name, target.state, "a restore of it is under way"
                    )
                pending = _PendingRestore(
                    info,
                    fallback=False,
                    prev_state=target.state,
                    prev_checkpoint_stopped=target.checkpoint_stopped,
                )
                target._pending_restore = pending
                target.request_restart()
        except CorralError as exc:
            self.publish(
                CheckpointFailed(
                    **self._ident(source), operation="restore", tag=tag or "", reason=str(exc)
                )
            )
            raise
        await pending.done.wait()
        if pending.error is not None:
            if target is not source:
                # A new instance that never came up leaves the fleet again.
                self.instances.remove(target)
                self._by_name.pop(target.name, None)
                target.request_stop()
            raise pending.error
        assert pending.sandbox is not None
        return pending.sandbox

    def mark_failed(self, name: str, reason: str) -> None:
        """Record (as an event) that an exited instance will not be restarted."""
        inst = self._by_name.get(name)
        if inst is None or inst.state != "exited":
            return
        inst.set_state("failed")
        self.publish(Failed(**self._ident(inst), reason=reason))

    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None:
        """Change an instance's memory limit, live and for later generations."""
        inst = self._by_name.get(name)
        if inst is None:
            return
        old = inst.memory_limit
        inst.memory_override, inst.memory_overridden = limit, True
        if inst.sandbox is not None and limit is not None:
            try:
                inst.sandbox.cgroup.apply(Limits(memory=limit))
            except CorralError as exc:
                reason = f"{reason} (applies from the next start: {exc})"
        self.publish(
            LimitChanged(**self._ident(inst), limit="memory", old=old, new=limit, reason=reason)
        )

    # -- control verbs (the control socket's; docs/control.md) --------------------

    def targets(self, name: str) -> list[Instance]:
        """The instances *name* means: one instance, or every instance of a sandbox."""
        inst = self._by_name.get(name)
        if inst is not None:
            return [inst]
        found = [i for i in self.instances if i.sandbox_name == name and i.alias is None]
        if not found:
            raise SpecError("name", f"no sandbox or instance {name!r} in this fleet")
        return found

    def _guarded(self, verb: str, name: str) -> list[Instance]:
        """The instances *name* means, if *verb* is allowed on every one of them."""
        found = self.targets(name)
        for inst in found:
            guard(verb, inst.name, inst.state, inst.busy)
        return found

    async def stop_sandbox(self, name: str, grace: float | None = None) -> list[Instance]:
        """Stop instance(s) *name* (SIGTERM, *grace* seconds, SIGKILL) and wait
        until they are stopped. They stay stopped until started."""
        found = self._guarded("stop", name)
        for inst in found:
            self.stop_instance(inst.name, grace)
        for inst in found:
            await inst._ended.wait()
        return found

    def stop_instance(self, name: str, grace: float | None = None) -> None:
        """Stop one instance; it stays stopped until started again."""
        inst = self._by_name.get(name)
        if inst is None:
            return
        if grace is not None:
            inst.grace = grace
        inst.request_stop("requested")

    async def start_sandbox(self, name: str) -> list[Instance]:
        """Start stopped (or exited, failed) instance(s) *name*; return once
        each runs or has failed to start (see their state)."""
        found = self._guarded("start", name)
        self._check_not_stopping()
        for inst in found:
            self._start_next(inst)
        for inst in found:
            await inst._up.wait()
        return found

    async def restart_sandbox(self, name: str, grace: float | None = None) -> list[Instance]:
        """Restart instance(s) *name*: stop the running generation gracefully
        (as :meth:`stop_sandbox`), then start the next; a sandbox that is not
        running is just started. Returns once each runs or failed to start."""
        found = self._guarded("restart", name)
        self._check_not_stopping()
        for inst in found:
            if inst._stop.is_set() and inst._task_alive:
                raise StateError("restart", inst.name, inst.state, "it is being stopped")
        for inst in found:
            inst._up = trio.Event()
            if inst.state in ("starting", "running", "paused", "stopping"):
                if grace is not None:
                    inst.grace = grace
                inst.request_cycle()
            else:
                self._start_next(inst)
        for inst in found:
            await inst._up.wait()
        return found

    def _check_not_stopping(self) -> None:
        if self._stopping.is_set():
            raise CorralError("the fleet is stopping")

    def _start_next(self, inst: Instance) -> None:
        """Start the next generation of an instance that does not run."""
        assert self._fleet_nursery is not None
        inst._up = trio.Event()
        if inst._task_alive:
            inst.checkpoint_stopped = False
            inst.request_restart()
        else:
            inst._stop = trio.Event()
            inst._halt = trio.Event()
            inst._wake = trio.Event()
            inst._ended = trio.Event()
            inst._restart = False
            inst.generation += 1
            self._fleet_nursery.start_soon(self._supervise, inst)

    async def kill_sandbox(self, name: str, sig: int) -> list[Instance]:
        """Send signal *sig* to the main process of instance(s) *name*.

        It goes to the init (tini) by pidfd, so it can never hit a recycled
        PID; tini passes it on to the command (SIGKILL and SIGSTOP it cannot
        catch: those end, or stop, the whole sandbox).
        """
        found = self._guarded("kill", name)
        for inst in found:
            sb = inst.sandbox
            assert sb is not None
            # May wait (bounded, normally not at all) for a just-started
            # init to be ready for signals.
            await trio.to_thread.run_sync(sb.send_signal, sig)
            self.publish(Signaled(**self._ident(inst), signal=sig, name=signal.Signals(sig).name))
        return found

    async def pause_sandbox(self, name: str) -> list[Instance]:
        """Freeze instance(s) *name* with the cgroup freezer; return once the
        kernel reports them frozen (``paused`` events)."""
        found = self._guarded("pause", name)
        for inst in found:
            inst.begin(BUSY_PAUSE)
        try:
            for inst in found:
                await self._freeze(inst)
        finally:
            for inst in found:
                inst.end()
        return found

    async def _freeze(self, inst: Instance) -> None:
        sb = inst.sandbox
        assert sb is not None
        start = trio.current_time()
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(sb.cgroup.freeze)
            except CorralError:
                await trio.to_thread.run_sync(sb.cgroup.thaw)
                raise
        if inst.sandbox is not sb or inst.state != "running":
            # It exited while being frozen.
            await trio.to_thread.run_sync(sb.cgroup.thaw)
            raise StateError("pause", inst.name, inst.state, "it exited while being paused")
        inst.set_state("paused")
        inst.paused_at = trio.current_time()
        self.publish(
            Paused(**self._ident(inst), freeze_ms=round((inst.paused_at - start) * 1000, 3))
        )

    async def resume_sandbox(self, name: str) -> list[Instance]:
        """Thaw paused instance(s) *name* (``resumed`` events)."""
        found = self._guarded("resume", name)
        for inst in found:
            sb = inst.sandbox
            assert sb is not None
            inst.begin(BUSY_PAUSE)
            try:
                await self._thaw(inst, sb, self._ident(inst))
            finally:
                inst.end()
        return found

    async def _thaw(self, inst: Instance, sb: Sandbox, ident: _Ident) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sb.cgroup.thaw)
        paused = trio.current_time() - (inst.paused_at or trio.current_time())
        inst.paused_at = None
        inst.set_state("running")
        self.publish(Resumed(**ident, paused_ms=round(paused * 1000, 3)))

    async def exec_in(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        tty: bool = False,
        winsize: tuple[int, int] | None = None,
        stdio: tuple[int, int, int],
        started: Callable[[int, ExecProcess], Awaitable[None]] | None = None,
    ) -> int:
        """Run *argv* in the running instance *name* (see :meth:`Runtime.exec`);
        return its shell-style status once it has ended.

        *started(exec_id, process)* is awaited once it runs (the control
        socket hands a pty master to its client there). ``exec_started`` and
        ``exec_exited`` are published. If this is cancelled the process is
        killed.
        """
        assert self.runtime is not None
        runtime = self.runtime
        inst = self.resolve(name)
        guard("exec", inst.name, inst.state, inst.busy)
        sb = inst.sandbox
        assert sb is not None
        try:
            with trio.CancelScope(shield=True):
                proc: ExecProcess = await trio.to_thread.run_sync(
                    partial(
                        runtime.exec,
                        sb,
                        argv,
                        env=env,
                        workdir=workdir,
                        stdio=stdio,
                        tty=tty,
                        winsize=winsize,
                    )
                )
        except SandboxError as exc:
            # Name the instance, not the runtime's generation name.
            message = str(exc).replace(f"sandbox {sb.name!r}: ", "", 1)
            raise type(exc)(f"exec in {inst.name!r}: {message}") from None
        self._exec_ids += 1
        exec_id = self._exec_ids
        inst.execs[exec_id] = proc
        self._execs[exec_id] = proc
        ident = self._ident(inst)
        try:
            self.publish(
                ExecStarted(
                    **ident, exec_id=exec_id, pid=proc.pid, command=shlex.join(argv), tty=tty
                )
            )
            if started is not None:
                await started(exec_id, proc)
            await trio.lowlevel.wait_readable(proc.pidfd)
            # Readable: it has exited, and it is our child (the spawner
            # reports "exec'd" only once the intermediate is reaped).
            status = proc.poll()
            if status is None:  # pragma: no cover - readable pidfd means exited
                status = await trio.to_thread.run_sync(proc.wait)
            self.publish(ExecExited(**ident, exec_id=exec_id, status=status))
            return status
        finally:
            inst.execs.pop(exec_id, None)
            self._execs.pop(exec_id, None)
            proc.close()

    def signal_exec(self, exec_id: int, sig: int) -> None:
        """Send *sig* to the process ``exec_id`` started (by pidfd)."""
        proc = self._execs.get(exec_id)
        if proc is None:
            raise SpecError("exec_id", f"no running exec {exec_id}")
        proc.send_signal(sig)

    async def add_fleet(self, path: str) -> list[Instance]:
        """Add the sandboxes of fleet file *path* to the running fleet and
        start them; return once each runs or failed to start.

        All or nothing: a name already in the fleet, a plugin this
        supervisor does not run, or a ``[supervisor]`` table fails the whole
        file, and nothing is added.
        """
        from ._fleet import FleetError, SupervisorConfig, load_fleet

        self._check_not_stopping()
        assert self._fleet_nursery is not None
        try:
            added = await trio.to_thread.run_sync(load_fleet, path)
        except FleetError as exc:
            raise SpecError(path, "; ".join(exc.problems)) from None
        problems = []
        taken = {c.name for c in self.fleet.sandboxes} | set(self._by_name)
        for cfg in added.sandboxes:
            clash = [
                n
                for n in (cfg.name, *(cfg.instance_name(i) for i in range(cfg.replicas)))
                if n in taken
            ]
            if clash:
                problems.append(f"sandbox {cfg.name!r}: {clash[0]!r} is already in the fleet")
            unknown = [p for p in cfg.plugins if p not in self._plugins]
            if unknown:
                problems.append(
                    f"sandbox {cfg.name!r}: plugin {unknown[0]!r} is not running in this"
                    " supervisor (plugins are loaded at start-up)"
                )
        if added.plugins:
            problems.append("[plugins] tables apply to the whole fleet: set them at start-up")
        if added.supervisor != SupervisorConfig():
            problems.append("[supervisor] settings apply to the whole fleet: set them at start-up")
        if problems:
            raise SpecError(path, "; ".join(problems))
        self.fleet = replace(self.fleet, sandboxes=self.fleet.sandboxes + added.sandboxes)
        new = [
            Instance(cfg, i, grace=self.fleet.supervisor.grace_period)
            for cfg, i in added.instances()
        ]
        for inst in new:
            self.instances.append(inst)
            self._by_name[inst.name] = inst
            self.publish(Added(**self._ident(inst), source=path))
            self._fleet_nursery.start_soon(self._supervise, inst)
        for inst in new:
            await inst._up.wait()
        return new

    async def remove_sandbox(self, name: str, grace: float | None = None) -> list[Instance]:
        """Stop instance(s) *name* (if they run) and take them out of the
        fleet (``removed`` events). Their logs and checkpoints stay on disk."""
        found = self._guarded("rm", name)
        for inst in found:
            if grace is not None:
                inst.grace = grace
            inst.request_stop("removed")
        for inst in found:
            if inst._task_alive:
                await inst._ended.wait()
        for inst in found:
            if self._by_name.get(inst.name) is not inst:
                continue  # removed meanwhile by a concurrent rm
            self.instances.remove(inst)
            del self._by_name[inst.name]
            self.publish(Removed(**self._ident(inst)))
            writer = self._logs.pop(inst.name, None)
            if writer is not None:
                writer.close()
        left = {i.config.name for i in self.instances}
        self.fleet = replace(
            self.fleet, sandboxes=tuple(c for c in self.fleet.sandboxes if c.name in left)
        )
        return found

    def stop(self, reason: str = "requested", grace: float | None = None) -> None:
        """Stop every sandbox gracefully (SIGTERM, grace period, SIGKILL)."""
        if self._stopping.is_set():
            if grace is not None:
                # A second request with a shorter grace (a second Ctrl-C).
                for inst in self.instances:
                    inst.grace = min(inst.grace, grace)
                    if inst.sandbox is not None and grace == 0:
                        inst.sandbox.kill()
            return
        self._stop_reason = reason
        for inst in self.instances:
            inst.grace = self.fleet.supervisor.grace_period if grace is None else grace
        self._stopping.set()

    # -- running ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fleet until stopped; then stop it and clean everything up."""
        sup = self.fleet.supervisor
        keeper = Keeper()
        try:
            self.runtime = Runtime(
                state_dir=self._state_dir,
                run_dir=self._run_dir,
                cgroup_parent=sup.cgroup_parent,
                spawner=keeper.spawn,
            )
            journal = events.Journal(
                os.path.join(self.runtime.state_dir, "journal"),
                segment_bytes=sup.journal_segment_bytes,
                max_bytes=sup.journal_max_bytes,
            )
            try:
                self.bus = events.Bus(journal)
                async with trio.open_nursery() as logs:
                    if self._log:
                        from ._supervisor_log import log_events

                        # Not cancelled at the end: it returns after logging
                        # supervisor_stopped, so the log is complete.
                        await logs.start(log_events, self.bus)
                    await self._run_services(task_status)
            finally:
                journal.close()
        finally:
            keeper.close()
            for writer in self._logs.values():
                writer.close()

    async def _run_services(self, task_status: trio.TaskStatus[None]) -> None:
        assert self.bus is not None
        bus = self.bus
        async with trio.open_nursery() as services:
            await services.start(
                partial(
                    events.serve_events,
                    bus,
                    self.socket_path,
                    group=self.fleet.supervisor.socket_group,
                )
            )
            from .._control._client import CONTROL_SOCKET
            from .._control._server import serve_control

            assert self.runtime is not None
            control = trio.CancelScope()
            control_path = os.path.join(self.runtime.run_dir, CONTROL_SOCKET)

            async def run_control(task_status: trio.TaskStatus[None]) -> None:
                with control:
                    await serve_control(
                        self,
                        control_path,
                        group=self.fleet.supervisor.socket_group,
                        task_status=task_status,
                    )

            await services.start(run_control)
            services.start_soon(bus.flush_journal)
            signals = trio.CancelScope()
            if self._handle_signals:
                services.start_soon(self._signals, signals)
            self.publish(SupervisorStarted(sandbox="", pid=os.getpid(), version=_version()))
            async with trio.open_nursery() as plugins:
                for name, (fn, config) in self._plugins.items():
                    plugins.start_soon(self._run_plugin, name, fn, config)
                # Old generations are removed in the janitor's tasks, so
                # that a restart never waits for a cgroup removal.
                async with trio.open_nursery() as janitor:
                    self._janitor = janitor
                    async with trio.open_nursery() as fleet:
                        self._fleet_nursery = fleet
                        for inst in self.instances:
                            fleet.start_soon(self._supervise, inst)
                        task_status.started()
                        await self._stopping.wait()
                        self.publish(SupervisorStopping(sandbox="", reason=self._stop_reason))
                        for inst in self.instances:
                            inst.request_stop()
                            if inst._pending_restore is not None:
                                inst._pending_restore.error = CheckpointError(
                                    "the fleet is stopping"
                                )
                                inst._pending_restore.done.set()
                self.publish(SupervisorStopped(sandbox=""))
                # Closing the bus ends the services and plugins gracefully:
                # every consumer (log, event log, socket clients) gets every
                # event up to this last one, and the journal is flushed.
                # Cancelling would cut them short; a plugin that does not
                # finish by itself is cancelled after a short drain.
                bus.close()
                plugins.cancel_scope.deadline = trio.current_time() + PLUGIN_DRAIN_TIMEOUT
            signals.cancel()
            control.cancel()

    async def _run_plugin(self, name: str, fn: PluginFn, config: dict[str, Any]) -> None:
        """Run a plugin; if it raises, report it and restart it, or give up."""
        handle = PluginHandle(self, name)
        delay = PLUGIN_RESTART_DELAY
        for failure in range(1, PLUGIN_MAX_FAILURES + 1):
            try:
                await fn(handle, config)
                return
            except Exception as exc:  # a plugin's bug must not stop the fleet
                action = "disable" if failure == PLUGIN_MAX_FAILURES else "restart"
                self.publish(
                    PluginFailed(
                        sandbox="",
                        plugin=name,
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                        action=action,
                    )
                )
            if failure < PLUGIN_MAX_FAILURES:
                await trio.sleep(delay)
                delay *= 2

    async def _signals(self, scope: trio.CancelScope) -> None:
        with scope, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping.is_set():
                    self.stop(f"{name} received")
                else:
                    self.stop(f"{name} received again", grace=0)

    def _log_writer(self, inst: Instance) -> LogWriter:
        """The instance's output log (k8s-file format), kept across restarts."""
        assert self.runtime is not None
        writer = self._logs.get(inst.name)
        if writer is None:
            os.makedirs(os.path.join(self.runtime.state_dir, "logs"), mode=0o700, exist_ok=True)
            writer = LogWriter(
                log_path(self.runtime.state_dir, inst.name),
                max_bytes=self.fleet.supervisor.log_max_bytes,
                max_files=self.fleet.supervisor.log_max_files,
            )
            self._logs[inst.name] = writer
        return writer

    @staticmethod
    def _ident(inst: Instance) -> _Ident:
        return {"sandbox": inst.name, "instance": inst.index, "generation": inst.generation}

    async def _supervise(self, inst: Instance) -> None:
        """Run one instance, generation after generation, until it is stopped."""
        inst._task_alive = True
        try:
            while not inst._stop.is_set():
                await self._run_generation(inst)
                if inst._stop.is_set():
                    break
                if inst._cycle:
                    # A restart on request: the next generation, at once.
                    inst._cycle = inst._restart = False
                    inst.generation += 1
                    continue
                # Exited (or failed): idle until a plugin restarts it or a stop.
                await inst._wake.wait()
                inst._wake = trio.Event()
                if inst._restart and not inst._stop.is_set():
                    inst._restart = False
                    inst.generation += 1
            if inst.state in ("exited", "failed", "pending"):
                inst.set_state("stopped")
        finally:
            inst._task_alive = False
            inst._cycle = False
            inst._up.set()
            inst._ended.set()

    async def _run_generation(self, inst: Instance) -> None:
        """Create, watch, report and clean up one generation."""
        assert self.runtime is not None and self._janitor is not None
        runtime = self.runtime
        ident = self._ident(inst)
        if not inst._stop.is_set():
            inst._halt = trio.Event()
        inst.checkpoint_stopped = False
        inst.set_state("starting")
        self.publish(Created(**ident))
        writer = self._log_writer(inst)
        # stdout and stderr go through pipes to the instance's log writer:
        # each line is stamped and tagged, whole, and the file is rotated.
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        spec = inst.spec()
        pending, inst._pending_restore = inst._pending_restore, None
        sb: Sandbox | None = None
        try:
            if pending is not None:
                sb = await self._restore_generation(inst, pending, spec, (null, out_w, err_w))
                if sb is None and not pending.fallback:
                    os.close(out_r)
                    os.close(err_r)
                    inst._up.set()
                    return
            if sb is None:
                # Shielded: a create abandoned half way would leave a sandbox
                # nobody knows about. It takes milliseconds.
                with trio.CancelScope(shield=True):
                    sb = await trio.to_thread.run_sync(
                        lambda: runtime.create(spec, stdio=(null, out_w, err_w), stdin_devnull=True)
                    )
        except CorralError as exc:
            os.close(out_r)
            os.close(err_r)
            inst.set_state("failed")
            self.publish(StartFailed(**ident, error=str(exc)))
            inst._up.set()
            return
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
        assert sb is not None
        inst.sandbox = sb
        inst.set_state("running")
        inst.started_at = time.time()
        inst.oom_kills_reported = inst.oom_events_seen = 0
        assert self._janitor is not None
        # The pumps end by themselves at end of file, once every process of
        # the sandbox is gone; they outlive this generation's task on purpose.
        self._janitor.start_soon(self._pump, out_r, "stdout", writer)
        self._janitor.start_soon(self._pump, err_r, "stderr", writer)
        try:
            await self._watch(inst, sb, ident)
        except BaseException:
            # Cancelled (the supervisor is being torn down) or a bug: either
            # way the sandbox must not outlive its task.
            with trio.CancelScope(shield=True):
                sb.kill()
                await trio.to_thread.run_sync(sb.destroy)
            inst.sandbox = None
            raise

    async def _restore_generation(
        self,
        inst: Instance,
        pending: _PendingRestore,
        spec: SandboxSpec,
        stdio: tuple[int, int, int],
    ) -> Sandbox | None:
        """Restore this generation from a checkpoint; None if that failed."""
        assert self.runtime is not None
        runtime = self.runtime
        ident = self._ident(inst)
        start = trio.current_time()
        try:
            # Shielded like a create; CRIU itself is bounded by a timeout.
            with trio.CancelScope(shield=True):
                sb = await trio.to_thread.run_sync(
                    lambda: runtime.restore(pending.info, spec, stdio=stdio)
                )
        except CorralError as exc:
            self.publish(
                CheckpointFailed(
                    **ident, operation="restore", tag=pending.info.tag, reason=str(exc)
                )
            )
            if not pending.fallback:
                inst.set_state(pending.prev_state)
                inst.checkpoint_stopped = pending.prev_checkpoint_stopped
            pending.error = exc
            pending.done.set()
            return None
        self.publish(
            Restored(
                **ident,
                tag=pending.info.tag,
                source=pending.info.name,
                pid=sb.pid,
                duration_ms=round((trio.current_time() - start) * 1000, 3),
                weakened=restore_weakens(check_criu(), sb.spec.security),
            )
        )
        pending.sandbox = sb
        pending.done.set()
        return sb

    async def _watch(self, inst: Instance, sb: Sandbox, ident: _Ident) -> None:
        """Watch a running sandbox until it exits; report; remove it."""
        assert self._janitor is not None
        watch = sb.cgroup.open_oom_watch()
        try:
            self.publish(Started(**ident, pid=sb.pid))
            inst._up.set()
            async with trio.open_nursery() as watchers:
                watchers.start_soon(self._watch_oom, inst, watch, ident)
                watchers.start_soon(self._stop_when_asked, inst, sb, ident)
                await trio.lowlevel.wait_readable(sb.pidfd)
                watchers.cancel_scope.cancel()
            # It died during a checkpoint (an OOM kill just after the dump
            # thawed it): its outcome, checkpointed or checkpoint_failed,
            # comes first, so the exited that follows, and any restart from
            # the latest checkpoint, see the checkpoint stored or not.
            if inst.checkpointing:
                await inst._idle.wait()
            result = sb.poll()
            if result is None:  # pragma: no cover - pidfd readable means exited
                result = await trio.to_thread.run_sync(sb.wait)
            # Read the counters once more before the cgroup goes away, so a
            # kill that raced the exit is never missed.
            self._report_oom(inst, watch.read(), ident, final=True)
        finally:
            watch.close()
        was_stopping = inst.state == "stopping" or inst.checkpoint_stopped
        if inst.state == "paused":
            # Killed while frozen (an OOM kill, a SIGKILL from outside):
            # what is left of it must be able to die.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sb.cgroup.thaw)
            inst.paused_at = None
        inst.sandbox = None
        inst.set_state("exited")
        exited = self.publish(
            Exited(
                **ident,
                status=result.status,
                exit_code=result.exit_code,
                signal=result.signal,
                oom_killed=result.oom_killed,
            )
        )
        inst.last_exit = {
            "generation": inst.generation,
            "status": result.status,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "oom_killed": result.oom_killed,
            "at": exited.wall,
        }
        inst.started_at = None
        if was_stopping:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sb.destroy)
            inst.set_state("stopped")
            self.publish(Stopped(**ident))
        else:
            self._janitor.start_soon(self._destroy, sb)

    @staticmethod
    async def _pump(fd: int, stream: str, writer: LogWriter) -> None:
        def full_disk(exc: OSError) -> None:
            pass  # keep draining: a blocked sandbox would be worse than lost output

        with trio.CancelScope(shield=True):
            await pump(fd, stream, writer, on_error=full_disk)

    @staticmethod
    async def _destroy(sb: Sandbox) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sb.destroy)

    async def _stop_when_asked(self, inst: Instance, sb: Sandbox, ident: _Ident) -> None:
        await inst._halt.wait()
        # A signal sent during a checkpoint would wait in the frozen tree
        # and be dumped with it, to strike the restored sandbox; one sent
        # while it is being paused would wait until it is resumed.
        await inst._idle.wait()
        if inst.state == "paused":
            # SIGTERM to a frozen process waits until it is thawed (on v1
            # even SIGKILL does): thaw first, so the grace period means
            # what it says.
            inst.begin(BUSY_PAUSE)
            try:
                await self._thaw(inst, sb, ident)
            finally:
                inst.end()
        reason = self._stop_reason if self._stopping.is_set() else inst.stop_reason
        inst.set_state("stopping")
        self.publish(Stopping(**ident, reason=reason, grace=inst.grace))
        sb.send_signal(signal.SIGTERM)
        # Cancelled as soon as the sandbox exits (its watcher nursery closes).
        while True:
            deadline = inst.grace
            with trio.move_on_after(deadline):
                await trio.sleep_forever()
            if inst.grace <= deadline:
                break
        sb.kill()

    async def _watch_oom(self, inst: Instance, watch: OomWatch, ident: _Ident) -> None:
        while True:
            await trio.lowlevel.wait_readable(watch.fd)
            counters = watch.read()
            if not self._report_oom(inst, counters, ident, final=False):
                # An OOM event without a kill (yet): give the kill a moment
                # to be counted before calling it a near miss.
                await trio.sleep(NEAR_MISS_DELAY)
                self._report_oom(inst, watch.read(), ident, final=True)

    def _report_oom(
        self, inst: Instance, counters: tuple[int, int], ident: _Ident, *, final: bool
    ) -> bool:
        """Publish what the counters say is new; False if undecided yet."""
        ooms, kills = counters
        new_kills = kills - inst.oom_kills_reported
        new_ooms = ooms - inst.oom_events_seen
        if new_kills > 0:
            inst.oom_kills_reported = kills
            inst.oom_events_seen = ooms
            self.publish(OomKill(**ident, count=new_kills, total=kills))
            return True
        if new_ooms > 0:
            if not final:
                return False
            inst.oom_events_seen = ooms
            self.publish(Oom(**ident, count=new_ooms))
        return True


def log_path(state_dir: str, instance: str) -> str:
    """Where an instance's output log lives."""
    return os.path.join(state_dir, "logs", f"{instance}.log")


def _version() -> str:
    from .. import __version__

    return __version__
