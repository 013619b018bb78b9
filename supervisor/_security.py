"""What a sandbox's processes may do: capabilities and no_new_privs.

The defaults are Docker's: the bounding, permitted and effective sets hold
its 14 capabilities and nothing else, the inheritable and ambient sets are
empty, and ``no_new_privs`` is on, so no setuid binary or file capability
can give a process more than it started with. ``cap_add`` and ``cap_drop``
adjust the 14 (``ALL`` means every capability); ``privileged`` keeps every
capability and turns ``no_new_privs`` off, and says so loudly where it is
used.

The init and every process ``corral exec`` adds apply the same
:func:`kept_capabilities`, in the same step, just before ``execve``
(``supervisor/_linux/_child.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ._errors import SpecError

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_SECURITY",
    "Security",
    "cap_last_cap",
    "kept_capabilities",
    "parse_capabilities",
]

CAPABILITIES: dict[str, int] = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_MODULE": 16,
    "SYS_RAWIO": 17,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_PACCT": 20,
    "SYS_ADMIN": 21,
    "SYS_BOOT": 22,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30,
    "SETFCAP": 31,
    "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33,
    "SYSLOG": 34,
    "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36,
    "AUDIT_READ": 37,
    "PERFMON": 38,
    "BPF": 39,
    "CHECKPOINT_RESTORE": 40,
}
"""Every capability by name (without ``CAP_``), as in <linux/capability.h>."""

DEFAULT_CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
)
"""Docker's default set: what a sandbox keeps unless told otherwise."""


class Security(NamedTuple):
    """A sandbox's privileges (validated by :func:`make_security`)."""

    cap_add: tuple[str, ...] = ()
    """Capabilities kept besides the defaults (names without ``CAP_``, or ``ALL``)."""
    cap_drop: tuple[str, ...] = ()
    """Default capabilities taken away too (or ``ALL``)."""
    no_new_privs: bool = True
    """No setuid or file-capability gain across exec."""
    privileged: bool = False
    """Every capability and no ``no_new_privs``: the protections are off."""

    def to_dict(self) -> dict[str, object]:
        """Plain-data form (checkpoint.json, the control socket)."""
        return {
            "cap_add": list(self.cap_add),
            "cap_drop": list(self.cap_drop),
            "no_new_privs": self.no_new_privs,
            "privileged": self.privileged,
        }


DEFAULT_SECURITY = Security()


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


def make_security(
    cap_add: Iterable[str] = (),
    cap_drop: Iterable[str] = (),
    no_new_privs: object = True,
    privileged: object = False,
) -> Security:
    """A validated :class:`Security`; :class:`SpecError` names the bad field."""
    if not isinstance(no_new_privs, bool):
        raise SpecError("no_new_privs", f"expected true or false, got {no_new_privs!r:.40}")
    if not isinstance(privileged, bool):
        raise SpecError("privileged", f"expected true or false, got {privileged!r:.40}")
    add = parse_capabilities(list(cap_add), "cap_add")
    drop = parse_capabilities(list(cap_drop), "cap_drop")
    both = set(add) & set(drop) - {"ALL"}
    if both:
        raise SpecError("cap_add", f"{sorted(both)[0]} is also in cap_drop")
    return Security(add, drop, no_new_privs, privileged)


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
