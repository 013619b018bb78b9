"""The ``debian`` builder, for real: mmdebstrap from the host's apt mirror
(the CI machine reaches it), configured as the seed's template does, and a
sandbox on it running Python.

The built image is kept in a store that outlives the test session
(``$CORRAL_TEST_IMAGE_CACHE``, default ``/var/cache/corral-tests/images``),
so that only the first run pays for the cold build (about 25 s here).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Dirs, corral, requires_root

pytestmark = [requires_root]

CACHE = Path(os.environ.get("CORRAL_TEST_IMAGE_CACHE", "/var/cache/corral-tests/images"))


@pytest.fixture
def cached(dirs: Dirs) -> Iterator[Dirs]:
    """*dirs* whose image store is the persistent test cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dirs.state / "images")
    (dirs.state / "images").symlink_to(CACHE)
    yield dirs


def test_a_sandbox_runs_python_on_a_debian_image(cached: Dirs) -> None:
    build = corral(cached, "image", "build", "debian", "--package", "python3-minimal", timeout=900)
    assert build.returncode == 0, build.stderr.decode()[-3000:]
    tag = build.stdout.decode().rsplit(": ", 1)[0]  # "NAME: sha256:..."
    assert tag.startswith("debian:bookworm+")
    p = corral(
        cached, "run", "--image", tag, "--", "python3", "-c",
        "import sys; print(6 * 7, sys.version_info[:2] >= (3, 11))",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == "42 True\n"
    # Configured as the template does.
    p = corral(
        cached, "run", "--image", tag, "--", "sh", "-c",
        "grep ^root: /etc/shadow | cut -d: -f2; readlink /var/run; cat /etc/hostname;"
        " grep -c nameserver /etc/resolv.conf; cat /etc/fstab",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    host_ns = sum(
        1 for x in Path("/etc/resolv.conf").read_text().splitlines() if x.startswith("nameserver")
    )
    assert lines[:4] == ["*", "/run", "corral", str(host_ns)]
    assert lines[4].startswith("# the sandbox's mounts are made by corral")
    # A second build of the recipe is the store's: found, not built.
    again = corral(cached, "image", "build", "debian", "--package", "python3-minimal")
    assert again.returncode == 0 and again.stdout == build.stdout
    assert "building" in again.stderr.decode() and "I: " not in again.stderr.decode()


def test_a_bad_recipe_is_one_line(dirs: Dirs) -> None:
    p = corral(dirs, "image", "build", "debian", "--variant", "huge")
    assert p.returncode == 125
    assert p.stderr.decode() == (
        "corral: debian: variant: expected one of minbase, buildd, required, important,"
        " standard, apt, essential, got 'huge'\n"
    )
    p = corral(dirs, "image", "build", "debian", "--package", "bad name")
    assert p.returncode == 125 and "debian: packages: expected package names" in p.stderr.decode()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_an_interrupted_debian_build_leaves_nothing(dirs: Dirs, signame: str) -> None:
    """The seed's revert: a build interrupted while mmdebstrap works leaves
    no layer, image, scratch or mount, and says so in its status."""
    sig = getattr(signal, signame)
    store = dirs.state / "images"
    shutil.rmtree(store)  # an empty store: nothing else in it
    store.mkdir()
    before = set(Path(tempfile.gettempdir()).glob("mmdebstrap.*"))
    proc = subprocess.Popen(
        # A recipe no other test builds: never in a cache.
        [sys.executable, "-m", "supervisor", "image", "build", "debian",
         "--variant", "essential", "--package", "hello"],
        env=dirs.env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    # Its first line of mmdebstrap's output: the build is under way.
    while not (line := proc.stderr.readline()).startswith("  "):
        assert line, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    left = [
        str(p.relative_to(store))
        for p in store.rglob("*")
        if not p.is_dir() and p.parent.name != "locks"
    ]
    assert left == []
    assert list((store / "tmp").iterdir()) == []
    assert str(store) not in Path("/proc/self/mountinfo").read_text()
    # Nor anything of mmdebstrap's own (its gpg home) outside the store.
    assert set(Path(tempfile.gettempdir()).glob("mmdebstrap.*")) <= before


def test_debian_suite_is_built_on_first_use(cached: Dirs) -> None:
    """``debian:SUITE`` names the default recipe's image, built the first
    time a sandbox names it (cached in the persistent test store after)."""
    p = corral(
        cached, "run", "--image", "debian:bookworm", "--", "sh", "-c",
        "cat /etc/debian_version; readlink /var/run",
        timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    version, run_link = p.stdout.decode().splitlines()
    assert version.startswith("12.") and run_link == "/run"
    again = corral(cached, "run", "--image", "debian:bookworm", "--", "true")
    assert again.returncode == 0 and again.stderr == b""  # found, not built
