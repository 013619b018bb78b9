"""The escape battery of security issue 7: a static probe (tests/escape/probe.c)
makes 42 escape and abuse attempts from inside a sandbox.

In a sandbox with the default settings every attempt must be blocked, and
the probe must see Docker's 14 capabilities, no_new_privs and a seccomp
filter. A privileged sandbox (every capability, no seccomp, no masks) really
allows most of them, and the test says which; what it must still contain
(the host's processes, network and root, the sandbox's pids and memory
limits) stays contained. Each sandbox kind runs the probe once; the parsed
lines are shared by the tests below.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from rootfs import ensure_busybox
from supervisor import Limits, Runtime, SandboxSpec
from supervisor._runtime._security import make_security

from .conftest import _scratch_base, requires_root
from .helpers import run_capture

pytestmark = [requires_root, pytest.mark.layout]

PROBE_SOURCE = Path(__file__).parent / "escape" / "probe.c"

MEMORY = 64 << 20
PIDS = 256
MEM_TRY = 192 << 20
"""What the memory hog tries to touch: three times the limit."""

ATTEMPTS = (
    "mount_proc",
    "bind_mount_root",
    "umount_mask",
    "unshare_mount",
    "unshare_user",
    "clone3_newuser",
    "setns",
    "pivot_root",
    "fsopen",
    "read_kcore",
    "sysrq",
    "core_pattern",
    "write_sys",
    "cgroup_write",
    "mknod_block",
    "mknod_mem",
    "open_by_handle",
    "chroot_breakout",
    "see_host_procs",
    "signal_host",
    "host_network",
    "host_abstract_socket",
    "vsock",
    "inherited_fds",
    "tiocsti",
    "fork_bomb",
    "memory_hog",
    "dmesg",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring",
    "keyctl",
    "set_clock",
    "sethostname",
    "reboot",
    "kexec_load",
    "init_module",
    "delete_module",
    "swapon",
    "swapoff",
    "acct",
)
"""Every attempt of the probe, in its order."""

DEFAULT_STATUS = {"CapEff": "00000000a80425fb", "NoNewPrivs": "1", "Seccomp": "2"}
"""Docker's 14 capabilities, no_new_privs, a seccomp filter (mode 2)."""

PRIVILEGED_SUCCEEDS = (
    "mount_proc",
    "bind_mount_root",
    "umount_mask",  # nothing is masked: umount2 gets past the check, EINVAL
    "unshare_mount",
    "unshare_user",
    "clone3_newuser",
    "setns",
    "pivot_root",  # past the check; EBUSY at the root
    "fsopen",
    "core_pattern",
    "cgroup_write",  # through a cgroup2 mount of its own
    "open_by_handle",
    "tiocsti",
    "dmesg",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring",
    "keyctl",
    "set_clock",  # past CAP_SYS_TIME; the values are refused, the clock untouched
    "sethostname",  # its own UTS namespace
    "reboot",  # past CAP_SYS_BOOT; a PID namespace refuses CAD_OFF
    "swapon",
    "swapoff",
    "acct",
)
"""What a privileged sandbox really may do (every capability, no seccomp, no masks)."""

PRIVILEGED_STAYS_BLOCKED = (
    "chroot_breakout",  # pivot_root, not chroot: the way out ends at the sandbox's root
    "see_host_procs",
    "signal_host",
    "host_network",
    "host_abstract_socket",
    "inherited_fds",
    "fork_bomb",
    "memory_hog",
)
"""What even a privileged sandbox may not: its namespaces and cgroup hold."""


def _exists(path: str) -> Callable[[], bool]:
    return lambda: os.path.exists(path)


def _host_reads_its_disk() -> bool:
    """Whether root on the host may read the first disk, through a node of
    its own as the probe does (some hosts refuse even root: this one's VM
    manager does)."""
    words = Path("/proc/partitions").read_text().split("\n", 2)[-1].split()
    if len(words) < 4:
        return False
    d = tempfile.mkdtemp(prefix="corral-escape-disk-", dir=_scratch_base())
    try:
        node = os.path.join(d, "disk")
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(int(words[0]), int(words[1])))
        with open(node, "rb") as disk:
            return len(disk.read(512)) > 0
    except OSError:
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _host_has_a_sys_knob() -> bool:
    knobs = ("kernel/uevent_helper", "kernel/mm/transparent_hugepage/enabled", "kernel/mm/ksm/run")
    return any(os.path.exists(f"/sys/{k}") for k in knobs)


def _host_makes_vsock_sockets() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _host_can_kexec() -> bool:
    disabled = Path("/proc/sys/kernel/kexec_load_disabled")
    return os.path.exists("/sys/kernel/kexec_loaded") and not (
        disabled.exists() and disabled.read_text().strip() == "1"
    )


PRIVILEGED_IF_THE_HOST_HAS: dict[str, tuple[str, Callable[[], bool]]] = {
    "read_kcore": ("/proc/kcore", _exists("/proc/kcore")),
    "sysrq": ("/proc/sysrq-trigger", _exists("/proc/sysrq-trigger")),
    "write_sys": ("one of the /sys knobs (through a sysfs of its own)", _host_has_a_sys_knob),
    "mknod_block": ("a disk in /proc/partitions that root may read", _host_reads_its_disk),
    "mknod_mem": ("/dev/mem", _exists("/dev/mem")),
    "vsock": ("AF_VSOCK sockets", _host_makes_vsock_sockets),
    "kexec_load": ("kexec_load", _host_can_kexec),
    "init_module": ("loadable modules", _exists("/proc/modules")),
    "delete_module": ("loadable modules", _exists("/proc/modules")),
}
"""What a privileged sandbox may do if the host's kernel has the thing at all
(without it the attempt fails however privileged: ENOENT, ENXIO, ENOSYS)."""

# Around the probe: what /tmp and /dev hold before and after, which
# processes are left, and whether a mount of the probe's is.
SCRIPT = (
    "echo before tmp $(ls -A /tmp); echo before dev $(ls -A /dev);"
    " /probe;"
    " echo after tmp $(ls -A /tmp); echo after dev $(ls -A /dev);"
    " echo after procs $(cat /proc/[0-9]*/comm);"
    " echo after mounts $(grep -c probe- /proc/self/mountinfo)"
)


class ProbeRun(NamedTuple):
    """One run of the probe, parsed."""

    results: dict[str, tuple[str, str]]
    """Attempt name -> (blocked|succeeded|error, detail)."""
    status: dict[str, str]
    around: dict[str, list[str]]
    """``before tmp``, ``after procs``, ...: the words of those lines."""
    host_changes: list[str]
    """What on the host differed after the run (nothing, we hope)."""
    output: str


def _parse(out: str, host_changes: list[str]) -> ProbeRun:
    results: dict[str, tuple[str, str]] = {}
    status: dict[str, str] = {}
    around: dict[str, list[str]] = {}
    for line in out.splitlines():
        head, _, rest = line.partition(" ")
        key, _, value = rest.partition(" ")
        if head == "status":
            status[key] = value
        elif head in ("before", "after"):
            around[f"{head} {key}"] = value.split()
        else:
            results[head] = (key, value)
    return ProbeRun(results, status, around, host_changes, out)


def _host_state() -> dict[str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError as exc:
            return f"({exc.strerror})"

    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return {
        "hostname": socket.gethostname(),
        "swaps": read("/proc/swaps"),
        "core_pattern": read("/proc/sys/kernel/core_pattern"),
        "ctrl-alt-del": read("/proc/sys/kernel/ctrl-alt-del"),
        "kexec_loaded": read("/sys/kernel/kexec_loaded"),
        "probe mounts": "\n".join(m for m in mounts if "probe-" in m),
    }


def _clock_offset() -> float:
    return time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


class Battery:
    """The probe's rootfs and the host's bait, made once; each sandbox kind's
    run, made the first time a test asks for it."""

    def __init__(self, rootfs: str, env: dict[str, str]) -> None:
        self.rootfs = rootfs
        self.env = env
        self._runs: dict[str, ProbeRun | BaseException] = {}

    def run(self, kind: str, runtime: Runtime) -> ProbeRun:
        if kind not in self._runs:
            try:
                self._runs[kind] = self._run(kind, runtime)
            except Exception as exc:
                self._runs[kind] = exc
        run = self._runs[kind]
        if isinstance(run, BaseException):
            raise AssertionError(f"the {kind} run of the probe failed: {run!r}") from run
        return run

    def _run(self, kind: str, runtime: Runtime) -> ProbeRun:
        # "default" is what a sandbox gets unasked (a user namespace where
        # the kernel makes them); "userns" and "root-mapped" say so.
        userns = {"userns": True, "root-mapped": False}.get(kind)
        security = make_security(privileged=kind == "privileged", userns=userns)
        spec = SandboxSpec(
            name=f"escape-{kind}",
            argv=("/bin/sh", "-c", SCRIPT),
            rootfs=self.rootfs,
            env=self.env,
            limits=Limits(memory=MEMORY, pids=PIDS),
            security=security,
        )
        before, offset = _host_state(), _clock_offset()
        result, out, err = run_capture(runtime, spec)
        after, step = _host_state(), _clock_offset() - offset
        assert result.status == 0, f"status {result.status}\n{out}\n{err}"
        changes = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]]
        if abs(step) > 0.5:
            changes.append(f"the clock stepped by {step:.3f} s")
        return _parse(out, changes)


def _compile(dest: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        reason = (
            "gcc not found: the escape probe is a static C program (apt-get install gcc libc6-dev)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs gcc: the battery must run there
        pytest.skip(reason)
    probe = dest / "probe"
    r = subprocess.run(
        [gcc, "-static", "-O1", "-Wall", "-o", str(probe), str(PROBE_SOURCE)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, f"gcc -static failed (is libc6-dev installed?):\n{r.stderr}"
    return probe


@pytest.fixture(scope="module")
def battery() -> Iterator[Battery]:
    """A rootfs holding /probe, and the host's listeners and marker."""
    if os.geteuid() != 0:
        pytest.skip("needs root: sandboxes use namespaces, mounts and cgroups")
    tmp = Path(tempfile.mkdtemp(prefix="corral-escape-", dir=_scratch_base()))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe = _compile(tmp)
        rootfs = ensure_busybox(tmp / "images")
        shutil.copy(probe, Path(rootfs) / "probe")
        os.chmod(Path(rootfs) / "probe", 0o755)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        abstract = f"corral-escape-{os.getpid()}-{os.urandom(4).hex()}"
        unix.bind("\0" + abstract)
        unix.listen()
        marker = tmp / "host-marker"  # outside the rootfs
        marker.write_text("the host\n")
        env = {
            "PROBE_HOST_PID": str(os.getpid()),
            "PROBE_HOST_COMM": Path("/proc/self/comm").read_text().strip(),
            "PROBE_HOST_PORT": str(tcp.getsockname()[1]),
            "PROBE_HOST_ABSTRACT": abstract,
            "PROBE_HOST_MARKER": str(marker),
            "PROBE_PIDS_LIMIT": str(PIDS),
            "PROBE_MEM_TRY": str(MEM_TRY),
        }
        yield Battery(rootfs, env)
    finally:
        tcp.close()
        unix.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _result(run: ProbeRun, attempt: str) -> tuple[str, str]:
    assert attempt in run.results, f"the probe printed no {attempt} line:\n{run.output}"
    return run.results[attempt]


@pytest.mark.parametrize("kind", ["default", "userns", "root-mapped"])
@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_a_default_sandbox_blocks_every_attempt(
    battery: Battery, runtime: Runtime, attempt: str, kind: str
) -> None:
    """Each escape or abuse attempt fails in a sandbox with the default
    settings, in one with userns = true said, and in a root-mapped one
    (userns = false)."""
    result, detail = _result(battery.run(kind, runtime), attempt)
    assert result == "blocked", f"{attempt} {result}: {detail}"


@pytest.mark.parametrize("kind", ["default", "userns", "root-mapped"])
def test_a_default_sandbox_has_the_default_restrictions(
    battery: Battery, runtime: Runtime, kind: str
) -> None:
    """The probe sees Docker's 14 capabilities, no_new_privs and a seccomp filter."""
    assert battery.run(kind, runtime).status == DEFAULT_STATUS


@pytest.mark.parametrize("attempt", PRIVILEGED_SUCCEEDS)
def test_a_privileged_sandbox_allows(battery: Battery, runtime: Runtime, attempt: str) -> None:
    """A privileged sandbox really may do this: privileged means privileged."""
    result, detail = _result(battery.run("privileged", runtime), attempt)
    assert result == "succeeded", f"{attempt} {result}: {detail}"


@pytest.mark.parametrize("attempt", sorted(PRIVILEGED_IF_THE_HOST_HAS))
def test_a_privileged_sandbox_allows_what_the_kernel_has(
    battery: Battery, runtime: Runtime, attempt: str
) -> None:
    """A privileged sandbox may do this exactly when the host's kernel has the thing."""
    what, host_has = PRIVILEGED_IF_THE_HOST_HAS[attempt]
    result, detail = _result(battery.run("privileged", runtime), attempt)
    expected = "succeeded" if host_has() else "blocked"
    assert result == expected, f"{attempt} {result} (the host has {what}: {host_has()}): {detail}"


@pytest.mark.parametrize("attempt", PRIVILEGED_STAYS_BLOCKED)
def test_a_privileged_sandbox_still_contains(
    battery: Battery, runtime: Runtime, attempt: str
) -> None:
    """Even a privileged sandbox cannot reach the host's processes, network or
    root, and its pids and memory limits hold."""
    result, detail = _result(battery.run("privileged", runtime), attempt)
    assert result == "blocked", f"{attempt} {result}: {detail}"


def test_the_privileged_expectations_cover_every_attempt() -> None:
    """Each attempt is in exactly one of the three privileged lists."""
    lists = [PRIVILEGED_SUCCEEDS, PRIVILEGED_STAYS_BLOCKED, tuple(PRIVILEGED_IF_THE_HOST_HAS)]
    named = [a for lst in lists for a in lst]
    assert sorted(named) == sorted(ATTEMPTS)


@pytest.mark.parametrize("kind", ["default", "privileged", "userns"])
def test_the_probe_makes_every_attempt(battery: Battery, runtime: Runtime, kind: str) -> None:
    """The probe prints one line per attempt, in order, and none ended in error."""
    run = battery.run(kind, runtime)
    assert tuple(run.results) == ATTEMPTS, run.output
    errors = {a: d for a, (r, d) in run.results.items() if r == "error"}
    assert not errors


@pytest.mark.parametrize("kind", ["default", "privileged", "userns"])
def test_the_probe_leaves_nothing_behind(battery: Battery, runtime: Runtime, kind: str) -> None:
    """After the probe /tmp and /dev hold what they held before, no process
    of the probe's is left and none of its mounts."""
    around = battery.run(kind, runtime).around
    assert around["after tmp"] == around["before tmp"]
    assert around["after dev"] == around["before dev"]
    assert set(around["after procs"]) <= {"init", "sh", "cat"}, around["after procs"]
    assert around["after mounts"] == ["0"]


@pytest.mark.parametrize("kind", ["default", "privileged", "userns"])
def test_the_host_is_as_it_was(battery: Battery, runtime: Runtime, kind: str) -> None:
    """Host name, swap, core_pattern, Ctrl-Alt-Del, kexec, mounts
    and the clock are unchanged after the battery, even a privileged one."""
    assert battery.run(kind, runtime).host_changes == []
