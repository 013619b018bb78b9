"""What a member of ``socket_group`` may add: the control socket's trust model.

Root (and the supervisor's own user) may do anything through the control
socket. The group's members may use every verb, but a sandbox they ``add``
is held to the fleet's ``[supervisor] socket_policy``; without one, to the
default below, which gives nothing a sandbox of the defaults does not
have. Without it the group would be root-equivalent: ``privileged = true``,
``cap_add = ["ALL"]``, ``rootfs = "/"`` or a bind mount of ``/`` is the
host's root. (docs/control.md, "Who may do what".)

Every rule names the key it refuses and says which rule; the whole file is
refused (``forbidden``) if any entry breaks one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import CorralError, SpecError
from .._runtime._security import default_userns, parse_capabilities

__all__ = ["PolicyRefused", "SocketPolicy", "parse_socket_policy", "policy_problems"]

_KEYS = (
    "privileged",
    "cap_add",
    "host_network",
    "unconfined",
    "volume_roots",
    "userns_base",
    "root_mapped",
)


class PolicyRefused(CorralError):
    """A member of ``socket_group`` asked for what the policy refuses (the
    control socket's ``forbidden``)."""


@dataclass(frozen=True)
class SocketPolicy:
    """What sandboxes added by a member of ``socket_group`` may have."""

    privileged: bool = False
    """``privileged = true``."""
    cap_add: tuple[str, ...] = ()
    """Capabilities they may keep besides the defaults (``"ALL"``: any)."""
    host_network: bool = False
    """``network = "host"``: the host's interfaces and ports, unisolated."""
    unconfined: bool = False
    """``seccomp = "unconfined"`` and ``no_new_privs = false``."""
    volume_roots: tuple[str, ...] = ()
    """Host directories below which their bind volumes, directory or
    ``oci:`` root file systems and seccomp profiles may be (the supervisor
    reads and mounts them as root)."""
    userns_base: bool = False
    """Choosing the host ids of a user namespace (``userns = true`` and
    ``userns_base``): the sandbox's root would be that host user, root
    itself with 0."""
    root_mapped: bool = False
    """``userns = false`` where sandboxes run in a user namespace by
    default: the sandbox's root would be the host's root (confined)."""


def parse_socket_policy(value: object) -> SocketPolicy:
    """The ``socket_policy`` table; :class:`SpecError` names the key."""
    if not isinstance(value, Mapping):
        raise SpecError("socket_policy", f"expected a table, got {value!r:.60}")
    for key in value:
        if key not in _KEYS:
            expected = ", ".join(_KEYS)
            raise SpecError(f"socket_policy.{key}", f"unknown key (expected one of: {expected})")
    kw: dict[str, Any] = {}
    for key in ("privileged", "host_network", "unconfined", "userns_base", "root_mapped"):
        if key in value:
            if not isinstance(value[key], bool):
                raise SpecError(
                    f"socket_policy.{key}", f"expected true or false, got {value[key]!r:.40}"
                )
            kw[key] = value[key]
    if "cap_add" in value:
        kw["cap_add"] = parse_capabilities(value["cap_add"], "socket_policy.cap_add")
    if "volume_roots" in value:
        roots = value["volume_roots"]
        if not isinstance(roots, list) or not all(
            isinstance(r, str) and os.path.isabs(r) for r in roots
        ):
            raise SpecError(
                "socket_policy.volume_roots",
                f"expected a list of absolute paths, got {roots!r:.60}",
            )
        kw["volume_roots"] = tuple(os.path.normpath(r) for r in roots)
    return SocketPolicy(**kw)


def policy_problems(policy: SocketPolicy, cfg: Any) -> list[str]:
    """What in sandbox config *cfg* (a ``SandboxConfig``) *policy* refuses,
    one line each. Host paths are resolved (links followed) before they
    are compared with the roots, so a link out of a root does not pass."""
    out: list[str] = []
    where = f"sandbox {cfg.name!r}"
    sec = cfg.security
    if sec.privileged and not policy.privileged:
        out.append(f"{where}: privileged: {_rule('privileged sandboxes')}")
    allowed = set(policy.cap_add)
    extra = [c for c in sec.cap_add if "ALL" not in allowed and c not in allowed]
    if extra:
        out.append(f"{where}: cap_add: {_rule(f'adding {extra[0]}')}")
    if cfg.network == "host" and not policy.host_network:
        out.append(f"{where}: network: {_rule('the host network')}")
    if not policy.unconfined:
        if sec.seccomp == "unconfined":
            out.append(f"{where}: seccomp: {_rule('unconfined sandboxes')}")
        if not sec.no_new_privs and not sec.privileged:
            out.append(f"{where}: no_new_privs: {_rule('turning no_new_privs off')}")
    if sec.userns_base is not None and not policy.userns_base:
        out.append(f"{where}: userns_base: {_rule('choosing the host ids of the sandbox')}")
    if not sec.userns and not sec.privileged and default_userns(False) and not policy.root_mapped:
        out.append(
            f"{where}: userns: {_rule('the host root as the sandbox root (userns = false)')}"
        )
    paths = [(f"volumes: {m.source}", m.source) for m in cfg.mounts if m.kind == "bind"]
    rootfs = cfg.rootfs
    if rootfs.startswith("/"):
        paths.append(("rootfs", rootfs))
    elif rootfs.startswith("oci:"):
        paths.append(("rootfs", rootfs[4:].split(":", 1)[0]))
    if sec.seccomp not in ("default", "unconfined"):
        paths.append(("seccomp", sec.seccomp))
    for key, path in paths:
        if not _under(path, policy.volume_roots):
            roots = ", ".join(policy.volume_roots) or "none"
            out.append(f"{where}: {key}: {_rule(f'host paths outside its volume_roots ({roots})')}")
    return out


def _rule(what: str) -> str:
    return f"forbidden to members of socket_group by [supervisor] socket_policy: {what}"


def _under(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return True
    return False
