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
``standby``               keep the next generation made up to its     ``false``
                          exec while the current one runs (its
                          namespaces, cgroup, root, network), so a
                          restart is only an exec; not with
                          ``from_checkpoint`` or ``policy = "no"``
``on_pressure``           before an OOM kill: ``{ grow = 1.25,         none
                          max = "1G" }`` grows the memory limit of a
                          running instance live, times ``grow`` up
                          to ``max``, at each ``memory_pressure``
                          event and near-miss ``oom``; ``at = 0.9``
                          (the default) keeps ``memory_high`` at
                          that fraction of it, the mark that raises
                          the events
========================  ==========================================  ==========

Every decision is an event: ``restarting`` (delay, reason, attempt),
``failed``, ``limit_changed``. The decision logic is a pure function of the
policy, the instance's history and the clock (:func:`decide`), so it is
tested deterministically with trio's MockClock.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import trio

import events

from ._api import Handle, validate_with
from ._settings import SettingsError, duration, number, per_instance, size

__all__ = [
    "Decision",
    "InstanceHistory",
    "PressureGrow",
    "RestartPolicy",
    "check_settings",
    "decide",
    "grown_limits",
    "parse_policy",
    "plugin",
]

_log = structlog.get_logger("corral.restart")

Mode = Literal["no", "on-failure", "always", "unless-stopped"]
_POLICY_RE = re.compile(r"^(no|always|unless-stopped|on-failure)(?::(\d+))?$")
_KEYS = {
    "policy", "delay", "factor", "max_delay", "jitter", "reset_after", "intensity", "period",
    "on_oom", "from_checkpoint", "on_pressure", "standby",
}  # fmt: skip


@dataclass(frozen=True)
class OomGrow:
    """Restart with the memory limit multiplied by ``factor``, up to ``cap``."""

    factor: float
    cap: int


@dataclass(frozen=True)
class PressureGrow:
    """Grow a running instance's memory limit by ``factor``, up to ``cap``,
    when its memory comes under pressure; keep ``memory_high`` at ``at``
    times the limit (the mark whose crossing says so)."""

    factor: float
    cap: int
    at: float = 0.9


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
    on_pressure: PressureGrow | None = None
    """Grow the memory limit live under pressure, before an OOM kill."""
    standby: bool = False
    """Keep the next generation made up to its exec (a restart is an exec)."""


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
    if "on_pressure" in settings:
        kw["on_pressure"] = _on_pressure(settings["on_pressure"])
    if "from_checkpoint" in settings:
        if not isinstance(settings["from_checkpoint"], bool):
            raise SettingsError(
                "from_checkpoint", f"expected true or false, got {settings['from_checkpoint']!r}"
            )
        kw["from_checkpoint"] = settings["from_checkpoint"]
    if "standby" in settings:
        if not isinstance(settings["standby"], bool):
            raise SettingsError("standby", f"expected true or false, got {settings['standby']!r}")
        kw["standby"] = settings["standby"]
    policy = RestartPolicy(**kw)
    if policy.standby and policy.from_checkpoint:
        raise SettingsError(
            "standby", "not with from_checkpoint (a restore does not start from a standby)"
        )
    if policy.standby and policy.mode == "no":
        raise SettingsError("standby", 'nothing to stand by for with policy = "no"')
    return policy


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


def _on_pressure(value: object) -> PressureGrow:
    expected = f'expected {{ grow = 1.25, max = "1G" }} (and at = 0.9), got {value!r}'
    if not isinstance(value, Mapping):
        raise SettingsError("on_pressure", expected)
    if set(value) - {"grow", "max", "at"} or "grow" not in value or "max" not in value:
        raise SettingsError("on_pressure", expected)
    return PressureGrow(
        factor=number(value["grow"], "on_pressure.grow", low=1.01, high=100.0),
        cap=size(value["max"], "on_pressure.max"),
        at=number(value.get("at", 0.9), "on_pressure.at", low=0.1, high=1.0),
    )


def grown_limits(grow: PressureGrow, memory: int | None, high: int | None) -> dict[str, int] | None:
    """The ``memory`` and ``memory_high`` that *grow* makes of the present
    ones: None if there is no limit to grow or it is at ``max`` already."""
    if memory is None or memory >= grow.cap:
        return None
    new = min(int(memory * grow.factor), grow.cap)
    ratio = grow.at if high is None else high / memory
    return {"memory": new, "memory_high": min(new, int(new * ratio))}


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
    try:
        grown = policy.delay * policy.factor ** (history.attempt - 1)
    except OverflowError:  # a crash loop's 1025th restart at factor 2
        grown = math.inf
    delay = min(grown, policy.max_delay)
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

    async def relieve(ev: events.Event) -> None:
        """on_pressure: grow a running instance's limit before an OOM kill."""
        try:
            grow = policy_for(ev.sandbox).on_pressure
        except SettingsError:
            return  # a bad table: its exit says so (and fails the plugin) once
        inst = handle.instance(ev.sandbox)
        if grow is None or inst is None or inst.generation != ev.generation:
            return  # not asked for, or news of an earlier generation
        if isinstance(ev, events.Started):
            if inst.memory_limit is None or inst.memory_high is not None:
                return
            # The mark whose crossing raises memory_pressure (and on v2
            # throttles the sandbox, giving the growth time to come).
            changes: dict[str, int] | None = {"memory_high": int(inst.memory_limit * grow.at)}
            why = f"on_pressure: memory_high at {grow.at:g} of the memory limit"
        else:
            changes = grown_limits(grow, inst.memory_limit, inst.memory_high)
            what = ev.level if isinstance(ev, events.MemoryPressure) else "a near-miss OOM"
            why = f"on_pressure grow: memory pressure ({what})"
        if changes is None or inst.state not in ("running", "paused"):
            return
        try:
            await handle.update(ev.sandbox, reason=why, force=True, **changes)
        except Exception as exc:  # a refused change must not end the plugin
            # Refused (a checkpoint under way, it ended meanwhile, a cgroup
            # that would not take it): the next pressure event tries again.
            _log.warning("on_pressure: not grown", sandbox=ev.sandbox, error=str(exc))

    def standby(ev: events.Event) -> None:
        """A generation started: have the next one made, if asked for."""
        try:
            wanted = policy_for(ev.sandbox).standby
        except SettingsError:
            return  # a bad table: its exit says so (and fails the plugin) once
        inst = handle.instance(ev.sandbox)
        if wanted and inst is not None and inst.generation == ev.generation:
            handle.keep_standby(ev.sandbox)

    async def handle_event(nursery: trio.Nursery, ev: events.Event) -> None:
        if isinstance(ev, events.MemoryPressure | events.Oom):
            await relieve(ev)
            return
        history = histories.setdefault(ev.sandbox, InstanceHistory())
        if isinstance(ev, events.Started):
            history.started_at = trio.current_time() - max(0.0, _age(ev))
            standby(ev)
            await relieve(ev)
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

    kinds = ["started", "exited", "memory_pressure", "oom"]
    with handle.subscribe(kinds=kinds, maxsize=4096) as sub:
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
