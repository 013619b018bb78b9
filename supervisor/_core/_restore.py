"""Checkpoints and restores: the CRIU verbs, and a generation brought back
from a checkpoint instead of started fresh."""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Any

import trio

from events import Checkpointed, CheckpointFailed, Restored

from .._errors import CheckpointError, CorralError, SpecError, StateError
from .._runtime._checkpoint import CheckpointInfo, check_criu, restore_weakens
from .._runtime._sandbox import Sandbox
from .._runtime._spec import SandboxSpec
from ._additions import Addition
from ._base import SupervisorBase
from ._fleet import check_instance_name
from ._instance import BUSY_CHECKPOINT, Instance, PendingRestore
from ._states import guard

__all__ = ["Checkpoints"]


class Checkpoints(SupervisorBase):
    """Checkpoint and restore (mixed into :class:`~._supervisor.Supervisor`)."""

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
                    ),
                    limiter=self.limiters.checkpoint,
                )
            return info
        except CorralError as exc:
            self.publish(
                CheckpointFailed(**ident, operation="checkpoint", tag=tag or "", reason=str(exc))
            )
            raise
        finally:
            inst.end()

    async def list_checkpoints(self, name: str | None = None) -> list[CheckpointInfo]:
        """The checkpoints on disk of instance *name* (of every name: None),
        oldest first for each name. Read in a worker thread."""
        assert self.runtime is not None
        store = self.runtime.checkpoints

        def read() -> list[CheckpointInfo]:
            names = [name] if name is not None else list(store.names())
            return [info for n in names for info in store.list(n)]

        return await trio.to_thread.run_sync(read, limiter=self.limiters.disk)

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        """Remove checkpoint *tag* of instance *name* (nothing if there is
        none). The files are removed in a worker thread."""
        assert self.runtime is not None
        store = self.runtime.checkpoints

        def delete() -> None:
            for info in store.list(name):
                if info.tag == tag:
                    store.delete(info)

        await trio.to_thread.run_sync(delete, limiter=self.limiters.disk)

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
            info = await trio.to_thread.run_sync(find, limiter=self.limiters.disk)
            if as_name is not None:
                check_instance_name(as_name, "as")
                if as_name in self._by_name or any(
                    c.name == as_name or c.instance_name(0) == as_name for c in self.fleet.sandboxes
                ):
                    raise SpecError("as", f"{as_name!r} is already a sandbox of this fleet")
                if self._stopping.is_set():
                    raise CheckpointError("the fleet is stopping")
                target = Instance(
                    # Everything of the source's (its mounts and its network
                    # too: the checkpoint was taken with them), but its name.
                    dataclasses.replace(
                        source.config,
                        name=as_name,
                        replicas=1,
                        limits=source.limits,
                    ),
                    0,
                    grace=source.grace,
                )
                target.alias = as_name
                # Recorded first: the next supervisor takes it back too.
                await self._save_additions(
                    [*self._additions, Addition(target.config, as_name, "restore --as")]
                )
                pending = PendingRestore(info, fallback=False)
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
                pending = PendingRestore(
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
                with contextlib.suppress(CorralError):
                    await self._save_additions(self._additions_left())
            raise pending.error
        assert pending.sandbox is not None
        return pending.sandbox

    async def _restore_generation(
        self,
        inst: Instance,
        pending: PendingRestore,
        spec: SandboxSpec,
        stdio: tuple[int, int, int],
        labels: dict[str, Any] | None = None,
    ) -> Sandbox | None:
        """Restore this generation from a checkpoint; None if that failed."""
        assert self.runtime is not None
        runtime = self.runtime
        ident = self._ident(inst)
        info = pending.info
        if info is None:
            # A restart from the latest checkpoint (a plugin's): which one
            # that is, if any, is read now, off the trio thread. Shielded
            # like the restore: the generation's pipes are open already.
            with trio.CancelScope(shield=True):
                found = await trio.to_thread.run_sync(
                    runtime.checkpoints.list, inst.name, limiter=self.limiters.disk
                )
            if not found:
                pending.done.set()
                return None
            info = pending.info = found[-1]
        start = trio.current_time()
        try:
            # Shielded like a create; CRIU itself is bounded by a timeout.
            with trio.CancelScope(shield=True):
                sb = await trio.to_thread.run_sync(
                    lambda: runtime.restore(info, spec, stdio=stdio, labels=labels),
                    limiter=self.limiters.checkpoint,
                )
        except CorralError as exc:
            self.publish(
                CheckpointFailed(**ident, operation="restore", tag=info.tag, reason=str(exc))
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
                tag=info.tag,
                source=info.name,
                pid=sb.pid,
                duration_ms=round((trio.current_time() - start) * 1000, 3),
                weakened=restore_weakens(check_criu(), sb.spec.security),
            )
        )
        pending.sandbox = sb
        pending.done.set()
        return sb
