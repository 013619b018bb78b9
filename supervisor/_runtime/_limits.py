"""Resource limits: what a sandbox's cgroup enforces, and the grammar of each key.

One table of keys serves every way in (fleet files, ``corral run`` and
``corral update`` options, the control socket, the plugin handle): each key
has one parser, whose errors name the key and say what was expected
(``cpu_weight: expected a whole number from 1 to 10000, got '0'``).

The scales are cgroup v2's, whatever the host's layout; the v1 backend
converts (see :mod:`supervisor._runtime._linux._cgroups` and
``docs/fleet.md``). Whether a layout can enforce a key at all is the
backend's to say (``Cgroups.check``): never silently ignored.

Nothing here imports more than ``os``, ``re`` and ``stat``: ``corral run``
parses its options through this module on every start.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence

from .._errors import SpecError
from . import _units

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._tuples import NamedTuple

__all__ = [
    "DEFAULT_PIDS",
    "DEFAULT_WEIGHT",
    "DEVICE_KEYS",
    "KEYS",
    "LIVE_KEYS",
    "MIN_MEMORY",
    "NO_LIMITS",
    "STALL_WINDOW_US",
    "DeviceRates",
    "Limits",
    "block_device",
    "check_limits",
    "cpu_shares",
    "format_list",
    "key_data",
    "key_from_data",
    "limits_from",
    "parse_cpus",
    "parse_device_rates",
    "parse_limit",
    "parse_list",
    "parse_pids",
    "parse_size",
]

# Below this a sandbox cannot even start its init; the kernel would OOM-kill
# it at once and the user would see a confusing exit 137.
MIN_MEMORY = 4 << 20

DEFAULT_PIDS = 4096
"""Tasks a sandbox may have when its limits say nothing. Set ``pids`` to
allow more."""

DEFAULT_WEIGHT = 100
"""The weight (``cpu_weight``, ``io_weight``) of a sandbox that sets none:
cgroup v2's default, and v1's 1024 CPU shares."""

MAX_WEIGHT = 10000

DeviceRates = tuple[tuple[str, int], ...]
"""Per-device rates: ``(("MAJ:MIN", value), ...)`` sorted by device."""

DEVICE_KEYS = ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
"""The per-device I/O limits (bytes or operations per second)."""

_UNLIMITED = ("max", "unlimited")


class Limits(NamedTuple):
    """Resource limits enforced through the sandbox's cgroup.

    ``None`` means unlimited (or, for a weight, the default). Swap is never
    allowed to hide a memory overrun unless ``memory_swap`` says so: by
    default the memory limit covers memory and swap together.
    """

    memory: int | None = None
    """Bytes of memory (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    cpus: float | None = None
    """CPU quota in CPUs (0.5 = half a CPU), enforced per 100 ms period."""
    pids: int | None = None
    """Maximum number of tasks (None: :data:`DEFAULT_PIDS`, see :meth:`effective`)."""
    memory_high: int | None = None
    """Bytes above which the sandbox is throttled and reclaimed, not killed
    (v2 ``memory.high``; v1 ``memory.soft_limit_in_bytes``, weaker: only
    applied when the host runs short of memory)."""
    memory_swap: int | None = 0
    """Bytes of swap allowed on top of ``memory`` (0: none, the default;
    None: unlimited). Only with ``memory``."""
    cpu_weight: int | None = None
    """CPU weight against other sandboxes, 1-10000 (None: 100); v1 shares = weight * 10.24."""
    cpuset_cpus: str | None = None
    """The CPUs it may run on, as a list (``0-2,5``); None: the parent's."""
    cpuset_mems: str | None = None
    """The memory nodes it may allocate on (``0``); None: the parent's."""
    io_weight: int | None = None
    """Block I/O weight, 1-10000 (None: 100; v1's BFQ takes 1-1000)."""
    io_read_bps: DeviceRates = ()
    """Bytes per second read, per device."""
    io_write_bps: DeviceRates = ()
    """Bytes per second written, per device."""
    io_read_iops: DeviceRates = ()
    """Read operations per second, per device."""
    io_write_iops: DeviceRates = ()
    """Write operations per second, per device."""
    oom_group: bool = False
    """An OOM kill kills every process of the sandbox, never a lone worker
    (v2 ``memory.oom.group``; cgroup v1 has no such thing)."""
    memory_stall: int | None = None
    """Microseconds per second that the sandbox's tasks may stall waiting
    for memory before a ``memory_pressure`` event (level ``stall``) says so:
    a PSI trigger on v2 ``memory.pressure`` (``some``, 1 s window). Not a
    limit but a watch; None: not watched (each trigger costs the kernel a
    polling thread per cgroup, so it is asked for, not given to all)."""

    def effective(self) -> Limits:
        """What the sandbox's cgroup enforces: these, with :data:`DEFAULT_PIDS`
        tasks if ``pids`` says nothing (a fork bomb stays inside by default)."""
        return self if self.pids is not None else self._replace(pids=DEFAULT_PIDS)

    @property
    def swap_limit(self) -> int | None:
        """Bytes of swap the cgroup allows: None (unlimited) without a memory
        limit or with ``memory_swap`` unlimited."""
        return None if self.memory is None else self.memory_swap

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON): ``memory``, ``cpus`` and ``pids`` always, the
        other keys only where they differ from the default (so that a
        record or checkpoint without them reads as it always did)."""
        out: dict[str, Any] = {"memory": self.memory, "cpus": self.cpus, "pids": self.pids}
        for key, default in _DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                out[key] = [list(pair) for pair in value] if key in DEVICE_KEYS else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Inverse of :meth:`to_dict` (missing keys: their defaults).
        Raises TypeError or ValueError on data it cannot use."""
        kw = dict(data)
        for key in DEVICE_KEYS:
            if key in kw:
                kw[key] = tuple(sorted((str(d), int(v)) for d, v in kw[key]))
        limits = cls(**kw)
        return check_limits(limits)

    def changed(self, other: Limits) -> list[str]:
        """The keys whose values differ between these limits and *other*."""
        return [k for k in self._fields if getattr(self, k) != getattr(other, k)]

    def updated(self, changes: Mapping[str, Any]) -> Limits:
        """These limits with *changes* (parsed values, see :func:`parse_limit`)
        applied: a per-device key changes only the devices it names (a
        ``None`` rate removes that device's limit). Checked again whole."""
        kw: dict[str, Any] = {}
        for key, value in changes.items():
            if key in DEVICE_KEYS:
                rates = dict(getattr(self, key))
                for device, rate in value:
                    if rate is None:
                        rates.pop(device, None)
                    else:
                        rates[device] = rate
                kw[key] = tuple(sorted(rates.items()))
            else:
                kw[key] = value
        return check_limits(self._replace(**kw))

    def event_values(self, key: str) -> dict[str, int | None]:
        """The values of *key* as ``limit_changed`` carries them, by device
        (``""`` for a key that is not per device): bytes, millicpus, tasks,
        weights, or None for unlimited."""
        if key in DEVICE_KEYS:
            return {d: v for d, v in getattr(self, key)}
        if key == "cpus":
            return {"": None if self.cpus is None else round(self.cpus * 1000)}
        if key == "pids":
            return {"": self.effective().pids}
        if key in ("cpu_weight", "io_weight"):
            value = getattr(self, key)
            return {"": DEFAULT_WEIGHT if value is None else value}
        value = getattr(self, key)
        return {"": int(value) if value is not None else None}


_DEFAULTS: dict[str, Any] = {
    k: v for k, v in Limits._field_defaults.items() if k not in ("memory", "cpus", "pids")
}

NO_LIMITS = Limits()
"""The default: nothing limited but the tasks (:data:`DEFAULT_PIDS`)."""


def check_limits(limits: Limits) -> Limits:
    """The rules between keys; raises :class:`SpecError` naming the key."""
    high, memory = limits.memory_high, limits.memory
    if high is not None and memory is not None and high > memory:
        raise SpecError(
            "memory_high",
            f"expected at most memory ({_units.format_size(memory)}),"
            f" got {_units.format_size(high)}",
        )
    if limits.memory is None and limits.memory_swap != 0:
        raise SpecError(
            "memory_swap", "needs memory: it is the swap allowed on top of the memory limit"
        )
    return limits


def cpu_shares(weight: int | None) -> int:
    """cgroup v1 ``cpu.shares`` for a v2 weight, as systemd converts:
    100 (the default) is 1024 shares, linearly, at least 2."""
    w = DEFAULT_WEIGHT if weight is None else weight
    return max(2, min(262144, w * 1024 // DEFAULT_WEIGHT))


# -- one parser per key ----------------------------------------------------------


def parse_size(value: object, field: str = "memory", minimum: int = MIN_MEMORY) -> int:
    """Parse a byte size: ``64M``, ``1g``, ``512k``, ``1.5G`` or a plain number.

    Units are binary (``1M`` = 1 MiB), as in Docker (the grammar is
    :mod:`supervisor._runtime._units`'s). *minimum* defaults to the smallest
    memory limit a sandbox can start under.
    """
    return _units.parse_size(value, field, minimum=minimum)


def parse_cpus(value: object, field: str = "cpus") -> float:
    """Parse a CPU quota in CPUs: ``0.5`` is half of one CPU."""
    try:
        n = float(value) if isinstance(value, str | int | float) else float("nan")
    except ValueError:
        n = float("nan")
    if isinstance(value, bool) or not n > 0 or n == float("inf"):
        raise SpecError(field, f"expected a positive number of CPUs like 0.5, got {value!r}")
    if n < 0.01:
        raise SpecError(field, f"expected at least 0.01 CPUs, got {value!r}")
    ncpu = os.cpu_count() or 1
    if n > ncpu:
        raise SpecError(field, f"expected at most {ncpu} (the CPUs of this machine), got {value!r}")
    return n


def parse_pids(value: object, field: str = "pids") -> int:
    """Parse a maximum number of tasks (processes and threads)."""
    n = -1
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    if n < 2:
        # One for the init and one for the command at the very least.
        raise SpecError(field, f"expected a whole number of tasks >= 2, got {value!r}")
    return n


def _whole(value: object, field: str, low: int, high: int, what: str) -> int:
    n = -1
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    if not low <= n <= high:
        raise SpecError(field, f"expected {what} from {low} to {high}, got {value!r}")
    return n


def _weight(value: object, field: str) -> int:
    return _whole(value, field, 1, MAX_WEIGHT, "a whole number")


def _unlimited(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() in _UNLIMITED


def _memory_or_max(value: object, field: str) -> int | None:
    return None if _unlimited(value) else parse_size(value, field)


def _swap(value: object, field: str) -> int | None:
    """``memory_swap``: a size (``0``: no swap) or ``unlimited``."""
    if _unlimited(value):
        return None
    try:
        return _units.parse_size(value, field, minimum=0)
    except SpecError:
        raise SpecError(
            field, f"expected a size like 1G, 0 (no swap) or unlimited, got {value!r}"
        ) from None


def _cpus_or_max(value: object, field: str) -> float | None:
    return None if _unlimited(value) else parse_cpus(value, field)


STALL_WINDOW_US = 1_000_000
"""The PSI window of ``memory_stall``: stall time is counted per second."""


def _stall(value: object, field: str) -> int:
    """``memory_stall``: a duration below the 1 s window (``"100ms"``), in µs."""
    seconds = _units.parse_duration(value, field, maximum=1.0)
    us = round(seconds * 1_000_000)
    if not 1000 <= us < STALL_WINDOW_US:
        raise SpecError(
            field,
            f"expected a stall time per second from 1ms to 999ms (e.g. 100ms), got {value!r}",
        )
    return us


def _stall_or_off(value: object, field: str) -> int | None:
    return (
        None if isinstance(value, str) and value.strip().lower() == "off" else _stall(value, field)
    )


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(field, f"expected true or false, got {value!r}")
    return value


def _online(path: str) -> set[int]:
    try:
        with open(path) as f:
            return _list_members(f.read().strip(), "", "")
    except (OSError, SpecError):
        return set()


def _list_members(text: str, field: str, what: str) -> set[int]:
    """The numbers of a kernel list (``0-3,8,10-11``)."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.match(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise SpecError(field, f"expected a list of {what} like 0-2,5, got {text!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last - first > 65536:
            raise SpecError(field, f"expected a list of {what} like 0-2,5, got {text!r}")
        out.update(range(first, last + 1))
    return out


def format_list(members: Iterable[int]) -> str:
    """Numbers as a kernel list, ranges joined: ``{0, 1, 2, 5}`` is ``0-2,5``."""
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(set(members)):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def parse_list(value: object, field: str, what: str) -> set[int]:
    """A kernel list given as a string (``"0-2,5"``) or one number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return {value}
    if not isinstance(value, str) or not value.strip():
        raise SpecError(field, f"expected a list of {what} like 0-2,5, got {value!r}")
    return _list_members(value, field, what)


def _cpuset(value: object, field: str, what: str, online: str) -> str:
    members = parse_list(value, field, what)
    host = _online(online)
    if host and not members <= host:
        raise SpecError(
            field, f"expected {what} of this machine ({format_list(host)}), got {value!r}"
        )
    return format_list(members)


def _cpuset_cpus(value: object, field: str) -> str:
    return _cpuset(value, field, "CPUs", "/sys/devices/system/cpu/online")


def _cpuset_mems(value: object, field: str) -> str:
    return _cpuset(value, field, "memory nodes", "/sys/devices/system/node/online")


def block_device(text: str, field: str) -> str:
    """``MAJ:MIN`` of a block device given by path or as ``MAJ:MIN``."""
    if re.match(r"^\d+:\d+$", text):
        if not os.path.exists(f"/sys/dev/block/{text}"):
            raise SpecError(field, f"no block device {text} on this host")
        return text
    if not text.startswith("/"):
        raise SpecError(
            field, f"expected a block device as a path (/dev/sda) or MAJ:MIN, got {text!r}"
        )
    try:
        st = os.stat(text)
    except OSError as exc:
        raise SpecError(field, f"{text}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise SpecError(field, f"expected a block device, but {text} is not one")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def parse_device_rates(
    value: object, field: str, *, iops: bool = False, allow_max: bool = False
) -> tuple[tuple[str, int | None], ...]:
    """Per-device rates: a mapping of device to rate (a fleet table, a
    control request) or ``DEVICE:RATE`` strings (command-line options).
    A device is a path (``/dev/sda``) or ``MAJ:MIN``; a rate is a size
    per second (``10M``), or with *iops* a whole number. With
    *allow_max*, ``max`` removes a device's limit (``None``)."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = []
        for item in value:
            device, sep, rate = str(item).rpartition(":")
            if not sep or not device:
                raise SpecError(field, f"expected DEVICE:RATE like /dev/sda:10M, got {item!r}")
            items.append((device, rate))
    else:
        raise SpecError(
            field, f'expected a table of device = rate like {{ "/dev/sda" = "10M" }}, got {value!r}'
        )
    out: dict[str, int | None] = {}
    for device, rate in items:
        dev = block_device(device, field)
        where = f"{field}: {device}"
        if allow_max and _unlimited(rate):
            out[dev] = None
        elif iops:
            out[dev] = _whole(rate, where, 1, 1 << 40, "a whole number of operations")
        else:
            out[dev] = _units.parse_size(rate, where)
    return tuple(sorted(out.items()))


def _bytes(value: object, field: str) -> DeviceRates:
    return tuple((d, r) for d, r in parse_device_rates(value, field) if r is not None)


def _ios(value: object, field: str) -> DeviceRates:
    return tuple((d, r) for d, r in parse_device_rates(value, field, iops=True) if r is not None)


_PARSERS: dict[str, Any] = {
    "memory": parse_size,
    "cpus": parse_cpus,
    "pids": parse_pids,
    "memory_high": parse_size,
    "memory_swap": _swap,
    "cpu_weight": _weight,
    "cpuset_cpus": _cpuset_cpus,
    "cpuset_mems": _cpuset_mems,
    "io_weight": _weight,
    "io_read_bps": _bytes,
    "io_write_bps": _bytes,
    "io_read_iops": _ios,
    "io_write_iops": _ios,
    "oom_group": _bool,
    "memory_stall": _stall,
}

KEYS = tuple(Limits._fields)
"""Every limit key, as fleet files name them."""

_LIVE_PARSERS: dict[str, Any] = {
    "memory": _memory_or_max,
    "cpus": _cpus_or_max,
    "pids": parse_pids,
    "memory_high": _memory_or_max,
    "memory_swap": _swap,
    "cpu_weight": _weight,
    "io_weight": _weight,
    "io_read_bps": lambda v, f: parse_device_rates(v, f, allow_max=True),
    "io_write_bps": lambda v, f: parse_device_rates(v, f, allow_max=True),
    "io_read_iops": lambda v, f: parse_device_rates(v, f, iops=True, allow_max=True),
    "io_write_iops": lambda v, f: parse_device_rates(v, f, iops=True, allow_max=True),
    "memory_stall": _stall_or_off,
}

LIVE_KEYS = tuple(_LIVE_PARSERS)
"""The keys a running sandbox's limits can be changed by (``corral update``):
not the cpuset (a v1 cpuset cgroup is made with the sandbox) nor oom_group."""


def parse_limit(key: str, value: object, *, live: bool = False, field: str | None = None) -> Any:
    """Parse *value* of limit *key* (errors name *field*, default the key).

    *live* is the grammar of a change to a running sandbox's limits:
    ``max`` (or ``unlimited``) lifts ``memory``, ``memory_high`` and
    ``cpus``, and a device rate of ``max`` removes that device's limit."""
    table = _LIVE_PARSERS if live else _PARSERS
    parser = table.get(key)
    if parser is None:
        expected = ", ".join(table)
        why = "cannot be changed on a running sandbox" if live and key in _PARSERS else None
        raise SpecError(key, why or f"not a limit (expected one of: {expected})")
    return parser(value, field or key)


def key_data(key: str, value: Any) -> Any:
    """One key's value as plain (JSON) data: per-device rates as lists."""
    return [list(pair) for pair in value] if key in DEVICE_KEYS else value


def key_from_data(key: str, data: Any) -> Any:
    """Inverse of :func:`key_data`; raises TypeError or ValueError on data
    that is not such a value (and SpecError for a key that is not a limit)."""
    if key not in KEYS:
        raise SpecError(key, "not a limit")
    if key in DEVICE_KEYS:
        return tuple(sorted((str(d), int(v)) for d, v in data))
    if key == "cpus":
        return None if data is None else float(data)
    if key == "oom_group":
        return bool(data)
    if key in ("cpuset_cpus", "cpuset_mems"):
        return None if data is None else str(data)
    return None if data is None else int(data)


def limits_from(values: Mapping[str, Any]) -> Limits:
    """Limits from parsed values by key (a missing key keeps its default)."""
    return check_limits(Limits(**values))
