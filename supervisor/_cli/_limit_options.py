"""The limit options ``corral run`` and ``corral update`` share.

One option per limit key (``--cpu-weight`` is ``cpu_weight``), parsed by
the key's own parser (:func:`supervisor._runtime._limits.parse_limit`), so
that a bad value is the same one line everywhere, naming the option.
Imports nothing at the top (argparse and typing for annotations only):
``corral update`` shares a module with the control verbs, which run
without argparse.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from ._arguments import Arg

__all__ = ["add_limit_options", "limit_args", "limit_values", "option_error"]

_SCALARS = (
    ("memory", "SIZE", "memory limit, e.g. 64M or 1G (swap: --memory-swap)"),
    ("memory-high", "SIZE", "throttle and reclaim above this, never kill (v1: a soft limit)"),
    (
        "memory-swap",
        "SIZE",
        "swap allowed on top of --memory: 0 (the default: none), a size, or unlimited",
    ),
    ("cpus", "N", "CPU quota in CPUs, e.g. 0.5"),
    ("cpu-weight", "N", "CPU weight against other sandboxes, 1-10000 (default 100)"),
    ("pids", "N", "maximum number of tasks, e.g. 64"),
    ("io-weight", "N", "block I/O weight, 1-10000 (default 100; v1: up to 1000)"),
)
_SETS = (
    ("cpuset-cpus", "LIST", "CPUs it may run on, e.g. 0-1,3"),
    ("cpuset-mems", "LIST", "memory nodes it may allocate on, e.g. 0"),
)
_DEVICES = (
    ("io-read-bps", "DEVICE:RATE", "read bytes per second from a block device, e.g. /dev/sda:10M"),
    ("io-write-bps", "DEVICE:RATE", "written bytes per second, e.g. 8:0:10M"),
    ("io-read-iops", "DEVICE:N", "read operations per second"),
    ("io-write-iops", "DEVICE:N", "write operations per second"),
)


def limit_args(*, live: bool = False) -> list[Arg]:
    """The options of every limit key (*live*: those ``update`` can change),
    declared for :mod:`._arguments` (``corral run`` reads them without
    argparse)."""
    from ._arguments import Arg

    more = " (max: unlimited)" if live else ""
    args = []
    for name, metavar, what in _SCALARS:
        unlimited = more if live and name in ("memory", "memory-high", "cpus") else ""
        args.append(Arg(f"--{name}", metavar=metavar, help=what + unlimited))
    if not live:
        args += [Arg(f"--{name}", metavar=metavar, help=what) for name, metavar, what in _SETS]
    for name, metavar, what in _DEVICES:
        lifts = "; RATE max lifts the device's limit" if live else ""
        args.append(
            Arg(f"--{name}", kind="append", metavar=metavar, help=what + lifts + " (repeatable)")
        )
    if live:
        # A watch for memory_pressure events: only a supervisor publishes
        # them, so `corral run` has no such option (a fleet file has the key).
        args.append(
            Arg(
                "--memory-stall",
                metavar="TIME",
                help="a memory_pressure event when tasks wait for memory longer than TIME"
                " in a second, e.g. 100ms (cgroup v2; off: none)",
            )
        )
    else:
        args.append(
            Arg(
                "--oom-group",
                kind="flag",
                help="an OOM kill kills the whole sandbox, never a lone worker (cgroup v2)",
            )
        )
    return args


def add_limit_options(parser: argparse.ArgumentParser, *, live: bool = False) -> None:
    """The options of every limit key (*live*: those ``update`` can change)."""
    for arg in limit_args(live=live):
        arg.add_to(parser)


def option_error(exc: Exception) -> Exception:
    """A SpecError about a limit key, said about its option instead."""
    from .._errors import SpecError
    from .._runtime._limits import KEYS

    key, _, rest = exc.field.partition(": ") if isinstance(exc, SpecError) else ("", "", "")
    if isinstance(exc, SpecError) and key in KEYS:
        option = "--" + key.replace("_", "-")
        message = str(exc).split(": ", 1)[1]
        return SpecError(f"{option}: {rest}" if rest else option, message)
    return exc


def limit_values(args: argparse.Namespace, *, live: bool = False) -> dict[str, Any]:
    """The parsed value of each limit option given, by key. Raises SpecError
    naming the option."""
    from .._errors import SpecError
    from .._runtime._limits import KEYS, LIVE_KEYS, parse_limit

    out: dict[str, Any] = {}
    for key in LIVE_KEYS if live else KEYS:
        value = getattr(args, key, None)
        if value is None or value is False:
            continue
        option = "--" + key.replace("_", "-")
        try:
            out[key] = parse_limit(key, value, live=live, field=option)
        except SpecError as exc:
            raise option_error(exc) from None
    return out
