"""Peer runtimes for corral's start-up benchmark: runc and LXC.

Each peer runs the *whole* lifecycle of one throwaway container per call,
the way a user would type it on the command line, so that corral's own
start-up time can be compared with established runtimes on the same host,
the same root file system and the same resource limits:

* :class:`RuncPeer` times ``runc --root R run --bundle B NAME``.  ``runc
  run`` (without ``--detach``) creates, starts and waits for the container
  and destroys it when the process exits, so no ``runc delete`` is needed;
  :meth:`RuncPeer.run_once` checks this after every run and, should a
  container ever survive, times a ``runc delete --force`` as part of that
  run's lifecycle.
* :class:`RuncServicePeer` keeps one container of the same bundle running
  (``runc run --detach``, a ``sleep``) and times the verbs that act on a
  running container: ``runc exec``, ``runc pause``, ``runc resume``.
* :class:`LxcPeer` times ``lxc-execute -P P -n NAME -- CMD`` on a
  hand-written container config whose ``lxc.rootfs.path`` is the very same
  root file system directory that the other peers use.

Both peers keep their state in a private directory below the scratch
directory they are given (runc's ``--root``, LXC's ``-P`` lxcpath), so the
global ``/run/runc`` and ``/var/lib/lxc`` are never touched.  Both apply the
same limits: memory 64 MiB, 64 pids, CPU quota 50000 us per 100000 us.

Typical use::

    peer = RuncPeer(rootfs, scratch)
    if not RuncPeer.available():
        ...
    peer.setup()
    try:
        seconds = [peer.run_once() for _ in range(30)]
    finally:
        peer.teardown()

or ``with RuncPeer(rootfs, scratch) as peer: peer.run_once()``.

Running this file (as root) builds a throwaway busybox root file system in
``/tmp``, runs both peers alternately and prints median and p90 in ms::

    python benchmarks/_peers.py [--runs 30] [--warmup 3]

What is timed is the wall time (:func:`time.perf_counter`) from spawning
the runtime's CLI until it has exited and its output pipes are drained,
stdin being ``/dev/null``; Python's own spawn cost (about 1 ms here) is
included, as it is for every peer.  ``available()`` of each peer answers
with an :class:`Availability` (false, with a reason, instead of raising).

Timings are sensitive to what else runs on the host and to pacing: on a
small VM, back-to-back runs are markedly faster than runs separated by
idle gaps, so compare peers and corral under the same pacing.

The module uses the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

__all__ = [
    "CPU_PERIOD_US",
    "CPU_QUOTA_US",
    "DEFAULT_COMMAND",
    "MEMORY_LIMIT_BYTES",
    "PIDS_LIMIT",
    "Availability",
    "LxcPeer",
    "LxcSecurity",
    "PeerError",
    "RuncPeer",
    "RuncServicePeer",
    "build_busybox_rootfs",
    "leftover_cgroups",
    "leftover_mounts",
    "median_ms",
    "p90_ms",
]

StrPath = str | os.PathLike[str]

#: Command run in every container unless another is given.
DEFAULT_COMMAND: tuple[str, ...] = ("/bin/true",)
#: Memory limit of every peer container (64 MiB).
MEMORY_LIMIT_BYTES = 64 * 1024 * 1024
#: Maximum number of pids in every peer container.
PIDS_LIMIT = 64
#: CFS quota (microseconds per period) of every peer container.
CPU_QUOTA_US = 50_000
#: CFS period (microseconds) of every peer container.
CPU_PERIOD_US = 100_000

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_TIMEOUT_S = 60.0
_NAME_PREFIX = "corral-bench"


class PeerError(RuntimeError):
    """A peer runtime failed; the message says which command and why."""


@dataclass(frozen=True)
class Availability:
    """Whether a peer can run here; false with a human-readable reason if not.

    Truthy exactly when :attr:`ok` is true, so ``if RuncPeer.available():``
    works, while :attr:`reason` explains a negative answer.
    """

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


# --------------------------------------------------------------------------
# helpers


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace").strip()


def _describe_failure(argv: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> str:
    out = _decode(proc.stdout)
    err = _decode(proc.stderr)
    parts = [f"`{' '.join(argv)}` exited with status {proc.returncode}"]
    if err:
        parts.append(f"stderr: {err}")
    if out:
        parts.append(f"stdout: {out}")
    return "; ".join(parts)


def _run_quiet(
    argv: Sequence[str], timeout: float = _TIMEOUT_S
) -> subprocess.CompletedProcess[bytes]:
    """Run *argv* with captured output; never raises for a non-zero exit."""
    return subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=timeout
    )


def _timed_run(
    argv: Sequence[str],
    timeout: float,
    on_timeout: Callable[[], object],
    env: dict[str, str] | None = None,
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run *argv* to completion (in *env*, or this process's environment);
    return (wall seconds, finished process).

    Output is captured, stdin is ``/dev/null``.  If *argv* has not finished
    after *timeout* seconds, *on_timeout* is called while it is still alive
    (so that the runtime can stop its own container cleanly), the process is
    reaped (killed if it still lingers) and :class:`PeerError` is raised.
    """
    start = time.perf_counter()
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            on_timeout()
            try:
                proc.communicate(timeout=10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise PeerError(f"`{' '.join(argv)}` timed out after {timeout} s") from None
        elapsed = time.perf_counter() - start
    return elapsed, subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _unescape_mountinfo(field: str) -> str:
    r"""Undo the octal escapes (``\040`` etc.) of ``/proc/self/mountinfo``."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def leftover_mounts(*paths: StrPath) -> list[Path]:
    """Return the mount points in this mount namespace at or below *paths*."""
    roots = [Path(p).resolve() for p in paths]
    found: list[Path] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        mountpoint = Path(_unescape_mountinfo(fields[4]))
        if any(_is_within(mountpoint, root) for root in roots):
            found.append(mountpoint)
    return found


def _walk_cgroup_dirs(root: Path, max_depth: int) -> Iterator[Path]:
    """Yield the cgroup directories below *root*, at most *max_depth* deep."""
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        current, depth = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir:
                continue
            path = Path(entry.path)
            yield path
            if depth + 1 < max_depth:
                stack.append((path, depth + 1))


def leftover_cgroups(
    marker: str, cgroup_root: StrPath = _CGROUP_ROOT, max_depth: int = 8
) -> list[Path]:
    """Return cgroup directories whose name contains *marker*.

    All hierarchies under *cgroup_root* (``/sys/fs/cgroup``: every cgroup v1
    controller, the named ``systemd`` one and the v2 ``unified`` one of a
    hybrid layout, or the single tree of a pure v2 layout) are searched up
    to *max_depth* levels deep.  The list is sorted deepest first, so that
    it can be handed to :func:`os.rmdir` in order.
    """
    found = [p for p in _walk_cgroup_dirs(Path(cgroup_root), max_depth) if marker in p.name]
    found.sort(key=lambda p: (-len(p.parts), str(p)))
    return found


def _remove_cgroups(marker: str) -> list[Path]:
    """rmdir every cgroup named with *marker*; return those that stayed."""
    for path in leftover_cgroups(marker):
        with contextlib.suppress(OSError):
            path.rmdir()
    return leftover_cgroups(marker)


def _cgroup_layout() -> tuple[frozenset[str], frozenset[str]]:
    """Return the (cgroup v1, cgroup v2) controllers this process sees."""
    v1: set[str] = set()
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers = rest.partition(":")[0]
        if hier != "0":
            v1.update(c for c in controllers.split(",") if c and not c.startswith("name="))
    v2: set[str] = set()
    for candidate in (_CGROUP_ROOT / "unified", _CGROUP_ROOT):
        ctl = candidate / "cgroup.controllers"
        if ctl.is_file():
            with contextlib.suppress(OSError):
                v2.update(ctl.read_text().split())
            break
    return frozenset(v1), frozenset(v2 - v1)


def _unique_prefix(kind: str) -> str:
    return f"{_NAME_PREFIX}-{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def _resolve_in_rootfs(rootfs: Path, path: str) -> bool:
    """Whether absolute *path* exists (possibly as a symlink) in *rootfs*."""
    return os.path.lexists(rootfs / path.lstrip("/"))


def _check_rootfs(rootfs: Path, command: Sequence[str]) -> None:
    if not rootfs.is_dir():
        raise PeerError(f"rootfs {rootfs} is not a directory")
    if not command:
        raise PeerError("the container command must not be empty")
    if command[0].startswith("/") and not _resolve_in_rootfs(rootfs, command[0]):
        raise PeerError(f"{command[0]} does not exist in rootfs {rootfs}")


def _safe_rmtree(path: Path, rootfs: Path) -> None:
    """Remove *path* unless something is mounted below it or it is the rootfs."""
    if not path.exists():
        return
    if _is_within(rootfs, path):
        raise PeerError(f"refusing to remove {path}: it contains the rootfs {rootfs}")
    mounts = leftover_mounts(path)
    if mounts:
        raise PeerError(f"refusing to remove {path}: still mounted below it: {mounts}")
    shutil.rmtree(path)


def build_busybox_rootfs(dest: StrPath, busybox: StrPath = "/bin/busybox") -> Path:
    """Build a minimal busybox root file system in *dest* and return its path.

    *busybox* (a static binary) is copied to ``bin/busybox``, every applet
    it lists gets a ``bin/<applet> -> busybox`` symlink (what ``busybox
    --install -s`` does, but relative and confined to *dest*), and empty
    ``proc sys dev tmp etc run`` directories are made.  *dest* may exist
    but should be empty.
    """
    root = Path(dest).absolute()
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    target = bindir / "busybox"
    shutil.copy2(busybox, target)
    target.chmod(0o755)
    listing = subprocess.run(
        [str(target), "--list"], capture_output=True, check=True, timeout=_TIMEOUT_S
    )
    for applet in listing.stdout.decode().split():
        if "/" in applet or applet in ("", ".", "..", "busybox"):
            continue
        link = bindir / applet
        if not os.path.lexists(link):
            link.symlink_to("busybox")
    for name in ("proc", "sys", "dev", "tmp", "etc", "run"):
        (root / name).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    return root


def median_ms(samples: Sequence[float]) -> float:
    """Median of *samples* (seconds) in milliseconds."""
    return statistics.median(samples) * 1000.0


def p90_ms(samples: Sequence[float]) -> float:
    """90th percentile (nearest-rank) of *samples* (seconds) in milliseconds."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(0.9 * len(ordered)))
    return ordered[rank - 1] * 1000.0


def _smoke_test(peer_cls: type[_Peer], rootfs: StrPath | None) -> Availability:
    """Run one real container lifecycle of *peer_cls* in a temporary dir."""
    with tempfile.TemporaryDirectory(prefix=f"{_NAME_PREFIX}-probe-") as tmp:
        base = Path(tmp)
        try:
            if rootfs is None:
                busybox = shutil.which("busybox") or "/bin/busybox"
                if not Path(busybox).is_file():
                    return Availability(True, "not smoke-tested: no busybox to build a rootfs")
                rootfs = build_busybox_rootfs(base / "rootfs", busybox)
            peer = peer_cls(rootfs, base / "scratch")
            with peer:
                peer.run_once()
        except (PeerError, OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"{peer_cls.kind} smoke test failed: {exc}")
    return Availability(True, "")


class _Peer:
    """Shared plumbing of the peers: paths, naming, context management."""

    #: Short name of the runtime ("runc", "lxc").
    kind: ClassVar[str] = "peer"

    def __init__(
        self,
        rootfs: StrPath,
        scratch: StrPath,
        command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        self.rootfs: Path = Path(rootfs).resolve()
        self.scratch: Path = Path(scratch).resolve()
        self.command: tuple[str, ...] = tuple(command)
        #: Unique prefix of every container name, state dir and cgroup.
        self.prefix: str = _unique_prefix(self.kind)
        #: This peer's private directory below *scratch*.
        self.workdir: Path = self.scratch / self.prefix
        #: Output of the last successful run's stderr (noise check).
        self.last_stderr: str = ""
        #: Seconds after which :meth:`run_once` gives up on a container.
        self.timeout: float = _TIMEOUT_S
        #: Number of successful :meth:`run_once` calls.
        self.runs: int = 0
        self._ready = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rootfs={str(self.rootfs)!r}, scratch={str(self.scratch)!r})"

    @classmethod
    def available(cls, rootfs: StrPath | None = None) -> Availability:  # pragma: no cover
        """Whether this peer can run here (see the subclasses)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException:
            with contextlib.suppress(PeerError, OSError):
                self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def run_once(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def teardown(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _begin_setup(self) -> None:
        if self._ready:
            raise PeerError(f"{type(self).__name__}.setup() was already called")
        _check_rootfs(self.rootfs, self.command)

    def _require_ready(self) -> None:
        if not self._ready:
            raise PeerError(f"{type(self).__name__}.setup() has not been called")


# --------------------------------------------------------------------------
# runc


class RuncPeer(_Peer):
    """runc, timed as ``runc --root STATE run --bundle BUNDLE NAME``.

    :meth:`setup` writes an OCI bundle generated by ``runc spec`` (so runc's
    default namespaces -- pid, network, ipc, uts, mount -- capabilities,
    masked paths and mounts are kept) and adjusts it: the command as
    ``process.args``, no terminal, ``root.path`` = the absolute rootfs,
    read-only, and the memory, pids and CPU limits.  Every
    :meth:`run_once` uses a new container name ``<prefix>-<n>``; the
    cgroups runc creates are named after the container (below the caller's
    own cgroup in each hierarchy) and are removed by runc itself.
    """

    kind: ClassVar[str] = "runc"

    def __init__(
        self,
        rootfs: StrPath,
        scratch: StrPath,
        command: Sequence[str] = DEFAULT_COMMAND,
        runc: str = "runc",
    ) -> None:
        """Prepare (but do not create) a runc peer.

        *rootfs* is the container's root directory (never modified),
        *scratch* a directory under which this peer keeps its bundle and
        state (created if needed), *command* the argv run in the container
        and *runc* the runc binary (name on ``PATH`` or path).
        """
        super().__init__(rootfs, scratch, command)
        self.runc: str = runc
        #: The OCI bundle directory (holds only ``config.json``).
        self.bundle: Path = self.workdir / "bundle"
        #: runc's private ``--root`` state directory.
        self.state_dir: Path = self.workdir / "state"
        #: True once a ``runc run`` left its container behind (then the
        #: timed lifecycle includes ``runc delete --force``).
        self.needed_explicit_delete: bool = False
        self._counter = 0

    @classmethod
    def available(cls, rootfs: StrPath | None = None, runc: str = "runc") -> Availability:
        """Whether runc is installed and can run a container here.

        Checks that *runc* runs and that we are root, then smoke-tests one
        real lifecycle in a temporary directory, on *rootfs* if given or
        else on a minimal busybox rootfs built from ``busybox`` on the host.
        Never raises; a negative answer carries the reason.
        """
        path = shutil.which(runc)
        if path is None:
            return Availability(False, f"{runc} not found on PATH")
        if os.geteuid() != 0:
            return Availability(False, "runc peer needs root (rootful runc)")
        try:
            proc = _run_quiet([path, "--version"])
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"{path} --version failed: {exc}")
        if proc.returncode != 0:
            return Availability(False, _describe_failure([path, "--version"], proc))
        return _smoke_test(cls, rootfs)

    def _runc(self, *args: str) -> list[str]:
        return [self.runc, "--root", str(self.state_dir), *args]

    def setup(self) -> None:
        """Create the bundle (``runc spec`` + adjustments) and state dir."""
        self._begin_setup()
        if shutil.which(self.runc) is None:
            raise PeerError(f"{self.runc} not found on PATH")
        self.bundle.mkdir(parents=True, exist_ok=False)
        self.state_dir.mkdir(mode=0o700)
        self._ready = True  # teardown must clean up from here on
        argv = [self.runc, "spec", "--bundle", str(self.bundle)]
        proc = _run_quiet(argv)
        if proc.returncode != 0:
            raise PeerError(_describe_failure(argv, proc))
        config_path = self.bundle / "config.json"
        config: dict[str, Any] = json.loads(config_path.read_text())
        config["process"]["args"] = list(self.command)
        config["process"]["terminal"] = False
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        linux: dict[str, Any] = config.setdefault("linux", {})
        resources: dict[str, Any] = linux.setdefault("resources", {})
        resources["memory"] = {"limit": MEMORY_LIMIT_BYTES}
        resources["pids"] = {"limit": PIDS_LIMIT}
        resources["cpu"] = {"quota": CPU_QUOTA_US, "period": CPU_PERIOD_US}
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    def run_once(self) -> float:
        """Run one full container lifecycle; return its wall time in seconds.

        Raises :class:`PeerError` (after removing the container) if runc
        or the command fails or times out.
        """
        self._require_ready()
        self._counter += 1
        name = f"{self.prefix}-{self._counter}"
        argv = self._runc("run", "--bundle", str(self.bundle), name)
        try:
            elapsed, proc = _timed_run(argv, self.timeout, lambda: self._kill(name))
        except PeerError:
            self._force_delete(name)
            raise
        if proc.returncode != 0:
            self._force_delete(name)
            raise PeerError(_describe_failure(argv, proc))
        if (self.state_dir / name).exists():
            # runc run is documented to destroy the container on exit; if
            # this runc does not, deleting it is part of the lifecycle.
            self.needed_explicit_delete = True
            delete = self._runc("delete", "--force", name)
            start = time.perf_counter()
            dproc = _run_quiet(delete)
            elapsed += time.perf_counter() - start
            if dproc.returncode != 0:
                raise PeerError(_describe_failure(delete, dproc))
        self.last_stderr = _decode(proc.stderr)
        self.runs += 1
        return elapsed

    def _kill(self, name: str) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run_quiet(self._runc("kill", name, "KILL"))

    def _force_delete(self, name: str) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run_quiet(self._runc("delete", "--force", name))

    def teardown(self) -> None:
        """Delete any container left, the bundle, the state dir and cgroups.

        Idempotent.  Raises :class:`PeerError` if something could not be
        removed (after trying everything).
        """
        problems: list[str] = []
        if self.state_dir.is_dir():
            for entry in sorted(p.name for p in self.state_dir.iterdir()):
                delete = self._runc("delete", "--force", entry)
                try:
                    proc = _run_quiet(delete)
                except (OSError, subprocess.SubprocessError) as exc:
                    problems.append(f"runc delete {entry}: {exc}")
                    continue
                if proc.returncode != 0:
                    problems.append(_describe_failure(delete, proc))
        stale = _remove_cgroups(self.prefix)
        if stale:
            problems.append(f"cgroups left: {[str(p) for p in stale]}")
        try:
            _safe_rmtree(self.workdir, self.rootfs)
        except (PeerError, OSError) as exc:
            problems.append(str(exc))
        self._ready = False
        if problems:
            raise PeerError("runc teardown incomplete: " + "; ".join(problems))


class RuncServicePeer(RuncPeer):
    """One long-running runc container, for timing the verbs that act on it.

    :meth:`setup` writes the bundle as :class:`RuncPeer` does (same rootfs,
    namespaces and limits), with *command* a process that keeps running
    (``sleep 1000000`` by default), and starts it detached: ``runc --root
    STATE run --detach --bundle BUNDLE NAME``.  The container's stdio (which
    ``runc run -d`` passes through without a terminal) go to ``/dev/null``
    and ``container.log`` in the peer's directory, never to a pipe somebody
    waits on.  Each timed call is one runc CLI invocation, as typed:

    * :meth:`exec_once`: ``runc exec NAME`` + *exec_command* (``/bin/true``);
    * :meth:`pause_once` / :meth:`resume_once`: ``runc pause|resume NAME``
      (``runc pause`` returns once the freezer reports the cgroup frozen).

    :meth:`run_once` is :meth:`exec_once`, so that :meth:`available` smoke-
    tests a whole setup, exec and teardown.  :meth:`teardown` resumes a
    paused container before deleting it (``runc delete --force``).
    """

    #: The container's process unless another is given: it never ends.
    SERVICE_COMMAND: ClassVar[tuple[str, ...]] = ("/bin/sleep", "1000000")

    def __init__(
        self,
        rootfs: StrPath,
        scratch: StrPath,
        command: Sequence[str] = SERVICE_COMMAND,
        runc: str = "runc",
        exec_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        """Prepare (but do not create) the container.

        *command* is the container's long-running process, *exec_command*
        what :meth:`exec_once` runs in it; the rest as for :class:`RuncPeer`.
        """
        super().__init__(rootfs, scratch, command, runc)
        self.exec_command: tuple[str, ...] = tuple(exec_command)
        #: The container's name (one container per peer).
        self.name: str = self.prefix
        #: Where the container's stdout and stderr go.
        self.log: Path = self.workdir / "container.log"

    def setup(self) -> None:
        """Write the bundle and start the container detached.

        Raises :class:`PeerError` if it does not start or is not
        ``running`` afterwards; call :meth:`teardown` then too.
        """
        super().setup()
        if not self.exec_command:
            raise PeerError("the exec command must not be empty")
        argv = self._runc("run", "--detach", "--bundle", str(self.bundle), self.name)
        with open(self.log, "wb") as log:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                check=False,
                timeout=self.timeout,
            )
        if proc.returncode != 0:
            raise PeerError(
                f"`{' '.join(argv)}` exited with status {proc.returncode}: "
                + self.log.read_text(errors="replace").strip()
            )
        status = self.state()
        if status != "running":
            raise PeerError(f"runc container {self.name} is {status!r} after start, not running")

    def state(self) -> str:
        """The container's status from ``runc state`` (``running``, ``paused``...)."""
        argv = self._runc("state", self.name)
        proc = _run_quiet(argv)
        if proc.returncode != 0:
            raise PeerError(_describe_failure(argv, proc))
        status: object = json.loads(proc.stdout).get("status")
        return str(status)

    def _timed_verb(self, *args: str) -> float:
        self._require_ready()
        argv = self._runc(*args)
        elapsed, proc = _timed_run(argv, self.timeout, lambda: None)
        if proc.returncode != 0:
            raise PeerError(_describe_failure(argv, proc))
        self.last_stderr = _decode(proc.stderr)
        self.runs += 1
        return elapsed

    def exec_once(self) -> float:
        """Time ``runc exec NAME`` *exec_command* to its exit; seconds."""
        return self._timed_verb("exec", self.name, *self.exec_command)

    def pause_once(self) -> float:
        """Time ``runc pause NAME`` (returns once frozen); seconds."""
        return self._timed_verb("pause", self.name)

    def resume_once(self) -> float:
        """Time ``runc resume NAME``; seconds."""
        return self._timed_verb("resume", self.name)

    def run_once(self) -> float:
        """:meth:`exec_once` (what :meth:`available`'s smoke test runs)."""
        return self.exec_once()

    def teardown(self) -> None:
        """Resume the container if paused, then as :meth:`RuncPeer.teardown`."""
        if (self.state_dir / self.name).is_dir():
            with contextlib.suppress(PeerError, OSError, subprocess.SubprocessError):
                if self.state() == "paused":
                    _run_quiet(self._runc("resume", self.name))
        super().teardown()


# --------------------------------------------------------------------------
# LXC


class LxcSecurity(NamedTuple):
    """What an LXC peer keeps to do a default sandbox's work: the
    capabilities (LXC's names: lower case, no ``cap_``), and the system
    calls its seccomp allow-list lets through."""

    caps: tuple[str, ...]
    syscalls: tuple[str, ...]


class LxcPeer(_Peer):
    """LXC, timed as ``lxc-execute -P LXCPATH -n NAME -- CMD``.

    :meth:`setup` writes ``LXCPATH/NAME/config`` by hand (no template): the
    given rootfs as ``lxc.rootfs.path = dir:<rootfs>`` mounted read-only,
    ``lxc.net.0.type = empty`` (a new network namespace with only
    loopback, like runc's default), ``lxc.apparmor.profile = unconfined``,
    ``lxc.autodev``, ``proc:mixed sys:ro`` auto-mounts, and the memory,
    pids and CPU limits as ``lxc.cgroup.*`` keys for controllers on cgroup
    v1 or ``lxc.cgroup2.*`` keys for controllers on cgroup v2.  Limits for
    controllers that exist in neither are listed in
    :attr:`unsupported_limits`.

    ``lxc-execute`` runs the command under LXC's ``init.lxc.static`` (taken
    from the host, the rootfs needs no LXC files).  Being root, LXC puts its
    ``lxc.payload.NAME`` and ``lxc.monitor.NAME`` cgroups at the root of
    each hierarchy and removes them after the run; it also creates, and
    never removes, a shared ``lxc.pivot`` cgroup there, which
    :meth:`teardown` removes again if this peer created it.

    The container is never ``lxc-destroy``-ed: that would delete the
    (shared) rootfs directory.  :meth:`teardown` only removes the lxcpath.
    """

    kind: ClassVar[str] = "lxc"

    def __init__(
        self,
        rootfs: StrPath,
        scratch: StrPath,
        command: Sequence[str] = DEFAULT_COMMAND,
        lxc_execute: str = "lxc-execute",
        security: LxcSecurity | None = None,
    ) -> None:
        """Prepare (but do not create) an LXC peer.

        *rootfs* is the container's root directory (never modified),
        *scratch* a directory under which this peer keeps its lxcpath
        (created if needed), *command* the argv run in the container and
        *lxc_execute* the ``lxc-execute`` binary; *security*, if given,
        what a sandbox gets by default, for LXC to do the same work.
        """
        super().__init__(rootfs, scratch, command)
        self.security: LxcSecurity | None = security
        self.lxc_execute: str = lxc_execute
        #: The private lxcpath (``-P``).
        self.lxcpath: Path = self.workdir / "lxcpath"
        #: The (single) container name; every run reuses it.
        self.name: str = self.prefix
        #: Limits that could not be expressed on this cgroup layout.
        self.unsupported_limits: tuple[str, ...] = ()
        self._pivots_created: list[Path] = []
        self._pivots_before: set[Path] = set()

    @classmethod
    def available(
        cls, rootfs: StrPath | None = None, lxc_execute: str = "lxc-execute"
    ) -> Availability:
        """Whether LXC is installed and can run a container here.

        Checks for *lxc_execute* and ``lxc-stop``, root, and then
        smoke-tests one real ``lxc-execute`` in a temporary directory, on
        *rootfs* if given or else on a minimal busybox rootfs built from
        ``busybox`` on the host.  Never raises; a negative answer carries
        the reason.
        """
        path = shutil.which(lxc_execute)
        if path is None:
            return Availability(False, f"{lxc_execute} not found on PATH (is lxc installed?)")
        if shutil.which("lxc-stop") is None:
            return Availability(False, "lxc-stop not found on PATH")
        if os.geteuid() != 0:
            return Availability(False, "LXC peer needs root (privileged containers)")
        try:
            proc = _run_quiet([path, "--version"])
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"{path} --version failed: {exc}")
        if proc.returncode != 0:
            return Availability(False, _describe_failure([path, "--version"], proc))
        return _smoke_test(cls, rootfs)

    def _limit_lines(self) -> list[str]:
        v1, v2 = _cgroup_layout()
        lines: list[str] = []
        unsupported: list[str] = []
        if "memory" in v1:
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {MEMORY_LIMIT_BYTES}")
        elif "memory" in v2:
            lines.append(f"lxc.cgroup2.memory.max = {MEMORY_LIMIT_BYTES}")
        else:
            unsupported.append("memory")
        if "pids" in v1:
            lines.append(f"lxc.cgroup.pids.max = {PIDS_LIMIT}")
        elif "pids" in v2:
            lines.append(f"lxc.cgroup2.pids.max = {PIDS_LIMIT}")
        else:
            unsupported.append("pids")
        if "cpu" in v1:
            lines.append(f"lxc.cgroup.cpu.cfs_period_us = {CPU_PERIOD_US}")
            lines.append(f"lxc.cgroup.cpu.cfs_quota_us = {CPU_QUOTA_US}")
        elif "cpu" in v2:
            lines.append(f"lxc.cgroup2.cpu.max = {CPU_QUOTA_US} {CPU_PERIOD_US}")
        else:
            unsupported.append("cpu")
        self.unsupported_limits = tuple(unsupported)
        return lines

    def config_text(self) -> str:
        """The container config :meth:`setup` writes."""
        lines = [
            "# corral start-up benchmark peer (benchmarks/_peers.py)",
            f"lxc.uts.name = {self.name}",
            f"lxc.rootfs.path = dir:{self.rootfs}",
            "lxc.rootfs.options = ro",
            "lxc.net.0.type = empty",
            "lxc.apparmor.profile = unconfined",
            "lxc.autodev = 1",
            "lxc.mount.auto = proc:mixed sys:ro",
            *self._limit_lines(),
        ]
        if self.security is not None:
            lines += [
                f"lxc.cap.keep = {' '.join(self.security.caps)}",
                "lxc.no_new_privs = 1",
                f"lxc.seccomp.profile = {self.seccomp_path}",
                # An empty network's loopback, up (LXC brings lo up with the flag).
                "lxc.net.0.flags = up",
            ]
        return "\n".join(lines) + "\n"

    @property
    def seccomp_path(self) -> Path:
        """Where :meth:`setup` writes the LXC seccomp policy (with *security*)."""
        return self.workdir / "seccomp"

    def seccomp_text(self) -> str:
        """The policy: LXC's format 2, an allow-list whose other calls fail
        with EPERM, as corral's default filter does."""
        assert self.security is not None
        return "2\nallowlist errno 1\n" + "".join(f"{n}\n" for n in self.security.syscalls)

    def _pivot_dirs(self) -> set[Path]:
        return set(_CGROUP_ROOT.glob("lxc.pivot")) | set(_CGROUP_ROOT.glob("*/lxc.pivot"))

    def setup(self) -> None:
        """Create the private lxcpath and the container config."""
        self._begin_setup()
        if shutil.which(self.lxc_execute) is None:
            raise PeerError(f"{self.lxc_execute} not found on PATH")
        container = self.lxcpath / self.name
        container.mkdir(parents=True, exist_ok=False)
        self._ready = True
        self._pivots_before = self._pivot_dirs()
        if self.security is not None:
            self.seccomp_path.write_text(self.seccomp_text())
        (container / "config").write_text(self.config_text())

    def run_once(self) -> float:
        """Run one full container lifecycle; return its wall time in seconds.

        Raises :class:`PeerError` (after stopping the container) if
        ``lxc-execute`` or the command fails or times out.
        """
        self._require_ready()
        argv = [
            self.lxc_execute,
            "-P",
            str(self.lxcpath),
            "-n",
            self.name,
            "--",
            *self.command,
        ]
        try:
            elapsed, proc = _timed_run(argv, self.timeout, self._stop)
        except PeerError:
            self._note_pivots()
            raise
        self._note_pivots()
        if proc.returncode != 0:
            self._stop()
            raise PeerError(_describe_failure(argv, proc))
        self.last_stderr = _decode(proc.stderr)
        self.runs += 1
        return elapsed

    def _note_pivots(self) -> None:
        for pivot in self._pivot_dirs() - self._pivots_before:
            if pivot not in self._pivots_created:
                self._pivots_created.append(pivot)

    def _stop(self) -> subprocess.CompletedProcess[bytes] | None:
        """Kill the container if it is running (``lxc-stop -k``)."""
        try:
            return _run_quiet(["lxc-stop", "-P", str(self.lxcpath), "-n", self.name, "-k"])
        except (OSError, subprocess.SubprocessError):
            return None

    def _running(self) -> bool:
        try:
            proc = _run_quiet(["lxc-info", "-P", str(self.lxcpath), "-n", self.name, "-s", "-H"])
        except (OSError, subprocess.SubprocessError):
            return False
        return proc.returncode == 0 and _decode(proc.stdout) not in ("", "STOPPED")

    def teardown(self) -> None:
        """Stop the container if running; remove the lxcpath and cgroups.

        Idempotent.  Never runs ``lxc-destroy`` (it would delete the
        rootfs).  Raises :class:`PeerError` if something could not be
        removed (after trying everything).
        """
        problems: list[str] = []
        if (self.lxcpath / self.name).is_dir() and self._running():
            self._stop()
            if self._running():
                problems.append(f"LXC container {self.name} still running")
        self._note_pivots()
        stale = _remove_cgroups(self.prefix)
        if stale:
            problems.append(f"cgroups left: {[str(p) for p in stale]}")
        for pivot in sorted(self._pivots_created, key=lambda p: -len(p.parts)):
            try:
                pivot.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"could not remove {pivot}: {exc}")
        self._pivots_created = []
        try:
            _safe_rmtree(self.workdir, self.rootfs)
        except (PeerError, OSError) as exc:
            problems.append(str(exc))
        self._ready = False
        if problems:
            raise PeerError("LXC teardown incomplete: " + "; ".join(problems))


# --------------------------------------------------------------------------
# standalone check


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time runc and LXC container lifecycles.")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per peer (default 30)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed runs per peer first (default 3)"
    )
    parser.add_argument("--busybox", default="/bin/busybox", help="static busybox to copy")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("must run as root", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix=f"{_NAME_PREFIX}-", dir="/tmp"))
    peers: list[_Peer] = []
    status = 0
    try:
        rootfs = build_busybox_rootfs(base / "rootfs", args.busybox)
        scratch = base / "scratch"
        for cls in (RuncPeer, LxcPeer):
            verdict = cls.available(rootfs)
            if verdict:
                peers.append(cls(rootfs, scratch))
            else:
                print(f"{cls.kind}: unavailable: {verdict.reason}")
        if not peers:
            return 1
        for peer in peers:
            peer.setup()
            if isinstance(peer, LxcPeer) and peer.unsupported_limits:
                print(f"lxc: limits not applied: {', '.join(peer.unsupported_limits)}")
        for _ in range(args.warmup):
            for peer in peers:
                peer.run_once()
        samples: dict[str, list[float]] = {peer.kind: [] for peer in peers}
        for _ in range(args.runs):
            for peer in peers:
                samples[peer.kind].append(peer.run_once())
        for peer in peers:
            data = samples[peer.kind]
            print(
                f"{peer.kind:5s} n={len(data):3d}  median {median_ms(data):7.2f} ms"
                f"  p90 {p90_ms(data):7.2f} ms  min {min(data) * 1000:7.2f} ms"
            )
            if peer.last_stderr:
                print(f"{peer.kind}: stderr of last run: {peer.last_stderr}")
            if isinstance(peer, RuncPeer) and peer.needed_explicit_delete:
                print("runc: `runc run` left containers behind; runc delete was timed too")
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        for peer in peers:
            try:
                peer.teardown()
            except PeerError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
        shutil.rmtree(base, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(_main())
