"""What a sandbox's processes may do: capabilities, no_new_privs, seccomp, rlimits.

The defaults are Docker's: the bounding, permitted and effective sets hold
its 14 capabilities and nothing else, the inheritable and ambient sets are
empty, and ``no_new_privs`` is on, so no setuid binary or file capability
can give a process more than it started with. ``cap_add`` and ``cap_drop``
adjust the 14 (``ALL`` means every capability); ``privileged`` keeps every
capability and turns ``no_new_privs`` off, and says so loudly where it is
used.

The init and every process ``corral exec`` adds apply the same
:func:`kept_capabilities`, in the same step, just before ``execve``
(``supervisor/_runtime/_linux/_child.py``).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping

from .._errors import SpecError
from ._capabilities import CAPABILITIES, DEFAULT_CAPABILITIES
from ._seccomp import parse_seccomp

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ._tuples import NamedTuple

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_RLIMITS",
    "DEFAULT_SECURITY",
    "RLIMITS",
    "USERNS_POOL",
    "USERNS_SIZE",
    "Security",
    "cap_last_cap",
    "effective_rlimits",
    "kept_capabilities",
    "parse_capabilities",
    "parse_rlimits",
]


USERNS_SIZE = 65536
"""Ids per sandbox in user-namespace mode (uids and gids 0-65535, as Docker's
``userns-remap`` and /etc/subuid's usual ranges)."""
USERNS_POOL = (1 << 30, 1 << 14)
"""Where user-namespace ranges come from: the first host id, and how many
ranges of :data:`USERNS_SIZE` (ids 2^30 up: far above any real user's)."""


class Security(NamedTuple):
    """A sandbox's privileges (validated by :func:`make_security`)."""

    cap_add: tuple[str, ...] = ()
    """Capabilities kept besides the defaults (names without ``CAP_``, or ``ALL``)."""
    cap_drop: tuple[str, ...] = ()
    """Default capabilities taken away too (or ``ALL``)."""
    no_new_privs: bool = True
    """No setuid or file-capability gain across exec."""
    privileged: bool = False
    """Every capability, no ``no_new_privs``, no seccomp filter, no masked
    paths, no device policy: the protections are off."""
    seccomp: str = "default"
    """``default``, ``unconfined`` or the path of a Docker seccomp profile."""
    rlimits: tuple[tuple[str, int, int], ...] = ()
    """``(name, soft, hard)`` overrides of :data:`DEFAULT_RLIMITS` (-1: unlimited)."""
    userns: bool = False
    """Run in a user namespace: the sandbox's uid and gid 0 to ``userns_size - 1``
    are host ids from ``userns_base`` up, so its root is nobody on the host.
    :func:`make_security` makes it the default (see :func:`default_userns`)."""
    userns_base: int | None = None
    """The host uid and gid of the sandbox's root (None: a range of its own,
    allocated from :data:`USERNS_POOL`); sandboxes given the same base share it."""
    userns_size: int = USERNS_SIZE
    """How many ids the sandbox has."""

    def to_dict(self) -> dict[str, object]:
        """Plain-data form (checkpoint.json, the control socket)."""
        return {
            "cap_add": list(self.cap_add),
            "cap_drop": list(self.cap_drop),
            "no_new_privs": self.no_new_privs,
            "privileged": self.privileged,
            "seccomp": self.seccomp,
            "rlimits": {name: [soft, hard] for name, soft, hard in self.rlimits},
            "userns": self.userns,
            "userns_base": self.userns_base,
            "userns_size": self.userns_size,
        }


def userns_available() -> bool:
    """Whether this kernel makes user namespaces (built with them, and
    ``user.max_user_namespaces`` not 0)."""
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            return int(f.read()) > 0 and os.path.exists("/proc/self/ns/user")
    except (OSError, ValueError):
        return False


USERNS_DEFAULT = True
"""Whether a sandbox that does not say runs in a user namespace (issue
18): yes, as Incus and rootless Podman do. ``userns = false`` is the
explicit, documented choice of a root-mapped sandbox (docs/security.md)."""


def default_userns(privileged: bool) -> bool:
    """``userns`` when a sandbox does not say: :data:`USERNS_DEFAULT` where
    the kernel makes user namespaces, and never for a privileged sandbox,
    whose point is the host's privileges."""
    return USERNS_DEFAULT and not privileged and userns_available()


def parse_capabilities(value: object, field: str) -> tuple[str, ...]:
    """Capability names from a list of strings (``NET_ADMIN``, ``cap_net_admin``, ``ALL``)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SpecError(field, f"expected a list of capability names, got {value!r:.60}")
    names = []
    for raw in value:
        name = raw.strip().upper().removeprefix("CAP_")
        if name != "ALL" and name not in CAPABILITIES:
            raise SpecError(
                field, f"expected capability names like NET_ADMIN or ALL, got {raw!r:.40}"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


RLIMITS: dict[str, int] = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "locks": getattr(resource, "RLIMIT_LOCKS", 10),  # Python 3.11 lacks the name
    "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "nice": resource.RLIMIT_NICE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "rss": resource.RLIMIT_RSS,
    "rtprio": resource.RLIMIT_RTPRIO,
    "rttime": resource.RLIMIT_RTTIME,
    "sigpending": resource.RLIMIT_SIGPENDING,
    "stack": resource.RLIMIT_STACK,
}
"""The rlimits by name (``setrlimit(2)`` without ``RLIMIT_``, lower case)."""

DEFAULT_RLIMITS: dict[str, tuple[int, int]] = {
    "nofile": (1024, 65536),
    "core": (0, 0),
}
"""What a sandbox gets unless told otherwise: 1024 descriptors (up to 65536,
or the supervisor's own hard limit if that is lower, on request), and no
core dumps (a dump is the host's business: ``core_pattern`` may run a host
program). The rest is inherited from the supervisor. ``nproc`` is left
alone on purpose: it counts every process of the *host* user, and without a
user namespace a sandbox's root is host root; a fork bomb is the ``pids``
limit's job."""


def parse_rlimits(value: object, field: str = "rlimits") -> tuple[tuple[str, int, int], ...]:
    """rlimits from a mapping of name to a number (soft = hard), ``"SOFT:HARD"``,
    ``[soft, hard]`` or ``"unlimited"``; e.g. ``{nofile = 4096, core = "0:unlimited"}``."""
    if not isinstance(value, Mapping):
        raise SpecError(field, f"expected a table like {{nofile = 4096}}, got {value!r:.60}")
    out = []
    for name, raw in value.items():
        if name not in RLIMITS:
            raise SpecError(
                field, f"expected rlimit names like nofile, nproc or core, got {name!r:.40}"
            )
        where = f"{field}.{name}"
        if isinstance(raw, list | tuple) and len(raw) == 2:
            soft, hard = (_rlimit_value(v, where) for v in raw)
        elif isinstance(raw, str) and ":" in raw:
            soft, hard = (_rlimit_value(v, where) for v in raw.split(":", 1))
        else:
            soft = hard = _rlimit_value(raw, where)
        if hard != -1 and (soft == -1 or soft > hard):
            raise SpecError(where, f"the soft limit is above the hard limit ({raw!r:.40})")
        out.append((name, soft, hard))
    return tuple(out)


def _rlimit_value(raw: object, where: str) -> int:
    if raw in ("unlimited", "infinity", -1):
        return -1
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise SpecError(
            where, f"expected a whole number, 'SOFT:HARD' or 'unlimited', got {raw!r:.40}"
        )
    return raw


def effective_rlimits(security: Security) -> list[list[int]]:
    """``[resource, soft, hard]`` for every rlimit a sandbox sets: the defaults
    (a hard limit above the supervisor's own is lowered to it) and the
    sandbox's own settings (never lowered: asking for more than the
    supervisor has is a clear error when the sandbox starts)."""
    limits: dict[str, tuple[int, int]] = {}
    for name, (soft, hard) in DEFAULT_RLIMITS.items():
        own = resource.getrlimit(RLIMITS[name])[1]
        if own != resource.RLIM_INFINITY and (hard == -1 or hard > own):
            hard = own
        limits[name] = (min(soft, hard) if hard != -1 else soft, hard)
    for name, soft, hard in security.rlimits:
        limits[name] = (soft, hard)
    return [[RLIMITS[name], soft, hard] for name, (soft, hard) in limits.items()]


def make_security(
    cap_add: Iterable[str] = (),
    cap_drop: Iterable[str] = (),
    no_new_privs: object = True,
    privileged: object = False,
    seccomp: object = "default",
    rlimits: object = None,
    userns: object = None,
    userns_base: object = None,
    userns_size: object = USERNS_SIZE,
) -> Security:
    """A validated :class:`Security`; :class:`SpecError` names the bad field.

    *userns* None is the default (true with a *userns_base*, else see
    :func:`default_userns`)."""
    if not isinstance(no_new_privs, bool):
        raise SpecError("no_new_privs", f"expected true or false, got {no_new_privs!r:.40}")
    if not isinstance(privileged, bool):
        raise SpecError("privileged", f"expected true or false, got {privileged!r:.40}")
    add = parse_capabilities(list(cap_add), "cap_add")
    drop = parse_capabilities(list(cap_drop), "cap_drop")
    both = set(add) & set(drop) - {"ALL"}
    if both:
        raise SpecError("cap_add", f"{sorted(both)[0]} is also in cap_drop")
    limits = parse_rlimits(rlimits) if rlimits is not None else ()
    if userns is None:
        # A chosen base means a user namespace; otherwise the default.
        userns = userns_base is not None or default_userns(privileged)
    if not isinstance(userns, bool):
        raise SpecError("userns", f"expected true or false, got {userns!r:.40}")
    if (
        isinstance(userns_size, bool)
        or not isinstance(userns_size, int)
        or userns_size < USERNS_SIZE
    ):
        raise SpecError(
            "userns_size", f"expected a number of ids >= {USERNS_SIZE}, got {userns_size!r:.40}"
        )
    if userns_base is not None:
        if not userns:
            raise SpecError("userns_base", "needs userns = true")
        if (
            isinstance(userns_base, bool)
            or not isinstance(userns_base, int)
            or not 0 < userns_base <= (1 << 32) - 1 - userns_size
        ):
            raise SpecError(
                "userns_base",
                f"expected a host uid above 0 with {userns_size} ids free after it,"
                f" got {userns_base!r:.40}",
            )
    return Security(
        add,
        drop,
        no_new_privs,
        privileged,
        parse_seccomp(seccomp),
        limits,
        userns,
        userns_base,
        userns_size,
    )


def cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def kept_capabilities(security: Security, last_cap: int) -> list[int]:
    """The capability numbers a sandbox keeps (in its bounding, permitted and
    effective sets), for a kernel whose highest capability is *last_cap*."""
    every = set(range(last_cap + 1))
    if security.privileged:
        return sorted(every)
    kept = (
        set(every)
        if "ALL" in security.cap_add
        else {CAPABILITIES[n] for n in DEFAULT_CAPABILITIES}
        | {CAPABILITIES[n] for n in security.cap_add}
    )
    if "ALL" in security.cap_drop:
        kept = {CAPABILITIES[n] for n in security.cap_add if n != "ALL"}
    else:
        kept -= {CAPABILITIES[n] for n in security.cap_drop}
    return sorted(kept & every)


DEFAULT_SECURITY = make_security()
"""What a sandbox gets when it asks for nothing (``userns`` as
:func:`default_userns` says on this kernel)."""
