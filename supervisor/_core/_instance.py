"""The instance model: one replica of a sandbox as the supervisor tracks it.

Data and the small operations on it, and nothing that runs: the tasks that
drive an instance are in :mod:`._supervisor`, the verbs in :mod:`._verbs`.
Its state changes only along the life cycle of :mod:`._states`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import trio

import events

from .._errors import CorralError
from .._runtime._checkpoint import CheckpointInfo
from .._runtime._limits import Limits
from .._runtime._spec import SandboxSpec, validate_name
from ._fleet import SandboxConfig
from ._overrides import Override
from ._states import check_transition

if TYPE_CHECKING:
    from .._runtime._sandbox import ExecProcess, Sandbox

__all__ = [
    "BUSY_CHECKPOINT",
    "BUSY_PAUSE",
    "BUSY_UPDATE",
    "Ident",
    "Instance",
    "PendingRestore",
    "ident",
]

RECENT_EVENTS = 20
"""Events kept per instance for ``inspect``."""
BUSY_CHECKPOINT = "a checkpoint is being taken"
BUSY_PAUSE = "it is being paused or resumed"
BUSY_UPDATE = "its limits are being changed"


@dataclass(eq=False)
class PendingRestore:
    """A restore the next generation performs instead of a fresh start."""

    info: CheckpointInfo | None
    """The checkpoint; None: the instance's latest, looked up when the
    generation starts (none yet: a fresh start)."""
    fallback: bool
    """Start fresh if the restore fails (restart-by-restore); else stay as before."""
    prev_state: str = "exited"
    prev_checkpoint_stopped: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    sandbox: Sandbox | None = None
    error: CorralError | None = None


class Ident(TypedDict):
    sandbox: str
    instance: int
    generation: int


def ident(inst: Instance) -> Ident:
    """The fields that name an instance's generation in its events."""
    return {"sandbox": inst.name, "instance": inst.index, "generation": inst.generation}


@dataclass(eq=False)
class Instance:
    """One replica of a sandbox, as the supervisor tracks it.

    Its read-only properties are what plugins see (``plugins.InstanceView``).
    Its state changes only through :meth:`set_state`, along the life cycle
    of :mod:`supervisor._core._states`.
    """

    config: SandboxConfig
    index: int
    generation: int = 0
    state: str = "pending"
    """One of :data:`supervisor._core._states.STATES`."""
    sandbox: Sandbox | None = None
    grace: float = 10.0
    overrides: dict[str, Override] = field(default_factory=dict)
    """Limits changed at run time, by key (see :mod:`._overrides`): they
    hold for its later generations too."""
    oom_kills_reported: int = 0
    oom_events_seen: int = 0
    alias: str | None = None
    """Its name when it is not ``NAME-INDEX`` (an instance restored ``--as``)."""
    busy: str | None = None
    """An operation in progress that excludes other verbs (a checkpoint, a
    pause), as words for an error message."""
    checkpoint_stopped: bool = False
    """It was stopped by a checkpoint (not ``leave_running``); a restore
    brings it back, a restart policy leaves it alone."""
    stop_reason: str = "requested"
    started_at: float | None = None
    """Wall-clock time its current generation started running."""
    paused_at: float | None = None
    """Monotonic time it was paused, while it is."""
    last_exit: dict[str, Any] | None = None
    """How its last generation ended (the ``exited`` event's fields, and when)."""
    recent: deque[events.Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    """Its last events, newest last (for ``inspect``)."""
    execs: dict[int, ExecProcess] = field(default_factory=dict)
    """Processes started in it by ``exec`` that still run, by exec id."""
    _pending_restore: PendingRestore | None = None
    _idle: trio.Event = field(default_factory=trio.Event)
    _stop: trio.Event = field(default_factory=trio.Event)
    _halt: trio.Event = field(default_factory=trio.Event)
    _wake: trio.Event = field(default_factory=trio.Event)
    _up: trio.Event = field(default_factory=trio.Event)
    _ended: trio.Event = field(default_factory=trio.Event)
    _limits_moved: trio.Event = field(default_factory=trio.Event)
    """Set (and replaced) when its limits change: the pressure watch re-arms."""
    _restart: bool = False
    _cycle: bool = False
    _task_alive: bool = False
    _adopted: Any = None
    """What a previous supervisor left of it (an ``_adopt.Found``), to take back first."""
    _standby: Any = None
    """Its next generation, made up to the exec (a ``_standby.Standby``), if asked for."""

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def name(self) -> str:
        """The instance's name in events (``NAME-INDEX``)."""
        return self.alias or self.config.instance_name(self.index)

    @property
    def sandbox_name(self) -> str:
        """The fleet entry it belongs to."""
        return self.config.name

    @property
    def checkpointing(self) -> bool:
        """A checkpoint of it is being taken."""
        return self.busy == BUSY_CHECKPOINT

    @property
    def stop_requested(self) -> bool:
        """True once this instance (or the fleet) is being stopped or
        restarted on request, or a checkpoint stopped it: restart policies
        must leave it alone."""
        return self._stop.is_set() or self.checkpoint_stopped or self._cycle

    @property
    def limits(self) -> Limits:
        """The limits its current (or next) generation runs with: the fleet
        file's, with the changes made at run time."""
        if not self.overrides:
            return self.config.limits
        return self.config.limits._replace(**{k: v for k, (_, v) in self.overrides.items()})

    @property
    def memory_limit(self) -> int | None:
        """The memory limit its current (or next) generation runs with."""
        return self.limits.memory

    @property
    def memory_high(self) -> int | None:
        """The ``memory_high`` its current (or next) generation runs with."""
        return self.limits.memory_high

    def override(self, limits: Limits) -> list[str]:
        """Make *limits* its own from now on (for later generations too);
        return the keys that changed. A key back at the fleet file's value
        is no change any more."""
        before = self.limits
        base = self.config.limits
        for key in limits.changed(before):
            value = getattr(limits, key)
            if value == getattr(base, key):
                self.overrides.pop(key, None)
            else:
                self.overrides[key] = (getattr(base, key), value)
        keys = limits.changed(before)
        if keys:
            self._limits_moved.set()
            self._limits_moved = trio.Event()
        return keys

    def set_state(self, new: str) -> None:
        """Move to state *new*; a change the life cycle does not have is a bug."""
        check_transition(self.name, self.state, new)
        self.state = new

    def begin(self, busy: str) -> None:
        """Mark an exclusive operation as running (see :attr:`busy`)."""
        self.busy = busy
        self._idle = trio.Event()

    def end(self) -> None:
        """The exclusive operation is over."""
        self.busy = None
        self._idle.set()

    def spec(self, generation: int | None = None) -> SandboxSpec:
        """The runtime spec of the current generation (or of *generation*).

        The runtime name carries the generation, so a restart never waits
        for the previous generation's cgroup and layer to be removed.
        """
        base = self.config.spec(self.index)
        limits = self.limits
        generation = self.generation if generation is None else generation
        # _replace: base was validated whole, and so is what replaces its parts.
        return base._replace(
            name=validate_name(f"{self.name}.{generation}"),
            hostname=self.config.hostname or _hostname(self.name),
            limits=limits,
        )

    def drop_standby(self) -> None:
        """Call its standby off, if it has one (its task undoes it)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.decide(False)

    def request_stop(self, reason: str | None = None) -> None:
        """Stop it for good (until started again)."""
        if reason is not None and not self._stop.is_set():
            self.stop_reason = reason
        self.drop_standby()
        self._stop.set()
        self._halt.set()
        self._wake.set()

    def request_restart(self) -> None:
        """Start the next generation of an exited, failed or stopped instance."""
        self._restart = True
        self._wake.set()

    def request_cycle(self) -> None:
        """Stop the running generation, then start the next at once."""
        self._cycle = True
        self.stop_reason = "restart requested"
        self._halt.set()


def _hostname(name: str) -> str:
    return SandboxSpec(name=name, argv=("x",)).effective_hostname
