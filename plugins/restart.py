"""The auto-restart plugin: restart policies, backoff, intensity, OOM reactions.

Settings (fleet-wide ``[plugins.restart]``, per sandbox
``[sandbox.plugins.restart]``; see docs/plugins.md):

========================  ==========================================  ==========
key                       meaning                                     default
========================  ==========================================  ==========
``policy``                ``no``, ``on-failure[:N]``, ``always``,     ``no``
                          ``unless-stopped``
``delay``                 first backoff delay                         ``100ms``
``factor``                backoff multiplier per consecutive restart  ``2``
``max_delay``             backoff cap                                 ``1m``
``jitter``                +/- this fraction of the delay, at random   ``0.1``
``reset_after``           a run this long resets the backoff          ``10s``
``intensity``/``period``  more than ``intensity`` restarts within     ``10``/``1m``
                          ``period`` marks the sandbox ``failed``
``on_oom``                after an OOM kill: ``"restart"`` (like any  ``restart``
                          failure), ``"stop"``, or
                          ``{ grow = 1.5, max = "512M" }``: restart
                          with the memory limit times ``grow``, up
                          to ``max``
``from_checkpoint``       restart by restoring the instance's latest  ``false``
                          checkpoint (docs/checkpoint.md), with the
                          grown limit after an OOM kill; a fresh
                          start if there is none or it fails
========================  ==========================================  ==========

Every decision is an event: ``restarting`` (delay, reason, attempt),
``failed``, ``limit_changed``. The decision logic is a pure function of the
policy, the instance's history and the clock (:func:`decide`), so it is
tested deterministically with trio's MockClock.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

import events

from ._api import Handle, validate_with
from ._settings import SettingsError, duration, number, per_instance, size

__all__ = [
    "Decision",
    "InstanceHistory",
    "RestartPolicy",
    "check_settings",
    "decide",
    "parse_policy",
    "plugin",
]

Mode = Literal["no", "on-failure", "always", "unless-stopped"]
_POLICY_RE = re.compile(r"^(no|always|unless-stopped|on-failure)(?::(\d+))?$")
_KEYS = {
    "policy", "delay", "factor", "max_delay", "jitter", "reset_after", "intensity", "period",
    "on_oom", "from_checkpoint",
}  # fmt: skip


@dataclass(frozen=True)
class OomGrow:
    """Restart with the memory limit multiplied by ``factor``, up to ``cap``."""

    factor: float
    cap: int


@dataclass(frozen=True)
class RestartPolicy:
    """A parsed, validated restart policy."""

    mode: Mode = "no"
    max_restarts: int | None = None
    """``on-failure:N``: at most N restarts."""
    delay: float = 0.1
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1
    reset_after: float = 10.0
    intensity: int = 10
    period: float = 60.0
    on_oom: Literal["restart", "stop"] | OomGrow = "restart"
    from_checkpoint: bool = False
    """Restart by restoring the latest checkpoint (fresh if there is none)."""


def parse_policy(settings: Mapping[str, Any]) -> RestartPolicy:
    """Validate settings; :class:`SettingsError` names the field."""
    for key in settings:
        if key not in _KEYS:
            raise SettingsError(key, f"unknown key (expected one of: {', '.join(sorted(_KEYS))})")
    kw: dict[str, Any] = {}
    if "policy" in settings:
        p = settings["policy"]
        m = _POLICY_RE.match(p) if isinstance(p, str) else None
        if not m or (m.group(2) and m.group(1) != "on-failure"):
            raise SettingsError(
                "policy",
                f"expected no, on-failure, on-failure:N, always or unless-stopped, got {p!r}",
            )
        kw["mode"] = m.group(1)
        if m.group(2):
            kw["max_restarts"] = int(m.group(2))
    for key in ("delay", "max_delay", "reset_after", "period"):
        if key in settings:
            kw[key] = duration(settings[key], key)
    if "factor" in settings:
        kw["factor"] = number(settings["factor"], "factor", low=1.0, high=100.0)
    if "jitter" in settings:
        kw["jitter"] = number(settings["jitter"], "jitter", low=0.0, high=1.0)
    if "intensity" in settings:
        kw["intensity"] = int(
            number(settings["intensity"], "intensity", low=1, high=10**6, whole=True)
        )
    if "on_oom" in settings:
        kw["on_oom"] = _on_oom(settings["on_oom"])
    if "from_checkpoint" in settings:
        if not isinstance(settings["from_checkpoint"], bool):
            raise SettingsError(
                "from_checkpoint", f"expected true or false, got {settings['from_checkpoint']!r}"
            )
        kw["from_checkpoint"] = settings["from_checkpoint"]
    return RestartPolicy(**kw)


def _on_oom(value: object) -> Literal["restart", "stop"] | OomGrow:
    if value in ("restart", "stop"):
        return "restart" if value == "restart" else "stop"
    if isinstance(value, Mapping):
        unknown = set(value) - {"grow", "max"}
        if unknown or "grow" not in value or "max" not in value:
            raise SettingsError(
                "on_oom", f'expected {{ grow = 1.5, max = "512M" }}, got {dict(value)!r}'
            )
        return OomGrow(
            factor=number(value["grow"], "on_oom.grow", low=1.0, high=100.0),
            cap=size(value["max"], "on_oom.max"),
        )
    raise SettingsError(
        "on_oom", f'expected "restart", "stop" or {{ grow = 1.5, max = "512M" }}, got {value!r}'
    )


@dataclass
class InstanceHistory:
    """What the plugin remembers about one instance."""

    attempt: int = 0
    """Consecutive restarts since the last stable run."""
    restarts: int = 0
    """Restarts in total (what on-failure:N counts)."""
    recent: deque[float] = field(default_factory=deque)
    """Times of restarts within the intensity period."""
    started_at: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do about an exit."""

    action: Literal["none", "restart", "fail"]
    reason: str
    delay: float = 0.0
    attempt: int = 0
    memory: int | None = None
    """A new memory limit to apply before restarting (OOM grow)."""


def decide(
    policy: RestartPolicy,
    history: InstanceHistory,
    exited: events.Exited,
    *,
    now: float,
    memory_limit: int | None,
    rng: random.Random,
) -> Decision:
    """Decide about one exit, updating *history*. *now* is the clock's time."""
    failed = exited.status != 0 or exited.oom_killed
    why = "OOM-killed" if exited.oom_killed else f"exited with status {exited.status}"
    if policy.mode == "no" or (policy.mode == "on-failure" and not failed):
        return Decision("none", why)
    if exited.oom_killed and policy.on_oom == "stop":
        return Decision("fail", f"{why}; on_oom is stop")
    if policy.max_restarts is not None and history.restarts >= policy.max_restarts:
        return Decision(
            "fail",
            f"{why}; on-failure:{policy.max_restarts} limit reached after"
            f" {history.restarts} restarts (last status {exited.status})",
        )
    # Intensity, as OTP supervisors count it: restarts within the period.
    while history.recent and now - history.recent[0] > policy.period:
        history.recent.popleft()
    if len(history.recent) >= policy.intensity:
        return Decision(
            "fail",
            f"{why}; more than {policy.intensity} restarts within {policy.period:g}s",
        )
    if history.started_at is not None and now - history.started_at >= policy.reset_after:
        history.attempt = 0
    history.attempt += 1
    history.restarts += 1
    history.recent.append(now)
    delay = min(policy.delay * policy.factor ** (history.attempt - 1), policy.max_delay)
    if policy.jitter and delay:
        delay *= 1 + rng.uniform(-policy.jitter, policy.jitter)
    memory = None
    if exited.oom_killed and isinstance(policy.on_oom, OomGrow) and memory_limit is not None:
        grown = min(int(memory_limit * policy.on_oom.factor), policy.on_oom.cap)
        if grown > memory_limit:
            memory = grown
    return Decision("restart", why, delay=max(0.0, delay), attempt=history.attempt, memory=memory)


def check_settings(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    """The supervisor's up-front check (``plugins.SettingsCheck``): the
    fleet-wide policy, or one sandbox's policy as the plugin will read it
    (its table over the fleet-wide one)."""
    parse_policy(config if sandbox is None else {**config, **sandbox})


@validate_with(check_settings)
async def plugin(handle: Handle, config: Mapping[str, Any]) -> None:
    """The restart plugin's task: watch exits, apply each sandbox's policy."""
    # Checked up front by the supervisor (check_settings); parsed again here
    # for a host that does not check, where a bad table fails the plugin.
    parse_policy(config)
    policy_for = per_instance(handle.settings, parse_policy)
    histories: dict[str, InstanceHistory] = {}
    rng = random.Random()

    def restart(name: str) -> None:
        if policy_for(name).from_checkpoint:
            handle.restart(name, from_checkpoint=True)
        else:
            handle.restart(name)

    async def restart_later(name: str, delay: float) -> None:
        await trio.sleep(delay)
        restart(name)

    async def handle_event(nursery: trio.Nursery, ev: events.Event) -> None:
        history = histories.setdefault(ev.sandbox, InstanceHistory())
        if isinstance(ev, events.Started):
            history.started_at = trio.current_time() - max(0.0, _age(ev))
            return
        if not isinstance(ev, events.Exited):
            return
        inst = handle.instance(ev.sandbox)
        if inst is None or inst.stop_requested:
            return
        d = decide(
            policy_for(ev.sandbox),
            history,
            ev,
            now=trio.current_time(),
            memory_limit=inst.memory_limit,
            rng=rng,
        )
        if d.action == "fail":
            handle.mark_failed(ev.sandbox, d.reason)
        elif d.action == "restart":
            if d.memory is not None:
                handle.set_memory_limit(ev.sandbox, d.memory, f"{d.reason}: on_oom grow")
            handle.publish(
                events.Restarting(
                    sandbox=ev.sandbox,
                    instance=ev.instance,
                    generation=ev.generation,
                    delay=d.delay,
                    reason=d.reason,
                    attempt=d.attempt,
                )
            )
            if d.delay <= 0:
                restart(ev.sandbox)
            else:
                nursery.start_soon(restart_later, ev.sandbox, d.delay)

    with handle.subscribe(kinds=["started", "exited"], maxsize=4096) as sub:
        async with trio.open_nursery() as nursery:
            async for ev in sub:
                if isinstance(ev, events.Gap):
                    async for missed in handle.replay(ev.first, ev.last):
                        await handle_event(nursery, missed)
                    continue
                await handle_event(nursery, ev)


def _age(ev: events.Event) -> float:
    """Seconds since the event was published (its monotonic stamp)."""
    import time

    return time.monotonic() - ev.mono if ev.mono else 0.0
