"""What a sandbox mounts besides its root, and who it runs as: host
directories and named volumes (read-only or read-write, targets resolved
inside the root), tmpfs, a read-only root, ``user``; with one clear line
and nothing left behind for every refusal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rootfs import ImageStore, busybox_image, layer_id_of_recipe
from supervisor import Runtime, SandboxError, SandboxSpec, SpecError
from supervisor._core._fleet import FleetError, parse_fleet
from supervisor._runtime._mounts import Mount, parse_tmpfs, parse_user, parse_volume
from supervisor._runtime._security import make_security

from .conftest import Dirs, corral, requires_root
from .helpers import run_capture

pytestmark = [requires_root, pytest.mark.layout]  # mounts: the VM lane runs these too


def _spec(argv: str, **kw: object) -> SandboxSpec:
    return SandboxSpec(name="vol", argv=("sh", "-c", argv), **kw)  # type: ignore[arg-type]


def _run(runtime: Runtime, argv: str, **kw: object) -> tuple[int, str, str]:
    result, out, err = run_capture(runtime, _spec(argv, **kw))
    return result.status, out, err


def _host(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("from the host\n")
    return host


# -- the grammar ------------------------------------------------------------


def test_volume_tmpfs_and_user_text_is_checked_naming_the_field() -> None:
    assert parse_volume("/srv/data:/data:ro") == Mount("bind", "/srv/data", "/data", True)
    assert parse_volume("cache:/var/cache/x") == Mount("volume", "cache", "/var/cache/x")
    assert parse_volume("/srv//data/./:/data/") == Mount("bind", "/srv/data", "/data")
    tmp = parse_tmpfs("/run:size=16M,mode=755,noexec")
    assert (tmp.size, tmp.mode, tmp.noexec, tmp.read_only) == (16 << 20, 0o755, True, False)
    assert parse_user("1000:1000") == "1000:1000" and parse_user("app:staff") == "app:staff"
    bad = {
        "/srv:data": "expected an absolute target path",
        "/srv": "expected /HOST/PATH:/TARGET",
        "a/b:/data": "expected /HOST/PATH:/TARGET",
        "/srv:/data:rx": "expected the option ro or rw",
        "/srv/../etc:/data": "without '..'",
        "/srv:/data/../etc": "without '.' or '..'",
        "/srv:/": "the target cannot be /",
        "/srv:/proc/x": "corral mounts /proc itself",
        "/srv:/dev": "corral mounts /dev itself",
    }
    for text, message in bad.items():
        with pytest.raises(SpecError, match=message) as info:
            parse_volume(text)
        assert str(info.value).startswith("volumes: ")
    with pytest.raises(SpecError, match=r"^tmpfs: /t: expected options size="):
        parse_tmpfs("/t:uid=0")
    with pytest.raises(SpecError, match=r"^tmpfs: /t: expected an octal mode"):
        parse_tmpfs("/t:mode=9")
    for text in ("", ":1", "1:", "a b", "99999999999"):
        with pytest.raises(SpecError, match=r"^user: "):
            parse_user(text)
    with pytest.raises(SpecError, match=r"/data is the target of two mounts"):
        SandboxSpec(
            name="x",
            argv=("true",),
            mounts=(parse_volume("/a:/data"), parse_tmpfs("/data")),
        )


def test_fleet_keys_for_volumes_tmpfs_user_and_a_read_only_root() -> None:
    fleet = parse_fleet(
        {
            "defaults": {"volumes": ["/srv/shared:/shared:ro", "logs:/var/log"]},
            "sandbox": [
                {
                    "name": "web",
                    "command": ["true"],
                    "volumes": ["/srv/web:/var/log"],
                    "tmpfs": ["/tmp:size=8M"],
                    "user": "nobody",
                    "read_only_rootfs": True,
                }
            ],
        }
    )
    spec = fleet.sandboxes[0].spec(0)
    # The sandbox's own /var/log replaces the defaults'; parents first.
    assert [m.describe() for m in spec.mounts] == [
        "/srv/shared:/shared:ro",
        f"tmpfs:/tmp:size={8 << 20}".removeprefix("tmpfs:"),
        "/srv/web:/var/log",
    ]
    assert spec.user == "nobody" and spec.read_only
    with pytest.raises(FleetError) as info:
        parse_fleet(
            {
                "sandbox": [
                    {
                        "name": "w",
                        "command": ["true"],
                        "volumes": "/a:/b",
                        "tmpfs": ["/proc"],
                        "user": "",
                        "read_only_rootfs": "yes",
                    }
                ]
            }
        )
    assert info.value.problems == [
        "sandbox 'w': volumes: expected a list of strings, got '/a:/b'",
        "sandbox 'w': tmpfs: /proc: corral mounts /proc itself; choose another",
        "sandbox 'w': user: expected UID[:GID] or NAME[:GROUP], got ''",
        "sandbox 'w': read_only_rootfs: expected true or false, got 'yes'",
    ]


# -- volumes ------------------------------------------------------------------


def test_a_host_directory_read_only_and_read_write(runtime: Runtime, tmp_path: Path) -> None:
    host = _host(tmp_path)
    status, out, err = _run(
        runtime,
        "cat /ro/f; echo x > /ro/new || echo refused; echo written > /rw/new;"
        " grep -E ' /(ro|rw) ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1",
        mounts=(parse_volume(f"{host}:/ro:ro"), parse_volume(f"{host}:/rw")),
    )
    assert status == 0, err
    assert out == "from the host\nrefused\n/ro ro\n/rw rw\n"
    assert "Read-only file system" in err
    assert (host / "new").read_text() == "written\n"


def test_a_read_only_volume_has_no_writable_submount(runtime: Runtime, tmp_path: Path) -> None:
    """A bind mount copies the host's tree recursively; read-only is set on
    every mount of it, not only on the top one (MS_REMOUNT's trap)."""
    from .helpers import small_tmpfs

    host = _host(tmp_path)
    with small_tmpfs(host / "sub", "1m"):
        status, out, err = _run(
            runtime,
            "ls /data/sub >/dev/null && echo x > /data/sub/y || echo refused",
            mounts=(parse_volume(f"{host}:/data:ro"),),
        )
        assert not (host / "sub" / "y").exists()
    assert status == 0 and out == "refused\n", err


def test_a_named_volume_outlives_its_sandboxes(runtime: Runtime, dirs: Dirs) -> None:
    vol = (parse_volume("cache:/var/cache/app"),)
    assert _run(runtime, "echo one >> /var/cache/app/log", mounts=vol)[0] == 0
    status, out, _ = _run(
        runtime, "echo two >> /var/cache/app/log; cat /var/cache/app/log", mounts=vol
    )
    assert (status, out) == (0, "one\ntwo\n")
    path = Path(runtime.volume_path("cache"))
    assert path == dirs.state / "volumes" / "cache"
    assert (path / "log").read_text() == "one\ntwo\n"


def test_a_file_can_be_mounted_on_a_file(runtime: Runtime, tmp_path: Path) -> None:
    host = _host(tmp_path)
    status, out, err = _run(
        runtime,
        "cat /etc/app.conf; echo x > /etc/app.conf || echo refused",
        mounts=(parse_volume(f"{host / 'f'}:/etc/app.conf:ro"),),
    )
    assert (status, out) == (0, "from the host\nrefused\n"), err


def test_symlinked_targets_never_lead_out_of_the_root(
    runtime: Runtime, dirs: Dirs, tmp_path: Path
) -> None:
    """An image's symlinks (absolute, relative with '..', dangling, to /,
    to /proc, a loop) are resolved inside the sandbox's root: the host's
    files are never mounted on, and nothing is made outside."""
    host = _host(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    lower = ImageStore(dirs.state / "images").lowerdirs(
        busybox_image(ImageStore(dirs.state / "images"))
    )
    import shutil

    shutil.copytree(lower[0], root, symlinks=True)
    (root / "abs").symlink_to(outside / "abs")
    (root / "rel").symlink_to("../../../../../../../.." + str(outside / "rel"))
    there = tmp_path / "there"  # exists on the host, not inside
    there.mkdir()
    (root / "there").symlink_to(str(there))
    status, out, err = _run(
        runtime,
        "cat /abs/f /rel/f /there/f",
        rootfs=str(root),
        mounts=(
            parse_volume(f"{host}:/abs"),
            parse_volume(f"{host}:/rel"),
            parse_volume(f"{host}:/there"),
        ),
    )
    assert (status, out) == (0, "from the host\n" * 3), err
    # Made inside the sandbox's writable layer, not on the host.
    assert os.listdir(outside) == [] and os.listdir(there) == []
    for link, message in (
        ("/", "leads to its root"),
        ("/proc/self", "leads into /proc or /sys"),
        ("bad", "Too many levels of symbolic links"),
    ):
        (root / "bad").unlink(missing_ok=True)
        (root / "bad").symlink_to(link)
        with pytest.raises(SandboxError, match=f"^sandbox 'vol': volumes: /bad.*{message}"):
            run_capture(
                runtime, _spec("true", rootfs=str(root), mounts=(parse_volume(f"{host}:/bad"),))
            )
    (root / "bad").unlink()
    (root / "bad").mkdir()
    with pytest.raises(SandboxError, match="/bad in the sandbox is not a file, as its source is"):
        run_capture(
            runtime, _spec("true", rootfs=str(root), mounts=(parse_volume(f"{host / 'f'}:/bad"),))
        )


def test_a_missing_host_path_is_refused_with_nothing_left(runtime: Runtime, dirs: Dirs) -> None:
    with pytest.raises(SpecError, match=r"^volumes: /nowhere:/data: .*No such file"):
        runtime.create(_spec("true", mounts=(parse_volume("/nowhere:/data"),)))
    assert os.listdir(dirs.state / "sandboxes") == []  # (dirs checks cgroups and mounts too)


def test_tmpfs_size_mode_and_noexec(runtime: Runtime) -> None:
    status, out, err = _run(
        runtime,
        "stat -c %a /t; grep ' /t ' /proc/mounts | cut -d' ' -f4;"
        " cp /bin/busybox /x/b && /x/b true || echo noexec;"
        " dd if=/dev/zero of=/t/big bs=1k count=2048 2>/dev/null || echo full",
        mounts=(parse_tmpfs("/t:size=1M,mode=750"), parse_tmpfs("/x:noexec")),
    )
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "750"
    assert "size=1024k" in lines[1] and "nosuid" in lines[1] and "nodev" in lines[1]
    assert lines[2:] == ["noexec", "full"]


def test_a_read_only_root_with_writable_volumes(runtime: Runtime, tmp_path: Path) -> None:
    host = _host(tmp_path)
    status, out, err = _run(
        runtime,
        "touch /x || echo root-ro; touch /tmp/ok && echo tmpfs-rw; touch /data/ok && echo volume-rw",
        read_only=True,
        mounts=(parse_tmpfs("/tmp"), parse_volume(f"{host}:/data")),
    )
    assert (status, out) == (0, "root-ro\ntmpfs-rw\nvolume-rw\n"), err


def test_a_volume_in_a_user_namespace(runtime: Runtime, dirs: Dirs) -> None:
    """A named volume made for a userns sandbox belongs to its root (a host
    id of its range): its root can write there."""
    status, out, err = _run(
        runtime,
        "echo hi > /v/f && stat -c %u /v/f",
        mounts=(parse_volume("shared:/v"),),
        security=make_security(userns=True),
    )
    assert (status, out) == (0, "0\n"), err
    st = os.stat(dirs.state / "volumes" / "shared" / "f")
    assert st.st_uid >= 1 << 30


# -- user ---------------------------------------------------------------------


def _image_with_users(dirs: Dirs, user: str) -> str:
    """A two-layer image: busybox, and an /etc/passwd and /etc/group with
    an 'app' user in two groups; its default user *user*. Its id."""
    store = ImageStore(dirs.state / "images")
    base = busybox_image(store)
    with store.building("test-users") as build:
        layer = layer_id_of_recipe({"test": "users"})
        work = Path(build.scratch("users"))
        (work / "etc").mkdir()
        (work / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
        )
        (work / "etc/group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\nother:x:60:\n")
        build.commit_layer(layer, str(work))
        config: dict[str, object] = {
            "env": [],
            "entrypoint": None,
            "cmd": None,
            "workdir": "/",
            "user": user,
        }
        image = build.commit_image([*base.layers, layer], config, {"builder": "test"}, None)
    return image.id


def test_user_by_number_and_by_name(runtime: Runtime, dirs: Dirs) -> None:
    image = _image_with_users(dirs, "")
    probe = "id -u; id -g; id -G; echo $HOME; grep CapEff /proc/self/status"
    cases = {
        "1000": ["1000", "1000", "1000 50", "/home/app"],
        "app": ["1000", "1000", "1000 50", "/home/app"],
        "app:other": ["1000", "60", "60 50", "/home/app"],
        "4242": ["4242", "0", "0", "/"],
        "4242:77": ["4242", "77", "77", "/"],
    }
    for user, want in cases.items():
        status, out, err = _run(runtime, probe, rootfs=image, user=user)
        lines = out.splitlines()
        assert status == 0, (user, err)
        assert lines[:3] == want[:3] and lines[3] == want[3], (user, lines)
        # Not root: no capability survives the exec.
        assert lines[4].split() == ["CapEff:", "0000000000000000"], user
    for user, message in (
        ("bob", "user 'bob': no such user in the sandbox's /etc/passwd"),
        ("app:wheel", "user: group 'wheel': no such group in the sandbox's /etc/group"),
    ):
        with pytest.raises(SandboxError, match=f"^sandbox 'vol': {message}$"):
            run_capture(runtime, _spec("true", rootfs=image, user=user))


def test_the_image_user_is_the_default_and_the_spec_overrides_it(
    runtime: Runtime, dirs: Dirs
) -> None:
    image = _image_with_users(dirs, "app")
    assert _run(runtime, "id -un; echo $HOME", rootfs=image)[1] == "app\n/home/app\n"
    assert _run(runtime, "id -un; echo $HOME", rootfs=image, user="root")[1] == "root\n/root\n"
    assert _run(runtime, "echo $HOME", rootfs=image, env={"HOME": "/x"})[1] == "/x\n"


def test_exec_runs_as_the_sandboxes_user_unless_told(runtime: Runtime, dirs: Dirs) -> None:
    image = _image_with_users(dirs, "")
    import tempfile

    with runtime.create(_spec("exec sleep 60", rootfs=image, user="app")) as sb:
        for user, want in ((None, "1000 /home/app"), ("root", "0 /root"), ("4242", "4242 /")):
            with tempfile.TemporaryFile() as out:
                with runtime.exec(
                    sb, ["sh", "-c", "echo $(id -u) $HOME"], stdio=(0, out.fileno(), 2), user=user
                ) as proc:
                    assert proc.wait() == 0
                out.seek(0)
                assert out.read().decode().strip() == want, user
        sb.kill()


def test_corral_run_options(dirs: Dirs, tmp_path: Path) -> None:
    """The CLI: -v (a relative path is the host's, a name a volume), --tmpfs,
    --user, --read-only; a bad option is one line naming it."""
    host = _host(tmp_path)
    os.chdir(tmp_path)
    p = corral(
        dirs,
        "run",
        "-v",
        "./host:/data:ro",
        "--tmpfs",
        "/tmp",
        "--user",
        "65534",
        "--read-only",
        "--",
        "sh",
        "-c",
        "cat /data/f; id -u; touch /tmp/x && touch /y || echo ro",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == f"{(host / 'f').read_text()}65534\nro\n"
    p = corral(dirs, "run", "--user", "a:b:c", "--", "true")
    assert p.returncode == 125 and p.stderr.decode().count("\n") == 1
    assert "--user" in p.stderr.decode()
    assert stat.S_ISDIR(os.stat(host).st_mode)


def test_corral_volume_ls_and_rm(runtime: Runtime, dirs: Dirs) -> None:
    """Named volumes are listed with who mounts them; one in use is not
    removed (one line naming the sandbox); one that is not, is."""
    import json
    import signal

    vol = (parse_volume("data:/data"),)
    with runtime.create(_spec("echo hi > /data/f; exec sleep 60", mounts=vol)) as sb:
        p = corral(dirs, "volume", "ls", "--json")
        assert p.returncode == 0, p.stderr
        (row,) = [json.loads(line) for line in p.stdout.decode().splitlines()]
        assert (row["name"], row["used_by"]) == ("data", ["vol"])
        p = corral(dirs, "volume", "rm", "data")
        assert p.returncode == 125
        assert p.stderr.decode() == (
            "corral: volume 'data' is mounted by sandbox 'vol': remove the sandbox first\n"
        )
        sb.send_signal(signal.SIGKILL)
        sb.wait()
    assert (dirs.state / "volumes" / "data").is_dir()
    p = corral(dirs, "volume", "rm", "data")
    assert (p.returncode, p.stdout.decode()) == (0, "removed data\n"), p.stderr
    assert os.listdir(dirs.state / "volumes") == []
    p = corral(dirs, "volume", "rm", "data")
    assert p.returncode == 125 and "no volume 'data'" in p.stderr.decode()
