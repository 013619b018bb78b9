"""Taking back what a supervisor that ended left running (re-adoption).

Sandboxes outlive their supervisor by design: the keeper (see
:mod:`supervisor._runtime._linux._keeper`) is their parent and holds their
exit statuses and the read ends of their output pipes. The next supervisor
of the same run directory finds every sandbox it made by its record
(``RUN_DIR/sandboxes/NAME.json``, written atomically by the runtime, with
the labels below), checks its identity (start time and cgroup, through a
pidfd: never the PID alone) and takes it back:

- a running sandbox of an instance of the fleet is **adopted**;
- one that ended while no supervisor ran is reported ``exited`` (``late``),
  unless the journal shows its ``exited`` was published already;
- an older generation of an instance, or one whose exit was published, is
  swept (a supervisor killed between the exit and the clean-up);
- one whose instance is no longer in the fleet file is stopped.

One supervisor per run directory: :func:`lock_run_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .._errors import CorralError
from .._runtime._checkpoint import spec_to_dict
from .._runtime._dirs import make_run_dir
from .._runtime._linux._spawn import Keeper, OutputPipes, has_exited
from .._runtime._records import write_atomic
from .._runtime._sandbox import Runtime, Sandbox

__all__ = [
    "Found",
    "SupervisorRunningError",
    "Survey",
    "last_generations",
    "lock_run_dir",
    "note_generation",
    "survey",
]

LOCK_FILE = "supervisor.lock"


class SupervisorRunningError(CorralError):
    """Another supervisor runs the sandboxes of this run directory."""


def lock_holder(run_dir: str) -> int:
    """The PID the run directory's supervisor lock names (its holder's,
    while it is held); raises OSError or ValueError if there is none."""
    with open(os.path.join(run_dir, LOCK_FILE)) as f:
        return int(f.read().split()[0])


def lock_run_dir(run_dir: str) -> int:
    """Take the run directory's supervisor lock; return its descriptor
    (held until the process ends: the kernel drops it even on SIGKILL)."""
    make_run_dir(run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
        os.close(fd)
        raise SupervisorRunningError(
            f"a supervisor{holder} already runs the sandboxes of {run_dir}:"
            " stop it first (its sandboxes are taken back by the next one), or replace it"
            " with corral up --takeover"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(eq=False)
class Found:
    """A sandbox a previous supervisor left, as found."""

    sandbox: Sandbox
    instance: str
    """The instance's name (its events' ``sandbox``)."""
    index: int
    generation: int
    spec: dict[str, object]
    """Its spec as recorded (plain data), to tell whether the fleet changed it."""
    pipes: OutputPipes | None = None
    """The read ends of its stdout and stderr pipes, from the keeper (we
    are their reader now)."""
    late: bool = False
    """It had ended when found."""
    published: bool = False
    """Its ``exited`` is in the journal already."""
    created_seq: int = 0
    frozen: bool = False
    """Its cgroup was frozen when found: paused, or a checkpoint cut short."""
    interrupted: list[str] = field(default_factory=list)
    """Tags of its checkpoints that were being taken when the supervisor
    ended (their partial dumps are removed; it may still be frozen)."""

    def close_pipes(self) -> None:
        """Let go of the pipes (when nobody will read them)."""
        if self.pipes is not None:
            self.pipes.let_go_both()
        self.pipes = None


@dataclass
class Survey:
    """What a supervisor found at start-up (see :func:`survey`)."""

    current: dict[str, Found] = field(default_factory=dict)
    """By instance name: its newest generation."""
    sweep: list[Found] = field(default_factory=list)
    """Older generations: ended (or to be ended) and removed."""
    problems: list[str] = field(default_factory=list)
    """Records that could not be used (what was left of them is removed)."""
    swept: list[str] = field(default_factory=list)
    """Sandboxes without a record whose leftovers were removed (a supervisor
    killed while it was creating or removing them)."""


def survey(
    runtime: Runtime,
    keeper: Keeper,
    exit_published: Callable[[str, int, int], bool],
    owned: Callable[[str], bool],
) -> Survey:
    """Find the sandboxes a previous supervisor of *runtime*'s run
    directory left (blocking: run it in a thread).

    *exit_published(instance, generation, since_seq)* tells whether the
    journal has that generation's ``exited`` already; *owned(name)*
    whether a sandbox name without a record is one of this fleet's (its
    leftovers are then removed).
    """
    pipes, _ = keeper.held()
    out = Survey()
    for record in runtime.records():
        labels = record.get("labels")
        if not isinstance(labels, dict) or "instance" not in labels:
            continue  # not a fleet's (a `corral run`)
        try:
            sb = runtime.adopt(record)
            found = Found(
                sandbox=sb,
                instance=str(labels["instance"]),
                index=int(labels.get("index", 0)),
                generation=int(labels.get("generation", 0)),
                spec=dict(record["spec"]),
                pipes=pipes.pop(sb.name, None),
                created_seq=int(labels.get("created_seq", 0)),
            )
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            out.problems.append(str(exc))
            keeper.release(str(record.get("name", "")))
            continue
        found.late = sb.pidfd < 0 or has_exited(sb.pidfd)
        if not found.late:
            # Read here, in the survey's thread: not a thread hop per sandbox.
            with contextlib.suppress(CorralError, OSError):
                found.frozen = sb.cgroup.is_frozen()
        if found.late:
            found.published = exit_published(found.instance, found.generation, found.created_seq)
        other = out.current.get(found.instance)
        if other is None or other.generation < found.generation:
            if other is not None:
                out.sweep.append(other)
            out.current[found.instance] = found
        else:
            out.sweep.append(found)
    # Killed half way through a create or a removal: no record, but a
    # layer or a cgroup (perhaps with a process in it) of one of ours.
    # Checkpoints cut short by the supervisor's death: their CRIU finishes
    # (or is killed after a bound), their partial dumps go.
    for name in list(runtime.checkpoints.names()):
        tags = runtime.settle_checkpoints(name)
        found_now = out.current.get(name)
        if tags and found_now is not None:
            found_now.interrupted = tags
    out.swept = runtime.sweep(owned)
    # And what killed `corral run`s left (their sandboxes died with them).
    out.swept += runtime.sweep_claims()
    for key, left in pipes.items():
        # Held for a sandbox that has no record (its create failed while
        # its supervisor died): nothing to read them for.
        keeper.release(key)
        left.let_go_both()
    return out


def note_generation(state_dir: str, instance: str, generation: int) -> None:
    """Record that *instance*'s *generation* is being started, or made as a
    standby (blocking).

    A successor numbers the instance's next generation after it, even when
    nothing of this one is left: events name a generation once, across
    supervisors (a number may be skipped, never used twice). Atomic; not
    synced (a generation's number matters as long as the journal that
    names it, which is not synced either).
    """
    folder = os.path.join(state_dir, "generations")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    write_atomic(os.path.join(folder, instance), f"{generation}\n")


def last_generations(state_dir: str) -> dict[str, int]:
    """The last generation started of each instance (see :func:`note_generation`).

    Removes notes whose write a kill cut short: call it holding the run
    directory's lock."""
    folder = os.path.join(state_dir, "generations")
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            if entry.endswith(".tmp"):  # a note's write cut short by a kill
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry))
                continue
            with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, entry)) as f:
                out[entry] = int(f.read().strip())
    return out


def changed(found: Found, now: dict[str, object]) -> bool:
    """True if the fleet file's spec *now* (plain data) differs from the recorded one."""
    return _comparable(found.spec) != _comparable(now)


def _comparable(spec: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in spec.items() if k != "name"}


def spec_data(spec: object) -> dict[str, object]:
    """Plain data of a runtime spec, as records hold it."""
    import json

    from .._runtime._spec import SandboxSpec

    assert isinstance(spec, SandboxSpec)
    # Through JSON, as the record went: tuples become lists alike.
    data: dict[str, object] = json.loads(json.dumps(spec_to_dict(spec)))
    return data


def names(found: Iterable[Found]) -> list[str]:
    """Their sandboxes' names, for a report."""
    return sorted(f.sandbox.name for f in found)
