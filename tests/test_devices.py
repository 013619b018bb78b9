"""The device policy: one table (``DEVICE_RULES``) for both cgroup layouts,
the cgroup-v2 eBPF program built from it, and what a sandbox can open.

The kernel decides everything here: the program is loaded through the real
verifier, attached to a real cgroup2 directory (the v2 mount, or the hybrid
layout's ``unified`` one on the v1 host) and judged by real ``open(2)``
calls of nodes made on a tmpfs mounted without ``nodev``. A refusal by the
policy is EPERM; EACCES would mean a ``nodev`` mount got in the way and the
test proved nothing, so it fails the test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import CgroupError, Keeper, Runtime, SandboxSpec
from supervisor._runtime._linux._cgroups import ALLOWED_DEVICES, V2Cgroups
from supervisor._runtime._linux._devices import (
    DEVICE_RULES,
    attach_device_program,
    attached_device_programs,
    device_program,
    load_device_program,
)
from supervisor._runtime._security import make_security

from .conftest import _scratch_base, requires_root
from .helpers import run_capture, small_tmpfs

Node = tuple[str, int, int]
"""(``c`` or ``b``, major, minor)."""


def _first_disk() -> tuple[int, int]:
    """The first block device the kernel lists (the host's or the VM's
    disk); the first loop device's numbers if it lists none."""
    for line in Path("/proc/partitions").read_text().splitlines()[2:]:
        words = line.split()
        if len(words) == 4:
            return int(words[0]), int(words[1])
    return 7, 0


def _allowed_nodes() -> list[Node]:
    """A node for each rule that allows opening: its own numbers, or two
    (unlikely to exist) minors of a major-wide rule."""
    nodes: list[Node] = []
    for r in DEVICE_RULES:
        if "r" not in r.access or r.major is None:
            continue
        minors = [r.minor] if r.minor is not None else [4000, 4001]
        nodes += [(r.kind, r.major, m) for m in minors]
    return nodes


REFUSED: list[Node] = [
    ("b", *_first_disk()),  # the raw disk
    ("b", 7, 0),  # a loop device
    ("c", 1, 1),  # /dev/mem
    ("c", 1, 11),  # /dev/kmsg
    ("c", 10, 229),  # /dev/fuse: nothing asks for it
    ("c", 4, 1),  # tty1, a virtual console
    ("c", 5, 3),  # just past ptmx
    ("c", 137, 0),  # just past the pty slaves
    ("b", 1, 3),  # null's numbers as a block device
]


def test_one_table_for_both_layouts() -> None:
    """The v1 allow lines are the table's, and are the policy Docker's default gives."""
    assert ALLOWED_DEVICES == (
        "c *:* m",
        "b *:* m",
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:1 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
    )
    # Six instructions of prologue, a block per rule, "return 0": small
    # enough to read, and eight bytes each.
    assert len(device_program()) % 8 == 0 and len(device_program()) // 8 < 80


@requires_root
def test_the_program_passes_the_verifier() -> None:
    """The kernel loads the program as a cgroup device program."""
    fd = load_device_program()
    try:
        info = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
            if ":\t" in line
        )
        assert info["prog_type"] == "15"  # BPF_PROG_TYPE_CGROUP_DEVICE
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


@requires_root
def test_without_the_privilege_the_load_is_one_clear_line() -> None:
    """An unprivileged process gets one line saying what bpf(2) needs."""
    script = (
        "from supervisor._runtime._linux._devices import load_device_program\n"
        "from supervisor import CgroupError\n"
        "try:\n    load_device_program()\nexcept CgroupError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "cannot load the device program: bpf(2): Operation not permitted"
        " (it needs CAP_SYS_ADMIN or CAP_BPF, and a kernel with bpf(2))"
    ]


def _cgroup2_dir() -> str | None:
    """This process's cgroup in a mounted cgroup2 hierarchy, if there is one."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            mount = fields[0].split()[4]
            break
    own = next(
        (
            line[3:]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        ),
        None,
    )
    if mount is None or own is None:
        return None
    return os.path.join(mount, own.lstrip("/"))


@pytest.fixture
def device_cgroup() -> Iterator[str]:
    """A new, empty cgroup2 directory with the device program attached."""
    parent = _cgroup2_dir()
    if parent is None:
        pytest.skip("no cgroup2 hierarchy mounted here")
    path = os.path.join(parent, f"corral-devtest-{os.getpid()}")
    os.mkdir(path)
    try:
        attach_device_program(path)
        yield path
    finally:
        os.rmdir(path)  # its program goes with it


_PROBE = """
import json, os, stat, sys
cgroup, where, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write("0")
out = {}
for kind, major, minor in cases:
    node = os.path.join(where, f"{kind}-{major}-{minor}")
    mode = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
    try:
        os.mknod(node, mode | 0o600, os.makedev(major, minor))
        res = {"mknod": 0}
    except OSError as e:
        res = {"mknod": e.errno}
    for name, flag in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
        try:
            os.close(os.open(node, flag | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC))
            res[name] = 0
        except OSError as e:
            res[name] = e.errno
    if res["mknod"] == 0:
        os.unlink(node)
    out[f"{kind} {major}:{minor}"] = res
print(json.dumps(out))
"""


@contextlib.contextmanager
def _node_dir() -> Iterator[Path]:
    """A scratch tmpfs mounted without ``nodev``, for device nodes."""
    with (
        tempfile.TemporaryDirectory(prefix="corral-devtest-", dir=_scratch_base()) as d,
        small_tmpfs(Path(d, "nodes"), "1m") as where,
    ):
        yield where


def _host_opens(kind: str, major: int, minor: int) -> bool:
    """Whether this (test) process may open the node at all: some hosts
    refuse even root their disk (this one's VM manager does)."""
    with _node_dir() as where:
        node = where / "node"
        os.mknod(
            node, (stat.S_IFBLK if kind == "b" else stat.S_IFCHR) | 0o600, os.makedev(major, minor)
        )
        try:
            os.close(os.open(node, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError as exc:
            return exc.errno != errno.EPERM
        return True


def _probe(cgroup: str, where: Path, cases: list[Node]) -> dict[str, dict[str, int]]:
    """mknod and open each node from a process in *cgroup*; errno per step."""
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, cgroup, str(where), json.dumps(cases)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, int]] = json.loads(r.stdout)
    return result


@requires_root
@pytest.mark.layout
def test_the_kernel_enforces_the_table(device_cgroup: str) -> None:
    """In the program's cgroup: any node may be made; each allowed node opens
    (or fails in its driver, past the policy), each other one is EPERM."""
    with _node_dir() as where:
        got = _probe(device_cgroup, where, _allowed_nodes() + REFUSED)
    assert attached_device_programs(device_cgroup) == 1
    for key, res in got.items():
        assert res["mknod"] == 0, (key, res)  # "c *:* m", "b *:* m"
        assert errno.EACCES not in res.values(), f"{key}: a nodev mount, not the policy: {res}"
    for kind, major, minor in _allowed_nodes():
        res = got[f"{kind} {major}:{minor}"]
        assert errno.EPERM not in (res["read"], res["write"]), (kind, major, minor, res)
    for kind, major, minor in REFUSED:
        res = got[f"{kind} {major}:{minor}"]
        assert res["read"] == res["write"] == errno.EPERM, (kind, major, minor, res)


# --- in sandboxes ------------------------------------------------------------

STANDARD = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"]
"""The sandbox's own nodes (its /dev/ptmx is the devpts one, tested below)."""


def _sandbox_script(extra: list[Node]) -> str:
    """Mount a tmpfs without nodev (needs SYS_ADMIN), make *extra* there and
    try to open every node: one ``path ok|EPERM|other`` line each."""
    made = "".join(
        f" mknod {_node(k, a, b)} {k} {a} {b} || echo mknod-failed {k}-{a}-{b};"
        for k, a, b in extra
    )
    return (
        "mkdir -p /devtest && mount -t tmpfs -o mode=0755 devtest /devtest || echo no-mount;"
        + made
        + f" for p in {' '.join(STANDARD)} /dev/pts/ptmx /devtest/*; do"
        '   if err=$( (: < "$p") 2>&1 ); then echo "$p ok";'
        '   else case "$err" in *"not permitted"*) echo "$p EPERM";;'
        '     *) echo "$p other";; esac; fi;'
        " done"
    )


SANDBOX_NODES: list[Node] = [
    ("c", 1, 3),
    ("c", 1, 5),
    ("c", 5, 2),  # ptmx
    ("b", *_first_disk()),
    ("c", 1, 1),  # mem
    ("c", 1, 11),  # kmsg
]


def _opened(out: str) -> dict[str, str]:
    lines = out.splitlines()
    assert "no-mount" not in lines and not any(ln.startswith("mknod-failed") for ln in lines)
    return dict(ln.split(" ", 1) for ln in lines)


def _node(kind: str, major: int, minor: int) -> str:
    return f"/devtest/{kind}-{major}-{minor}"


@requires_root
@pytest.mark.layout
def test_a_sandbox_with_sys_admin_still_cannot_open_a_disk(runtime: Runtime) -> None:
    """With SYS_ADMIN a root-mapped sandbox (``userns = false``) mounts a
    tmpfs without nodev and makes nodes there: the standard ones open, the
    disk, /dev/mem and /dev/kmsg do not (on v2 by the program, on v1 by the
    device cgroup)."""
    spec = SandboxSpec(
        name="dev-admin",
        argv=("sh", "-c", _sandbox_script(SANDBOX_NODES)),
        security=make_security(cap_add=["SYS_ADMIN"], userns=False),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    opened = _opened(out)
    for path in [*STANDARD, "/dev/pts/ptmx", _node("c", 1, 3), _node("c", 1, 5), _node("c", 5, 2)]:
        # /dev/tty: no controlling terminal (ENXIO), past the policy.
        assert opened[path] in ("ok", "other"), (path, out)
    for path in ["/dev/null", "/dev/zero", "/dev/urandom", _node("c", 1, 3)]:
        assert opened[path] == "ok", (path, out)
    for kind, major, minor in SANDBOX_NODES[3:]:
        assert opened[_node(kind, major, minor)] == "EPERM", out


@requires_root
@pytest.mark.layout
def test_in_a_user_namespace_no_node_can_be_made_even_with_sys_admin(runtime: Runtime) -> None:
    """The default sandbox (a user namespace) with SYS_ADMIN: its root may
    mount a tmpfs, but no device node can be made in a user namespace at
    all; the host's standard nodes bound in work."""
    spec = SandboxSpec(
        name="dev-admin-userns",
        argv=("sh", "-c", _sandbox_script(SANDBOX_NODES)),
        security=make_security(cap_add=["SYS_ADMIN"], userns=True),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    lines = out.splitlines()
    assert "no-mount" not in lines, out
    assert [ln for ln in lines if ln.startswith("mknod-failed")] == [
        f"mknod-failed {k}-{a}-{b}" for k, a, b in SANDBOX_NODES
    ], out
    opened = dict(ln.split(" ", 1) for ln in lines if ln.startswith("/"))
    for path in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/full", "/dev/random"]:
        assert opened[path] == "ok", (path, out)


@requires_root
@pytest.mark.layout
def test_a_privileged_sandbox_keeps_every_device(runtime: Runtime) -> None:
    """A privileged sandbox gets no policy: the disk and /dev/kmsg open."""
    spec = SandboxSpec(
        name="dev-priv-all",
        argv=("sh", "-c", _sandbox_script(SANDBOX_NODES)),
        security=make_security(privileged=True),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    opened = _opened(out)
    disk = _node("b", *_first_disk())
    assert (opened[disk] != "EPERM") == _host_opens("b", *_first_disk()), out
    assert opened[_node("c", 1, 11)] == "ok", out
    assert "EPERM" not in [opened[_node(*n)] for n in SANDBOX_NODES[:3]], out


@requires_root
@pytest.mark.layout
def test_on_v2_each_sandbox_cgroup_holds_one_program_unless_privileged(runtime: Runtime) -> None:
    """The program is attached before anything runs in the cgroup, and an
    exec'd process (which joins that cgroup) is refused the disk too."""
    if not isinstance(runtime.cgroups, V2Cgroups):
        pytest.skip("cgroup v1: the device cgroup test in test_hardening covers this layout")
    with open(os.devnull, "rb") as null:
        for privileged, want in ((False, 1), (True, 0)):
            spec = SandboxSpec(
                name=f"dev-count-{int(privileged)}",
                argv=("sleep", "600"),
                # Root-mapped: in a user namespace no node could be made at
                # all (the test above), so the program would not be what
                # refuses the disk.
                security=make_security(
                    cap_add=[] if privileged else ["SYS_ADMIN"], privileged=privileged, userns=False
                ),
            )
            with runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
                assert attached_device_programs(sb.cgroup.paths[0]) == want
                if not privileged:
                    script = _sandbox_script([("b", *_first_disk())])
                    with tempfile.TemporaryFile() as f:
                        with runtime.exec(sb, ["sh", "-c", script], stdio=(0, f.fileno(), 2)) as p:
                            assert p.wait() == 0
                        f.seek(0)
                        out = f.read().decode()
                    assert _opened(out)[_node("b", *_first_disk())] == "EPERM", out
                sb.kill()
                sb.wait()


def _detach_device_programs(path: str) -> None:
    """Take every device program off the cgroup *path*, as a corral older
    than the program left its sandboxes (BPF_PROG_QUERY for their ids,
    BPF_PROG_GET_FD_BY_ID, BPF_PROG_DETACH)."""
    import ctypes
    import struct

    from supervisor._runtime._linux import _devices

    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 8)()
        attr = ctypes.create_string_buffer(28)
        struct.pack_into("=IIIIQI", attr, 0, cg, 6, 0, 0, ctypes.addressof(ids), 8)
        _devices._bpf(16, attr)  # BPF_PROG_QUERY, attach type BPF_CGROUP_DEVICE
        for prog_id in ids[: struct.unpack_from("=I", attr, 24)[0]]:
            by_id = ctypes.create_string_buffer(12)
            struct.pack_into("=I", by_id, 0, prog_id)
            prog = _devices._bpf(13, by_id)  # BPF_PROG_GET_FD_BY_ID
            try:
                detach = ctypes.create_string_buffer(12)
                struct.pack_into("=III", detach, 0, cg, prog, 6)
                _devices._bpf(9, detach)  # BPF_PROG_DETACH
            finally:
                os.close(prog)
    finally:
        os.close(cg)


@pytest.mark.layout
def test_an_adopted_sandbox_without_its_program_gets_it(
    runtime: Runtime, session_keeper: Keeper, capfd: pytest.CaptureFixture[str]
) -> None:
    """A sandbox a corral older than the device program made (on v2: no
    program on its cgroup) gets the program when a supervisor adopts it,
    and the operator is told; one that has it is left alone."""
    if not isinstance(runtime.cgroups, V2Cgroups):
        pytest.skip("cgroup v1: the devices files came with the cgroup")

    def successor() -> Runtime:  # what a restarted supervisor makes
        return Runtime(
            state_dir=runtime.state_dir, run_dir=runtime.run_dir, spawner=session_keeper.spawn
        )

    def record_of(rt: Runtime) -> dict[str, object]:
        (record,) = [r for r in rt.records() if r["name"] == "dev-old"]
        return record

    with open(os.devnull, "rb") as null:
        owner = runtime.create(
            SandboxSpec(name="dev-old", argv=("sleep", "600")), stdio=(null.fileno(),) * 3
        )
    path = owner.cgroup.paths[0]
    try:
        _detach_device_programs(path)
        assert attached_device_programs(path) == 0
        owner.detach()  # the old supervisor is gone; the sandbox runs on
        capfd.readouterr()
        rt = successor()
        owner = rt.adopt(record_of(rt))
        assert attached_device_programs(path) == 1
        err = capfd.readouterr().err
        assert "sandbox 'dev-old' had no device program (made by an older corral): attached" in err
        owner.detach()
        rt = successor()
        owner = rt.adopt(record_of(rt))
        assert attached_device_programs(path) == 1 and capfd.readouterr().err == ""
    finally:
        owner.kill()
        owner.wait()
        owner.destroy()


def test_a_bad_rule_is_refused_before_any_kernel_call() -> None:
    """A rule with an access letter outside rwm is a programming error, said plainly."""
    from supervisor._runtime._linux._devices import DeviceRule

    with pytest.raises(ValueError, match=r"device rule 'c 1:3 rx': expected c\|b and rwm"):
        device_program((DeviceRule("c", 1, 3, "rx"),))


@requires_root
def test_an_attach_to_a_missing_cgroup_names_the_path(tmp_path: Path) -> None:
    """The error names the directory (and the descriptor is closed: no leak)."""
    missing = str(tmp_path / "no-such-cgroup")
    for n in range(2):
        if n == 1:  # the first call loaded the program this process keeps
            before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(CgroupError, match=f"open {missing}: No such file or directory"):
            attach_device_program(missing)
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.criu
@requires_root
def test_a_restored_sandbox_keeps_its_device_policy(runtime: Runtime, criu: None) -> None:
    """CRIU restores into a cgroup corral made anew: it gets the policy
    (on v2 the program) before the restored processes join it."""
    script = "echo go; while :; do sleep 1; done"
    spec = SandboxSpec(
        "dev-ckpt",
        ["sh", "-c", script],
        security=make_security(cap_add=["SYS_ADMIN"], userns=False),  # root-mapped: see above
    )
    disk = ("b", *_first_disk())
    r, w = os.pipe()
    try:
        with runtime.create(spec, stdio=(0, w, w), stdin_devnull=True) as sb:
            os.close(w)
            w = -1
            assert os.read(r, 16) == b"go\n"
            info = runtime.checkpoint(sb, tag="d")
            sb.wait()
        with runtime.restore(info, stdio=(0, 2, 2)) as back:
            if isinstance(runtime.cgroups, V2Cgroups):
                assert attached_device_programs(back.cgroup.paths[0]) == 1
            with tempfile.TemporaryFile() as f:
                argv = ["sh", "-c", _sandbox_script([disk, ("c", 1, 1), ("c", 1, 3)])]
                with runtime.exec(back, argv, stdio=(0, f.fileno(), 2)) as p:
                    assert p.wait() == 0
                f.seek(0)
                out = f.read().decode()
            back.kill()
            back.wait()
        opened = _opened(out)
        assert opened[_node(*disk)] == opened[_node("c", 1, 1)] == "EPERM", out
        assert opened[_node("c", 1, 3)] == "ok", out
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


@requires_root
def test_a_program_the_verifier_refuses_is_one_line_quoting_it() -> None:
    """A refused program's error quotes the verifier (here: an exit with R0 never set)."""
    from supervisor._runtime._linux._devices import _EXIT, _JMP, _insn, _load

    with pytest.raises(CgroupError) as err:
        _load(_insn(_JMP | _EXIT))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "cannot load the device program (BPF_PROG_TYPE_CGROUP_DEVICE): Permission denied: "
    )
    assert "R0 !read_ok" in msg, msg
