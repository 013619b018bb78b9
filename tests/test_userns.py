"""User-namespace mode (``userns = true``): the sandbox's root is an
unprivileged host user; its ids come from a range of its own (or a shared,
configured one); its rootfs and writable layer belong to that range; exec
joins the user namespace too; nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor import Runtime, SandboxError, SandboxSpec, SpecError
from supervisor._core._fleet import parse_fleet
from supervisor._runtime._security import USERNS_POOL, USERNS_SIZE, make_security

from .conftest import Dirs, requires_root
from .helpers import run_capture, wait_for

pytestmark = pytest.mark.layout  # a kernel feature: the VM lane runs these on Debian's kernel too

USERNS = make_security(userns=True)


def _host_ids(pid: int) -> tuple[int, int]:
    """The (real uid, real gid) of host process *pid*."""
    lines = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(lines["Uid"].split()[0]), int(lines["Gid"].split()[0])


def _command_pid(init: int) -> int:
    text = wait_for(
        lambda: Path(f"/proc/{init}/task/{init}/children").read_text().split(),
        what="tini to start the command",
    )
    return int(text[0])


@requires_root
def test_root_inside_is_a_nobody_outside(runtime: Runtime, dirs: Dirs) -> None:
    script = "id -u; id -g; cat /proc/self/uid_map; echo data > /etc/written; ls -n /etc/passwd"
    spec = SandboxSpec(name="u-map", argv=("sh", "-c", script), security=USERNS)
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    uid, gid, uid_map, passwd = out.splitlines()
    assert (uid, gid) == ("0", "0")
    base = USERNS_POOL[0]
    assert uid_map.split() == ["0", str(base), str(USERNS_SIZE)]
    # The shifted rootfs is root's inside.
    assert passwd.split()[2:4] == ["0", "0"]

    spec = SandboxSpec(
        name="u-host", argv=("sh", "-c", "touch /tmp/made; sleep 600"), security=USERNS
    )
    with open(os.devnull, "rb") as null, runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
        command = _command_pid(sb.pid)
        assert _host_ids(command) == (base, base)
        assert _host_ids(sb.pid) == (base, base)
        made = dirs.state / "sandboxes" / "u-host" / "upper" / "tmp" / "made"
        wait_for(made.exists, what="the file to be made")
        assert (made.stat().st_uid, made.stat().st_gid) == (base, base)
        # Its own user namespace; the host's is not its.
        assert os.readlink(f"/proc/{command}/ns/user") != os.readlink("/proc/self/ns/user")
        sb.kill()
        sb.wait()


@requires_root
def test_ranges_do_not_overlap_and_are_released(runtime: Runtime, dirs: Dirs) -> None:
    specs = [SandboxSpec(name=f"u-{i}", argv=("sleep", "600"), security=USERNS) for i in range(3)]
    claims = dirs.run / "userns"
    with open(os.devnull, "rb") as null:
        boxes = [runtime.create(s, stdio=(null.fileno(),) * 3) for s in specs]
        try:
            bases = sorted(_host_ids(sb.pid)[0] for sb in boxes)
            first = USERNS_POOL[0]
            assert bases == [first, first + USERNS_SIZE, first + 2 * USERNS_SIZE]
            assert sorted(os.listdir(claims)) == ["0", "1", "2"]
        finally:
            for sb in boxes:
                sb.destroy()
    assert os.listdir(claims) == []


@requires_root
def test_a_configured_base_is_shared(runtime: Runtime, dirs: Dirs) -> None:
    sec = make_security(userns=True, userns_base=300000)
    with open(os.devnull, "rb") as null:
        a = runtime.create(SandboxSpec(name="sh-a", argv=("sleep", "600"), security=sec),
                           stdio=(null.fileno(),) * 3)  # fmt: skip
        with a, runtime.create(SandboxSpec(name="sh-b", argv=("sleep", "600"), security=sec),
                               stdio=(null.fileno(),) * 3) as b:  # fmt: skip
            assert _host_ids(a.pid) == _host_ids(b.pid) == (300000, 300000)
    assert not (dirs.run / "userns").exists() or os.listdir(dirs.run / "userns") == []


@requires_root
def test_exec_joins_the_user_namespace(runtime: Runtime) -> None:
    spec = SandboxSpec(name="u-exec", argv=("sleep", "600"), security=USERNS)
    with open(os.devnull, "rb") as null, runtime.create(spec, stdio=(null.fileno(),) * 3) as sb:
        command = _command_pid(sb.pid)
        with tempfile.TemporaryFile() as out:
            with runtime.exec(
                sb, ["sh", "-c", "id -u; readlink /proc/self/ns/user; grep -E '^(Cap|NoNew|Secc)' /proc/self/status"],
                stdio=(null.fileno(), out.fileno(), out.fileno()),
            ) as proc:  # fmt: skip
                host = _host_ids(proc.pid)
                assert proc.wait() == 0
            out.seek(0)
            uid, ns, *privileges = out.read().decode().splitlines()
        assert uid == "0" and host == (USERNS_POOL[0], USERNS_POOL[0])
        assert ns == os.readlink(f"/proc/{command}/ns/user")
        mine = [
            ln
            for ln in Path(f"/proc/{command}/status").read_text().splitlines()
            if ln.startswith(("Cap", "NoNew", "Secc"))
        ]
        assert privileges == mine
        with runtime.exec(sb, ["sh", "-c", "tty"], tty=True) as proc:
            assert proc.pty_master is not None
            assert proc.wait() == 0
        sb.kill()
        sb.wait()


def _through_pipes(
    start: Callable[[tuple[int, int, int]], Any],
) -> tuple[int, str, str]:
    """Start something (given its stdio) with pipes for stdout and stderr,
    as the supervisor does; its status and what came out of each."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        with open(os.devnull, "rb") as null:
            waitable = start((null.fileno(), out_w, err_w))
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
            out_r = err_r = -1
            status = waitable()
            return status, out.read().decode(), err.read().decode()
    finally:
        for fd in (out_r, out_w, err_r, err_w):
            if fd >= 0:
                os.close(fd)


REOPEN = "echo out >/dev/stdout && echo err >/dev/stderr && echo still-out"


@requires_root
@pytest.mark.parametrize("user", [None, "1000:1000"], ids=["root", "user"])
def test_stdout_pipes_can_be_opened_again_through_dev_stdout(
    runtime: Runtime, user: str | None
) -> None:
    """A program that writes to /dev/stdout opens its pipe again; in a user
    namespace that pipe must be the sandbox's (as runc makes it), for its
    root and for the user it runs as; so must an exec's."""
    spec = SandboxSpec(name="u-pipes", argv=("sh", "-c", REOPEN), security=USERNS, user=user)

    def create(stdio: tuple[int, int, int]) -> Callable[[], int]:
        sb = runtime.create(spec, stdio=stdio)

        def done() -> int:
            with sb:
                return sb.wait().status

        return done

    status, out, err = _through_pipes(create)
    assert (status, out, err) == (0, "out\nstill-out\n", "err\n")

    long = SandboxSpec(name="u-pipes-exec", argv=("sleep", "600"), security=USERNS)
    with open(os.devnull, "rb") as null, runtime.create(long, stdio=(null.fileno(),) * 3) as sb:

        def exec_(stdio: tuple[int, int, int]) -> Callable[[], int]:
            proc = runtime.exec(sb, ["sh", "-c", REOPEN], stdio=stdio, user=user)

            def done() -> int:
                with proc:
                    return proc.wait()

            return done

        status, out, err = _through_pipes(exec_)
        assert (status, out, err) == (0, "out\nstill-out\n", "err\n")
        sb.kill()
        sb.wait()


@requires_root
def test_an_unreachable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    rt = Runtime(state_dir=private / "state", run_dir=private / "run")
    before = set(os.listdir("/sys/fs/cgroup"))
    with pytest.raises(SandboxError) as err:
        rt.create(SandboxSpec(name="u-far", argv=("true",), security=USERNS))
    assert "is not searchable by the sandbox's root" in str(err.value)
    assert "chmod o+x" in str(err.value)
    assert os.listdir(private / "state" / "sandboxes") == []
    assert os.listdir(private / "run" / "userns") == []
    assert set(os.listdir("/sys/fs/cgroup")) == before


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"userns": "yes"}, "userns: expected true or false, got 'yes'"),
        ({"userns": False, "userns_base": 100000}, "userns_base: needs userns = true"),
        (
            {"userns": True, "userns_base": 0},
            "userns_base: expected a host uid above 0 with 65536 ids free after it, got 0",
        ),
        (
            {"userns": True, "userns_size": 10},
            "userns_size: expected a number of ids >= 65536, got 10",
        ),
    ],
)
def test_bad_userns_settings_name_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as err:
        make_security(**kw)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_fleet_keys() -> None:
    fleet = parse_fleet(
        {
            "defaults": {"userns": True},
            "sandbox": [
                {"name": "a", "command": "true"},
                {"name": "b", "command": "true", "userns_base": 500000},
            ],
        }
    )
    a, b = (c.security for c in fleet.sandboxes)
    assert a.userns and a.userns_base is None
    assert b.userns and b.userns_base == 500000


@requires_root
def test_corral_run_userns(dirs: Dirs) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--userns", "--", "cat", "/proc/self/uid_map"],
        env=dirs.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", str(USERNS_POOL[0]), str(USERNS_SIZE)]
    assert os.listdir(dirs.state / "sandboxes") == []
    # --no-userns: root-mapped, whatever the default.
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--no-userns", "--", "cat", "/proc/self/uid_map"],
        env=dirs.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", "4294967295"]


def test_the_default_is_one_switch_and_never_privileged() -> None:
    """make_security() without userns takes the default; a privileged
    sandbox is root-mapped unless it says otherwise."""
    from supervisor._runtime import _security

    assert make_security().userns == (_security.USERNS_DEFAULT and _security.userns_available())
    assert not make_security(privileged=True).userns
    assert make_security(userns_base=500000).userns  # a base means a user namespace


_IDMAPPABLE = {0xEF53: (5, 12), 0x58465342: (5, 12), 0x9123683E: (5, 15), 0x01021994: (6, 3)}
"""ext4, xfs, btrfs, tmpfs: the kernel version from which each can be idmapped."""


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor.split("-")[0])


def _lowerdir(out: str) -> str:
    root = next(ln for ln in out.splitlines() if " / " in ln and ln.startswith("overlay"))
    return root.split("lowerdir=")[1].split(",")[0]


@requires_root
def test_the_rootfs_is_idmapped_where_its_file_system_can_be(runtime: Runtime, dirs: Dirs) -> None:
    from supervisor._runtime._linux._syscalls import fs_type

    lower = runtime.resolve_rootfs("busybox")
    since = _IDMAPPABLE.get(fs_type(lower))
    expect_idmap = since is not None and _kernel() >= since
    spec = SandboxSpec(
        name="u-idmap", argv=("sh", "-c", "cat /proc/mounts; ls -n /bin/busybox"), security=USERNS
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert out.splitlines()[-1].split()[2:4] == ["0", "0"]  # root's, inside
    copies = dirs.state / "rootfs-userns"
    if expect_idmap:
        assert _lowerdir(out).endswith("/sandboxes/u-idmap/lower/0")
        assert not copies.exists()
    else:
        assert "/rootfs-userns/" in _lowerdir(out)
        assert len(os.listdir(copies)) == 1


@requires_root
def test_a_rootfs_that_cannot_be_idmapped_is_copied_shifted(
    runtime: Runtime, dirs: Dirs, tmp_path: Path
) -> None:
    """ramfs cannot be idmapped on any kernel: the sandbox still starts, from a copy."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        subprocess.run(["cp", "-a", runtime.resolve_rootfs("busybox") + "/.", str(mnt)], check=True)
        spec = SandboxSpec(name="u-copy", argv=("sh", "-c", "cat /proc/mounts; echo x > /etc/y"),
                           rootfs=str(mnt), security=USERNS)  # fmt: skip
        for _ in range(2):  # the second start uses the copy made by the first
            result, out, err = run_capture(runtime, spec)
            assert result.status == 0, err
            assert "/rootfs-userns/" in _lowerdir(out)
        assert len(os.listdir(dirs.state / "rootfs-userns")) == 1
        # The original is untouched: still root's on the host.
        assert (mnt / "etc" / "passwd").stat().st_uid == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@requires_root
def test_a_network_namespace_the_sandbox_does_not_own_has_its_sys(
    runtime: Runtime, dirs: Dirs
) -> None:
    """The host's network, or another sandbox's, belongs to a user
    namespace not the sandbox's, whose root may not mount a sysfs for it:
    the sandbox still gets /sys, showing that network's interfaces."""
    before = set(os.listdir("/sys/class/net"))
    spec = SandboxSpec(name="u-hostnet", argv=("ls", "/sys/class/net"), network="host",
                       security=USERNS)  # fmt: skip
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    assert before & set(os.listdir("/sys/class/net")) <= set(out.split())

    pod = SandboxSpec(name="u-pod", argv=("sleep", "600"), security=USERNS)
    with open(os.devnull, "rb") as null, runtime.create(pod, stdio=(null.fileno(),) * 3) as sb:
        spec = SandboxSpec(name="u-joined", argv=("ls", "/sys/class/net"), network="sandbox:u-pod",
                           security=USERNS)  # fmt: skip
        result, out, err = run_capture(runtime, spec)
        sb.kill()
        sb.wait()
    assert (result.status, out) == (0, "lo\n"), err


def _age(claims: list[Path]) -> None:
    """Make *claims* look older than STALE_AFTER."""
    from supervisor._runtime._records import STALE_AFTER

    for p in claims:
        t = p.stat().st_mtime - STALE_AFTER - 5
        os.utime(p, (t, t))


def _owner(claim: Path) -> str:
    from supervisor._runtime._userns import _read

    return _read(str(claim))[0]


def test_a_crashed_sandboxs_id_claim_is_taken_over_only_once_stale(tmp_path: Path) -> None:
    """A claim whose owner has no record and whose claimer is gone blocks its
    range until STALE_AFTER, then is reused."""
    import contextlib

    from supervisor._runtime._userns import allocate_range

    security = make_security(userns=True)
    run_dir = str(tmp_path)
    with contextlib.ExitStack() as undo:
        first = allocate_range(security, "probe", run_dir, undo)
    assert not any((tmp_path / "userns").iterdir())  # released
    # The crash: a process claims a range and dies before its sandbox exists.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import contextlib, os, sys\n"
            "from supervisor._runtime._security import make_security\n"
            "from supervisor._runtime._userns import allocate_range\n"
            "allocate_range(make_security(userns=True), 'ghost', sys.argv[1],"
            " contextlib.ExitStack())\n"
            "os._exit(0)\n",
            run_dir,
        ],
        check=True,
    )
    ghost = sorted((tmp_path / "userns").iterdir())
    assert ghost and all(_owner(p) == "ghost" for p in ghost)
    with contextlib.ExitStack() as undo:
        assert allocate_range(security, "a", run_dir, undo) != first  # young: still the ghost's
    _age(ghost)
    with contextlib.ExitStack() as undo:
        assert allocate_range(security, "b", run_dir, undo) == first  # stale: taken over
        assert all(_owner(p) == "b" for p in ghost)


def test_a_claim_is_kept_while_its_claimer_still_makes_the_sandbox(tmp_path: Path) -> None:
    """A creation slower than STALE_AFTER (say, copying a large rootfs shifted)
    keeps its range: no record yet, but the process that claimed it lives."""
    import contextlib

    from supervisor._runtime._userns import allocate_range

    security = make_security(userns=True)
    run_dir = str(tmp_path)
    with contextlib.ExitStack() as slow:
        mine = allocate_range(security, "slow", run_dir, slow)
        _age(sorted((tmp_path / "userns").iterdir()))
        with contextlib.ExitStack() as undo:
            assert allocate_range(security, "other", run_dir, undo) != mine


def test_two_takers_of_one_stale_claim_never_share_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two creations that both find one claim stale: one takes the range, the
    other moves on; neither deletes the claim the other has just made."""
    import contextlib
    import fcntl

    from supervisor._runtime import _userns

    security = make_security(userns=True)
    run_dir = str(tmp_path)
    claims = tmp_path / "userns"
    claims.mkdir()
    # A crash's leftover: its claimer is gone (a PID that is not running).
    dead = _dead_pid()
    (claims / "0").write_text(f'{{"name": "ghost", "pid": {dead}, "start": 1}}')
    _age([claims / "0"])
    real_stale = _userns._stale
    rival: list[tuple[int, int]] = []
    undo = contextlib.ExitStack()

    def stale_then_rival(path: str, run: str) -> bool:
        # The first taker has judged the claim stale; the other comes in
        # before it replaces the claim, unless the claims are locked.
        verdict = real_stale(path, run)
        if verdict and not rival:
            fd = os.open(claims, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return verdict  # locked: the other can only come in after
            finally:
                os.close(fd)
            rival.append(allocate_range_unhooked(security, "rival", run_dir, undo))
        return verdict

    def allocate_range_unhooked(*args: object) -> tuple[int, int]:
        monkeypatch.setattr(_userns, "_stale", real_stale)
        try:
            return _userns.allocate_range(*args)  # type: ignore[arg-type]
        finally:
            monkeypatch.setattr(_userns, "_stale", stale_then_rival)

    monkeypatch.setattr(_userns, "_stale", stale_then_rival)
    with undo:
        first = _userns.allocate_range(security, "first", run_dir, undo)
        if not rival:
            rival.append(allocate_range_unhooked(security, "rival", run_dir, undo))
        assert first != rival[0], "two sandboxes got the same id range"
        assert sorted(_owner(p) for p in claims.iterdir()) == ["first", "rival"]
    assert list(claims.iterdir()) == []


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@requires_root
def test_a_shifted_copy_keeps_hard_links_set_id_bits_capabilities_and_acls(dirs: Dirs) -> None:
    """A rootfs copied shifted into a range, and shifted back (what a commit
    of a userns sandbox does): a hard-linked file moves once, and what chown
    would lose (set-id bits, file capabilities, ACL ids) moves with it."""
    import struct

    from supervisor._runtime._userns import shift_owners, shifted_rootfs

    base, size = USERNS_POOL[0], USERNS_SIZE
    root = dirs.state / "root"
    (root / "bin").mkdir(parents=True)
    tool = root / "bin" / "tool"
    tool.write_text("x")
    os.link(tool, root / "bin" / "alias")
    os.chown(tool, 0, 7)
    tool.chmod(0o4755)
    # cap_net_raw, effective (a v2 vfs_cap_data: root id 0).
    caps = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
    os.setxattr(tool, "security.capability", caps)
    # An ACL: user::rw-, user:1000:r--, group::r--, mask::r--, other::---
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident)
        for tag, perm, ident in ((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                                 (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF))
    )  # fmt: skip
    os.setxattr(root / "bin", "system.posix_acl_access", acl)
    shifted = Path(shifted_rootfs(str(root), base, size, str(dirs.state)))
    st = (shifted / "bin" / "tool").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (base, base + 7, 0o4755)
    assert (shifted / "bin" / "alias").stat().st_ino == st.st_ino
    moved = os.getxattr(shifted / "bin" / "tool", "security.capability")
    assert moved == struct.pack("<6I", 0x03000001, 1 << 13, 0, 0, 0, base)  # v3: its root id
    assert struct.unpack_from("<I", os.getxattr(shifted / "bin", "system.posix_acl_access"),
                              16)[0] == base + 1000  # fmt: skip
    shift_owners(str(shifted), -base, base, size)
    st = (shifted / "bin" / "tool").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 7, 0o4755)
    assert os.getxattr(shifted / "bin" / "tool", "security.capability") == caps
    assert os.getxattr(shifted / "bin", "system.posix_acl_access") == acl
    with pytest.raises(SandboxError, match=rf"is owned by 0:0, outside the 65536 ids from {base}"):
        shift_owners(str(shifted), -base, base, size)


@requires_root
def test_host_directories_are_copied_by_the_host_and_idmapped(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Host directories below one only root may search (pytest's) are
    volumes of a user-namespace sandbox all the same: the host's side
    copies them. Where the file system can be idmapped (ext4 on the host
    lane), the sandbox's root is their root: it reads a file only host
    root may, and what it writes is host root's. Elsewhere (the VM lanes'
    tmpfs on Linux 6.1) they are mounted as they are. Read-only holds."""
    from supervisor._runtime._mounts import parse_volume

    os.chmod(tmp_path, 0o700)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # writable as the range too, where not idmapped
    (data / "secret").write_text("s\n")
    (data / "secret").chmod(0o600)
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (
        "echo w > /data/new; cat /data/secret 2>/dev/null || echo denied;"
        " stat -c %u /data/new; touch /ro/x 2>/dev/null || echo ro"
    )
    spec = SandboxSpec(
        name="u-vol",
        argv=("sh", "-c", script),
        security=USERNS,
        mounts=(parse_volume(f"{data}:/data"), parse_volume(f"{ro}:/ro:ro")),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0, err
    owner = (data / "new").stat().st_uid
    if not os.environ.get("CORRAL_VM_LANE"):
        assert owner == 0, "the host lane's ext4 can be idmapped"
    if owner == 0:
        assert out.split() == ["s", "0", "ro"]
    else:
        assert owner == USERNS_POOL[0]
        assert out.split() == ["denied", "0", "ro"]
    assert not (ro / "x").exists()


def test_a_creation_does_not_look_at_the_ranges_this_process_holds(tmp_path: Path) -> None:
    """Judging a claim costs a lock, a read and a stat; a search from slot 0
    past every claim made each creation pay for all sandboxes before it
    (seconds each at 10,000). What this process claimed it knows is alive:
    the 301st range is found without opening any of the 300 claims."""
    import contextlib

    from supervisor._runtime._userns import allocate_range

    security = make_security(userns=True)
    run_dir = str(tmp_path)
    claims = str(tmp_path / "userns")
    opened: list[str] = []
    watching = False

    def audit(event: str, args: tuple[object, ...]) -> None:
        if watching and event == "open" and str(args[0]).startswith(claims):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # stays, inert once watching is off
    with contextlib.ExitStack() as undo:
        got = {allocate_range(security, f"s{i}", run_dir, undo) for i in range(300)}
        assert len(got) == 300
        watching = True
        try:
            last = allocate_range(security, "last", run_dir, undo)
        finally:
            watching = False
        assert last not in got
        # The new claim itself, and nothing else (the directory's lock is
        # only taken for a claim that exists).
        assert opened == [os.path.join(claims, "300")], opened
    assert list((tmp_path / "userns").iterdir()) == []  # all released
    with contextlib.ExitStack() as undo:
        # Released ranges are found again from the lowest.
        assert allocate_range(security, "again", run_dir, undo) == min(got)
