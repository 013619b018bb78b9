"""``corral image import``: an OCI image (written by the tests' own
builders in tests/test_oci.py, and by skopeo where it is installed) into
the store, shared layers stored once, a sandbox on it with the image's
defaults, and a hostile image refused in one line with nothing left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rootfs import ImageStore, OciError, busybox_image
from rootfs._import import ImportProgress, import_oci
from rootfs._landlock import confine_writes, landlock_abi

from .conftest import Dirs, corral, requires_root
from .helpers import skopeo, user_xattrs_work
from .test_oci import build, docker_archive, file, layout, make_tar, special, symlink

pytestmark = [requires_root]


def _tar_of(root: str) -> bytes:
    """The tree at *root* as an uncompressed layer tar (owners, modes, links kept)."""
    out = Path(root).parent / (Path(root).name + ".tar")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(root, arcname=".")
    data = out.read_bytes()
    out.unlink()
    return data


CONFIG: dict[str, object] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/bin:/usr/bin", "GREETING=from-the-image"],
        "Entrypoint": ["sh", "-c"],
        "Cmd": ['echo "$GREETING in $PWD"; test -e /etc/motd || echo "motd whited out"'],
        "WorkingDir": "/srv",
    },
}


def _images(dirs: Dirs, tmp_path: Path) -> tuple[bytes, Path, Path]:
    """A busybox base tar, and two layouts of images on it (app:1, app:2)."""
    store = ImageStore(dirs.state / "images")
    (lower,) = store.lowerdirs(busybox_image(store))
    base_root = tmp_path / "base"
    shutil.copytree(lower, base_root, symlinks=True)
    (base_root / "etc" / "motd").write_text("hello\n")
    base = _tar_of(str(base_root))
    one = make_tar(file("srv/app", b"1\n"), file("etc/.wh.motd", b""))
    two = make_tar(file("srv/app", b"2\n"))
    a = layout(tmp_path / "app1", build([base, one], [True, False], CONFIG), "app:1")
    b = layout(tmp_path / "app2", build([base, two], [True, True], CONFIG), "app:2")
    return base, a, b


def test_an_imported_image_runs_with_its_defaults_and_shares_its_base(
    dirs: Dirs, tmp_path: Path
) -> None:
    _, a, b = _images(dirs, tmp_path)
    p = corral(dirs, "image", "import", str(a), "app:1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().startswith("app:1: sha256:")
    first = p.stdout
    progress = p.stderr.decode().splitlines()
    assert progress[0].startswith("corral: layer 1 of 2 ") and progress[1].startswith(
        "corral: layer 2 of 2 "
    )
    p = corral(dirs, "image", "import", str(b), "app:2", "--tag", "other")
    assert p.returncode == 0, p.stderr
    assert "layer 1 of 2 " in p.stderr.decode() and "in the store already" in p.stderr.decode()
    store = ImageStore(dirs.state / "images")
    one, two = store.find("app:1"), store.find("other")
    assert one.layers[0] == two.layers[0] and one.layers[1] != two.layers[1]
    assert one.config["env"] == ["PATH=/bin:/usr/bin", "GREETING=from-the-image"]
    assert one.source["builder"] == "oci"
    run = corral(dirs, "run", "--image", "app:1")
    assert (run.returncode, run.stdout.decode()) == (
        0, "from-the-image in /srv\nmotd whited out\n"
    ), run.stderr  # fmt: skip
    run = corral(dirs, "run", "--image", "other", "--", "cat", "/srv/app", "/etc/motd")
    assert (run.returncode, run.stdout.decode()) == (0, "2\nhello\n"), run.stderr
    # The same import again finds everything in the store.
    again = corral(dirs, "image", "import", str(a), "app:1")
    assert (again.returncode, again.stdout) == (0, first)
    assert corral(dirs, "image", "rm", "app:1", "other").returncode == 0
    assert corral(dirs, "image", "prune").returncode == 0
    assert sorted(os.listdir(dirs.state / "images" / "layers" / "sha256")) == sorted(
        layer[7:] for layer in busybox_image(store).layers
    )


def test_a_docker_save_tarball_is_imported_by_its_repo_tag(dirs: Dirs, tmp_path: Path) -> None:
    base, _, _ = _images(dirs, tmp_path)
    image = build([base, make_tar(file("srv/app", b"d\n"))], [False, False], CONFIG)
    archive = docker_archive(tmp_path / "saved.tar", [(image, ["example/app:7"])])
    p = corral(dirs, "image", "import", str(archive), "example/app:7")
    assert p.returncode == 0, p.stderr
    run = corral(dirs, "run", "--image", "example/app:7", "--", "cat", "/srv/app")
    assert (run.returncode, run.stdout.decode()) == (0, "d\n"), run.stderr


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([file("../escape", b"x")], "'../escape'"),
        ([symlink("etc", "/etc"), file("etc/passwd", b"x")], "'etc/passwd'"),
        ([special("dev/sda", tarfile.BLKTYPE, 8, 0)], "device files are not allowed"),
    ],
)
def test_a_hostile_image_is_refused_in_one_line_and_leaves_nothing(
    dirs: Dirs, tmp_path: Path, entries: list[object], expected: str
) -> None:
    store_root = dirs.state / "images"
    shutil.rmtree(store_root)  # an empty store, to see that nothing is left
    store_root.mkdir()
    bad = layout(tmp_path / "bad", build([make_tar(*entries)], [False], CONFIG), "bad")  # type: ignore[arg-type]
    p = corral(dirs, "image", "import", str(bad), "bad")
    assert p.returncode == 125
    err = p.stderr.decode()
    assert err.count("\n") == 1 and expected in err, err
    left = [
        str(x.relative_to(store_root))
        for x in store_root.rglob("*")
        if not x.is_dir() and x.parent.name != "locks"
    ]
    assert left == []


# A bottom layer large enough to be applied last of the four below.
_BIG = make_tar(*(file(f"usr/lib/f{n}", bytes(n % 7000)) for n in range(3000)))
_EMPTY = make_tar()


def _left_in(store_root: Path) -> list[str]:
    return [
        str(x.relative_to(store_root))
        for x in store_root.rglob("*")
        if not x.is_dir() and x.parent.name != "locks"
    ]


def _layer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("corral")]


def test_layers_applied_side_by_side_are_stored_and_reported_in_order(tmp_path: Path) -> None:
    """Layers are applied at once but committed and reported bottom first; a
    layer listed twice is applied once and is "cached" the second time."""
    tars = [_BIG, make_tar(file("a", b"a")), _EMPTY, make_tar(file("b", b"b")), _EMPTY]
    lay = layout(tmp_path / "img", build(tars, [True, False, False, True, False], CONFIG), "t")
    store = ImageStore(tmp_path / "store")
    seen: list[ImportProgress] = []
    image = import_oci(store, str(lay), "t", progress=seen.append)
    assert [(p.index, p.count, p.cached) for p in seen] == [
        (1, 5, False), (2, 5, False), (3, 5, False), (4, 5, False), (5, 5, True)
    ]  # fmt: skip
    assert len(image.layers) == 5 and image.layers[2] == image.layers[4]
    assert len(os.listdir(tmp_path / "store/layers/sha256")) == 4
    bottom = Path(store.layer_path(image.layers[0]))
    assert len(os.listdir(bottom / "usr/lib")) == 3000
    assert os.listdir(store.layer_path(image.layers[3])) == ["b"]
    assert os.listdir(tmp_path / "store/tmp") == []
    assert _layer_threads() == []


def test_a_hostile_layer_fails_the_import_while_others_are_applied(tmp_path: Path) -> None:
    """The hostile layer's own line, not another layer's "stopped"; nothing left."""
    tars = [_BIG, make_tar(file("../escape", b"x")), make_tar(file("b", b"b"))]
    lay = layout(tmp_path / "img", build(tars, [True, False, False], CONFIG), "t")
    store_root = tmp_path / "store"
    with pytest.raises(
        OciError, match=r"^layer sha256:\w{12}: entry '../escape': '..' in its path$"
    ):
        import_oci(ImageStore(store_root), str(lay), "t")
    assert _left_in(store_root) == []
    assert _layer_threads() == []
    assert not (tmp_path / "escape").exists()


def test_an_interrupted_import_stops_every_layer_and_leaves_nothing(tmp_path: Path) -> None:
    """An interrupt (here from the progress callback, after the first layer
    is in) stops the layers still being applied, then the build reverts."""
    tars = [
        make_tar(file("a", b"a")),
        _BIG,
        make_tar(*(file(f"opt/f{n}", b"x") for n in range(3000))),
    ]
    lay = layout(tmp_path / "img", build(tars, [False, True, True], CONFIG), "t")
    store_root = tmp_path / "store"

    def interrupt(p: ImportProgress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_oci(ImageStore(store_root), str(lay), "t", progress=interrupt)
    assert _left_in(store_root) == []
    assert not (store_root / "layers/sha256").exists() or not os.listdir(
        store_root / "layers/sha256"
    )
    assert _layer_threads() == []


@pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (make setup-vm)"
)
def test_a_layout_skopeo_wrote_is_imported(dirs: Dirs, tmp_path: Path) -> None:
    base, _, _ = _images(dirs, tmp_path)
    image = build([base, make_tar(file("srv/app", b"s\n"))], [False, False], CONFIG)
    archive = docker_archive(tmp_path / "saved.tar", [(image, ["skopeo/app:1"])])
    out = tmp_path / "skopeo-layout"
    skopeo("copy", "--quiet", f"docker-archive:{archive}", f"oci:{out}:app")
    assert json.loads((out / "index.json").read_text())["manifests"]
    p = corral(dirs, "image", "import", str(out), "app", "--tag", "skopeo:app")
    assert p.returncode == 0, p.stderr
    run = corral(dirs, "run", "--image", "skopeo:app", "--", "cat", "/srv/app")
    assert (run.returncode, run.stdout.decode()) == (0, "s\n"), run.stderr


@pytest.mark.layout  # overlayfs in a user namespace: both lanes
@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_an_opaque_directory_hides_what_is_below_for_every_sandbox(
    dirs: Dirs, tmp_path: Path, userns: bool
) -> None:
    """A layer's opaque directory (.wh..wh..opq) is marked for overlayfs
    both ways: trusted.overlay.opaque, and user.overlay.opaque, which is
    what an overlay mounted by a user-namespace root reads (userxattr).
    There, replacing a directory of the image works too (seen failing with
    EIO before)."""
    if userns and not user_xattrs_work(dirs.state):
        pytest.skip(
            "the state directory's file system takes no user.* attributes (tmpfs before"
            " Linux 6.6): a user-namespace sandbox cannot see opaque directories there"
        )
    base, _, _ = _images(dirs, tmp_path)
    below = make_tar(file("d/old", b"old\n"))
    above = make_tar(file("d/.wh..wh..opq", b""), file("d/new", b"new\n"))
    config = {**CONFIG, "config": {**CONFIG["config"], "WorkingDir": "/"}}  # type: ignore[dict-item]
    image = build([base, below, above], [False, False, False], config)
    layout(tmp_path / "opq", image, "opq")
    assert corral(dirs, "image", "import", str(tmp_path / "opq"), "opq").returncode == 0
    args = ["run", "--image", "opq", *(["--userns"] if userns else []), "--"]
    p = corral(dirs, *args, "sh", "-c", "ls /d; rm -r /etc && mkdir /etc && ls -a /etc | wc -l")
    assert (p.returncode, p.stdout.decode()) == (0, "new\n2\n"), p.stderr


def _in_a_thread(fn: Callable[[], dict[str, str]]) -> dict[str, str]:
    """*fn*'s result, run in a thread of its own (a Landlock domain is the
    thread's: this one ends with it, the test's own stays free)."""
    box: dict[str, dict[str, str]] = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()))
    t.start()
    t.join()
    return box["out"]


def _attempt(call: Callable[[], object]) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock")
def test_a_confined_extraction_thread_cannot_change_anything_outside(tmp_path: Path) -> None:
    """What confines each layer worker: beneath the given directories the
    thread creates, links, renames and removes; outside it can read but not
    create, write, truncate, remove or rename (EACCES from the kernel); other
    threads are not confined."""
    inside, outside = tmp_path / "layer", tmp_path / "host"
    inside.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")

    def probe() -> dict[str, str]:
        assert confine_writes([str(inside)])
        return {
            "make inside": _attempt(lambda: (inside / "f").write_text("x")),
            "dir inside": _attempt(lambda: (inside / "d").mkdir()),
            "link inside": _attempt(lambda: os.link(inside / "f", inside / "d" / "g")),
            "rename inside": _attempt(lambda: os.rename(inside / "d" / "g", inside / "h")),
            "remove inside": _attempt(lambda: os.unlink(inside / "h")),
            "read outside": _attempt(lambda: (outside / "passwd").read_text()),
            "make outside": _attempt(lambda: (outside / "new").write_text("x")),
            "write outside": _attempt(lambda: open(outside / "passwd", "a").close()),
            "truncate outside": _attempt(lambda: os.truncate(outside / "passwd", 0)),
            "remove outside": _attempt(lambda: os.unlink(outside / "passwd")),
            "symlink outside": _attempt(lambda: os.symlink("/", outside / "s")),
            "rename out": _attempt(lambda: os.rename(inside / "f", outside / "f")),
        }

    out = _in_a_thread(probe)
    assert out == {
        "make inside": "ok", "dir inside": "ok", "link inside": "ok", "rename inside": "ok",
        "remove inside": "ok", "read outside": "ok", "make outside": "EACCES",
        "write outside": "EACCES", "truncate outside": "EACCES", "remove outside": "EACCES",
        "symlink outside": "EACCES", "rename out": "EACCES",
    }  # fmt: skip
    assert (outside / "passwd").read_text() == "root:x:0:0\n"
    (outside / "free").write_text("the test's own thread is not confined")
