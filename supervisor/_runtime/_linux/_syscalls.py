"""The raw system calls the runtime needs and the standard library lacks.

Python 3.11 has ``os.pidfd_open`` and ``signal.pidfd_send_signal`` but not
``unshare``, ``setns``, ``mount`` or ``pivot_root`` (``os.unshare`` and
``os.setns`` arrived in 3.12), so they are reached through libc with ctypes.
Everything here raises :class:`OSError` with the errno and the path or
operation, like the standard library does; callers translate it at their
boundary.

This module must stay cheap to import and free of threads: it is used in
forked children before ``exec``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "FUSE_SUPER_MAGIC",
    "IN_CREATE",
    "IN_MODIFY",
    "IN_MOVED_TO",
    "IN_Q_OVERFLOW",
    "MNT_DETACH",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "PROC_SUPER_MAGIC",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "SYSFS_MAGIC",
    "UMOUNT_NOFOLLOW",
    "attach_tree",
    "attach_tree_at",
    "bind_tree",
    "fs_type",
    "fs_type_of",
    "idmapped_tree",
    "inotify_add_watch",
    "inotify_init",
    "inotify_read",
    "load_seccomp",
    "load_seccomp_listener",
    "mount",
    "new_sysfs",
    "openat2",
    "pivot_root",
    "reset_signals",
    "restrict_capabilities",
    "set_child_subreaper",
    "set_dumpable",
    "set_name",
    "set_parent_death_signal",
    "setns",
    "switch_user",
    "umount2",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NAME = 15

# glibc has no pivot_root wrapper; the number differs per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _fail(what: str, path: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (``unshare(2)``)."""
    if _libc.unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace that *fd* refers to (``setns(2)``).

    *fd* may also be a pidfd (Linux 5.8): then the calling process joins,
    atomically, every namespace of that process named in *nstype*.
    """
    if _libc.setns(fd, nstype) != 0:
        raise _fail(f"setns({nstype:#x})")


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """``mount(2)``; the error names the target and the file system type."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(f"mount {fstype or 'bind/remount'} on {target}", target)


def umount2(target: str, flags: int = 0) -> None:
    """``umount2(2)``."""
    if _libc.umount2(_b(target), flags) != 0:
        raise _fail(f"umount {target}", target)


def pivot_root(new_root: str, put_old: str) -> None:
    """``pivot_root(2)``, through ``syscall`` as glibc has no wrapper."""
    machine = os.uname().machine
    nr = _SYS_PIVOT_ROOT.get(machine)
    if nr is None:
        raise OSError(0, f"pivot_root: unsupported architecture {machine}")
    if _libc.syscall(nr, _b(new_root), _b(put_old)) != 0:
        raise _fail(f"pivot_root {new_root}", new_root)


def set_child_subreaper() -> None:
    """Keep orphaned descendants (sandbox inits) as our children.

    The spawn path forks an intermediate process that exits once the
    sandbox init exists; with this flag the init is re-parented to us, so we
    can ``waitid`` on its pidfd and learn its exit status.
    """
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_CHILD_SUBREAPER)")


def set_name(name: bytes) -> None:
    """Name the calling thread (``PR_SET_NAME``: its ``/proc/PID/comm``,
    what ``ps`` shows), up to 15 bytes; ``execve`` names it anew."""
    buf = ctypes.create_string_buffer(name[:15])
    if _libc.prctl(_PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_NAME)")


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send *signum* to the calling process when its
    parent (thread) dies (``PR_SET_PDEATHSIG``).

    It applies to the parent at the time of the call: a process about to be
    re-parented must wait until it has been, or the old parent's exit sends
    the signal. The kernel clears it at a fork and at a credential change
    that is not a plain loss of capabilities.
    """
    if _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_PDEATHSIG)")


def set_dumpable(dumpable: bool) -> None:
    """Set or clear the calling process's "dumpable" flag (``PR_SET_DUMPABLE``).

    An undumpable process's ``/proc/PID`` files (``exe``, ``mem``, ``fd``...)
    belong to root and it cannot be ptrace-attached without
    ``CAP_SYS_PTRACE``. ``execve`` sets the flag again for an ordinary binary.
    """
    if _libc.prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_DUMPABLE)")


IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor (``inotify_init1(2)``)."""
    fd = int(_libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        raise _fail("inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """Watch *path* for the events in *mask*; returns the watch descriptor."""
    wd = int(_libc.inotify_add_watch(fd, os.fsencode(path), mask))
    if wd < 0:
        raise _fail(f"inotify_add_watch {path}", path)
    return wd


def inotify_read(fd: int) -> list[tuple[int, bytes]]:
    """The events pending on the non-blocking inotify *fd*, as ``(mask, name)``.

    Reads until none is left. *name* is the entry's name in a watched
    directory (its NUL padding removed), ``b""`` for the watched file itself.
    """
    events: list[tuple[int, bytes]] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return events
        off = 0
        while off < len(data):
            _wd, mask, _cookie, n = _IN_EVENT.unpack_from(data, off)
            off += _IN_EVENT.size
            events.append((mask, data[off : off + n].rstrip(b"\0")))
            off += n


# rt_sigaction(2) by number: glibc's sigaction() refuses signals 32 and 33,
# which it keeps for itself, and Python cannot name them either.
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}.get(os.uname().machine)
_NSIG = 64
_SIGKILL, _SIGSTOP = 9, 19


def reset_signals() -> None:
    """Every signal's disposition back to the default, 32 and 33 included.

    An ignored signal stays ignored across ``execve``: a command must not
    inherit what its spawner's ancestors chose to ignore (a shell running a
    job in the background ignores SIGINT; some harnesses ignore 32 and 33).
    """
    import signal

    if _SYS_RT_SIGACTION is None:  # pragma: no cover - another architecture
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
        return
    # struct kernel_sigaction {handler, flags, restorer, mask}: all zero is
    # SIG_DFL with no flags and an empty mask.
    default = (ctypes.c_ulong * 4)()
    for n in range(1, _NSIG + 1):
        if n in (_SIGKILL, _SIGSTOP):
            continue
        if _libc.syscall(_SYS_RT_SIGACTION, n, ctypes.byref(default), None, 8) != 0:
            raise _fail(f"rt_sigaction({n})")
    # Python's own handlers (SIGINT) now point at defaults the interpreter
    # does not know of; that is fine: this process execs next.


_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def switch_user(uid: int, gid: int, groups: list[int]) -> None:
    """Become *uid*, with *gid* and the supplementary *groups* (needs
    CAP_SETUID and CAP_SETGID; the effective capabilities go with a uid
    other than 0, the permitted ones too unless ``PR_SET_KEEPCAPS``)."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def restrict_capabilities(
    keep: list[int],
    last_cap: int,
    no_new_privs: bool,
    user: tuple[int, int, list[int]] | None = None,
) -> None:
    """Keep only the capabilities *keep*: drop the rest from the bounding
    set (so no exec can bring them back), clear the ambient set, set the
    permitted and effective sets to *keep* and the inheritable set empty;
    then ``no_new_privs`` if asked. Needs CAP_SETPCAP (dropped last).

    With *user* (uid, gid, groups), become that user after the bounding
    set is dropped and before the sets are set: with ``PR_SET_KEEPCAPS``
    the permitted set survives the change of uid, so the capset that
    follows works whichever of CAP_SETUID, CAP_SETGID and CAP_SETPCAP
    *keep* lacks (runc's order)."""
    wanted = set(keep)
    for cap in range(last_cap + 1):
        if cap not in wanted and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise _fail(f"prctl(PR_CAPBSET_DROP, {cap})")
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    if user is not None:
        if _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            raise _fail("prctl(PR_SET_KEEPCAPS)")
        switch_user(*user)
        if _libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0:
            raise _fail("prctl(PR_SET_KEEPCAPS)")
    mask = sum(1 << c for c in wanted)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _fail("capset")
    if no_new_privs and _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_MAXINSNS = 4096
_SOCK_FILTER_SIZE = 8  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(bpf: bytes) -> None:
    """Install the seccomp filter *bpf* on the calling thread (``PR_SET_SECCOMP``).

    *bpf* is a ``struct sock_filter`` array exactly as libseccomp exported it
    (:func:`supervisor._runtime._seccomp.compile_filter`). The filter applies to this
    thread and everything it execs or forks, for good; it is loaded in the
    forked, single-threaded child just before ``execve``. The kernel wants
    ``no_new_privs`` or CAP_SYS_ADMIN first: the caller orders that.
    """
    count, rest = divmod(len(bpf), _SOCK_FILTER_SIZE)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"seccomp: not a BPF program ({len(bpf)} bytes)")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(count, ctypes.addressof(program))
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise _fail("prctl(PR_SET_SECCOMP)")


_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348}


def load_seccomp_listener(bpf: bytes) -> int:
    """Install the seccomp filter *bpf*, whose ``SECCOMP_RET_USER_NOTIF``
    answers someone else gives, and return its listener: a new
    close-on-exec descriptor (``SECCOMP_FILTER_FLAG_NEW_LISTENER``).

    The same rules as :func:`load_seccomp` (no_new_privs or CAP_SYS_ADMIN
    first). A chain that has a listener already refuses a second one
    (EBUSY). Until the listener is given to whoever answers, a trapped
    call waits; once every copy of it is closed, the call fails (ENOSYS).
    """
    count, rest = divmod(len(bpf), _SOCK_FILTER_SIZE)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"seccomp: not a BPF program ({len(bpf)} bytes)")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(count, ctypes.addressof(program))
    fd = _libc.syscall(
        _SYS_SECCOMP[os.uname().machine],
        ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(_SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.c_void_p(ctypes.addressof(fprog)),
    )
    if fd < 0:
        raise _fail("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
    return int(fd)


PROC_SUPER_MAGIC = 0x9FA0
SYSFS_MAGIC = 0x62656572
FUSE_SUPER_MAGIC = 0x65735546


def fs_type(path: str) -> int:
    """The file system type (``statfs(2)``'s ``f_type``, a magic number) at *path*."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    if _libc.statfs(os.fsencode(path), buf) != 0:
        raise _fail("statfs", path)
    # f_type is the first member, a long (__fsword_t).
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_type_of(fd: int, what: str) -> int:
    """:func:`fs_type` of what the descriptor *fd* (``O_PATH`` too) is, named *what*
    in an error: for a process whose ``/proc/self`` does not lead to itself
    (one that joined another PID namespace's mount namespace)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(ctypes.c_int(fd), buf) != 0:
        raise _fail("fstatfs", what)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


# The new mount API (Linux 5.2+; idmapped mounts 5.12+). These numbers are
# the same on every architecture (syscalls from 424 on are numbered alike).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_FSOPEN_CLOEXEC = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 1

_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached copy of the mount tree at *path* whose file owners are
    seen through the id map of the user namespace *userns_fd* (an idmapped
    mount); its descriptor (close-on-exec). Attach it with
    :func:`attach_tree`. Fails (EINVAL, EPERM, ENOSYS) where the file
    system or the kernel cannot idmap."""
    return _cloned_tree(path, _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd), "MOUNT_ATTR_IDMAP")


def _cloned_tree(path: str, attr: _MountAttr | None, what: str) -> int:
    """``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`` of *path*, with *attr*
    set on every mount of the copy (``mount_setattr``); its descriptor."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(-100),  # AT_FDCWD
        os.fsencode(path),
        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE),
    )
    if fd < 0:
        raise _fail("open_tree", path)
    if attr is not None and (
        _libc.syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        != 0
    ):
        err = _fail(f"mount_setattr({what})", path)
        os.close(fd)
        raise err
    return int(fd)


def attach_tree(fd: int, target: str) -> None:
    """Attach the detached mount tree *fd* (:func:`idmapped_tree`) at *target*."""
    if (
        _libc.syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(-100),
            os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
        != 0
    ):
        raise _fail("move_mount", target)


_MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


def new_sysfs(attr_set: int) -> int:
    """A detached mount of a new sysfs with the mount attributes *attr_set*;
    its descriptor (close-on-exec), for :func:`attach_tree`.

    A sysfs shows the network devices of the network namespace of the
    process that mounts it, and may be mounted only by a process privileged
    over that namespace's user namespace: one made here, then attached in
    another mount namespace, is how a sandbox in a user namespace of its own
    gets the /sys of a network namespace it does not own (the host's)."""
    ctx = _libc.syscall(_SYS_FSOPEN, b"sysfs", ctypes.c_uint(_FSOPEN_CLOEXEC))
    if ctx < 0:
        raise _fail("fsopen", "sysfs")
    try:
        if (
            _libc.syscall(
                _SYS_FSCONFIG,
                ctypes.c_int(ctx),
                ctypes.c_uint(_FSCONFIG_CMD_CREATE),
                None,
                None,
                ctypes.c_int(0),
            )
            != 0
        ):
            raise _fail("fsconfig", "sysfs")
        fd = _libc.syscall(
            _SYS_FSMOUNT,
            ctypes.c_int(ctx),
            ctypes.c_uint(_FSMOUNT_CLOEXEC),
            ctypes.c_uint(attr_set),
        )
        if fd < 0:
            raise _fail("fsmount", "sysfs")
        return int(fd)
    finally:
        os.close(ctx)


def bind_tree(path: str, attr_set: int, userns_fd: int = -1) -> int:
    """A detached recursive copy of the mount tree at *path* (``rbind``)
    with the mount attributes *attr_set* (``MOUNT_ATTR_RDONLY``...) set on
    every mount of it: read-only really is read-only, submounts too (a
    ``MS_REMOUNT`` would reach the top mount only). With *userns_fd*, also
    idmapped through that user namespace's map (see :func:`idmapped_tree`).
    Its descriptor (close-on-exec), for :func:`attach_tree_at`."""
    if userns_fd >= 0:
        attr = _MountAttr(attr_set | _MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        return _cloned_tree(path, attr, f"{attr_set:#x}|MOUNT_ATTR_IDMAP")
    plain = _MountAttr(attr_set, 0, 0, 0) if attr_set else None
    return _cloned_tree(path, plain, f"{attr_set:#x}")


def attach_tree_at(fd: int, target_fd: int, what: str) -> None:
    """Attach the detached mount tree *fd* on the file or directory that
    the ``O_PATH`` descriptor *target_fd* is (no path is looked up again:
    what was resolved safely is what is mounted on)."""
    if (
        _libc.syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(target_fd),
            b"",
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
        )
        != 0
    ):
        raise _fail("move_mount", what)


_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)`` (Linux 5.6): with ``RESOLVE_IN_ROOT`` every symlink
    and ``..`` in *path* is resolved as if *dirfd* were ``/``, so nothing
    can lead out of it (what ``chroot`` would do, for one lookup)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dirfd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        raise _fail("openat2", path)
    return int(fd)
