"""The life cycle of a sandbox instance: its states, and which verb works in which.

One table guards every verb, whoever asks (the control socket, a plugin,
the library), so ``corral pause`` of a stopped sandbox and a plugin's
checkpoint of a paused one get the same answer. A second table lists the
state changes the supervisor itself may make; any other is a bug and fails
loudly where it happens.

::

    pending ──> starting ──> running <──> paused
                   │            │           │
                   │            v           │
                   │         stopping       │
                   v            v           v
                 failed <──── exited <──────┘      (any) ──> stopped
                   └───────────> starting <──────────────────┘
"""

from __future__ import annotations

from .._errors import StateError

__all__ = ["STATES", "TRANSITIONS", "VERBS", "StateError", "check_transition", "guard"]

STATES = ("pending", "starting", "running", "paused", "stopping", "exited", "failed", "stopped")
"""Every state, in life-cycle order.

- ``pending``: not started yet (the fleet is coming up);
- ``starting``: being created or restored;
- ``running``: its init runs;
- ``paused``: its cgroup is frozen (``corral pause``); nothing runs, nothing
  is hung: no plugin restarts or checkpoints it;
- ``stopping``: asked to stop, in its grace period;
- ``exited``: its init ended unasked; a restart policy decides what next;
- ``failed``: it will not be restarted (start failure, policy gave up);
- ``stopped``: stopped on request (or by a checkpoint); stays so until
  started or restored.
"""

TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"starting", "stopped"}),
    "starting": frozenset({"running", "failed", "exited", "stopped"}),
    "running": frozenset({"paused", "stopping", "exited"}),
    "paused": frozenset({"running", "stopping", "exited"}),
    "stopping": frozenset({"exited"}),
    "exited": frozenset({"starting", "failed", "stopped"}),
    "failed": frozenset({"starting", "stopped"}),
    "stopped": frozenset({"starting"}),
}
"""The state changes the supervisor makes (``starting`` goes back to where it
came from when a restore that must not fall back fails)."""

_LIVE = frozenset({"running"})
VERBS: dict[str, frozenset[str]] = {
    "stop": frozenset(STATES) - {"stopped"},
    "start": frozenset({"exited", "failed", "stopped"}),
    "restart": frozenset(STATES) - {"pending"},
    "kill": _LIVE,
    "pause": _LIVE,
    "resume": frozenset({"paused"}),
    "exec": _LIVE,
    "checkpoint": _LIVE,
    "restore": frozenset({"exited", "failed", "stopped"}),
    "rm": frozenset(STATES),
    "update": frozenset(STATES) - {"starting"},
}
"""For each verb on one instance, the states it is allowed in."""

_WHY = {
    "kill": "a running sandbox",
    "pause": "a running sandbox",
    "resume": "a paused sandbox",
    "exec": "a running sandbox",
    "checkpoint": "a running sandbox",
    "start": "a sandbox that is not running",
    "restore": "a sandbox that is not running",
}

_HINT = {
    ("exec", "paused"): "resume it first",
    ("kill", "paused"): "resume it first",
    ("checkpoint", "paused"): "resume it first",
    ("start", "running"): "restart it instead",
    ("start", "paused"): "resume it instead",
    ("restore", "running"): "checkpoint it (without --leave-running) or stop it first,"
    " or restore it under a new name (--as)",
    ("restore", "paused"): "stop it first, or restore it under a new name (--as)",
    ("update", "starting"): "try again once it runs",
}


_WAIT_FOR_BUSY = frozenset({"stop", "restart", "rm"})


def _detail(verb: str, state: str) -> str:
    detail = f"it is {state}"
    if verb == "stop" and state == "stopped":
        return detail + " already"
    if (hint := _HINT.get((verb, state))) is not None:
        return f"{detail}: {hint}"
    if (need := _WHY.get(verb)) is not None:
        return f"{detail} ({verb} needs {need})"
    return detail


def guard(verb: str, name: str, state: str, busy: str | None = None) -> None:
    """Raise :class:`StateError` unless *verb* is allowed on an instance in *state*.

    *busy* names an operation in progress that excludes every verb that
    changes the sandbox (``"a checkpoint is being taken"``), but those that
    end its generation: they wait for the operation, then act.
    """
    if state not in VERBS[verb]:
        raise StateError(verb, name, state, _detail(verb, state))
    if busy is not None and verb not in _WAIT_FOR_BUSY:
        raise StateError(verb, name, state, f"{busy}; try again when it is done")


def check_transition(name: str, old: str, new: str) -> None:
    """Fail loudly on a state change the life cycle does not have (a bug)."""
    if new != old and new not in TRANSITIONS[old]:
        raise AssertionError(f"instance {name}: illegal state change {old} -> {new}")
