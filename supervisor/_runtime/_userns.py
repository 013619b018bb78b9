"""User-namespace mode: id ranges for sandboxes, and root file systems they can use.

A sandbox with ``userns = true`` runs in a user namespace whose ids 0 to
``size - 1`` are host ids ``base`` to ``base + size - 1`` (see
``supervisor/_runtime/_linux/_child.py`` for how the namespace is made and mapped).
Its root is then an ordinary, unprivileged user on the host: a process that
escaped every other layer would hold no host privilege, and files it
created on the host would belong to that nobody.

Ranges: a sandbox that names its ``userns_base`` uses that (sandboxes naming
the same base share the range, on purpose); the others get a range of their
own from :data:`~supervisor._runtime._security.USERNS_POOL`, which no other live
sandbox of this host uses. A range is claimed by creating
``RUN_DIR/userns/SLOT`` exclusively, holding the sandbox's name and the
claiming process (PID and start time), and is released when the sandbox is
destroyed. A claim is a crash's leftover, and taken over, when its sandbox
has no record, it is older than :data:`~._records.STALE_AFTER` (the one
rule of :mod:`._records`) *and* the process that claimed it is gone: a
creation that takes long (copying a large rootfs shifted) keeps its claim.
Judging a claim stale and replacing it, and releasing one, happen under a
lock on ``RUN_DIR/userns`` (``flock``, across processes): two creations
that both judged the same claim stale would otherwise each delete it and
make their own, the second deleting the first's, and share the range.

Root file systems: inside the namespace, a file owned by host uid 0 belongs
to nobody (the overflow id), so the sandbox's root could not write its own
``/etc``. Where the rootfs's file system and the kernel support it, the
lower layer is an *idmapped mount* of the rootfs (made by a helper in the
host's user namespace, attached in the sandbox's mount namespace: see
``enter_new_userns``), which shows host uid 0 as the sandbox's root at no
cost. Elsewhere (e.g. tmpfs before Linux 6.3, 9p, ramfs) it is a *shifted
copy*: the rootfs copied once per range with every owner moved up by
``base``, kept under ``STATE_DIR/rootfs-userns/`` and reused. Either way the
sandbox's own writable layer is owned by ``base``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator

from .._errors import SandboxError
from ._linux._fdlimit import patiently
from ._records import abandoned, record_path
from ._security import USERNS_POOL, USERNS_SIZE, Security

__all__ = [
    "RangeInUse",
    "allocate_range",
    "check_reachable",
    "give_pipes",
    "hold_range",
    "release_all",
    "shift_owners",
    "shifted_rootfs",
]


class RangeInUse(SandboxError):
    """The id range a restore asked for is another sandbox's."""


def allocate_range(
    security: Security,
    name: str,
    run_dir: str,
    undo: contextlib.ExitStack,
    dumped: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The host (base, size) for sandbox *name*; a pool range is claimed
    and *undo* releases it. A restore passes the range its checkpoint was
    *dumped* with: that one, or a :class:`SandboxError` naming who has it."""
    if security.userns_base is not None:
        return security.userns_base, security.userns_size
    first, count = USERNS_POOL
    size = security.userns_size
    units = -(-size // USERNS_SIZE)  # the pool is claimed in units of USERNS_SIZE ids
    claims = os.path.join(run_dir, "userns")
    os.makedirs(claims, mode=0o700, exist_ok=True)
    starts: range | list[int] = range(0, count - units + 1, units)
    if dumped is not None:
        base, size = dumped
        units = -(-size // USERNS_SIZE)
        start, off = divmod(base - first, USERNS_SIZE)
        if off or start < 0 or start + units > count:
            raise SandboxError(
                f"sandbox {name!r}: userns: its checkpoint's id range {base}-{base + size - 1}"
                " is outside this host's pool"
            )
        starts = [start]
    ours = _ours(claims)
    if dumped is None:
        # The slots below `low` are all this process's: begin past them.
        starts = range(-(-ours.low // units) * units, count - units + 1, units)
    for start in starts:
        if dumped is None and ours.holds(start, units):
            continue  # no claim to open, lock and read: it is ours, alive
        paths = [os.path.join(claims, str(start + i)) for i in range(units)]
        taken = []
        for path in paths:
            if not _claim(path, name, run_dir):
                break
            taken.append(path)
        if len(taken) == units:
            ours.add(start, units)
            for path in taken:
                undo.callback(patiently, _release, path, name)
            return first + start * USERNS_SIZE, size
        for path in taken:
            _release(path, name)
        if dumped is not None:
            try:
                holder = f"sandbox {_read(paths[len(taken)])[0]!r}"
            except FileNotFoundError:
                holder = "another sandbox"  # released since: it was in use then
            raise RangeInUse(
                f"sandbox {name!r}: userns: its checkpoint's id range"
                f" {dumped[0]}-{dumped[0] + size - 1} is in use by {holder}"
                " (a sandbox is restored with the ids it was dumped with)"
            )
    raise SandboxError(f"sandbox {name!r}: userns: every id range of the pool is in use")


def _claim(path: str, name: str, run_dir: str) -> bool:
    if _create(path, name):
        return True
    with _locked(os.path.dirname(path)):
        if not _stale(path, run_dir):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Only a claimer without the lock can be first here, by creating
        # the slot afresh: then the slot is its.
        return _create(path, name)


def _create(path: str, name: str) -> bool:
    """Create the claim *path* for sandbox *name*; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    pid = os.getpid()
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"name": name, "pid": pid, "start": _own_start_time(pid)}, f)
    except BaseException as exc:
        # An empty claim names no owner: nobody would release it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if isinstance(exc, OSError) and exc.filename is None:
            # A write's error (a full disk) names no file: the message does.
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    return True


@contextlib.contextmanager
def _locked(claims: str) -> Iterator[None]:
    """Hold the lock of the claims directory (every process, every thread:
    each call opens the directory afresh, and flock locks an open file)."""
    fd = os.open(claims, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: str) -> tuple[str, tuple[int, int | None] | None]:
    """A claim's sandbox name, and its claimer (PID, start time) if known.

    Raises FileNotFoundError. A claim of an older corral holds just the
    name; one read while being written may be empty (no record has that
    name, and it is young).
    """
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        name, pid, start = data["name"], data["pid"], data["start"]
    except (ValueError, KeyError, TypeError):
        return text, None
    if type(name) is not str or type(pid) is not int or type(start) not in (int, type(None)):
        return text, None
    return name, (pid, start)


def _stale(path: str, run_dir: str) -> bool:
    try:
        owner, claimer = _read(path)
    except FileNotFoundError:
        return True
    if not abandoned(path, record_path(run_dir, owner)):
        return False
    # Its sandbox has no record, and it is old: a crash's, unless the
    # process that claimed it is still making the sandbox.
    return claimer is None or claimer[1] is None or _start_time(claimer[0]) != claimer[1]


_OWN_START: dict[int, int | None] = {}


def _own_start_time(pid: int) -> int | None:
    """This process's start time, read once (per PID: a forked child reads
    its own). /proc/PID/stat of a process with many threads is not free,
    and every claim names its claimer."""
    if pid not in _OWN_START:
        _OWN_START[pid] = _start_time(pid)
    return _OWN_START[pid]


def _start_time(pid: int) -> int | None:
    """When process *pid* started (clock ticks after boot), None if it is
    gone: with the PID, it names a process even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces and parentheses.
    return int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])


class _Ours:
    """The slots of one claims directory that this process holds.

    A claim is a file, and judging one that exists (a lock, a read, a stat
    of its sandbox's record) costs some 30 us: a search from slot 0 past
    every held claim made each creation pay for all the sandboxes before it,
    seconds per sandbox at 10,000. What this process claimed (or took back
    with its sandbox) it knows is alive without looking. ``low``: every slot
    below it is held here, so a search begins there.
    """

    def __init__(self) -> None:
        self._held: set[int] = set()
        self.low = 0
        self._lock = threading.Lock()  # creations run in worker threads

    def holds(self, start: int, units: int) -> bool:
        return any(start + i in self._held for i in range(units))

    def add(self, start: int, units: int) -> None:
        with self._lock:
            self._held.update(range(start, start + units))
            while self.low in self._held:
                self.low += 1

    def drop(self, slot: int) -> None:
        with self._lock:
            self._held.discard(slot)
            self.low = min(self.low, slot)


_OURS: dict[str, _Ours] = {}
_OURS_LOCK = threading.Lock()


def _ours(claims: str) -> _Ours:
    with _OURS_LOCK:
        return _OURS.setdefault(claims, _Ours())


def _slots(ids: object) -> range | None:
    """The pool slots of a range [base, size] from a record, None if it is
    not one the pool hands out (a base the sandbox named, or no range)."""
    if not (isinstance(ids, list | tuple) and len(ids) == 2):
        return None
    base, size = ids
    if type(base) is not int or type(size) is not int or size < 1:
        return None
    first, count = USERNS_POOL
    start, off = divmod(base - first, USERNS_SIZE)
    units = -(-size // USERNS_SIZE)
    if off or start < 0 or start + units > count:
        return None
    return range(start, start + units)


def hold_range(run_dir: str, ids: object) -> None:
    """Note that the range *ids* ([base, size], from the record of a sandbox
    taken back) is held by this process now, as if it had claimed it."""
    slots = _slots(ids)
    if slots is not None:
        _ours(os.path.join(run_dir, "userns")).add(slots.start, len(slots))


def release_all(run_dir: str, name: str, ids: object = None) -> None:
    """Release the id claims of sandbox *name*: those of its range *ids*
    ([base, size], from its record) or, not knowing it (a record of an
    older corral, a sandbox swept without record), every claim that names
    it."""
    claims = os.path.join(run_dir, "userns")
    slots = _slots(ids)
    if slots is not None:
        entries = [str(slot) for slot in slots]
    else:
        try:
            entries = os.listdir(claims)
        except FileNotFoundError:
            return
    for entry in entries:
        _release(os.path.join(claims, entry), name)


def _release(path: str, name: str) -> None:
    claims, entry = os.path.split(path)
    with _locked(claims):
        try:
            if _read(path)[0] != name:
                return  # taken over already
            os.unlink(path)
        except FileNotFoundError:
            pass
    with contextlib.suppress(ValueError):
        _ours(claims).drop(int(entry))


def give_pipes(stdio: tuple[int, int, int], uid: int) -> None:
    """Hand the pipes among *stdio* that the host's root owns to the
    sandbox's root (host uid and gid *uid*), as runc does with the pipes it
    makes.

    A program that writes to ``/dev/stdout`` or ``/dev/stderr`` (nginx's
    logs, ``echo >/dev/stderr`` in a script) opens its descriptor again
    through ``/proc/self/fd``, which checks the pipe's owner and mode (0600)
    like a file's: owned by the host's root, who is nobody in the sandbox's
    user namespace, the open fails with EACCES. Terminals and files are
    left alone: they are the caller's, not corral's to give away."""
    for fd in stdio:
        try:
            st = os.fstat(fd)
            if stat.S_ISFIFO(st.st_mode) and st.st_uid == 0:
                # The group too: the sandbox's root may give the pipe on to
                # the user it runs its command as only if both are mapped.
                os.fchown(fd, uid, uid)
        except OSError as exc:
            raise SandboxError(f"userns: cannot give the sandbox its stdio pipes: {exc}") from None


def check_reachable(path: str, uid: int, what: str = "the sandbox's layers") -> None:
    """Raise :class:`SandboxError` unless host user *uid* (whose only group
    is the same number) may search every directory from / to *path*
    (which leads to *what* the sandbox's root mounts)."""
    parts = os.path.abspath(path).split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[: i + 1]) or "/"
        st = os.stat(d)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == uid:  # the sandbox's root group has the same host id
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise SandboxError(
                f"userns: {d} is not searchable by the sandbox's root (host uid {uid}),"
                f" which mounts {what}: allow it (chmod o+x {d})"
                " or use a state directory it can reach (CORRAL_STATE_DIR)"
            )


def shifted_rootfs(lower: str, base: int, size: int, state_dir: str) -> str:
    """A copy of the rootfs *lower* whose owners are shifted up by *base*
    (cached: made once per rootfs and range)."""
    import hashlib

    st = os.stat(lower)
    key = hashlib.sha256(f"{lower}\0{st.st_ino}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(state_dir, "rootfs-userns")
    final = os.path.join(cache, f"{base}-{size}-{key}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache, mode=0o711, exist_ok=True)
    check_reachable(cache, base)
    tmp = os.path.join(cache, f".{base}-{size}-{key}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # cp keeps hard links, special files and xattrs; --reflink shares
        # blocks where the file system can.
        subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", lower, tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        shift_owners(tmp, base, 0, size)
        os.rename(tmp, final)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SandboxError(
            f"userns: cannot copy the rootfs {lower}: {exc.stderr.strip() or exc}"
        ) from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(final):  # made meanwhile by another sandbox
            return final
        raise SandboxError(f"userns: cannot shift the rootfs {lower}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def shift_owners(top: str, delta: int, first: int, count: int) -> None:
    """Move the owner of every file below *top* (and of *top*) by *delta*:
    a rootfs into a sandbox's id range (``delta`` = its base), or a
    user-namespace sandbox's files back to the image's ids (``-base``).

    Every owner must be one of the *count* ids from *first*; a file whose
    owner is not is named in a :class:`SandboxError`. Each file is moved
    once however many hard links it has; what ``chown`` would lose is kept:
    set-id bits, file capabilities (their root id moved too), and the ids
    of POSIX ACL entries are moved with the owner.
    """

    def fail(exc: OSError) -> None:
        raise exc

    seen: set[tuple[int, int]] = set()
    _shift_one(top, delta, first, count, seen)
    for root, dirs, files in os.walk(top, onerror=fail):
        for n in dirs + files:
            _shift_one(os.path.join(root, n), delta, first, count, seen)


_CAPS = "security.capability"
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")


def _shift_one(entry: str, delta: int, first: int, count: int, seen: set[tuple[int, int]]) -> None:
    st = os.lstat(entry)
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in seen:
            return  # moved through another of its links already
        seen.add((st.st_dev, st.st_ino))
    for owner in (st.st_uid, st.st_gid):
        if not first <= owner < first + count:
            raise SandboxError(
                f"userns: {entry} is owned by {st.st_uid}:{st.st_gid}, outside the"
                f" {count} ids from {first}"
            )
    link = stat.S_ISLNK(st.st_mode)
    caps = None
    if not link and stat.S_ISREG(st.st_mode):
        with contextlib.suppress(OSError):  # ENODATA: none; EOPNOTSUPP: none possible
            caps = os.getxattr(entry, _CAPS, follow_symlinks=False)
    os.lchown(entry, st.st_uid + delta, st.st_gid + delta)
    # chown clears the set-id bits and the capabilities of a file; the
    # copy keeps them.
    if not link and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(entry, stat.S_IMODE(st.st_mode))
    if caps is not None:
        os.setxattr(
            entry, _CAPS, _moved_caps(caps, delta, first, count, entry), follow_symlinks=False
        )
    if not link:
        for name in _ACLS:
            try:
                acl = os.getxattr(entry, name, follow_symlinks=False)
            except OSError:
                continue
            os.setxattr(
                entry, name, _moved_acl(acl, delta, first, count, entry), follow_symlinks=False
            )


_CAP_V2, _CAP_V3 = 0x02000000, 0x03000000
_CAP_REVISION = 0xFF000000


def _moved_caps(raw: bytes, delta: int, first: int, count: int, entry: str) -> bytes:
    """A ``security.capability`` value whose root id is moved by *delta*
    (``vfs_cap_data``: revision 2 has root id 0; revision 3 names one, and
    is what a user namespace's root id other than 0 needs)."""
    (magic,) = struct.unpack_from("<I", raw)
    revision = magic & _CAP_REVISION
    if revision == _CAP_V2 and len(raw) >= 20:
        rootid = 0
    elif revision == _CAP_V3 and len(raw) >= 24:
        (rootid,) = struct.unpack_from("<I", raw, 20)
    else:
        raise SandboxError(f"userns: {entry}: file capabilities of an unknown format")
    if not first <= rootid < first + count:
        raise SandboxError(
            f"userns: {entry}: file capabilities for root id {rootid}, outside the"
            f" {count} ids from {first}"
        )
    rootid += delta
    body = raw[4:20]
    flags = magic & ~_CAP_REVISION
    if rootid == 0:
        return struct.pack("<I", _CAP_V2 | flags) + body
    return struct.pack("<I", _CAP_V3 | flags) + body + struct.pack("<I", rootid)


_ACL_USER, _ACL_GROUP = 0x02, 0x08


def _moved_acl(raw: bytes, delta: int, first: int, count: int, entry: str) -> bytes:
    """A POSIX ACL xattr (version 2: entries of tag, permissions, id) with
    the ids of its named users and groups moved by *delta*."""
    if len(raw) < 4 or (len(raw) - 4) % 8:
        raise SandboxError(f"userns: {entry}: a POSIX ACL of an unknown format")
    out = bytearray(raw)
    for at in range(4, len(raw), 8):
        tag, _, qualifier = struct.unpack_from("<HHI", raw, at)
        if tag in (_ACL_USER, _ACL_GROUP):
            if not first <= qualifier < first + count:
                raise SandboxError(
                    f"userns: {entry}: a POSIX ACL entry for id {qualifier}, outside the"
                    f" {count} ids from {first}"
                )
            struct.pack_into("<I", out, at + 4, qualifier + delta)
    return bytes(out)
