"""A third-party-style plugin: write a report line for every OOM kill.

Load it from a fleet file, as a file next to it::

    [plugins.oom_report]
    module = "oom_report.py:plugin"
    path = "/var/log/corral-oom.txt"     # optional; default: the plugin's state dir

It subscribes to ``oom_kill`` and ``exited`` events and, once an OOM-killed
sandbox has exited, appends one line: when, which sandbox and generation,
the memory limit it ran under, and how it ended. It uses nothing but the plugin handle
(docs/plugins.md) and announces each report with a ``plugin`` event of its
own, so outside consumers see it too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import events
from plugins import Handle, SettingsError, validate_with


def check(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    """Checked by the supervisor before anything starts: a typo is a one-line
    fleet file error, not a failure of the plugin at the first OOM kill."""
    if sandbox:
        raise SettingsError(sorted(sandbox)[0], "no per-sandbox settings: one report file")
    unknown = set(config) - {"path"}
    if unknown:
        raise SettingsError(sorted(unknown)[0], "unknown key (expected: path)")
    if not isinstance(config.get("path", ""), str):
        raise SettingsError("path", f"expected a file path, got {config['path']!r}")


@validate_with(check)
async def plugin(handle: Handle, config: Mapping[str, Any]) -> None:
    """Append a line per OOM kill to the report file."""
    path = config.get("path", os.path.join(handle.state_dir, "oom-report.txt"))
    kills: dict[str, int] = {}
    # The memory limit each generation ran under: what limit_changed events
    # say, never the instance's current state (another plugin may already
    # have changed it by the time this one reads its queue).
    limits: dict[str, int | None] = {}
    with handle.subscribe(kinds=["started", "oom_kill", "exited", "limit_changed"]) as sub:
        async for ev in sub:
            if isinstance(ev, events.Started) and ev.sandbox not in limits:
                inst = handle.instance(ev.sandbox)
                limits[ev.sandbox] = inst.memory_limit if inst is not None else None
            elif isinstance(ev, events.LimitChanged) and ev.limit == "memory":
                limits[ev.sandbox] = ev.new
            elif isinstance(ev, events.OomKill):
                kills[ev.sandbox] = kills.get(ev.sandbox, 0) + ev.count
            elif isinstance(ev, events.Exited) and ev.sandbox in kills:
                limit = limits.get(ev.sandbox)
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ev.wall))
                line = (
                    f"{when} {ev.sandbox} generation={ev.generation}"
                    f" oom_kills={kills.pop(ev.sandbox)} memory_limit={limit}"
                    f" status={ev.status}\n"
                )
                with open(path, "a") as report:
                    report.write(line)
                handle.publish(
                    events.PluginEvent(
                        sandbox=ev.sandbox,
                        instance=ev.instance,
                        generation=ev.generation,
                        name="oom_report.written",
                        payload={"path": path},
                    )
                )
