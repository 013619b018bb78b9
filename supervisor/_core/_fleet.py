"""Fleet specs: a TOML file describing many sandboxes (see docs/fleet.md).

Parsing is strict: unknown keys are errors, types are checked, and every
problem is reported as one line naming the sandbox and the field, e.g.
``sandbox 'web': memory: expected a size like 64M or 1G, got '12Q'``. All
problems of a file are collected, so a user fixes them in one go.
"""

from __future__ import annotations

import grp
import os
import re
import stat
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._errors import CorralError, SpecError
from .._runtime._limits import KEYS as LIMIT_KEYS
from .._runtime._limits import limits_from, parse_limit
from .._runtime._mounts import Mount, parse_tmpfs, parse_user, parse_volume
from .._runtime._net import (
    NetworkDecl,
    Port,
    check_decls,
    network_name,
    parse_egress,
    parse_network,
    parse_network_decl,
    parse_port,
)
from .._runtime._seccomp import parse_seccomp
from .._runtime._security import (
    DEFAULT_SECURITY,
    USERNS_SIZE,
    Security,
    make_security,
    parse_capabilities,
    parse_rlimits,
)
from .._runtime._spec import (
    NO_LIMITS,
    Limits,
    SandboxSpec,
    parse_size,
    validate_name,
)
from .._runtime._units import parse_duration
from ._policy import SocketPolicy, parse_socket_policy

__all__ = [
    "MAX_INSTANCE_NAME",
    "Fleet",
    "FleetError",
    "SandboxConfig",
    "SupervisorConfig",
    "check_instance_name",
    "load_fleet",
    "max_sandbox_name",
    "parse_fleet",
]

T = TypeVar("T")

_SANDBOX_KEYS = {
    "name", "command", "replicas", "rootfs", "env", "workdir",
    "hostname", "plugins", "cap_add", "cap_drop", "no_new_privs", "privileged", "seccomp",
    "rlimits", "userns", "userns_base", "userns_size", "volumes", "tmpfs", "user",
    "read_only_rootfs", "image", "network", "ports", "egress", "lxcfs", *LIMIT_KEYS,
}  # fmt: skip
_DEFAULT_KEYS = _SANDBOX_KEYS - {"name", "command", "replicas", "hostname"}
_SUPERVISOR_KEYS = {
    "grace_period", "journal_max_bytes", "journal_segment_bytes", "socket_group",
    "socket_idle_timeout", "cgroup_parent", "log_max_bytes", "log_max_files", "socket_policy",
}  # fmt: skip
_TOP_KEYS = {"supervisor", "defaults", "sandbox", "plugins", "network"}
MAX_REPLICAS = 1000
GENERATION_ROOM = 11
"""Characters kept for ``.GENERATION`` in a runtime name (a dot and up to ten
digits): a generation number never makes a valid name too long."""
MAX_INSTANCE_NAME = 63 - GENERATION_ROOM
"""The longest instance name (``NAME-INDEX``, or a ``restore --as`` name)."""
RUNTIME_NAME_RULE = "NAME-INDEX.GENERATION must fit in 63 at any generation"


def check_instance_name(name: str, field: str) -> str:
    """An instance name given whole (``restore --as``): valid, with room for
    ``.GENERATION``. Raises :class:`SpecError` naming *field*."""
    validate_name(name, field)
    if len(name) > MAX_INSTANCE_NAME:
        raise SpecError(
            field,
            f"expected at most {MAX_INSTANCE_NAME} characters ({RUNTIME_NAME_RULE}),"
            f" got {name!r} ({len(name)})",
        )
    return name


def max_sandbox_name(replicas: int) -> int:
    """The longest sandbox name with *replicas* instances (room for ``-INDEX``)."""
    return MAX_INSTANCE_NAME - len(f"-{max(replicas, 1) - 1}")


class FleetError(CorralError):
    """A fleet file is invalid; ``problems`` has one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class SupervisorConfig:
    """Settings of the supervisor itself (the ``[supervisor]`` table)."""

    grace_period: float = 10.0
    """Seconds between SIGTERM and SIGKILL when a sandbox is stopped."""
    journal_max_bytes: int = 256 << 20
    journal_segment_bytes: int = 16 << 20
    socket_group: int | None = None
    """Group (gid) allowed to connect to the event and control sockets besides root."""
    socket_idle_timeout: float = 10.0
    """Seconds a connection to the event or control socket may wait, with
    nothing in flight, before sending a complete request; then it is closed.
    Ten seconds: a client sends its request as soon as it has connected, so
    this is ample even on a loaded host, and a connection left open by a
    hung or careless client gives its place back soon."""
    cgroup_parent: str | None = None
    log_max_bytes: int = 10 << 20
    """Each sandbox's output log is rotated at this size ..."""
    log_max_files: int = 5
    """... keeping this many files (the current one included)."""
    socket_policy: SocketPolicy = field(default_factory=SocketPolicy)
    """What a member of ``socket_group`` may add (docs/control.md)."""


@dataclass(frozen=True)
class SandboxConfig:
    """One ``[[sandbox]]`` entry, defaults applied."""

    name: str
    command: tuple[str, ...]
    replicas: int = 1
    rootfs: str = "busybox"
    limits: Limits = NO_LIMITS
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    hostname: str | None = None
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-sandbox plugin settings, by plugin name; each plugin checks its own."""
    security: Security = DEFAULT_SECURITY
    """Capabilities and no_new_privs (``cap_add``, ``cap_drop``, ``no_new_privs``,
    ``privileged``)."""
    mounts: tuple[Mount, ...] = ()
    """``volumes`` and ``tmpfs``."""
    network: str = "none"
    ports: tuple[Port, ...] = ()
    egress: tuple[str, ...] | None = None
    user: str | None = None
    read_only: bool = False
    """``read_only_rootfs``."""
    lxcfs: bool = True
    """The lxcfs view of /proc (docs/view.md)."""

    def instance_name(self, instance: int) -> str:
        """The runtime name of one replica: ``NAME-INDEX``."""
        return f"{self.name}-{instance}"

    def spec(self, instance: int) -> SandboxSpec:
        """The runtime spec of one replica."""
        return SandboxSpec(
            name=self.instance_name(instance),
            argv=self.command,
            rootfs=self.rootfs,
            hostname=self.hostname,
            env=self.env,
            workdir=self.workdir,
            limits=self.limits,
            security=self.security,
            mounts=self.mounts,
            user=self.user,
            read_only=self.read_only,
            network=self.network,
            ports=self.ports,
            egress=self.egress,
            lxcfs=self.lxcfs,
        )


@dataclass(frozen=True)
class Fleet:
    """A parsed, validated fleet file."""

    sandboxes: tuple[SandboxConfig, ...]
    supervisor: SupervisorConfig = SupervisorConfig()
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Fleet-wide plugin settings (the top-level ``[plugins.NAME]`` tables)."""
    source: str = "<fleet>"
    networks: Mapping[str, NetworkDecl] = field(default_factory=dict)
    """The networks the fleet declares (the ``[network.NAME]`` tables), by name."""

    def instances(self) -> Iterator[tuple[SandboxConfig, int]]:
        """Every (sandbox, replica index) pair, in file order."""
        for sb in self.sandboxes:
            for i in range(sb.replicas):
                yield sb, i


def _group(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise SpecError("socket_group", f"no such group {value!r}") from None
    raise SpecError("socket_group", f"expected a group name or gid, got {value!r}")


class _Checker:
    """Collects problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, where: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except SpecError as exc:
            self.problems.append(f"{where}{exc}")
            return None

    def unknown(self, where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.problems.append(
                    f"{where}{key}: unknown key (expected one of: {', '.join(sorted(allowed))})"
                )


def _typed(value: object, kind: type | tuple[type, ...], field_name: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SpecError(field_name, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise SpecError(field_name, f"expected {what}, got {value!r}")
    return value


def _positive_duration(value: object, field_name: str) -> float:
    seconds = parse_duration(value, field_name)
    if seconds <= 0:
        raise SpecError(field_name, f"expected a duration above 0, got {value!r}")
    return seconds


def _log_files(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise SpecError("log_max_files", f"expected a whole number from 1 to 1000, got {value!r}")
    return value


def _command(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise SpecError("command", "expected a command, got an empty string")
        return ("/bin/sh", "-c", value)
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value) and value[0]:
        return tuple(value)
    raise SpecError(
        "command", f"expected a list of strings or a shell command string, got {value!r}"
    )


def _env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpecError("env", f'expected a table of NAME = "value", got {value!r}')
    out = {}
    for k, v in value.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise SpecError("env", f"expected variable names like LANG, got {k!r}")
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise SpecError("env", f"{k}: expected a string, got {v!r}")
        out[k] = str(v)
    return out


def _plugins(value: object) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SpecError("plugins", f"expected tables like [sandbox.plugins.restart], got {value!r}")
    return {k: dict(v) for k, v in value.items()}


def _replicas(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        raise SpecError(
            "replicas", f"expected a whole number from 0 to {MAX_REPLICAS}, got {value!r}"
        )
    return value


def _rootfs(value: object, key: str) -> str:
    """A ``rootfs`` (or ``image``): a name, an id, a directory, or an image
    made on first use (``oci:/PATH[:REF]``, ``debian:SUITE``)."""
    ref = _typed(value, str, key, "an image name, oci:/PATH[:TAG] or a directory")
    if ref.startswith("oci:"):
        from rootfs import RootfsError
        from rootfs._prepare import split_oci

        try:
            split_oci(ref, key)
        except RootfsError as exc:
            field, _, message = str(exc).partition(": ")
            raise SpecError(field, message) from None
    return str(ref)


def _sandbox_fields(c: _Checker, where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """Check the keys that [defaults] and [[sandbox]] share."""
    out: dict[str, Any] = {}
    if "rootfs" in table and "image" in table:
        c.problems.append(f"{where}image: rootfs says the same: set one of them")
    for key in ("rootfs", "image"):
        if key in table:
            out["rootfs"] = c.check(where, lambda k=key: _rootfs(table[k], k))  # type: ignore[misc]
    for key in LIMIT_KEYS:
        if key in table:
            v = table[key]
            if key in ("memory", "cpus", "pids") and (
                isinstance(v, bool) or not isinstance(v, str | int | float)
            ):
                c.problems.append(f"{where}{key}: expected a number or a string, got {v!r}")
            else:
                out[key] = c.check(where, lambda v=v, k=key: parse_limit(k, v))  # type: ignore[misc]
    if "env" in table:
        out["env"] = c.check(where, lambda: _env(table["env"]))
    if "workdir" in table:
        wd = table["workdir"]
        if not isinstance(wd, str) or not wd.startswith("/"):
            c.problems.append(f"{where}workdir: expected an absolute path, got {wd!r}")
        else:
            out["workdir"] = wd
    if "plugins" in table:
        out["plugins"] = c.check(where, lambda: _plugins(table["plugins"]))
    for key in ("cap_add", "cap_drop"):
        if key in table:
            out[key] = c.check(where, lambda k=key: parse_capabilities(table[k], k))  # type: ignore[misc]
    for key in ("no_new_privs", "privileged", "userns", "lxcfs"):
        if key in table:
            if isinstance(table[key], bool):
                out[key] = table[key]
            else:
                c.problems.append(f"{where}{key}: expected true or false, got {table[key]!r}")
    for key in ("userns_base", "userns_size"):
        if key in table:
            out[key] = table[key]  # checked with the rest by make_security
    if "seccomp" in table:
        out["seccomp"] = c.check(where, lambda: parse_seccomp(table["seccomp"]))
    if "rlimits" in table and c.check(where, lambda: parse_rlimits(table["rlimits"])) is not None:
        out["rlimits"] = dict(table["rlimits"])
    for key, parse in (("volumes", parse_volume), ("tmpfs", parse_tmpfs)):
        if key in table:
            items = table[key]
            if not isinstance(items, list):
                c.problems.append(f"{where}{key}: expected a list of strings, got {items!r:.60}")
                continue
            mounts = [c.check(where, lambda i=i, p=parse, k=key: p(i, k)) for i in items]  # type: ignore[misc]
            if all(m is not None for m in mounts):
                out[key] = mounts
    if "user" in table:
        out["user"] = c.check(where, lambda: parse_user(table["user"]))
    if "network" in table:
        out["network"] = c.check(where, lambda: parse_network(table["network"]))
    if "ports" in table:
        ports = table["ports"]
        if not isinstance(ports, list):
            c.problems.append(f"{where}ports: expected a list of strings, got {ports!r:.60}")
        else:
            parsed = [c.check(where, lambda p=p: parse_port(p)) for p in ports]  # type: ignore[misc]
            if all(p is not None for p in parsed):
                out["ports"] = tuple(parsed)
    if "egress" in table:
        egress = c.check(where, lambda: ("ok", parse_egress(table["egress"])))
        if egress is not None:
            out["egress"] = egress[1]
    if "read_only_rootfs" in table:
        ro = table["read_only_rootfs"]
        if isinstance(ro, bool):
            out["read_only_rootfs"] = ro
        else:
            c.problems.append(f"{where}read_only_rootfs: expected true or false, got {ro!r}")
    return out


def _merge_mounts(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> list[Mount]:
    """The defaults' volumes and tmpfs, then the sandbox's: one of its own
    with the target of a default replaces that default."""
    mine = [m for key in ("volumes", "tmpfs") for m in own.get(key) or ()]
    targets = {m.target for m in mine}
    inherited = [m for key in ("volumes", "tmpfs") for m in defaults.get(key) or ()]
    # Two mounts of one target in one table stay, for the spec to refuse.
    return [m for m in inherited if m.target not in targets] + mine


def _networks(c: _Checker, raw: object) -> dict[str, NetworkDecl]:
    """The ``[network.NAME]`` tables: each checked, then between them."""
    if not isinstance(raw, dict):
        c.problems.append(f"network: expected [network.NAME] tables, got {raw!r:.60}")
        return {}
    out = {}
    for name, table in raw.items():
        decl = c.check(f"network {name!r}: ", lambda n=name, t=table: parse_network_decl(n, t))  # type: ignore[misc]
        if decl is not None:
            out[name] = decl
    c.problems += check_decls(list(out.values()))
    return out


def parse_fleet(
    data: Mapping[str, Any], source: str = "<fleet>", networks: Collection[str] = ()
) -> Fleet:
    """Validate a decoded TOML document; raise :class:`FleetError` listing
    every problem. A sandbox's ``network`` may name a network the document
    declares, or one of *networks* (those of the fleet it is added to)."""
    c = _Checker()
    c.unknown("", data, _TOP_KEYS)
    declared = _networks(c, data.get("network", {}))
    known = {*declared, *networks}

    sup_table = data.get("supervisor", {})
    sup = SupervisorConfig()
    if not isinstance(sup_table, dict):
        c.problems.append(f"supervisor: expected a table, got {sup_table!r}")
    else:
        c.unknown("supervisor: ", sup_table, _SUPERVISOR_KEYS)
        kw: dict[str, Any] = {}
        if "grace_period" in sup_table:
            kw["grace_period"] = c.check(
                "supervisor: ", lambda: parse_duration(sup_table["grace_period"], "grace_period")
            )
        if "socket_idle_timeout" in sup_table:
            kw["socket_idle_timeout"] = c.check(
                "supervisor: ",
                lambda: _positive_duration(sup_table["socket_idle_timeout"], "socket_idle_timeout"),
            )
        if "log_max_files" in sup_table:
            kw["log_max_files"] = c.check(
                "supervisor: ", lambda: _log_files(sup_table["log_max_files"])
            )
        for key in ("journal_max_bytes", "journal_segment_bytes", "log_max_bytes"):
            if key in sup_table:
                kw[key] = c.check(
                    "supervisor: ",
                    lambda k=key: parse_size(sup_table[k], k, minimum=64 << 10),  # type: ignore[misc]
                )
        if "socket_group" in sup_table:
            kw["socket_group"] = c.check("supervisor: ", lambda: _group(sup_table["socket_group"]))
        if "socket_policy" in sup_table:
            kw["socket_policy"] = c.check(
                "supervisor: ", lambda: parse_socket_policy(sup_table["socket_policy"])
            )
        if "cgroup_parent" in sup_table:
            cp = sup_table["cgroup_parent"]
            if not isinstance(cp, str) or not cp.startswith("/"):
                c.problems.append(
                    f"supervisor: cgroup_parent: expected a cgroup path like /corral, got {cp!r}"
                )
            else:
                kw["cgroup_parent"] = cp
        if all(v is not None for v in kw.values()):
            sup = SupervisorConfig(**kw)

    defaults_table = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_table, dict):
        c.problems.append(f"defaults: expected a table, got {defaults_table!r}")
    else:
        c.unknown("defaults: ", defaults_table, _DEFAULT_KEYS)
        defaults = _sandbox_fields(c, "defaults: ", defaults_table)

    fleet_plugins: dict[str, dict[str, Any]] = {}
    if "plugins" in data:
        fleet_plugins = c.check("", lambda: _plugins(data["plugins"])) or {}

    raw = data.get("sandbox", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        c.problems.append("sandbox: expected [[sandbox]] tables")
        raw = []
    elif not raw:
        c.problems.append("sandbox: expected at least one [[sandbox]] table")
    sandboxes: list[SandboxConfig] = []
    seen: dict[str, int] = {}
    for n, table in enumerate(raw, 1):
        name = table.get("name")
        where = f"sandbox {name!r}: " if isinstance(name, str) else f"sandbox #{n}: "
        before = len(c.problems)
        c.unknown(where, table, _SANDBOX_KEYS)
        if name is None:
            c.problems.append(f"{where}name: missing (every sandbox needs a name)")
        else:
            c.check(
                where,
                lambda name=name: validate_name(  # type: ignore[misc]
                    _typed(name, str, "name", "a string"), "name"
                ),
            )
            replicas = table.get("replicas", 1)
            room = max_sandbox_name(replicas if isinstance(replicas, int) else 1)
            if isinstance(name, str) and len(name) > room:
                c.problems.append(
                    f"{where}name: expected at most {room} characters ({RUNTIME_NAME_RULE}),"
                    f" got {name!r} ({len(name)})"
                )
            if isinstance(name, str) and name in seen:
                c.problems.append(
                    f"{where}name: duplicate (sandbox #{seen[name]} has the same name)"
                )
            elif isinstance(name, str):
                seen[name] = n
        command = None
        if "command" not in table:
            c.problems.append(f"{where}command: missing (what should the sandbox run?)")
        else:
            command = c.check(where, lambda t=table: _command(t["command"]))  # type: ignore[misc]
        replicas = c.check(where, lambda t=table: _replicas(t.get("replicas", 1)))  # type: ignore[misc]
        hostname = table.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            c.problems.append(f"{where}hostname: expected a string, got {hostname!r}")
        own = _sandbox_fields(c, where, table)
        fields = {**defaults, **own}
        # A sandbox's rlimits add to (or override) the defaults', one by one.
        fields["rlimits"] = {**defaults.get("rlimits", {}), **own.get("rlimits", {})}
        if len(c.problems) > before:
            continue
        assert isinstance(name, str) and command is not None and replicas is not None
        limits = c.check(
            where,
            lambda f=fields: limits_from({k: f[k] for k in LIMIT_KEYS if k in f}),  # type: ignore[misc]
        )
        if limits is None:
            continue
        env = {**defaults.get("env", {}), **fields.get("env", {})}
        plugins = {**defaults.get("plugins", {}), **fields.get("plugins", {})}
        security = c.check(
            where,
            lambda f=fields: make_security(  # type: ignore[misc]
                f.get("cap_add", ()),
                f.get("cap_drop", ()),
                f.get("no_new_privs", True),
                f.get("privileged", False),
                f.get("seccomp", "default"),
                f["rlimits"],
                f.get("userns"),
                f.get("userns_base"),
                f.get("userns_size", USERNS_SIZE),
            ),
        )
        if security is None:
            continue
        cfg = SandboxConfig(
            name=name,
            command=command,
            replicas=replicas,
            rootfs=fields.get("rootfs", "busybox"),
            limits=limits,
            env=env,
            workdir=fields.get("workdir", "/"),
            hostname=hostname,
            plugins=plugins,
            security=security,
            mounts=tuple(_merge_mounts(defaults, own)),
            user=fields.get("user"),
            read_only=fields.get("read_only_rootfs", False),
            network=fields.get("network", "none"),
            ports=fields.get("ports", ()),
            egress=fields.get("egress"),
            lxcfs=fields.get("lxcfs", True),
        )
        on = network_name(cfg.network)
        if on is not None and cfg.network != "bridge" and on not in known:
            c.problems.append(
                f"{where}network: no network {on!r} in this fleet (declare it with a"
                f" [network.{on}] table)"
            )
        elif c.check(where, lambda cfg=cfg: cfg.spec(0)) is not None:  # type: ignore[misc]
            sandboxes.append(cfg)
    if c.problems:
        raise FleetError(source, c.problems)
    return Fleet(
        sandboxes=tuple(sandboxes),
        supervisor=sup,
        plugins=fleet_plugins,
        source=source,
        networks=declared,
    )


def load_fleet(
    path: str | os.PathLike[str], networks: Collection[str] = (), fd: int | None = None
) -> Fleet:
    """Read and validate a fleet file (*networks*: see :func:`parse_fleet`);
    with *fd*, read it from that open descriptor (a regular file), *path*
    naming it in messages."""
    source = os.fspath(path)
    try:
        if fd is not None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FleetError(source, ["expected a regular file"])
            with os.fdopen(os.dup(fd), "rb") as f:
                f.seek(0)
                data = tomllib.load(f)
        else:
            with open(source, "rb") as f:
                data = tomllib.load(f)
    except FileNotFoundError:
        raise FleetError(source, ["no such file"]) from None
    except OSError as exc:
        raise FleetError(source, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(source, [f"not valid TOML: {exc}"]) from None
    return parse_fleet(data, source, networks)
