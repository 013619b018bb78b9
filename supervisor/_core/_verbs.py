"""The verbs: what plugins (through their handle) and the control socket ask
of a running fleet. Each starts with the state guard of :mod:`._states`.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import trio

from events import (
    Added,
    ExecExited,
    ExecStarted,
    Failed,
    Paused,
    Removed,
    Resumed,
    Signaled,
)

from .._errors import CorralError, SandboxError, SpecError, StateError
from ._additions import Addition
from ._base import SupervisorBase
from ._instance import BUSY_PAUSE, Ident, Instance, PendingRestore
from ._plugin_host import settings_problems
from ._policy import PolicyRefused, SocketPolicy, policy_problems
from ._states import guard

if TYPE_CHECKING:
    from .._runtime._sandbox import ExecProcess, Sandbox

__all__ = ["Verbs"]


class Verbs(SupervisorBase):
    """The verbs of a running fleet (mixed into :class:`~._supervisor.Supervisor`)."""

    # -- used by plugins through their handle ------------------------------------

    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool:
        """Start the next generation of an exited or failed instance.

        With *from_checkpoint* the generation is restored from the
        instance's latest checkpoint if it has one (a fresh start if it has
        none, or if the restore fails: ``checkpoint_failed`` says why).
        """
        inst = self._by_name.get(name)
        if inst is None or inst.stop_requested or inst.state not in ("exited", "failed"):
            return False
        if from_checkpoint:
            # Which checkpoint is the latest is read from disk by the
            # generation, in a worker thread: not here, on the trio thread.
            inst._pending_restore = PendingRestore(None, fallback=True)
        inst.request_restart()
        return True

    def mark_failed(self, name: str, reason: str) -> None:
        """Record (as an event) that an exited instance will not be restarted."""
        inst = self._by_name.get(name)
        if inst is None or inst.state != "exited":
            return
        inst.set_state("failed")
        self.publish(Failed(**self._ident(inst), reason=reason))

    # -- the control socket's (docs/control.md) ----------------------------------

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
        try:
            # An int, whatever it came as (a plugin's signal.SIGTERM is an
            # IntEnum, which the event codec refuses): and a real signal.
            sig = int(signal.Signals(sig))
        except (ValueError, TypeError):
            raise SpecError("signal", f"expected a signal number, got {sig!r}") from None
        found = self._guarded("kill", name)
        for inst in found:
            sb = inst.sandbox
            assert sb is not None
            # May wait (bounded, normally not at all) for a just-started
            # init to be ready for signals.
            await trio.to_thread.run_sync(sb.send_signal, sig, limiter=self.limiters.signals)
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
                await trio.to_thread.run_sync(sb.cgroup.freeze, limiter=self.limiters.lifecycle)
            except CorralError:
                await trio.to_thread.run_sync(sb.cgroup.thaw, limiter=self.limiters.lifecycle)
                raise
        if inst.sandbox is not sb or inst.state != "running":
            # It exited while being frozen.
            await trio.to_thread.run_sync(sb.cgroup.thaw, limiter=self.limiters.lifecycle)
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

    async def _thaw(self, inst: Instance, sb: Sandbox, ident: Ident) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sb.cgroup.thaw, limiter=self.limiters.lifecycle)
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
        user: str | None = None,
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
                        user=user,
                    ),
                    limiter=self.limiters.lifecycle,
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
                status = await trio.to_thread.run_sync(proc.wait, limiter=self.limiters.lifecycle)
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

    async def add_fleet(
        self, path: str, *, fd: int | None = None, policy: SocketPolicy | None = None
    ) -> list[Instance]:
        """Add the sandboxes of fleet file *path* to the running fleet and
        start them; return once each runs or failed to start.

        All or nothing: a name already in the fleet, a plugin this
        supervisor does not run, a plugin table its plugin's check refuses,
        or a ``[supervisor]`` table fails the whole file, and nothing is
        added. With *fd* the file is read from that descriptor (opened by
        the asking client, with its own rights); with *policy*, a sandbox
        it refuses fails the file too (:class:`PolicyRefused`).
        """
        from ._fleet import FleetError, SupervisorConfig, load_fleet

        self._check_not_stopping()
        assert self._fleet_nursery is not None
        assert self.runtime is not None
        # Its sandboxes may be on the running fleet's networks (declared at
        # its start-up, so known here), not declare networks of their own.
        known = await trio.to_thread.run_sync(self.runtime.networks.known)
        try:
            added = await trio.to_thread.run_sync(
                partial(load_fleet, path, known, fd), limiter=self.limiters.disk
            )
        except FleetError as exc:
            raise SpecError(path, "; ".join(exc.problems)) from None
        if policy is not None:
            # (In a thread: host paths are resolved against the file system.)
            refused = await trio.to_thread.run_sync(
                lambda: [line for cfg in added.sandboxes for line in policy_problems(policy, cfg)],
                limiter=self.limiters.disk,
            )
            if refused:
                raise PolicyRefused(f"{path}: " + "; ".join(refused))
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
        # Each plugin checks the new sandboxes' tables as at start-up: a bad
        # one refuses the add instead of failing the plugin at an exit later.
        problems += settings_problems(self._plugins, added.sandboxes, fleet_wide=False)
        problems += self.limit_problems(added.sandboxes)
        if added.plugins:
            problems.append("[plugins] tables apply to the whole fleet: set them at start-up")
        if added.networks:
            problems.append("[network] tables declare the fleet's networks: set them at start-up")
        if added.supervisor != SupervisorConfig():
            problems.append("[supervisor] settings apply to the whole fleet: set them at start-up")
        if problems:
            raise SpecError(path, "; ".join(problems))
        # Recorded first: the next supervisor takes them back with the rest.
        await self._save_additions(
            [*self._additions, *(Addition(cfg, None, path) for cfg in added.sandboxes)]
        )
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
            writer = self._outputs.pop(inst.name, None)
            if writer is not None:
                writer.close()
        left = {i.config.name for i in self.instances}
        self.fleet = replace(
            self.fleet, sandboxes=tuple(c for c in self.fleet.sandboxes if c.name in left)
        )
        if any(inst.overrides for inst in found):
            for inst in found:
                inst.overrides = {}
            with contextlib.suppress(CorralError, OSError):
                await self._save_overrides()  # at worst kept for a name not in use
        additions = self._additions_left()
        if additions != self._additions:
            with contextlib.suppress(CorralError):
                # Removed already; at worst the next supervisor finds it
                # recorded and not running, and starts it again.
                await self._save_additions(additions)
        return found
