"""corral's supervisor: sandboxes, their runtime on Linux, and the CLI.

Importing this package is cheap: every name but the errors is loaded on
first access, so a one-shot CLI verb (``corral pause``) pays only for what
it uses, and nothing here imports trio. The public names:

- :class:`SandboxSpec`, :class:`Limits` and the ``parse_*`` helpers: what a
  sandbox is, validated with errors that name the field; sizes and
  durations have one grammar everywhere (:func:`parse_size`,
  :func:`parse_duration`).
- :class:`Runtime`: creates sandboxes on this host; :class:`Sandbox` is a
  live one, :class:`SandboxExit` how it ended; :class:`ExecProcess` a
  process added to a running one (:meth:`Runtime.exec`).
- :class:`Keeper`: the fork server a multi-threaded program spawns through.
- :class:`Supervisor` (runs a :class:`Fleet` in a trio nursery),
  :func:`load_fleet`, :func:`parse_fleet`, :class:`FleetError`.
- :data:`ENTRY_POINT_GROUP`: the entry point group the supervisor finds
  plugins in by name (``corral.plugins``); ``plugins`` re-exports it, as the
  supervisor never imports the plugins package.
- The exception tree rooted at :class:`CorralError` (see ``_errors``).
"""

from __future__ import annotations

from ._errors import CgroupError as CgroupError
from ._errors import CheckpointError as CheckpointError
from ._errors import CommandNotExecutableError as CommandNotExecutableError
from ._errors import CommandNotFoundError as CommandNotFoundError
from ._errors import CorralError as CorralError
from ._errors import CriuUnavailableError as CriuUnavailableError
from ._errors import NotPermittedError as NotPermittedError
from ._errors import SandboxError as SandboxError
from ._errors import SandboxExistsError as SandboxExistsError
from ._errors import SpecError as SpecError
from ._errors import StateError as StateError
from ._version import __version__ as __version__

# typing.TYPE_CHECKING without importing typing, which costs a one-shot
# CLI verb ~4 ms (and imports re); type checkers treat any TYPE_CHECKING
# as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from ._control._service import Supervisor as Supervisor
    from ._core._fleet import Fleet as Fleet
    from ._core._fleet import FleetError as FleetError
    from ._core._fleet import SandboxConfig as SandboxConfig
    from ._core._fleet import load_fleet as load_fleet
    from ._core._fleet import parse_fleet as parse_fleet
    from ._core._instance import Instance as Instance
    from ._core._plugin_group import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
    from ._runtime._checkpoint import CheckpointInfo as CheckpointInfo
    from ._runtime._linux._cgroups import CgroupStats as CgroupStats
    from ._runtime._linux._spawn import Keeper as Keeper
    from ._runtime._sandbox import ExecProcess as ExecProcess
    from ._runtime._sandbox import Runtime as Runtime
    from ._runtime._sandbox import Sandbox as Sandbox
    from ._runtime._sandbox import SandboxExit as SandboxExit
    from ._runtime._spec import Limits as Limits
    from ._runtime._spec import SandboxSpec as SandboxSpec
    from ._runtime._spec import parse_cpus as parse_cpus
    from ._runtime._spec import parse_env as parse_env
    from ._runtime._spec import parse_pids as parse_pids
    from ._runtime._spec import parse_size as parse_size
    from ._runtime._units import parse_duration as parse_duration

_LAZY = {
    "CgroupStats": "_runtime._linux._cgroups",
    "Keeper": "_runtime._linux._spawn",
    "ExecProcess": "_runtime._sandbox",
    "Runtime": "_runtime._sandbox",
    "Sandbox": "_runtime._sandbox",
    "SandboxExit": "_runtime._sandbox",
    "Limits": "_runtime._spec",
    "SandboxSpec": "_runtime._spec",
    "parse_cpus": "_runtime._spec",
    "parse_env": "_runtime._spec",
    "parse_pids": "_runtime._spec",
    "parse_size": "_runtime._spec",
    "parse_duration": "_runtime._units",
    "CheckpointInfo": "_runtime._checkpoint",
    "Fleet": "_core._fleet",
    "FleetError": "_core._fleet",
    "SandboxConfig": "_core._fleet",
    "load_fleet": "_core._fleet",
    "parse_fleet": "_core._fleet",
    "ENTRY_POINT_GROUP": "_core._plugin_group",
    "Instance": "_core._instance",
    "Supervisor": "_control._service",
}


if not TYPE_CHECKING:
    # Hidden from type checkers: they see the imports above, so a misspelt
    # name (``supervisor.Runtim``) is an error for them, not an Any.

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


__all__ = [
    "ENTRY_POINT_GROUP",
    "CgroupError",
    "CgroupStats",
    "CheckpointError",
    "CheckpointInfo",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "CorralError",
    "CriuUnavailableError",
    "ExecProcess",
    "Fleet",
    "FleetError",
    "Instance",
    "Keeper",
    "Limits",
    "NotPermittedError",
    "Runtime",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxExistsError",
    "SandboxExit",
    "SandboxSpec",
    "SpecError",
    "StateError",
    "Supervisor",
    "__version__",
    "load_fleet",
    "parse_cpus",
    "parse_duration",
    "parse_env",
    "parse_fleet",
    "parse_pids",
    "parse_size",
]
