"""The event records: a closed set of typed, frozen dataclasses.

Every event is an :class:`Event` subclass with a class-level ``KIND`` (the
name on the wire) and its own data fields; the common fields say where and
when it happened. The bus stamps ``seq``, ``wall`` and ``mono`` when it
publishes, so producers leave them at 0.

The wire format is described in docs/events.md; this module knows nothing of
msgpack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

__all__ = [
    "EVENT_TYPES",
    "Adopted",
    "CheckpointFailed",
    "Checkpointed",
    "Created",
    "Event",
    "Exited",
    "Failed",
    "Gap",
    "JournalDegraded",
    "JournalRecovered",
    "LimitChanged",
    "MemoryPressure",
    "Oom",
    "OomKill",
    "PluginEvent",
    "PluginFailed",
    "Restarting",
    "Restored",
    "StartFailed",
    "Started",
    "Stopped",
    "Stopping",
    "SupervisorStarted",
    "SupervisorStopped",
    "SupervisorStopping",
    "UnknownEvent",
    "stamped",
]

E = TypeVar("E", bound="Event")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: the fields all kinds share.

    - ``sandbox``: the sandbox's name; ``""`` for supervisor-level events.
    - ``instance``: the replica index within the sandbox's fleet entry.
    - ``generation``: how many times that instance has been restarted.
    - ``seq``: assigned by the bus; increases by one per published event,
      never reused (it continues across restarts through the journal).
    - ``wall``: ``time.time()`` at publish.
    - ``mono``: ``time.monotonic()`` at publish. CLOCK_MONOTONIC is
      system-wide, so another process on the same boot can compare it.
    """

    KIND: ClassVar[str] = ""

    sandbox: str
    instance: int = 0
    generation: int = 0
    seq: int = 0
    wall: float = 0.0
    mono: float = 0.0

    @property
    def kind(self) -> str:
        """The kind on the wire; :class:`UnknownEvent` overrides it per record."""
        return self.KIND

    def data(self) -> dict[str, Any]:
        """This kind's own fields (not the common ones), as a new dict."""
        return {name: getattr(self, name) for name in data_fields(type(self))}


# --- the supervisor ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorStarted(Event):
    """The supervisor is up: its socket is listening, sandboxes come next.

    ``swept``: sandboxes a predecessor or a killed ``corral run`` left half
    made or half removed, whose leftovers it removed; ``problems``: what it
    found and could not use (a record, an added sandbox), one line each.
    """

    KIND: ClassVar[str] = "supervisor_started"
    sandbox: str = ""
    pid: int
    version: str
    swept: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorStopping(Event):
    """The supervisor began stopping every sandbox (``reason``: why)."""

    KIND: ClassVar[str] = "supervisor_stopping"
    sandbox: str = ""
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorStopped(Event):
    """Every sandbox is gone; this is the supervisor's last event."""

    KIND: ClassVar[str] = "supervisor_stopped"
    sandbox: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalDegraded(Event):
    """The journal cannot be written (``error`` says why and names the file,
    e.g. a full disk). Events are still published and delivered; the
    journal keeps what it cannot write in memory (up to 1 MiB) and retries.
    ``journal_recovered`` follows when a write succeeds again."""

    KIND: ClassVar[str] = "journal_degraded"
    sandbox: str = ""
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalRecovered(Event):
    """The journal is written again after ``journal_degraded``. The events
    ``first`` to ``last`` could not be kept and are a gap in the journal
    (both 0 if none was lost)."""

    KIND: ClassVar[str] = "journal_recovered"
    sandbox: str = ""
    first: int
    last: int


# --- one sandbox instance ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Created(Event):
    """The sandbox's cgroup and directories exist; its init is not running yet."""

    KIND: ClassVar[str] = "created"


@dataclass(frozen=True, slots=True, kw_only=True)
class Started(Event):
    """The sandbox's init runs with host PID ``pid``."""

    KIND: ClassVar[str] = "started"
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Adopted(Event):
    """A supervisor took back this running generation, left by a supervisor
    that ended without stopping it (its init is host PID ``pid``).

    ``changed``: the fleet file now describes it otherwise; it runs on as
    it was unless the supervisor was told to recreate changed sandboxes.
    ``paused``: it was paused (frozen), and stays so until resumed.
    """

    KIND: ClassVar[str] = "adopted"
    pid: int
    changed: bool = False
    paused: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Exited(Event):
    """The sandbox's init ended.

    ``status`` is the shell-style status (the exit code, or 128 + signal);
    exactly one of ``exit_code`` and ``signal`` is set, or neither (and
    ``status`` is -1) when how it ended was lost. ``oom_killed`` says
    whether the kernel's OOM killer killed it. ``late``: it ended while no
    supervisor ran, and this is the next supervisor reporting it.
    """

    KIND: ClassVar[str] = "exited"
    status: int
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    late: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Oom(Event):
    """The memory limit was reached ``count`` more times, without a kill (a near miss)."""

    KIND: ClassVar[str] = "oom"
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPressure(Event):
    """The sandbox's memory came under pressure, before any OOM kill.

    ``level`` says how: ``"high"`` (usage went over ``memory_high``; on
    v2 the kernel now throttles it), ``"max"`` (usage reached the memory
    limit and the kernel reclaimed to make room; cgroup v2 only) or
    ``"stall"`` (its tasks waited for memory longer than ``memory_stall``
    within a second; cgroup v2 only). ``usage`` is the bytes in use when
    it was seen; ``limit`` and ``high`` the memory limit and
    ``memory_high`` then (nil: none). ``count`` is how many times the
    kernel signalled the level since the last such event (repeats within
    a second are folded into one event)."""

    KIND: ClassVar[str] = "memory_pressure"
    level: str
    usage: int
    limit: int | None
    high: int | None
    count: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class OomKill(Event):
    """The OOM killer killed ``count`` more processes (``total`` so far) in the sandbox."""

    KIND: ClassVar[str] = "oom_kill"
    count: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Stopping(Event):
    """The sandbox is being stopped: SIGTERM now, SIGKILL after ``grace`` seconds."""

    KIND: ClassVar[str] = "stopping"
    reason: str
    grace: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Stopped(Event):
    """The sandbox is gone and cleaned up (cgroup, directories)."""

    KIND: ClassVar[str] = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class StartFailed(Event):
    """The sandbox could not be started; ``error`` is the one-line reason."""

    KIND: ClassVar[str] = "start_failed"
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Restarting(Event):
    """The restart policy will start the next generation after ``delay``
    seconds; ``reason`` says why (e.g. ``"exited with status 1"``,
    ``"OOM-killed"``) and ``attempt`` counts restarts since the last stable
    run (1 for the first)."""

    KIND: ClassVar[str] = "restarting"
    delay: float
    reason: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(Event):
    """The sandbox will not be restarted any more (too many restarts in too
    short a time, or its policy's maximum reached); ``reason`` says which."""

    KIND: ClassVar[str] = "failed"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChanged(Event):
    """A resource limit of the sandbox changed: ``limit`` names it as fleet
    files do (``"memory"``, ``"memory_high"``, ``"memory_swap"`` in bytes,
    ``"cpus"`` in millicpus, ``"pids"``, ``"cpu_weight"``, ``"io_weight"``,
    ``"io_read_bps"`` ...), ``old`` and ``new`` are the values (nil:
    unlimited), ``reason`` why. ``device`` is the block device
    (``"MAJ:MIN"``) of a per-device I/O limit, else ``""``."""

    KIND: ClassVar[str] = "limit_changed"
    limit: str
    old: int | None
    new: int | None
    reason: str
    device: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginFailed(Event):
    """A plugin raised: ``plugin`` is its name, ``error`` the one-line
    error, ``action`` what the supervisor does about it (``"restart"`` or
    ``"disable"``). ``sandbox`` is ``""``."""

    KIND: ClassVar[str] = "plugin_failed"
    plugin: str
    error: str
    action: str


# --- checkpoints ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpointed(Event):
    """A checkpoint of the sandbox was stored: ``tag`` names it, ``size`` is
    its bytes on disk, ``duration_ms`` the whole checkpoint, ``frozen_ms``
    how long the sandbox was frozen, ``leave_running`` whether it still
    runs (otherwise it was stopped once the checkpoint was complete)."""

    KIND: ClassVar[str] = "checkpointed"
    tag: str
    size: int
    duration_ms: float
    frozen_ms: float
    leave_running: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Restored(Event):
    """The sandbox was restored from checkpoint ``tag`` (of sandbox
    ``source``) as a new generation; ``pid`` is its init's host PID and
    ``duration_ms`` the restore's time. A ``started`` event follows."""

    KIND: ClassVar[str] = "restored"
    tag: str
    source: str
    pid: int
    duration_ms: float
    weakened: str = ""
    """What the restored sandbox lacks of its settings because this CRIU
    cannot restore it (e.g. ``no_new_privs`` before CRIU 3.19); empty if
    nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointFailed(Event):
    """A checkpoint or restore failed: ``operation`` is ``"checkpoint"`` or
    ``"restore"``, ``tag`` the checkpoint (``""`` if none was chosen) and
    ``reason`` CRIU's reason, or why CRIU cannot run here. The sandbox is as
    it was before."""

    KIND: ClassVar[str] = "checkpoint_failed"
    operation: str
    tag: str
    reason: str


# --- control (verbs on a running sandbox) -----------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Paused(Event):
    """The sandbox's cgroup is frozen (``corral pause``): every process is
    stopped until ``resumed``. ``freeze_ms`` is how long the kernel took to
    report the cgroup frozen. A paused sandbox is neither hung nor dead:
    nothing restarts it."""

    KIND: ClassVar[str] = "paused"
    freeze_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed(Event):
    """The sandbox's cgroup was thawed; ``paused_ms`` is how long it was paused."""

    KIND: ClassVar[str] = "resumed"
    paused_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Signaled(Event):
    """Signal ``signal`` (its number; ``name`` e.g. ``"SIGHUP"``) was sent to
    the sandbox's main process through its init (``corral kill``)."""

    KIND: ClassVar[str] = "signaled"
    signal: int
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecStarted(Event):
    """A process was started inside the running sandbox (``corral exec``):
    ``exec_id`` names it in its ``exec_exited``, ``pid`` is its host PID,
    ``command`` its argv as a shell-quoted string, ``tty`` whether it has a
    pseudo-terminal."""

    KIND: ClassVar[str] = "exec_started"
    exec_id: int
    pid: int
    command: str
    tty: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecExited(Event):
    """The process ``exec_id`` started in the sandbox ended: ``status`` is
    shell-style (the exit code, or 128+N after signal N)."""

    KIND: ClassVar[str] = "exec_exited"
    exec_id: int
    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Added(Event):
    """The instance was added to the running fleet (``corral add``) from
    ``source`` (the fleet file); ``created`` and ``started`` follow."""

    KIND: ClassVar[str] = "added"
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed(Event):
    """The instance left the running fleet (``corral rm``), after it was
    stopped; no event of it follows."""

    KIND: ClassVar[str] = "removed"


# --- delivery ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Gap(Event):
    """The receiver lost the events with ``first <= seq <= last``.

    A gap is made for one subscriber (its queue was full, or the journal no
    longer holds the range), so it is never journaled and its own ``seq`` is
    0. Recover the range with ``Bus.replay(first, last)`` while the journal
    still has it.
    """

    KIND: ClassVar[str] = "gap"
    sandbox: str = ""
    first: int
    last: int


# --- open ends -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginEvent(Event):
    """An event a plugin defines for itself: ``name`` (e.g. ``"restart.backoff"``)
    and a ``payload`` of msgpack-able values.

    The payload is a plain dict, so this record is not hashable.
    """

    KIND: ClassVar[str] = "plugin"
    name: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(Event):
    """A decoded event whose kind this version does not know.

    Decoding never fails for a new kind (newer producers may add kinds within
    schema v1); the record keeps the kind and the raw data map, and encodes
    back to the same map.
    """

    # field() because a bare annotation would make dataclasses take the
    # inherited ``kind`` property for this field's default.
    kind: str = field()
    payload: dict[str, Any] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        """The data map exactly as received (a shallow copy)."""
        return dict(self.payload)


EVENT_TYPES: Mapping[str, type[Event]] = MappingProxyType(
    {
        cls.KIND: cls
        for cls in (
            SupervisorStarted,
            SupervisorStopping,
            SupervisorStopped,
            JournalDegraded,
            JournalRecovered,
            Created,
            Started,
            Adopted,
            Exited,
            Oom,
            MemoryPressure,
            OomKill,
            Stopping,
            Stopped,
            StartFailed,
            Restarting,
            Failed,
            LimitChanged,
            PluginFailed,
            Checkpointed,
            Restored,
            CheckpointFailed,
            Paused,
            Resumed,
            Signaled,
            ExecStarted,
            ExecExited,
            Added,
            Removed,
            Gap,
            PluginEvent,
        )
    }
)
"""Every kind this version knows, mapped to its record type."""

_COMMON = tuple(f.name for f in fields(Event))
_STAMPS = ("seq", "wall", "mono")

# Per-class field names, asked once per event on hot paths. Plain dicts
# rather than functools.cache: mypy does not see classes as hashable keys.
_data_names: dict[type[Event], tuple[str, ...]] = {}
_copy_names: dict[type[Event], tuple[str, ...]] = {}


def data_fields(cls: type[Event]) -> tuple[str, ...]:
    """The names of *cls*'s own data fields (not the common ones)."""
    names = _data_names.get(cls)
    if names is None:
        names = _data_names[cls] = tuple(f.name for f in fields(cls) if f.name not in _COMMON)
    return names


def _unstamped_fields(cls: type[Event]) -> tuple[str, ...]:
    names = _copy_names.get(cls)
    if names is None:
        names = _copy_names[cls] = tuple(f.name for f in fields(cls) if f.name not in _STAMPS)
    return names


def stamped(event: E, seq: int, wall: float, mono: float) -> E:
    """A copy of *event* with its sequence number and times set.

    Same result as ``dataclasses.replace(event, seq=..., wall=..., mono=...)``
    at less than half the cost: it runs once per published event.
    """
    cls = type(event)
    new = object.__new__(cls)
    # Frozen dataclasses set their fields through object.__setattr__ too.
    set_ = object.__setattr__
    for name in _unstamped_fields(cls):
        set_(new, name, getattr(event, name))
    set_(new, "seq", seq)
    set_(new, "wall", wall)
    set_(new, "mono", mono)
    return new
