"""The checkpoint plugin: periodic CRIU checkpoints of running sandboxes.

Settings (fleet-wide ``[plugins.checkpoint]``, per sandbox
``[sandbox.plugins.checkpoint]``; see docs/checkpoint.md):

==============  ==============================================  ===========
key             meaning                                         default
==============  ==============================================  ===========
``interval``    time between periodic checkpoints of a running  none (off)
                instance (``"30s"``, ``"5m"``); the sandbox
                keeps running (``leave_running``)
``keep``        how many of its periodic checkpoints an         ``3``
                instance keeps (the oldest go first)
``max_disk``    fleet-wide only: total size of all periodic     unbounded
                checkpoints; over it, the oldest go first, but
                never an instance's newest
==============  ==============================================  ===========

Periodic checkpoints are tagged ``auto-TIME``; checkpoints taken on demand
(``corral checkpoint``, or another plugin through ``handle.checkpoint``)
are never pruned by this plugin. To restart a crashed or OOM-killed
instance from its latest checkpoint, set ``from_checkpoint = true`` in the
restart plugin's settings.

After each periodic checkpoint the plugin publishes a ``plugin`` event
``checkpoint.pruned`` for the instance: ``count`` (its periodic checkpoints
so far), ``kept`` (how many it has now), ``deleted`` (``NAME/TAG`` of every
checkpoint removed) and ``bytes`` (the total size of all periodic
checkpoints left).

When CRIU cannot work on the host (not installed, or ``criu check``
fails), the first attempt publishes ``checkpoint_failed`` quoting
``criu check``, and the plugin publishes one ``plugin`` event
``checkpoint.disabled`` with the reason and stops trying; sandboxes are
not touched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

import events

from ._api import CheckpointView, Handle, validate_with
from ._settings import SettingsError, duration, number, per_instance, size

__all__ = [
    "AUTO_PREFIX",
    "CheckpointPolicy",
    "check_settings",
    "parse_policy",
    "plugin",
    "to_prune",
]

AUTO_PREFIX = "auto-"
_KEYS = {"interval", "keep", "max_disk", "module"}


@dataclass(frozen=True)
class CheckpointPolicy:
    """Parsed, validated settings for one instance."""

    interval: float | None = None
    keep: int = 3
    max_disk: int | None = None


def parse_policy(settings: Mapping[str, Any]) -> CheckpointPolicy:
    """Validate settings; :class:`SettingsError` names the field."""
    for key in settings:
        if key not in _KEYS:
            raise SettingsError(
                key, f"unknown key (expected one of: {', '.join(sorted(_KEYS - {'module'}))})"
            )
    kw: dict[str, Any] = {}
    if "interval" in settings:
        interval = duration(settings["interval"], "interval")
        if interval <= 0:
            raise SettingsError(
                "interval", f"expected a duration > 0, got {settings['interval']!r}"
            )
        kw["interval"] = interval
    if "keep" in settings:
        kw["keep"] = int(number(settings["keep"], "keep", low=1, high=10**6, whole=True))
    if "max_disk" in settings:
        kw["max_disk"] = size(settings["max_disk"], "max_disk")
    return CheckpointPolicy(**kw)


def to_prune(
    by_instance: Mapping[str, Sequence[CheckpointView]],
    keep: Mapping[str, int],
    max_disk: int | None,
) -> list[CheckpointView]:
    """Which periodic checkpoints to delete (a pure function).

    *by_instance* holds each instance's periodic checkpoints, oldest first.
    Each keeps its newest ``keep[name]``; then, while the total is over
    *max_disk*, the globally oldest go, except an instance's newest.
    """
    doomed: list[CheckpointView] = []
    survivors: list[CheckpointView] = []
    newest: set[tuple[str, str]] = set()
    for name, found in by_instance.items():
        k = keep.get(name, CheckpointPolicy.keep)
        cut = max(0, len(found) - k)
        doomed += found[:cut]
        survivors += found[cut:]
        if found:
            newest.add((found[-1].name, found[-1].tag))
    if max_disk is not None:
        total = sum(c.size for c in survivors)
        for c in sorted(survivors, key=lambda c: (c.created, c.tag)):
            if total <= max_disk:
                break
            if (c.name, c.tag) in newest:
                continue
            doomed.append(c)
            total -= c.size
    return doomed


def check_settings(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    """The supervisor's up-front check (``plugins.SettingsCheck``): the
    fleet-wide settings, or one sandbox's as the plugin will read them.
    ``max_disk`` bounds all instances together, so a sandbox's own is refused
    rather than silently ignored."""
    if sandbox is not None and "max_disk" in sandbox:
        raise SettingsError(
            "max_disk", "fleet-wide only: set it in [plugins.checkpoint], not per sandbox"
        )
    parse_policy(config if sandbox is None else {**config, **sandbox})


@validate_with(check_settings)
async def plugin(handle: Handle, config: Mapping[str, Any]) -> None:
    """The checkpoint plugin's task: one periodic loop per configured instance."""
    fleet_policy = parse_policy(config)
    parsed = per_instance(handle.settings, parse_policy)
    policies: dict[str, CheckpointPolicy] = {}  # the instances started so far
    disabled = trio.Event()

    def policy_for(name: str) -> CheckpointPolicy:
        policies[name] = parsed(name)
        return policies[name]

    counts: dict[str, int] = {}

    async def prune(name: str) -> None:
        by_instance = {
            n: [c for c in await handle.checkpoints(n) if c.tag.startswith(AUTO_PREFIX)]
            for n in policies
        }
        keep = {n: p.keep for n, p in policies.items()}
        doomed = to_prune(by_instance, keep, fleet_policy.max_disk)
        for c in doomed:
            await handle.delete_checkpoint(c.name, c.tag)
        gone = {(c.name, c.tag) for c in doomed}
        left = [c for found in by_instance.values() for c in found if (c.name, c.tag) not in gone]
        handle.publish(
            events.PluginEvent(
                sandbox=name,
                name="checkpoint.pruned",
                payload={
                    "count": counts.get(name, 0),
                    "kept": sum(1 for c in left if c.name == name),
                    "deleted": [f"{c.name}/{c.tag}" for c in doomed],
                    "bytes": sum(c.size for c in left),
                },
            )
        )

    async def periodic(name: str, interval: float) -> None:
        from supervisor import CheckpointError, CriuUnavailableError, StateError

        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_at)
            inst = handle.instance(name)
            if inst is None:
                return
            if inst.state == "running":
                now = time.time()
                tag = AUTO_PREFIX + time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
                tag += f".{int(now % 1 * 1e6):06d}"
                try:
                    await handle.checkpoint(name, tag=tag, leave_running=True)
                    counts[name] = counts.get(name, 0) + 1
                except CriuUnavailableError as exc:
                    if not disabled.is_set():
                        disabled.set()
                        handle.publish(
                            events.PluginEvent(
                                sandbox="",
                                name="checkpoint.disabled",
                                payload={"reason": str(exc)},
                            )
                        )
                    return
                except (CheckpointError, StateError):
                    # checkpoint_failed says why (paused or stopped meanwhile,
                    # or CRIU's reason): try again next time.
                    pass
                else:
                    await prune(name)
            # Periods are counted from the end of a checkpoint: a slow dump
            # never makes checkpoints pile up.
            next_at = max(next_at + interval, trio.current_time() + interval / 2)

    started: set[str] = set()

    def start(nursery: trio.Nursery, name: str) -> None:
        if name in started:
            return
        started.add(name)
        policy = policy_for(name)
        if policy.interval is not None:
            nursery.start_soon(periodic, name, policy.interval)

    with handle.subscribe(kinds=["created"]) as sub:
        async with trio.open_nursery() as nursery:
            for inst in handle.instances():
                start(nursery, inst.name)
            async for ev in sub:
                if isinstance(ev, events.Created) and not disabled.is_set():
                    start(nursery, ev.sandbox)
