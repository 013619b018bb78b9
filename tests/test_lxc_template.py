"""The ``lxc-template`` builder, for real: Debian's own ``lxc-busybox``
(the lxc package, ``make setup-vm``) run as lxc-create runs it, and
templates written here for what lxc-busybox does not do (an init command,
device nodes, a failure, a template that blocks until it is interrupted)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rootfs import ImageStore
from rootfs._lxc import TEMPLATES_DIR
from supervisor import Runtime, SandboxSpec

from .conftest import Dirs, corral, requires_root
from .helpers import run_capture

LXC_BUSYBOX = Path(TEMPLATES_DIR) / "lxc-busybox"

pytestmark = [
    requires_root,
    pytest.mark.skipif(
        not LXC_BUSYBOX.exists(), reason=f"no {LXC_BUSYBOX} (apt-get install lxc: make setup-vm)"
    ),
]


def _template(tmp_path: Path, name: str, body: str) -> Path:
    """An executable LXC template *name* whose shell *body* has $rootfs,
    $path and $name from LXC's arguments, and "$@" the rest."""
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\nset -e\n"
        'for arg; do case "$arg" in\n'
        '  --rootfs=*) rootfs="${arg#--rootfs=}";; --path=*) path="${arg#--path=}";;\n'
        '  --name=*) name="${arg#--name=}";;\n'
        "esac; done\n" + body
    )
    script.chmod(0o755)
    return script


def _empty_store(dirs: Dirs) -> Path:
    """The test's image store, emptied: what a build leaves is all there is."""
    store = dirs.state / "images"
    shutil.rmtree(store)
    store.mkdir()
    return store


def _left(store: Path) -> list[str]:
    """Every file below *store* but the recipes' lock files, and every
    non-empty folder of scratch space or layers."""
    files = [
        str(p.relative_to(store))
        for p in store.rglob("*")
        if not p.is_dir() and p.parent.name != "locks"
    ]
    folders = [
        str(p.relative_to(store))
        for p in (store / "tmp", store / "layers" / "sha256")
        if p.is_dir() and any(p.iterdir())
    ]
    return files + folders


def test_lxc_busybox_builds_once_and_a_sandbox_runs_on_it(dirs: Dirs, runtime: Runtime) -> None:
    """The seed's flow under corral: lxc-busybox fills a rootfs that becomes
    one layer (its /dev empty: the runtime mounts its own); a sandbox runs
    on it, by name, with the image's default /bin/sh; the second build is
    the store's, no template run."""
    build = corral(dirs, "image", "build", "lxc-template", "--template", "busybox")
    assert build.returncode == 0, build.stderr.decode()
    assert build.stdout.decode().startswith("lxc-busybox: sha256:")
    said = build.stderr.decode()
    assert f"  $ {LXC_BUSYBOX} --path=" in said and " --name=busybox --rootfs=" in said
    image = ImageStore(dirs.state / "images").find("lxc-busybox")
    (layer,) = ImageStore(dirs.state / "images").lowerdirs(image)
    assert os.listdir(Path(layer) / "dev") == []
    assert os.stat(Path(layer) / "bin" / "busybox").st_size == os.stat("/bin/busybox").st_size
    # The key's inputs, and the config lxc-busybox appended to LXC's.
    assert image.source["template_sha256"] == hashlib.sha256(LXC_BUSYBOX.read_bytes()).hexdigest()
    busybox = shutil.which("busybox")
    assert busybox is not None
    assert image.source["busybox"] == hashlib.sha256(Path(busybox).read_bytes()).hexdigest()
    assert image.source["lxc_config"].startswith("lxc.rootfs.path = dir:$LXC_PATH/rootfs\n")
    assert 'lxc.uts.name = "busybox"' in image.source["lxc_config"]
    assert image.config["cmd"] == ["/bin/sh"]

    result, out, err = run_capture(
        runtime,
        SandboxSpec(
            name="lxc-busybox",
            argv=("sh", "-c", "head -1 /etc/passwd; readlink /bin/sh; test -c /dev/null &&"
                  " test -d /dev/pts && echo runtime-dev; busybox | head -1 | cut -d' ' -f1"),
            rootfs="lxc-busybox",
        ),
    )  # fmt: skip
    assert result.status == 0, err
    assert out.splitlines() == ["root:x:0:0:root:/root:/bin/sh", "busybox", "runtime-dev",
                                "BusyBox"]  # fmt: skip
    p = corral(dirs, "run", "--image", "lxc-busybox", input=b"echo $((6 * 7))\n")
    assert (p.returncode, p.stdout) == (0, b"42\n"), p.stderr

    inode = os.stat(layer).st_ino
    again = corral(dirs, "image", "build", "lxc-template", "--template", str(LXC_BUSYBOX))
    assert again.returncode == 0 and again.stdout == build.stdout, again.stderr
    assert "  $ " not in again.stderr.decode()  # found, not run
    assert os.stat(layer).st_ino == inode


def test_a_template_s_config_gives_the_image_its_defaults(dirs: Dirs, tmp_path: Path) -> None:
    """What a template appends to LXC's config and LXC would run, it runs
    under corral: lxc.init.cmd (split as LXC splits it), lxc.init.cwd,
    lxc.environment. Its options and name reach it after LXC's arguments;
    its /dev nodes are not kept; a changed script is a new recipe."""
    script = _template(
        tmp_path,
        "lxc-greeter",
        'mkdir -p "$rootfs/bin" "$rootfs/srv" "$rootfs/dev/pts" "$rootfs/etc"\n'
        'cp /bin/busybox "$rootfs/bin/busybox"; ln -s busybox "$rootfs/bin/sh"\n'
        'mknod "$rootfs/dev/null" c 1 3; mknod "$rootfs/dev/gone" c 0 0\n'
        'echo "$name $*" | sed "s#$path#PATH#g" > "$rootfs/etc/template-args"\n'
        'cat >> "$path/config" <<EOF\n'
        "lxc.init.cmd = /bin/sh -c 'echo \"\\$GREETING from \\$PWD\"; cat /etc/template-args'\n"
        "lxc.init.cwd = /srv\n"
        "lxc.environment = GREETING=hello\n"
        "EOF\n",
    )
    build = corral(dirs, "image", "build", "lxc-template", "--template", str(script),
                   "--name", "demo", "--tag", "greeter", "--", "--flavour", "plain")  # fmt: skip
    assert build.returncode == 0, build.stderr.decode()
    image = ImageStore(dirs.state / "images").find("greeter")
    (layer,) = ImageStore(dirs.state / "images").lowerdirs(image)
    assert os.listdir(Path(layer) / "dev") == []
    assert image.config["cmd"] == [
        "/bin/sh", "-c", 'echo "$GREETING from $PWD"; cat /etc/template-args',
    ]  # fmt: skip
    p = corral(dirs, "run", "--image", "greeter")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [
        "hello from /srv",
        "demo --path=PATH --name=demo --rootfs=PATH/rootfs --flavour plain",
    ]
    cached = corral(dirs, "image", "build", "lxc-template", "--template", str(script),
                    "--name", "demo", "--tag", "greeter", "--", "--flavour", "plain")  # fmt: skip
    assert cached.stdout == build.stdout and "  $ " not in cached.stderr.decode()
    with script.open("a") as f:
        f.write("# a changed script\n")
    rebuilt = corral(dirs, "image", "build", "lxc-template", "--template", str(script),
                     "--name", "demo", "--tag", "greeter", "--", "--flavour", "plain")  # fmt: skip
    assert rebuilt.returncode == 0 and "  $ " in rebuilt.stderr.decode()
    assert rebuilt.stdout != build.stdout


def test_a_bad_recipe_is_one_line(dirs: Dirs, tmp_path: Path) -> None:
    """Each key checked before anything runs: one line naming it, status 125."""
    plain = tmp_path / "lxc-plain"
    plain.write_text("#!/bin/sh\n")
    cases = {
        ("--template", "nope"): f"template: no template {TEMPLATES_DIR}/lxc-nope (Debian's",
        (): "template: expected a name like busybox",
        ("--template", str(tmp_path / "none")): f"template: no such file {tmp_path}/none",
        ("--template", str(plain)): f"template: {plain} is not executable",
        ("--template", str(tmp_path)): f"template: {tmp_path} is not a file",
        ("--template", "busybox", "--name", "a/b"): "name: expected a container name",
        ("--template", "busybox", "--", "--rootfs=/"): "options: --rootfs is one of LXC's own",
    }
    for args, expected in cases.items():
        p = corral(dirs, "image", "build", "lxc-template", *args)
        err = p.stderr.decode()
        assert p.returncode == 125 and err.count("\n") == 1, (args, err)
        assert err.startswith(f"corral: lxc-template: {expected}"), (args, err)
    p = corral(dirs, "image", "build", "debian", "--", "--flavour")
    assert p.returncode == 125 and p.stderr.decode() == (
        "corral: image build debian: arguments after '--' are an LXC template's"
        " (lxc-template only), got '--flavour'\n"
    )
    assert ImageStore(dirs.state / "images").images()[0].tags == ("busybox",)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('mkdir "$rootfs/etc"; echo "making the rootfs"\n'
         'echo "ERROR: no mirror reachable" >&2; exit 1\n',
         "failed (status 1): ERROR: no mirror reachable"),
        ('mkdir "$rootfs/etc"; mknod "$rootfs/etc/disk" b 8 0\n',
         "made a device node /etc/disk outside /dev: an image holds none"),
        ('echo "writing elsewhere"\n',
         "made nothing in its --rootfs (does it write where --rootfs says?)"),
    ],
    ids=["exit-1", "device-node", "empty"],
)  # fmt: skip
def test_a_failed_template_leaves_nothing_and_says_why(
    dirs: Dirs, tmp_path: Path, body: str, says: str
) -> None:
    """A template that fails, or makes what an image cannot hold, is one
    line (its last output line for a failure) and leaves nothing."""
    store = _empty_store(dirs)
    script = _template(tmp_path, "lxc-broken", body)
    p = corral(dirs, "image", "build", "lxc-template", "--template", str(script))
    assert p.returncode == 125
    errors = [x for x in p.stderr.decode().splitlines() if x.startswith("corral: lxc-template")]
    assert errors == [f"corral: lxc-template: {script} {says}"], p.stderr.decode()
    assert _left(store) == []


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_an_interrupted_template_leaves_nothing(dirs: Dirs, tmp_path: Path, signame: str) -> None:
    """The seed's revert: a build interrupted while its template runs (half
    a rootfs made, a tmpfs mounted in it, a command it waits for) leaves no
    layer, image, scratch, mount or process, and says so in its status."""
    sig = getattr(signal, signame)
    store = _empty_store(dirs)
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    script = _template(
        tmp_path,
        "lxc-blocking",
        'mkdir -p "$rootfs/bin" "$rootfs/mnt"; echo half > "$rootfs/half-built"\n'
        'mount -t tmpfs corral-lxc-test "$rootfs/mnt"\n'
        f"cat {fifo} &\n"  # a command it waits for, started before it says so
        "echo 'template under way'\n"
        "wait\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "image", "build", "lxc-template",
         "--template", str(script)],
        env=dirs.env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    while (line := proc.stderr.readline()) != "  template under way\n":
        assert line, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert _left(store) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(store) not in mounts and "corral-lxc-test" not in mounts
    waiting = [
        p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(fifo) in _cmdline(p)
    ]
    assert waiting == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_the_image_is_described_with_its_recipe(dirs: Dirs) -> None:
    """`corral image inspect` shows the template, its hash and LXC's config."""
    build = corral(dirs, "image", "build", "lxc-template", "--template", "busybox", "--tag", "b")
    assert build.returncode == 0, build.stderr.decode()
    shown = json.loads(corral(dirs, "image", "inspect", "b").stdout)
    assert shown["source"]["builder"] == "lxc-template"
    assert shown["source"]["template"] == str(LXC_BUSYBOX)
    assert shown["source"]["options"] == [] and shown["source"]["name"] == "busybox"
