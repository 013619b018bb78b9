"""What a sandbox is: its command, root file system, limits and environment.

The spec is plain, frozen data. Parsing of user text (``64M``, ``0.5``,
``K=V``) happens here, once, with errors that name the field; everything
below the spec may assume it is valid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .._errors import SpecError
from . import _units
from ._mounts import Mount, check_mounts, parse_user
from ._net._model import Port, check_ports, parse_egress, parse_network
from ._security import DEFAULT_SECURITY, Security

__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_PIDS",
    "Limits",
    "SandboxSpec",
    "parse_cpus",
    "parse_env",
    "parse_pids",
    "parse_size",
    "validate_name",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Below this a sandbox cannot even start its init; the kernel would OOM-kill
# it at once and the user would see a confusing exit 137.
MIN_MEMORY = 4 << 20


def parse_size(value: object, field: str = "memory", minimum: int = MIN_MEMORY) -> int:
    """Parse a byte size: ``64M``, ``1g``, ``512k``, ``1.5G`` or a plain number.

    Units are binary (``1M`` = 1 MiB), as in Docker (the grammar is
    :mod:`supervisor._runtime._units`'s). *minimum* defaults to the smallest
    memory limit a sandbox can start under.
    """
    return _units.parse_size(value, field, minimum=minimum)


def parse_cpus(value: str | float, field: str = "cpus") -> float:
    """Parse a CPU quota in CPUs: ``0.5`` is half of one CPU."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = float("nan")
    if isinstance(value, bool) or not n > 0 or n == float("inf"):
        raise SpecError(field, f"expected a positive number of CPUs like 0.5, got {value!r}")
    if n < 0.01:
        raise SpecError(field, f"expected at least 0.01 CPUs, got {value!r}")
    ncpu = os.cpu_count() or 1
    if n > ncpu:
        raise SpecError(field, f"expected at most {ncpu} (the CPUs of this machine), got {value!r}")
    return n


def parse_pids(value: str | int, field: str = "pids") -> int:
    """Parse a maximum number of tasks (processes and threads)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if isinstance(value, bool) or n < 2:
        # One for the init and one for the command at the very least.
        raise SpecError(field, f"expected a whole number of tasks >= 2, got {value!r}")
    return n


def parse_env(items: Sequence[str], field: str = "env") -> dict[str, str]:
    """Parse ``K=V`` items into a mapping (later items win)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not _ENV_KEY_RE.match(key) or "\0" in val:
            raise SpecError(field, f"expected KEY=VALUE, got {item!r}")
        env[key] = val
    return env


def validate_name(name: str, field: str = "name") -> str:
    """A sandbox name: letters, digits, ``_ . -``, at most 63 characters."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(
            field,
            f"expected 1-63 letters, digits, '_', '.' or '-' starting with a letter or digit,"
            f" got {name!r}",
        )
    return name


class Limits(NamedTuple):
    """Resource limits enforced through the sandbox's cgroup.

    ``None`` means unlimited. Swap is never allowed to hide a memory
    overrun: the limit covers memory and swap together.
    """

    memory: int | None = None
    """Bytes of memory (and memory+swap)."""
    cpus: float | None = None
    """CPU quota in CPUs (0.5 = half a CPU), enforced per 100 ms period."""
    pids: int | None = None
    """Maximum number of tasks (None: :data:`DEFAULT_PIDS`, see :meth:`effective`)."""

    def effective(self) -> Limits:
        """What the sandbox's cgroup enforces: these, with :data:`DEFAULT_PIDS`
        tasks if ``pids`` says nothing (a fork bomb stays inside by default)."""
        return self if self.pids is not None else self._replace(pids=DEFAULT_PIDS)


DEFAULT_PIDS = 4096
"""Tasks a sandbox may have when its limits say nothing. Set ``pids`` to
allow more."""

NO_LIMITS = Limits()
"""The default: nothing limited but the tasks (:data:`DEFAULT_PIDS`)."""


class _SpecFields(NamedTuple):
    name: str
    argv: tuple[str, ...]
    rootfs: str
    """A built-in base name (``busybox``) or a directory to use as the lower layer."""
    hostname: str | None
    """Defaults to the sandbox name (cut to a valid host name)."""
    env: Mapping[str, str]
    workdir: str
    limits: Limits
    security: Security
    """Capabilities and no_new_privs (Docker's defaults unless told otherwise)."""
    mounts: tuple[Mount, ...]
    """Volumes (host paths, named volumes) and tmpfs, parents first."""
    user: str | None
    """``UID[:GID]`` or ``NAME[:GROUP]`` the command runs as (None: the
    image's, else root)."""
    read_only: bool
    """The root file system is read-only (volumes and tmpfs are as given)."""
    network: str
    """``none`` (``lo`` only), ``bridge`` (an interface on corral's bridge,
    NAT to the outside) or ``host`` (the host's network: not isolated)."""
    ports: tuple[Port, ...]
    """Published ports (a bridged sandbox's): the host's, forwarded to it."""
    egress: tuple[str, ...] | None
    """Where a bridged sandbox may connect to: None (anywhere), or only to
    these ``HOST`` and ``HOST:PORT/PROTO`` (none if empty), HOST an
    ``ADDRESS/LEN`` or a host name (resolved when the sandbox starts)."""
    lxcfs: bool
    """Its ``/proc/meminfo``, ``cpuinfo``, ``stat``, ``uptime``... show its
    own limits and life, through lxcfs (docs/view.md), when lxcfs is there."""


def _egress(value: Sequence[str] | str | None, network: str) -> tuple[str, ...] | None:
    """The spec's egress (see :func:`parse_egress`); only a bridged sandbox
    has one to restrict."""
    egress = (
        None
        if value is None
        else parse_egress(list(value) if not isinstance(value, str) else value)
    )
    if egress is not None and network != "bridge":
        raise SpecError("egress", "only a sandbox with network = 'bridge' has egress to restrict")
    return egress


class SandboxSpec(_SpecFields):
    """Everything needed to create one sandbox; validated on construction.

    A frozen record (a named tuple: dataclasses would cost the CLI ~6 ms of
    imports on every ``corral run``).
    """

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        argv: Sequence[str],
        rootfs: str = "busybox",
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str = "/",
        limits: Limits = NO_LIMITS,
        security: Security = DEFAULT_SECURITY,
        mounts: Sequence[Mount] = (),
        user: str | None = None,
        read_only: bool = False,
        network: str = "none",
        ports: Sequence[Port] = (),
        egress: Sequence[str] | str | None = None,
        lxcfs: bool = True,
    ) -> SandboxSpec:
        validate_name(name)
        argv = tuple(argv)
        if not argv or not argv[0]:
            raise SpecError("command", "expected a command to run, got nothing")
        if any("\0" in a for a in argv):
            raise SpecError("command", "arguments cannot contain NUL bytes")
        if hostname is not None and not _HOSTNAME_RE.match(hostname):
            raise SpecError(
                "hostname",
                f"expected a host name like 'web-1' (letters, digits, '-'), got {hostname!r}",
            )
        if not workdir.startswith("/") or "\0" in workdir:
            raise SpecError("workdir", f"expected an absolute path, got {workdir!r}")
        env = dict(env or {})
        for key in env:
            if not _ENV_KEY_RE.match(key):
                raise SpecError("env", f"expected KEY=VALUE, got key {key!r}")
        mounts = check_mounts(mounts)
        if user is not None:
            parse_user(user)
        return super().__new__(
            cls,
            name,
            argv,
            rootfs,
            hostname,
            env,
            workdir,
            limits,
            security,
            mounts,
            user,
            bool(read_only),
            parse_network(network),
            check_ports(ports, network),
            _egress(egress, network),
            bool(lxcfs),
        )

    @property
    def effective_hostname(self) -> str:
        """The host name the sandbox sees."""
        if self.hostname:
            return self.hostname
        h = re.sub(r"[^A-Za-z0-9-]", "-", self.name)[:63].strip("-")
        return h or "sandbox"

    def environment(self, image_user: str | None = None) -> dict[str, str]:
        """The command's environment: sane defaults overridden by ``env``.

        HOME is /root for root. For another user (the spec's, else the
        image's *image_user*) it is left out, for the sandbox to set from
        its own ``/etc/passwd`` (as Docker does), unless ``env`` sets it.
        """
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": self.effective_hostname}
        user = self.user or image_user
        if user is None or user.partition(":")[0] in ("0", "root"):
            env["HOME"] = "/root"
        env.update(self.env)
        return env
