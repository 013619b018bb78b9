"""`corral commit` and the `run` recipe (supervisor._runtime._commit): a
sandbox's writable layer becomes a layer on its image, whiteouts and opaque
directories included; a running sandbox is frozen for the copy and runs on;
a userns sandbox's files get the image's ids back; `image build run` builds
on an image (a committed one too), once; failures leave nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rootfs import StoreError
from supervisor import Runtime, SandboxError, SandboxSpec
from supervisor._runtime._commit import RunRecipe, build_run, commit
from supervisor._runtime._security import USERNS_POOL, make_security

from .conftest import Dirs, corral, requires_root
from .helpers import run_capture, user_xattrs_work
from .test_cli_up import corral_up, read_until

pytestmark = [requires_root, pytest.mark.layout]  # overlayfs on this kernel: both lanes

CHANGES = (
    "echo hello > /hello; ln /hello /hello.link; chmod 4711 /hello;"  # a file, a hard link
    " rm /etc/hostname;"  # a file of the image deleted: a whiteout
    " rm -rf /usr/sbin; mkdir /usr/sbin; echo only > /usr/sbin/only"  # replaced: opaque
)
SEES = (
    "cat /hello; stat -c '%a %h' /hello;"
    " test -e /etc/hostname && echo hostname-present || echo hostname-gone; ls /usr/sbin"
)


def _store_files(dirs: Dirs) -> list[str]:
    """The store's files, but the recipes' lock files (which stay, empty)
    and empty folders (which may stay)."""
    root = dirs.state / "images"
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if "locks" not in p.parts and (p.is_symlink() or not p.is_dir() or any(p.iterdir()))
    )


def _overlay_xattrs(layer: Path) -> dict[str, list[str]]:
    """Every trusted.overlay.* and user.overlay.* attribute in *layer*, by path."""
    out = {}
    for p in [layer, *layer.rglob("*")]:
        names = [x for x in os.listxattr(p, follow_symlinks=False) if "overlay" in x]
        if names:
            out["/" + str(p.relative_to(layer)).removeprefix(".")] = sorted(names)
    return out


def test_a_sandbox_on_a_commit_sees_what_the_committed_one_left(
    runtime: Runtime, dirs: Dirs
) -> None:
    """Written, hard-linked, deleted (a whiteout) and replaced (an opaque
    directory) in a sandbox: a sandbox on its commit sees exactly that. An
    exited sandbox whose layer is still there is committed as it is."""
    base = runtime.images.find("busybox")
    with _ended(runtime, SandboxSpec(name="maker", argv=("sh", "-c", CHANGES))) as (status, out):
        assert status == 0, out
        image = commit(runtime, "maker", "made:1")
        # A record of an older corral names no image id: its rootfs's image.
        path = dirs.run / "sandboxes" / "maker.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k != "image"}))  # fmt: skip
        assert commit(runtime, "maker", "made:2").layers[:-1] == base.layers
    assert image.tags == ("made:1",)
    assert image.layers[:-1] == base.layers and len(image.layers) == len(base.layers) + 1
    assert image.config == base.config  # the base's defaults
    assert {k: image.source[k] for k in ("builder", "base", "sandbox")} == {
        "builder": "commit",
        "base": base.id,
        "sandbox": "maker",
    }
    layer = Path(runtime.images.layer_path(image.layers[-1]))
    whiteout = (layer / "etc" / "hostname").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    # Only what a lower layer reads: no origin, impure or uuid of the
    # sandbox's mount; the opaque mark for mounts with and without userxattr.
    marks = ["trusted.overlay.opaque"]
    if user_xattrs_work(layer):
        marks.append("user.overlay.opaque")  # (not on tmpfs before Linux 6.6)
    assert _overlay_xattrs(layer) == {"/usr/sbin": marks}
    result, out, err = run_capture(runtime, SandboxSpec(name="viewer", argv=("sh", "-c", SEES),
                                                        rootfs="made:1"))  # fmt: skip
    assert result.status == 0, err
    assert out.splitlines() == ["hello", "4711 2", "hostname-gone", "only"]


def test_a_running_sandbox_is_frozen_for_the_copy_and_runs_on(runtime: Runtime, dirs: Dirs) -> None:
    """docker commit's pause: frozen while its layer is copied, thawed after
    (it answers again); one paused by its owner is copied and stays paused."""
    script = "echo one > /one; echo ready; while read x; do echo $x > /$x; echo got $x; done"
    spec = SandboxSpec(name="live", argv=("sh", "-c", script))
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        sb = runtime.create(spec, stdio=(stdin_r, out_w, out_w))
    finally:
        os.close(stdin_r)
        os.close(out_w)
    with sb, os.fdopen(out_r) as out, os.fdopen(stdin_w, "w", buffering=1) as stdin:
        assert out.readline() == "ready\n"
        seen: list[bool] = []
        commit(runtime, "live", "live:1", on_frozen=lambda: seen.append(sb.cgroup.is_frozen()))
        assert seen == [True]  # frozen during the copy
        assert not sb.cgroup.is_frozen()
        stdin.write("two\n")
        assert out.readline() == "got two\n"  # it runs on
        sb.cgroup.freeze()  # paused by its owner
        try:
            commit(runtime, "live", "live:2", on_frozen=lambda: seen.append(True))
            assert seen == [True] and sb.cgroup.is_frozen()  # not frozen again, still paused
        finally:
            sb.cgroup.thaw()
        stdin.close()
        assert sb.wait().status == 0
    result, out_text, err = run_capture(
        runtime,
        SandboxSpec(name="v", argv=("sh", "-c", "cat /one; test -e /two || echo no-two"),
                    rootfs="live:1"),
    )  # fmt: skip
    assert out_text == "one\nno-two\n", err
    result, out_text, err = run_capture(
        runtime, SandboxSpec(name="v", argv=("ls", "/one", "/two"), rootfs="live:2")
    )
    assert (result.status, out_text.split()) == (0, ["/one", "/two"]), err


_INTERRUPTED = """
import os, signal, sys
from rootfs import reverting
from supervisor import Runtime
from supervisor._runtime._commit import commit
runtime = Runtime(state_dir=sys.argv[1], run_dir=sys.argv[2])
with reverting():
    commit(runtime, "live", "x:1", on_frozen=lambda: os.kill(os.getpid(), getattr(signal, sys.argv[3])))
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupted_commit_leaves_nothing_and_the_sandbox_running(
    runtime: Runtime, dirs: Dirs, signame: str
) -> None:
    """Interrupted while the sandbox is frozen: the store is as it was, and
    the sandbox is thawed and runs on."""
    before = _store_files(dirs)
    spec = SandboxSpec(name="live", argv=("sh", "-c", "echo ready; read x; echo got $x"))
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        sb = runtime.create(spec, stdio=(stdin_r, out_w, out_w))
    finally:
        os.close(stdin_r)
        os.close(out_w)
    with sb, os.fdopen(out_r) as out, os.fdopen(stdin_w, "w", buffering=1) as stdin:
        assert out.readline() == "ready\n"
        p = subprocess.run(
            [sys.executable, "-c", _INTERRUPTED, str(dirs.state), str(dirs.run), signame],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode != 0 and ("interrupted by" in p.stderr or "KeyboardInterrupt"
                                      in p.stderr), p.stderr  # fmt: skip
        assert not sb.cgroup.is_frozen()
        stdin.write("more\n")
        assert out.readline() == "got more\n"
        assert sb.wait().status == 0
    assert _store_files(dirs) == before


def test_what_cannot_be_committed_is_refused_in_one_line(
    runtime: Runtime, dirs: Dirs, tmp_path: Path
) -> None:
    """An unknown sandbox, a sandbox on a directory, a bad image name: one
    line each, and nothing in the store."""
    before = _store_files(dirs)
    with pytest.raises(SandboxError, match=r"^no sandbox 'ghost' in "):
        commit(runtime, "ghost", "x:1")
    p = corral(dirs, "commit", "ghost", "x:1")
    assert p.returncode == 125 and p.stderr.decode().count("\n") == 1, p.stderr
    p = corral(dirs, "commit", "../etc", "x:1")
    assert p.returncode == 125 and "sandbox: expected 1-63 letters" in p.stderr.decode()
    root = runtime.resolve_rootfs("busybox")
    with _ended(runtime, SandboxSpec(name="ondir", argv=("true",), rootfs=root)):
        with pytest.raises(SandboxError) as info:
            commit(runtime, "ondir", "x:1")
        assert str(info.value) == (
            f"sandbox 'ondir' runs on the directory {root!r}, not an image of the store:"
            " only a sandbox on an image can be committed (its layers are the new image's base)"
        )
    with (
        _ended(runtime, SandboxSpec(name="onimage", argv=("true",))),
        pytest.raises(StoreError, match="image name: expected a name"),
    ):
        commit(runtime, "onimage", "../x")
    # A device node made with CAP_MKNOD (a whiteout is one too, 0:0: that one is fine).
    with _ended(
        runtime,
        SandboxSpec(
            name="mknod",
            argv=("sh", "-c", "mknod -m 666 /disk b 8 0; rm /etc/hostname"),
            security=make_security(userns=False),  # a user namespace cannot make nodes
        ),
    ):
        with pytest.raises(SandboxError) as info:
            commit(runtime, "mknod", "x:1")
        assert str(info.value) == (
            "sandbox 'mknod': its writable layer holds a block device /disk (8:0),"
            " which an image may not: remove it first"
        )
    assert _store_files(dirs) == before


def test_a_userns_sandbox_s_files_get_the_image_s_ids_back(runtime: Runtime, dirs: Dirs) -> None:
    """Its files are owned by host ids of its range in its layer; in the
    committed layer by the ids it saw, set-id bits kept."""
    base = USERNS_POOL[0]
    script = "echo x > /new; chown 1000:1001 /new; chmod 4755 /new; rm /etc/hostname"
    spec = SandboxSpec(name="inns", argv=("sh", "-c", script), security=make_security(userns=True))
    with _ended(runtime, spec) as (status, out):
        assert status == 0, out
        upper = dirs.state / "sandboxes" / "inns" / "upper"
        assert (upper / "new").stat().st_uid == base + 1000
        image = commit(runtime, "inns", "inns:1")
    layer = Path(runtime.images.layer_path(image.layers[-1]))
    owners = {
        "/" + str(p.relative_to(layer)).removeprefix("."): (p.lstat().st_uid, p.lstat().st_gid)
        for p in [layer, *layer.rglob("*")]
    }
    assert owners == {"/": (0, 0), "/new": (1000, 1001), "/etc": (0, 0), "/etc/hostname": (0, 0)}
    assert stat.S_IMODE((layer / "new").stat().st_mode) == 0o4755
    check = "ls -n /new; test -e /etc/hostname || echo gone"
    result, out, err = run_capture(
        runtime, SandboxSpec(name="after", argv=("sh", "-c", check), rootfs="inns:1")
    )
    assert result.status == 0, err
    assert out.split()[2:4] == ["1000", "1001"] and out.splitlines()[-1] == "gone"


def test_the_run_recipe_builds_once_on_an_image_and_on_a_commit(dirs: Dirs) -> None:
    """`image build run --from IMAGE --run CMD`: CMD's changes as a layer on
    IMAGE; the same recipe again is found in the store (CMD does not run);
    a committed image is a base like any other."""
    build = ("image", "build", "run", "--from", "busybox", "--env", "WHO=builder", "--run",
             'echo "built by $WHO" > /built; rm /etc/hostname; echo running')  # fmt: skip
    first = corral(dirs, *build, "--tag", "built:1")
    assert first.returncode == 0, first.stderr
    assert first.stderr.decode() == "  running\n"
    name, image_id = first.stdout.decode().strip().split(": ")
    assert name == "built:1"
    layers = sorted(os.listdir(dirs.state / "images" / "layers" / "sha256"))
    again = corral(dirs, *build, "--tag", "built:again")
    assert again.returncode == 0, again.stderr
    assert again.stderr.decode() == ""  # found, not run
    assert again.stdout.decode() == f"built:1, built:again: {image_id}\n"
    assert sorted(os.listdir(dirs.state / "images" / "layers" / "sha256")) == layers
    p = corral(dirs, "run", "--image", "built:1", "--", "sh", "-c",
               "cat /built; test -e /etc/hostname || echo gone")  # fmt: skip
    assert p.stdout.decode() == "built by builder\ngone\n", p.stderr
    # A commit as the base of a recipe.
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "--name", "box", "--image", "built:1", "--",
         "sh", "-c", "echo committed > /committed; echo ready; read x"],
        env=dirs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        p = corral(dirs, "commit", "box", "box:1")
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode().startswith("box:1: sha256:")
    finally:
        proc.communicate(b"go\n", timeout=30)
    assert proc.returncode == 0
    p = corral(dirs, "image", "build", "run", "--from", "box:1", "--run", "echo on > /on",
               "--tag", "on:1")  # fmt: skip
    assert p.returncode == 0, p.stderr
    shown = json.loads(corral(dirs, "image", "inspect", "on:1").stdout)
    assert len(shown["layers"]) == 4 and shown["source"]["builder"] == "run"
    p = corral(dirs, "run", "--image", "on:1", "--", "cat", "/built", "/committed", "/on")
    assert p.stdout.decode() == "built by builder\ncommitted\non\n", p.stderr


def test_a_failing_run_recipe_says_why_and_leaves_nothing(runtime: Runtime, dirs: Dirs) -> None:
    """CMD's status and last lines, one build's worth of nothing left: no
    layer, image or name, no sandbox (the fixture checks those)."""
    before = _store_files(dirs)
    p = corral(dirs, "image", "build", "run", "--from", "busybox", "--tag", "bad:1",
               "--run", "echo x > /x; echo first; echo oops >&2; exit 3")  # fmt: skip
    assert p.returncode == 125
    assert p.stderr.decode().splitlines() == [
        "  first",
        "  oops",
        "corral: run: 'echo x > /x; echo first; echo oops >&2; exit 3' on busybox failed with"
        " status 3; its last lines:",
        "corral:   first",
        "corral:   oops",
    ]
    assert _store_files(dirs) == before
    for args, message in (
        (["--from", "busybox"], "expected --from IMAGE and --run 'COMMAND'"),
        (["--from", "nothing:1", "--run", "true"], "run: from: no image named 'nothing:1'"),
        (["--from", "busybox", "--run", "true", "--env", "1=x"], "run: env: expected KEY=VALUE"),
        (["--from", "busybox", "--run", "true", "--tag", "../x"], "image name: expected a name"),
    ):
        p = corral(dirs, "image", "build", "run", *args)
        assert p.returncode == 125 and p.stderr.decode().count("\n") == 1, p.stderr
        assert message in p.stderr.decode()
    with pytest.raises(Exception, match="run: run: expected a shell command"):
        build_run(runtime, RunRecipe(base="busybox", command=" "))
    assert _store_files(dirs) == before


def test_an_interrupted_run_recipe_leaves_nothing(dirs: Dirs) -> None:
    """SIGTERM while the command runs: the build stops (128+15), its sandbox
    and scratch go (the fixture checks the sandbox's leftovers)."""
    before = _store_files(dirs)
    build = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "image", "build", "run", "--from", "busybox",
         "--run", "echo x > /x; echo started; exec sleep 1000", "--tag", "never:1"],
        env=dirs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert build.stderr is not None and build.stderr.readline() == "  started\n"
        build.terminate()
        _, err = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert build.returncode == 128 + 15, err
    assert _store_files(dirs) == before


def test_a_fleet_s_sandbox_is_committed_as_it_runs(dirs: Dirs, tmp_path: Path) -> None:
    """`corral commit web-0 IMAGE` beside `corral up`: the fleet's sandbox
    is frozen for the copy and runs on (the supervisor sees nothing amiss)."""
    fleet = '[[sandbox]]\nname = "web"\ncommand = "exec sleep 1000"\n'
    with corral_up(dirs, tmp_path, text=fleet) as up:
        assert up.stdout is not None
        read_until(up.stdout, lambda r: r["event"] == "started" and r.get("sandbox") == "web-0")
        p = corral(dirs, "exec", "web-0", "--", "sh", "-c", "echo fleet > /made")
        assert p.returncode == 0, p.stderr
        p = corral(dirs, "commit", "web-0", "web:1")
        assert p.returncode == 0, p.stderr
        p = corral(dirs, "commit", "web", "web:2")  # a fleet's sandbox: its first instance
        assert p.returncode == 0, p.stderr
        p = corral(dirs, "exec", "web-0", "--", "cat", "/made")
        assert p.stdout == b"fleet\n", p.stderr  # thawed: it answers
        p = corral(dirs, "image", "rm", "busybox")  # the fleet's base, still in use
        assert p.returncode == 125, p.stderr
        up.terminate()
        _, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
    for image in ("web:1", "web:2"):
        p = corral(dirs, "run", "--image", image, "--", "cat", "/made")
        assert p.stdout == b"fleet\n", p.stderr


@contextmanager
def _ended(runtime: Runtime, spec: SandboxSpec) -> Iterator[tuple[int, str]]:
    """Run *spec* to its end, its writable layer kept until the block ends
    (a sandbox that exited and is not removed yet): its status and output."""
    with (
        tempfile.TemporaryFile() as out,
        open(os.devnull, "rb") as null,
        runtime.create(spec, stdio=(null.fileno(), out.fileno(), out.fileno())) as sb,
    ):
        status = sb.wait().status
        out.seek(0)
        yield status, out.read().decode()
