"""podman as a benchmark peer, kept off the host's state.

:class:`PodmanPeer` times ``podman run --rm --network bridge --rootfs
ROOTFS:O CMD`` (rootful podman 4, as Debian 12 ships it: 4.3 with runc,
conmon and netavark), on the rootfs and with the limits of the other peers
of :mod:`_peers`.

Why podman failed here before ("error setting rlimit type 7: operation
not permitted", in runc's init): for a rootful container podman asks the
OCI runtime for ``RLIMIT_NOFILE`` and ``RLIMIT_NPROC`` of 1048576 (its
default), and lowers its own hard ``RLIMIT_NPROC`` to ``kernel.pid_max``
while it loads its configuration (containers/common's
``getDefaultProcessLimits``). runc, started by podman's conmon, inherits
podman's hard limits, and raising a hard limit takes ``CAP_SYS_RESOURCE``,
which root does not have on machines of this kind (its bounding set lacks
it: ``prlimit --nofile=1048576`` fails here too). So NOFILE (type 7)
fails first and, once it is asked for no more than podman has, NPROC
(type 6). ``--ulimit host`` does not help in 4.3. The peer asks for
exactly the hard limits podman's own process has (:func:`podman_ulimits`),
which runc can set without that capability; the container's processes
are bounded by ``--pids-limit`` anyway.

Where podman writes: everything that a flag or a configuration file can
move is below the peer's directory (storage ``--root``; ``--runroot`` on
the private ``/run``, podman wanting it shorter than 50 characters),
libpod's ``--tmpdir``, runc's state by ``--runtime-flag root=``, the
network configuration directory, a containers.conf and a storage.conf of
its own so that the host's do not apply, ``TMPDIR``), and its cgroups are
below a ``--cgroup-parent`` named after the peer, removed by
:meth:`PodmanPeer.teardown`. What no flag moves in 4.3 — network
namespaces in ``/run/netns``, netavark's address database in
``/run/containers/networks``, the lock segment ``/dev/shm/libpod_lock`` —
and what netavark does to the network (a bridge, iptables rules,
``net.ipv4.ip_forward``) would land on the host: so the peer runs only in
a mount and a network namespace that are not the host's, with tmpfs of
its own on ``/run`` and ``/dev/shm`` (:func:`private_run_dirs`); its
:meth:`~PodmanPeer.available` says no anywhere else. When that process
ends, its namespaces go with everything podman left in them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from _peers import (
    CPU_PERIOD_US,
    CPU_QUOTA_US,
    DEFAULT_COMMAND,
    MEMORY_LIMIT_BYTES,
    PIDS_LIMIT,
    Availability,
    PeerError,
    StrPath,
    _decode,
    _describe_failure,
    _Peer,
    _run_quiet,
    _safe_rmtree,
    _smoke_test,
    _timed_run,
    leftover_cgroups,
    leftover_mounts,
)

__all__ = [
    "PodmanPeer",
    "outer_namespaces",
    "podman_isolation",
    "podman_ulimits",
    "private_run_dirs",
]

_OUTER_ENV = "CORRAL_BENCH_OUTER_NS"
_RUN_TMPFS = "corral-bench-run"
"""The source name of the tmpfs :func:`private_run_dirs` mounts: how
:func:`podman_isolation` tells them from the host's."""


def private_run_dirs() -> None:
    """Mount an empty tmpfs of this process's own on ``/run`` and
    ``/dev/shm``. Only in a mount namespace of its own (the caller's
    ``unshare --mount --propagation private``): raises :class:`PeerError`
    in the host's, where it would hide the host's ``/run`` from everyone."""
    if _same_namespace("mnt"):
        raise PeerError(
            "refusing to mount over /run: not in a mount namespace of its own"
            " (re-execute under unshare --mount with outer_namespaces() in the environment)"
        )
    for path, mode in (("/run", "755"), ("/dev/shm", "1777")):
        argv = ["mount", "-t", "tmpfs", "-o", f"mode={mode},nosuid,nodev", _RUN_TMPFS, path]
        proc = _run_quiet(argv)
        if proc.returncode != 0:
            raise PeerError(_describe_failure(argv, proc))


def podman_isolation() -> str | None:
    """Why podman must not run in this process's namespaces (None if it
    may): the host's mount or network namespace, or ``/run`` and
    ``/dev/shm`` not this process's own tmpfs (:func:`private_run_dirs`)."""
    for ns in ("mnt", "net"):
        if _same_namespace(ns):
            return f"not in a {ns} namespace of its own (podman would leave its state there)"
    mounted: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and len(fields[1].split()) >= 2:
            mounted[line.split()[4]] = fields[1].split()[1]  # the last mount on a path wins
    missing = [p for p in ("/run", "/dev/shm") if mounted.get(p) != _RUN_TMPFS]
    if missing:
        return f"{' and '.join(missing)} not a private tmpfs (see private_run_dirs)"
    return None


def outer_namespaces() -> dict[str, str]:
    """An environment entry naming this process's mount and network
    namespaces, for the copy of itself it re-executes under ``unshare``:
    :func:`podman_isolation` there checks that it is elsewhere. (PID 1's
    cannot be read to compare with: root here lacks a capability PID 1
    has, so the kernel denies access to its ``/proc/1/ns``.)"""
    return {_OUTER_ENV: ",".join(os.readlink(f"/proc/self/ns/{ns}") for ns in ("mnt", "net"))}


def _same_namespace(ns: str) -> bool:
    """Whether this process is in the *ns* namespace that the process
    which re-executed it was in (True if that was not recorded)."""
    outer = os.environ.get(_OUTER_ENV, "").split(",")
    return os.readlink(f"/proc/self/ns/{ns}") in outer or len(outer) != 2


def podman_ulimits() -> list[str]:
    """``--ulimit`` options asking for the hard ``RLIMIT_NOFILE`` and
    ``RLIMIT_NPROC`` podman's own process will have (see the module's
    docstring): this process's, and for NPROC no more than
    ``kernel.pid_max``, to which podman lowers it."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    with contextlib.suppress(OSError, ValueError):
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        if nproc == resource.RLIM_INFINITY or nproc > pid_max:
            nproc = pid_max
    return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]


class PodmanPeer(_Peer):
    """podman, timed as ``podman run --rm --network NETWORK --rootfs
    ROOTFS:O CMD`` (see the module's docstring for where it writes).

    The rootfs is used through an overlay of podman's (``:O``), never
    written. With *anchor*, :meth:`setup` starts one detached container on
    the same network that runs until :meth:`teardown`, so that each timed
    run joins a network that exists (netavark removes its bridge and
    rules with the last container), as the other contenders do.
    """

    kind: ClassVar[str] = "podman"

    def __init__(
        self,
        rootfs: StrPath,
        scratch: StrPath,
        command: Sequence[str] = DEFAULT_COMMAND,
        network: str = "bridge",
        anchor: bool = False,
        podman: str = "podman",
    ) -> None:
        """Prepare (but do not create) a podman peer: *rootfs* is the
        containers' root (never modified), *scratch* a directory under
        which the peer keeps all of podman's state, *network* podman's
        ``--network``."""
        super().__init__(rootfs, scratch, command)
        self.podman = podman
        self.network = network
        self.anchor = anchor
        self.cgroup_parent = f"/{self.prefix}"
        #: podman's run root: on the private /run (podman refuses one of
        #: over 50 characters, which a path below *scratch* easily is).
        self.runroot = Path("/run") / f"podman-{secrets.token_hex(4)}"
        #: What netavark left in this network namespace after the last
        #: container went (its bridge, rules naming the subnet): filled
        #: by :meth:`teardown`, for the benchmark's report.
        self.left_in_netns: list[str] = []
        self._env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
            "TMPDIR": str(self.workdir / "tmp"),
        }

    @classmethod
    def available(cls, rootfs: StrPath | None = None, podman: str = "podman") -> Availability:
        """Whether podman (and runc, netavark) is installed and may run
        here (:func:`podman_isolation`); then one real lifecycle."""
        if shutil.which(podman) is None:
            return Availability(False, f"{podman} not found on PATH (apt-get install podman)")
        if shutil.which("runc") is None:
            return Availability(False, "runc not found on PATH")
        if not any(
            os.path.exists(os.path.join(d, "netavark"))
            for d in ("/usr/libexec/podman", "/usr/lib/podman")
        ):
            return Availability(False, "netavark is not installed (apt-get install netavark)")
        if os.geteuid() != 0:
            return Availability(False, "the podman peer is rootful: it needs root")
        why = podman_isolation()
        if why is not None:
            return Availability(False, why)
        return _smoke_test(cls, rootfs)

    def _podman(self, *args: str) -> list[str]:
        w = self.workdir
        return [
            self.podman,
            f"--root={w / 'root'}",
            f"--runroot={self.runroot}",
            f"--tmpdir={w / 'libpod'}",
            f"--network-config-dir={w / 'networks'}",
            f"--volumepath={w / 'volumes'}",
            f"--runtime-flag=root={w / 'runc'}",
            "--runtime=runc",
            "--cgroup-manager=cgroupfs",
            "--events-backend=none",
            *args,
        ]

    def _run_args(self, *command: str) -> list[str]:
        return [
            f"--network={self.network}",
            f"--cgroup-parent={self.cgroup_parent}",
            f"--memory={MEMORY_LIMIT_BYTES}b",
            f"--pids-limit={PIDS_LIMIT}",
            f"--cpu-period={CPU_PERIOD_US}",
            f"--cpu-quota={CPU_QUOTA_US}",
            *podman_ulimits(),
            "--rootfs",  # a switch: the rootfs is the first argument
            f"{self.rootfs}:O",
            *command,
        ]

    def setup(self) -> None:
        """Write podman's configuration; start the anchor if asked to."""
        self._begin_setup()
        why = podman_isolation()
        if why is not None:
            raise PeerError(f"podman must not run here: {why}")
        for sub in ("root", "libpod", "networks", "volumes", "runc", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._ready = True  # teardown must clean up from here on
        self.runroot.mkdir(mode=0o700)
        w = self.workdir
        # Only these files apply (not the host's /etc/containers ones).
        (w / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
            f'runtime = "runc"\ntmp_dir = "{w / "libpod"}"\n'
            f'[network]\nnetwork_backend = "netavark"\nnetwork_config_dir = "{w / "networks"}"\n'
        )
        (w / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{w / "root"}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        if self.anchor:
            argv = self._podman("run", "--detach", "--rm", *self._run_args("sleep", "3600"))
            proc = subprocess.run(
                argv, env=self._env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.timeout, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise PeerError(_describe_failure(argv, proc))

    def run_once(self) -> float:
        """Run one full container lifecycle; return its wall time in seconds."""
        self._require_ready()
        argv = self._podman("run", "--rm", *self._run_args(*self.command))
        elapsed, proc = _timed_run(argv, self.timeout, self._remove_all, env=self._env)
        if proc.returncode != 0:
            self._remove_all()
            raise PeerError(_describe_failure(argv, proc))
        self.last_stderr = _decode(proc.stderr)
        self.runs += 1
        return elapsed

    def _remove_all(self) -> subprocess.CompletedProcess[bytes] | None:
        argv = self._podman("rm", "--all", "--force", "--time=0")
        try:
            return subprocess.run(
                argv, env=self._env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.timeout, check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None

    def teardown(self) -> None:
        """Remove every container (the anchor too), wait for podman's
        processes (conmon runs ``podman container cleanup`` after each
        container), note what netavark left in the network namespace, and
        remove the cgroups, mounts and directory. Idempotent; raises
        :class:`PeerError` if something could not be removed."""
        problems: list[str] = []
        if (self.workdir / "root").is_dir():
            proc = self._remove_all()
            if proc is None or proc.returncode != 0:
                problems.append(
                    "podman rm --all failed"
                    + (f": {_decode(proc.stderr)}" if proc is not None else "")
                )
        stray = _wait_for_processes(str(self.workdir).encode(), self.timeout)
        if stray:
            problems.append(f"podman processes still running: {stray}")
        self.left_in_netns = _netavark_leftovers()
        mounts = leftover_mounts(self.workdir, self.runroot)
        for mount in sorted(mounts, key=lambda p: -len(p.parts)):
            proc = _run_quiet(["umount", str(mount)])
            if proc.returncode != 0:
                problems.append(f"cannot unmount {mount}: {_decode(proc.stderr)}")
        stale = _remove_cgroup_trees(self.prefix)
        if stale:
            problems.append(f"cgroups left: {[str(p) for p in stale]}")
        for path in (self.workdir, self.runroot):
            try:
                _safe_rmtree(path, self.rootfs)
            except (PeerError, OSError) as exc:
                problems.append(str(exc))
        self._ready = False
        if problems:
            raise PeerError("podman teardown incomplete: " + "; ".join(problems))


def _wait_for_processes(marker: bytes, timeout: float) -> list[int]:
    """Wait until no process has *marker* in its command line (podman's
    and conmon's carry the peer's paths); return those still there after
    *timeout* seconds. Waits on pidfds, not by polling."""
    fds: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker not in f.read():
                    continue
            fds[os.pidfd_open(int(entry))] = int(entry)
        except OSError:
            continue  # gone already
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)  # readable once the process has exited
        left = dict(fds)
        deadline = time.monotonic() + timeout
        while left and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                left.pop(fd, None)
        return sorted(left.values())
    finally:
        for fd in fds:
            os.close(fd)


def _remove_cgroup_trees(marker: str) -> list[Path]:
    """rmdir the cgroups named *marker* and everything below them, deepest
    first (podman leaves its ``conmon`` cgroup, and on this layout some of
    a container's ``libpod-ID`` ones, empty below its cgroup parent);
    return those that stayed."""
    for top in leftover_cgroups(marker):
        below = [Path(d) for d, _, _ in os.walk(top)]
        for path in sorted(below, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir()
    return leftover_cgroups(marker)


def _netavark_leftovers() -> list[str]:
    """podman's bridge, and iptables rules naming its default subnet, in
    this network namespace (both go with the last container if netavark
    cleans up after itself)."""
    out = []
    try:
        if _run_quiet(["ip", "link", "show", "dev", "podman0"]).returncode == 0:
            out.append("bridge podman0")
        proc = _run_quiet(["iptables-save"])
    except (OSError, subprocess.SubprocessError):
        return out
    # 10.88.0.0/16: the subnet of podman's default network.
    out += [ln for ln in _decode(proc.stdout).splitlines() if "10.88." in ln]
    return out
