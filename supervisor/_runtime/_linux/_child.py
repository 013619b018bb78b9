"""What runs in the forked children that become a sandbox.

The arrangement, for a spawner process S (the CLI, or the keeper that a
multi-threaded supervisor uses; always single-threaded)::

    S ──fork──> intermediate: join the cgroup, unshare every namespace,
                 │            fork, send the init's PID and a pidfd up, exit
                 └─fork──> init (PID 1 of the new PID namespace): mount the
                           overlay root, /proc, /sys, /dev; pivot_root; set the
                           host name; bring up lo; exec tini -- COMMAND

Once the intermediate exits the init is re-parented to the nearest child
subreaper: the process that owns the sandbox (the CLI or the supervisor),
which then waits on the pidfd. The intermediate is needed because
``unshare(CLONE_NEWPID)`` only applies to children.

Errors travel up a ``SOCK_SEQPACKET`` socket as one JSON message; the
socket is close-on-exec, so end-of-file after the PID message means the
init has exec'd tini. Code here must not raise into its caller: a forked
child that unwound into the parent's stack would run the parent's code.

Adding a process to a running sandbox (``corral exec``) takes a similar
path, in :mod:`._exec`; it shares the helpers here, and
:func:`restrict_like_sandbox` is the one place that says what a process
entering a sandbox may keep.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
from collections.abc import Sequence

from . import _syscalls as sc
from ._proc import parent_pid, starttime
from ._sysinfo import NOTIFY_FILTER

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple, NoReturn, Protocol
else:
    from .._tuples import NamedTuple

__all__ = [
    "DEVICE_NAMES",
    "INIT_PATH",
    "LXCFS_FILES",
    "Identity",
    "LaunchConfig",
    "Privileges",
    "SetupFailure",
    "become_userns_root",
    "close_fds_except",
    "enter_new_userns",
    "resolve_user",
    "restrict_like_sandbox",
    "run_intermediate",
]

# Where tini is bind-mounted (read-only) inside the sandbox: the /dev tmpfs
# is ours, so the rootfs needs no file of ours to hold the mount point.
INIT_PATH = "/dev/init"

_NS_FLAGS = (
    sc.CLONE_NEWNS
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWNET
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWCGROUP
)

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
"""Hidden in a sandbox: an empty read-only tmpfs over a directory, the
sandbox's /dev/null over a file."""
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
"""Read-only in a sandbox (all of /sys is)."""

LXCFS_FILES = (
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
)
"""The files of lxcfs bind-mounted (read-only) over the sandbox's own,
relative to lxcfs's mount point and to the sandbox's root (docs/view.md)."""

_DEVICES = (  # name, major, minor, mode
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
)
DEVICE_NAMES = tuple(name for name, *_ in _DEVICES)
"""The device nodes every sandbox's /dev has (in a user namespace: the
host's, bound in)."""
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class LaunchConfig(NamedTuple):
    """Everything the children need, as plain data (it crosses to the keeper)."""

    argv: list[str]
    env: dict[str, str]
    hostname: str
    workdir: str
    lowerdir: str
    upperdir: str
    workdir_overlay: str
    merged: str
    init_binary: str
    cgroup_procs: list[str]
    stdin_devnull: bool = False
    """Give the command the sandbox's own /dev/null as stdin (not a host
    file: CRIU cannot checkpoint a descriptor of a file outside the sandbox)."""
    caps: list[int] | None = None
    """The capabilities the sandbox keeps (None: every one, privileged)."""
    confine: bool = False
    """Mask and make read-only the paths of /proc and /sys a sandbox must
    not see or write (:data:`MASKED_PATHS`, :data:`READONLY_PATHS`); mount
    the root ``nodev`` and /dev read-only, so that no device node but the
    standard ones is usable (what every sandbox gets but a privileged one)."""
    last_cap: int = -1
    """The host kernel's highest capability number."""
    no_new_privs: bool = False
    """Set ``no_new_privs`` before the exec."""
    seccomp: list[bytes] | None = None
    """The seccomp programs, loaded in order (None: none; see
    :func:`supervisor._runtime._seccomp.compile_filter`)."""
    rlimits: list[list[int]] | None = None
    """``[resource, soft, hard]`` triples set before the exec."""
    userns: list[int] | None = None
    """``[base, size]``: run in a new user namespace whose ids 0 to size - 1
    are the host's base to base + size - 1 (None: no user namespace)."""
    idmap_lower: bool = False
    """With ``userns``: see each layer of ``lowerdir`` through an idmapped
    mount (attached at ``idmap_target/N`` in the sandbox's mount namespace,
    N counting from the top) instead of using it as it is (then copies
    whose owners are shifted already)."""
    volume_target: str = ""
    """Restoring a user-namespace sandbox: where the restorer attaches the
    copies of its volumes (``N`` below it, in the order of ``mounts``),
    for CRIU to bind them from."""
    idmap_target: str = ""
    """The directory of the empty directories ``0``, ``1``... where the
    idmapped lower layers are attached."""
    wait_go: bool = False
    """Wait, before the exec, for ``G`` on the report socket (the spawner's
    ``on_pid`` has made what the command needs, its network interface)."""
    network: str = "none"
    """``none`` (a network namespace with ``lo`` only), ``bridge`` (the
    same, given an interface by the runtime while the init waits),
    ``host`` (the host's network namespace: no isolation of the network)
    or ``sandbox:NAME`` (the namespace of *join_netns*)."""
    join_netns: list[int] | None = None
    """``[pid, starttime]`` of the init whose network namespace to join
    (``sandbox:NAME``); the start time makes sure the PID is still it."""
    lower_links: str = ""
    """A directory of symlinks ``0``, ``1``... to the layers of
    ``lowerdir``, top first: the overlay is then mounted from there with
    short relative names (see :func:`_lower_option`)."""
    restore_argv: list[str] | None = None
    """Instead of starting a command, run this CRIU restore command in a
    private mount namespace holding the overlay root (see :func:`_run_restorer`)."""
    die_with: int = 0
    """The PID of the process whose death must kill the sandbox (0: none).
    It must be the subreaper the init is re-parented to when the
    intermediate exits: the init's parent-death signal is then SIGKILL."""
    mounts: list[list[Any]] | None = None
    """Volumes and tmpfs, parents first: ``[kind, source, target,
    read_only, size, mode, noexec, is_dir]``, *source* a host path (``bind``
    and ``volume``) or ``tmpfs`` (see :func:`_mount_volumes`)."""
    read_only: bool = False
    """Make the root read-only once the volumes are mounted."""
    user: str | None = None
    """``UID[:GID]`` or ``NAME[:GROUP]`` to run as, names resolved in the
    sandbox's own ``/etc/passwd`` and ``/etc/group`` (None: root)."""
    lxcfs: str = ""
    """The mount point of a running lxcfs whose :data:`LXCFS_FILES` are
    bind-mounted, read-only, over the sandbox's (empty: none)."""
    sysinfo: bool = False
    """Trap ``sysinfo(2)`` for the spawner to answer for the sandbox (see
    :mod:`._sysinfo`): the filter's listener goes up the report socket."""
    cgroup_view: list[str] | None = None
    """The sandbox's own cgroup, read-only at ``/sys/fs/cgroup``: ``[""]``
    for the unified (v2) hierarchy, else the v1 controller groups to mount
    (``memory``, ``cpu,cpuacct``...; see :func:`_mount_cgroup_view`). None:
    ``/sys/fs/cgroup`` stays sysfs's empty directory."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for the keeper protocol."""
        return self._asdict()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LaunchConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


class SetupFailure(NamedTuple):
    """A child's report that setting up the sandbox failed."""

    step: str
    errno: int
    message: str
    kind: str = "setup"
    """``setup``, ``notfound`` (exit 127) or ``noexec`` (exit 126)."""


def encode_failure(f: SetupFailure) -> bytes:
    """Wire form of a failure report."""
    return b"E" + json.dumps(f._asdict()).encode()


def decode_failure(data: bytes) -> SetupFailure:
    """Parse a failure report (``data`` starts with ``E``)."""
    return SetupFailure(**json.loads(data[1:]))


class _Step(Exception):
    """A setup step failed with a message meant for the user."""

    def __init__(self, step: str, message: str, err: int = 0, kind: str = "setup") -> None:
        super().__init__(message)
        self.failure = SetupFailure(step, err, message, kind)


def _report(report: socket.socket, exc: BaseException, step: str) -> None:
    if isinstance(exc, _Step):
        failure = exc.failure
    elif isinstance(exc, OSError):
        failure = SetupFailure(step, exc.errno or 0, str(exc.strerror or exc))
        if exc.filename:
            failure = SetupFailure(step, exc.errno or 0, f"{exc.strerror}: {exc.filename}")
    else:
        failure = SetupFailure(step, 0, f"{type(exc).__name__}: {exc}")
    try:
        report.send(encode_failure(failure))
    except OSError:
        pass


def run_intermediate(
    cfg: LaunchConfig, report: socket.socket, stdio: tuple[int, int, int] = (0, 1, 2)
) -> NoReturn:
    """Body of the intermediate child; never returns, never raises.

    *stdio* become the sandbox's file descriptors 0, 1 and 2.
    """
    step = "set up stdio"
    try:
        _install_stdio(stdio)
        step = "join cgroup"
        _join_cgroup(cfg.cgroup_procs)
        # The host's /proc, to read our child's start time: once the init
        # has pivoted its root (ours too: we share the new mount
        # namespace), "/proc" here may be the sandbox's.
        proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if cfg.restore_argv is not None:
            # CRIU makes the namespaces itself and puts the restored tree in
            # the cgroup; only the restorer's private mount namespace is ours.
            if cfg.network == "bridge":
                # A bridged sandbox's network namespace is not in its
                # checkpoint (CRIU takes it as external): this new one is
                # given its interface while the restorer waits, and CRIU
                # restores the tree into it (see _run_restorer).
                step = "unshare network namespace"
                sc.unshare(sc.CLONE_NEWNET)
            step = "fork restorer"
            pid = os.fork()
            if pid == 0:
                os.close(proc)
                _run_restorer(cfg, report)
        else:
            if cfg.join_netns is not None:
                # Before a user namespace of our own: joining needs the
                # host's privileges over the other sandbox's namespace.
                step = "join network namespace"
                _join_netns(cfg.join_netns, proc)
            own_net = cfg.network != "host" and cfg.join_netns is None
            sysfs = -1
            if cfg.userns is not None and not own_net:
                # The sandbox's root will not own this network namespace (the
                # host's, or the other sandbox's): only a root over it may
                # mount its sysfs, which the init then attaches.
                step = "sysfs"
                sysfs = sc.new_sysfs(_SYSFS_ATTRS)
            lower_trees: list[int] = []
            volumes: list[int] = []
            if cfg.userns is not None:
                step = "user namespace"
                base, size = cfg.userns
                lower_trees, volumes = enter_new_userns(
                    base,
                    size,
                    idmap=cfg.lowerdir.split(":") if cfg.idmap_lower else None,
                    volumes=volume_trees(cfg),
                )
            step = "unshare namespaces"
            sc.unshare(_NS_FLAGS if own_net else _NS_FLAGS & ~sc.CLONE_NEWNET)
            if lower_trees:
                # In the sandbox's own mount namespace: nothing on the host.
                step = "idmapped rootfs"
                sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
                for n, tree in enumerate(lower_trees):
                    sc.attach_tree(tree, f"{cfg.idmap_target}/{n}")
                    os.close(tree)
            # Our own pidfd: the init waits on it for our exit (see _die_with).
            me = os.pidfd_open(os.getpid()) if cfg.die_with else -1
            step = "fork init"
            pid = os.fork()
            if pid == 0:
                if cfg.die_with:
                    _die_with(cfg.die_with, me, proc, report)
                os.close(proc)  # the host's /proc stays out of the sandbox
                _run_init(cfg, report, sysfs, volumes)
            if sysfs >= 0:
                os.close(sysfs)  # the init's now
            for fd in volumes:
                os.close(fd)  # the init's now
        pidfd = os.pidfd_open(pid)
        # With its start time: a PID alone is no identity once reaped
        # (see ._proc); read while we are its parent, so it cannot be gone.
        socket.send_fds(report, [b"P%d:%d" % (pid, starttime(pid, proc))], [pidfd])
        os._exit(0)
    except BaseException as exc:
        _report(report, exc, step)
        os._exit(1)


def _join_netns(target: list[int], proc: int) -> None:
    """Join the network namespace of the init *target* (``[pid, start]``),
    if that PID is still that init (read in the host's *proc*)."""
    pid, start = target
    try:
        fd = os.open(f"{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except FileNotFoundError:
        fd = -1
    try:
        if fd < 0 or starttime(pid, proc) != start:
            raise _Step("join network namespace", "the sandbox to share a network with has ended")
        sc.setns(fd, sc.CLONE_NEWNET)
    finally:
        if fd >= 0:
            os.close(fd)


class VolumeTree(NamedTuple):
    """A volume the host's side of the user namespace clones for the
    sandbox (see :func:`enter_new_userns`)."""

    source: str
    target: str
    attrs: int
    """Mount attributes for every mount of the copy (read-only, nosuid...)."""
    idmap: bool
    """Idmapped through the sandbox's map where its file system can be."""


def enter_new_userns(
    base: int,
    size: int,
    idmap: list[str] | None = None,
    volumes: Sequence[VolumeTree] = (),
) -> tuple[list[int], list[int]]:
    """Move this process into a new user namespace whose ids 0 to size - 1
    are host ids base to base + size - 1, and become its root.

    The maps must be written by a process of the parent namespace holding
    CAP_SETUID and CAP_SETGID there (a process cannot map more than its own
    id into its own namespace): a forked helper that stays behind, waits
    until this process has unshared, writes both maps and exits. The other
    namespaces are created after this, so that they belong to the new user
    namespace and its root may mount proc, sysfs and the rest in them.

    With *idmap*, the helper also makes an idmapped copy of the mount at
    each of those paths (which only the parent namespace's root may make)
    and hands them over: their descriptors are returned, in order, to
    attach once the new mount namespace exists. Where a file system cannot
    be idmapped the failure is reported with ``kind = "noidmap"``.

    The helper clones the *volumes* too (the second list returned, in
    order): as the host's root, so that no directory on the way needs to be
    searchable by the sandbox's root, and idmapped where asked and the
    file system can be (else as they are: their files keep their host
    owners).
    """
    me = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mapper = os.fork()
    if mapper == 0:  # pragma: no cover - runs in the child
        ours.close()
        _map_ids(theirs, me, base, size, idmap, volumes)
    theirs.close()
    layers = len(idmap or ())
    try:
        try:
            sc.unshare(sc.CLONE_NEWUSER)
        finally:
            ours.send(b"go")
            msg, fds, _, _ = socket.recv_fds(ours, 4096, max(1, layers + len(volumes)))
    finally:
        ours.close()
        _, status = os.waitpid(mapper, 0)
    if msg[:1] in (b"N", b"V"):  # the maps are written, a copy failed
        for fd in fds:
            os.close(fd)
        number, _, where = msg[1:].partition(b" ")
        err = int(number)
        if msg.startswith(b"V"):
            raise _Step("volumes", f"{os.fsdecode(where)}: {os.strerror(err)}", err)
        raise _Step(
            "user namespace",
            f"cannot idmap the layers {':'.join(idmap or ())}: {os.strerror(err)}",
            err,
            kind="noidmap",
        )
    if status != 0 or not msg.startswith(b"M") or len(fds) != layers + len(volumes):
        for fd in fds:
            os.close(fd)
        err = int(msg[1:]) if msg[:1] == b"E" else 0
        raise _Step(
            "user namespace",
            f"cannot map ids 0-{size - 1} to host ids {base}-{base + size - 1}"
            f" ({os.strerror(err) if err else 'the helper died'})",
            err,
        )
    become_userns_root()
    return list(fds[:layers]), list(fds[layers:])


def _map_ids(  # pragma: no cover - runs in the child
    sock: socket.socket,
    pid: int,
    base: int,
    size: int,
    idmap: list[str] | None,
    volumes: Sequence[VolumeTree],
) -> NoReturn:
    """The helper of :func:`enter_new_userns`: never returns."""
    try:
        sock.recv(16)  # "go": unshared (or failed to: the writes fail then)
        try:
            _write_id_maps(pid, base, size)
        except OSError as exc:
            sock.send(b"E%d" % (exc.errno or 0))
            os._exit(1)
        if idmap is None and not volumes:
            sock.send(b"M")
            os._exit(0)
        trees = []
        userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for path in idmap or ():
                trees.append(sc.idmapped_tree(path, userns))
        except OSError as exc:
            sock.send(b"N%d" % (exc.errno or 0))
            os._exit(0)
        for vol in volumes:
            try:
                trees.append(_volume_tree(vol, userns))
            except OSError as exc:
                sock.send(b"V%d %s" % (exc.errno or 0, os.fsencode(vol.target)))
                os._exit(0)
        socket.send_fds(sock, [b"M"], trees)
        os._exit(0)
    except BaseException:
        os._exit(1)


def _write_id_maps(pid: int, base: int, size: int) -> None:
    """Map ids 0 to size - 1 of *pid*'s new user namespace to host ids
    from *base* (uids and gids alike)."""
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0 %d %d\n" % (base, size))
        finally:
            os.close(fd)


_NO_IDMAP = (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)
"""What ``mount_setattr`` says where a file system cannot be idmapped."""


def _volume_tree(vol: VolumeTree, userns: int) -> int:
    """The detached copy of one volume (see :class:`VolumeTree`)."""
    if vol.idmap:
        try:
            return sc.bind_tree(vol.source, vol.attrs, userns)
        except OSError as exc:
            if exc.errno not in _NO_IDMAP:
                raise
    return sc.bind_tree(vol.source, vol.attrs)


def volume_trees(cfg: LaunchConfig) -> list[VolumeTree]:
    """The volumes of *cfg* that are copies of host trees, in order."""
    return [
        VolumeTree(source, target, _volume_attrs(cfg, read_only), kind == "bind")
        for kind, source, target, read_only, *_ in cfg.mounts or ()
        if kind != "tmpfs"
    ]


def _volume_attrs(cfg: LaunchConfig, read_only: bool) -> int:
    """The mount attributes of a volume of *cfg*: never setuid, no devices
    unless privileged; read-only if asked."""
    attrs = sc.MOUNT_ATTR_NOSUID | (sc.MOUNT_ATTR_NODEV if cfg.confine else 0)
    return attrs | (sc.MOUNT_ATTR_RDONLY if read_only else 0)


def idmapped_layers(
    base: int, size: int, paths: list[str], volumes: Sequence[VolumeTree] = ()
) -> tuple[list[int], list[int]]:
    """Idmapped copies of the mounts at *paths* (descriptors, to attach)
    that show host ids base to base + size - 1 as 0 to size - 1, and the
    copies of *volumes* (as :func:`enter_new_userns` makes them), made
    without leaving the host's user namespace: CRIU's restorer must stay
    the host's root, and CRIU makes the sandbox's namespace itself.

    A forked child holds a new user namespace with that map while the
    copies are made (an idmapped mount keeps its own reference to it),
    then exits. A file system that cannot be idmapped is reported with
    ``kind = "noidmap"``, as by :func:`enter_new_userns`.
    """
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(go_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(go_w, b"u")
            os.read(done_r, 1)  # EOF: the copies are made
        finally:
            os._exit(0)
    os.close(go_w)
    os.close(done_r)
    trees: list[int] = []
    try:
        if os.read(go_r, 1) != b"u":
            raise _Step("user namespace", "the helper could not make a user namespace")
        _write_id_maps(child, base, size)
        userns = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for path in paths:
                trees.append(sc.idmapped_tree(path, userns))
        except OSError as exc:
            err = exc.errno or 0
            raise _Step(
                "user namespace",
                f"cannot idmap the layers {':'.join(paths)}: {os.strerror(err)}",
                err,
                kind="noidmap",
            ) from None
        try:
            for vol in volumes:
                trees.append(_volume_tree(vol, userns))
        except OSError as exc:
            err = exc.errno or 0
            raise _Step("volumes", f"{vol.target}: {os.strerror(err)}", err) from None
        finally:
            os.close(userns)
    except BaseException:
        for fd in trees:
            os.close(fd)
        raise
    finally:
        os.close(go_r)
        os.close(done_w)
        os.waitpid(child, 0)
    return trees[: len(paths)], trees[len(paths) :]


def become_userns_root() -> None:
    """Take uid and gid 0 of the user namespace just entered (the host ids
    the sandbox's root maps to), with no supplementary groups."""
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def _install_stdio(stdio: tuple[int, int, int]) -> None:
    """Make *stdio* this process's file descriptors 0, 1 and 2."""
    if stdio != (0, 1, 2):
        # Through fresh copies, so that e.g. (1, 0, 2) cannot clobber itself.
        copies = [os.dup(fd) for fd in stdio]
        for target, fd in enumerate(copies):
            os.dup2(fd, target)
            os.close(fd)


def _join_cgroup(procs_files: list[str]) -> None:
    """Move this process into the cgroup whose ``cgroup.procs`` files are given."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def _die_with(owner: int, intermediate: int, proc: int, report: socket.socket) -> None:
    """Make the init die (SIGKILL) when *owner*, the process it is
    re-parented to, dies: what makes a `corral run`'s sandbox end with it.

    The parent-death signal follows the parent at the time it is set, and
    our parent is the *intermediate* until it exits: set before, its exit
    would kill us. Its pidfd turns readable only once the kernel has
    re-parented its children (``exit_notify``), so the wait is exact. Then
    the parent (read in the host's *proc*: ours is 0 in a new PID
    namespace) must be *owner*; if *owner* died already, nobody would send
    the signal, so the init ends here.
    """
    try:
        poller = select.poll()
        poller.register(intermediate, select.POLLIN)
        while not poller.poll():
            pass
        os.close(intermediate)
        sc.set_parent_death_signal(signal.SIGKILL)
        me = int(os.readlink("self", dir_fd=proc))
        if parent_pid(me, proc) != owner:
            os._exit(137)  # as if the signal had come: the owner is gone
    except BaseException as exc:
        _report(report, exc, "parent-death signal")
        os._exit(127)


def _run_init(
    cfg: LaunchConfig, report: socket.socket, sysfs: int = -1, volumes: Sequence[int] = ()
) -> NoReturn:
    """Body of the init: make the sandbox's root and exec tini in it.

    *sysfs* is a detached sysfs mount to attach at /sys (-1: mount one);
    *volumes* the copies of the volumes made on the host's side (none:
    made here).
    """
    step = "prepare"
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        # A session of its own: a sandbox must not share the host's session
        # (and its controlling terminal), and CRIU refuses to dump a tree
        # whose session leader is outside its PID namespace.
        os.setsid()
        step = "mount root"
        _mount_root(cfg, sysfs)
        if cfg.mounts:
            step = "volumes"
            _mount_volumes(cfg, volumes)
        if cfg.read_only:
            step = "read-only root"
            _make_root_read_only(cfg)
        step = "set hostname"
        socket.sethostname(cfg.hostname)
        if cfg.network != "host" and cfg.join_netns is None:
            step = "bring up loopback"
            _loopback_up()
        step = "pivot_root"
        os.chdir(cfg.merged)
        sc.pivot_root(".", ".")
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        if cfg.stdin_devnull:
            step = "stdin"
            fd = os.open("/dev/null", os.O_RDONLY)
            os.dup2(fd, 0)
            os.close(fd)
        step = "workdir"
        # Nothing of the host's may be reachable through /proc/self/fd as a
        # workdir (runc CVE-2024-21626): close every descriptor first.
        close_fds_except(report.fileno())
        identity = None
        if cfg.user is not None:
            step = "user"
            identity = resolve_user(cfg.user)
            cfg.env.setdefault("HOME", identity.home)
        step = "workdir"
        path = enter_workdir_and_find(cfg.workdir, cfg.argv[0], cfg.env)
        step = "restrict"
        # Before the wait for the go: a standby (or a bridged start, whose
        # interface is being plugged meanwhile) has only its exec left.
        restrict_like_sandbox(report, cfg, identity)
        if cfg.wait_go:
            step = "network"
            if report.recv(16) != b"G":
                os._exit(1)  # the runtime gave up (and says why)
        step = "exec init"
        os.execve(INIT_PATH, ["init", "--", path, *cfg.argv[1:]], cfg.env)
    except BaseException as exc:
        _report(report, exc, step)
        os._exit(127)


RESTORE_NETNS_FD = 6
"""The restorer's descriptor of the network namespace a bridged sandbox is
restored in (after the stdio at 3, 4 and 5)."""


def _run_restorer(cfg: LaunchConfig, report: socket.socket) -> NoReturn:
    """Mount the overlay root in a private mount namespace, exec CRIU.

    CRIU restores the sandbox's own mount namespace on top of ``--root``
    (the overlay), so the overlay exists here only for as long as CRIU
    runs: when CRIU exits this namespace goes, and the restored sandbox
    holds the only reference to its root. Nothing is mounted on the host.
    The sandbox's stdio (0, 1, 2 here) moves to 3, 4, 5 for CRIU's
    ``--inherit-fd``; CRIU's own output goes to /dev/null (it logs to a file).
    """
    step = "prepare"
    assert cfg.restore_argv is not None
    try:
        # Out of the way of fds 3-5, which CRIU's --inherit-fd expects.
        high = fcntl.fcntl(report.fileno(), fcntl.F_DUPFD_CLOEXEC, 16)
        report.close()
        report = socket.socket(fileno=high)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        step = "unshare mount namespace"
        sc.unshare(sc.CLONE_NEWNS)
        if cfg.userns is not None and (cfg.idmap_lower or volume_trees(cfg)):
            # The layers and volumes as the sandbox's root saw them when it
            # was dumped; CRIU binds the volumes from volume_target/N.
            step = "idmapped rootfs"
            base, size = cfg.userns
            layers, volumes = idmapped_layers(
                base, size, cfg.lowerdir.split(":") if cfg.idmap_lower else [], volume_trees(cfg)
            )
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            for n, tree in enumerate(layers):
                sc.attach_tree(tree, f"{cfg.idmap_target}/{n}")
                os.close(tree)
            for n, tree in enumerate(volumes):
                sc.attach_tree(tree, f"{cfg.volume_target}/{n}")
                os.close(tree)
        step = "mount root"
        _mount_overlay(cfg)
        if cfg.read_only:
            # CRIU takes the root mount's flags from --root, not the dump.
            step = "read-only root"
            _make_root_read_only(cfg)
        keep = [3, 4, 5]
        if cfg.network == "bridge":
            step = "bring up loopback"
            _loopback_up()
            # CRIU's --inherit-fd fd[6]:corral-net: the namespace to restore in.
            net = os.open("/proc/self/ns/net", os.O_RDONLY)
            os.dup2(net, RESTORE_NETNS_FD, inheritable=True)
            os.close(net)
            keep.append(RESTORE_NETNS_FD)
        if cfg.wait_go:
            step = "network"
            if report.recv(16) != b"G":
                os._exit(1)  # the runtime gave up (and says why)
        step = "exec criu"
        for target, fd in enumerate(os.dup(n) for n in (0, 1, 2)):
            os.dup2(fd, 3 + target)
            os.close(fd)
        null = os.open("/dev/null", os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(null, n)
        os.close(null)
        _prepare_exec(report, *keep)
        os.execve(cfg.restore_argv[0], cfg.restore_argv, cfg.env)
    except BaseException as exc:
        _report(report, exc, step)
        os._exit(127)


def _prepare_exec(report: socket.socket, *keep: int) -> None:
    """Signals to their defaults, no mask, every fd from 3 up closed but
    *keep* and the (close-on-exec) report socket."""
    # exec keeps ignored signals ignored: Python's SIGPIPE and SIGXFSZ, the
    # keeper's SIGINT, whatever the supervisor's ancestors ignored. A command
    # that expects the default would misbehave (one that ignores SIGINT
    # survives tini forwarding it).
    sc.reset_signals()
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    close_fds_except(report.fileno(), *keep)


def close_fds_except(*keep: int) -> None:
    """Close every descriptor from 3 up but *keep*."""
    low = 3
    for fd in sorted(k for k in keep if k >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


if TYPE_CHECKING:  # a type only: no typing at run time (see _runtime/_tuples.py)

    class Privileges(Protocol):
        """What :func:`restrict_like_sandbox` reads (a launch or an exec config)."""

        @property
        def caps(self) -> list[int] | None: ...
        @property
        def last_cap(self) -> int: ...
        @property
        def no_new_privs(self) -> bool: ...
        @property
        def seccomp(self) -> list[bytes] | None: ...
        @property
        def rlimits(self) -> list[list[int]] | None: ...
        @property
        def sysinfo(self) -> bool: ...


class Identity(NamedTuple):
    """Who a sandbox's command runs as (:func:`resolve_user`)."""

    uid: int
    gid: int
    groups: list[int]
    """Supplementary groups: every group of ``/etc/group`` that lists the user."""
    home: str
    """Its home directory (``/`` for an id ``/etc/passwd`` does not know)."""


_DB_MAX = 4 << 20


def _read_db(path: str) -> list[list[str]]:
    """The entries of the sandbox's ``/etc/passwd`` or ``/etc/group``
    (none if it has no such file). The image's file, so never trusted: a
    FIFO, a device or an endless file gives a clear error, not a hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Step("user", f"{path} in the sandbox is not a regular file", errno.EINVAL)
        data = os.read(fd, _DB_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _DB_MAX:
        raise _Step("user", f"{path} in the sandbox is larger than 4 MiB", errno.EFBIG)
    out = []
    for line in data.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            out.append(line.split(":"))
    return out


def resolve_user(spec: str) -> Identity:
    """``UID[:GID]`` or ``NAME[:GROUP]`` as the sandbox's own ``/etc/passwd``
    and ``/etc/group`` say (the current root must be the sandbox's).

    As Docker does: a number unknown to ``/etc/passwd`` is that uid with
    gid 0 and home ``/``; a name unknown to it is an error.
    """
    user, _, group = spec.partition(":")
    entry = None
    for fields in _read_db("/etc/passwd"):
        if len(fields) >= 7 and (fields[2] == user if user.isdigit() else fields[0] == user):
            entry = fields
            break
    if entry is None and not user.isdigit():
        raise _Step("user", f"user {user!r}: no such user in the sandbox's /etc/passwd")
    try:
        uid = int(user) if user.isdigit() else int(entry[2])  # type: ignore[index]
        gid = int(entry[3]) if entry is not None else 0
    except ValueError:
        raise _Step(
            "user", f"user {user!r}: a malformed line in the sandbox's /etc/passwd"
        ) from None
    groups_db = _read_db("/etc/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [g for g in groups_db if len(g) >= 3 and g[0] == group and g[2].isdigit()]
            if not found:
                raise _Step("user", f"group {group!r}: no such group in the sandbox's /etc/group")
            gid = int(found[0][2])
    name = entry[0] if entry is not None else None
    groups = {gid}
    for g in groups_db:
        if len(g) >= 4 and name is not None and name in g[3].split(",") and g[2].isdigit():
            groups.add(int(g[2]))
    home = entry[5] if entry is not None and entry[5] else "/"
    return Identity(uid, gid, sorted(groups), home)


def restrict_like_sandbox(
    report: socket.socket, cfg: Privileges, identity: Identity | None = None
) -> None:
    """Leave a process about to exec in a sandbox exactly the sandbox's
    privileges; the last step before ``execve``, for the init and for every
    process ``corral exec`` adds alike.

    Undumpable until the exec; every descriptor from 3 up closed but the
    (close-on-exec) *report* socket; every signal to its default and none
    blocked; umask 022; the rlimits; only the capabilities ``cfg.caps``
    (numbers up to ``cfg.last_cap``; None keeps every one: a privileged
    sandbox), no inheritable or ambient ones, ``no_new_privs`` if asked, and
    the seccomp filter (see :mod:`supervisor._runtime._security`). With
    *identity*, as that user: its groups, gid and uid; a user other than
    root then has no capability left once it execs (the kernel clears
    them, as for any non-root process without file capabilities).
    """
    # The exec path clears the flag before it joins the sandbox's PID
    # namespace, which is when the window opens; this keeps the rule here
    # too. execve sets the flag again: the new program is the sandbox's.
    sc.set_dumpable(False)
    _prepare_exec(report)
    if identity is not None and identity.uid != 0:
        _give_pipes_to(identity.uid)
    os.umask(0o022)
    for resource_, soft, hard in cfg.rlimits or ():
        try:
            resource.setrlimit(resource_, (soft, hard))
        except (OSError, ValueError) as exc:
            raise _Step("rlimits", _rlimit_failure(resource_, soft, hard), errno.EPERM) from exc
    # Loading a filter takes no_new_privs or CAP_SYS_ADMIN: without
    # no_new_privs, load it while the capability is still there (runc does
    # the same); the filter then must allow what follows (capset, prctl).
    if not cfg.no_new_privs:
        _trap_sysinfo(report, cfg)
        for program in cfg.seccomp or ():
            sc.load_seccomp(program)
    who = None if identity is None else (identity.uid, identity.gid, identity.groups)
    if cfg.caps is not None:  # None: privileged, which also means no no_new_privs
        sc.restrict_capabilities(cfg.caps, cfg.last_cap, cfg.no_new_privs, who)
    elif who is not None:
        sc.switch_user(*who)
    if cfg.no_new_privs:
        _trap_sysinfo(report, cfg)
        for program in cfg.seccomp or ():
            sc.load_seccomp(program)


def _give_pipes_to(uid: int) -> None:
    """Make the pipes at 0, 1 and 2 the user's (*uid*), while the
    capability to is still there: so that it can open them again through
    ``/dev/stdout`` (runc's ``fixStdioPermissions`` does the same). Only
    pipes: a terminal or a file is the caller's. A pipe whose owner is not
    mapped here cannot be given, and is left as it is."""
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
            if stat.S_ISFIFO(st.st_mode) and st.st_uid != uid:
                os.fchown(fd, uid, -1)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EPERM):
                raise _Step("stdio", f"cannot give the user its stdio pipes: {exc}") from exc


def _trap_sysinfo(report: socket.socket, cfg: Privileges) -> None:
    """Load the filter that makes ``sysinfo`` ask the spawner's answerer
    (``cfg.sysinfo``) and send its listener up: ``N`` with the descriptor.

    Before the main filter, not after: the kernel takes the action of
    highest precedence whatever the order (its KILL and ERRNO still win,
    its ALLOW loses to the notification), and this way a Docker profile
    that allows only what it names need not allow ``seccomp(2)``. Nothing
    between here and the exec may call ``sysinfo``: nobody answers yet.
    """
    if not cfg.sysinfo:
        return
    try:
        listener = sc.load_seccomp_listener(NOTIFY_FILTER)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            # A listener up the chain already (a spawner that is itself in
            # a sandbox with one): the host's numbers, as before.
            return
        raise _Step("sysinfo", f"cannot trap sysinfo: {exc.strerror}", exc.errno or 0) from None
    try:
        socket.send_fds(report, [b"N"], [listener])
    finally:
        os.close(listener)


def _rlimit_failure(resource_: int, soft: int, hard: int) -> str:
    names = {
        getattr(resource, n): n[len("RLIMIT_") :].lower()
        for n in dir(resource)
        if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"  # an old alias of NOFILE
    }
    name = names.get(resource_, str(resource_))
    own = resource.getrlimit(resource_)[1]
    # (A soft limit above the hard one never gets here: parse_rlimits refuses it.)
    return (
        f"rlimits.{name}: cannot set a hard limit of {'unlimited' if hard < 0 else hard}, "
        f"above the supervisor's own ({'unlimited' if own < 0 else own}): "
        "raising it needs CAP_SYS_RESOURCE"
    )


OVERLAY_OPTIONS_MAX = 3800
"""Bytes of overlay options mounted as they are: ``mount(2)`` takes one page
of them (4096 bytes), which some 40 store layers' paths fill."""


def _lower_option(cfg: LaunchConfig) -> tuple[str, str | None]:
    """The overlay's ``lowerdir``, and the directory to mount from (None:
    the paths are absolute). Many layers are named from a directory of
    links (``lower_links``, or the idmapped layers' ``idmap_target``) by
    their numbers, relative to it (overlayfs resolves them from the mounting
    process's working directory, as Docker's overlay2 does with its ``l/``):
    five bytes a layer, not a hundred."""
    count = cfg.lowerdir.count(":") + 1
    if cfg.idmap_lower:
        base = cfg.idmap_target
    elif cfg.lower_links:
        base = cfg.lower_links
    else:
        return cfg.lowerdir, None
    full = ":".join(f"{base}/{n}" for n in range(count))
    if len(full) + len(cfg.upperdir) + len(cfg.workdir_overlay) < OVERLAY_OPTIONS_MAX:
        return full, None
    return ":".join(str(n) for n in range(count)), base


def _mount_overlay(cfg: LaunchConfig) -> None:
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    lower, cwd = _lower_option(cfg)
    if cwd is not None:
        os.chdir(cwd)
    try:
        sc.mount(
            "overlay",
            cfg.merged,
            "overlay",
            sc.MS_NODEV if cfg.confine else 0,
            f"lowerdir={lower},upperdir={cfg.upperdir},workdir={cfg.workdir_overlay}"
            # The sandbox's root cannot use trusted.* attributes: overlayfs
            # then keeps its own (opaque directories...) as user.overlay.*,
            # which the store's layers carry too.
            + (",userxattr" if cfg.userns is not None else ""),
        )
    finally:
        if cwd is not None:
            os.chdir("/")


def _make_root_read_only(cfg: LaunchConfig) -> None:
    """Make the root's own mount read-only (volumes and tmpfs mounted on it
    keep their own modes)."""
    flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY
    sc.mount(None, cfg.merged, None, flags | (sc.MS_NODEV if cfg.confine else 0))


_SYSFS_ATTRS = (
    sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
)
"""A sandbox's /sys: read-only, nosuid, nodev, noexec."""


def _mount_root(cfg: LaunchConfig, sysfs: int = -1) -> None:
    """Mount the overlay root, /proc, /sys (*sysfs*, a detached mount, if
    not -1), /dev and the rest at ``cfg.merged``."""
    _mount_overlay(cfg)
    m = cfg.merged
    nosuid_noexec_nodev = sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NODEV
    proc = _target(m, "proc")
    sc.mount("proc", proc, "proc", nosuid_noexec_nodev)
    sys_ = _target(m, "sys")
    if sysfs >= 0:
        sc.attach_tree(sysfs, sys_)
        os.close(sysfs)
    else:
        sc.mount("sysfs", sys_, "sysfs", sc.MS_RDONLY | nosuid_noexec_nodev)
    # What the masks and the pivot rely on must really be procfs and sysfs
    # (a mount over a path that led elsewhere would be the runc CVE-2019-16884
    # and CVE-2019-19921 family); _target already refuses symlinks.
    for path, magic, what in ((proc, sc.PROC_SUPER_MAGIC, "proc"), (sys_, sc.SYSFS_MAGIC, "sysfs")):
        if sc.fs_type(path) != magic:
            raise _Step("mount root", f"/{what} is not a {what} after mounting it (refusing)")
    if cfg.cgroup_view is not None:
        _mount_cgroup_view(f"{sys_}/fs/cgroup", cfg.cgroup_view)
    if cfg.lxcfs:
        _mount_lxcfs(m, cfg.lxcfs)
    dev = _target(m, "dev")
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID, "mode=755,size=65536k")
    os.umask(0)
    for name, major, minor, mode in _DEVICES:
        node = f"{dev}/{name}"
        if cfg.userns is None:
            os.mknod(node, stat.S_IFCHR | mode, os.makedev(major, minor))
        else:
            # No device node can be made in a user namespace: the host's
            # own is bind-mounted instead (the same device, the same mode).
            os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            sc.mount(f"/dev/{name}", node, None, sc.MS_BIND)
    for name, dest in _DEV_LINKS:
        os.symlink(dest, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts", 0o755)
    sc.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        sc.MS_NOSUID | sc.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    os.mkdir(f"{dev}/shm", 0o1777)
    sc.mount("shm", f"{dev}/shm", "tmpfs", nosuid_noexec_nodev, "mode=1777,size=65536k")
    init = f"{dev}/init"
    os.close(os.open(init, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o755))
    sc.mount(cfg.init_binary, init, None, sc.MS_BIND)
    sc.mount(None, init, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID)
    if cfg.confine:
        _mask_proc_and_sys(m, f"{dev}/null")
        # Nothing can be created in /dev now (a node made with CAP_MKNOD
        # lands on a nodev mount or nowhere); the nodes in it still work.
        sc.mount(None, dev, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID)


_VIEW_FLAGS = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


def _mount_cgroup_view(target: str, hierarchies: list[str]) -> None:
    """Mount the sandbox's own cgroup, read-only, at *target* (its
    ``/sys/fs/cgroup``), so that a program reads its own limits there
    (``memory.max``, ``cpu.max``, ``pids.max``; v1 ``memory.limit_in_bytes``,
    ``cpu.cfs_quota_us``).

    This process is in the cgroup namespace its parent unshared once in the
    sandbox's cgroup, so what a cgroup file system mounted here shows as
    its root is that cgroup: nothing of the host's tree above it. ``[""]``
    is the unified (v2) hierarchy, one read-only ``cgroup2`` mount. On v1
    each controller group the sandbox has a cgroup in gets a directory of
    a small tmpfs, named as on the host (``memory``, ``cpu,cpuacct`` with
    ``cpu`` and ``cpuacct`` links), as Docker lays it out; the tmpfs is
    made read-only too. Read-only mounts: nothing can be written or made
    there, whatever the capabilities (the sandbox cannot remount: no
    CAP_SYS_ADMIN, and seccomp refuses ``mount``).
    """
    if hierarchies == [""]:
        sc.mount("cgroup2", target, "cgroup2", _VIEW_FLAGS)
        return
    sc.mount("tmpfs", target, "tmpfs", _VIEW_FLAGS & ~sc.MS_RDONLY, "mode=755,size=16k")
    for controllers in hierarchies:
        os.mkdir(f"{target}/{controllers}", 0o755)
        sc.mount("cgroup", f"{target}/{controllers}", "cgroup", _VIEW_FLAGS, controllers)
        if "," in controllers:
            for name in controllers.split(","):
                os.symlink(controllers, f"{target}/{name}")
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | _VIEW_FLAGS)


def _mount_lxcfs(root: str, source: str) -> None:
    """Bind lxcfs's files (:data:`LXCFS_FILES`, below its mount point
    *source*) over the sandbox's own /proc and /sys files, read-only.

    lxcfs answers each reader with the numbers of the cgroup of the init
    of the reader's PID namespace: this sandbox's. A file this kernel or
    this lxcfs does not have is left as it is; an lxcfs that does not
    answer (it died since the runtime checked) fails the start, naming it.
    """
    for name in LXCFS_FILES:
        target = f"{root}/{name}"
        try:
            sc.mount(f"{source}/{name}", target, None, sc.MS_BIND)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise _Step(
                "lxcfs",
                f"cannot bind-mount {source}/{name}: {os.strerror(exc.errno or 0)}",
                exc.errno or 0,
            ) from None
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | _VIEW_FLAGS)


def _mount_volumes(cfg: LaunchConfig, trees: Sequence[int] = ()) -> None:
    """Mount the volumes and tmpfs of ``cfg.mounts`` (parents first) in
    the new root, before the pivot.

    Every target is resolved inside the root (``openat2`` with
    ``RESOLVE_IN_ROOT``: a symlink of the image's, absolute or with ``..``,
    cannot lead out of it: the runc CVE-2021-30465 family), made if
    missing, and mounted on through its descriptor, never looked up by
    path again. A bind mount is a recursive copy of the host's tree with
    its attributes set on every mount of it before it is attached, so a
    read-only volume has no writable submount. In a user namespace those
    copies were made on the host's side (*trees*, in order: see
    :func:`enter_new_userns`).
    """
    assert cfg.mounts is not None
    made = iter(trees)
    root = os.open(cfg.merged, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for kind, source, target, read_only, size, mode, noexec, is_dir in cfg.mounts:
            try:
                where = _mount_point(root, target, is_dir)
            except OSError as exc:
                err = exc.errno or 0
                raise _Step("volumes", f"{target}: {os.strerror(err)}", err) from None
            try:
                if kind == "tmpfs":
                    options = f"mode={0o1777 if mode is None else mode:o}"
                    if size is not None:
                        options += f",size={size}"
                    flags = sc.MS_NOSUID | sc.MS_NODEV
                    flags |= (sc.MS_RDONLY if read_only else 0) | (sc.MS_NOEXEC if noexec else 0)
                    sc.mount("tmpfs", f"/proc/self/fd/{where}", "tmpfs", flags, options)
                else:
                    tree = next(made, -1)
                    if tree < 0:
                        tree = sc.bind_tree(source, _volume_attrs(cfg, read_only))
                    try:
                        sc.attach_tree_at(tree, where, target)
                    finally:
                        os.close(tree)
            finally:
                os.close(where)
    finally:
        os.close(root)


def _mount_point(root: int, target: str, is_dir: bool) -> int:
    """An ``O_PATH`` descriptor of *target* inside *root*, made (with its
    missing parents, in the writable layer) if it does not exist.

    A symlink on the way that leads nowhere yet is followed inside the
    root, and what it names is made there (as ``docker run -v`` does).
    """
    resolve = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
    parts = [p for p in target.split("/") if p]
    links = 0
    n = 1
    while n <= len(parts):
        path = "/".join(parts[:n])
        try:
            fd = sc.openat2(root, path, os.O_PATH, resolve)
        except FileNotFoundError:
            parent = sc.openat2(root, "/".join(parts[: n - 1]) or ".", os.O_PATH, resolve)
            try:
                try:
                    link: str | None = os.readlink(parts[n - 1], dir_fd=parent)
                except OSError:
                    link = None  # not a symlink: missing
                if link is None and (n < len(parts) or is_dir):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(parts[n - 1], 0o755, dir_fd=parent)
                elif link is None:
                    with contextlib.suppress(FileExistsError):
                        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                        os.close(os.open(parts[n - 1], flags, 0o644, dir_fd=parent))
            finally:
                os.close(parent)
            if link is not None:
                # A dangling symlink: go on from what it names, inside the
                # root (openat2 resolves the '..' in it physically, there).
                links += 1
                if links > 40:
                    raise _Step(
                        "volumes", f"{target}: too many levels of symlinks", errno.ELOOP
                    ) from None
                head = [] if link.startswith("/") else parts[: n - 1]
                parts = head + [p for p in link.split("/") if p] + parts[n:]
                n = 1
                continue
            fd = sc.openat2(root, path, os.O_PATH, resolve)
        if n < len(parts):
            os.close(fd)
            n += 1
            continue
        st = os.fstat(fd)
        top = os.fstat(root)
        if (st.st_dev, st.st_ino) == (top.st_dev, top.st_ino):
            os.close(fd)
            raise _Step("volumes", f"{target} in the sandbox leads to its root (refusing)")
        kind = "directory" if is_dir else "file"
        if stat.S_ISDIR(st.st_mode) != is_dir:
            os.close(fd)
            raise _Step("volumes", f"{target} in the sandbox is not a {kind}, as its source is")
        # Not over what corral mounted itself (a symlink in the image may
        # point there): /proc and /sys are the runtime's.
        if sc.fs_type(f"/proc/self/fd/{fd}") in (sc.PROC_SUPER_MAGIC, sc.SYSFS_MAGIC):
            os.close(fd)
            raise _Step("volumes", f"{target} in the sandbox leads into /proc or /sys (refusing)")
        return fd
    raise _Step("volumes", f"{target} in the sandbox leads to its root (refusing)")


def _mask_proc_and_sys(root: str, null: str) -> None:
    """Hide what a sandbox has no business reading in /proc and /sys, and
    make what it must not write read-only (Docker's lists, runc's way)."""
    for path in MASKED_PATHS:
        target = root + path
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            continue  # this kernel has no such file
        if stat.S_ISDIR(st.st_mode):
            sc.mount("tmpfs", target, "tmpfs", sc.MS_RDONLY, "size=0")
        else:
            # The sandbox's own /dev/null, not the host's: nothing of the
            # host is mounted in (and CRIU sees an internal bind mount).
            sc.mount(null, target, None, sc.MS_BIND)
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    for path in READONLY_PATHS:
        target = root + path
        if not os.path.lexists(target):
            continue
        sc.mount(target, target, None, sc.MS_BIND | sc.MS_REC)
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | flags)


def _target(root: str, name: str) -> str:
    """A mount point directly below the new root, never through a symlink.

    A rootfs whose /proc or /dev is a symlink could point a mount at the
    host (the runc CVE-2019-19921 family), so only a real directory is used;
    a missing one is created in the writable layer.
    """
    path = f"{root}/{name}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o755)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise _Step(
            "mount root", f"/{name} in the rootfs is not a directory (refusing to mount on it)"
        )
    return path


def _loopback_up() -> None:
    """Set IFF_UP on ``lo`` in the sandbox's fresh network namespace.

    One SIOCSIFFLAGS ioctl. This is the only network step on the start path,
    and pyroute2 costs 150-200 ms to import (measured here), more than a
    whole sandbox start; pyroute2 is used where netlink is really needed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def enter_workdir_and_find(workdir: str, cmd: str, env: dict[str, str]) -> str:
    """chdir to *workdir* inside the sandbox, then find *cmd* there (its path)."""
    try:
        os.chdir(workdir)
    except OSError as exc:
        raise _Step(
            "workdir", f"workdir {workdir!r} is not a directory in the sandbox", exc.errno or 0
        ) from exc
    try:
        # The kernel cannot name a directory outside the process's root:
        # getcwd fails (ENOENT) where a path led out, through a descriptor
        # of the host's under /proc/self/fd (runc CVE-2024-21626).
        inside = os.getcwd().startswith("/")
    except FileNotFoundError:
        inside = False
    if not inside:
        raise _Step("workdir", f"workdir {workdir!r} is outside the sandbox's root", errno.EPERM)
    return _resolve(cmd, env.get("PATH", ""))


def _resolve(cmd: str, path_env: str) -> str:
    """Find the command inside the new root like ``execvp`` would."""
    candidates = [cmd] if "/" in cmd else [f"{d or '.'}/{cmd}" for d in path_env.split(":")]
    found_noexec = None
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(c, os.X_OK):
            return c
        found_noexec = c
    if found_noexec is not None:
        raise _Step(
            "find command", f"{cmd!r} is not an executable file", errno.EACCES, kind="noexec"
        )
    raise _Step("find command", f"{cmd!r}: command not found", errno.ENOENT, kind="notfound")
