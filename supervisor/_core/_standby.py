"""Standby generations: an instance's next generation made up to its exec
while the current one runs, so that a restart is only an exec.

The restart plugin asks for one (its ``standby`` setting) each time a
generation starts: :meth:`Supervisor.keep_standby`. The standby is an
ordinary :meth:`Runtime.create` whose *gate* blocks, in a worker thread of
the ``standby`` limiter, until the instance's next generation is due:

- the instance is restarted: the generation takes the standby if it was
  made from the spec the generation would get (the same limits, image,
  settings: an ``on_oom`` grow or a ``corral update`` since makes it
  stale), says go, and the command is exec'd at once;
- anything else (a stale spec, a restore, a stop, the supervisor's end)
  calls it off: the runtime undoes it all, as a failed start.

Nothing of a standby outlives its supervisor: it has no record until it
runs (a successor never sees it), and its init, waiting on the spawn's
socket, exits when that closes; the start-up sweep removes what is left.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .._errors import CorralError
    from .._runtime._linux._spawn import OutputPipes
    from .._runtime._sandbox import Sandbox
    from .._runtime._spec import SandboxSpec

__all__ = ["Standby"]


class Standby:
    """One instance's next generation, made and waiting for its exec."""

    def __init__(self, generation: int, spec: SandboxSpec, labels: dict[str, Any]) -> None:
        self.generation = generation
        """The generation it will be."""
        self.spec = spec
        """The instance's spec for that generation, as it was when the
        standby was asked for (a restart uses it only if it is still so)."""
        self.labels = labels
        """Its record's labels: read when the record is written, after the
        go, so a generation fills in what it knows only then."""
        self.done = trio.Event()
        """Set once its create has returned or failed."""
        self.sandbox: Sandbox | None = None
        """The running sandbox, once it went and its command was exec'd."""
        self.pipes: OutputPipes | None = None
        """The read ends of its stdout and stderr, for the log pumps."""
        self.error: CorralError | None = None
        """Why it was not made, or did not start."""
        self._decided = threading.Event()
        self._go = False

    def gate(self) -> bool:
        """The runtime's gate (in the create's worker thread): wait for the
        decision; True to exec."""
        self._decided.wait()
        return self._go

    def decide(self, go: bool) -> None:
        """Start it (*go*) or call it off; only the first decision counts."""
        if not self._decided.is_set():
            self._go = go
            self._decided.set()

    @property
    def decided(self) -> bool:
        """Whether it was told to go or called off already."""
        return self._decided.is_set()
