"""Creating, waiting for and destroying one sandbox: the synchronous core.

This is the library path every front end uses: ``corral run`` calls it
directly; the supervisor calls the same code with a keeper as spawner.

Layout on disk::

    STATE_DIR/rootfs/busybox/            the cached read-only base
    STATE_DIR/sandboxes/NAME/upper       the sandbox's private writable layer
    STATE_DIR/sandboxes/NAME/work        overlayfs work directory
    STATE_DIR/sandboxes/NAME/merged      mount point of the overlay (mounted
                                         only inside the sandbox's mount
                                         namespace, so it can never leak)
    RUN_DIR/sandboxes/NAME.json          pid, cgroup and image of a live sandbox

Every step of :meth:`Runtime.create` registers its undo; a failure at any
step undoes the ones before, so nothing half-made is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from rootfs import (
    BUILTIN_BASES,
    ImageStore,
    RootfsError,
    StoreError,
    busybox_image,
    is_prepared_ref,
    is_static_elf,
)

from .._errors import (
    CgroupError,
    CheckpointError,
    CommandNotExecutableError,
    CommandNotFoundError,
    CorralError,
    NotPermittedError,
    SandboxError,
    SandboxExistsError,
    SpecError,
    os_failure,
)
from ._checkpoint import (
    CRIU_OPTIONS,
    CRIU_TIMEOUT,
    IMAGE_DIRS,
    INIT_KEY,
    NET_KEY,
    CheckpointInfo,
    CheckpointStore,
    check_criu,
    criu_failure,
    criu_frozen_seconds,
    dir_size,
    disarm_sysinfo_filters,
    find_crit,
    read_log,
    remap_images,
    spec_from_dict,
    spec_to_dict,
    validate_tag,
)
from ._claims import Claim, ClaimInUse, dead_claims
from ._dirs import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, make_run_dir
from ._limits import Limits, check_limits
from ._linux import _syscalls
from ._linux._cgroups import Cgroup, Cgroups, CgroupStats, open_cgroups
from ._linux._child import (
    DEVICE_NAMES,
    INIT_PATH,
    LXCFS_FILES,
    RESTORE_NETNS_FD,
    LaunchConfig,
)
from ._linux._exec import ExecConfig
from ._linux._fdlimit import patiently
from ._linux._proc import starttime
from ._linux._spawn import (
    ExitStatus,
    OnPid,
    Reaper,
    Spawned,
    SpawnFailed,
    has_exited,
    spawn_direct,
)
from ._linux._sysinfo import supported as sysinfo_supported
from ._lxcfs import Lxcfs, view_mounts
from ._mounts import Mount, parse_user
from ._net._bridge import Networks, hosts_file, resolv_conf
from ._net._ipam import Lease
from ._net._links import bridge_exists as link_exists
from ._net._links import remove_veth, set_forwarding, veth_name
from ._net._links import set_up as set_link_up
from ._net._model import DEFAULT_NETWORK, NetworkDecl, is_bridged, network_name
from ._net._resolve import resolve_egress
from ._records import abandoned, record_path, write_atomic
from ._security import cap_last_cap, effective_rlimits, kept_capabilities
from ._spec import _ENV_KEY_RE, SandboxSpec
from ._units import human_size

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    import subprocess
    from typing import Any, NamedTuple, Protocol
else:
    from ._tuples import NamedTuple

__all__ = [
    "DEFAULT_RUN_DIR",
    "DEFAULT_STATE_DIR",
    "ExecProcess",
    "Runtime",
    "Sandbox",
    "SandboxExit",
    "StandbyCancelled",
    "find_init_binary",
]

INIT_CANDIDATES = ("/usr/bin/tini-static", "/usr/sbin/tini-static", "/sbin/tini-static")


if TYPE_CHECKING:  # a type only: no typing at run time (see _runtime/_tuples.py)

    class Spawner(Protocol):
        """How processes are spawned: :func:`spawn_direct`, or a keeper's ``spawn``."""

        def __call__(
            self,
            cfg: LaunchConfig | ExecConfig,
            stdio: tuple[int, int, int] = (0, 1, 2),
            *,
            on_pid: OnPid | None = None,
        ) -> Spawned: ...

    """How a sandbox's process tree (or an exec'd process) is started:
    :func:`spawn_direct` or a keeper."""


def find_init_binary() -> str:
    """The static tini that runs as PID 1 in every sandbox."""
    for c in INIT_CANDIDATES:
        if os.path.isfile(c):
            if not is_static_elf(c):
                raise SandboxError(f"{c} is not statically linked; it cannot run in a sandbox")
            return c
    raise SandboxError(
        "tini-static not found: install Debian's tini package (apt-get install tini)"
    )


_ours: dict[str, int] = {}
"""The inode of each of our own namespaces, by kind, once looked at."""


class _HoldBudget:
    """How many sandboxes' namespaces this process holds (two descriptors
    each, see :class:`Sandbox`): at most as many as a sixteenth of its
    open-file limit pays for. With the usual limits (524,288 for a
    service) that is every sandbox; where the limit is what bounds a
    fleet, the descriptors go to the sandboxes themselves."""

    SHARE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0

    def take(self) -> bool:
        """One more sandbox's namespaces may be held; False if over budget."""
        import resource  # a C module; here so that importing this one stays cheap

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        with self._lock:
            if soft != resource.RLIM_INFINITY and 2 * (self._held + 1) > soft // self.SHARE:
                return False
            self._held += 1
            return True

    def give(self) -> None:
        """A sandbox's namespaces were let go of."""
        with self._lock:
            self._held -= 1


_HOLDS = _HoldBudget()


def _own_namespace(pid: int, kind: str) -> int:
    """A descriptor of process *pid*'s namespace of *kind* (``mnt``,
    ``net``), if it has one of its own (not ours: a sandbox on the host's
    network has none); -1 otherwise."""
    try:
        if kind not in _ours:
            _ours[kind] = os.stat(f"/proc/self/ns/{kind}").st_ino
        fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        if os.fstat(fd).st_ino != _ours[kind]:
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


class SandboxExit(NamedTuple):
    """How a sandbox ended."""

    status: int
    """Shell-style status: the exit code, or 128+N after signal N; -1 if
    that was lost (see :class:`~._linux._spawn.ExitStatus`)."""
    exit_code: int | None
    """The init's exit code (tini passes on the command's), if it exited."""
    signal: int | None
    """The signal that killed the init, if one did."""
    oom_killed: bool
    """True if the kernel's OOM killer killed a process of the sandbox."""
    stats: CgroupStats | None
    """The cgroup's counters right after the init ended (before removal)."""
    duration: float
    """Seconds from the init's exec to its end."""


class Sandbox:
    """A running (or ended, not yet destroyed) sandbox.

    Use as a context manager, or call :meth:`destroy`, to remove its cgroup
    and writable layer.
    """

    def __init__(
        self,
        spec: SandboxSpec,
        spawned: Spawned,
        cgroup: Cgroup,
        state_path: str,
        cleanup: contextlib.ExitStack,
        reaper: Reaper | None = None,
        labels: Mapping[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.pid = spawned.pid
        self.pidfd = spawned.pidfd
        """A pidfd for the init; -1 for an adopted sandbox found already gone."""
        self.starttime = spawned.starttime
        """The init's start time: with :attr:`pid`, its identity (see :mod:`._linux._proc`)."""
        self.cgroup = cgroup
        self.state_path = state_path
        self.labels: dict[str, Any] = dict(labels or {})
        """What its creator recorded with it (see :meth:`Runtime.create`)."""
        self.network: dict[str, Any] | None = None
        """A bridged sandbox's ``mode``, ``lease`` (its address...) and ``veth``."""
        self.started = time.monotonic()
        self._proc = spawned
        self._reaper = reaper or Reaper()
        self._cleanup = cleanup
        # Holding the mount namespace keeps its teardown (unmounting the
        # overlay, /proc, /dev, ...: RCU grace periods) out of the init's
        # exit, so the exit is reported sooner; destroy() lets it go.
        # And its network namespace, for the same reason: the kernel tears
        # a namespace down in a worker (about 1 ms of CPU for one with only
        # loopback), which would run beside a restart's next start.
        # Within a budget of descriptors (_HOLDS): near the open-file
        # limit they are the sandboxes' own, not an optimisation's.
        self._mntns = self._netns = -1
        if self.pidfd >= 0 and _HOLDS.take():
            self._mntns = _own_namespace(self.pid, "mnt")
            self._netns = _own_namespace(self.pid, "net")
            if self._mntns < 0 and self._netns < 0:
                _HOLDS.give()
        self._exit: SandboxExit | None = None
        self.restored_from: CheckpointInfo | None = None
        """The checkpoint it was restored from, if it was."""
        self._destroyed = False
        self._signals_ready = False
        # Who holds the pidfd now (see _pidfd_held), and whether destroy()
        # has let it go; the lock guards both, never a system call but close.
        self._pidfd_lock = threading.Lock()
        self._pidfd_users = 0
        self._pidfd_released = False
        # The CRIU checkpointing it now, if any (a pidfd, see _run_criu),
        # and whether it was sent SIGKILL: a kill ends that CRIU first.
        self._criu_lock = threading.Lock()
        self._criu = -1
        self._sigkilled = False

    @property
    def name(self) -> str:
        """The sandbox's name."""
        return self.spec.name

    @property
    def exit(self) -> SandboxExit | None:
        """How it ended, once :meth:`wait` or :meth:`poll` has seen it end."""
        return self._exit

    def send_signal(self, sig: int) -> None:
        """Signal the sandbox's init (tini forwards it to the command).

        Goes through the pidfd, so it can never hit a recycled PID. A no-op
        once the sandbox has ended or been destroyed (by another thread
        meanwhile too).
        """
        if sig == signal.SIGKILL:
            self.end_checkpoint()
        if self._exit is not None or self.pidfd < 0:
            return
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and not self._signals_ready:
            self._wait_signals_ready(sig)
        with self._pidfd_held() as pidfd:
            if pidfd is None:
                return  # destroyed meanwhile: nothing left to signal
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                pass

    @contextlib.contextmanager
    def _pidfd_held(self) -> Iterator[int | None]:
        """The pidfd, kept open until the block ends; None once destroyed.

        :meth:`destroy` may run in one thread (the supervisor's janitor)
        while another signals the sandbox or execs into it. A closed
        descriptor's number goes to the next one opened, say another
        sandbox's pidfd, and a signal through the old number would hit
        that sandbox. So :meth:`destroy` closes the pidfd only once nobody
        holds it: the last holder closes it then.
        """
        with self._pidfd_lock:
            if self._pidfd_released or self.pidfd < 0:
                fd = None
            else:
                fd = self.pidfd
                self._pidfd_users += 1
        try:
            yield fd
        finally:
            if fd is not None:
                with self._pidfd_lock:
                    self._pidfd_users -= 1
                    if self._pidfd_released and self._pidfd_users == 0:
                        os.close(fd)

    def _release_pidfd(self) -> None:
        """Close the pidfd now, or when its last holder is done (destroy)."""
        with self._pidfd_lock:
            if self._pidfd_released:
                return
            self._pidfd_released = True
            if self._pidfd_users == 0 and self.pidfd >= 0:
                os.close(self.pidfd)

    def _wait_signals_ready(self, sig: int) -> None:
        """Wait until the init (tini) has blocked *sig* to collect it.

        The kernel discards a signal sent to a PID namespace's init while
        the init has no handler for it and does not block it; tini blocks
        every signal first thing, but a signal sent in the microseconds
        after exec would be lost (seen: a stop right after a start). The
        mask cannot be set before exec: tini hands its initial mask on to
        the command. tini blocks its signals before it forks the command,
        so an init with a child is ready (its blocked mask cannot be read
        instead: while tini sits in sigtimedwait the kernel shows the
        waited-for signals as unblocked). A bounded wait, normally over at
        the first look.
        """
        deadline = time.monotonic() + 1.0
        bit = 1 << (sig - 1)
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/task/{self.pid}/children", "rb") as f:
                    if f.read().strip():
                        self._signals_ready = True
                        return
                with open(f"/proc/{self.pid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"SigBlk:"):
                            if int(line.split()[1], 16) & bit:
                                self._signals_ready = True
                                return
                            break
            except OSError:
                return  # gone: nothing to wait for
            time.sleep(0.0002)

    def kill(self) -> None:
        """SIGKILL the init; the kernel then kills the whole PID namespace.

        A checkpoint being taken of it fails at once: its CRIU is killed
        first (see :meth:`end_checkpoint`)."""
        self.send_signal(signal.SIGKILL)

    def end_checkpoint(self) -> None:
        """Kill the CRIU checkpointing it, if one is, and any that starts
        from now on: for a sandbox being killed, or found dead (an OOM kill).

        A sandbox killed under CRIU can leave the two waiting for each
        other: CRIU for a task it has seized, the dying init (in the kernel)
        for its children, which as CRIU's tracees stay unreaped zombies
        until CRIU waits for them. Seen on cgroup v1 after our kill, and on
        v2 after an OOM kill: a pre-dump that ended only at CRIU_TIMEOUT,
        ten minutes later. CRIU's death lets the tasks go, and the
        checkpoint was doomed anyway (CRIU always leaves the tree running:
        the kill after a checkpoint is ours, so a dead init always means a
        failed one).
        """
        with self._criu_lock:
            self._sigkilled = True
            if self._criu >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._criu, signal.SIGKILL)

    def wait(self) -> SandboxExit:
        """Block until the init has exited; return how it ended."""
        while self._exit is None:
            status = self._reaper.reap(self._proc, block=True)
            if status is not None:
                self._finish(status)
        return self._exit

    def poll(self, *, stats: bool = True) -> SandboxExit | None:
        """Return how it ended if the init has exited, without blocking.

        With *stats* False the cgroup's counters are not read: the exit's
        ``stats`` is None and its ``oom_killed`` False. For a caller that
        reads the OOM counters itself (the supervisor, through its watch):
        seven files less on a restart's path."""
        if self._exit is None:
            status = self._reaper.reap(self._proc, block=False)
            if status is not None:
                self._finish(status, read_stats=stats)
        return self._exit

    def _finish(self, result: ExitStatus, *, read_stats: bool = True) -> None:
        code, sig, status = result.exit_code, result.signal, result.status
        stats: CgroupStats | None = None
        if read_stats:
            with contextlib.suppress(CgroupError, OSError):
                stats = self.cgroup.stats()
        self._exit = SandboxExit(
            status=status,
            exit_code=code,
            signal=sig,
            oom_killed=bool(stats and stats.oom_kill > 0),
            stats=stats,
            duration=time.monotonic() - self.started,
        )

    def destroy(self) -> None:
        """Kill it if still running, reap it, remove its cgroup and layers.

        Idempotent. Cleanup errors are collected and the first is raised
        after every step has been tried.
        """
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self._exit is None:
                self.kill()
                # A frozen (paused) sandbox: on cgroup v1 a frozen task does
                # not act on SIGKILL until thawed, and the wait would never end.
                with contextlib.suppress(CorralError, OSError):
                    self.cgroup.thaw()
                self.wait()
        finally:
            try:
                self._let_namespaces_go()
                self._cleanup.close()
            finally:
                self._reaper.forget(self._proc)
                self._release_pidfd()

    def detach(self) -> None:
        """Let go of the sandbox without touching it: it runs on, recorded,
        for whoever takes it back next (:meth:`Runtime.adopt`). Only our
        descriptors are closed; :meth:`destroy` then does nothing."""
        if self._destroyed:
            return
        self._destroyed = True
        self._cleanup.pop_all()  # the removal steps are the next owner's now
        self._let_namespaces_go()
        self._release_pidfd()

    def _let_namespaces_go(self) -> None:
        if self._mntns < 0 and self._netns < 0:
            return
        for fd in (self._mntns, self._netns):
            if fd >= 0:
                os.close(fd)
        self._mntns = self._netns = -1
        _HOLDS.give()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class ExecProcess:
    """A process started in a running sandbox by :meth:`Runtime.exec`.

    It is a child of the process that called :meth:`Runtime.exec`, which
    must wait for it or :meth:`close` it: the sandbox's init cannot finish
    exiting (:meth:`Sandbox.wait` blocks) while an exec'd process of it is
    an unreaped zombie, because the kernel waits for every PID of the
    namespace to be freed. Close exec'd processes before destroying their
    sandbox. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, sandbox: str, spawned: Spawned, reaper: Reaper | None = None) -> None:
        self.sandbox = sandbox
        """The name of the sandbox it runs in."""
        self.pid = spawned.pid
        """Its PID on the host."""
        self.pidfd = spawned.pidfd
        """A pidfd for it (closed by :meth:`close`)."""
        self.pty_master = spawned.pty_master
        """The master of its terminal (``tty=True``), else None. Closed by
        :meth:`close` unless taken with :meth:`take_pty_master`."""
        self._status: int | None = None
        self._closed = False
        self._proc = spawned
        self._reaper = reaper or Reaper()

    def take_pty_master(self) -> int | None:
        """Take ownership of the pty master: :meth:`close` no longer closes it."""
        fd, self.pty_master = self.pty_master, None
        return fd

    def send_signal(self, sig: int) -> None:
        """Signal the process through its pidfd; a no-op once it has exited."""
        if self._status is not None or self._closed:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def poll(self) -> int | None:
        """Its shell-style status (the exit code, or 128+N after signal N)
        if it has exited, without blocking; else None."""
        if self._status is None:
            self._collect(self._reaper.reap(self._proc, block=False))
        return self._status

    def wait(self) -> int:
        """Block until it has exited; return its shell-style status."""
        while self._status is None:
            self._collect(self._reaper.reap(self._proc, block=True))
        return self._status

    def _collect(self, result: ExitStatus | None) -> None:
        if result is not None:
            self._status = result.status
            # Used: whoever kept it for us (the keeper) may drop it.
            self._reaper.forget(self._proc)

    def close(self) -> None:
        """Kill it if still running, reap it, close its descriptors. Idempotent."""
        if self._closed:
            return
        try:
            if self._status is None:
                self.send_signal(signal.SIGKILL)
                self.wait()
        finally:
            self._closed = True
            os.close(self.pidfd)
            fd = self.take_pty_master()
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> ExecProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _privileges(spec: SandboxSpec, cache_dir: str | None = None) -> dict[str, Any]:
    """The privilege fields of a launch or exec config (capabilities,
    no_new_privs, seccomp filter, rlimits): the same for a sandbox's init
    and for everything exec'd into it."""
    last = cap_last_cap()
    sec = spec.security
    caps = None if sec.privileged else kept_capabilities(sec, last)
    seccomp = None
    if not sec.privileged and sec.seccomp != "unconfined":
        from ._seccomp import compile_filter

        filters = compile_filter(sec.seccomp, caps, cache_dir)
        seccomp = None if filters is None else list(filters)
    return {
        "caps": caps,
        "last_cap": last,
        "no_new_privs": sec.no_new_privs and not sec.privileged,
        "seccomp": seccomp,
        "rlimits": effective_rlimits(sec),
    }


_IDMAP_WORKS: dict[int, bool] = {}
"""Whether an idmapped mount of a rootfs on this device works (tried once
per device: the kernel and the file system both have to support it)."""


def _shifted_rootfs(lower: str, base: int, size: int, state_dir: str) -> str:
    from ._userns import shifted_rootfs  # only user-namespace sandboxes need it

    return shifted_rootfs(lower, base, size, state_dir)


def _has_exited(sb: Sandbox, pidfd: int) -> bool:
    """True if the sandbox's init has exited; never reaps it (its owner does).
    *pidfd* is its pidfd, held (see :meth:`Sandbox._pidfd_held`)."""
    return sb.exit is not None or has_exited(pidfd)


class Runtime:
    """Makes sandboxes on this host.

    *state_dir* holds rootfs caches and writable layers; *run_dir* the
    records of live sandboxes. Both default to ``$CORRAL_STATE_DIR`` /
    ``$CORRAL_RUN_DIR`` or ``/var/lib/corral`` / ``/run/corral``.
    *cgroup_parent* is a cgroup path (``/corral``); by default sandbox
    cgroups go below this process's own cgroup. *spawner* is how process
    trees are started: the default forks from this process, which must then
    be single-threaded; a multi-threaded program passes a keeper's spawn.

    With *die_with_caller* (the default spawner only) every sandbox it
    creates is killed when this process dies, however it dies, and what
    is left of it is removed by the next :meth:`sweep_claims` of any
    runtime on the same run directory: what ``corral run`` uses.

    *lxcfs* is where the sandboxes' view of /proc comes from (docs/view.md):
    ``auto`` (corral's own lxcfs, started when first needed), ``off``, or
    the mount point of a running lxcfs; default ``$CORRAL_LXCFS`` or ``auto``.
    """

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        cgroup_root: str = "/sys/fs/cgroup",
        cgroup_parent: str | None = None,
        spawner: Spawner | None = None,
        reaper: Reaper | None = None,
        die_with_caller: bool = False,
        lxcfs: str | None = None,
    ) -> None:
        if die_with_caller and spawner is not None:
            # The parent-death signal follows the init's parent: this
            # process only if it spawned the init itself.
            raise ValueError("die_with_caller needs the default spawner")
        if os.geteuid() != 0:
            raise NotPermittedError(
                "corral must run as root: sandboxes need namespaces, mounts and cgroups"
            )
        self.state_dir = os.fspath(
            state_dir or os.environ.get("CORRAL_STATE_DIR") or DEFAULT_STATE_DIR
        )
        self.run_dir = os.fspath(run_dir or os.environ.get("CORRAL_RUN_DIR") or DEFAULT_RUN_DIR)
        try:
            make_run_dir(self.run_dir)
            for d in (self.state_dir, self.run_dir):
                os.makedirs(os.path.join(d, "sandboxes"), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CorralError(f"cannot create {exc.filename}: {exc.strerror}") from exc
        self.cgroups: Cgroups = open_cgroups(cgroup_root, cgroup_parent)
        self.lxcfs = Lxcfs(self.run_dir, lxcfs, say=_say)
        """The lxcfs the sandboxes' view of /proc comes from."""
        self._cgroup_view = True  # off only to measure what it costs (benchmarks/view.py)
        self._sysinfo_view = sysinfo_supported()  # the same; and only on x86_64
        self._die_with_caller = die_with_caller
        self.init_binary = find_init_binary()
        self._spawn: Spawner = spawner or spawn_direct
        self._networks: Networks | None = None
        # Who tells how a process ended: given, or the keeper whose spawn
        # we use (its holder is the parent of what it starts), or waitid.
        owner = getattr(spawner, "__self__", None)
        self.reaper: Reaper = reaper or (owner if isinstance(owner, Reaper) else Reaper())
        # Inits are orphaned by the intermediate spawn process; keep them.
        _syscalls.set_child_subreaper()

    @property
    def images(self) -> ImageStore:
        """The image store (``STATE_DIR/images``)."""
        return ImageStore(os.path.join(self.state_dir, "images"))

    def resolve_rootfs(self, rootfs: str) -> str:
        """The overlayfs lower directories of *rootfs*, top first and
        joined by ``:``: a built-in base, an image of the store (a name or
        an id), or a directory (a path, or a name that is one here)."""
        return self._resolve(rootfs)[0]

    def image_defaults(self, rootfs: str) -> dict[str, Any]:
        """What the image *rootfs* gives a sandbox by default (``env``,
        ``entrypoint``, ``cmd``, ``workdir``, ``user``, ``exposed_ports``;
        see :class:`rootfs.Image`): empty for a directory, and for the
        built-in base, whose defaults are corral's own."""
        return self._resolve(rootfs)[1]

    def _resolve(self, rootfs: str) -> tuple[str, dict[str, Any], str | None]:
        """:meth:`resolve_rootfs` and :meth:`image_defaults` at once, with
        the image's id (None for a directory): a sandbox's create looks its
        image up once, and records which image it runs on (a name may
        name another image later; ``corral commit`` builds on this one)."""
        store = self.images
        defaults: dict[str, Any] = {}
        image_id = None
        try:
            if rootfs in BUILTIN_BASES:
                builtin = busybox_image(store)
                paths = store.lowerdirs(builtin)
                image_id = builtin.id
            elif rootfs.startswith(("/", ".")) or os.path.isdir(rootfs):
                path = os.path.realpath(rootfs)
                if not os.path.isdir(path):
                    raise SpecError(
                        "rootfs",
                        f"expected {' or '.join(map(repr, BUILTIN_BASES))}, an image or a"
                        f" directory, got {rootfs!r} (no such directory)",
                    )
                paths = [path]
            else:
                try:
                    # A name is one file read (every start pays this); an id
                    # or a prefix lists the store.
                    image = store.tagged(rootfs) or store.find(rootfs)
                except StoreError:
                    hint = ""
                    if is_prepared_ref(rootfs):
                        hint = " (not made yet: prepare_image makes it, as corral run and up do)"
                    raise SpecError(
                        "rootfs",
                        f"expected {' or '.join(map(repr, BUILTIN_BASES))}, an image of the store"
                        f" (corral image ls) or a directory, got {rootfs!r}{hint}",
                    ) from None
                paths = store.lowerdirs(image)
                defaults = dict(image.config)
                image_id = image.id
        except RootfsError as exc:
            raise SandboxError(f"rootfs: {exc}") from exc
        # The real directories: a layer may be a link to one shared from
        # elsewhere, and a caller copying "the rootfs" must get its files.
        paths = [os.path.realpath(p) for p in paths]
        for path in paths:
            if any(c in path for c in ",:\n"):
                raise SpecError(
                    "rootfs", f"the path cannot contain ',' or ':' (overlayfs), got {path!r}"
                )
        return ":".join(paths), defaults, image_id

    @staticmethod
    def _stale(name: str, sdir: str, record: str) -> bool:
        """True if the sandbox's directories are left over from a crash.

        A live sandbox has a record whose init is still a process in the
        sandbox's cgroup; a dead or recycled PID means stale. A sandbox that
        is still being created has no record yet, so a missing record means
        stale only after :data:`~._records.STALE_AFTER`.
        """
        try:
            with open(record) as f:
                data = json.load(f)
            pid, start = int(data["pid"]), int(data.get("starttime", 0))
        except FileNotFoundError:
            return abandoned(sdir, record)
        except (OSError, ValueError, KeyError, TypeError):
            return True
        return not _alive_in(pid, start, name)

    def _spawn_or_reap(
        self,
        cfg: LaunchConfig | ExecConfig,
        stdio: tuple[int, int, int],
        on_pid: OnPid | None = None,
    ) -> Spawned:
        """Spawn; on a reported failure reap the child that reported it, then raise."""
        try:
            return self._spawn(cfg, stdio, on_pid=on_pid)
        except SpawnFailed as exc:
            if exc.pidfd is not None and exc.pid is not None:
                # Killed first: a failure on our side (a report whose
                # descriptor could not be received here, at the open-file
                # limit) leaves a child that goes on to its exec, and the
                # reap would wait for it for ever.
                _kill_pidfd(exc.pidfd)
                failed = Spawned(exc.pid, exc.pidfd, starttime=exc.starttime)
                self.reaper.reap(failed, block=True)
                self.reaper.forget(failed)
                os.close(exc.pidfd)
            raise

    def _make_state_dir(
        self, name: str, sdir: str, record: str, undo: contextlib.ExitStack
    ) -> None:
        """Make the sandbox's directories (upper, work, merged), registering their removal."""
        try:
            os.mkdir(sdir, 0o700)
        except FileExistsError:
            if not self._stale(name, sdir, record):
                raise SandboxExistsError(
                    f"sandbox name {name!r} is in use ({sdir} exists)"
                ) from None
            # Left by a crash (a killed `corral run`, a power cut): reuse.
            shutil.rmtree(sdir, ignore_errors=True)
            _unlink(record)
            os.mkdir(sdir, 0o700)
        undo.callback(_remove_state_dir, sdir)
        for sub in ("upper", "work", "merged"):
            os.mkdir(os.path.join(sdir, sub), 0o755)

    def create(
        self,
        spec: SandboxSpec,
        *,
        stdio: tuple[int, int, int] = (0, 1, 2),
        stdin_devnull: bool = False,
        labels: Mapping[str, Any] | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> Sandbox:
        """Create and start a sandbox; return once its command has been exec'd.

        Raises :class:`~supervisor.SandboxError` (or a subclass) with
        nothing left behind if any step fails, also when the disk is full:
        an ``OSError`` becomes a SandboxError naming the path. With
        *stdin_devnull* the command's stdin is the sandbox's own /dev/null
        instead of ``stdio[0]`` (a sandbox that may be checkpointed must not
        hold a host file). *labels* (plain data) are kept in its record, for
        whoever takes it back (:meth:`adopt`).

        *gate* makes a standby: it is called (blocking, in this thread)
        once everything but the exec is made (namespaces, cgroup, root,
        network) and the init waits; True execs the command at once,
        False calls the start off: :class:`StandbyCancelled`, nothing
        left. So is a standby whose view of lxcfs went stale meanwhile
        (lxcfs was replaced while it waited).
        """
        try:
            return self._create(spec, stdio, stdin_devnull, labels, gate)
        except OSError as exc:
            # Every step undid itself on the way out; only the message is left.
            raise SandboxError(f"sandbox {spec.name!r}: {os_failure(exc)}") from exc

    def _create(
        self,
        spec: SandboxSpec,
        stdio: tuple[int, int, int],
        stdin_devnull: bool,
        labels: Mapping[str, Any] | None,
        gate: Callable[[], bool] | None = None,
    ) -> Sandbox:
        lower, defaults, image = self._resolve(spec.rootfs)
        sdir = os.path.join(self.state_dir, "sandboxes", spec.name)
        record = record_path(self.run_dir, spec.name)
        with contextlib.ExitStack() as undo, self._view(spec.lxcfs) as lxcfs:
            if self._die_with_caller:
                self._claim(spec.name, spec.limits, undo)
            self._make_state_dir(spec.name, sdir, record, undo)
            userns = None
            idmap = False
            layers = lower.split(":")
            if spec.security.userns:
                userns = self._userns(spec, sdir, undo)
                lower, idmap = self._userns_layers(lower, sdir, userns)
                _give_pipes(stdio, userns[0])
            links = _lower_links(sdir, lower) if not idmap else ""
            cgroup = self._make_cgroup(spec, undo)
            mounts = self._mount_sources(spec, userns)
            # Registered before the network's undo, so run after it: the
            # record of an ended sandbox stays until its lease is given back
            # (a restore of its checkpoint takes the address over then).
            undo.callback(_unlink, record)
            on_pid, net, join = self._network(spec, sdir, mounts, undo)
            if gate is not None:
                on_pid = self._gated(on_pid, gate)
            cfg = LaunchConfig(
                argv=list(spec.argv),
                env=_environment(spec, defaults),
                hostname=spec.effective_hostname,
                workdir=spec.workdir if spec.workdir != "/" else defaults.get("workdir") or "/",
                lowerdir=lower,
                upperdir=os.path.join(sdir, "upper"),
                workdir_overlay=os.path.join(sdir, "work"),
                merged=os.path.join(sdir, "merged"),
                init_binary=self.init_binary,
                cgroup_procs=list(cgroup.procs_files()),
                stdin_devnull=stdin_devnull,
                confine=not spec.security.privileged,
                userns=userns,
                idmap_lower=idmap,
                idmap_target=os.path.join(sdir, "lower"),
                lower_links=links,
                die_with=os.getpid() if self._die_with_caller else 0,
                mounts=mounts or None,
                read_only=spec.read_only,
                user=_user(spec, defaults),
                network=spec.network,
                join_netns=join,
                wait_go=on_pid is not None,
                lxcfs=lxcfs or "",
                sysinfo=self._answers_sysinfo(spec),
                cgroup_view=list(cgroup.relative_paths()) if self._cgroup_view else None,
                **_privileges(spec, os.path.join(self.state_dir, "seccomp")),
            )
            try:
                spawned = self._spawn_idmapped(cfg, stdio, on_pid, layers, sdir, userns)
            except SpawnFailed as exc:
                if isinstance(exc.__cause__, StandbyCancelled):
                    raise StandbyCancelled(f"sandbox {spec.name!r}: {exc.__cause__}") from None
                raise _translate(spec.name, exc) from None
            try:
                self._record(record, spec, spawned, cgroup, labels, None, image, net, userns)
            except BaseException:
                self._kill_and_reap(spawned)
                raise
            sb = Sandbox(
                spec, spawned, cgroup, sdir, undo.pop_all(), reaper=self.reaper, labels=labels
            )
            sb.network = net
            return sb
        raise AssertionError("unreachable")  # pragma: no cover

    def _gated(self, on_pid: OnPid | None, gate: Callable[[], bool]) -> OnPid:
        """*on_pid*, then *gate*: what a standby's init waits for. The hold
        on lxcfs is let go meanwhile (an lxcfs that dies must be replaced
        for the others, not wait for this start)."""

        def on_pid_then_gate(pid: int) -> None:
            if on_pid is not None:
                on_pid(pid)
            with self.lxcfs.held_off() as view_still_served:
                go = gate()
            if not go:
                raise StandbyCancelled("its standby was called off")
            if not view_still_served():
                raise StandbyCancelled("lxcfs was replaced while it stood by: its view is stale")

        return on_pid_then_gate

    def _record(
        self,
        path: str,
        spec: SandboxSpec,
        proc: Spawned,
        cgroup: Cgroup,
        labels: Mapping[str, Any] | None,
        restored_from: str | None,
        image: str | None,
        network: Mapping[str, Any] | None = None,
        userns: list[int] | None = None,
    ) -> None:
        """Write sandbox *spec*'s record: all a runtime needs to take it back,
        and the id of the image it runs on (None: a directory). *userns*:
        its host id range [base, size], if it has a user namespace."""
        record = {
            "name": spec.name,
            "pid": proc.pid,
            "starttime": proc.starttime,
            "cgroup": list(cgroup.paths),
            "spec": spec_to_dict(spec),
            "image": image,
            "created": time.time(),
            "restored_from": restored_from,
            "labels": dict(labels or {}),
            "network": dict(network) if network is not None else None,
            "userns": userns,
        }
        try:
            _write_record(path, record)
        except OSError as exc:
            raise SandboxError(
                f"sandbox {spec.name!r}: cannot write its record {path}: {exc.strerror}"
            ) from None

    def _wait_timeout(self, proc: Spawned, timeout: float) -> int:
        """Shell-style exit status of *proc*; -1 after killing it on timeout."""
        if not has_exited(proc.pidfd, timeout):
            _kill_pidfd(proc.pidfd)
            self.reaper.reap(proc, block=True)
            self.reaper.forget(proc)
            return -1
        result = self.reaper.reap(proc, block=True)
        self.reaper.forget(proc)
        assert result is not None
        return result.status

    def _kill_and_reap(self, proc: Spawned) -> None:
        """End a sandbox that cannot be handed out (its record failed)."""
        _kill_pidfd(proc.pidfd)
        self.reaper.reap(proc, block=True)
        self.reaper.forget(proc)
        os.close(proc.pidfd)

    def records(self) -> list[dict[str, Any]]:
        """The records of the sandboxes this runtime's run directory knows
        (live ones, and those whose creator died before removing them)."""
        out = []
        folder = os.path.join(self.run_dir, "sandboxes")
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, entry)) as f:
                    record = json.load(f)
                if isinstance(record, dict) and "name" in record and "pid" in record:
                    out.append(record)
            except (OSError, ValueError):
                continue
        return out

    def sweep(self, owned: Callable[[str], bool]) -> list[str]:
        """Remove what sandboxes without a record left (a writable layer, a
        cgroup, with whatever still runs in it, id claims), for every name
        *owned* says is the caller's; return those names.

        Only for a caller that knows nobody is creating those names now (a
        supervisor holding its run directory's lock): a creation in
        progress has no record yet either.
        """
        folder = os.path.join(self.state_dir, "sandboxes")
        records = os.path.join(self.run_dir, "sandboxes")
        with contextlib.suppress(OSError):
            for entry in os.listdir(records):
                # A record's write cut short by a kill (ours only: a `corral
                # run` may be writing its own right now).
                if entry.endswith(".json.tmp") and owned(entry[: -len(".json.tmp")]):
                    _unlink(os.path.join(records, entry))
        recorded = {r["name"] for r in self.records()}
        cgroups = {
            name[len("corral-") :]: cg for name, cg in self.cgroups.existing("corral-").items()
        }
        names = set(cgroups)
        with contextlib.suppress(OSError):
            names.update(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
        swept = []
        for name in sorted(names - recorded):
            if not owned(name):
                continue
            cg = cgroups.get(name)
            if cg is not None:
                with contextlib.suppress(CorralError, OSError):
                    cg.remove()  # kills what runs in it first
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            _release_userns(self.run_dir, name)
            swept.append(name)
        # Leases of sandboxes that are gone (a supervisor killed while it set
        # one up, or before it gave it back), with their veths; the bridge
        # and rules go too if nothing else uses them.
        self._sweep_network(lambda n: n in recorded or not owned(n))
        return swept

    def _sweep_network(self, alive: Callable[[str], bool]) -> list[str]:
        if not os.path.isdir(os.path.join(self.state_dir, "network")):
            return []
        try:
            return self.networks.sweep(alive)
        except (CorralError, OSError) as exc:
            _say(f"corral: the network's leftovers could not be swept: {exc}")
            return []

    def _claim(self, name: str, limits: Limits, undo: contextlib.ExitStack) -> None:
        """Hold the claim of sandbox *name* until it is destroyed (see :mod:`._claims`)."""
        try:
            where = {
                "state_dir": self.state_dir,
                "cgroup": list(self.cgroups.paths_of(f"corral-{name}", limits.effective())),
                "pid": os.getpid(),
            }
            claim = Claim(self.run_dir, name, where)
        except ClaimInUse:
            raise SandboxExistsError(
                f"sandbox name {name!r} is in use (by a live `corral run`)"
            ) from None
        undo.callback(claim.release)

    def sweep_claims(self) -> list[str]:
        """Remove what sandboxes of dead processes that made them with
        *die_with_caller* left (a killed ``corral run``): cgroup (with
        anything still in it), writable layer, record, id claims; return
        their names. Safe at any time: a live maker's claim is skipped."""
        swept = []
        for name, where in dead_claims(self.run_dir):
            state_dir = str(where.get("state_dir") or self.state_dir)
            record = record_path(self.run_dir, name)
            paths = [str(p) for p in where.get("cgroup", ()) if isinstance(p, str)]
            try:
                self.cgroups.attach(f"corral-{name}", paths).remove()  # kills what is in it
            except (CorralError, OSError):
                # Never made, or only in part (v1: killed between two
                # hierarchies); nothing can run in a part.
                for path in paths:
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
            shutil.rmtree(os.path.join(state_dir, "sandboxes", name), ignore_errors=True)
            _unlink(record)
            _unlink(f"{record}.tmp")
            _release_userns(self.run_dir, name)
            swept.append(name)
        if swept:
            gone = set(swept)
            self._sweep_network(lambda n: n not in gone)
        return swept

    def adopt(self, record: Mapping[str, Any]) -> Sandbox:
        """Take back the sandbox of *record* (from :meth:`records`), left
        by a process that died: running, or ended and not yet destroyed.

        Its identity is checked by start time and cgroup, never by PID
        alone: a sandbox whose init is gone gets ``pidfd`` -1 and its exit
        (from :attr:`reaper`, which may have kept the status; else lost)
        on the first :meth:`Sandbox.poll`. Destroying it removes what
        :meth:`create` made. Raises :class:`~supervisor.SandboxError` if
        the record is unusable (what can be found of it is then removed).
        """
        name = str(record.get("name", ""))
        try:
            spec = spec_from_dict(record["spec"])
            pid, start = int(record["pid"]), int(record["starttime"])
            paths = [str(p) for p in record["cgroup"]]
            if spec.name != name:
                raise ValueError(f"the record of {name!r} holds the spec of {spec.name!r}")
        except (KeyError, TypeError, ValueError, CorralError) as exc:
            raise SandboxError(f"sandbox {name!r}: its record is unusable: {exc}") from None
        sdir = os.path.join(self.state_dir, "sandboxes", name)
        undo = contextlib.ExitStack()
        undo.callback(shutil.rmtree, sdir, ignore_errors=True)
        # Its id claims: by its range if the record has it (a record of an
        # older corral: by its name, a look at every claim).
        ids = record.get("userns")
        if ids is not None:
            from ._userns import hold_range

            hold_range(self.run_dir, ids)  # ours now: a creation need not look at it
        undo.callback(_release_userns, self.run_dir, name, ids)
        try:
            cgroup = self.cgroups.attach(f"corral-{name}", paths)
        except CorralError as exc:
            undo.close()
            _unlink(record_path(self.run_dir, name))
            raise SandboxError(f"sandbox {name!r}: {exc}") from None
        undo.callback(cgroup.remove)
        undo.callback(_unlink, record_path(self.run_dir, name))
        if not spec.security.privileged:
            _device_policy_back(name, cgroup)
        net = record.get("network")
        if isinstance(net, dict) and isinstance(net.get("lease"), dict):
            with contextlib.suppress(TypeError):
                # A record from before there were several networks has no name.
                on = self.networks.get(str(net.get("name") or DEFAULT_NETWORK))
                undo.callback(on.detach, Lease(**net["lease"]), str(net.get("veth")))
        pidfd = -1
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
        # The pidfd pins the process from here on; before, the PID could
        # have been reused: it is the same init only with the same start
        # time and in the sandbox's cgroup.
        if pidfd >= 0 and not _alive_in(pid, start, name):
            os.close(pidfd)
            pidfd = -1
        sb = Sandbox(
            spec,
            Spawned(pid, pidfd, starttime=start),
            cgroup,
            sdir,
            undo,
            reaper=self.reaper,
            labels=record.get("labels") or {},
        )
        with contextlib.suppress(TypeError, ValueError):
            sb.started -= max(0.0, time.time() - float(record["created"]))
        if isinstance(net, dict):
            sb.network = dict(net)
        return sb

    def _userns_layers(self, lower: str, sdir: str, userns: list[int]) -> tuple[str, bool]:
        """The lower layers a user-namespace sandbox mounts, and whether
        they are idmapped: an idmapped mount of each layer (attached below
        ``sdir/lower``) where their file systems can (tried once per file
        system), else shifted copies."""
        layers = lower.split(":")
        if not all(_IDMAP_WORKS.get(os.stat(p).st_dev, True) for p in layers):
            return self._shifted_layers(lower, userns), False
        os.mkdir(os.path.join(sdir, "lower"), 0o755)
        for n in range(len(layers)):
            os.mkdir(os.path.join(sdir, "lower", str(n)), 0o755)
        return lower, True

    def _spawn_idmapped(
        self,
        cfg: LaunchConfig,
        stdio: tuple[int, int, int],
        on_pid: OnPid | None,
        layers: list[str],
        sdir: str,
        userns: list[int] | None,
    ) -> Spawned:
        """Spawn *cfg*; where the kernel refuses to idmap the *layers*
        (nothing was mounted yet), again from shifted copies of them, noted
        for their file systems."""
        try:
            return self._spawn_or_reap(cfg, stdio, on_pid)
        except SpawnFailed as exc:
            if exc.failure.kind != "noidmap" or userns is None:
                raise
        for p in layers:
            _IDMAP_WORKS[os.stat(p).st_dev] = False
        shifted = self._shifted_layers(":".join(layers), userns)
        cfg = cfg._replace(
            lowerdir=shifted, idmap_lower=False, lower_links=_lower_links(sdir, shifted)
        )
        return self._spawn_or_reap(cfg, stdio, on_pid)

    def _remapped(self, info: CheckpointInfo, sdir: str, base: int) -> str:
        """*info*'s images remapped to the range from *base* (in
        ``sdir/checkpoint``), its layer's copy in ``sdir/upper`` moved with
        them; the images directory."""
        from ._userns import shift_owners

        assert info.userns is not None
        old, size = info.userns
        crit = find_crit(check_criu())
        if crit is None:
            raise CheckpointError(
                f"restore of {info.spec.name!r}: its id range is in use, and moving the"
                " checkpoint to another needs CRIU's crit, which is not installed"
            )
        top = os.path.join(sdir, "checkpoint")
        remap_images(info, top, base, crit)
        upper = os.path.join(sdir, "upper")
        os.chown(upper, old, old)  # the layer's root, as it was dumped
        shift_owners(upper, base - old, old, size)
        return os.path.join(top, "images")

    def _shifted_layers(self, lower: str, userns: list[int]) -> str:
        """*lower*'s layers as copies whose owners are shifted into the
        sandbox's id range (each cached, shared by the images that have it)."""
        base, size = userns
        return ":".join(_shifted_rootfs(p, base, size, self.state_dir) for p in lower.split(":"))

    @property
    def networks(self) -> Networks:
        """corral's bridge networks: the default one (``bridge``) and those
        fleets declared (each made when a sandbox first needs it)."""
        if self._networks is None:
            self._networks = Networks(self.state_dir, self.run_dir, say=_say)
        return self._networks

    def declare_networks(self, decls: Sequence[NetworkDecl]) -> None:
        """Record the networks a fleet declares, checked against the host's
        routes and addresses and against what sandboxes use now (see
        :meth:`Networks.declare`); a problem is one line, nothing recorded."""
        self.networks.declare(decls)

    def _network(
        self,
        spec: SandboxSpec,
        sdir: str,
        mounts: list[list[Any]],
        undo: contextlib.ExitStack,
        address: str | None = None,
        up: bool = True,
    ) -> tuple[OnPid | None, dict[str, Any] | None, list[int] | None]:
        """For a bridged sandbox: its lease (*address*, if given; given back
        by *undo*), its ``/etc/hosts`` and ``/etc/resolv.conf`` (added to
        *mounts*), and what gives its waiting init its interface (its host
        end down unless *up*); with what its record keeps; for
        ``sandbox:NAME``, the init whose namespace it joins. Nothing for the
        other modes."""
        if spec.network.startswith("sandbox:"):
            return None, None, self._join(spec, mounts)
        on = network_name(spec.network)
        if on is None:
            return None, None, None
        # Names in the allow-list become addresses now, before the lease:
        # one that does not resolve leaves nothing to undo. The lease keeps
        # the addresses, so the rules stay what they were at the start
        # (written again as other sandboxes come and go, and by a
        # supervisor that takes this one over) until the sandbox restarts.
        try:
            egress = resolve_egress(spec.egress)
        except SandboxError as exc:
            raise SandboxError(f"sandbox {spec.name!r}: {exc}") from None
        bridge = self.networks.get(on)
        lease = bridge.attach(spec.name, spec.ports, egress, address, self._ended)
        veth = veth_name(spec.name)
        undo.callback(bridge.detach, lease, veth)
        for name, text in (
            ("hosts", hosts_file(lease.address, spec.effective_hostname, (), lease.address6)),
            ("resolv.conf", resolv_conf()),
        ):
            path = os.path.join(sdir, name)
            with open(path, "w") as f:
                f.write(text)
            # The sandbox's own copies, bind-mounted (as Docker does): what it
            # writes there stays its own, and corral can rewrite them in place.
            mounts.append(["bind", path, f"/etc/{name}", False, None, None, False, False])

        def on_pid(pid: int) -> None:
            bridge.plug(pid, spec.name, lease, up)

        record = {"mode": "bridge", "name": on, "lease": lease._asdict(), "veth": veth}
        return on_pid, record, None

    def _ended(self, name: str) -> bool:
        """True if sandbox *name* is recorded and its init has ended: its
        removal is pending (a restart's restore may come first)."""
        try:
            with open(record_path(self.run_dir, name)) as f:
                record = json.load(f)
            pid, start = int(record["pid"]), int(record.get("starttime") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return not _alive_in(pid, start, name)

    def _join(self, spec: SandboxSpec, mounts: list[list[Any]]) -> list[int]:
        """``sandbox:NAME``: the running sandbox NAME (a sandbox's name, or a
        fleet instance's: its newest generation) whose network namespace
        *spec*'s joins, checked now; its /etc/hosts and /etc/resolv.conf
        too, if it has them (a bridged one). Its init's ``[pid, starttime]``."""
        name = spec.network[len("sandbox:") :]
        found = [
            r
            for r in self.records()
            if r.get("name") == name or (r.get("labels") or {}).get("instance") == name
        ]
        found.sort(key=lambda r: float(r.get("created") or 0))
        for record in reversed(found):
            pid, start = int(record["pid"]), int(record.get("starttime", 0))
            if _alive_in(pid, start, str(record["name"])):
                target_dir = os.path.join(self.state_dir, "sandboxes", str(record["name"]))
                for file in ("hosts", "resolv.conf"):
                    path = os.path.join(target_dir, file)
                    if os.path.exists(path):
                        mounts.append(
                            ["bind", path, f"/etc/{file}", False, None, None, False, False]
                        )
                return [pid, start]
        raise SandboxError(
            f"sandbox {spec.name!r}: network: no running sandbox {name!r} to share a network with"
        )

    def network_stats(self, sandboxes: Sequence[Sandbox]) -> dict[str, dict[str, int]]:
        """The network counters of the bridged among *sandboxes*, by name,
        as the sandbox sees them: ``rx_bytes``, ``rx_packets``, ``tx_bytes``,
        ``tx_packets``, ``rx_dropped``, ``tx_dropped`` (its interface, read
        from the host's end of its veth, whose rx is its tx) and ``denied``
        (packets its egress allow-list dropped)."""
        from ._net import _nft

        bridged = [sb for sb in sandboxes if sb.network and sb.network.get("veth")]
        if not bridged:
            return {}
        from ._net._links import link_stats

        denied = _nft.counters()
        # Through netlink, in this process's network namespace (/sys shows
        # the namespace of whoever mounted it, not necessarily ours).
        links = link_stats([str(sb.network["veth"]) for sb in bridged if sb.network])
        out = {}
        for sb in bridged:
            assert sb.network is not None
            host = links.get(str(sb.network["veth"]), {})
            row = {
                f"{mine}_{what}": host.get(f"{hosts}_{what}", 0)
                for mine, hosts in (("rx", "tx"), ("tx", "rx"))
                for what in ("bytes", "packets", "dropped")
            }
            row["denied"] = denied.get(_nft.counter_name(sb.spec.name), (0, 0))[0]
            out[sb.name] = row
        return out

    def write_hosts(self, sb: Sandbox, peers: Sequence[tuple[str, str]]) -> None:
        """Rewrite bridged sandbox *sb*'s ``/etc/hosts`` with *peers*
        (address, names) besides its own name: in place, the file being
        bind-mounted (a rename would leave the sandbox the old one)."""
        if not sb.network or not isinstance(sb.network.get("lease"), dict):
            return
        address = str(sb.network["lease"].get("address"))
        address6 = sb.network["lease"].get("address6")
        text = hosts_file(
            address, sb.spec.effective_hostname, peers, str(address6) if address6 else None
        )
        with contextlib.suppress(FileNotFoundError):  # gone: destroyed
            _rewrite_in_place(os.path.join(sb.state_path, "hosts"), text.encode())

    def volume_path(self, name: str) -> str:
        """Where the named volume *name* is kept: ``STATE_DIR/volumes/NAME``."""
        return os.path.join(self.state_dir, "volumes", name)

    def _mount_sources(self, spec: SandboxSpec, userns: list[int] | None) -> list[list[Any]]:
        """The spec's mounts as the init makes them (:class:`LaunchConfig`):
        each host source checked, each named volume made on first use."""
        out: list[list[Any]] = []
        for m in spec.mounts:
            is_dir = True
            source = m.source
            if m.kind == "bind":
                try:
                    is_dir = stat.S_ISDIR(os.stat(source).st_mode)
                except OSError as exc:
                    raise SpecError(
                        "volumes", f"{m.describe()}: {os_failure(exc)} on the host"
                    ) from None
            elif m.kind == "volume":
                source = self._volume(m.source, userns)
            # (In a user namespace the host's side copies the volumes, as
            # root: no directory on the way must be searchable by the
            # sandbox's root. See _linux._child.enter_new_userns.)
            out.append([m.kind, source, m.target, m.read_only, m.size, m.mode, m.noexec, is_dir])
        return out

    def _volume(self, name: str, userns: list[int] | None) -> str:
        """The named volume's directory, made on first use. A new one is
        owned by the root of the sandbox that makes it (in a user
        namespace: its host id), as Docker makes volumes."""
        path = self.volume_path(name)
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return path
        if userns is not None:
            os.chown(path, userns[0], userns[0])
        return path

    def _make_cgroup(self, spec: SandboxSpec, undo: contextlib.ExitStack) -> Cgroup:
        """The sandbox's cgroup, with its limits and (unless privileged) the
        device policy; *undo* removes it."""
        cgroup = self.cgroups.create(f"corral-{spec.name}", spec.limits.effective())
        undo.callback(patiently, cgroup.remove)
        if not spec.security.privileged:
            try:
                cgroup.restrict_devices()
            except CgroupError as exc:
                # Never run a sandbox without its device policy: on v2 a
                # kept SYS_ADMIN could mount a tmpfs without nodev and open
                # a disk through a node made there.
                raise CgroupError(
                    f"sandbox {spec.name!r} not started: it would run without its device"
                    f" policy: {exc}"
                ) from None
        return cgroup

    def check_update(self, sb: Sandbox, limits: Limits) -> None:
        """Refuse (:class:`~supervisor.SpecError`) to change running sandbox
        *sb*'s limits to *limits* if they break a rule between keys, or if
        their memory limit is below what it uses now."""
        check_limits(limits)
        if limits.memory is not None and limits.memory != sb.spec.limits.memory:
            use = sb.cgroup.stats().memory_current
            if use > limits.memory:
                raise SpecError(
                    "memory",
                    f"sandbox {sb.name!r} uses {human_size(use)} now, more than the"
                    f" {human_size(limits.memory)} asked for: --force sets it anyway (the"
                    " kernel then reclaims what it can, and OOM-kills if that is not enough)",
                )

    def update(self, sb: Sandbox, limits: Limits, *, force: bool = False) -> Limits:
        """Change the limits of running sandbox *sb* to *limits* (in its
        cgroup, its spec and its record, for whoever takes it back); return
        the limits it had.

        A memory limit below what the sandbox uses now is refused with a
        :class:`~supervisor.SpecError` unless *force* (the kernel then
        reclaims what it can, and OOM-kills if that is not enough). A limit
        this layout cannot enforce is refused too; a value the kernel
        refuses half way is undone (:class:`~supervisor.CgroupError`).
        Blocking: lowering ``memory`` makes the kernel reclaim first.
        """
        old = sb.spec.limits
        check_limits(limits)
        self.cgroups.check(limits.effective())
        if not force:
            self.check_update(sb, limits)
        try:
            sb.cgroup.apply(limits.effective(), old.effective())
        except BaseException:
            # What was written goes back; the key that failed was not.
            with contextlib.suppress(CorralError, OSError):
                sb.cgroup.apply(old.effective(), limits.effective())
            raise
        sb.spec = sb.spec._replace(limits=limits)
        path = record_path(self.run_dir, sb.name)
        try:
            with open(path) as f:
                record = json.load(f)
            record["spec"] = spec_to_dict(sb.spec)
            _write_record(path, record)
        except (OSError, ValueError) as exc:
            # Enforced all the same; a successor would take it back with
            # the limits it was made with (and say it changed).
            _say(f"corral: sandbox {sb.name!r}: its record keeps its old limits: {exc}")
        return old

    def _answers_sysinfo(self, spec: SandboxSpec) -> bool:
        """Whether ``sysinfo`` answers for *spec*'s sandbox: part of its view
        (``lxcfs = false`` and ``CORRAL_LXCFS=off`` turn both off), with or
        without a running lxcfs, for a sandbox that has a seccomp filter
        (docs/view.md): an unconfined or privileged one has none of ours,
        and may install a filter with a listener of its own."""
        confined = not spec.security.privileged and spec.security.seccomp != "unconfined"
        return spec.lxcfs and confined and self.lxcfs.setting != "off" and self._sysinfo_view

    def _view(self, wanted: bool) -> contextlib.AbstractContextManager[str | None]:
        """The mount point of the lxcfs to bind the sandbox's view from,
        held until its record is written (see :meth:`Lxcfs.held`); None
        without the view (not *wanted*, or no lxcfs)."""
        return self.lxcfs.held() if wanted else contextlib.nullcontext(None)

    def _userns(
        self,
        spec: SandboxSpec,
        sdir: str,
        undo: contextlib.ExitStack,
        dumped: tuple[int, int] | None = None,
    ) -> list[int]:
        """Claim the sandbox's id range (a restore's: the *dumped* one);
        give its writable layer to its root."""
        from ._userns import allocate_range, check_reachable

        base, size = allocate_range(spec.security, spec.name, self.run_dir, undo, dumped)
        # The overlay is mounted by the sandbox's root, an unprivileged host
        # user: it must be able to reach the layers. STATE_DIR/sandboxes may
        # be searched (not listed) by anyone; the sandbox's own directory
        # only by its root's group (as Docker's userns-remap does).
        os.chmod(os.path.dirname(sdir), 0o711)
        os.chown(sdir, 0, base)
        os.chmod(sdir, 0o710)
        check_reachable(sdir, base)
        for sub in ("upper", "work", "merged"):
            os.chown(os.path.join(sdir, sub), base, base)
        return [base, size]

    def exec(
        self,
        sb: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        stdio: tuple[int, int, int] = (0, 1, 2),
        tty: bool = False,
        winsize: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> ExecProcess:
        """Start *argv* in the running sandbox *sb*, like ``docker exec``;
        return once it has been exec'd.

        The process joins every namespace and the cgroup of the sandbox,
        with the sandbox's root as its root and *workdir* (default: the
        spec's) as its working directory, in a session of its own. Its
        environment is the sandbox's, updated with *env*. It gets no more
        privilege than the sandbox's own processes. Its fds 0, 1, 2 are
        *stdio*, or with *tty* a new terminal of the sandbox's devpts whose
        master is :attr:`ExecProcess.pty_master`, sized *winsize* (rows,
        columns) before the command runs. It runs as *user* (``UID[:GID]``
        or ``NAME[:GROUP]``), by default the sandbox's own.

        It becomes a child of this process (see :class:`ExecProcess`).
        Raises :class:`~supervisor.CommandNotFoundError`,
        :class:`~supervisor.CommandNotExecutableError` or
        :class:`~supervisor.SandboxError` (also if the sandbox has exited)
        with nothing left behind.
        """
        argv = list(argv)
        if not argv or not argv[0]:
            raise SpecError("argv", "expected a command to run, got nothing")
        if any("\0" in a for a in argv):
            raise SpecError("argv", "arguments cannot contain NUL bytes")
        if workdir is None:
            workdir = sb.spec.workdir
        elif not workdir.startswith("/") or "\0" in workdir:
            raise SpecError("workdir", f"expected an absolute path, got {workdir!r}")
        if user is not None:
            parse_user(user)
        try:
            defaults = self.image_defaults(sb.spec.rootfs)
        except CorralError:
            defaults = {}  # its image is gone from the store: corral's defaults
        user = user or _user(sb.spec, defaults)
        environment = _environment(sb.spec, defaults)
        if user is not None and user.partition(":")[0] not in ("0", "root"):
            if "HOME" not in sb.spec.env:
                environment.pop("HOME", None)  # the user's, from /etc/passwd
        elif "HOME" not in environment:
            environment["HOME"] = "/root"
        for key, value in (env or {}).items():
            if not _ENV_KEY_RE.match(key):
                raise SpecError("env", f"expected KEY=VALUE, got key {key!r}")
            if "\0" in value:
                raise SpecError("env", f"the value of {key} cannot contain NUL bytes")
            environment[key] = value
        not_running = f"sandbox {sb.name!r}: not running (its init has exited)"
        # Held until the spawn is done: the process joins the sandbox
        # through this pidfd, so a destroy meanwhile must not free its
        # number for another sandbox's.
        with sb._pidfd_held() as pidfd:
            if pidfd is None or _has_exited(sb, pidfd):
                raise SandboxError(not_running)
            cfg = ExecConfig(
                argv=argv,
                env=environment,
                workdir=workdir,
                cgroup_procs=list(sb.cgroup.procs_files()),
                target_pidfd=pidfd,
                tty=tty,
                winsize=list(winsize) if winsize else None,
                userns=sb.spec.security.userns,
                user=user,
                sysinfo=self._answers_sysinfo(sb.spec),
                **_privileges(sb.spec, os.path.join(self.state_dir, "seccomp")),
            )
            if sb.spec.security.userns:
                try:
                    base = _id_range_of(sb.pid)[0]
                except (OSError, CheckpointError):
                    raise SandboxError(not_running) from None
                _give_pipes(stdio, base)
            try:
                spawned = self._spawn_or_reap(cfg, stdio)
            except SpawnFailed as exc:
                # The init may have ended while we joined it: setns or the fork
                # in its dying PID namespace then fails with a less clear errno.
                if exc.failure.kind == "setup" and _has_exited(sb, pidfd):
                    raise SandboxError(not_running) from None
                raise _translate(sb.name, exc) from None
            except OSError as exc:
                # No keeper to spawn through just now (a KeeperError: killed,
                # and its replacement could not start): this exec's failure,
                # in one line, as create says it; the next call tries again.
                raise SandboxError(f"sandbox {sb.name!r}: exec: {os_failure(exc)}") from exc
        return ExecProcess(sb.name, spawned, self.reaper)

    # -- checkpoint and restore (CRIU) ------------------------------------------

    @property
    def checkpoints(self) -> CheckpointStore:
        """The checkpoints kept below ``STATE_DIR/checkpoints``."""
        return CheckpointStore(os.path.join(self.state_dir, "checkpoints"))

    def checkpoint(
        self,
        sb: Sandbox,
        *,
        name: str | None = None,
        tag: str | None = None,
        leave_running: bool = False,
        on_dumped: Callable[[CheckpointInfo], None] | None = None,
    ) -> CheckpointInfo:
        """Checkpoint a running sandbox with CRIU; return what was stored.

        The sandbox is frozen (its cgroup's freezer) while CRIU dumps it and
        its writable layer is copied, so memory and files agree. Then it is
        killed, or thawed with *leave_running*. The checkpoint is kept
        under *name* (default: the sandbox's name) and *tag* (default: the
        time). *on_dumped(info)* runs once the checkpoint is complete, before the
        kill. On failure the sandbox is thawed and left running, nothing is
        stored, and :class:`CheckpointError` says why (CRIU's reason, or the
        path that could not be written when the disk is full).
        """
        key = name or sb.name
        try:
            return self._checkpoint(sb, key, tag, leave_running, on_dumped)
        except OSError as exc:
            raise CheckpointError(f"checkpoint of {key!r} failed: {os_failure(exc)}") from exc

    def settle_checkpoints(self, name: str, timeout: float = CRIU_TIMEOUT) -> list[str]:
        """Clear up after checkpoints of *name* that the death of the
        process taking them interrupted; return their tags.

        Each left a partial checkpoint, and perhaps a CRIU still at work:
        killed mid-dump, CRIU would leave the sandbox with its parasite code
        in it, so it is left to finish (up to *timeout*, then killed). Then
        the partial checkpoint is removed. The sandbox may still be frozen
        (the freeze and thaw around the dump are the caller's): the caller
        decides, as only it knows whether it was paused before (blocking:
        run it in a thread).
        """
        folder = self.checkpoints.dir(name)
        try:
            partials = sorted(
                e for e in os.listdir(folder) if e.startswith(".") and e.endswith(".partial")
            )
        except OSError:
            return []
        tags = []
        for entry in partials:
            path = os.path.join(folder, entry)
            _wait_for_criu(os.path.join(path, CRIU_PID), timeout)
            shutil.rmtree(path, ignore_errors=True)
            tags.append(entry[1 : -len(".partial")])
        return tags

    def _checkpoint(
        self,
        sb: Sandbox,
        key: str,
        tag: str | None,
        leave_running: bool,
        on_dumped: Callable[[CheckpointInfo], None] | None,
    ) -> CheckpointInfo:
        if sb.spec.network != "none" and not is_bridged(sb.spec.network):
            raise CheckpointError(
                f"sandbox {key!r} has network = {sb.spec.network!r}: only sandboxes with"
                " network 'none', 'bridge' or a fleet's network can be checkpointed"
                " (docs/network.md)"
            )
        veth = _veth_of(sb)
        criu = check_criu()
        store = self.checkpoints
        if sb.poll() is not None:
            raise CheckpointError(f"sandbox {key!r} has exited: there is nothing to checkpoint")
        tag = validate_tag(tag) if tag is not None else store.new_tag(key)
        final = store.path(key, tag)
        if os.path.exists(final):
            raise CheckpointError(f"sandbox {key!r} already has a checkpoint tagged {tag!r}")
        partial = os.path.join(store.dir(key), f".{tag}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        images = os.path.join(partial, "images")
        start = time.monotonic()
        try:
            os.makedirs(images, mode=0o700)
            stdio = tuple(_fd_key(sb.pid, n) for n in (0, 1, 2))
            common = [
                "--tree",
                str(sb.pid),
                "--external",
                f"mnt[{INIT_PATH}]:{INIT_KEY}",
                *(
                    arg
                    for target, name, _ in _external_mounts(sb.spec)
                    for arg in ("--external", f"mnt[{target}]:{name}")
                ),
                *(_external_network(sb.pid, sb.spec) if veth is not None else ()),
                *_external_view(sb.pid),
                *_external_devices(sb.pid),
                "--freeze-cgroup",
                sb.cgroup.freezer_dir,
                *CRIU_OPTIONS,
            ]
            prev: list[str] = []
            pre_frozen = 0.0
            if leave_running and criu.crit is not None:
                # Iterative: memory is pre-dumped while the sandbox runs
                # (CRIU freezes it only to grab the pages), so the frozen
                # dump below writes only the pages dirtied since.
                pre = os.path.join(partial, "pre")
                os.mkdir(pre, 0o700)
                argv = [criu.binary, "pre-dump", *common, "--images-dir", pre]
                pre_start = time.monotonic()
                code, err = _run_criu(
                    [*argv, "--log-file", "pre-dump.log", "--track-mem"], partial, sb
                )
                pre_seconds = time.monotonic() - pre_start
                if code != 0:
                    _check_alive(sb, key)
                    reason = _criu_reason(code, os.path.join(pre, "pre-dump.log"), err)
                    raise CheckpointError(f"checkpoint of {key!r} failed: criu pre-dump: {reason}")
                # Its freeze counts too; if CRIU's figure cannot be read,
                # the whole pre-dump does (an upper bound, never less).
                pre_frozen = criu_frozen_seconds(criu.crit, pre) or pre_seconds
                prev = ["--prev-images-dir", "../pre", "--track-mem"]
            sb.cgroup.freeze()
            frozen_at = time.monotonic()
            cut = False
            try:
                if veth is not None:
                    # Nothing goes in or out while the tree is dumped, nor
                    # between the dump and the kill: data a peer sent then
                    # would be acknowledged by the kernel and missing from
                    # the checkpoint. (CRIU's network lock is for namespaces
                    # it dumps, and it lifts it as its dump ends, before the
                    # kill.) Its peers resend.
                    _cut(key, veth, up=False)
                    cut = True
                argv = [
                    criu.binary,
                    "dump",
                    *common,
                    *prev,
                    "--images-dir",
                    images,
                    "--log-file",
                    "dump.log",
                    "--network-lock",
                    criu.network_lock,
                    # Always: a failure must leave the sandbox running; the
                    # kill (without leave_running) is ours, after the copy.
                    "--leave-running",
                ]
                # The layer is copied while CRIU dumps: both see the frozen
                # tree, and CRIU does not write into the layer.
                copy = _start_copy(
                    os.path.join(sb.state_path, "upper"), os.path.join(partial, "upper")
                )
                try:
                    criu_start = time.monotonic()
                    code, err = _run_criu(argv, partial, sb)
                    criu_seconds = time.monotonic() - criu_start
                except BaseException:
                    copy.kill()
                    copy.communicate()
                    raise
                copy_error = _finish_copy(copy)
                if code != 0:
                    _check_alive(sb, key)
                    reason = _criu_reason(code, os.path.join(images, "dump.log"), err)
                    raise CheckpointError(f"checkpoint of {key!r} failed: criu dump: {reason}")
                if copy_error is not None:
                    raise CheckpointError(copy_error)
                disarm_sysinfo_filters(images)
                if leave_running:
                    # Memory and files are saved: it may run on while the
                    # checkpoint is written down.
                    sb.cgroup.thaw()
                frozen = time.monotonic() - frozen_at + pre_frozen
                info = CheckpointInfo(
                    name=key,
                    tag=tag,
                    path=final,
                    created=time.time(),
                    size=dir_size(partial),
                    duration=time.monotonic() - start,
                    frozen=frozen,
                    criu_seconds=criu_seconds,
                    leave_running=leave_running,
                    spec=sb.spec,
                    lowerdir=self.resolve_rootfs(sb.spec.rootfs),
                    root_pid=sb.pid,
                    stdio=stdio,  # type: ignore[arg-type]
                    network_lock=criu.network_lock,
                    address=_address_of(sb),
                    userns=_id_range_of(sb.pid) if sb.spec.security.userns else None,
                )
                with open(os.path.join(partial, "checkpoint.json"), "w") as f:
                    json.dump(info.to_json(), f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(partial, final)
                if on_dumped is not None:
                    on_dumped(info)
                if not leave_running:
                    if veth is not None:
                        # Gone before the kill: the kernel closing its
                        # sockets sends no FIN or reset the peers would
                        # believe (the restored sandbox has them open).
                        remove_veth(veth)
                        cut = False
                    sb.kill()  # while frozen: it never runs past the checkpoint
            finally:
                if cut and veth is not None:
                    _cut(key, veth, up=True)
                try:
                    sb.cgroup.thaw()
                except CgroupError:
                    # A sandbox that died during the checkpoint may have had
                    # its cgroup removed already: that is no news, and must
                    # not hide why the checkpoint failed.
                    if sb.poll() is None:
                        raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return info

    def restore(
        self,
        checkpoint: CheckpointInfo | str,
        spec: SandboxSpec | None = None,
        *,
        stdio: tuple[int, int, int] = (0, 1, 2),
        timeout: float = CRIU_TIMEOUT,
        labels: Mapping[str, Any] | None = None,
    ) -> Sandbox:
        """Bring a checkpoint back as a running sandbox; return it.

        The restored tree gets new namespaces, a new cgroup with *spec*'s
        limits (default: the checkpoint's spec; its name must be free) and a
        copy of the checkpointed writable layer; PIDs inside are the dumped
        ones. The sandbox's stdout/stderr pipes are replaced by ``stdio``.
        On failure nothing is left (CRIU kills what it restored; the
        cgroup and directories are removed) and :class:`CheckpointError`
        says why (an ``OSError``, such as a full disk, too, naming the path).
        """
        try:
            return self._restore(checkpoint, spec, stdio, timeout, labels)
        except OSError as exc:
            what = f"restore of {spec.name!r}" if spec is not None else "restore"
            raise CheckpointError(f"{what} failed: {os_failure(exc)}") from exc

    def _restore(
        self,
        checkpoint: CheckpointInfo | str,
        spec: SandboxSpec | None,
        stdio: tuple[int, int, int],
        timeout: float,
        labels: Mapping[str, Any] | None,
    ) -> Sandbox:
        criu = check_criu()
        info = (
            checkpoint
            if isinstance(checkpoint, CheckpointInfo)
            else CheckpointInfo.load(checkpoint)
        )
        spec = spec or info.spec
        lower, _, image = self._resolve(spec.rootfs)
        if lower != info.lowerdir:
            raise CheckpointError(
                f"checkpoint {info.path} was taken on rootfs {info.lowerdir}, not {lower}"
            )
        bridged = is_bridged(spec.network)
        if network_name(spec.network) != network_name(info.spec.network) or (
            bridged and info.address is None
        ):
            raise CheckpointError(
                f"restore of {spec.name!r}: checkpoint {info.path} was taken with"
                f" network = {info.spec.network!r}, not {spec.network!r}"
            )
        if spec.security.userns != (info.userns is not None):
            raise CheckpointError(
                f"restore of {spec.name!r}: checkpoint {info.path} was taken with"
                f" userns = {str(info.userns is not None).lower()},"
                f" not {str(spec.security.userns).lower()}"
            )
        sdir = os.path.join(self.state_dir, "sandboxes", spec.name)
        record = record_path(self.run_dir, spec.name)
        with contextlib.ExitStack() as undo, self._view(spec.lxcfs) as lxcfs:
            self._make_state_dir(spec.name, sdir, record, undo)
            _copy_tree(info.upper, os.path.join(sdir, "upper"), into=True)
            userns = None
            idmap = False
            layers = lower.split(":")
            images = info.images
            if info.userns is not None:
                # The same ids: CRIU makes the namespace with the dumped map.
                from ._userns import RangeInUse

                try:
                    try:
                        userns = self._userns(spec, sdir, undo, info.userns)
                    except RangeInUse:
                        # Another sandbox has those ids (the original runs
                        # on, and this is a second instance): a range of its
                        # own, and the checkpoint moved into it.
                        userns = self._userns(spec, sdir, undo)
                        images = self._remapped(info, sdir, userns[0])
                    store = os.path.dirname(info.path)
                    for d in (os.path.dirname(store), store):
                        os.chmod(d, os.stat(d).st_mode & 0o7777 | 0o111)
                    _share_images(os.path.dirname(images), userns[0])
                    _give_pipes(stdio, userns[0])
                except SandboxError as exc:
                    raise CheckpointError(str(exc)) from None
                lower, idmap = self._userns_layers(lower, sdir, userns)
            cgroup = self._make_cgroup(spec, undo)
            # Its address again (its connections are bound to it), on an
            # interface that stays down until CRIU has put its sockets back.
            undo.callback(_unlink, record)  # after the lease is given back (see _create)
            on_pid, net, _ = self._network(spec, sdir, [], undo, info.address, up=False)
            port: tuple[str, int] | None = None  # the bridge and MTU of CRIU's veth
            if net is not None and _netns_in_images(spec):
                # CRIU makes the veth (see _netns_in_images), not on_pid. A
                # failed restore's pair would go with its namespace, at the
                # kernel's pace: deleted at once, a retry can make it again.
                on_pid = None
                port = self.networks.get(str(net["name"])).port()
                undo.callback(remove_veth, str(net["veth"]))
            pidfile = os.path.join(sdir, "restore.pid")
            argv = [
                criu.binary,
                "restore",
                "--images-dir",
                images,
                "--work-dir",
                sdir,
                "--log-file",
                "restore.log",
                "--root",
                os.path.join(sdir, "merged"),
                "--restore-detached",
                "--pidfile",
                pidfile,
                "--external",
                f"mnt[{INIT_KEY}]:{self.init_binary}",
                *CRIU_OPTIONS,
            ]
            mounts = None
            if userns is not None:
                # Copied by the restorer as they were at the start (host
                # binds idmapped), attached below sdir/volumes for CRIU.
                mounts = self._mount_sources(spec, userns)
                os.mkdir(os.path.join(sdir, "volumes"), 0o711)
                for n, (*_, is_dir) in enumerate(m for m in mounts if m[0] != "tmpfs"):
                    point = os.path.join(sdir, "volumes", str(n))
                    if is_dir:
                        os.mkdir(point, 0o700)
                    else:
                        os.close(os.open(point, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            for n, (_, name, m) in enumerate(_external_mounts(spec)):
                if userns is not None:
                    source = os.path.join(sdir, "volumes", str(n))
                elif m.kind == "bind":
                    source = m.source
                else:
                    source = self._volume(m.source, None)
                argv += ["--external", f"mnt[{name}]:{source}"]
            if userns is not None:
                for name in DEVICE_NAMES:
                    argv += ["--external", f"mnt[{_device_key(name)}]:/dev/{name}"]
            for file in LXCFS_FILES:
                # The view's files, if the checkpoint has them: lxcfs's
                # now, or (without lxcfs) the kernel's own, as the
                # restorer sees them in the host's /proc and /sys.
                source = f"{lxcfs}/{file}" if lxcfs else f"/{file}"
                argv += ["--external", f"mnt[{_view_key(file)}]:{source}"]
            if bridged:
                for file, key in _NETWORK_FILES:
                    argv += ["--external", f"mnt[{key}]:{os.path.join(sdir, file)}"]
                if port is not None and net is not None:
                    argv += ["--external", f"veth[eth0]:{net['veth']}@{port[0]}"]
                else:
                    argv += ["--inherit-fd", f"fd[{RESTORE_NETNS_FD}]:{NET_KEY}"]
            for controllers, path in cgroup.relative_paths().items():
                argv += ["--cgroup-root", f"{controllers}:{path}" if controllers else path]
            mapped: set[str] = set()
            for n, key in enumerate(info.stdio):
                if key.startswith(("pipe:", "socket:")) and key not in mapped:
                    mapped.add(key)
                    argv += ["--inherit-fd", f"fd[{3 + n}]:{key}"]
            cfg = LaunchConfig(
                argv=[criu.binary],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
                hostname=spec.effective_hostname,
                workdir="/",
                lowerdir=lower,
                lower_links=_lower_links(sdir, lower) if not idmap else "",
                upperdir=os.path.join(sdir, "upper"),
                workdir_overlay=os.path.join(sdir, "work"),
                merged=os.path.join(sdir, "merged"),
                init_binary=self.init_binary,
                userns=userns,
                idmap_lower=idmap,
                idmap_target=os.path.join(sdir, "lower"),
                mounts=mounts,
                volume_target=os.path.join(sdir, "volumes"),
                cgroup_procs=[],
                confine=not spec.security.privileged,
                restore_argv=argv,
                read_only=spec.read_only,
                network="bridge" if bridged and port is None else "none",
                wait_go=on_pid is not None,
            )
            try:
                criu_proc = self._spawn_idmapped(cfg, stdio, on_pid, layers, sdir, userns)
            except SpawnFailed as exc:
                raise CheckpointError(
                    f"restore of {spec.name!r} failed: {exc.failure.step}: {exc.failure.message}"
                ) from None
            try:
                orphans: list[int] = []
                if not has_exited(criu_proc.pidfd, timeout):
                    # CRIU hangs: what it forked is re-parented to us (a
                    # subreaper) once it is killed, zombies too; known now.
                    orphans = _descendants(criu_proc.pid)
                status = self._wait_timeout(criu_proc, 0)
            finally:
                os.close(criu_proc.pidfd)
            _end_orphans(orphans)
            if status != 0:
                reason = criu_failure(read_log(os.path.join(sdir, "restore.log")))
                if status < 0:
                    reason = f"timed out after {timeout:g} s; {reason}"
                _end_restored_tasks(cgroup)
                raise CheckpointError(f"restore of {spec.name!r} failed: criu restore: {reason}")
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
                pidfd = os.pidfd_open(pid)
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"restore of {spec.name!r} failed: the restored init is gone ({exc})"
                ) from None
            restored = Spawned(pid, pidfd)
            try:
                # Read with the pidfd held: the PID cannot be reused now.
                restored = restored._replace(starttime=starttime(pid))
                if info.network_lock == "nftables":
                    _drop_network_lock(pid, info.root_pid)
                if net is not None:
                    # CRIU's veth is up already (its namespace behind the
                    # lock dropped just above), with the kernel's MTU.
                    set_link_up(str(net["veth"]), True, port[1] if port else None)
                self._record(record, spec, restored, cgroup, labels, info.path, image, net, userns)
            except BaseException:
                self._kill_and_reap(restored)
                raise
            sb = Sandbox(
                spec, restored, cgroup, sdir, undo.pop_all(), reaper=self.reaper, labels=labels
            )
            sb.restored_from = info
            sb.network = net
            return sb
        raise AssertionError("unreachable")  # pragma: no cover


def _descendants(pid: int) -> list[int]:
    """pidfds of every descendant of *pid*, zombies included (from
    ``/proc/PID/task/TID/children``); those that end meanwhile are missed,
    which :func:`_end_restored_tasks` catches in the cgroup."""
    found: list[int] = []
    seen: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child in seen:
                    continue
                seen.add(child)
                try:
                    found.append(os.pidfd_open(child))
                except OSError:
                    continue
                todo.append(child)
    return found


def _end_orphans(pidfds: list[int]) -> None:
    """Kill the processes of *pidfds* and reap those that are our children
    (re-parented to us); close the pidfds."""
    try:
        for fd in pidfds:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        for fd in pidfds:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, fd, os.WEXITED)
    finally:
        for fd in pidfds:
            os.close(fd)


def _end_restored_tasks(cgroup: Cgroup) -> None:
    """Kill what a failed restore left in the sandbox's cgroup, and reap
    those of CRIU's tasks that were re-parented to this process (a child
    subreaper) when CRIU itself was killed at its timeout: the caller is
    left no zombie. Tasks that are not our children are another's to reap
    (a keeper's); pidfds keep a PID from being taken for another's meanwhile."""
    pidfds = []
    for pid in cgroup.pids():
        with contextlib.suppress(OSError):
            pidfds.append(os.pidfd_open(pid))
    with contextlib.suppress(CorralError, OSError):
        cgroup.kill()  # all of it, new forks included, before the reaping
    _end_orphans(pidfds)


def _rewrite_in_place(path: str, data: bytes) -> None:
    """Make the file *path* hold *data*, keeping its inode (a bind mount
    of it shows the new text), while a sandbox may be reading it.

    Truncating first would let a reader find it empty (a sandbox that
    reads its /etc/hosts as it starts, while the supervisor adds its
    name: seen in the VM lane). So the new text is written over the old
    in one write, and the file never shrinks: a shorter text is followed
    by blank lines. What both texts begin with (the sandbox's own lines,
    ahead of its peers') is rewritten with the same bytes, so a reader
    always finds it; shrinking would let a read see zeros where the file
    was cut and grew again. The same text is not written again."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, size, 0).rstrip(b"\n") == data.rstrip(b"\n"):
            return
        os.pwrite(fd, data + b"\n" * (size - len(data)), 0)
    finally:
        os.close(fd)


def _fd_key(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


CRIU_PID = "criu.pid"
"""In a partial checkpoint: ``PID STARTTIME`` of the CRIU writing it, for
a supervisor that takes over after its predecessor died mid-checkpoint
(see :meth:`Runtime.settle_checkpoints`)."""


def _run_criu(argv: list[str], partial: str, sb: Sandbox) -> tuple[int | None, str]:
    """Run CRIU on *sb* (blocking), its identity noted in *partial* while it
    runs, and killed with the sandbox (see :meth:`Sandbox.end_checkpoint`); its
    exit status (None: killed after :data:`CRIU_TIMEOUT`) and stderr.

    Its stderr goes to a file in *partial*, not a pipe: the wait is for
    CRIU's own end, never for an end of file that something CRIU forked
    could keep from coming.
    """
    import subprocess

    err_path = os.path.join(partial, f"criu-{argv[1]}.stderr")
    try:
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
    except OSError as exc:
        raise CheckpointError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    pidfile = os.path.join(partial, CRIU_PID)
    pidfd = -1
    code: int | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)  # our child, not reaped: it is CRIU
        with sb._criu_lock:
            sb._criu = pidfd
            if sb._sigkilled:  # killed before CRIU began: it must not run on
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError):
            write_atomic(pidfile, f"{proc.pid} {starttime(proc.pid)}\n")
        code = _wait_for_criu_or_death(proc, pidfd, sb)
        if code is None:  # CRIU_TIMEOUT
            proc.kill()
            proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        if pidfd >= 0:
            with sb._criu_lock:
                sb._criu = -1
            os.close(pidfd)
        _unlink(pidfile)
    try:
        with open(err_path, errors="replace") as f:
            err = f.read()
    except OSError:
        err = ""
    _unlink(err_path)  # not part of the checkpoint
    return code, err


def _wait_for_criu_or_death(proc: Any, pidfd: int, sb: Sandbox) -> int | None:
    """CRIU's exit status once it has exited (None: still running after
    :data:`CRIU_TIMEOUT`). Should *sb* die meanwhile (an OOM kill, say:
    not a kill of ours, which ends CRIU itself), CRIU is ended at once
    (:meth:`Sandbox.end_checkpoint`): whoever takes the checkpoint, a
    fleet or a program using the library, is not kept waiting."""
    import select

    deadline = time.monotonic() + CRIU_TIMEOUT
    with sb._pidfd_held() as init:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if init is not None:
            poller.register(init, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            if pidfd in ready:
                code: int = proc.wait()
                return code
            if init is not None and init in ready:
                sb.end_checkpoint()  # CRIU's exit follows
                poller.unregister(init)


def _check_alive(sb: Sandbox, key: str) -> None:
    """After a failed CRIU: if the sandbox ended (or was killed, which ended
    CRIU), that is why, not what CRIU said."""
    if sb.poll() is not None:
        raise CheckpointError(f"sandbox {key!r} exited during the checkpoint")
    if sb._sigkilled:
        raise CheckpointError(f"sandbox {key!r} was killed during the checkpoint")


def _criu_reason(code: int | None, log: str, stderr: str) -> str:
    """Why a CRIU that exited with *code* (None: timed out) failed, from
    its *log* or else its *stderr*. A hang says where CRIU was: the last
    lines of its log."""
    reason = criu_failure(read_log(log) or stderr)
    return reason if code is not None else f"timed out after {CRIU_TIMEOUT:g} s; {reason}"


def _wait_for_criu(pidfile: str, timeout: float) -> None:
    """Wait for the CRIU *pidfile* names, if it still runs; kill it after *timeout*."""
    try:
        with open(pidfile) as f:
            pid, start = (int(x) for x in f.read().split())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return  # gone already (or never started)
    try:
        try:
            if starttime(pid) != start:
                return  # its PID was reused: that CRIU is gone
        except OSError:
            return
        if not has_exited(pidfd, timeout):
            _kill_pidfd(pidfd)
            has_exited(pidfd, 5.0)
    finally:
        os.close(pidfd)


_CP = ("cp", "-a", "--reflink=auto")
"""Copies a writable layer with everything overlayfs keeps in it: ownership,
modes, times, hard links, xattrs (opaque directories) and whiteouts (0:0
character devices)."""


def _copy_tree(src: str, dest: str, *, into: bool = False) -> None:
    error = _finish_copy(_start_copy(f"{src}/." if into else src, dest))
    if error is not None:
        raise CheckpointError(error)


def _start_copy(src: str, dest: str) -> subprocess.Popen[str]:
    import subprocess

    try:
        return subprocess.Popen(
            [*_CP, src, dest],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise CheckpointError(f"cannot run cp: {exc.strerror}") from exc


def _finish_copy(proc: subprocess.Popen[str]) -> str | None:
    """Wait for a copy (as long as CRIU is given); its error message, or None."""
    import subprocess

    src = str(proc.args[-2])  # type: ignore[index]
    try:
        _, err = proc.communicate(timeout=CRIU_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"copying the writable layer {src}: timed out after {CRIU_TIMEOUT:g} s"
    if proc.returncode == 0:
        return None
    msg = (err.strip().splitlines() or [f"cp exited with status {proc.returncode}"])[-1]
    return f"copying the writable layer {src}: {msg}"


def _release_userns(run_dir: str, name: str, ids: object = None) -> None:
    """Release the user-namespace id claims of sandbox *name* (of its range
    *ids* from its record; not knowing it, every claim naming it)."""
    from ._userns import release_all

    release_all(run_dir, name, ids)


def _kill_pidfd(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _drop_network_lock(pid: int, old_root_pid: int) -> None:
    """Remove the nftables table CRIU's network lock leaves in a restored
    sandbox. CRIU 3.17 dumps the lock with the namespace and, on restore,
    tries to delete it under the new init's PID, so the lock (drop every
    packet) would stay; it is named after the dumped init's PID.
    """
    import subprocess

    argv = ["nft", "delete", "table", "inet", f"CRIU-{old_root_pid}"]
    what = "cannot remove CRIU's network lock from the restored sandbox"
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{what}: {exc.strerror}") from None
    try:
        proc = _spawn_in_netns(target, argv)
    except OSError as exc:
        raise CheckpointError(f"{what}: {exc} (is nftables installed?)") from None
    finally:
        os.close(target)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CheckpointError(f"{what}: nft timed out") from None
    if proc.returncode != 0 and "No such file" not in err:
        raise CheckpointError(f"{what}: " + (err.strip().splitlines() or ["nft failed"])[0])


def _alive_in(pid: int, start: int, name: str) -> bool:
    """True if process *pid* (started at *start*, if not 0) lives in sandbox *name*'s cgroup."""
    try:
        if start and starttime(pid) != start:
            return False  # the PID was reused
        with open(f"/proc/{pid}/cgroup") as f:
            # The cgroup's own name, exactly: corral-web-0.1 must not
            # be found in corral-web-0.10.
            paths = [line.rstrip("\n").split(":", 2)[-1] for line in f]
    except (OSError, ValueError, IndexError):
        return False
    return any(os.path.basename(p) == f"corral-{name}" for p in paths)


LOWER_LINKS_OVER = 3000
"""Bytes of lower layers' paths from which they are named through short
links (``_lower_option`` in ``_linux/_child.py``; mount options fit in a page)."""


def _lower_links(sdir: str, lower: str) -> str:
    """For an image of many layers, ``SDIR/layers`` holding a symlink per
    layer, ``0`` for the top one (removed with the sandbox's directory);
    else ``""``, the layers named by their paths."""
    if len(lower) <= LOWER_LINKS_OVER:
        return ""
    links = os.path.join(sdir, "layers")
    os.mkdir(links, 0o755)
    for n, path in enumerate(lower.split(":")):
        os.symlink(path, os.path.join(links, str(n)))
    return links


_NETWORK_FILES = (("hosts", "corral-hosts"), ("resolv.conf", "corral-resolv"))
"""A bridged sandbox's own ``/etc`` files (bind mounts of files in its
state directory) and CRIU's keys for them: external, as volumes are."""


def _netns_in_images(spec: SandboxSpec) -> bool:
    """True if CRIU keeps bridged sandbox *spec*'s network namespace in its
    images, with its ``eth0``: that of a sandbox in a user namespace.

    The others' is external (its veth's peer, its bridge, its address are
    the host's business: the restore makes a new namespace in the host's
    user namespace and plugs it with the same lease). A user-namespace
    sandbox's cannot be: CRIU's restored tasks are in their new user
    namespace when they would join it ("Can't setns 15/net: Operation not
    permitted"), and its root must own its network namespace, as at the
    start. So CRIU makes the namespace inside the one it restores, and the
    veth pair with it, its host end on the bridge (``--external
    veth[eth0]:HOST@BRIDGE``, as LXC restores its containers)."""
    return spec.security.userns and is_bridged(spec.network)


def _external_network(pid: int, spec: SandboxSpec) -> list[str]:
    """CRIU's dump options for a bridged sandbox (init *pid*): its network
    namespace external unless CRIU keeps it (:func:`_netns_in_images`), and
    its ``/etc/hosts`` and ``/etc/resolv.conf`` external."""
    args = []
    if not _netns_in_images(spec):
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        args += ["--external", f"net[{inode}]:{NET_KEY}"]
    for file, key in _NETWORK_FILES:
        args += ["--external", f"mnt[/etc/{file}]:{key}"]
    return args


def _cut(key: str, veth: str, *, up: bool) -> None:
    """Stop the bridge passing bridged sandbox *key*'s traffic (its veth's
    host end), or let it again, around a dump (see
    :func:`~._net._links.set_forwarding`: the link stays up, so a dump of
    the sandbox's routes restores). If the link is gone, so is the
    sandbox's network namespace, and with it the sandbox (an OOM kill
    during the checkpoint): its end is the news, not the link's, and
    letting it through again is moot."""
    try:
        set_forwarding(veth, up)
    except (SandboxError, OSError) as exc:
        if not up:
            raise CheckpointError(
                f"sandbox {key!r} exited during the checkpoint"
                if not link_exists(veth)
                else f"checkpoint of {key!r} failed: {exc}"
            ) from None
        if link_exists(veth):
            raise CheckpointError(f"checkpoint of {key!r}: its network stays cut: {exc}") from None


def _view_key(file: str) -> str:
    """CRIU's key for the lxcfs mount of the view on *file* (``proc/meminfo``)."""
    return "corral-lxcfs-" + file.replace("/", "-")


def _external_view(pid: int) -> list[str]:
    """CRIU's dump options for the lxcfs files mounted in the sandbox of
    init *pid*: external (CRIU cannot dump a FUSE file system; the restore
    binds them from the lxcfs running then)."""
    args = []
    for target in view_mounts(pid):
        args += ["--external", f"mnt[{target}]:{_view_key(target.lstrip('/'))}"]
    return args


def _device_key(name: str) -> str:
    """CRIU's key for a bind of the host's device node /dev/*name*."""
    return f"corral-dev-{name}"


def _external_devices(pid: int) -> list[str]:
    """CRIU's dump options for the host's device nodes bound into the
    sandbox of init *pid*, and for every mount of the same node (the masks
    of /proc files bound from its /dev/null): external.

    Only a user-namespace sandbox has them: its root cannot make device
    nodes, so /dev/null and the rest are binds of the host's (see
    ``_linux._child``). CRIU cannot dump a mount whose file system is not
    mounted in the sandbox at its root ("doesn't have a proper root
    mount"); declared external, each is bound from the restore's host
    node again, as runc does with its masked paths. A sandbox that made
    its own nodes (the others) has no such mount, and no option."""
    mounts = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5:
                    mounts.append((fields[2], fields[3], fields[4]))
    except OSError:
        return []
    nodes = {f"/dev/{name}": name for name in DEVICE_NAMES}
    sources = {(dev, root): nodes[target] for dev, root, target in mounts if target in nodes}
    args = []
    for dev, root, target in mounts:
        name = sources.get((dev, root))
        if name is not None:
            args += ["--external", f"mnt[{target}]:{_device_key(name)}"]
    return args


def _share_images(top: str, base: int) -> None:
    """Let the root of a user-namespace sandbox restored from the
    checkpoint directory *top* (host uid and gid *base*) read its images:
    CRIU's restored tasks read some of them (tty-info.img, ...) once they
    are in the namespace, without any privilege over files of the host's
    root. The directories become its root's group's (searchable, the image
    directories listable, never writable), the images readable; nobody
    else can reach them, and they hold nothing of the sandbox it could not
    read already. Hard links of the same images in another restore's
    directory (:func:`remap_images`) keep their own directories."""
    from ._userns import check_reachable

    os.chown(top, 0, base)
    os.chmod(top, 0o710)
    for sub in IMAGE_DIRS:
        images = os.path.join(top, sub)
        if not os.path.isdir(images):
            continue
        os.chown(images, 0, base)
        os.chmod(images, 0o750)
        for entry in os.scandir(images):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o644)
    check_reachable(os.path.join(top, "images"), base, "its checkpoint's images")


def _remove_state_dir(sdir: str) -> None:
    """Remove a sandbox's state directory, made by this create.

    What a create makes there is removed by path first, while it is empty
    (a create that failed before its command ran): that needs no
    descriptor, where :func:`shutil.rmtree` opens one per level, so a
    create that failed for want of descriptors (a fleet at its open-file
    limit) still leaves nothing behind. What is not empty is removed by
    :func:`shutil.rmtree`.
    """
    # The overlay's own (work/work, work/index), then ours; an idmapped
    # layer's mount point per layer, numbered from 0.
    n = 0
    while True:
        try:
            os.rmdir(os.path.join(sdir, "lower", str(n)))
        except OSError:
            break
        n += 1
    for sub in ("work/work", "work/index", "upper", "work", "merged", "lower"):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(sdir, sub))
    try:
        os.rmdir(sdir)
    except FileNotFoundError:
        return
    except OSError:
        try:
            patiently(shutil.rmtree, sdir)
        except OSError:
            shutil.rmtree(sdir, ignore_errors=True)  # as much as can be


def _give_pipes(stdio: tuple[int, int, int], uid: int) -> None:
    from ._userns import give_pipes  # only user-namespace sandboxes need it

    give_pipes(stdio, uid)


def _id_range_of(pid: int) -> tuple[int, int]:
    """The host id range (base, size) the user namespace of *pid* maps
    from 0 (corral's sandboxes have a map of one line)."""
    with open(f"/proc/{pid}/uid_map") as f:
        inside, base, size = (int(n) for n in f.read().split()[:3])
    if inside != 0:
        raise CheckpointError(f"the user namespace of {pid} does not map its root")
    return base, size


def _veth_of(sb: Sandbox) -> str | None:
    """The host end of a bridged sandbox's veth (None for the other modes)."""
    if not is_bridged(sb.spec.network) or not sb.network:
        return None
    return str(sb.network["veth"])


def _address_of(sb: Sandbox) -> str | None:
    """A bridged sandbox's leased address (None for the other modes)."""
    if not is_bridged(sb.spec.network) or not sb.network:
        return None
    lease = sb.network.get("lease")
    return str(lease["address"]) if isinstance(lease, dict) else None


def _external_mounts(spec: SandboxSpec) -> list[tuple[str, str, Mount]]:
    """The sandbox's mounts of host trees (volumes), as CRIU names them:
    (target, key, mount). CRIU dumps a tmpfs's files but cannot dump a
    host directory; it records where one was mounted, under a key, and the
    restore mounts what the key is given as."""
    mounts = [m for m in spec.mounts if m.kind != "tmpfs"]
    return [(m.target, f"corral-volume-{n}", m) for n, m in enumerate(mounts)]


def _device_policy_back(name: str, cgroup: Cgroup) -> None:
    """An adopted sandbox whose cgroup lacks the device policy (made on
    cgroup v2 by a corral older than the device program) gets it now: the
    program checks each open, so what the sandbox opens from here on is
    checked. Best effort, said on stderr either way: the sandbox runs
    already, and refusing to adopt it would not stop it."""
    try:
        if not cgroup.lacks_device_policy():
            return
        cgroup.restrict_devices()
    except (OSError, CorralError) as exc:
        _say(f"corral: warning: sandbox {name!r} runs without its device policy: {exc}")
        return
    _say(f"corral: sandbox {name!r} had no device program (made by an older corral): attached")


def _say(line: str) -> None:
    """One line on stderr, for what the operator must know (the runtime
    turned a host setting on)."""
    import sys

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _user(spec: SandboxSpec, defaults: Mapping[str, Any]) -> str | None:
    """Who the command runs as: the spec's user, else the image's
    (``User`` of an OCI image), else None (root)."""
    if spec.user is not None:
        return spec.user
    user = str(defaults.get("user") or "") or None
    if user is not None:
        try:
            parse_user(user)
        except SpecError:
            raise SpecError(
                "user", f"the image {spec.rootfs!r} names its user {user!r}: set user to override"
            ) from None
    return user


def _environment(spec: SandboxSpec, defaults: Mapping[str, Any]) -> dict[str, str]:
    """The command's environment: corral's defaults, then the image's
    (``Env`` of an OCI image: its PATH, say), then the spec's."""
    env = spec.environment(str(defaults.get("user") or "") or None)
    for item in defaults.get("env") or ():
        key, eq, value = str(item).partition("=")
        if eq and key not in spec.env:
            env[key] = value
    return env


def _write_record(path: str, record: Mapping[str, Any]) -> None:
    """Write a sandbox's record atomically: a reader (a supervisor taking
    the sandbox back) sees the old one or the new one, never half of one."""
    write_atomic(path, json.dumps(record))


def _spawn_in_netns(netns: int, argv: list[str]) -> subprocess.Popen[str]:
    """Start *argv* in the network namespace *netns* (output piped).

    A child starts in the namespaces of the thread that forks it, so a
    thread that joins *netns* spawns it: one exec, where ``nsenter`` takes
    two. That thread is made for this and ends with it, never to come
    back: the caller may be one of the supervisor's pooled worker threads,
    and a setns there and back that failed half way would leave every later
    job of that thread, whatever it is, in the sandbox's network.
    """
    import subprocess

    outcome: list[subprocess.Popen[str] | OSError] = []

    def spawn() -> None:
        try:
            _syscalls.setns(netns, _syscalls.CLONE_NEWNET)
            outcome.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=spawn, name="corral-netns-spawn")
    thread.start()
    thread.join()
    if not outcome:  # pragma: no cover - spawn() catches what it can raise
        raise OSError("the network namespace's spawn thread failed")
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StandbyCancelled(SandboxError):
    """A standby (:meth:`Runtime.create` with a *gate*) was not started:
    called off, or its view went stale; nothing of it is left."""


def _translate(name: str, exc: SpawnFailed) -> SandboxError:
    f = exc.failure
    if f.kind == "notfound":
        return CommandNotFoundError(f"sandbox {name!r}: {f.message}")
    if f.kind == "noexec":
        return CommandNotExecutableError(f"sandbox {name!r}: {f.message}")
    if f.message.startswith(f.step):
        return SandboxError(f"sandbox {name!r}: {f.message}")
    return SandboxError(f"sandbox {name!r}: {f.step}: {f.message}")
