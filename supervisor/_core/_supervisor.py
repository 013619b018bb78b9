"""The supervisor: one trio nursery, one task per sandbox instance.

Each instance task creates its sandbox (the blocking runtime call runs in a
worker thread; the fork itself happens in the keeper, never in this
threaded process), then waits on two kernel descriptors and nothing else:

- the init's pidfd, readable once it has exited;
- the cgroup's OOM watch (``memory.events`` polled for the kernel's change
  notification on v2, an eventfd on ``memory.oom_control`` on v1), readable
  when the OOM killer ran.

So the supervisor is idle when nothing happens: no polling loop anywhere.
What the kernel reports becomes typed events on the bus; the journal and the
event socket are fed from there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import ClassVar, Protocol

import trio

import events
from events import (
    Adopted,
    CheckpointFailed,
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
from .._runtime._dirs import DEFAULT_RUN_DIR
from .._runtime._linux._cgroups import OomWatch
from .._runtime._linux._spawn import Keeper, KeeperError, OutputPipes
from .._runtime._net._model import DEFAULT_NETWORK
from .._runtime._sandbox import ExecProcess, Runtime, Sandbox, StandbyCancelled
from .._runtime._spec import SandboxSpec
from .._version import __version__
from ._additions import Addition, load_additions, save_additions
from ._adopt import (
    Found,
    SupervisorRunningError,
    Survey,
    changed,
    last_generations,
    lock_holder,
    lock_run_dir,
    note_generation,
    spec_data,
    survey,
)
from ._fleet import Fleet, FleetError
from ._instance import BUSY_PAUSE, Ident, Instance
from ._limiters import Limiters
from ._lxcfs_watch import watch_lxcfs
from ._output import OpenLogs, OutputWriter, pump
from ._overrides import load_overrides, still_valid
from ._plugin_host import (
    DEFAULT_PLUGINS,
    PluginHandle,
    load_plugin,
    run_plugin,
    settings_problems,
)
from ._pressure import PressureReports, watch_pressure
from ._restore import Checkpoints
from ._standby import Standby
from ._supervisor_log import say
from ._updates import Updates
from ._verbs import Verbs

__all__ = ["Instance", "Service", "Supervisor"]

# A wake-up of the OOM watch that shows no kill yet may be the notification
# that precedes the kill (v1 signals before the victim is chosen). Only if
# the kill counter is still unchanged this long after is it a near miss.
NEAR_MISS_DELAY = 0.05
PLUGIN_DRAIN_TIMEOUT = 5.0
LOG_DRAIN_TIMEOUT = 10.0
"""Seconds the supervisor's log may take to write its last lines once the
fleet has stopped (a reader that stopped reading gets no more)."""
KEEPER_RETRY_MIN = 0.5
KEEPER_RETRY_MAX = 30.0
"""Seconds between attempts to replace a keeper that could not be
replaced, doubling from the first to the second."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What stops the fleet (with ``handle_signals``): SIGHUP too (an ssh
session's terminal closed), unless the supervisor is told to run on."""


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


HANDOVER_TIMEOUT = 300.0
"""Seconds a supervisor asked to hand over may take to end (it first
finishes the operations in progress, such as a checkpoint)."""


class Supervisor(Verbs, Checkpoints, Updates):
    """Runs a fleet and turns what the kernel reports into events.

    ``await Supervisor(fleet).run()`` runs until :meth:`stop` is called (or
    SIGINT, SIGTERM or SIGHUP arrives, with ``handle_signals``; SIGHUP is
    ignored with ``ignore_hup``), then stops every
    sandbox gracefully and returns once all are gone and cleaned up.
    Plugins (restart policies, ...) run alongside and act through
    :class:`~supervisor._core._plugin_host.PluginHandle`; services run
    beside: :attr:`default_services`, then *services*. The verbs are
    :class:`~._verbs.Verbs`', checkpoints and restores
    :class:`~._restore.Checkpoints`', limit changes :class:`~._updates.Updates`';
    the instance tasks are here.
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
        recreate_changed: bool = False,
        takeover: bool = False,
    ) -> None:
        self.fleet = fleet
        self._recreate_changed = recreate_changed
        self._takeover = takeover
        self.keeper: Keeper | None = None
        """The keeper: the sandboxes' parent and holder (see :class:`Keeper`)."""
        self.survey: Survey | None = None
        """What this supervisor found of its predecessor's at start-up."""
        self._ignore_hup = ignore_hup
        self._services = (*self.default_services, *services)
        self._state_dir = state_dir
        self._run_dir = run_dir
        self._handle_signals = handle_signals
        self._receiver: AsyncIterator[int] | None = None
        self._log = log
        self.instances: list[Instance] = [
            Instance(cfg, i, grace=fleet.supervisor.grace_period) for cfg, i in fleet.instances()
        ]
        self._by_name = {inst.name: inst for inst in self.instances}
        self.bus: events.Bus | None = None
        self.runtime: Runtime | None = None
        self.limiters = Limiters.default()
        self._stopping = trio.Event()
        self._stop_reason = "requested"
        self._outputs: dict[str, OutputWriter] = {}
        # Of those, the files kept open: the most recently written.
        self._open_logs = OpenLogs()
        self._janitor: trio.Nursery | None = None
        self._standby_said: dict[str, str] = {}
        self._fleet_nursery: trio.Nursery | None = None
        self._exec_ids = 0
        self._additions: list[Addition] = []
        self._handing_over = False
        self._pump_scopes: set[trio.CancelScope] = set()
        """The sandboxes added at run time, as recorded (see :mod:`._additions`)."""
        self._execs: dict[int, ExecProcess] = {}
        self._prepared: dict[str, str] = {}
        """Images made on first use (``oci:...``, ``debian:SUITE``), once
        per supervisor: the ref, and what the sandboxes name for it."""
        self._preparing: dict[str, trio.Lock] = {}
        self._hosts_changed = trio.Event()
        self._overrides_lock = trio.Lock()
        # Resolve every plugin now: a typo in a fleet file is an error at
        # start-up, not a surprise at the first crash.
        names = dict.fromkeys([*DEFAULT_PLUGINS, *fleet.plugins])
        for cfg in fleet.sandboxes:
            names.update(dict.fromkeys(cfg.plugins))
        base = os.path.dirname(os.path.abspath(fleet.source)) if fleet.source != "<fleet>" else "."
        self._plugins = {
            name: load_plugin(name, fleet.plugins.get(name, {}), base) for name in names
        }
        # And every plugin table, with the plugin's own check: a bad setting
        # of one sandbox is a fleet file error now, not a plugin failure at
        # that sandbox's first exit (which would stop the plugin for all).
        problems = settings_problems(self._plugins, fleet.sandboxes)
        if problems:
            raise FleetError(fleet.source, problems)

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
        if not self._handle_signals:
            await self._run(task_status)
            return
        # Caught from the first moment: a SIGTERM while the fleet comes up
        # (or is taken back) is a clean stop once it is up, never a death
        # by the default action that leaves everything to a successor.
        with trio.open_signal_receiver(*STOP_SIGNALS) as receiver:
            self._receiver = receiver
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        sup = self.fleet.supervisor
        run_dir = self._run_dir or os.environ.get("CORRAL_RUN_DIR") or DEFAULT_RUN_DIR
        # One supervisor per run directory: a second one would fight the
        # first over its sandboxes. Dropped by the kernel when we end.
        try:
            lock = lock_run_dir(run_dir)
        except SupervisorRunningError:
            if not self._takeover:
                raise
            lock = await self._take_over(run_dir)
        try:
            # The holder of the sandboxes: one a predecessor left running
            # (holding its sandboxes for us), or a new one.
            keeper = await trio.to_thread.run_sync(Keeper, run_dir)
        except BaseException:
            os.close(lock)
            raise
        self.keeper = keeper
        try:
            self.runtime = Runtime(
                state_dir=self._state_dir,
                run_dir=run_dir,
                cgroup_parent=sup.cgroup_parent,
                spawner=keeper.spawn,
            )
            # A limit this host's cgroups cannot enforce is the fleet file's
            # error now, not a start failure of every instance that has it.
            problems = self.limit_problems(self.fleet.sandboxes)
            if problems:
                raise FleetError(self.fleet.source, problems)
            journal = events.Journal(
                os.path.join(self.runtime.state_dir, "journal"),
                segment_bytes=sup.journal_segment_bytes,
                max_bytes=sup.journal_max_bytes,
            )
            try:
                # Written through: the log, the socket and plugins see an
                # event only once it is in the journal, so a supervisor
                # killed after never has its seqs handed out again.
                self.bus = events.Bus(journal, write_through=True)
                self.survey = await trio.to_thread.run_sync(self._take_back)
                async with trio.open_nursery() as logs:
                    if self._log:
                        from ._supervisor_log import log_events

                        # Not cancelled at the end: it returns after logging
                        # supervisor_stopped, so the log is complete; unless
                        # its reader stopped reading, which must not keep
                        # the supervisor from ending.
                        await logs.start(log_events, self.bus)
                    await self._run_services(task_status)
                    logs.cancel_scope.deadline = trio.current_time() + LOG_DRAIN_TIMEOUT
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
            os.close(lock)
            for writer in self._outputs.values():
                writer.close()

    def _take_back(self) -> Survey:
        """Find what a predecessor left and give each instance its part
        (blocking, at start-up, before any event: run in a thread)."""
        assert self.runtime is not None and self.keeper is not None and self.bus is not None
        bus = self.bus

        def exit_published(instance: str, generation: int, since: int) -> bool:
            return any(
                ev.kind == "exited" and ev.generation == generation
                for ev in bus.replay(max(since, 1), kinds=["exited"], sandboxes=[instance])
            )

        def owned(name: str) -> bool:
            # A generation of one of our instances: INSTANCE.GENERATION.
            instance, _, generation = name.rpartition(".")
            return instance in self._by_name and generation.isdigit()

        additions_problems = self._take_back_additions(self.runtime.state_dir)
        # Limits changed at run time hold on, unless the fleet file now says
        # otherwise for their key.
        overrides, override_problems = load_overrides(self.runtime.state_dir)
        for inst in self.instances:
            inst.overrides = still_valid(overrides.get(inst.name, {}), inst.config.limits)
        found = survey(self.runtime, self.keeper, exit_published, owned)
        found.problems[:0] = additions_problems + override_problems
        # After the survey's sweep (a dead sandbox's lease does not hold a
        # network's settings) and before any sandbox starts. A refusal ends
        # the start-up; the sandboxes taken back run on for the next one.
        self.runtime.declare_networks(list(self.fleet.networks.values()))
        # Generations are numbered on across supervisors, so that an
        # event's (sandbox, generation) names one run, ever.
        last = last_generations(self.runtime.state_dir)
        for inst in self.instances:
            if inst.name in last:
                inst.generation = max(inst.generation, last[inst.name] + 1)
        for inst in self.instances:
            f = found.current.pop(inst.name, None)
            if f is None:
                continue
            if f.late and f.published:
                # Its end was reported; the supervisor died before the
                # clean-up. Swept; the instance starts afresh, as on any `up`.
                found.sweep.append(f)
                inst.generation = f.generation + 1
            else:
                inst._adopted = f
                inst.generation = f.generation
        # Generations older than the one taken back, of every instance:
        # their names must not be reused while they are being swept.
        for f in found.sweep:
            owner = self._by_name.get(f.instance)
            if owner is not None and owner._adopted is None:
                owner.generation = max(owner.generation, f.generation + 1)
        return found

    def _take_back_additions(self, state_dir: str) -> list[str]:
        """Make the instances of the sandboxes added at run time to the
        predecessor's fleet (``corral add``, ``restore --as``), unless the
        fleet file now has their names or they need a plugin this
        supervisor does not run; return the problems (blocking)."""
        additions, problems = load_additions(state_dir)
        kept = []
        for addition in additions:
            cfg = addition.config
            names = (
                [addition.alias]
                if addition.alias
                else [cfg.instance_name(i) for i in range(cfg.replicas)]
            )
            clash = [n for n in names if n in self._by_name]
            if clash or any(c.name == cfg.name for c in self.fleet.sandboxes):
                problems.append(
                    f"the sandbox {cfg.name!r} added at run time is now in the fleet file:"
                    " the file's entry is used"
                )
                continue
            unknown = [p for p in cfg.plugins if p not in self._plugins]
            if unknown:
                problems.append(
                    f"the sandbox {cfg.name!r} added at run time needs plugin {unknown[0]!r},"
                    " which this supervisor does not run: it is stopped"
                )
                continue
            kept.append(addition)
            if addition.alias:
                inst = Instance(cfg, 0, grace=self.fleet.supervisor.grace_period)
                inst.alias = addition.alias
                new = [inst]
            else:
                self.fleet = replace(self.fleet, sandboxes=(*self.fleet.sandboxes, cfg))
                new = [
                    Instance(cfg, i, grace=self.fleet.supervisor.grace_period)
                    for i in range(cfg.replicas)
                ]
            for inst in new:
                self.instances.append(inst)
                self._by_name[inst.name] = inst
        self._additions = kept
        if len(kept) != len(additions):
            with contextlib.suppress(OSError):
                save_additions(state_dir, kept)
        return problems

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
                    request_timeout=self.fleet.supervisor.socket_idle_timeout,
                    limiter=self.limiters.disk,
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
            found = self.survey
            self.publish(
                SupervisorStarted(
                    sandbox="",
                    pid=os.getpid(),
                    version=_version(),
                    swept=tuple(found.swept) if found else (),
                    problems=tuple(found.problems) if found else (),
                )
            )
            async with trio.open_nursery() as plugins:
                for name, (fn, config) in self._plugins.items():
                    plugins.start_soon(run_plugin, fn, config, PluginHandle(self, name))
                # Old generations are removed in the janitor's tasks, so
                # that a restart never waits for a cgroup removal.
                async with trio.open_nursery() as janitor:
                    self._janitor = janitor
                    self._start_taking_back(janitor)
                    keeper_watch = trio.CancelScope()
                    janitor.start_soon(self._watch_keeper, keeper_watch)
                    hosts = trio.CancelScope()
                    janitor.start_soon(self._run_cancellable, self._keep_hosts, hosts)
                    lxcfs = trio.CancelScope()
                    janitor.start_soon(self._run_cancellable, self._watch_lxcfs, lxcfs)
                    async with trio.open_nursery() as fleet:
                        self._fleet_nursery = fleet
                        for inst in self.instances:
                            fleet.start_soon(self._supervise, inst)
                        task_status.started()
                        await self._stopping.wait()
                        self.publish(SupervisorStopping(sandbox="", reason=self._stop_reason))
                        if self._handing_over:
                            await self._let_go(fleet)
                        for inst in self.instances:
                            inst.request_stop()
                            if inst._pending_restore is not None:
                                inst._pending_restore.error = CheckpointError(
                                    "the fleet is stopping"
                                )
                                inst._pending_restore.done.set()
                    keeper_watch.cancel()
                    hosts.cancel()
                    lxcfs.cancel()
                    if self._handing_over:
                        # The keeper holds the pipes: what is in them is the
                        # successor's to read.
                        for scope in self._pump_scopes:
                            scope.cancel()
                if not self._handing_over:
                    await self._stop_lxcfs()
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

    async def _take_over(self, run_dir: str) -> int:
        """Have the supervisor that runs *run_dir*'s sandboxes hand them
        over (see :meth:`hand_over`), wait for it to end, and take the run
        directory's lock; return it."""
        try:
            pid = lock_holder(run_dir)
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError):
            return lock_run_dir(run_dir)  # it ended meanwhile
        try:
            answer = await trio.to_thread.run_sync(self._ask_to_hand_over, run_dir)
            if answer != pid:
                raise CorralError(
                    f"--takeover: the lock of {run_dir} is held by pid {pid}, but pid {answer}"
                    " answered the control socket"
                )
            with trio.move_on_after(HANDOVER_TIMEOUT):
                await trio.lowlevel.wait_readable(pidfd)
                return lock_run_dir(run_dir)
            raise CorralError(
                f"--takeover: the supervisor (pid {pid}) did not end within"
                f" {HANDOVER_TIMEOUT:g} s of handing over"
            )
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)

    def _ask_to_hand_over(self, run_dir: str) -> int:
        """Ask the supervisor of *run_dir* to hand over; its PID (blocking).
        The core has no control plane: :class:`supervisor.Supervisor` does."""
        raise CorralError("--takeover needs a supervisor with a control socket")

    def hand_over(self) -> None:
        """End this supervisor and leave every sandbox running, for a
        successor to take back (``corral up --takeover``: a live upgrade).

        Operations in progress (a checkpoint, a create) finish first; then
        each instance lets go of its sandbox as it is, and the supervisor
        ends as on a stop, but without stopping anything.
        """
        self._check_not_stopping()
        self._handing_over = True
        self._stop_reason = "handed over to a new supervisor"
        self._stopping.set()

    async def _let_go(self, fleet: trio.Nursery) -> None:
        """Wait for the operations in progress, then end every instance task
        without touching its sandbox (see :meth:`hand_over`)."""
        for inst in self.instances:
            if inst._pending_restore is not None:
                await inst._pending_restore.done.wait()
            await inst._idle.wait()
        fleet.cancel_scope.cancel()

    def _start_taking_back(self, janitor: trio.Nursery) -> None:
        """Sweep old generations, stop sandboxes no longer in the fleet."""
        assert self.survey is not None
        for f in self.survey.sweep:
            janitor.start_soon(self._sweep, f)
        for f in self.survey.current.values():
            # Its instance is not in the fleet file (any more).
            janitor.start_soon(self._stop_removed, f)
        self.survey.current = {}

    async def _sweep(self, f: Found) -> None:
        """Remove an old generation a predecessor left (killing it if it runs)."""
        f.close_pipes()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                self._destroy_sync, f.sandbox, limiter=self.limiters.lifecycle
            )

    async def _stop_removed(self, f: Found) -> None:
        """Stop a sandbox whose instance left the fleet file while no
        supervisor ran: SIGTERM, the grace period, SIGKILL; its end is reported."""
        sb = f.sandbox
        ident: Ident = {"sandbox": f.instance, "instance": f.index, "generation": f.generation}
        writer = self._output_writer_named(f.instance)
        self._start_pumps(f.pipes, writer)
        f.pipes = None
        with trio.CancelScope(shield=True):
            if not f.late:
                grace = self.fleet.supervisor.grace_period
                self.publish(Stopping(**ident, reason="not in the fleet file", grace=grace))
                await trio.to_thread.run_sync(
                    sb.send_signal, signal.SIGTERM, limiter=self.limiters.signals
                )
                with trio.move_on_after(grace):
                    await trio.lowlevel.wait_readable(sb.pidfd)
            result = await trio.to_thread.run_sync(sb.wait, limiter=self.limiters.lifecycle)
            if not f.published:
                self.publish(
                    Exited(
                        **ident,
                        status=result.status,
                        exit_code=result.exit_code,
                        signal=result.signal,
                        oom_killed=result.oom_killed,
                        late=f.late,
                    )
                )
            await trio.to_thread.run_sync(self._destroy_sync, sb, limiter=self.limiters.lifecycle)
            self.publish(Stopped(**ident))

    def _destroy_sync(self, sb: Sandbox) -> None:
        """Destroy a sandbox; the keeper may then let go of its pipes.

        A removal that fails (a cgroup the kernel will not let go, a layer
        that cannot be removed) is said on stderr and left for the next
        supervisor's sweep: one sandbox's leftovers never end the others'
        supervisor.
        """
        try:
            sb.destroy()
        except (CorralError, OSError) as exc:
            say(f"corral: sandbox {sb.name!r}: its removal failed, left for the next sweep: {exc}")
        finally:
            if self.keeper is not None:
                with contextlib.suppress(KeeperError, OSError):
                    self.keeper.release(sb.name)

    async def _prepare_rootfs(self, spec: SandboxSpec) -> SandboxSpec:
        """*spec* on its image, made now if it is made on first use
        (``oci:PATH[:REF]`` imported, a missing ``debian:SUITE`` built; see
        :mod:`rootfs._prepare`). Replicas wait for one import or build."""
        from rootfs import is_prepared_ref

        ref = spec.rootfs
        if not is_prepared_ref(ref):
            return spec
        lock = self._preparing.setdefault(ref, trio.Lock())
        async with lock:
            done = self._prepared.get(ref)
            if done is None:
                done = await self._run_prepare(ref)
                self._prepared[ref] = done
        return spec._replace(rootfs=done)

    async def _run_prepare(self, ref: str) -> str:
        """Import or build *ref* in a child process: a supervisor stopped
        meanwhile stops the build (which reverts), with no thread left."""
        assert self.runtime is not None
        store = os.path.join(self.runtime.state_dir, "images")
        say(f"corral: preparing the image {ref} (once; a build can take minutes)")
        result = await trio.run_process(
            [sys.executable, "-m", "rootfs._prepare", store, ref],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=_stop_build,
        )
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        if result.returncode != 0:
            said = lines[-1] if lines else f"its preparation ended with status {result.returncode}"
            raise SandboxError(said if said.startswith("rootfs") else f"rootfs {ref!r}: {said}")
        return result.stdout.decode().strip().splitlines()[-1]

    async def _watch_keeper(self, scope: trio.CancelScope) -> None:
        """Replace the keeper if it dies (its connection reads end of file).

        Its sandboxes are not lost: re-parented to us (the subreaper above
        it), they are reaped here; the new keeper holds their pipes again.
        """
        assert self.keeper is not None
        keeper = self.keeper
        delay = KEEPER_RETRY_MIN
        with scope:
            while True:
                restarts = keeper.restarts
                try:
                    fd = keeper.watch_fd()
                except OSError:
                    fd = -1  # no keeper: its replacement failed; try again
                if fd >= 0:
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    finally:
                        trio.lowlevel.notify_closing(fd)
                        os.close(fd)
                try:
                    replaced = await trio.to_thread.run_sync(
                        keeper.check, limiter=self.limiters.lifecycle
                    )
                except KeeperError as exc:
                    # No keeper for now: starts fail (each its own sandbox's
                    # failure) and running sandboxes are reaped here, so the
                    # fleet goes on while we try again, more slowly each time.
                    say(
                        f"corral: the spawn keeper could not be replaced ({exc});"
                        f" trying again in {delay:g} s"
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, KEEPER_RETRY_MAX)
                    continue
                delay = KEEPER_RETRY_MIN
                if not replaced and keeper.restarts == restarts:
                    await trio.sleep(1)  # readable yet alive: never seen; no busy loop

    async def _run_service(
        self, service: Service, scope: trio.CancelScope, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            await service(self, task_status=task_status)

    async def _signals(self, scope: trio.CancelScope) -> None:
        # SIGHUP (the terminal of an ssh session closed) stops the fleet
        # like SIGTERM, cleanly, unless the supervisor is told to run on.
        assert self._receiver is not None
        with scope:
            async for signum in self._receiver:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP and self._ignore_hup:
                    continue
                if not self._stopping.is_set():
                    self.stop(f"{name} received")
                else:
                    self.stop(f"{name} received again", grace=0)

    def _output_writer(self, inst: Instance) -> OutputWriter:
        """The instance's output log (k8s-file format), kept across restarts."""
        return self._output_writer_named(inst.name)

    def _output_writer_named(self, name: str) -> OutputWriter:
        assert self.runtime is not None
        writer = self._outputs.get(name)
        if writer is None:
            os.makedirs(os.path.join(self.runtime.state_dir, "logs"), mode=0o700, exist_ok=True)
            writer = OutputWriter(
                output_path(self.runtime.state_dir, name),
                max_bytes=self.fleet.supervisor.log_max_bytes,
                max_files=self.fleet.supervisor.log_max_files,
                open_logs=self._open_logs,
            )
            self._outputs[name] = writer
        return writer

    def _start_pumps(self, pipes: OutputPipes | None, writer: OutputWriter) -> None:
        """Copy a sandbox's stdout and stderr to its log until end of file."""
        assert self._janitor is not None
        if pipes is None:
            return
        # The pumps end by themselves at end of file, once every process of
        # the sandbox is gone; they outlive the generation's task on purpose.
        self._janitor.start_soon(self._pump, pipes, 0, writer)
        self._janitor.start_soon(self._pump, pipes, 1, writer)

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
            inst.drop_standby()
            inst._task_alive = False
            inst._cycle = False
            inst._up.set()
            inst._ended.set()

    async def _run_generation(self, inst: Instance) -> None:
        """Create, watch, report and clean up one generation."""
        assert self.runtime is not None and self._janitor is not None
        assert self.keeper is not None
        runtime, keeper = self.runtime, self.keeper
        ident = self._ident(inst)
        if not inst._stop.is_set():
            inst._halt = trio.Event()
        inst.checkpoint_stopped = False
        adopted: Found | None = inst._adopted
        if adopted is not None:
            inst._adopted = None
            await self._take_back_generation(inst, adopted)
            return
        inst.set_state("starting")
        created = self.publish(Created(**ident))
        standby, inst._standby = inst._standby, None
        if standby is not None and await self._run_standby(inst, standby, ident, created.seq):
            return
        # stdout and stderr go through pipes to the instance's log writer:
        # each line is stamped and tagged, whole, and the file is rotated.
        try:
            pipes, out_w, err_w, null = _open_stdio()
        except OSError as exc:
            # Out of descriptors, say: this instance fails to start, the
            # fleet runs on.
            inst.set_state("failed")
            self.publish(
                StartFailed(**ident, error=f"cannot make its output pipes: {os_failure(exc)}")
            )
            inst._up.set()
            return
        pending, inst._pending_restore = inst._pending_restore, None
        sb: Sandbox | None = None
        # What a successor needs to take it back (see ._adopt).
        labels = {
            "instance": inst.name,
            "index": inst.index,
            "generation": inst.generation,
            "created_seq": created.seq,
        }
        held = ""
        try:
            # Inside the try: a spec the runtime refuses, or a log file that
            # cannot be made (a full disk), is this instance's start
            # failure, never the supervisor's.
            writer = self._output_writer(inst)
            spec = await self._prepare_rootfs(inst.spec())
            # The keeper holds the pipes' read ends from before the start:
            # the sandbox never writes into a pipe nobody holds.
            held = spec.name
            state_dir = runtime.state_dir

            def prepare() -> None:
                try:
                    note_generation(state_dir, inst.name, inst.generation)
                except OSError as exc:
                    raise SandboxError(f"sandbox {held!r}: cannot write {os_failure(exc)}") from exc
                try:
                    keeper.hold(held, pipes)
                except (KeeperError, OSError) as exc:
                    reason = os_failure(exc) if isinstance(exc, OSError) else str(exc)
                    raise SandboxError(
                        f"sandbox {held!r}: cannot give the keeper its output pipes: {reason}"
                    ) from exc

            await trio.to_thread.run_sync(prepare, limiter=self.limiters.lifecycle)
            if pending is not None:
                sb = await self._restore_generation(
                    inst, pending, spec, (null, out_w, err_w), labels
                )
                if sb is None and not pending.fallback:
                    pipes.let_go_both()
                    await trio.to_thread.run_sync(
                        keeper.release, held, limiter=self.limiters.lifecycle
                    )
                    inst._up.set()
                    return
            if sb is None:
                # Shielded: a create abandoned half way would leave a sandbox
                # nobody knows about. It takes milliseconds.
                with trio.CancelScope(shield=True):
                    sb = await trio.to_thread.run_sync(
                        lambda: runtime.create(
                            spec, stdio=(null, out_w, err_w), stdin_devnull=True, labels=labels
                        ),
                        limiter=self.limiters.lifecycle,
                    )
        except (CorralError, OSError) as exc:
            # The runtime translates OSError; one it did not is still this
            # instance's failure, said in one line with its path.
            error = exc if isinstance(exc, CorralError) else SandboxError(os_failure(exc))
            pipes.let_go_both()
            if held:
                await trio.to_thread.run_sync(keeper.release, held, limiter=self.limiters.lifecycle)
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
        self._start_pumps(pipes, writer)
        await self._watch_generation(inst, sb, ident)

    # -- standby generations (._standby) ---------------------------------------------

    def keep_standby(self, name: str) -> bool:
        """Have instance *name*'s next generation made up to its exec while
        the current one runs (the restart plugin's ``standby``); False if
        it is not running, or is stopping. Asking again for the same
        generation does nothing."""
        inst = self._by_name.get(name)
        if (
            inst is None
            or inst.stop_requested
            or inst.state != "running"
            or self._stopping.is_set()
            or self._janitor is None
        ):
            return False
        upcoming = inst.generation + 1
        if inst._standby is not None:
            if inst._standby.generation == upcoming:
                return True
            inst.drop_standby()  # one for a generation that has passed
        labels = {"instance": inst.name, "index": inst.index, "generation": upcoming}
        standby = Standby(upcoming, inst.spec(upcoming), labels)
        inst._standby = standby
        self._janitor.start_soon(self._make_standby, standby)
        return True

    async def _make_standby(self, standby: Standby) -> None:
        """Make *standby* and wait for its decision (see :mod:`._standby`)."""
        assert self.runtime is not None and self.keeper is not None
        runtime, keeper = self.runtime, self.keeper
        try:
            pipes, out_w, err_w, null = _open_stdio()
        except OSError as exc:
            standby.error = SandboxError(f"cannot make its output pipes: {os_failure(exc)}")
            standby.done.set()
            return
        held = ""
        state_dir = runtime.state_dir

        def prepare(name: str) -> None:
            # Its generation is noted now, not at its go: the write (a new
            # file renamed over the old) would be on the restart's path. A
            # standby called off leaves its number noted, unused; that
            # only skips the number should a successor start the instance
            # afresh: numbers are never used twice, and never must be.
            note_generation(state_dir, str(standby.labels["instance"]), standby.generation)
            keeper.hold(name, pipes)

        try:
            spec = await self._prepare_rootfs(standby.spec)
            held = spec.name
            await trio.to_thread.run_sync(prepare, held, limiter=self.limiters.lifecycle)
            # Shielded: the create is undone only through its gate, which
            # every way out of the instance (a stop, the supervisor's end)
            # decides.
            with trio.CancelScope(shield=True):
                sb = await trio.to_thread.run_sync(
                    lambda: runtime.create(
                        spec,
                        stdio=(null, out_w, err_w),
                        stdin_devnull=True,
                        labels=standby.labels,
                        gate=standby.gate,
                    ),
                    limiter=self.limiters.standby,
                )
        except (CorralError, OSError) as exc:
            standby.decide(False)  # a failure before the gate: nobody waits for it
            pipes.let_go_both()
            if held:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        keeper.release, held, limiter=self.limiters.lifecycle
                    )
            standby.error = exc if isinstance(exc, CorralError) else SandboxError(os_failure(exc))
            name = str(standby.labels["instance"])
            if not isinstance(exc, StandbyCancelled) and self._standby_said.get(name) != str(exc):
                # Its restarts start afresh; said once per reason, not per restart.
                self._standby_said[name] = str(exc)
                say(f"corral: {name}: no standby, its restarts start afresh: {standby.error}")
        else:
            standby.sandbox, standby.pipes = sb, pipes
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
            standby.done.set()

    async def _run_standby(
        self, inst: Instance, standby: Standby, ident: Ident, created_seq: int
    ) -> bool:
        """Run this generation from *standby*, to its end; False (having
        called it off) if it cannot be: made for another generation or
        another spec, a restore pending, or it failed; the generation then
        starts afresh."""
        usable = (
            standby.generation == inst.generation
            and standby.spec == inst.spec()
            and inst._pending_restore is None
            and not standby.decided
        )
        if not usable:
            standby.decide(False)
            # Undone before the fresh start, which takes the same name.
            with trio.CancelScope(shield=True):
                await standby.done.wait()
            return False
        assert self.runtime is not None
        standby.labels["created_seq"] = created_seq
        standby.decide(True)  # its generation was noted when it was made
        with trio.CancelScope(shield=True):  # as a fresh create is: it takes milliseconds
            await standby.done.wait()
        sb = standby.sandbox
        if sb is None or standby.pipes is None:
            return False  # its view went stale, or it failed: a fresh start
        inst.sandbox = sb
        inst.set_state("running")
        inst.started_at = time.time()
        inst.oom_kills_reported = inst.oom_events_seen = 0
        self._start_pumps(standby.pipes, self._output_writer(inst))
        await self._watch_generation(inst, sb, ident)
        return True

    async def _take_back_generation(self, inst: Instance, f: Found) -> None:
        """Watch a generation a predecessor left: adopted if it runs, its
        exit reported (late) if it ended while no supervisor ran."""
        sb = f.sandbox
        ident = self._ident(inst)
        self._start_pumps(f.pipes, self._output_writer(inst))
        f.pipes = None
        inst.sandbox = sb
        inst.set_state("starting")
        inst.set_state("running")
        inst.started_at = time.time() - (time.monotonic() - sb.started)
        # What the OOM counters say now was reported by the predecessor (or
        # is in this exit's oom_killed): only new kills are news.
        try:
            watch = sb.cgroup.open_oom_watch()
            try:
                inst.oom_events_seen, inst.oom_kills_reported = watch.read()
            finally:
                watch.close()
        except (CorralError, OSError):
            inst.oom_events_seen = inst.oom_kills_reported = 0
        announce: list[events.Event] = []
        if not f.late:
            paused = f.frozen and not f.interrupted
            if f.frozen and f.interrupted:
                # Frozen for a checkpoint cut short (only a running sandbox is
                # checkpointed): it runs on.
                await trio.to_thread.run_sync(
                    self._thaw_checkpointed, sb, limiter=self.limiters.lifecycle
                )
            if paused:
                inst.set_state("paused")
                inst.paused_at = trio.current_time()
            now = spec_data(inst.spec())
            differs = changed(f, now)
            announce.append(Adopted(**ident, pid=sb.pid, changed=differs, paused=paused))
            if differs and self._recreate_changed:
                inst.request_cycle()
        for tag in f.interrupted:
            reason = "the supervisor ended during the checkpoint; its partial dump was removed"
            announce.append(
                CheckpointFailed(**ident, operation="checkpoint", tag=tag, reason=reason)
            )
        await self._watch_generation(inst, sb, ident, announce=announce, late=f.late)

    @staticmethod
    def _thaw_checkpointed(sb: Sandbox) -> None:
        with contextlib.suppress(CorralError, OSError):
            sb.cgroup.thaw()  # gone: its exit is about to be seen

    async def _watch_generation(
        self,
        inst: Instance,
        sb: Sandbox,
        ident: Ident,
        *,
        announce: Sequence[events.Event] = (),
        late: bool = False,
    ) -> None:
        try:
            await self._watch(inst, sb, ident, announce=announce, late=late)
        except BaseException:
            if self._handing_over:
                # Cancelled for a successor, which takes it back as it is.
                sb.detach()
                inst.sandbox = None
                raise
            # Cancelled (the supervisor is being torn down) or a bug: either
            # way the sandbox must not outlive its task.
            with trio.CancelScope(shield=True):
                sb.kill()
                # A checkpoint of it may be running in a worker thread:
                # the kill makes CRIU fail at once, and only then may its
                # cgroup and layer go (not under the checkpoint's feet).
                await inst._idle.wait()
                await trio.to_thread.run_sync(
                    self._destroy_sync, sb, limiter=self.limiters.lifecycle
                )
            inst.sandbox = None
            raise

    async def _watch(
        self,
        inst: Instance,
        sb: Sandbox,
        ident: Ident,
        *,
        announce: Sequence[events.Event] = (),
        late: bool = False,
    ) -> None:
        """Watch a running sandbox until it exits; report; remove it.

        *announce* is published first (default: ``started``); a *late*
        one (taken back after it ended) is reported at once.
        """
        assert self._janitor is not None
        watch: OomWatch | None
        try:
            watch = sb.cgroup.open_oom_watch()
        except (CorralError, OSError) as exc:
            # Out of descriptors (epoll, eventfd), say: it runs on, its
            # OOM kills read from the cgroup's counters at its exit.
            say(f"corral: sandbox {sb.name!r}: OOM kills not watched live: {exc}")
            watch = None
        try:
            if not late and not announce:
                self.publish(Started(**ident, pid=sb.pid))
            for event in announce:
                self.publish(event)
            inst._up.set()
            if sb.network:
                self._hosts_changed.set()
            if sb.pidfd >= 0:
                async with trio.open_nursery() as watchers:
                    pressure = PressureReports(inst, ident, self.publish, watchers)
                    if watch is not None:
                        watchers.start_soon(self._watch_oom, inst, watch, ident, pressure)
                    watchers.start_soon(watch_pressure, inst, sb, pressure)
                    watchers.start_soon(self._stop_when_asked, inst, sb, ident)
                    await trio.lowlevel.wait_readable(sb.pidfd)
                    watchers.cancel_scope.cancel()
            # It died during a checkpoint (an OOM kill, during the pre-dump
            # or just after the dump thawed it): its outcome, checkpointed
            # or checkpoint_failed, comes first, so the exited that follows,
            # and any restart from the latest checkpoint, see the checkpoint
            # stored or not. (A CRIU still at work is ended by the
            # checkpoint itself, which watches the init too.)
            if inst.checkpointing:
                await inst._idle.wait()
            # The cgroup's other counters are not read here: the OOM kills
            # are the watch's, and this is a restart's path.
            result = sb.poll(stats=False)
            if result is None:  # pragma: no cover - pidfd readable means exited
                result = await trio.to_thread.run_sync(sb.wait, limiter=self.limiters.lifecycle)
            # Read the counters once more before the cgroup goes away, so a
            # kill that raced the exit is never missed.
            counters = _read_oom_counters(sb, watch)
            if counters is not None:
                self._report_oom(inst, counters, ident, final=True)
            oom_killed = result.oom_killed or (counters is not None and counters[1] > 0)
        finally:
            if watch is not None:
                watch.close()
        was_stopping = inst.state == "stopping" or inst.checkpoint_stopped
        if inst.state == "paused":
            # Killed while frozen (an OOM kill, a SIGKILL from outside):
            # what is left of it must be able to die.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sb.cgroup.thaw, limiter=self.limiters.lifecycle)
            inst.paused_at = None
        inst.sandbox = None
        inst.set_state("exited")
        exited = self.publish(
            Exited(
                **ident,
                status=result.status,
                exit_code=result.exit_code,
                signal=result.signal,
                oom_killed=oom_killed,
                late=late,
            )
        )
        inst.last_exit = {
            "generation": inst.generation,
            "status": result.status,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "oom_killed": oom_killed,
            "at": exited.wall,
        }
        inst.started_at = None
        if was_stopping:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    self._destroy_sync, sb, limiter=self.limiters.lifecycle
                )
            inst.set_state("stopped")
            self.publish(Stopped(**ident))
        else:
            self._janitor.start_soon(self._destroy, sb, inst._standby)

    async def _pump(self, pipes: OutputPipes, which: int, writer: OutputWriter) -> None:
        def full_disk(exc: OSError) -> None:
            pass  # keep draining: a blocked sandbox would be worse than lost output

        # Shielded: it drains to the end, even while the supervisor is torn
        # down; only a hand-over cancels it (see _let_go).
        with trio.CancelScope(shield=True) as scope:
            self._pump_scopes.add(scope)
            try:
                await pump(
                    pipes.fds[which],
                    ("stdout", "stderr")[which],
                    writer,
                    on_error=full_disk,
                    close=pipes.let_go,
                )
            finally:
                self._pump_scopes.discard(scope)

    async def _destroy(self, sb: Sandbox, standby: Standby | None = None) -> None:
        if standby is not None:
            # The next generation execs from its standby first: this
            # removal (Python in a thread, holding the GIL by turns) would
            # slow its start by a millisecond or two. Not for ever: no
            # restart may come.
            with trio.move_on_after(STANDBY_FIRST):
                await standby.done.wait()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._destroy_sync, sb, limiter=self.limiters.lifecycle)
        if sb.network:
            self._hosts_changed.set()

    @staticmethod
    async def _run_cancellable(fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        with scope:
            await fn()

    async def _watch_lxcfs(self) -> None:
        assert self.runtime is not None
        await watch_lxcfs(self.runtime.lxcfs, self.limiters.lifecycle)

    async def _stop_lxcfs(self) -> None:
        """Stop corral's lxcfs once the fleet is gone, unless a sandbox of
        the run directory still has its view (a ``corral run``'s)."""
        assert self.runtime is not None
        try:
            await trio.to_thread.run_sync(self.runtime.lxcfs.stop, limiter=self.limiters.lifecycle)
        except (CorralError, OSError) as exc:
            say(f"corral: lxcfs could not be stopped: {exc}")

    async def _keep_hosts(self) -> None:
        """Keep every bridged sandbox's ``/etc/hosts`` listing its fleet's
        others on its network, by instance name (``web-0``) and sandbox name
        (``web``, every replica), as they come and go. A burst of changes (a fleet starting)
        is one rewrite: the task catches up with what has changed since."""
        assert self.runtime is not None
        runtime = self.runtime
        while True:
            await self._hosts_changed.wait()
            self._hosts_changed = trio.Event()
            # Peers are those on the same network: another network's
            # sandboxes cannot be reached (corral isolates networks).
            networks: dict[str, list[tuple[Instance, Sandbox]]] = {}
            for inst in self.instances:
                sb = inst.sandbox
                if sb is not None and sb.network and inst.state == "running":
                    on = str(sb.network.get("name") or DEFAULT_NETWORK)
                    networks.setdefault(on, []).append((inst, sb))
            groups = [
                (
                    [sb for _, sb in running],
                    [
                        (str(sb.network["lease"]["address"]), f"{inst.name} {inst.config.name}")
                        for inst, sb in running
                        if sb.network is not None
                    ],
                )
                for running in networks.values()
            ]
            await trio.to_thread.run_sync(_write_hosts, runtime, groups, limiter=self.limiters.disk)

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
        # In a thread: it may wait (up to 1 s, normally not at all) for a
        # just-started init to be ready for the signal.
        await trio.to_thread.run_sync(sb.send_signal, signal.SIGTERM, limiter=self.limiters.signals)
        # Cancelled as soon as the sandbox exits (its watcher nursery closes).
        while True:
            deadline = inst.grace
            with trio.move_on_after(deadline):
                await trio.sleep_forever()
            if inst.grace <= deadline:
                break
        sb.kill()

    async def _watch_oom(
        self, inst: Instance, watch: OomWatch, ident: Ident, pressure: PressureReports
    ) -> None:
        # Read once before the first wait: what changed since the watch was
        # opened is news too, and it sets the base of the pressure counters.
        counters = watch.read()
        pressure.counters(watch.pressure)
        while True:
            if not self._report_oom(inst, counters, ident, final=False):
                await self._await_oom_kill(inst, watch, ident, pressure)
            await trio.lowlevel.wait_readable(watch.fd)
            counters = watch.read()
            pressure.counters(watch.pressure)

    async def _await_oom_kill(
        self, inst: Instance, watch: OomWatch, ident: Ident, pressure: PressureReports
    ) -> None:
        """An OOM event without a kill (yet): the kill is reported as soon
        as it is counted, or the event as a near miss after NEAR_MISS_DELAY.

        The kill may follow in moments: v1 signals before the victim is
        chosen; v2 notifies ``oom`` and ``oom_kill`` apart, and at most one
        change of a file per 10 ms. So the counters are read again at the
        next notification, or 1, 2, 4... ms on (a handful of reads, once
        per OOM event), not only once the delay is over: a kill counted
        just after the first look is reported within a millisecond or
        two, not 50 ms late.
        """
        deadline = trio.current_time() + NEAR_MISS_DELAY
        step = 0.001
        while True:
            with trio.move_on_at(min(trio.current_time() + step, deadline)):
                await trio.lowlevel.wait_readable(watch.fd)
            final = trio.current_time() >= deadline
            decided = self._report_oom(inst, watch.read(), ident, final=final)
            pressure.counters(watch.pressure)
            if decided:
                return
            step *= 2

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


def _read_oom_counters(sb: Sandbox, watch: OomWatch | None) -> tuple[int, int] | None:
    """The cgroup's OOM counters (events, kills), through *watch* or, if
    there is none, a watch opened for the read; None if they cannot be read."""
    try:
        if watch is not None:
            return watch.read()
        once = sb.cgroup.open_oom_watch()
        try:
            return once.read()
        finally:
            once.close()
    except (CorralError, OSError):
        return None


def _write_hosts(
    runtime: Runtime, groups: list[tuple[list[Sandbox], list[tuple[str, str]]]]
) -> None:
    """Write each group's sandboxes' ``/etc/hosts`` with the group's peers."""
    for sandboxes, peers in groups:
        for sb in sandboxes:
            try:
                runtime.write_hosts(sb, peers)
            except OSError as exc:
                say(f"corral: sandbox {sb.name!r}: cannot update its /etc/hosts: {exc}")


STANDBY_FIRST = 1.0
"""Seconds the removal of an ended generation waits for the next one to
start from its standby (see :meth:`Supervisor._destroy`)."""

BUILD_STOP_TIMEOUT = 40.0
"""Seconds an image build stopped with the supervisor has to revert (the
debian builder gives mmdebstrap 30) before it is killed."""


async def _stop_build(proc: trio.Process) -> None:
    """Stop an image preparation: SIGTERM (it reverts), then SIGKILL."""
    proc.terminate()
    with trio.move_on_after(BUILD_STOP_TIMEOUT):
        await proc.wait()
        return
    proc.kill()


def _open_stdio() -> tuple[OutputPipes, int, int, int]:
    """A generation's stdio: (the read ends, stdout's write end, stderr's,
    /dev/null); nothing is left open if one cannot be made."""
    made: list[int] = []
    try:
        made += os.pipe2(os.O_CLOEXEC)
        made += os.pipe2(os.O_CLOEXEC)
        made.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in made:
            os.close(fd)
        raise
    out_r, out_w, err_r, err_w, null = made
    return OutputPipes(out_r, err_r), out_w, err_w, null
