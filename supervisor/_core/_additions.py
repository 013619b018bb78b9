"""The sandboxes added to a running fleet (``corral add``, ``corral
restore --as``), kept in ``STATE_DIR/added.json`` so that the next
supervisor of the same state directory takes them back with the rest,
instead of stopping them as strangers to its fleet file.

The file is rewritten whole (atomically) at each add and removal: a
reader sees the list before or after, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .._errors import CorralError
from .._runtime._checkpoint import spec_from_dict, spec_to_dict
from .._runtime._records import write_atomic
from ._fleet import SandboxConfig

__all__ = ["ADDED", "Addition", "load_additions", "save_additions"]

ADDED = "added.json"
"""The file of the additions, in the state directory."""


@dataclass(frozen=True)
class Addition:
    """One fleet entry added at run time."""

    config: SandboxConfig
    alias: str | None = None
    """The instance's name if it is not ``NAME-0`` (``restore --as``)."""
    source: str = ""
    """Where it came from (the added fleet file, or ``restore --as``)."""

    def to_data(self) -> dict[str, Any]:
        """Plain data, for the file."""
        cfg = self.config
        return {
            "name": cfg.name,
            "replicas": cfg.replicas,
            "plugins": {k: dict(v) for k, v in cfg.plugins.items()},
            "spec": spec_to_dict(cfg.spec(0)),
            "alias": self.alias,
            "source": self.source,
        }

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> Addition:
        """Inverse of :meth:`to_data`; raises CorralError, KeyError,
        TypeError or ValueError on an entry it cannot use."""
        spec = spec_from_dict(d["spec"])
        config = SandboxConfig(
            name=str(d["name"]),
            command=tuple(spec.argv),
            replicas=int(d["replicas"]),
            rootfs=spec.rootfs,
            limits=spec.limits,
            env=dict(spec.env),
            workdir=spec.workdir,
            hostname=spec.hostname,
            plugins={str(k): dict(v) for k, v in dict(d.get("plugins") or {}).items()},
            security=spec.security,
            mounts=spec.mounts,
            user=spec.user,
            read_only=spec.read_only,
            network=spec.network,
            ports=spec.ports,
            egress=spec.egress,
            lxcfs=spec.lxcfs,
        )
        alias = d.get("alias")
        return cls(config, str(alias) if alias else None, str(d.get("source", "")))


def load_additions(state_dir: str) -> tuple[list[Addition], list[str]]:
    """The additions recorded in *state_dir*, and the problems with those
    that cannot be used (each one line; such an entry is left out)."""
    path = os.path.join(state_dir, ADDED)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError) as exc:
        return [], [f"{path}: unreadable ({exc}); the sandboxes added at run time are not known"]
    out: list[Addition] = []
    problems: list[str] = []
    for entry in data.get("sandboxes", []) if isinstance(data, dict) else []:
        try:
            out.append(Addition.from_data(entry))
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            name = entry.get("name") if isinstance(entry, dict) else None
            problems.append(f"{path}: the added sandbox {name!r} cannot be used: {exc}")
    return out, problems


def save_additions(state_dir: str, additions: list[Addition]) -> None:
    """Write the list of additions (atomically; blocking)."""
    path = os.path.join(state_dir, ADDED)
    if not additions:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    write_atomic(path, json.dumps({"sandboxes": [a.to_data() for a in additions]}, indent=1))
