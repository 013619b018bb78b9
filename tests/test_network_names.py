"""Peers by name in a fleet's /etc/hosts, resolved by glibc on a Debian
image (the busybox image's static binaries cannot resolve names).

Not a layout test: the persistent Debian image cache it uses is read-only
in the VM lanes, and what it checks (the supervisor keeping the files
current) does not depend on the kernel; test_network.py covers the
bridge itself in both lanes.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from .conftest import Dirs, requires_root
from .helpers import wait_for
from .test_network import Host, _nothing_left
from .test_network import host as host  # the fixture

pytestmark = [requires_root]


def test_fleet_peers_find_each_other_by_name(host: Host, dirs: Dirs, tmp_path: Path) -> None:
    """Inside a fleet, /etc/hosts lists every running bridged instance by
    its instance name (web-1) and its sandbox name (web: every replica),
    kept current as they start. Resolved by glibc (the busybox image's
    static binary cannot resolve names), so the client runs on Debian."""
    from .test_debian_image import CACHE

    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dirs.state / "images")
    (dirs.state / "images").symlink_to(CACHE)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[defaults]\nnetwork = "bridge"\n'
        '[[sandbox]]\nname = "web"\nreplicas = 2\n'
        'command = ["sh", "-c", "while :; do nc -l -p 7000 -e echo hi-from-$HOSTNAME; done"]\n'
        '[[sandbox]]\nname = "client"\nimage = "debian:bookworm"\n'
        'command = ["bash", "-c", "until [ $(getent ahostsv4 web | cut -d\' \' -f1 | sort -u'
        " | wc -l) = 2 ]; do :; done; echo both; until cat < /dev/tcp/web-1/7000; do :; done;"
        ' exec sleep 60"]\n'
    )
    up = host.corral_bg(dirs, "up", str(fleet))
    log = dirs.state / "logs" / "client-0.log"
    try:
        wait_for(
            lambda: (
                up.poll() is not None
                or "hi-from-web-1" in (log.read_text() if log.exists() else "")
            ),
            timeout=900,  # the first run builds debian:bookworm into the cache
            what="the client to reach web-1 by name",
        )
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
        assert "both" in log.read_text()
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)
