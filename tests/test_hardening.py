"""The rest of a default sandbox's hardening: rlimits, the device policy
(a read-only /dev, a ``nodev`` root, the v1 device cgroup), the default
pids limit, the seccomp setting, and the runc escape classes around the
working directory (CVE-2024-21626)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import Runtime, SandboxError, SandboxSpec, SpecError
from supervisor._core._fleet import FleetError, parse_fleet
from supervisor._runtime._checkpoint import spec_from_dict, spec_to_dict
from supervisor._runtime._linux import _syscalls
from supervisor._runtime._linux._cgroups import ALLOWED_DEVICES, V1Cgroups
from supervisor._runtime._security import RLIMITS, effective_rlimits, make_security
from supervisor._runtime._spec import DEFAULT_PIDS, Limits

from .conftest import Dirs, requires_root
from .helpers import run_capture


def _limits_inside(out: str) -> dict[str, tuple[str, str]]:
    """``name soft hard`` lines printed by the sandbox's shell."""
    return {n: (s, h) for n, s, h in (line.split() for line in out.splitlines())}


ULIMITS = "echo nofile $(ulimit -Sn) $(ulimit -Hn); echo core $(ulimit -Sc) $(ulimit -Hc)"


def _own_hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@requires_root
def test_default_rlimits(runtime: Runtime) -> None:
    result, out, err = run_capture(runtime, SandboxSpec(name="rl", argv=("sh", "-c", ULIMITS)))
    assert result.status == 0, err
    hard = min(65536, _own_hard_nofile())
    assert _limits_inside(out) == {"nofile": ("1024", str(hard)), "core": ("0", "0")}


@requires_root
def test_rlimits_are_set_and_exec_gets_the_same(runtime: Runtime) -> None:
    sec = make_security(rlimits={"nofile": "100:200", "core": "unlimited"})
    spec = SandboxSpec(name="rl-set", argv=("sh", "-c", ULIMITS), security=sec)
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert _limits_inside(out) == {"nofile": ("100", "200"), "core": ("unlimited", "unlimited")}

    spec = SandboxSpec(name="rl-exec", argv=("sleep", "600"), security=sec)
    with (
        open(os.devnull, "rb") as null,
        runtime.create(spec, stdio=(null.fileno(),) * 3) as sb,
        open(os.devnull, "wb") as sink,
    ):
        import tempfile

        with tempfile.TemporaryFile() as out_file:
            with runtime.exec(
                sb, ["sh", "-c", ULIMITS], stdio=(null.fileno(), out_file.fileno(), sink.fileno())
            ) as proc:
                assert proc.wait() == 0
            out_file.seek(0)
            assert _limits_inside(out_file.read().decode()) == {
                "nofile": ("100", "200"),
                "core": ("unlimited", "unlimited"),
            }
        sb.kill()
        sb.wait()


@requires_root
def test_an_rlimit_above_the_supervisors_is_a_clear_error(runtime: Runtime) -> None:
    own = _own_hard_nofile()
    if own == resource.RLIM_INFINITY:
        pytest.skip("this process has no hard nofile limit to exceed")
    if _has_cap(24):
        pytest.skip("this process holds CAP_SYS_RESOURCE, so it may raise its hard limit")
    sec = make_security(rlimits={"nofile": own + 1})
    with pytest.raises(SandboxError) as err:
        runtime.create(SandboxSpec(name="rl-high", argv=("true",), security=sec))
    assert f"rlimits.nofile: cannot set a hard limit of {own + 1}" in str(err.value)
    assert "CAP_SYS_RESOURCE" in str(err.value)


def _has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


@pytest.mark.parametrize(
    ("rlimits", "message"),
    [
        (
            {"nofiles": 1},
            "rlimits: expected rlimit names like nofile, nproc or core, got 'nofiles'",
        ),
        ({"nofile": "10:5"}, "rlimits.nofile: the soft limit is above the hard limit ('10:5')"),
        (
            {"nofile": "many"},
            "rlimits.nofile: expected a whole number, 'SOFT:HARD' or 'unlimited', got 'many'",
        ),
        ({"core": -5}, "rlimits.core: expected a whole number, 'SOFT:HARD' or 'unlimited', got -5"),
        (
            {"core": True},
            "rlimits.core: expected a whole number, 'SOFT:HARD' or 'unlimited', got True",
        ),
        ("nofile=1", "rlimits: expected a table like {nofile = 4096}, got 'nofile=1'"),
    ],
)
def test_bad_rlimits_name_the_field(rlimits: object, message: str) -> None:
    with pytest.raises(SpecError) as err:
        make_security(rlimits=rlimits)
    assert str(err.value) == message


def test_rlimits_in_the_fleet_merge_with_the_defaults() -> None:
    fleet = parse_fleet(
        {
            "defaults": {"rlimits": {"nofile": 4096, "core": 0}},
            "sandbox": [
                {"name": "a", "command": "true"},
                {"name": "b", "command": "true", "rlimits": {"nofile": "10:20"}},
            ],
        }
    )
    a, b = (dict((n, (s, h)) for n, s, h in c.security.rlimits) for c in fleet.sandboxes)
    assert a == {"nofile": (4096, 4096), "core": (0, 0)}
    assert b == {"nofile": (10, 20), "core": (0, 0)}
    with pytest.raises(FleetError) as err:
        parse_fleet({"sandbox": [{"name": "x", "command": "true", "rlimits": {"nofile": "x"}}]})
    assert "sandbox 'x': rlimits.nofile: expected a whole number" in str(err.value)
    # The defaults never ask for more than this process has.
    for _, _, hard in effective_rlimits(make_security()):
        own = resource.getrlimit(RLIMITS["nofile"])[1]
        assert hard == -1 or own == -1 or hard <= own


def test_security_round_trips_through_a_checkpoint_spec() -> None:
    sec = make_security(seccomp="unconfined", rlimits={"nofile": "64:128"})
    spec = SandboxSpec(name="s", argv=("true",), security=sec)
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


@requires_root
@pytest.mark.layout
def test_only_the_standard_devices_are_usable(runtime: Runtime) -> None:
    """/dev is read-only, a node made elsewhere is on a nodev mount; the
    standard nodes work. In a user namespace (the default) no node can be
    made at all. A privileged sandbox may make and use a node."""
    script = (
        "touch /dev/x 2>/dev/null && echo dev-writable;"
        " mknod /tmp/zero c 1 5 && echo mknod;"
        " head -c 4 /tmp/zero 2>/dev/null | wc -c | grep -qx 4 && echo zero-usable;"
        " echo x > /dev/null && head -c 4 /dev/zero | wc -c; true"
    )
    root_mapped = make_security(userns=False)
    result, out, err = run_capture(
        runtime, SandboxSpec(name="dev", argv=("sh", "-c", script), security=root_mapped)
    )
    assert result.status == 0, err
    # MKNOD is one of Docker's 14, so making the node works; using it does not.
    assert out.split() == ["mknod", "4"]
    result, out, err = run_capture(
        runtime, SandboxSpec(name="dev-u", argv=("sh", "-c", script), security=make_security())
    )
    assert result.status == 0, err
    assert out.split() == (["4"] if make_security().userns else ["mknod", "4"])

    spec = SandboxSpec(
        name="dev-priv", argv=("sh", "-c", script), security=make_security(privileged=True)
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert out.split() == ["dev-writable", "mknod", "zero-usable", "4"]


@requires_root
@pytest.mark.layout
def test_the_v1_device_cgroup_allows_only_the_standard_devices(runtime: Runtime) -> None:
    if not isinstance(runtime.cgroups, V1Cgroups):
        pytest.skip("cgroup v2 has no devices controller; the device test covers v2")
    spec = SandboxSpec(name="devcg", argv=("sleep", "600"))
    with open(os.devnull, "rb") as null, runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
        devdir = next(p for p in sb.cgroup.paths if "/devices/" in p)
        allowed = Path(devdir, "devices.list").read_text().split("\n")
        assert sorted(filter(None, allowed)) == sorted(ALLOWED_DEVICES)
        sb.kill()
        sb.wait()


def _pids_max(paths: tuple[str, ...]) -> str:
    return next(
        Path(p, "pids.max").read_text().strip() for p in paths if Path(p, "pids.max").exists()
    )


@requires_root
def test_a_default_pids_limit_contains_a_fork_bomb(runtime: Runtime) -> None:
    spec = SandboxSpec(name="pids", argv=("sleep", "600"))
    with open(os.devnull, "rb") as null, runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
        assert _pids_max(sb.cgroup.paths) == str(DEFAULT_PIDS)
        sb.kill()
        sb.wait()
    spec = SandboxSpec(name="pids-own", argv=("true",), limits=Limits(pids=10))
    with open(os.devnull, "rb") as null, runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
        assert _pids_max(sb.cgroup.paths) == "10"
        sb.wait()


@requires_root
def test_a_workdir_through_a_host_descriptor_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    """runc CVE-2024-21626: a descriptor of a host directory inherited by
    the spawner must not become the command's working directory."""
    (tmp_path / "host-secret").write_text("secret\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "supervisor", "run", "--workdir", f"/proc/self/fd/{fd}",
             "--", "cat", "host-secret"],
            env=dirs.env, capture_output=True, text=True, timeout=60, pass_fds=(fd,), check=False,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert "secret" not in r.stdout
    assert r.returncode == 125, r.stderr
    assert "workdir '/proc/self/fd/" in r.stderr
    assert os.listdir(dirs.state / "sandboxes") == []


@requires_root
def test_a_workdir_cannot_climb_out_of_the_root(runtime: Runtime) -> None:
    """.. of the root is the root: no path leads out."""
    spec = SandboxSpec(name="wd-out", argv=("pwd",), workdir="/proc/self/root/..")
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0 and out == "/\n", err  # .. of the root is the root


def test_proc_and_sys_magic() -> None:
    assert _syscalls.fs_type("/proc") == _syscalls.PROC_SUPER_MAGIC
    assert _syscalls.fs_type("/sys") == _syscalls.SYSFS_MAGIC
    assert _syscalls.fs_type("/") not in (_syscalls.PROC_SUPER_MAGIC, _syscalls.SYSFS_MAGIC)


@requires_root
def test_seccomp_settings(runtime: Runtime, tmp_path: Path) -> None:
    """The default filter is on (Seccomp: 2), exec'd or not; unconfined and
    privileged have none; a Docker profile file is honoured."""

    def seccomp_line(name: str, **kw: object) -> str:
        spec = SandboxSpec(
            name=name,
            argv=("sh", "-c", "grep ^Seccomp: /proc/self/status"),
            security=make_security(**kw),  # type: ignore[arg-type]
        )
        result, out, err = run_capture(runtime, spec)
        assert result.status == 0, err
        return out.split()[1]

    assert seccomp_line("sc-default") == "2"
    assert seccomp_line("sc-unconfined", seccomp="unconfined") == "0"
    assert seccomp_line("sc-priv", privileged=True) == "0"
    assert seccomp_line("sc-nnp-off", no_new_privs=False) == "2"

    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
                ],
            }
        )
    )
    spec = SandboxSpec(
        name="sc-file",
        argv=("sh", "-c", "mkdir /tmp/d 2>&1; touch /tmp/f && echo touched"),
        security=make_security(seccomp=str(profile)),
    )
    _, out, err = run_capture(runtime, spec)
    assert "Permission denied" in out and "touched" in out, (out, err)


@requires_root
@pytest.mark.parametrize("name", ["proc", "sys", "dev"])
def test_a_rootfs_whose_mount_target_is_a_symlink_is_refused(
    runtime: Runtime, tmp_path: Path, name: str
) -> None:
    """runc CVE-2019-19921 family: a symlinked /proc (or /sys, /dev) would
    point the mount at the host. It is refused, and nothing is mounted."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", runtime.resolve_rootfs("busybox"), str(rootfs)], check=True)
    target = tmp_path / "host-dir"
    target.mkdir()
    subprocess.run(["rm", "-rf", str(rootfs / name)], check=True)
    (rootfs / name).symlink_to(target)
    mounts_before = Path("/proc/self/mountinfo").read_text()
    with pytest.raises(SandboxError) as err:
        runtime.create(SandboxSpec(name="symlinked", argv=("true",), rootfs=str(rootfs)))
    assert f"/{name} in the rootfs is not a directory (refusing to mount on it)" in str(err.value)
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
    assert os.listdir(target) == []


def test_a_compiled_filter_is_reused_from_the_state_dir(tmp_path: Path) -> None:
    """A one-shot corral run reads the compiled program instead of loading
    libseccomp (whose lookup alone runs ldconfig)."""
    code = (
        "import sys; from supervisor._runtime._seccomp import compile_filter;"
        f" b = compile_filter('default', [0, 1, 5], {str(tmp_path)!r});"
        " print(sum(map(len, b)), len(b), 'pyseccomp' in sys.modules)"
    )

    def run() -> list[str]:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return r.stdout.split()

    first, second = run(), run()
    assert first[2] == "True" and second == [first[0], "2", "False"]
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith("default-") and cached.endswith(".bpf")
