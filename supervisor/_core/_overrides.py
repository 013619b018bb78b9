"""Limits changed at run time (``corral update``, a plugin's
``update`` or ``set_memory_limit``), kept in ``STATE_DIR/limits.json`` so
that the next supervisor of the same state directory (a take-over, a
restart after a crash) keeps them, as it keeps the sandboxes.

Each change is kept with the fleet file's value of its key at the time:
a successor whose fleet file now says otherwise for that key follows the
file (it is the newer word), and drops the change. The file is rewritten
whole (atomically) at each change: a reader sees it before or after.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .._errors import CorralError
from .._runtime._limits import Limits, key_data, key_from_data
from .._runtime._records import write_atomic

__all__ = ["LIMITS", "Override", "load_overrides", "save_overrides", "still_valid"]

LIMITS = "limits.json"
"""The file of the changed limits, in the state directory."""

Override = tuple[Any, Any]
"""One changed key of an instance: (the fleet file's value when it was
changed, the value now), both parsed (see :class:`Limits`)."""


def load_overrides(state_dir: str) -> tuple[dict[str, dict[str, Override]], list[str]]:
    """The changed limits recorded in *state_dir*, by instance and key, and
    the problems with entries that cannot be used (each one line; such an
    entry is left out)."""
    path = os.path.join(state_dir, LIMITS)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as exc:
        return {}, [f"{path}: unreadable ({exc}); the limits changed at run time are lost"]
    out: dict[str, dict[str, Override]] = {}
    problems: list[str] = []
    instances = data.get("instances") if isinstance(data, dict) else None
    for name, keys in (instances or {}).items() if isinstance(instances, dict) else ():
        try:
            out[str(name)] = {
                str(key): (key_from_data(key, entry["base"]), key_from_data(key, entry["value"]))
                for key, entry in dict(keys).items()
            }
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}: the limits changed on {name!r} cannot be used: {exc}")
    return out, problems


def save_overrides(state_dir: str, overrides: Mapping[str, Mapping[str, Override]]) -> None:
    """Write every instance's changed limits (atomically; blocking)."""
    path = os.path.join(state_dir, LIMITS)
    kept = {name: keys for name, keys in overrides.items() if keys}
    if not kept:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    data = {
        name: {
            key: {"base": key_data(key, base), "value": key_data(key, value)}
            for key, (base, value) in keys.items()
        }
        for name, keys in kept.items()
    }
    write_atomic(path, json.dumps({"instances": data}, indent=1))


def still_valid(overrides: Mapping[str, Override], config: Limits) -> dict[str, Override]:
    """The changes the fleet file's limits *config* have not overtaken
    (its value for their key is still the one they were made against)."""
    return {
        key: (base, value)
        for key, (base, value) in overrides.items()
        if key in config._fields and getattr(config, key) == base
    }
