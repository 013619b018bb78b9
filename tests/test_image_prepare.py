"""Images made on first use: ``oci:/PATH[:REF]`` (imported when a sandbox
first names it) in ``corral run --image`` and a fleet's ``image`` or
``rootfs``; replicas share one import; a bad one is its sandbox's start
failure, in one line. (``debian:SUITE`` built on first use: in
tests/test_debian_image.py, where the built image is cached.)"""

from __future__ import annotations

from pathlib import Path

import pytest

import events
from rootfs import ImageStore
from supervisor import Supervisor
from supervisor._core._fleet import FleetError, parse_fleet

from .conftest import Dirs, corral, requires_root
from .supervising import fleet, of, output, run, wait_event
from .test_image_import import _images

pytestmark = [requires_root]


def test_corral_run_imports_an_oci_image_on_first_use(dirs: Dirs, tmp_path: Path) -> None:
    _, app1, _ = _images(dirs, tmp_path)
    ref = f"oci:{app1}:app:1"
    first = corral(dirs, "run", "--image", ref)
    # No command: the image's Entrypoint and Cmd, its Env and WorkingDir.
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode() == "from-the-image in /srv\nmotd whited out\n"
    assert "layer 2 of 2 imported" in first.stderr.decode()
    again = corral(dirs, "run", "--image", ref, "--", "cat", "/srv/app")
    assert (again.returncode, again.stdout.decode()) == (0, "1\n"), again.stderr
    assert "imported" not in again.stderr.decode()  # every layer was in the store
    assert [i.tags for i in ImageStore(dirs.state / "images").images() if "app:1" in i.tags]


def test_a_bad_oci_reference_is_one_line(dirs: Dirs, tmp_path: Path) -> None:
    p = corral(dirs, "run", "--image", f"oci:{tmp_path}/nowhere", "--", "true")
    assert p.returncode == 125
    assert p.stderr.decode().count("\n") == 1 and "no such layout directory" in p.stderr.decode()
    with pytest.raises(FleetError) as info:
        parse_fleet(
            {
                "sandbox": [
                    {"name": "a", "command": ["true"], "image": "oci:relative/path"},
                    {"name": "b", "command": ["true"], "image": "x", "rootfs": "y"},
                ]
            }
        )
    assert info.value.problems == [
        "sandbox 'a': image: expected oci:/ABSOLUTE/PATH[:TAG] (a layout directory or a"
        " tarball), got 'oci:relative/path'",
        "sandbox 'b': image: rootfs says the same: set one of them",
    ]


def test_a_fleet_runs_replicas_on_one_import_and_a_bad_image_fails_alone(
    dirs: Dirs, tmp_path: Path
) -> None:
    _, app1, _ = _images(dirs, tmp_path)
    f = fleet(
        {
            "name": "app",
            "image": f"oci:{app1}:app:1",
            "replicas": 2,
            "command": ["cat", "/srv/app"],
        },
        {"name": "bad", "image": f"oci:{tmp_path}/missing", "command": ["true"]},
    )

    async def body(sup: Supervisor) -> None:
        for name in ("app-0", "app-1"):
            await wait_event(sup, lambda e, n=name: isinstance(e, events.Exited) and e.sandbox == n)  # type: ignore[misc]
        await wait_event(sup, lambda e: isinstance(e, events.StartFailed))

    evs = run(f, dirs, body)
    (failed,) = of(evs, events.StartFailed, "bad-0")[:1]
    assert "no such layout directory" in failed.error and "\n" not in failed.error
    assert output(dirs, "app-0") == "1\n"
    # One image in the store for both replicas (and the busybox base).
    images = ImageStore(dirs.state / "images").images()
    assert sum(1 for i in images if i.source.get("builder") == "oci") == 1
