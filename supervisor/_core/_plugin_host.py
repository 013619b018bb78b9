"""Loading plugins by name, and the handle each one acts through.

The supervisor never imports a plugin module statically: a plugin is found
by name in the ``corral.plugins`` entry point group (built-ins included,
see pyproject.toml), or by a ``module = "pkg.mod:attr"`` key in its
``[plugins.NAME]`` table. :class:`PluginHandle` implements the narrow
``plugins.Handle`` interface structurally.

A plugin's settings are checked before anything runs
(:func:`settings_problems`) by the check the plugin carries as its
``validate_settings`` attribute (``plugins.validate_with``), if it has one.
A plugin that raises is restarted (:func:`run_plugin`), and its
subscriptions resume where they stopped
(:mod:`._plugin_subscription`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import trio

import events
from events._filter import Filter

from .._errors import CorralError
from .._runtime._limits import parse_limit
from ._plugin_group import ENTRY_POINT_GROUP
from ._plugin_subscription import PluginSubscription, PluginSubscriptions, replay

if TYPE_CHECKING:
    from .._runtime._checkpoint import CheckpointInfo
    from .._runtime._sandbox import Runtime, Sandbox
    from ._fleet import Fleet, SandboxConfig
    from ._instance import Instance
    from ._limiters import Limiters

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginHandle",
    "PluginHost",
    "load_plugin",
    "run_plugin",
    "settings_problems",
]

DEFAULT_PLUGINS = ("restart", "logging")
"""Loaded for every fleet (each does nothing unless configured)."""

PluginFn = Callable[[Any, Mapping[str, Any]], Awaitable[None]]
SettingsCheck = Callable[[Mapping[str, Any], Mapping[str, Any] | None], None]

SETTINGS_HOOK = "validate_settings"
"""Where a plugin carries its settings check (``plugins.SETTINGS_HOOK``; the
supervisor cannot import the plugins package, so the name is repeated)."""

# A plugin that raises is restarted after 1 s, 2 s, ...; after this many
# failures it is disabled.
PLUGIN_MAX_FAILURES = 3
PLUGIN_RESTART_DELAY = 1.0


class PluginError(CorralError):
    """A plugin cannot be found or loaded."""


def load_plugin(
    name: str, table: Mapping[str, Any], base_dir: str = "."
) -> tuple[PluginFn, dict[str, Any]]:
    """Find plugin *name*; return it and its settings (the table minus ``module``).

    ``module`` is ``"package.module:attribute"`` (importable), or
    ``"path/to/file.py:attribute"`` relative to *base_dir* (the fleet
    file's directory), for a plugin that is just a file.
    """
    config = {k: v for k, v in table.items() if k != "module"}
    target = table.get("module")
    try:
        if target is not None:
            if not isinstance(target, str) or ":" not in target:
                raise PluginError(
                    f'plugin {name!r}: module: expected "package.module:attribute" or'
                    f' "file.py:attribute", got {target!r}'
                )
            mod, _, attr = target.rpartition(":")
            if mod.endswith(".py"):
                obj = getattr(_load_file(name, os.path.join(base_dir, mod)), attr)
            else:
                obj = getattr(importlib.import_module(mod), attr)
        else:
            found = entry_points(group=ENTRY_POINT_GROUP, name=name)
            if not found:
                raise PluginError(
                    f"plugin {name!r} not found: no entry point {name!r} in group"
                    f' {ENTRY_POINT_GROUP!r} and no module = "package.module:attribute"'
                    f" in [plugins.{name}]"
                )
            obj = next(iter(found)).load()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {name!r}: cannot load: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise PluginError(f"plugin {name!r}: {obj!r} is not callable")
    return obj, config


def _load_file(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"corral_plugin_{name}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {name!r}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings_problems(
    plugins: Mapping[str, tuple[PluginFn, Mapping[str, Any]]],
    sandboxes: Iterable[SandboxConfig],
    *,
    fleet_wide: bool = True,
) -> list[str]:
    """Check plugin settings with each plugin's own check; one line per problem.

    *plugins* maps each loaded plugin's name to it and its fleet-wide
    settings. With *fleet_wide*, those are checked first; then the table of
    every sandbox in *sandboxes* for each plugin it names (a sandbox is
    skipped for a plugin whose fleet-wide table is already wrong, which
    would otherwise be reported once per sandbox). A plugin without a check
    is not checked here: it sees its settings when it runs, as before.
    """
    problems: list[str] = []
    checks: dict[str, SettingsCheck] = {}
    for name, (fn, config) in plugins.items():
        check = getattr(fn, SETTINGS_HOOK, None)
        if not callable(check):
            continue
        if fleet_wide:
            problem = _run_check(check, config, None)
            if problem is not None:
                problems.append(f"plugin {name!r}: {problem}")
                continue
        checks[name] = check
    for cfg in sandboxes:
        for name, table in cfg.plugins.items():
            if name in checks:
                problem = _run_check(checks[name], plugins[name][1], table)
                if problem is not None:
                    problems.append(f"sandbox {cfg.name!r}: plugin {name!r}: {problem}")
    return problems


def _run_check(
    check: SettingsCheck, config: Mapping[str, Any], sandbox: Mapping[str, Any] | None
) -> str | None:
    """What is wrong (``FIELD: what was expected``), or None."""
    try:
        # Copies: a check that changes its arguments must not change the fleet.
        check(dict(config), None if sandbox is None else dict(sandbox))
    except ValueError as exc:
        return _one_line(str(exc)) or "invalid settings"
    except Exception as exc:  # a bug in the check is the plugin's, reported as one line
        return _one_line(f"cannot check settings: {type(exc).__name__}: {exc}")
    return None


def _one_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


class PluginHost(Protocol):
    """What a :class:`PluginHandle` needs of the supervisor, and nothing more.

    The supervisor (:class:`~supervisor._core._supervisor.Supervisor`) has it
    structurally; the host module does not import the supervisor's.
    """

    fleet: Fleet
    instances: list[Instance]
    bus: events.Bus | None
    runtime: Runtime | None
    limiters: Limiters

    def publish(self, event: events.Event) -> events.Event: ...
    def instance(self, name: str) -> Instance | None: ...
    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool: ...
    def keep_standby(self, name: str) -> bool: ...
    async def checkpoint(
        self, name: str, *, tag: str | None = None, leave_running: bool = False
    ) -> CheckpointInfo: ...
    async def restore(
        self, name: str, *, tag: str | None = None, as_name: str | None = None
    ) -> Sandbox: ...
    async def list_checkpoints(self, name: str | None = None) -> list[CheckpointInfo]: ...
    async def delete_checkpoint(self, name: str, tag: str) -> None: ...
    def stop_instance(self, name: str, grace: float | None = None) -> None: ...
    def mark_failed(self, name: str, reason: str) -> None: ...
    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None: ...
    async def update_limits(
        self, name: str, changes: Mapping[str, Any], *, force: bool = False, reason: str = ...
    ) -> list[tuple[Instance, list[events.LimitChanged]]]: ...


async def run_plugin(fn: PluginFn, config: Mapping[str, Any], handle: PluginHandle) -> None:
    """Run a plugin; if it raises, report it (``plugin_failed``) and restart
    it after a growing delay, or give up after :data:`PLUGIN_MAX_FAILURES`.

    A restarted plugin misses nothing: the first subscription it opens again
    with a filter it had starts with the events after the last one that
    subscription gave it (see :mod:`._plugin_subscription`).
    """
    delay = PLUGIN_RESTART_DELAY
    for failure in range(1, PLUGIN_MAX_FAILURES + 1):
        handle._subscriptions.begin_run()
        try:
            await fn(handle, config)
            return
        except Exception as exc:  # a plugin's bug must not stop the fleet
            bus = handle._sup.bus
            if bus is not None and bus.closed:
                return  # the fleet has stopped: nobody to tell, nothing to restart for
            # Ended before plugin_failed: the next run is given that event too.
            handle._subscriptions.end_run(handle._sup.bus)
            action = "disable" if failure == PLUGIN_MAX_FAILURES else "restart"
            handle.publish(
                events.PluginFailed(
                    sandbox="",
                    plugin=handle.plugin,
                    error=_describe(exc),
                    action=action,
                )
            )
        finally:
            # Returned or cancelled (or raised, above): what it left open is
            # closed, its cursors kept for a next run.
            handle._subscriptions.end_run(handle._sup.bus)
        if failure < PLUGIN_MAX_FAILURES:
            await trio.sleep(delay)
            delay *= 2


def _describe(exc: BaseException) -> str:
    """One line saying what went wrong: a plugin's error raised in its own
    nursery arrives wrapped in an exception group of one, which says nothing."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return _one_line(f"{type(exc).__name__}: {exc}")


class PluginHandle:
    """What one plugin gets: events in and out, and a few verbs."""

    def __init__(self, supervisor: PluginHost, plugin: str) -> None:
        self._sup = supervisor
        self._plugin = plugin
        self._subscriptions = PluginSubscriptions()

    @property
    def plugin(self) -> str:
        """The plugin's name."""
        return self._plugin

    @property
    def state_dir(self) -> str:
        """A directory of the plugin's own (``STATE_DIR/plugins/NAME``), created."""
        assert self._sup.runtime is not None
        path = os.path.join(self._sup.runtime.state_dir, "plugins", self._plugin)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def subscribe(
        self,
        kinds: Iterable[str] | None = None,
        sandboxes: Iterable[str] | None = None,
        maxsize: int = 1024,
    ) -> PluginSubscription:
        """Subscribe to the event bus; after a restart of the plugin, from
        where its previous run's subscription of the same filter stopped."""
        assert self._sup.bus is not None
        return self._subscriptions.open(
            self._sup.bus, kinds, sandboxes, maxsize, limiter=self._sup.limiters.disk
        )

    def replay(self, since: int, until: int | None = None) -> AsyncIterator[events.Event]:
        """Events from the journal, read in a worker thread (``async for``)."""
        assert self._sup.bus is not None
        return replay(self._sup.bus, Filter(None, None), since, until, self._sup.limiters.disk)

    def publish(self, event: events.Event) -> events.Event:
        """Publish an event; returns it stamped.

        Once the fleet has stopped (the bus is closed: a plugin draining
        after ``supervisor_stopped``, say a checkpoint prune that was under
        way), the event is dropped and returned as it was: nobody is left
        to tell, and the plugin must not fail for it.
        """
        bus = self._sup.bus
        if bus is not None and bus.closed:
            return event
        return self._sup.publish(event)

    def instances(self) -> list[Instance]:
        """Every instance of the fleet."""
        return list(self._sup.instances)

    def instance(self, name: str) -> Instance | None:
        """One instance by name."""
        return self._sup.instance(name)

    def settings(self, name: str) -> Mapping[str, Any]:
        """This plugin's settings for instance *name*: per sandbox over fleet-wide."""
        merged = {
            k: v for k, v in self._sup.fleet.plugins.get(self._plugin, {}).items() if k != "module"
        }
        inst = self._sup.instance(name)
        if inst is not None:
            merged.update(inst.config.plugins.get(self._plugin, {}))
        return merged

    def restart(self, name: str, *, from_checkpoint: bool = False) -> bool:
        """Start the next generation of an exited instance."""
        return self._sup.restart(name, from_checkpoint=from_checkpoint)

    def keep_standby(self, name: str) -> bool:
        """Have a running instance's next generation made up to its exec."""
        return self._sup.keep_standby(name)

    async def checkpoint(
        self, name: str, *, tag: str | None = None, leave_running: bool = True
    ) -> CheckpointInfo:
        """Checkpoint a running instance with CRIU."""
        return await self._sup.checkpoint(name, tag=tag, leave_running=leave_running)

    async def restore(
        self, name: str, *, tag: str | None = None, as_name: str | None = None
    ) -> None:
        """Restore an instance (or a new one) from a checkpoint."""
        await self._sup.restore(name, tag=tag, as_name=as_name)

    async def checkpoints(self, name: str) -> list[CheckpointInfo]:
        """An instance's checkpoints, oldest first (read in a worker thread)."""
        return await self._sup.list_checkpoints(name)

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        """Remove one of an instance's checkpoints (in a worker thread)."""
        await self._sup.delete_checkpoint(name, tag)

    def stop(self, name: str, grace: float | None = None) -> None:
        """Stop one instance; it stays stopped."""
        self._sup.stop_instance(name, grace=grace)

    def mark_failed(self, name: str, reason: str) -> None:
        """Record that an exited instance will not be restarted."""
        self._sup.mark_failed(name, reason)

    def set_memory_limit(self, name: str, limit: int | None, reason: str) -> None:
        """Change an instance's memory limit now and for later generations."""
        self._sup.set_memory_limit(name, limit, reason)

    async def update(
        self, name: str, *, force: bool = False, reason: str | None = None, **limits: object
    ) -> list[events.LimitChanged]:
        """Change limits of instance(s) *name* (a sandbox: every instance),
        now and for later generations, as ``corral update`` does; return
        the ``limit_changed`` events (published). Values are those of a
        fleet file (``memory="256M"`` or bytes, ``cpus=0.5``,
        ``io_read_bps={"/dev/sda": "10M"}``); None lifts a limit (as ``max``)."""
        changes = {
            key: parse_limit(key, "max" if value is None else value, live=True)
            for key, value in limits.items()
        }
        done = await self._sup.update_limits(
            name, changes, force=force, reason=reason or f"plugin {self._plugin}"
        )
        return [ev for _, evs in done for ev in evs]
