"""Drive a plugin without a supervisor: an in-memory bus and a fake handle.

For plugin authors (and our own tests)::

    import trio, trio.testing
    from plugins.testing import FakeHandle, exited

    async def test_my_plugin():
        handle = FakeHandle(instances=["web-0"], settings={"web-0": {"policy": "always"}})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(my_plugin, handle, {})
            await trio.testing.wait_all_tasks_blocked()
            handle.publish(exited("web-0", status=1))
            await trio.testing.wait_all_tasks_blocked()
            assert handle.calls == [("restart", "web-0")]
            nursery.cancel_scope.cancel()

The handle records every verb a plugin calls in ``calls`` and applies its
effect to the fake instances (state, generation, memory limit), publishing
the same events the supervisor would (``failed``, ``limit_changed``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import events

__all__ = ["FakeHandle", "FakeInstance", "exited", "started"]


@dataclass
class FakeInstance:
    """An instance as a plugin sees it (``plugins.InstanceView``)."""

    name: str
    sandbox_name: str = ""
    generation: int = 0
    state: str = "running"
    memory_limit: int | None = None
    memory_high: int | None = None
    stop_requested: bool = False


class FakeHandle:
    """A ``plugins.Handle`` over an in-memory bus, recording what is done."""

    def __init__(
        self,
        instances: Iterable[str | FakeInstance] = (),
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        plugin: str = "test",
    ) -> None:
        self.instances_: dict[str, FakeInstance] = {}
        for inst in instances:
            fi = inst if isinstance(inst, FakeInstance) else FakeInstance(name=inst)
            if not fi.sandbox_name:
                fi.sandbox_name = fi.name.rsplit("-", 1)[0]
            self.instances_[fi.name] = fi
        self.settings_ = {k: dict(v) for k, v in (settings or {}).items()}
        self.plugin = plugin
        self.bus = events.Bus()
        self.calls: list[tuple[Any, ...]] = []
        self.checkpoints_: dict[str, list[FakeCheckpoint]] = {}
        self.checkpoint_size = 1000
        self._state_dir: str | None = None

    @property
    def state_dir(self) -> str:
        """A temporary directory, made on first use (remove it in the test)."""
        import tempfile

        if self._state_dir is None:
            self._state_dir = tempfile.mkdtemp(prefix=f"corral-plugin-{self.plugin}-")
        return self._state_dir

    # -- the Handle interface ---------------------------------------------------

    def subscribe(
        self,
        kinds: Iterable[str] | None = None,
        sandboxes: Iterable[str] | None = None,
        maxsize: int = 1024,
    ) -> events.Subscription:
        """Subscribe to the in-memory bus."""
        return self.bus.subscribe(kinds, sandboxes, maxsize)

    async def replay(self, since: int, until: int | None = None) -> AsyncIterator[events.Event]:
        """No journal here: a replay is one gap."""
        for event in self.bus.replay(since, until):
            yield event

    def publish(self, event: events.Event) -> events.Event:
        """Publish on the in-memory bus (also how a test injects events)."""
        return self.bus.publish(event)

    def instances(self) -> list[FakeInstance]:
        """Every fake instance."""
        return list(self.instances_.values())

    def instance(self, name: str) -> FakeInstance | None:
        """One fake instance."""
        return self.instances_.get(name)

    def settings(self, name: str) -> Mapping[str, Any]:
        """The settings given for *name* (empty if none)."""
        return self.settings_.get(name, {})

    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool:
        """Record a restart; bump the generation of an exited instance."""
        self.calls.append(("restart", name, True) if from_checkpoint else ("restart", name))
        inst = self.instances_.get(name)
        if inst is None or inst.stop_requested or inst.state not in ("exited", "failed"):
            return False
        inst.generation += 1
        inst.state = "running"
        return True

    def keep_standby(self, name: str) -> bool:
        """Record a standby request; True for a running instance."""
        self.calls.append(("standby", name))
        inst = self.instances_.get(name)
        return inst is not None and not inst.stop_requested and inst.state == "running"

    def stop(self, name: str, grace: float | None = None) -> None:
        """Record a stop."""
        self.calls.append(("stop", name, grace))
        inst = self.instances_.get(name)
        if inst is not None:
            inst.stop_requested = True

    def mark_failed(self, name: str, reason: str) -> None:
        """Record a failure and publish the ``failed`` event."""
        self.calls.append(("failed", name, reason))
        inst = self.instances_.get(name)
        if inst is not None:
            inst.state = "failed"
            self.publish(events.Failed(sandbox=name, generation=inst.generation, reason=reason))

    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None:
        """Record a limit change and publish ``limit_changed``."""
        self.calls.append(("memory", name, limit))
        inst = self.instances_.get(name)
        if inst is not None:
            old, inst.memory_limit = inst.memory_limit, limit
            self.publish(
                events.LimitChanged(
                    sandbox=name, generation=inst.generation, limit="memory",
                    old=old, new=limit, reason=reason,
                )
            )  # fmt: skip

    async def update(
        self, name: str, *, force: bool = False, reason: str | None = None, **limits: object
    ) -> list[events.LimitChanged]:
        """Record an update; ``memory`` and ``memory_high`` (bytes or None)
        are applied to the fake instance and published as ``limit_changed``,
        the rest recorded."""
        self.calls.append(("update", name, dict(limits), force))
        inst = self.instances_.get(name)
        out: list[events.LimitChanged] = []
        for key in ("memory", "memory_high"):
            value = limits.get(key, ...)
            if inst is None or value is ... or not (value is None or isinstance(value, int)):
                continue
            attr = "memory_limit" if key == "memory" else key
            old = getattr(inst, attr)
            setattr(inst, attr, value)
            event = events.LimitChanged(
                sandbox=name, generation=inst.generation, limit=key,
                old=old, new=value, reason=reason or f"plugin {self.plugin}",
            )  # fmt: skip
            out.append(self.publish(event))  # type: ignore[arg-type]
        return out

    async def checkpoint(
        self, name: str, *, tag: str | None = None, leave_running: bool = True
    ) -> FakeCheckpoint:
        """Record a checkpoint, keep a fake one and publish ``checkpointed``."""
        import time

        self.calls.append(("checkpoint", name, tag, leave_running))
        found = self.checkpoints_.setdefault(name, [])
        ckpt = FakeCheckpoint(
            name=name, tag=tag or f"t{len(found)}", created=time.time(), size=self.checkpoint_size
        )
        found.append(ckpt)
        self.publish(
            events.Checkpointed(
                sandbox=name, tag=ckpt.tag, size=ckpt.size, duration_ms=1.0, frozen_ms=1.0,
                leave_running=leave_running,
            )
        )  # fmt: skip
        return ckpt

    async def restore(
        self, name: str, *, tag: str | None = None, as_name: str | None = None
    ) -> None:
        """Record a restore."""
        self.calls.append(("restore", name, tag, as_name))

    async def checkpoints(self, name: str) -> list[FakeCheckpoint]:
        """The fake checkpoints of *name*, oldest first."""
        return list(self.checkpoints_.get(name, []))

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        """Record a deletion and forget the checkpoint."""
        self.calls.append(("delete_checkpoint", name, tag))
        self.checkpoints_[name] = [c for c in self.checkpoints_.get(name, []) if c.tag != tag]


@dataclass
class FakeCheckpoint:
    """A checkpoint as a plugin sees it (``plugins.CheckpointView``)."""

    name: str
    tag: str
    created: float
    size: int


def started(name: str, generation: int = 0, pid: int = 4242) -> events.Started:
    """A ``started`` event as the supervisor would publish it."""
    return events.Started(sandbox=name, generation=generation, pid=pid)


def exited(
    name: str,
    status: int = 0,
    *,
    generation: int = 0,
    oom_killed: bool = False,
    handle: FakeHandle | None = None,
) -> events.Exited:
    """An ``exited`` event; with *handle*, its instance is marked exited too."""
    if handle is not None and (inst := handle.instance(name)) is not None:
        inst.state = "exited"
        generation = inst.generation
    return events.Exited(
        sandbox=name,
        generation=generation,
        status=status,
        exit_code=status,
        signal=None,
        oom_killed=oom_killed,
    )
