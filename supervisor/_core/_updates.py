"""Changing the limits of a fleet's instances at run time: ``corral update``,
a plugin's ``update`` and ``set_memory_limit`` (the restart plugin's
growth after an OOM kill).

A change applies at once to a running (or paused) generation, in its
cgroup, spec and record (:meth:`Runtime.update`); it holds for every later
generation of the instance, and the next supervisor keeps it
(:mod:`._overrides`). Each changed value is one ``limit_changed`` event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import trio

from events import LimitChanged

from .._errors import CorralError, SpecError, os_failure
from .._runtime._limits import Limits
from ._base import SupervisorBase
from ._instance import BUSY_UPDATE, Ident, Instance
from ._states import guard
from ._supervisor_log import say

__all__ = ["Updates", "limit_events"]

_LIVE = ("running", "paused")
"""The states in which a change reaches the sandbox's cgroup at once; in
the others it waits for the next generation."""


def limit_events(
    ident: Ident, old: Limits, new: Limits, keys: Iterable[str], reason: str
) -> list[LimitChanged]:
    """One ``limit_changed`` per value of *keys* that differs (per device
    for the I/O rates)."""
    out = []
    for key in keys:
        before, after = old.event_values(key), new.event_values(key)
        for device in sorted(set(before) | set(after)):
            if before.get(device) != after.get(device):
                out.append(
                    LimitChanged(
                        **ident,
                        limit=key,
                        device=device,
                        old=before.get(device),
                        new=after.get(device),
                        reason=reason,
                    )
                )
    return out


class Updates(SupervisorBase):
    """The limit changes of a running fleet (mixed into :class:`~._supervisor.Supervisor`)."""

    async def update_limits(
        self,
        name: str,
        changes: Mapping[str, Any],
        *,
        force: bool = False,
        reason: str = "update requested",
    ) -> list[tuple[Instance, list[LimitChanged]]]:
        """Change the limits of instance(s) *name*: at once where they run,
        and for their later generations; return each instance with its
        ``limit_changed`` events (published).

        *changes* are parsed values by key (``parse_limit(key, value,
        live=True)``). A bad combination, a limit this layout cannot
        enforce, or (without *force*) a memory limit below what a running
        instance uses now, refuses the whole change before any instance is
        touched (:class:`SpecError`, one line naming the key).
        """
        found = self.targets(name)
        for inst in found:
            guard("update", inst.name, inst.state, inst.busy)
        # One change at a time, and none while a checkpoint or a pause is
        # under way (guard refuses them meanwhile): each reads the limits
        # the last one left.
        for inst in found:
            inst.begin(BUSY_UPDATE)
        out: list[tuple[Instance, list[LimitChanged]]] = []
        try:
            await self._update(found, changes, force, reason, out)
        finally:
            for inst in found:
                inst.end()
            # What was changed is said and recorded, also when a later
            # instance's change failed.
            for _, evs in out:
                for ev in evs:
                    self.publish(ev)
            if out:
                await self._recorded()
        return out

    async def _recorded(self) -> None:
        try:
            await self._save_overrides()
        except OSError as exc:
            raise CorralError(
                f"the limits are changed, but cannot be recorded for the next supervisor:"
                f" {os_failure(exc)}"
            ) from None

    async def _update(
        self,
        found: list[Instance],
        changes: Mapping[str, Any],
        force: bool,
        reason: str,
        out: list[tuple[Instance, list[LimitChanged]]],
    ) -> None:
        """Check every change, then make them, appending to *out* as it goes."""
        assert self.runtime is not None
        runtime = self.runtime
        plans = [(inst, inst.limits.updated(changes)) for inst in found]
        live = [
            (inst, inst.sandbox, new)
            for inst, new in plans
            if inst.sandbox is not None and inst.state in _LIVE
        ]

        def check() -> None:
            for _, new in plans:
                runtime.cgroups.check(new.effective())
            if not force:
                for inst, sb, new in live:
                    try:
                        runtime.check_update(sb, new)
                    except SpecError as exc:
                        # Named as the user knows it, not by generation.
                        message = str(exc).replace(repr(sb.name), repr(inst.name), 1)
                        raise SpecError(exc.field, message.split(": ", 1)[1]) from None

        await trio.to_thread.run_sync(check, limiter=self.limiters.lifecycle)
        for inst, new in plans:
            sb = inst.sandbox
            if sb is not None and inst.state in _LIVE:
                try:
                    await trio.to_thread.run_sync(
                        partial(runtime.update, sb, new, force=True),
                        limiter=self.limiters.lifecycle,
                    )
                except CorralError:
                    if inst.sandbox is sb and sb.poll() is None:
                        raise
                    # It ended meanwhile: the change is for its next generation.
            old = inst.limits
            keys = inst.override(new)
            out.append((inst, limit_events(self._ident(inst), old, new, keys, reason)))

    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None:
        """Change an instance's memory limit, live and for later generations."""
        inst = self._by_name.get(name)
        if inst is None:
            return
        old = inst.limits
        new = old.updated({"memory": limit})
        keys = inst.override(new)
        ident = self._ident(inst)
        for ev in limit_events(ident, old, new, keys, reason):
            self.publish(ev)
        if self._janitor is None:
            return
        self._janitor.start_soon(self._record_overrides)
        sb = inst.sandbox
        if sb is None or limit is None or inst.state not in _LIVE or self.runtime is None:
            return
        runtime = self.runtime

        async def apply() -> None:
            # In a worker thread: lowering memory.max makes the writer
            # reclaim the difference, which may take long.
            try:
                await trio.to_thread.run_sync(
                    lambda: runtime.update(sb, new, force=True), limiter=self.limiters.lifecycle
                )
            except (CorralError, OSError) as exc:
                if inst.sandbox is sb and sb.poll() is None:
                    # Still running under the old limit: say so.
                    why = f"{reason}: cannot be applied live ({exc}); applies from the next start"
                    for ev in limit_events(ident, new, old, ["memory"], why):
                        self.publish(ev)

        self._janitor.start_soon(apply)

    async def _record_overrides(self) -> None:
        """:meth:`_save_overrides`, saying (not raising) why it could not."""
        try:
            await self._save_overrides()
        except OSError as exc:
            say(f"corral: the limits changed at run time cannot be recorded: {os_failure(exc)}")
