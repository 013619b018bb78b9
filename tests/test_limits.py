"""Memory, CPU and pids limits, enforced by the cgroup backend of this host."""

from __future__ import annotations

import pytest

from supervisor import Limits, Runtime, SandboxSpec

from .conftest import requires_root
from .helpers import run_capture, wait_for

pytestmark = [requires_root, pytest.mark.layout]

# Keeps doubling a shell variable until it holds ~128 MiB: far over 32M.
HOG = "x=0123456789abcdef; while :; do x=$x$x; done"


def test_memory_hog_is_oom_killed(runtime: Runtime) -> None:
    """A hog over a 32M limit is OOM-killed (137), and the OOM-kill counter rose."""
    spec = SandboxSpec(name="hog", argv=("sh", "-c", HOG), limits=Limits(memory=32 << 20))
    result, _, _ = run_capture(runtime, spec)
    assert result.status == 137
    assert result.oom_killed
    assert result.stats is not None and result.stats.oom_kill >= 1


def test_under_the_limit_is_not_oom_killed(runtime: Runtime) -> None:
    """A sandbox that stays under its limit exits normally, with no OOM kill."""
    spec = SandboxSpec(
        name="small",
        argv=("sh", "-c", "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ${#x}"),
        limits=Limits(memory=32 << 20),
    )
    result, out, _ = run_capture(runtime, spec)
    assert (result.status, result.oom_killed, out.strip()) == (0, False, "1000000")


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_cpu_quota_holds_busy_loops_to_half_a_cpu(runtime: Runtime, loops: int) -> None:
    """1, 2 or 3 busy loops under --cpus 0.5 together use about half a CPU (seed Part 2)."""
    script = f"for i in $(seq {loops}); do (while :; do :; done) & done; sleep 1.5; kill $(jobs -p)"
    spec = SandboxSpec(name=f"cpu{loops}", argv=("sh", "-c", script), limits=Limits(cpus=0.5))
    result, _, _ = run_capture(runtime, spec)
    assert result.stats is not None
    used = result.stats.cpu_usage_ns / 1e9 / result.duration
    # Unlimited, even one loop would use ~1.0 CPU: the bound cannot pass then.
    assert 0.3 < used < 0.65, f"{loops} loops used {used:.2f} CPUs under a 0.5 quota"


def test_cpu_unlimited_loop_uses_a_whole_cpu(runtime: Runtime) -> None:
    """Control for the quota test: without a limit one loop uses clearly more than 0.65."""
    script = "(while :; do :; done) & sleep 1; kill $!"
    result, _, _ = run_capture(runtime, SandboxSpec(name="cpufree", argv=("sh", "-c", script)))
    assert result.stats is not None
    used = result.stats.cpu_usage_ns / 1e9 / result.duration
    assert used > 0.65, f"an unlimited loop used only {used:.2f} CPUs (machine too busy?)"


def test_fork_bomb_is_contained_and_killable(runtime: Runtime) -> None:
    """A fork bomb under --pids 64 never exceeds 64 tasks and can be killed."""
    # The bomb runs in a subshell: ash exits when a fork of its own fails,
    # and the main shell's forks would race the bomb's (on a loaded host
    # the sandbox then ended by itself before it could be killed).
    bomb = "(b() { b | b & }; b); while :; do :; done"
    spec = SandboxSpec(name="bomb", argv=("sh", "-c", bomb), limits=Limits(pids=64, cpus=1))
    with runtime.create(spec, stdio=(0, 2, 2)) as sb:
        wait_for(lambda: sb.cgroup.stats().pids_limit_hits > 0, 20, "the pids limit to be hit")
        peak = max(sb.cgroup.stats().pids_current for _ in range(50))
        assert 1 < peak <= 64
        sb.kill()
        result = sb.wait()
    assert result.signal == 9
