"""What every part of the supervisor shares, and nothing more.

:class:`SupervisorBase` holds the fleet, its instances, the runtime and the
bus, and publishes and looks instances up. The parts are written against
it, one job per module: the verbs (:mod:`._verbs`), checkpoints and
restores (:mod:`._restore`), and the instance tasks and the nursery
(:mod:`._supervisor`), whose :class:`~._supervisor.Supervisor` puts them
together.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

import events

from .._errors import CorralError, SpecError, os_failure
from .._runtime._sandbox import ExecProcess, Runtime
from ._additions import Addition, save_additions
from ._fleet import Fleet, SandboxConfig
from ._instance import Ident, Instance, ident
from ._limiters import Limiters
from ._output import OutputWriter
from ._overrides import save_overrides
from ._plugin_host import PluginFn

__all__ = ["SupervisorBase"]


class SupervisorBase:
    """The state the supervisor's parts share (see the module docstring)."""

    fleet: Fleet
    instances: list[Instance]
    bus: events.Bus | None
    runtime: Runtime | None
    limiters: Limiters
    """The worker-thread limiters, one per kind of work (see :mod:`._limiters`)."""
    _by_name: dict[str, Instance]
    _stopping: trio.Event
    _stop_reason: str
    _outputs: dict[str, OutputWriter]
    _janitor: trio.Nursery | None
    _fleet_nursery: trio.Nursery | None
    _exec_ids: int
    _execs: dict[int, ExecProcess]
    _plugins: dict[str, tuple[PluginFn, dict[str, object]]]
    _additions: list[Addition]
    _overrides_lock: trio.Lock

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

    @staticmethod
    def _ident(inst: Instance) -> Ident:
        return ident(inst)

    def targets(self, name: str) -> list[Instance]:
        """The instances *name* means: one instance, or every instance of a sandbox."""
        inst = self._by_name.get(name)
        if inst is not None:
            return [inst]
        found = [i for i in self.instances if i.sandbox_name == name and i.alias is None]
        if not found:
            raise SpecError("name", f"no sandbox or instance {name!r} in this fleet")
        return found

    def limit_problems(self, sandboxes: Iterable[SandboxConfig]) -> list[str]:
        """One line for each sandbox whose limits this host's cgroup layout
        cannot enforce (``sandbox 'db': oom_group: cgroup v1 has no ...``)."""
        assert self.runtime is not None
        problems = []
        for cfg in sandboxes:
            try:
                self.runtime.cgroups.check(cfg.limits.effective())
            except SpecError as exc:
                problems.append(f"sandbox {cfg.name!r}: {exc}")
        return problems

    def _check_not_stopping(self) -> None:
        if self._stopping.is_set():
            raise CorralError("the fleet is stopping")

    async def _save_additions(self, additions: list[Addition]) -> None:
        """Record the sandboxes added at run time (see :mod:`._additions`);
        raises CorralError (one line) if it cannot."""
        assert self.runtime is not None
        try:
            await trio.to_thread.run_sync(
                save_additions, self.runtime.state_dir, additions, limiter=self.limiters.disk
            )
        except OSError as exc:
            raise CorralError(
                f"cannot record the sandboxes added at run time: {os_failure(exc)}"
            ) from None
        self._additions = additions

    async def _save_overrides(self) -> None:
        """Record every instance's changed limits (see :mod:`._overrides`);
        raises OSError if it cannot."""
        assert self.runtime is not None
        state_dir = self.runtime.state_dir
        async with self._overrides_lock:
            # Taken under the lock: the last writer writes the newest.
            data = {i.name: dict(i.overrides) for i in self.instances if i.overrides}
            await trio.to_thread.run_sync(
                save_overrides, state_dir, data, limiter=self.limiters.disk
            )

    def _additions_left(self) -> list[Addition]:
        """The recorded additions whose instances are still in the fleet."""
        return [
            a
            for a in self._additions
            if (
                a.alias in self._by_name
                if a.alias
                else any(c.name == a.config.name for c in self.fleet.sandboxes)
            )
        ]

    async def _supervise(self, inst: Instance) -> None:
        """Run one instance, generation after generation (the instance task)."""
        raise NotImplementedError
