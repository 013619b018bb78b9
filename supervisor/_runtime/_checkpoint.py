"""Checkpoints of sandboxes with CRIU: what is stored, and how CRIU is driven.

A checkpoint is a directory (layout in ``docs/checkpoint.md``)::

    STATE_DIR/checkpoints/NAME/TAG/
        checkpoint.json    what it is: spec, limits, sizes, times, stdio keys
        images/            CRIU's image files and dump.log
        upper/             a copy of the sandbox's writable layer

It is written as ``.TAG.partial`` and renamed into place when complete, so
a checkpoint that exists is whole; a failed dump leaves nothing.

How CRIU is driven follows runc (``libcontainer/criu_linux.go``), where it
applies to us: the tree is dumped from its init with every namespace; the
one bind mount from the host (tini at /dev/init) is declared external and
mapped back on restore; the sandbox's stdio pipes are dumped as keys and
replaced on restore with ``--inherit-fd``; the restored tree is placed in a
new cgroup with ``--cgroup-root`` (CRIU's "soft" mode keeps our limits);
TCP connections, file locks and external Unix sockets are dumped (the
sandbox's network namespace is its own). Unlike runc, the rootfs for the
restore is mounted only in CRIU's private mount namespace (see
:func:`._linux._child._run_restorer`), never on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator

from .._errors import CheckpointError, CriuUnavailableError
from ._linux._sysinfo import ALLOW_ALL_FILTER, NOTIFY_FILTER
from ._mounts import mount_from_dict
from ._net._model import Port
from ._security import Security, make_security
from ._spec import Limits, SandboxSpec

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._tuples import NamedTuple

__all__ = [
    "CRIU_ENV",
    "CRIU_OPTIONS",
    "IMAGE_DIRS",
    "INIT_KEY",
    "NET_KEY",
    "CheckpointInfo",
    "CheckpointStore",
    "CriuInfo",
    "check_criu",
    "criu_failure",
    "disarm_sysinfo_filters",
    "find_crit",
    "remap_images",
    "restore_weakens",
    "spec_from_dict",
    "spec_to_dict",
    "validate_tag",
]

CRIU_ENV = "CORRAL_CRIU"
"""Environment variable naming the criu binary (default: ``criu`` on PATH)."""
FORMAT = 1
INIT_KEY = "corral-init"
"""CRIU's name for the external /dev/init bind mount (tini from the host)."""
NET_KEY = "corral-net"
"""CRIU's name for a bridged sandbox's network namespace (external: the
restore is given a new one, plugged with the same lease)."""
CRIU_TIMEOUT = 600.0
CRIU_OPTIONS = ("--manage-cgroups=soft", "--tcp-established", "--file-locks", "--ext-unix-sk")
"""Options every dump and restore of a sandbox takes (the sandbox's network
namespace is its own; our cgroup's limits stay). ``--manage-cgroups`` has an
optional argument, so it needs the ``=``."""

_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ERROR_RE = re.compile(r"^(?:\(\s*[\d.]+\)\s*)?Error \([^)]*\):\s*(.*)$")
# Not reasons: helper programs' exit statuses, and the iptables tools CRIU
# tries (and does without) when it locks the network with nftables.
_NOISE = re.compile(r'^(exited, status=\d+|execvp\("ip6?tables[-a-z]*", \.\.\.\) failed: .*)$')
_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class CriuInfo(NamedTuple):
    """A working CRIU: where it is and how it locks the network."""

    binary: str
    version: str
    network_lock: str
    """``nftables`` where CRIU supports it, else ``iptables``."""
    crit: str | None = None
    """CRIU's image tool, when memory changes can be tracked (soft-dirty):
    then a leave-running checkpoint pre-dumps memory while the sandbox runs
    and reads the pre-dump's frozen time back with it."""


def restore_weakens(criu: CriuInfo, security: Security) -> str:
    """What a sandbox with *security* loses when *criu* restores it ('' if nothing).

    CRIU before 3.19 does not record ``no_new_privs`` (CRIU pull request
    2228), so the restored processes run without it: a setuid program in
    the sandbox works again there. Their capabilities and seccomp filter
    are restored.
    """
    if security.privileged or not security.no_new_privs:
        return ""
    m = re.match(r"(\d+)\.(\d+)", criu.version)
    if m and (int(m[1]), int(m[2])) >= (3, 19):
        return ""
    return f"no_new_privs (CRIU {criu.version} does not restore it; 3.19 does)"


def _find_criu() -> str:
    configured = os.environ.get(CRIU_ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise CriuUnavailableError(
                f"checkpointing needs CRIU: {CRIU_ENV}={configured!r} is not an executable file"
            )
        return configured
    path = os.environ.get("PATH", "") + ":" + ":".join(_SEARCH_PATH)
    found = shutil.which("criu", path=path)
    if found is None:
        raise CriuUnavailableError(
            "checkpointing needs CRIU, which is not installed (apt-get install criu)"
        )
    return found


def criu_failure(text: str) -> str:
    """CRIU's reason for a failure, on one line, from its log or output.

    The ``Error (file:line): ...`` lines, without the "exited, status=N"
    noise of helper programs, deduplicated; the last ones say most.
    """
    reasons: list[str] = []
    for line in text.splitlines():
        m = _ERROR_RE.match(line.strip())
        if not m:
            continue
        msg = m.group(1).strip()
        if not msg or _NOISE.match(msg) or msg in reasons:
            continue
        reasons.append(msg)
    if not reasons:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return last[-1] if last else "no reason given"
    return "; ".join(reasons[-3:])


_checked: dict[str, CriuInfo | CriuUnavailableError] = {}


def check_criu() -> CriuInfo:
    """Check (once per binary and process) that CRIU works on this kernel.

    Raises :class:`CriuUnavailableError` quoting ``criu check`` if not.
    """
    import subprocess

    binary = _find_criu()
    cached = _checked.get(binary)
    if isinstance(cached, CriuUnavailableError):
        raise cached
    if cached is not None:
        return cached
    try:
        proc = subprocess.run(
            [binary, "check"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = CriuUnavailableError(
            f"checkpointing needs CRIU: cannot run '{binary} check': {exc}"
        )
        _checked[binary] = error
        raise error from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "Looks good" not in output:
        error = CriuUnavailableError(
            f"checkpointing is not available on this kernel: 'criu check' failed:"
            f" {criu_failure(output)}"
        )
        _checked[binary] = error
        raise error
    version = subprocess.run(
        [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"Version:\s*(\S+)", version)
    crit = shutil.which("crit", path=os.path.dirname(binary) + ":" + ":".join(_SEARCH_PATH))
    info = CriuInfo(
        binary=binary,
        version=m.group(1) if m else "unknown",
        network_lock="nftables" if _has_feature(binary, "network_lock_nftables") else "iptables",
        crit=crit if _has_feature(binary, "mem_dirty_track") else None,
    )
    _checked[binary] = info
    return info


def _has_feature(binary: str, feature: str) -> bool:
    """``criu check --feature FEATURE`` passes."""
    import subprocess

    try:
        proc = subprocess.run(
            [binary, "check", "--feature", feature],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def validate_tag(tag: str) -> str:
    """A checkpoint tag: letters, digits, ``_ . -``, at most 64 characters."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise CheckpointError(
            f"tag: expected 1-64 letters, digits, '_', '.' or '-' starting with a letter or"
            f" digit, got {tag!r}"
        )
    return tag


def spec_to_dict(spec: SandboxSpec) -> dict[str, Any]:
    """Plain-data form of a spec (for checkpoint.json)."""
    return {
        "name": spec.name,
        "argv": list(spec.argv),
        "rootfs": spec.rootfs,
        "hostname": spec.hostname,
        "env": dict(spec.env),
        "workdir": spec.workdir,
        "limits": spec.limits.to_dict(),
        "security": spec.security.to_dict(),
        "mounts": [m.to_dict() for m in spec.mounts],
        "user": spec.user,
        "read_only": spec.read_only,
        "network": spec.network,
        "ports": [p.to_dict() for p in spec.ports],
        "egress": list(spec.egress) if spec.egress is not None else "all",
        "lxcfs": spec.lxcfs,
    }


def spec_from_dict(d: dict[str, Any]) -> SandboxSpec:
    """Inverse of :func:`spec_to_dict` (validating again)."""
    return SandboxSpec(
        name=d["name"],
        argv=d["argv"],
        rootfs=d["rootfs"],
        hostname=d.get("hostname"),
        env=d.get("env") or {},
        workdir=d.get("workdir", "/"),
        limits=Limits.from_dict(d.get("limits") or {}),
        # Checkpoints from before security settings ran with every capability.
        security=make_security(**d["security"])
        if "security" in d
        else make_security(privileged=True, no_new_privs=False),
        mounts=[mount_from_dict(m) for m in d.get("mounts") or ()],
        user=d.get("user"),
        read_only=bool(d.get("read_only", False)),
        network=str(d.get("network", "none")),
        ports=[Port(**p) for p in d.get("ports") or ()],
        egress=None if d.get("egress", "all") == "all" else d["egress"],
        lxcfs=bool(d.get("lxcfs", True)),
    )


class CheckpointInfo(NamedTuple):
    """One checkpoint on disk (what ``checkpoint.json`` says)."""

    name: str
    """The sandbox (or supervised instance) it was taken of."""
    tag: str
    path: str
    created: float
    """Unix time the dump finished."""
    size: int
    """Bytes on disk: CRIU images plus the writable layer."""
    duration: float
    """Seconds the whole checkpoint took."""
    frozen: float
    """Seconds the sandbox was frozen."""
    criu_seconds: float
    """Seconds of that spent in ``criu dump``."""
    leave_running: bool
    spec: SandboxSpec
    lowerdir: str
    root_pid: int
    """The init's host PID when dumped (CRIU names its network lock after it)."""
    stdio: tuple[str, str, str]
    """What the init's fds 0-2 were (``pipe:[N]`` keys for ``--inherit-fd``)."""
    network_lock: str
    address: str | None = None
    """A bridged sandbox's address when dumped: its restore leases it again
    (its TCP connections are bound to it). None for the other modes."""
    userns: tuple[int, int] | None = None
    """A user-namespace sandbox's host id range (base, size) when dumped:
    its restore claims the same range (CRIU recreates the namespace with
    the dumped map, and the files of its layer belong to those ids)."""

    @property
    def images(self) -> str:
        """The directory of CRIU's image files."""
        return os.path.join(self.path, "images")

    @property
    def upper(self) -> str:
        """The copy of the writable layer."""
        return os.path.join(self.path, "upper")

    def to_json(self) -> dict[str, Any]:
        """The ``checkpoint.json`` document."""
        d = self._asdict()
        del d["path"]
        d["spec"] = spec_to_dict(self.spec)
        d["stdio"] = list(self.stdio)
        d["format"] = FORMAT
        return d

    @classmethod
    def load(cls, path: str) -> CheckpointInfo:
        """Read and check a checkpoint directory; :class:`CheckpointError` if
        it is missing, incomplete or corrupt."""
        meta = os.path.join(path, "checkpoint.json")
        try:
            with open(meta) as f:
                d = json.load(f)
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r}")
            info = cls(
                name=str(d["name"]),
                tag=str(d["tag"]),
                path=path,
                created=float(d["created"]),
                size=int(d["size"]),
                duration=float(d["duration"]),
                frozen=float(d["frozen"]),
                criu_seconds=float(d["criu_seconds"]),
                leave_running=bool(d["leave_running"]),
                spec=spec_from_dict(d["spec"]),
                lowerdir=str(d["lowerdir"]),
                root_pid=int(d["root_pid"]),
                stdio=tuple(str(s) for s in d["stdio"]),  # type: ignore[arg-type]
                network_lock=str(d["network_lock"]),
                address=str(d["address"]) if d.get("address") else None,
                userns=_id_range(d.get("userns")),
            )
        except FileNotFoundError:
            if not os.path.isdir(path):
                raise CheckpointError(f"no checkpoint at {path}") from None
            raise CheckpointError(f"checkpoint {path} is incomplete: no checkpoint.json") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: checkpoint.json: {exc}") from None
        for sub in ("images", "upper"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise CheckpointError(f"checkpoint {path} is corrupt: {sub}/ is missing")
        if not os.path.isfile(os.path.join(path, "images", "inventory.img")):
            raise CheckpointError(f"checkpoint {path} is corrupt: images/inventory.img is missing")
        return info


def _id_range(value: Any) -> tuple[int, int] | None:
    """checkpoint.json's ``userns`` (``[base, size]`` or absent)."""
    if value is None:
        return None
    base, size = value
    if not (isinstance(base, int) and isinstance(size, int) and base > 0 and size > 0):
        raise ValueError(f"userns: expected [base, size] of positive integers, got {value!r}")
    return base, size


def dir_size(path: str) -> int:
    """Bytes used by the files below *path* (hard links counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


class CheckpointStore:
    """The checkpoints below ``STATE_DIR/checkpoints``, by sandbox name and tag."""

    def __init__(self, root: str) -> None:
        self.root = root

    def dir(self, name: str) -> str:
        """Where *name*'s checkpoints live."""
        return os.path.join(self.root, name)

    def path(self, name: str, tag: str) -> str:
        """Where one checkpoint lives (it may not exist)."""
        return os.path.join(self.root, name, validate_tag(tag))

    def new_tag(self, name: str) -> str:
        """A fresh tag that sorts by time (``20261129T101500.123456``)."""
        now = time.time()
        base = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
        tag, n = base, 0
        while os.path.exists(os.path.join(self.root, name, tag)):
            n += 1
            tag = f"{base}-{n}"
        return tag

    def list(self, name: str) -> list[CheckpointInfo]:
        """*name*'s complete checkpoints, oldest first (corrupt ones skipped)."""
        try:
            entries = os.listdir(self.dir(name))
        except FileNotFoundError:
            return []
        out = []
        for tag in entries:
            if tag.startswith("."):
                continue
            try:
                out.append(CheckpointInfo.load(os.path.join(self.dir(name), tag)))
            except CheckpointError:
                continue
        out.sort(key=lambda c: (c.created, c.tag))
        return out

    def names(self) -> Iterator[str]:
        """Every sandbox name with a checkpoint directory."""
        try:
            yield from sorted(os.listdir(self.root))
        except FileNotFoundError:
            return

    def find(self, name: str, tag: str | None = None) -> CheckpointInfo:
        """A checkpoint by tag, or the latest; :class:`CheckpointError` if none."""
        if tag is not None:
            return CheckpointInfo.load(self.path(name, tag))
        found = self.list(name)
        if not found:
            raise CheckpointError(f"sandbox {name!r} has no checkpoint (in {self.dir(name)})")
        return found[-1]

    def delete(self, info: CheckpointInfo) -> None:
        """Remove one checkpoint (renamed away first, so it is never half there)."""
        trash = os.path.join(os.path.dirname(info.path), f".{info.tag}.deleting")
        try:
            os.rename(info.path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def disarm_sysinfo_filters(images: str) -> int:
    """Rewrite each ``sysinfo`` notify filter (:data:`NOTIFY_FILTER`) in
    the dump in *images* into one that allows everything; how many.

    CRIU restores a filter without its listener, and a ``USER_NOTIF`` with
    no listener fails the call with ENOSYS (busybox's ``free`` then prints
    garbage, glibc's ``get_phys_pages`` returns it). Rewritten, a restored
    sandbox's ``sysinfo`` is the kernel's: the host's numbers (a known
    limit, docs/view.md). The program is found by its exact bytes and
    replaced by as many (:data:`ALLOW_ALL_FILTER`), so the protobuf around
    it stays valid. Done once, at the dump, not at each restore: restores
    of one checkpoint may run at once, and they only read it.
    """
    path = os.path.join(images, "seccomp.img")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0  # no process of the tree had a filter
    count = data.count(NOTIFY_FILTER)
    if count:
        with open(path, "r+b") as f:
            f.write(data.replace(NOTIFY_FILTER, ALLOW_ALL_FILTER))
    return count


IMAGE_DIRS = ("images", "pre")
"""The directories of a checkpoint CRIU reads at a restore (``pre``: a
leave-running checkpoint's pre-dump, its ``images/parent``)."""


def remap_images(info: CheckpointInfo, into: str, base: int, crit: str) -> None:
    """Make *into* a copy of *info*'s image directories whose user
    namespace maps to host ids from *base* instead of the dumped range.

    CRIU records what the sandbox's processes and files own as ids of the
    namespace (0 for its root), and the namespace's map apart, in
    ``userns-ID.img``: that file alone is rewritten (decoded and encoded with
    CRIU's ``crit``). The others are hard links (copies across file
    systems), so a remap costs no copy of the memory pages."""
    assert info.userns is not None
    old = info.userns[0]
    remapped = 0
    os.mkdir(into, 0o700)
    for sub in IMAGE_DIRS:
        src = os.path.join(info.path, sub)
        if not os.path.isdir(src):
            continue
        dest = os.path.join(into, sub)
        os.mkdir(dest, 0o700)
        for entry in os.scandir(src):
            target = os.path.join(dest, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)  # images/parent -> ../pre
            elif _USERNS_IMAGE.fullmatch(entry.name):
                _remap_userns_image(entry.path, target, base - old, crit)
                remapped += sub == "images"
            elif entry.is_file():
                try:
                    os.link(entry.path, target)
                except OSError:
                    shutil.copy2(entry.path, target)
    if not remapped:
        # The tree would come back with the old range's ids: refuse.
        raise CheckpointError(f"checkpoint {info.path} has no user namespace image to move")


_USERNS_IMAGE = re.compile(r"userns-\d+\.img")
"""CRIU's image of a user namespace's maps (``userns-ID.img``)."""


def _remap_userns_image(src: str, dest: str, delta: int, crit: str) -> None:
    """The user namespace image *src* with every host id of its maps moved
    by *delta*, written to *dest*."""
    import subprocess

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [crit, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise CheckpointError(f"crit {args[0]} {src}: {reason}")
        return proc.stdout

    doc = json.loads(run("decode", "-i", src))
    for entry in doc["entries"]:
        for key in ("uid_map", "gid_map"):
            for extent in entry.get(key, ()):
                extent["lower_first"] += delta
    run("encode", "-o", dest, stdin=json.dumps(doc))


def find_crit(criu: CriuInfo) -> str | None:
    """CRIU's image tool, beside its binary or on the usual PATH."""
    return criu.crit or shutil.which(
        "crit", path=os.path.dirname(criu.binary) + ":" + ":".join(_SEARCH_PATH)
    )


def criu_frozen_seconds(crit: str, images: str) -> float | None:
    """CRIU's own frozen time of a dump or pre-dump (its stats-dump image,
    decoded with CRIU's ``crit``); None if it cannot be read."""
    import subprocess

    try:
        proc = subprocess.run(
            [crit, "decode", "-i", os.path.join(images, "stats-dump")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return float(json.loads(proc.stdout)["entries"][0]["dump"]["frozen_time"]) / 1e6
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError, TypeError):
        return None


def read_log(path: str) -> str:
    """A CRIU log's text ('' if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
