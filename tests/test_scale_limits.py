"""What ``corral up`` does about the host's limits for a large fleet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from supervisor._cli._fleet import FDS_PER_SANDBOX, check_kernel_limits


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
