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
import signal
import time
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import ClassVar, Protocol

import trio

import events
from events import (
    Created,
    Exited,
    Oom,
    OomKill,
    Started,
    StartFailed,
    Stopped,
    Stopping,
    SupervisorStarted,
    SupervisorStopped,
    SupervisorStopping,
)

from .._errors import CheckpointError, CorralError, SandboxError, os_failure
from .._runtime._linux._cgroups import OomWatch
from .._runtime._linux._spawn import Keeper
from .._runtime._sandbox import ExecProcess, Runtime, Sandbox
from .._version import __version__
from ._fleet import Fleet
from ._instance import BUSY_PAUSE, Ident, Instance
from ._output import OutputWriter, pump
from ._plugin_host import DEFAULT_PLUGINS, PluginHandle, load_plugin, run_plugin
from ._restore import Checkpoints
from ._verbs import Verbs

__all__ = ["Instance", "Service", "Supervisor"]

# A wake-up of the OOM watch that shows no kill yet may be the notification
# that precedes the kill (v1 signals before the victim is chosen). Only if
# the kill counter is still unchanged this long after is it a near miss.
NEAR_MISS_DELAY = 0.05
PLUGIN_DRAIN_TIMEOUT = 5.0


class Service(Protocol):
    """A server that runs beside the fleet, such as the control socket.

    Started once the bus and the event socket are up (``task_status.started()``
    when it is ready for clients) and cancelled after the last event, when
    every sandbox is gone. The supervisor core knows nothing else of it: the
    control plane, a layer above, passes its server in this way.
    """

    def __call__(
        self, supervisor: Supervisor, /, *, task_status: trio.TaskStatus[None]
    ) -> Awaitable[None]: ...


class Supervisor(Verbs, Checkpoints):
    """Runs a fleet and turns what the kernel reports into events.

    ``await Supervisor(fleet).run()`` runs until :meth:`stop` is called (or
    SIGINT, SIGTERM or SIGHUP arrives, with ``handle_signals``; SIGHUP is
    ignored with ``ignore_hup``), then stops every
    sandbox gracefully and returns once all are gone and cleaned up.
    Plugins (restart policies, ...) run alongside and act through
    :class:`~supervisor._core._plugin_host.PluginHandle`; services run
    beside: :attr:`default_services`, then *services*. The verbs are
    :class:`~._verbs.Verbs`', checkpoints and restores
    :class:`~._restore.Checkpoints`'; the instance tasks are here.
    """

    default_services: ClassVar[tuple[Service, ...]] = ()
    """Services every supervisor of this class runs (the control layer's
    subclass, :class:`supervisor.Supervisor`, names its control socket)."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        state_dir: str | None = None,
        run_dir: str | None = None,
        handle_signals: bool = False,
        ignore_hup: bool = False,
        log: bool = False,
        services: Sequence[Service] = (),
    ) -> None:
        self.fleet = fleet
        self._ignore_hup = ignore_hup
        self._services = (*self.default_services, *services)
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
        self._outputs: dict[str, OutputWriter] = {}
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

    # -- verbs (used by plugins through their handle, and by the CLI later) --

    # -- control verbs (the control socket's; docs/control.md) --------------------

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
                try:
                    journal.close()
                except events.JournalError:
                    # Still degraded at the end (journal_degraded was
                    # published): the events it could not write are lost,
                    # and seqs stay unique through its high-water file.
                    pass
        finally:
            keeper.close()
            for writer in self._outputs.values():
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
            scopes = []
            for service in self._services:
                scope = trio.CancelScope()
                scopes.append(scope)
                await services.start(partial(self._run_service, service, scope))
            services.start_soon(bus.flush_journal)
            signals = trio.CancelScope()
            if self._handle_signals:
                services.start_soon(self._signals, signals)
            self.publish(SupervisorStarted(sandbox="", pid=os.getpid(), version=_version()))
            async with trio.open_nursery() as plugins:
                for name, (fn, config) in self._plugins.items():
                    plugins.start_soon(run_plugin, fn, config, PluginHandle(self, name))
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
            for scope in scopes:
                scope.cancel()

    async def _run_service(
        self, service: Service, scope: trio.CancelScope, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            await service(self, task_status=task_status)

    async def _signals(self, scope: trio.CancelScope) -> None:
        # SIGHUP (the terminal of an ssh session closed) stops the fleet
        # like SIGTERM, cleanly, unless the supervisor is told to run on.
        stop = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        with scope, trio.open_signal_receiver(*stop) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP and self._ignore_hup:
                    continue
                if not self._stopping.is_set():
                    self.stop(f"{name} received")
                else:
                    self.stop(f"{name} received again", grace=0)

    def _output_writer(self, inst: Instance) -> OutputWriter:
        """The instance's output log (k8s-file format), kept across restarts."""
        assert self.runtime is not None
        writer = self._outputs.get(inst.name)
        if writer is None:
            os.makedirs(os.path.join(self.runtime.state_dir, "logs"), mode=0o700, exist_ok=True)
            writer = OutputWriter(
                output_path(self.runtime.state_dir, inst.name),
                max_bytes=self.fleet.supervisor.log_max_bytes,
                max_files=self.fleet.supervisor.log_max_files,
            )
            self._outputs[inst.name] = writer
        return writer

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
        # stdout and stderr go through pipes to the instance's log writer:
        # each line is stamped and tagged, whole, and the file is rotated.
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        pending, inst._pending_restore = inst._pending_restore, None
        sb: Sandbox | None = None
        try:
            # Inside the try: a spec the runtime refuses, or a log file that
            # cannot be made (a full disk), is this instance's start
            # failure, never the supervisor's.
            writer = self._output_writer(inst)
            spec = inst.spec()
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
        except (CorralError, OSError) as exc:
            # The runtime translates OSError; one it did not is still this
            # instance's failure, said in one line with its path.
            error = exc if isinstance(exc, CorralError) else SandboxError(os_failure(exc))
            os.close(out_r)
            os.close(err_r)
            if pending is not None and not pending.done.is_set():
                pending.error = error  # its requester is waiting for the outcome
                pending.done.set()
            inst.set_state("failed")
            self.publish(StartFailed(**ident, error=str(error)))
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
                # A checkpoint of it may be running in a worker thread:
                # the kill makes CRIU fail at once, and only then may its
                # cgroup and layer go (not under the checkpoint's feet).
                await inst._idle.wait()
                await trio.to_thread.run_sync(sb.destroy)
            inst.sandbox = None
            raise

    async def _watch(self, inst: Instance, sb: Sandbox, ident: Ident) -> None:
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
    async def _pump(fd: int, stream: str, writer: OutputWriter) -> None:
        def full_disk(exc: OSError) -> None:
            pass  # keep draining: a blocked sandbox would be worse than lost output

        with trio.CancelScope(shield=True):
            await pump(fd, stream, writer, on_error=full_disk)

    @staticmethod
    async def _destroy(sb: Sandbox) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sb.destroy)

    async def _stop_when_asked(self, inst: Instance, sb: Sandbox, ident: Ident) -> None:
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

    async def _watch_oom(self, inst: Instance, watch: OomWatch, ident: Ident) -> None:
        while True:
            await trio.lowlevel.wait_readable(watch.fd)
            counters = watch.read()
            if not self._report_oom(inst, counters, ident, final=False):
                # An OOM event without a kill (yet): give the kill a moment
                # to be counted before calling it a near miss.
                await trio.sleep(NEAR_MISS_DELAY)
                self._report_oom(inst, watch.read(), ident, final=True)

    def _report_oom(
        self, inst: Instance, counters: tuple[int, int], ident: Ident, *, final: bool
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


def output_path(state_dir: str, instance: str) -> str:
    """Where an instance's output log lives."""
    return os.path.join(state_dir, "logs", f"{instance}.log")


def _version() -> str:
    return __version__
