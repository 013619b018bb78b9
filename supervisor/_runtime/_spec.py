"""What a sandbox is: its command, root file system, limits and environment.

The spec is plain, frozen data. Parsing of user text (``64M``, ``0.5``,
``K=V``) happens here, once, with errors that name the field; everything
below the spec may assume it is valid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .._errors import SpecError
from ._limits import (
    DEFAULT_PIDS,
    MIN_MEMORY,
    NO_LIMITS,
    Limits,
    check_limits,
    parse_cpus,
    parse_pids,
    parse_size,
)
from ._mounts import Mount, check_mounts, parse_user
from ._net._model import Port, check_ports, is_bridged, parse_egress, parse_network
from ._security import DEFAULT_SECURITY, Security

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ._tuples import NamedTuple

__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_PIDS",
    "MIN_MEMORY",
    "NO_LIMITS",
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
    """``none`` (``lo`` only), ``bridge`` (an interface on corral's default
    network's bridge, NAT to the outside), a declared network's name (an
    interface on its bridge), ``host`` (the host's network: not isolated),
    or ``sandbox:NAME`` (the network namespace of the running sandbox NAME)."""
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
    if egress is not None and not is_bridged(network):
        raise SpecError(
            "egress",
            "only a bridged sandbox (network = 'bridge' or a network's name) has egress"
            " to restrict",
        )
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
        check_limits(limits)
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
