"""What a sandbox mounts besides its root: host directories, named volumes
and tmpfs, and the user its command runs as.

The grammar is Docker's short syntax, so that what users know works:

- ``volumes``: ``/HOST/PATH:/TARGET[:ro|rw]`` (a bind mount of a host file
  or directory) or ``NAME:/TARGET[:ro|rw]`` (a named volume: a directory
  corral keeps in ``STATE_DIR/volumes/NAME``, made on first use and kept
  across sandboxes until ``corral volume rm``);
- ``tmpfs``: ``/TARGET[:size=64M,mode=1777,ro,noexec]``;
- ``user``: ``UID[:GID]`` or ``NAME[:GROUP]``, names resolved in the
  sandbox's own ``/etc/passwd`` and ``/etc/group`` when it starts.

Only the text is checked here (each error names the field); the mounts are
made by the init, inside the sandbox's mount namespace, with every target
resolved inside the root (``supervisor/_runtime/_linux/_child.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .._errors import SpecError
from . import _units

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._tuples import NamedTuple

__all__ = [
    "VOLUME_NAME_RE",
    "Mount",
    "check_mounts",
    "mount_from_dict",
    "parse_tmpfs",
    "parse_user",
    "parse_volume",
]

VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A named volume: letters, digits, ``_ . -``, at most 64 characters."""
_ID_RE = re.compile(r"^[0-9]{1,10}$")
_USER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")
_RESERVED = ("/proc", "/sys", "/dev")
"""Targets corral mounts itself (and masks parts of): never a volume's."""
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to setresuid


class Mount(NamedTuple):
    """One mount of a sandbox besides its root."""

    kind: str
    """``bind`` (a host path), ``volume`` (a named volume) or ``tmpfs``."""
    source: str
    """The host path, the volume's name, or ``tmpfs``."""
    target: str
    """An absolute path in the sandbox (normalized, never ``..``)."""
    read_only: bool = False
    size: int | None = None
    """tmpfs: its size in bytes (None: the kernel's default, half of RAM;
    what is written is charged to the sandbox's memory limit anyway)."""
    mode: int | None = None
    """tmpfs: the mode of its root (None: 1777, like /tmp)."""
    noexec: bool = False
    """tmpfs: nothing on it may be executed."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (records, checkpoint.json, the control socket)."""
        return self._asdict()

    def describe(self) -> str:
        """The mount in the grammar it was given in."""
        if self.kind == "tmpfs":
            opts = []
            if self.size is not None:
                opts.append(f"size={self.size}")
            if self.mode is not None:
                opts.append(f"mode={self.mode:o}")
            if self.read_only:
                opts.append("ro")
            if self.noexec:
                opts.append("noexec")
            return self.target + (":" + ",".join(opts) if opts else "")
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


def mount_from_dict(d: Mapping[str, Any]) -> Mount:
    """Inverse of :meth:`Mount.to_dict` (checked again)."""
    m = Mount(**d)
    check_target(m.target, "volumes" if m.kind != "tmpfs" else "tmpfs")
    return m


def check_target(target: str, field: str) -> str:
    """A mount target: absolute, without ``.`` or ``..`` components, not
    the root and not below /proc, /sys or /dev (corral's own mounts)."""
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        raise SpecError(field, f"expected an absolute target path like /data, got {target!r}")
    parts = [p for p in target.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise SpecError(field, f"expected a target path without '.' or '..', got {target!r}")
    norm = "/" + "/".join(parts)
    if norm == "/":
        raise SpecError(field, "the target cannot be / (use rootfs for the root)")
    for reserved in _RESERVED:
        if norm == reserved or norm.startswith(reserved + "/"):
            raise SpecError(field, f"{norm}: corral mounts {reserved} itself; choose another")
    return norm


def parse_volume(text: str, field: str = "volumes") -> Mount:
    """``/HOST:/TARGET[:ro|rw]`` or ``NAME:/TARGET[:ro|rw]``."""
    expected = f"expected /HOST/PATH:/TARGET[:ro] or NAME:/TARGET[:ro], got {text!r}"
    if not isinstance(text, str):
        raise SpecError(field, expected)
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SpecError(field, expected)
    source, target = parts[0], parts[1]
    read_only = False
    if len(parts) == 3:
        opts = [o for o in parts[2].split(",") if o]
        for opt in opts:
            if opt not in ("ro", "rw"):
                raise SpecError(field, f"{text!r}: expected the option ro or rw, got {opt!r}")
        read_only = "ro" in opts
    if source.startswith("/"):
        if "\0" in source or any(p == ".." for p in source.split("/")):
            raise SpecError(field, f"expected a host path without '..', got {source!r}")
        kind = "bind"
        source = "/" + "/".join(p for p in source.split("/") if p and p != ".")
    elif VOLUME_NAME_RE.match(source):
        kind = "volume"
    else:
        raise SpecError(field, expected)
    return Mount(kind, source, check_target(target, field), read_only)


def parse_tmpfs(text: str, field: str = "tmpfs") -> Mount:
    """``/TARGET[:size=64M,mode=1777,ro,noexec]``."""
    if not isinstance(text, str):
        raise SpecError(field, f"expected /TARGET[:size=64M,mode=1777], got {text!r}")
    target, _, options = text.partition(":")
    size: int | None = None
    mode: int | None = None
    read_only = noexec = False
    for opt in (o for o in options.split(",") if o):
        key, eq, value = opt.partition("=")
        if key == "size" and eq:
            size = _units.parse_size(value, f"{field} {target} size", minimum=4096)
        elif key == "mode" and eq:
            try:
                mode = int(value, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o7777:
                raise SpecError(field, f"{target}: expected an octal mode like 1777, got {value!r}")
        elif opt in ("ro", "rw"):
            read_only = opt == "ro"
        elif opt in ("exec", "noexec"):
            noexec = opt == "noexec"
        else:
            raise SpecError(
                field, f"{target}: expected options size=, mode=, ro, rw, exec, noexec; got {opt!r}"
            )
    return Mount("tmpfs", "tmpfs", check_target(target, field), read_only, size, mode, noexec)


def parse_user(text: str, field: str = "user") -> str:
    """``UID[:GID]`` or ``NAME[:GROUP]`` (numbers or names, each), as given."""
    if not isinstance(text, str):
        raise SpecError(field, f"expected UID[:GID] or NAME[:GROUP], got {text!r}")
    user, sep, group = text.partition(":")
    for part, what in ((user, "user"), (group, "group")):
        if not part and (what == "user" or sep):
            raise SpecError(field, f"expected UID[:GID] or NAME[:GROUP], got {text!r}")
        if not part:
            continue
        if _ID_RE.match(part):
            if int(part) > MAX_ID:
                raise SpecError(field, f"expected a {what} id up to {MAX_ID}, got {part}")
        elif not _USER_NAME_RE.match(part):
            raise SpecError(field, f"expected a {what} name or number, got {part!r}")
    return text


def check_mounts(mounts: Iterable[Mount]) -> tuple[Mount, ...]:
    """The mounts, each target once, parents before what is mounted below them."""
    out = tuple(mounts)
    seen: dict[str, Mount] = {}
    for m in out:
        if not isinstance(m, Mount):
            raise SpecError("volumes", f"expected a Mount, got {m!r:.60}")
        field = "tmpfs" if m.kind == "tmpfs" else "volumes"
        if m.kind not in ("bind", "volume", "tmpfs"):
            raise SpecError(field, f"expected a bind, volume or tmpfs mount, got {m.kind!r}")
        if m.target in seen:
            raise SpecError(
                field,
                f"{m.target} is the target of two mounts ({seen[m.target].describe()!r}"
                f" and {m.describe()!r})",
            )
        seen[m.target] = m
    # Shorter targets first: a volume at /data/cache goes on top of one at
    # /data, whatever the order given (Docker sorts the same way).
    return tuple(sorted(out, key=lambda m: m.target.count("/")))
