"""Fixtures for tests against the real kernel.

Every test gets its own state and run directories and is checked afterwards
for leftovers: cgroups named ``corral-*`` below the parents the runtime
uses, sandbox directories, records, mounts and child processes. A test that
leaks fails even if its assertions passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import CriuUnavailableError, Keeper, Runtime
from supervisor._runtime._checkpoint import check_criu
from supervisor._runtime._linux._cgroups import V1Cgroups, V2Cgroups

from .helpers import reap_answerers

REPO = Path(__file__).resolve().parent.parent

# Tests interrupt CLI processes with SIGINT, as a user's Ctrl-C does. A
# test run started in the background by a shell without job control (`make
# test &`, a CI runner) inherits SIGINT ignored, and so would every child:
# the interruption would never arrive. Handled here, it is reset to its
# default in every child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: sandboxes use namespaces, mounts and cgroups"
)


def _scratch_base() -> str:
    # In the VM lane the runner points this at a tmpfs: overlayfs cannot use
    # the 9p-shared file system as an upper layer.
    return os.environ.get("CORRAL_TEST_TMP") or tempfile.gettempdir()


@dataclass
class Dirs:
    """A test's private state and run directories."""

    state: Path
    run: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment for a ``corral`` subprocess using these directories."""
        env = dict(os.environ)
        env["CORRAL_STATE_DIR"] = str(self.state)
        env["CORRAL_RUN_DIR"] = str(self.run)
        return env


@pytest.fixture(scope="session")
def rootfs_cache() -> Iterator[Path]:
    """An image store with the busybox base, built once for the session."""
    d = Path(tempfile.mkdtemp(prefix="corral-test-cache-", dir=_scratch_base()))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def seeded_store(store: Path, cache: Path) -> None:
    """A test's own image store at *store*, holding the session's busybox
    image: its layer a symlink to the session's (never built twice), its
    description and name copies. A test may add, remove and prune images
    in it without touching another test's."""
    from rootfs import ImageStore, busybox_image

    image = busybox_image(ImageStore(cache))
    own = ImageStore(store)
    for layer in image.layers:
        path = Path(own.layer_path(layer))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(ImageStore(cache).layer_path(layer))
    hexpart = image.id.removeprefix("sha256:")
    (store / "images" / "sha256").mkdir(parents=True)
    (store / "images" / "sha256" / f"{hexpart}.json").write_bytes(
        (cache / "images" / "sha256" / f"{hexpart}.json").read_bytes()
    )
    own.tag(image, "busybox")
    # As corral keeps it (ImageStore._private): what runs on it must not need more.
    assert store.stat().st_mode & 0o777 == 0o700


def _cgroup_leftovers(parents: Sequence[str]) -> list[str]:
    out = []
    for p in parents:
        try:
            out += [os.path.join(p, n) for n in os.listdir(p) if n.startswith("corral-")]
        except FileNotFoundError:
            pass
    return out


def _cgroup_parents(rt: Runtime) -> list[str]:
    cg = rt.cgroups
    if isinstance(cg, V2Cgroups):
        return [cg.parent]
    if isinstance(cg, V1Cgroups):
        return list(dict.fromkeys(cg._parents.values()))
    return []


@pytest.fixture
def dirs(rootfs_cache: Path) -> Iterator[Dirs]:
    """Private state/run directories, checked for leftovers afterwards."""
    base = Path(tempfile.mkdtemp(prefix="corral-test-", dir=_scratch_base()))
    # Searchable (not readable) by others: a userns sandbox's root, an
    # unprivileged host user, mounts its layers from below here.
    base.chmod(0o711)
    state, run = base / "state", base / "run"
    state.mkdir()
    run.mkdir()
    # The session's busybox base, in a store of the test's own.
    seeded_store(state / "images", rootfs_cache)
    probe = Runtime(state_dir=state, run_dir=run) if os.geteuid() == 0 else None
    before = set(_cgroup_leftovers(_cgroup_parents(probe))) if probe else set()
    try:
        yield Dirs(state, run)
        if probe is None:
            return
        leftovers = {
            "cgroups": sorted(set(_cgroup_leftovers(_cgroup_parents(probe))) - before),
            "sandbox dirs": sorted(os.listdir(state / "sandboxes")),
            "records": sorted(os.listdir(run / "sandboxes")),
            "mounts": [
                line
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if str(base) in line
            ],
        }
        keeper = _live_keeper(run)
        if keeper:
            leftovers["keeper"] = [str(keeper)]
            _rescue(keeper, run)
        leaked = {k: v for k, v in leftovers.items() if v}
        assert not leaked, f"the test left things behind: {leaked}"
    finally:
        if probe is not None:
            _clean_up(probe, before)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _clean_up(probe: Runtime, before: set[str]) -> None:
    """Remove, the way corral does, what a test left (one that failed half
    way, say, with a `corral run` it killed whose next run never came):
    the leftovers of dead runs' claims, then every sandbox cgroup made
    during the test that no record keeps. Without this, deleting the test's
    run directory would orphan them on the host for good."""
    with contextlib.suppress(Exception):
        probe.sweep_claims()
    new = {os.path.basename(p) for p in set(_cgroup_leftovers(_cgroup_parents(probe))) - before}
    with contextlib.suppress(Exception):
        probe.sweep(lambda name: f"corral-{name}" in new)


def _live_keeper(run: Path) -> int:
    """The PID of a holder keeper still running for run directory *run*, or 0."""
    try:
        pid = int((run / "keeper.lock").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return 0
    return pid if str(run) in cmdline and "_keeper" in cmdline else 0


def _rescue(keeper: int, run: Path) -> None:
    """Kill a leaked keeper and the sandboxes it holds, and remove their
    cgroups: a failing test must not leave the machine dirty."""
    import json
    import signal
    import time

    children = Path(f"/proc/{keeper}/task/{keeper}/children").read_text().split()
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(keeper, signal.SIGKILL)
    # Each is ours to reap if its parent died before it (we are a subreaper).
    for ours in [keeper, *map(int, children)]:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(ours, 0)
    for record in (run / "sandboxes").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            for path in json.loads(record.read_text())["cgroup"]:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        os.rmdir(path)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)  # its processes are still dying


@pytest.fixture(scope="session")
def session_keeper() -> Iterator[Keeper]:
    """One spawn keeper for the session.

    The test process is not reliably single-threaded (trio's worker threads
    outlive the trio tests for a while), so library-level tests spawn the
    way the supervisor does: through the keeper. The CLI tests cover the
    direct path in a fresh process.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: sandboxes use namespaces, mounts and cgroups")
    keeper = Keeper()
    try:
        yield keeper
    finally:
        keeper.close()


@pytest.fixture
def runtime(dirs: Dirs, session_keeper: Keeper) -> Runtime:
    """A Runtime on the test's private directories, spawning through the keeper."""
    return Runtime(state_dir=dirs.state, run_dir=dirs.run, spawner=session_keeper.spawn)


@pytest.fixture(scope="session", autouse=True)
def session_lxcfs() -> Iterator[int]:
    """One lxcfs for the whole session, which every test's sandboxes take
    their view of /proc from (``CORRAL_LXCFS`` is its mount point); its PID.

    Each test has a run directory of its own, where corral would start an
    lxcfs of its own and leave it running (as it does for a user: it
    outlives whoever started it). The tests of corral's own lxcfs set
    ``CORRAL_LXCFS=auto`` themselves, and stop what they started. 0 when
    there is none: lxcfs is not installed (then no sandbox has the view),
    or ``CORRAL_LXCFS`` was set for the run.
    """
    if os.geteuid() != 0 or "CORRAL_LXCFS" in os.environ:
        yield 0
        return
    from supervisor._runtime._lxcfs import Lxcfs

    base = tempfile.mkdtemp(prefix="corral-test-lxcfs-", dir=_scratch_base())
    os.chmod(base, 0o711)  # a userns sandbox's root binds its files
    lxcfs = Lxcfs(base, "auto", say=lambda line: None)
    with lxcfs.held() as mountpoint:
        pass
    os.environ["CORRAL_LXCFS"] = mountpoint or "off"
    try:
        yield lxcfs.pid
    finally:
        del os.environ["CORRAL_LXCFS"]
        lxcfs.stop(force=True)
        subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture(autouse=True)
def _no_stray_children(session_lxcfs: int) -> Iterator[None]:
    """No test may leave a child process (a sandbox init) unreaped."""
    yield
    # A killed `corral run` leaves us its sysinfo answerer, which ends
    # with its sandbox: reaped here (it never ends if the sandbox lives on).
    reap_answerers()
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    assert pid == 0, f"an unreaped child process {pid} was left (status {status})"
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    stray = [
        c
        for c in children
        if "supervisor._runtime._linux._keeper" not in _cmdline(c) and int(c) != session_lxcfs
    ]
    assert not stray, f"child processes left running: {stray}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def corral(
    dirs: Dirs, *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the ``corral`` CLI as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env=dirs.env,
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _criu_error() -> str | None:
    """Why CRIU cannot work here (``criu check``), or None if it can."""
    try:
        check_criu()
    except CriuUnavailableError as exc:
        return str(exc)
    return None


@pytest.fixture
def criu() -> None:
    """Skip where CRIU cannot work (the host lane); those tests run in the
    VM lanes, where a CRIU that fails its check fails the test: a lane whose
    checkpoint tests all skipped would pass having tested nothing."""
    error = _criu_error()
    if error is not None and os.environ.get("CORRAL_VM_LANE"):
        pytest.fail(f"CRIU does not work in this VM lane: {error}")
    if error is not None:
        pytest.skip(f"CRIU does not work on this kernel ({error}); runs in the VM lanes")


@pytest.fixture
def criu_broken() -> None:
    """Skip where CRIU works: the unavailable path needs a kernel it rejects (host lane)."""
    if _criu_error() is None:
        pytest.skip("criu check passes on this kernel; the unavailable path runs on the host lane")
