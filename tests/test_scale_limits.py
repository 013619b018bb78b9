"""What ``corral up`` does about the host's limits for a large fleet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from rootfs import ImageStore, busybox_image
from supervisor._cli._fleet import FDS_PER_SANDBOX, check_kernel_limits

from .conftest import Dirs, requires_root
from .helpers import read_started, up_under_limit


def _read(path: str) -> int:
    return int(Path(path).read_text().split()[0])


def test_a_fleet_within_the_kernels_limits_gets_no_warning() -> None:
    assert check_kernel_limits(10) == []
    assert check_kernel_limits(0) == []


def test_a_fleet_beyond_pid_max_is_told_in_one_line() -> None:
    pid_max = _read("/proc/sys/kernel/pid_max")
    lines = check_kernel_limits(pid_max)
    pid_lines = [line for line in lines if line.startswith("kernel.pid_max")]
    assert pid_lines == [
        f"kernel.pid_max is {pid_max}: {pid_max} sandboxes need at least {2 * pid_max}"
        f" process IDs (an init and its command each); raise it"
        f" (sysctl kernel.pid_max={max(4 * pid_max, 65536)})"
    ]
    assert all("\n" not in line for line in lines)


def test_a_fleet_beyond_the_namespaces_limits_is_told_which() -> None:
    limit = _read("/proc/sys/user/max_net_namespaces")
    lines = check_kernel_limits(limit + 1)
    assert any(line.startswith(f"user.max_net_namespaces is {limit}:") for line in lines)


def test_the_open_files_limit_short_of_the_fleet_is_named(tmp_path: Path) -> None:
    """The soft limit goes to the hard one; a hard limit short of what the
    fleet needs is the starter's ceiling, left alone and named in one line."""
    script = (
        "import resource, sys\n"
        "from supervisor._cli._fleet import raise_open_files_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1100))\n"
        "raise_open_files_limit(1000)\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "raise_open_files_limit(5)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    need = 1024 + FDS_PER_SANDBOX * 1000
    assert out.stdout.split() == ["1100", "1100"]
    assert out.stderr == (
        f"corral: warning: 1000 sandboxes need about {need} open files; the hard limit"
        " is 1100 (raise it: ulimit -Hn, LimitNOFILE= of a service)\n"
    )


def _census(pid: int) -> Counter[str]:
    """Process *pid*'s descriptors by kind: pipe, net, mnt, pidfd, a file's
    directory (``logs``) ..."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:"):
            kinds[target.removeprefix("anon_inode:").strip("[]")] += 1
        elif target.startswith("/"):
            kinds[os.path.basename(os.path.dirname(target))] += 1
        else:
            kinds[target.split(":")[0]] += 1
    return kinds


@requires_root
def test_a_fleet_costs_its_supervisor_few_descriptors_per_sandbox(
    dirs: Dirs, tmp_path: Path
) -> None:
    """The open-file limit bounds a fleet. Per sandbox the supervisor holds
    its output pipes' two read ends once (not a copy for the keeper client
    too); the sandboxes' namespaces only within a sixteenth of the limit;
    and every log file is open while among the 256 most recently written
    (all 40 here: see test_output for the rest)."""
    busybox_image(ImageStore(dirs.state / "images"))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[sandbox]]\nname = "fd"\nreplicas = 40\ncommand = "sleep 1000"\n')
    proc = up_under_limit(dirs.env, fleet, 1024)
    try:
        read_started(proc, 40)
        kinds = _census(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert kinds["pipe"] <= 2 * 40 + 4, kinds  # the supervisor's own: its stdout, stderr
    assert kinds["net"] + kinds["mnt"] == 1024 // 16, kinds  # 32 sandboxes' of 40
    assert kinds["logs"] == 40, kinds
    # Five each on cgroup v1, six on v2 (its OOM watch is an epoll set and
    # memory.events), the namespaces of 32, the supervisor's own.
    assert sum(kinds.values()) <= 8 * 40 + 80, kinds
