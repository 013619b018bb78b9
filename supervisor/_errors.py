"""The supervisor's exceptions.

::

    CorralError                  every error corral raises on purpose
    ├── SpecError                bad input: a field or argument and what was expected
    ├── NotPermittedError        corral was not run as root
    ├── SandboxError             a sandbox could not be created, run or cleaned up
    │   ├── SandboxExistsError   the name is in use
    │   ├── CommandNotFoundError the command does not exist in the sandbox (exit 127)
    │   ├── CommandNotExecutableError  it exists but cannot be run (exit 126)
    │   └── CheckpointError      a checkpoint or restore failed (CRIU's reason)
    │       └── CriuUnavailableError  CRIU is missing or 'criu check' fails
    ├── StateError               a verb the sandbox's state does not allow (pause a stopped one)
    └── CgroupError              the cgroup file system refused an operation

``OSError`` from the kernel is translated at the boundary (``raise ... from
exc``), so the message names the sandbox, the path and the operation.
"""

from __future__ import annotations

__all__ = [
    "CgroupError",
    "CheckpointError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "CorralError",
    "CriuUnavailableError",
    "NotPermittedError",
    "SandboxError",
    "SandboxExistsError",
    "SpecError",
    "StateError",
    "os_failure",
]


class CorralError(Exception):
    """Base class of every error corral raises on purpose.

    ``str(err)`` is a complete one-line message meant for a user.
    """


class SpecError(CorralError, ValueError):
    """A sandbox spec, option or argument is invalid.

    The message names the field and says what was expected, e.g.
    ``memory: expected a size like 64M or 1G, got '12Q'``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotPermittedError(CorralError):
    """corral needs root: namespaces, mounts and cgroups are privileged."""


class SandboxError(CorralError):
    """A sandbox could not be created, started, run or cleaned up."""


class SandboxExistsError(SandboxError):
    """Another sandbox already uses this name."""


class CommandNotFoundError(SandboxError):
    """The command does not exist inside the sandbox's root file system."""


class CommandNotExecutableError(SandboxError):
    """The command exists inside the sandbox but cannot be executed."""


class CgroupError(CorralError):
    """A cgroup operation failed; the message names the path and operation."""


class CheckpointError(SandboxError):
    """A checkpoint or restore failed; the message quotes CRIU's reason.

    The sandbox is left as it was: still running after a failed
    checkpoint, not created after a failed restore.
    """


class CriuUnavailableError(CheckpointError):
    """CRIU is not installed, or ``criu check`` fails on this kernel."""


class StateError(CorralError):
    """A verb was asked of an instance in a state that does not allow it
    (see :mod:`supervisor._core._states`): ``verb``, ``name`` and ``state`` say which."""

    def __init__(self, verb: str, name: str, state: str, detail: str) -> None:
        super().__init__(f"cannot {verb} {name!r}: {detail}")
        self.verb = verb
        self.name = name
        self.state = state


def os_failure(exc: OSError) -> str:
    """An ``OSError`` as a message's tail: the path, if it has one, and the
    reason, e.g. ``/run/corral/sandboxes/web-0.json: No space left on device``."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason
