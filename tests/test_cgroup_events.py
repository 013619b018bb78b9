"""cgroup v2's notified files: cgroup.events (populated), memory.events (OOM)."""

from __future__ import annotations

import os
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


def test_more_oom_watches_than_inotify_instances_and_each_wakes(runtime: Runtime) -> None:
    """A watch costs no inotify instance (a user has 128 by default, and a
    supervisor of more sandboxes than that could not watch them): more
    watches than the limit open at once, none wakes while nothing happens,
    and every one wakes when the OOM killer runs."""
    import select

    from supervisor import Limits

    if runtime.cgroups.layout != "v2":
        pytest.skip("memory.events exists only on cgroup v2: this runs in the VM lane")
    with open("/proc/sys/fs/inotify/max_user_instances") as f:
        instances = int(f.read())
    hog = "read go; x=0123456789abcdef; while :; do x=$x$x; done"
    spec = SandboxSpec(name="hog", argv=("sh", "-c", hog), limits=Limits(memory=32 << 20))
    r, w = os.pipe()
    try:
        with runtime.create(spec, stdio=(r, 2, 2)) as sb:
            watches = [sb.cgroup.open_oom_watch() for _ in range(instances + 10)]
            try:
                poller = select.poll()
                for watch in watches:
                    watch.read()
                    poller.register(watch.fd, select.POLLIN)
                assert poller.poll(0) == []
                os.write(w, b"go\n")
                assert sb.wait().oom_killed
                woken: set[int] = set()
                while len(woken) < len(watches):
                    ready = poller.poll(10_000)
                    assert ready, f"{len(watches) - len(woken)} watches did not wake"
                    for fd, _ in ready:
                        woken.add(fd)
                        poller.unregister(fd)
                assert all(watch.read()[1] >= 1 for watch in watches)
            finally:
                for watch in watches:
                    watch.close()
    finally:
        os.close(r)
        os.close(w)
