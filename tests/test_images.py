"""The image store (rootfs._store): content-addressed layers and images,
atomic and reverted builds, one build per recipe at a time, names, rm
refused while a sandbox uses an image, prune; and sandboxes on images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rootfs import (
    BuildContext,
    Image,
    ImageStore,
    StoreError,
    busybox_image,
    layer_id_of_recipe,
)
from supervisor import Runtime

from .conftest import Dirs, corral, requires_root

pytestmark = [requires_root]


def _files(root: Path) -> list[str]:
    """Every file and directory below *root*, but the recipes' lock files
    (which stay, empty, as a lock must)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.parent.name != "locks" and p.name != "locks"
    )


def _layer(build: BuildContext, recipe: dict[str, object], files: dict[str, str]) -> str:
    """A layer of *files* (path: text) made in *build*; its id."""
    layer = layer_id_of_recipe(recipe)
    work = Path(build.scratch("test"))
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    build.commit_layer(layer, str(work))
    return layer


CONFIG = {"env": [], "entrypoint": None, "cmd": ["/bin/sh"], "workdir": "/", "user": ""}


def test_busybox_is_built_once_into_the_store(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    first = busybox_image(store)
    assert first.tags == ("busybox",) and len(first.layers) == 1
    (lower,) = store.lowerdirs(first)
    assert os.path.isfile(os.path.join(lower, "bin/busybox"))
    assert os.readlink(os.path.join(lower, "var/run")) == "../run"
    again = busybox_image(store)
    assert again.id == first.id
    assert [i.id for i in store.images()] == [first.id]
    assert store.find("busybox").id == store.find(first.short_id).id == first.id
    assert _files(tmp_path / "images" / "tmp") == []


def test_two_images_on_one_base_store_it_once(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = busybox_image(store)
    made = []
    for n in (1, 2):
        with store.building(f"test-{n}") as build:
            top = _layer(build, {"test": n}, {f"etc/app{n}": "x"})
            made.append(build.commit_image([*base.layers, top], CONFIG, {"key": n}, f"app{n}"))
    assert made[0].layers[0] == made[1].layers[0] == base.layers[0]
    assert len(os.listdir(tmp_path / "images" / "layers" / "sha256")) == 3
    assert store.lowerdirs(made[0])[-1] == store.lowerdirs(base)[0]  # the base is lowest


# A build in a child process that is interrupted at a chosen point: by
# SIGINT, SIGTERM or SIGHUP (which `reverting` turns into an interruption).
_INTERRUPTED = """
import os, signal, sys
from pathlib import Path
from rootfs import ImageStore, layer_id_of_recipe, reverting
root, signame, point = sys.argv[1], sys.argv[2], sys.argv[3]
store = ImageStore(root)
def hit(where):
    if where == point:
        os.kill(os.getpid(), getattr(signal, signame))
with reverting(), store.building("k") as build:
    hit("start")
    work = build.scratch("layer")
    Path(work, "file").write_text("x")
    hit("scratch")
    layer = layer_id_of_recipe({"k": 1})
    build.commit_layer(layer, work)
    hit("layer")
    build.commit_image([layer], {}, {"key": "k"}, "name")
    hit("never")
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("point", ["start", "scratch", "layer"])
def test_an_interrupted_build_leaves_nothing(tmp_path: Path, signame: str, point: str) -> None:
    """The seed's revert, for every build: interrupted anywhere before its
    image is recorded, a build leaves no layer, image, name or scratch."""
    root = tmp_path / "images"
    p = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED, str(root), signame, point],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode != 0, p.stderr
    assert "interrupted by" in p.stderr or "KeyboardInterrupt" in p.stderr, p.stderr
    # Empty folders may stay; nothing in them.
    assert [f for f in _files(root) if f not in ("tmp", "layers", "layers/sha256")] == []
    assert ImageStore(root).images() == []


def test_what_a_killed_build_left_is_swept_by_the_next(tmp_path: Path) -> None:
    root = tmp_path / "images"
    code = _INTERRUPTED.replace("os.kill(os.getpid(), getattr(signal, signame))", "os._exit(9)")
    p = subprocess.run(
        [sys.executable, "-c", code, str(root), "SIGKILL", "scratch"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 9
    assert len(list((root / "tmp").iterdir())) == 2  # its scratch and its lock
    with ImageStore(root).building("other"):
        pass
    assert list((root / "tmp").iterdir()) == []


_BUILD_BUSYBOX = """
import sys
from rootfs import ImageStore, busybox_image
print(busybox_image(ImageStore(sys.argv[1])).id)
"""


def test_concurrent_builds_of_one_image_build_it_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_BUSYBOX, str(root)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(ids) == 1
    assert len(os.listdir(root / "layers" / "sha256")) == 1
    assert list((root / "tmp").iterdir()) == []


def test_names_rm_and_prune(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = busybox_image(store)
    with store.building("app") as build:
        top = _layer(build, {"app": 1}, {"app": "x"})
        app = build.commit_image([*base.layers, top], CONFIG, {"key": "app"}, "app:1")
    store.tag(app, "app:latest")
    with pytest.raises(StoreError, match="used by sandbox 'web-0' and 1 more"):
        store.remove("app:1", lambda i: ["web-0", "web-1"] if i.id == app.id else [])
    store.remove("app:1")  # a name: the image keeps its other one
    assert store.find("app:latest").id == app.id
    with pytest.raises(StoreError, match="no image named 'app:1'"):
        store.find("app:1")
    store.remove("app:latest")
    assert [i.id for i in store.images()] == [base.id]
    removed = store.prune()
    assert removed["layers"] == [top] and removed["images"] == []
    assert os.listdir(tmp_path / "images" / "layers" / "sha256") == [base.layers[0][7:]]
    with pytest.raises(StoreError, match="image name: expected a name"):
        store.tag(base, "../x")


def test_the_cli_lists_inspects_and_refuses_to_remove_a_used_image(dirs: Dirs) -> None:
    """`corral image`: ls (table and JSON), inspect, and rm refused with
    the name of the sandbox that runs on the image (one line, 125)."""
    store = ImageStore(dirs.state / "images")
    base = busybox_image(store)
    rows = [json.loads(x) for x in corral(dirs, "image", "ls", "--json").stdout.splitlines()]
    assert [(r["id"], r["tags"]) for r in rows] == [(base.id, ["busybox"])]
    assert "busybox" in corral(dirs, "image", "ls").stdout.decode()
    shown = json.loads(corral(dirs, "image", "inspect", "busybox").stdout)
    assert shown["layers"] == list(base.layers) and shown["lowerdirs"] == store.lowerdirs(base)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "--name", "user", "--", "sh", "-c",
         "echo ready; read x"],
        env=dirs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        p = corral(dirs, "image", "rm", "busybox")
        assert p.returncode == 125
        assert p.stderr.decode() == (
            "corral: image 'busybox' is used by sandbox 'user': remove the sandbox first\n"
        )
    finally:
        proc.communicate(b"go\n", timeout=30)
    p = corral(dirs, "image", "inspect", "nope")
    assert p.returncode == 125 and p.stderr.decode().count("\n") == 1


@pytest.mark.layout  # overlayfs with several lower layers and a whiteout: both lanes
def test_a_sandbox_runs_on_a_layered_image(dirs: Dirs) -> None:
    """rootfs = an image of the store: its layers stacked, top first, a
    whiteout in the top one hiding a file of the base."""
    store = ImageStore(dirs.state / "images")
    base = busybox_image(store)
    with store.building("layered") as build:
        layer = layer_id_of_recipe({"layered": 1})
        work = Path(build.scratch("layered"))
        (work / "hello").write_text("from the top layer\n")
        (work / "etc").mkdir()
        os.mknod(work / "etc" / "hostname", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
        build.commit_layer(layer, str(work))
        build.commit_image([*base.layers, layer], CONFIG, {"key": "layered"}, "layered:1")
    p = corral(
        dirs, "run", "--rootfs", "layered:1", "--", "sh", "-c",
        "cat /hello; test -e /etc/hostname && echo present || echo hidden; busybox true",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().split("\n")[:2] == ["from the top layer", "hidden"]
    bad = corral(dirs, "run", "--rootfs", "no-such-image", "--", "true")
    assert bad.returncode == 125
    assert "expected 'busybox', an image of the store (corral image ls) or a directory" in (
        bad.stderr.decode()
    )


def _tall_image(dirs: Dirs, count: int) -> str:
    """An image of busybox and *count* layers on it, layer i holding
    /layers/i (and hiding /layers/{i-1}'s sibling /gone/i-1 with a
    whiteout); its name."""
    store = ImageStore(dirs.state / "images")
    base = busybox_image(store)
    layers = list(base.layers)
    with store.building(f"tall-{count}") as build:
        for i in range(count):
            layer = layer_id_of_recipe({"tall": count, "i": i})
            work = Path(build.scratch("tall"))
            (work / "layers").mkdir()
            (work / "layers" / str(i)).write_text(f"{i}\n")
            (work / "gone").mkdir()
            (work / "gone" / str(i)).write_text("x\n")
            if i:
                os.mknod(work / "gone" / str(i - 1), 0o600 | 0o020000, os.makedev(0, 0))
            build.commit_layer(layer, str(work))
            layers.append(layer)
        # The store lists layers bottom first.
        build.commit_image(layers, CONFIG, {"key": f"tall-{count}"}, f"tall:{count}")
    return f"tall:{count}"


@pytest.mark.layout  # overlayfs and mount options: both lanes
@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_an_image_of_sixty_layers_is_mounted_through_short_names(dirs: Dirs, userns: bool) -> None:
    """mount(2) takes one page of options, which some 40 layers' paths
    fill: the layers are then named by short links (or, in a user
    namespace, by the numbers of their idmapped mounts), as Docker's
    overlay2 does. Every layer is there, whiteouts work, and a sandbox in a
    user namespace sees them owned by its own root."""
    image = _tall_image(dirs, 60)
    probe = (
        "cat /layers/0 /layers/59; ls /gone; stat -c %u /layers/30;"
        " grep '^overlay / ' /proc/mounts | sed 's/.*lowerdir=//; s/,.*//' | cut -d: -f1-3"
    )
    args = ["run", "--image", image, *(["--userns"] if userns else []), "--", "sh", "-c", probe]
    p = corral(dirs, *args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == ["0", "59", "59", "0", "0:1:2"]


@pytest.mark.layout
def test_a_user_namespace_sandbox_on_a_layered_image_from_shifted_copies(
    dirs: Dirs, runtime: Runtime
) -> None:
    """Where the layers' file system cannot be idmapped, each layer is a
    shifted copy (cached per layer and range): forced here by telling the
    runtime idmapping failed on this device, as it learns on a kernel that
    refuses it."""
    from supervisor import SandboxSpec
    from supervisor._runtime import _sandbox
    from supervisor._runtime._security import make_security

    from .helpers import run_capture

    image = _tall_image(dirs, 3)
    layers = runtime.resolve_rootfs(image).split(":")
    devices = {os.stat(p).st_dev for p in layers}
    saved = {d: _sandbox._IDMAP_WORKS.get(d) for d in devices}
    try:
        for d in devices:
            _sandbox._IDMAP_WORKS[d] = False
        spec = SandboxSpec(
            name="shifted",
            argv=("sh", "-c", "cat /layers/2; ls /gone; stat -c %u /layers/1; id -u"),
            rootfs=image,
            security=make_security(userns=True),
        )
        result, out, err = run_capture(runtime, spec)
    finally:
        for d, v in saved.items():
            if v is None:
                _sandbox._IDMAP_WORKS.pop(d, None)
            else:
                _sandbox._IDMAP_WORKS[d] = v
    assert result.status == 0, err
    assert out.splitlines() == ["2", "2", "0", "0"]
    assert len(os.listdir(dirs.state / "rootfs-userns")) == 4  # busybox and three layers


def test_an_image_is_described_as_plain_data(tmp_path: Path) -> None:
    img = Image("sha256:" + "a" * 64, ("sha256:" + "b" * 64,), {}, {"builder": "x"}, 1.0, ("n",))
    assert img.short_id == "a" * 12
    assert img.describe()["tags"] == ["n"]


def test_an_image_s_defaults_apply_unless_the_sandbox_says_otherwise(dirs: Dirs) -> None:
    """An image's Env, WorkingDir and Entrypoint + Cmd are a sandbox's
    defaults: `corral run --image X` with no command runs the image's;
    `--env` wins over the image's."""
    store = ImageStore(dirs.state / "images")
    base = busybox_image(store)
    with store.building("defaults") as build:
        top = _layer(build, {"defaults": 1}, {"srv/.keep": ""})
        config = {
            "env": ["FOO=from-image", "PATH=/bin:/usr/bin"],
            "entrypoint": ["sh", "-c"],
            "cmd": ['echo "$FOO $PWD $PATH"'],
            "workdir": "/srv",
            "user": "",
        }
        build.commit_image([*base.layers, top], config, {"key": "defaults"}, "defaults:1")
    p = corral(dirs, "run", "--image", "defaults:1")
    assert (p.returncode, p.stdout.decode()) == (0, "from-image /srv /bin:/usr/bin\n"), p.stderr
    p = corral(dirs, "run", "--image", "defaults:1", "--env", "FOO=mine", "--", "sh", "-c",
               'echo "$FOO $PWD"')  # fmt: skip
    assert (p.returncode, p.stdout.decode()) == (0, "mine /srv\n"), p.stderr
    p = corral(dirs, "run", "--image", "busybox")
    assert p.returncode == 125 and "expected a command after '--'" in p.stderr.decode()


def test_the_busybox_key_written_out_is_its_recipe_s() -> None:
    """The busybox image's key is written out in the source (hashing it at
    import would cost every start hashlib); it must be its recipe's."""
    from rootfs import _busybox

    assert "busybox/" + layer_id_of_recipe(_busybox.RECIPE) == _busybox._KEY


def test_a_tag_s_file_name_is_quoted_as_urllib_would() -> None:
    """Tags name files by ``urllib.parse.quote(tag, safe="")``; the store
    quotes them itself (urllib is not imported on a start's path) and must
    give the same names, or a store written before would lose its tags."""
    import random
    import string
    import urllib.parse

    from rootfs._store import _quote, _unquote

    rng = random.Random(19)
    alphabet = string.printable + "éßü€🙂"
    tags = ["busybox", "a/b:c", "x y", "~._-", "%41", ""] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24))) for _ in range(2000)
    ]
    for tag in tags:
        assert _quote(tag) == urllib.parse.quote(tag, safe=""), tag
        assert _unquote(_quote(tag)) == tag
