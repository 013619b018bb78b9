"""cgroup v2's cgroup.events (populated), watched with inotify."""

from __future__ import annotations

import signal

import pytest

from supervisor import Runtime, SandboxSpec
from supervisor._runtime._linux._cgroups import V2Cgroup

from .conftest import requires_root

pytestmark = [requires_root, pytest.mark.layout]


def test_populated_is_watched_until_the_sandbox_is_gone(runtime: Runtime) -> None:
    """wait_unpopulated times out while processes live, returns once they are gone."""
    if runtime.cgroups.layout != "v2":
        pytest.skip("cgroup.events exists only on cgroup v2: this runs in the VM lane")
    with runtime.create(SandboxSpec(name="pop", argv=("sleep", "30")), stdio=(0, 2, 2)) as sb:
        assert isinstance(sb.cgroup, V2Cgroup)
        assert sb.cgroup.wait_unpopulated(timeout=0.2) is False
        sb.send_signal(signal.SIGKILL)
        sb.wait()
        assert sb.cgroup.wait_unpopulated(timeout=10) is True
        with open(f"{sb.cgroup.paths[0]}/cgroup.events") as f:
            assert "populated 0" in f.read()
