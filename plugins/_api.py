"""The plugin interface: what a plugin is and the narrow handle it acts through.

A plugin is an async callable ``plugin(handle, config)``: it gets a
:class:`Handle` on the supervisor and its fleet-wide settings (the fleet
file's ``[plugins.NAME]`` table), runs for as long as the supervisor does
(subscribing to events, acting through the handle), and is cancelled when
the supervisor stops. If it raises, the supervisor publishes a
``plugin_failed`` event and restarts it after a delay, or disables it after
repeated failures; a plugin can never take the supervisor down.

The handle is the only way in: a plugin never touches supervisor
internals, and the supervisor never imports a plugin (it loads them by
name: the entry point group ``corral.plugins``, or a ``module = "pkg.mod:attr"``
key in the plugin's table). Both sides meet in these structural types.

A plugin may also say how its settings are checked, with
:func:`validate_with`: the supervisor then checks the fleet-wide table and
every sandbox's table when it starts and when a sandbox is added, so that
a bad setting is a one-line fleet file error before anything runs, not a
plugin failure at some sandbox's first exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import events

__all__ = [
    "SETTINGS_HOOK",
    "CheckpointView",
    "Handle",
    "InstanceView",
    "Plugin",
    "SettingsCheck",
    "Subscription",
    "validate_with",
]


class InstanceView(Protocol):
    """What a plugin may know about one sandbox instance (read-only)."""

    @property
    def name(self) -> str:
        """The instance's name, as in events (``web-0``)."""
        ...

    @property
    def sandbox_name(self) -> str:
        """The fleet entry it belongs to (``web``)."""
        ...

    @property
    def generation(self) -> int:
        """How many times it has been restarted."""
        ...

    @property
    def state(self) -> str:
        """pending, starting, running, stopping, exited, failed or stopped."""
        ...

    @property
    def memory_limit(self) -> int | None:
        """Its current memory limit in bytes (None: unlimited)."""
        ...

    @property
    def memory_high(self) -> int | None:
        """Its current ``memory_high`` in bytes (None: none)."""
        ...

    @property
    def stop_requested(self) -> bool:
        """True once a stop of this instance (or of the fleet) was asked for."""
        ...


class CheckpointView(Protocol):
    """What a plugin may know about one checkpoint."""

    @property
    def name(self) -> str:
        """The instance it was taken of."""
        ...

    @property
    def tag(self) -> str:
        """Its tag (unique per instance)."""
        ...

    @property
    def created(self) -> float:
        """Unix time it was taken."""
        ...

    @property
    def size(self) -> int:
        """Bytes on disk."""
        ...


class Subscription(Protocol):
    """What :meth:`Handle.subscribe` returns: the matching events in publish
    order, with an ``events.Gap`` where some were lost.

    An ``events.Subscription`` is one. To fill a gap, a plugin replays it
    with :meth:`Handle.replay`. The supervisor's also resumes: when
    a plugin is restarted after an error, the first subscription it opens
    again with the same filter starts with the events after the last one
    the previous run was given (from the journal), then goes on live.
    """

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def __aiter__(self) -> Self: ...
    async def __anext__(self) -> events.Event: ...

    async def receive(self) -> events.Event:
        """The next event, waiting for one (``trio.EndOfChannel`` once the
        supervisor has stopped and everything was received)."""
        ...

    def receive_nowait(self) -> events.Event:
        """The next event if one is at hand, else ``trio.WouldBlock``."""
        ...

    def close(self) -> None:
        """Unsubscribe (``with`` does it on exit)."""
        ...


class Handle(Protocol):
    """The narrow, documented handle a plugin acts through."""

    @property
    def plugin(self) -> str:
        """The plugin's own name (the key of its ``[plugins.NAME]`` table)."""
        ...

    @property
    def state_dir(self) -> str:
        """A directory of the plugin's own to write to (created on first use)."""
        ...

    def subscribe(
        self,
        kinds: Iterable[str] | None = None,
        sandboxes: Iterable[str] | None = None,
        maxsize: int = 1024,
    ) -> Subscription:
        """Subscribe to the event bus (see :meth:`events.Bus.subscribe`); a
        restarted plugin's subscription resumes (:class:`Subscription`)."""
        ...

    def replay(self, since: int, until: int | None = None) -> AsyncIterator[events.Event]:
        """Events from the journal, e.g. to recover a gap: ``async for ev in
        handle.replay(since)`` (read in a worker thread: a replay may be
        the whole journal, never read on the supervisor's trio thread)."""
        ...

    def publish(self, event: events.Event) -> events.Event:
        """Publish an event of the plugin's own (usually a ``PluginEvent``)."""
        ...

    def instances(self) -> Sequence[InstanceView]:
        """Every instance of the fleet."""
        ...

    def instance(self, name: str) -> InstanceView | None:
        """One instance by name, if it exists."""
        ...

    def settings(self, name: str) -> Mapping[str, Any]:
        """This plugin's settings for an instance: the sandbox's
        ``[sandbox.plugins.NAME]`` table over the fleet-wide one."""
        ...

    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool:
        """Start the next generation of an exited instance now.

        Returns False (and does nothing) if the instance is not in a state
        that can be restarted (running, stopping, stopped). With
        *from_checkpoint* the generation is restored from the instance's
        latest checkpoint, if it has one.
        """
        ...

    def keep_standby(self, name: str) -> bool:
        """Have a running instance's next generation made now, up to the
        exec of its command (namespaces, cgroup, root, network), so that
        a restart is only that exec. Ask again after each start: a
        standby serves one restart. Returns False if the instance is not
        running or is stopping. A standby whose spec no longer matches
        the next generation's (its limits changed) is dropped and the
        generation starts afresh; so is one when a restore comes first.
        """
        ...

    async def checkpoint(
        self, name: str, *, tag: str | None = None, leave_running: bool = True
    ) -> CheckpointView:
        """Checkpoint a running instance with CRIU (``checkpointed`` event).

        Raises ``supervisor.CheckpointError`` (after a ``checkpoint_failed``
        event) if it cannot be done; the instance is then as it was.
        """
        ...

    async def restore(
        self, name: str, *, tag: str | None = None, as_name: str | None = None
    ) -> None:
        """Restore an instance (or a new one, *as_name*) from a checkpoint."""
        ...

    async def checkpoints(self, name: str) -> Sequence[CheckpointView]:
        """An instance's checkpoints on disk, oldest first (read in a worker
        thread: a plugin's task waits, the supervisor does not)."""
        ...

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        """Remove one of an instance's checkpoints (in a worker thread)."""
        ...

    def stop(self, name: str, grace: float | None = None) -> None:
        """Stop an instance (SIGTERM, grace, SIGKILL); it stays stopped."""
        ...

    def mark_failed(self, name: str, reason: str) -> None:
        """Record that an exited instance will not be restarted (a
        ``failed`` event)."""
        ...

    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None:
        """Change an instance's memory limit: at once if it runs, and for
        every later generation (a ``limit_changed`` event)."""
        ...

    async def update(
        self, name: str, *, force: bool = False, reason: str | None = None, **limits: object
    ) -> Sequence[events.LimitChanged]:
        """Change limits of instance(s) *name* (a sandbox's name: every
        instance) as ``corral update`` does: at once where they run, and
        for every later generation (kept by the next supervisor too).

        Keys and values are a fleet file's (``memory="256M"`` or bytes,
        ``memory_high``, ``memory_swap``, ``cpus=0.5``, ``pids``,
        ``cpu_weight``, ``io_weight``, ``io_read_bps={"/dev/sda": "10M"}``
        and the other per-device I/O keys); None (or ``"max"``) lifts a
        limit. Returns the ``limit_changed`` events it published. Raises
        ``supervisor.SpecError`` (one line naming the key) for a bad value,
        a limit the host's cgroups cannot enforce, or, unless *force*, a
        memory limit below what a running instance uses now; nothing is
        changed then.
        """
        ...


Plugin = Callable[[Handle, Mapping[str, Any]], Awaitable[None]]
"""A plugin: an async callable taking the handle and its fleet-wide settings."""


SettingsCheck = Callable[[Mapping[str, Any], Mapping[str, Any] | None], None]
"""How a plugin's settings are checked: ``check(config, sandbox)``.

*config* is the fleet-wide ``[plugins.NAME]`` table (without ``module``);
*sandbox* is one sandbox's ``[sandbox.plugins.NAME]`` table, or None when
the fleet-wide table is checked on its own. The supervisor calls it once
with None, then once for every sandbox that has a table for the plugin
(at start-up, and at ``corral add``). It returns nothing and raises
:class:`~plugins.SettingsError` (any ``ValueError`` will do) whose message
is ``FIELD: what was expected``; the supervisor adds the sandbox and the
plugin's name.
"""

SETTINGS_HOOK = "validate_settings"
"""The attribute of a plugin the supervisor looks for its
:data:`SettingsCheck` under (set by :func:`validate_with`, or a method of
that name on a plugin object). A plugin without it is not checked up front."""

P = TypeVar("P", bound=Callable[..., Awaitable[None]])


def validate_with(check: SettingsCheck) -> Callable[[P], P]:
    """Decorate a plugin with the :data:`SettingsCheck` the supervisor runs
    on its settings before anything starts::

        def check(config, sandbox):
            parse_settings({**config, **(sandbox or {})})  # raises SettingsError

        @validate_with(check)
        async def plugin(handle, config): ...
    """

    def attach(plugin: P) -> P:
        # An attribute, not a registry: the supervisor finds the check on the
        # object it loaded by name, without importing this package.
        setattr(plugin, SETTINGS_HOOK, check)
        return plugin

    return attach
