"""Seccomp filters against the real kernel: the default allow-list, Docker-format
profiles, what capabilities allow, one-line errors for bad profiles, the cache.

Filters are only ever loaded in a child Python process (a filter is for good):
it compiles the setting, sets no_new_privs, loads the programs with
``load_seccomp`` and reports, as JSON, what each probed syscall returned.
Probes are chosen so that the filter's answer differs from the kernel's own
(``setns(-1)`` is EBADF unfiltered, EPERM filtered).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from supervisor import SpecError
from supervisor._runtime._linux._syscalls import load_seccomp
from supervisor._runtime._seccomp import (
    _ALLOWED_ON_ARCH,
    _ALLOWED_WITH,
    _NEWER_THAN_LIBSECCOMP,
    DEFAULT,
    DEFAULT_ALLOWED,
    UNCONFINED,
    compile_filter,
    parse_seccomp,
)
from supervisor._runtime._security import CAPABILITIES, DEFAULT_CAPABILITIES

from .conftest import requires_root

REPO = Path(__file__).resolve().parent.parent
DOCKER_CAPS = sorted(CAPABILITIES[n] for n in DEFAULT_CAPABILITIES)
SYS_ADMIN = CAPABILITIES["SYS_ADMIN"]

x86_64_only = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="probes use x86_64 syscall numbers"
)

# Runs in the child: compile, no_new_privs (or drop capabilities), load, probe.
_PRELUDE = """
import ctypes, errno, json, os, socket, subprocess, sys
from supervisor._runtime._seccomp import compile_filter
from supervisor._runtime._linux._syscalls import load_seccomp, restrict_capabilities

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def result(ret):
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]

def sc(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
    if ret > 2 and nr in (41, 425):  # a descriptor (socket, io_uring)
        os.close(ret)
    return result(ret)

def py(call, *args):
    try:
        ret = call(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    if isinstance(ret, socket.socket):
        ret.close()
    return "ok"

setting, caps, drop = json.loads(sys.argv[1])
filters = compile_filter(setting, caps)
if drop:
    restrict_capabilities(caps, int(open("/proc/sys/kernel/cap_last_cap").read()), True)
elif libc.prctl(38, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
for program in filters or ():
    load_seccomp(program)
out = {}
"""


def run_filtered(
    setting: str, caps: list[int] | None, probes: str, *, drop: bool = False
) -> dict[str, Any]:
    """Run *probes* (Python filling the dict ``out``) in a child under the filter."""
    script = _PRELUDE + textwrap.dedent(probes) + "\nprint(json.dumps(out))\n"
    p = subprocess.run(
        [sys.executable, "-c", script, json.dumps([setting, caps, drop])],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr.decode()
    result: dict[str, Any] = json.loads(p.stdout.decode().splitlines()[-1])
    return result


def write_profile(path: Path, profile: object) -> str:
    path.write_text(json.dumps(profile))
    return str(path)


# -- the default profile ----------------------------------------------------------

_DEFAULT_PROBES = """
CLONE_THREAD = 0x10000
NS_FLAGS = [0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000]
out["getpid"] = sc(39) == "ok" and libc.syscall(39) == os.getpid()
out["mount"] = result(libc.mount(b"none", b"/corral-nonexistent", b"tmpfs", 0, None))
out["umount2"] = sc(166, 0, 0)
out["unshare_user"] = result(libc.unshare(0x10000000))
out["setns"] = sc(308, 2**64 - 1, 0)
# CLONE_THREAD without CLONE_SIGHAND: EINVAL from the kernel unless the filter answers.
out["clone_ns"] = sorted({sc(56, f | CLONE_THREAD, 0, 0, 0, 0) for f in NS_FLAGS})
out["clone_ns_high_bits"] = sc(56, (1 << 32) | 0x40000000 | CLONE_THREAD, 0, 0, 0, 0)
out["clone_plain"] = sc(56, CLONE_THREAD, 0, 0, 0, 0)
out["clone3"] = sc(435, 0, 0)
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out["spawn"] = subprocess.run(["/bin/true"]).returncode
# An invalid type flag: EINVAL from the kernel unless the filter answers first.
BAD = 1 | 0x100000
out["socket_vsock"] = sc(41, 40, BAD, 0)
out["socket_alg"] = sc(41, 38, BAD, 0)
out["socket_vsock_high_bits"] = sc(41, (1 << 32) | 40, BAD, 0)
out["socket_inet_bad"] = sc(41, 2, BAD, 0)
out["socket_inet"] = py(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
fd = os.open("/dev/null", os.O_RDONLY)
c = ctypes.c_char(b"x")
out["tiocsti"] = sc(16, fd, 0x5412, ctypes.addressof(c))
out["tiocsti_high_bits"] = sc(16, fd, 0xFFFFFFFF00005412, ctypes.addressof(c))
out["tioclinux"] = sc(16, fd, 0x541C, ctypes.addressof(c))
out["tcgets"] = sc(16, fd, 0x5401, ctypes.addressof(ctypes.create_string_buffer(64)))
out["keyctl"] = sc(250, 9999, 0, 0, 0, 0)
out["bpf"] = sc(321, 9999, 0, 0)
out["io_uring_setup"] = sc(425, 0, 0)
# Not on the list: refused (the kernel would answer 0, EINVAL, EINVAL).
out["move_pages"] = sc(279, 0, 0, 0, 0, 0, 0)
out["mbind"] = sc(237, 0, 0, 0, 0, 0, 0)
out["userfaultfd"] = sc(323, 0xFFFFFFFF)
# On the list: the kernel answers (no such request and no tracee: ESRCH).
out["ptrace"] = sc(101, 0xFFFF, 0, 0, 0)
path = ctypes.create_string_buffer(b"/corral-nonexistent")
out["name_to_handle_at"] = sc(303, 2**64 - 100, ctypes.addressof(path), 0, 0, 0)
# personality: the plain personas and the query; not ADDR_NO_RANDOMIZE, not
# junk in the upper half (each change is undone at once).
out["personality_query"] = sc(135, 0xFFFFFFFF)
out["personality_linux32"] = [sc(135, 0x0008), sc(135, 0)]
out["personality_no_aslr"] = [sc(135, 0x0040000), sc(135, 0)]
out["personality_high_bits"] = [sc(135, 1 << 32), sc(135, 0)]
# Newer than every name on the list (statmount, Linux 6.8): ENOSYS.
out["statmount"] = sc(457, 0, 0, 0, 0)
out["status"] = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("Seccomp:")]
"""


@x86_64_only
@requires_root
def test_default_profile_refuses_what_a_container_should_not_do() -> None:
    """An allow-list: mount, unshare, setns, namespace flags on clone, keyctl,
    bpf, io_uring and whatever is not on the list (move_pages, mbind,
    userfaultfd) are EPERM; clone3 and a syscall newer than the list are
    ENOSYS; personality only with plain personas; AF_VSOCK and AF_ALG sockets
    are EAFNOSUPPORT; TIOCSTI is EPERM even with junk in the upper 32 bits;
    what is on the list reaches the kernel."""
    out = run_filtered(DEFAULT, DOCKER_CAPS, _DEFAULT_PROBES)
    assert out == {
        "getpid": True,
        "mount": "EPERM",
        "umount2": "EPERM",
        "unshare_user": "EPERM",
        "setns": "EPERM",
        "clone_ns": ["EPERM"],
        "clone_ns_high_bits": "EPERM",
        "clone_plain": "EINVAL",
        "clone3": "ENOSYS",
        "fork": 7,
        "spawn": 0,
        "socket_vsock": "EAFNOSUPPORT",
        "socket_alg": "EAFNOSUPPORT",
        "socket_vsock_high_bits": "EAFNOSUPPORT",
        "socket_inet_bad": "EINVAL",
        "socket_inet": "ok",
        "tiocsti": "EPERM",
        "tiocsti_high_bits": "EPERM",
        "tioclinux": "EPERM",
        "tcgets": "ENOTTY",
        "keyctl": "EPERM",
        "bpf": "EPERM",
        "io_uring_setup": "EPERM",
        "move_pages": "EPERM",
        "mbind": "EPERM",
        "userfaultfd": "EPERM",
        "ptrace": "ESRCH",
        "name_to_handle_at": "ENOENT",
        "personality_query": "ok",
        "personality_linux32": ["ok", "ok"],
        "personality_no_aslr": ["EPERM", "ok"],
        "personality_high_bits": ["EPERM", "ok"],
        "statmount": "ENOSYS",
        "status": ["2"],
    }


@x86_64_only
@requires_root
def test_unconfined_and_the_kernels_own_answers() -> None:
    """Without a filter the same probes get the kernel's answers: the probes
    above really tell the filter apart from the kernel."""
    out = run_filtered(UNCONFINED, None, _DEFAULT_PROBES)
    assert out["status"] == ["0"]
    assert out["mount"] == "ENOENT" and out["setns"] == "EBADF"
    assert out["clone_ns"] == ["EINVAL"] and out["clone3"] == "EINVAL"
    assert out["socket_vsock"] == out["socket_alg"] == "EINVAL"
    assert out["tiocsti"] == "ENOTTY" and out["keyctl"] == "ENOTSUP"
    assert out["move_pages"] == out["mbind"] == "ok" and out["userfaultfd"] == "EINVAL"
    assert out["personality_no_aslr"] == out["personality_high_bits"] == ["ok", "ok"]
    if os.uname().release >= "6.8":  # statmount exists: the kernel answers
        assert out["statmount"] != "ENOSYS"


@x86_64_only
@requires_root
def test_capabilities_allow_what_they_are_for() -> None:
    """A sandbox keeping CAP_SYS_ADMIN may mount, setns and clone namespaces,
    one keeping CAP_SYS_NICE mbind (as in Docker); keyrings, io_uring,
    move_pages and TIOCSTI stay refused."""
    sys_nice = CAPABILITIES["SYS_NICE"]
    out = run_filtered(DEFAULT, [*DOCKER_CAPS, SYS_ADMIN, sys_nice], _DEFAULT_PROBES)
    assert out["mount"] == "ENOENT" and out["setns"] == "EBADF"
    assert out["clone_ns"] == ["EINVAL"] and out["clone3"] == "EINVAL"
    assert out["keyctl"] == "EPERM" and out["io_uring_setup"] == "EPERM"
    assert out["tiocsti"] == "EPERM" and out["socket_vsock"] == "EAFNOSUPPORT"
    assert out["mbind"] == "ok" and out["move_pages"] == "EPERM"
    assert out["status"] == ["2"]


@requires_root
def test_exec_works_under_the_filter_after_dropping_capabilities() -> None:
    """Docker's capabilities, no_new_privs, the default filter, then execve: the
    program runs, and the filter came along."""
    out = run_filtered(
        DEFAULT,
        DOCKER_CAPS,
        """
        r = subprocess.run(["/bin/sh", "-c", "grep ^Seccomp: /proc/self/status; exec /bin/true"],
                           capture_output=True, text=True)
        out["rc"], out["status"] = r.returncode, r.stdout.split()
        out["caps"] = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff")]
        """,
        drop=True,
    )
    assert out == {"rc": 0, "status": ["Seccomp:", "2"], "caps": ["00000000a80425fb"]}


_ORDINARY = r"""
import os, subprocess, tempfile
work = tempfile.mkdtemp()
def run(key, argv):
    r = subprocess.run(argv, capture_output=True, text=True, cwd=work)
    out[key] = [r.returncode, r.stderr.strip()[-200:]]
# Debian's python3: threads, epoll, posix_spawn (glibc's clone path), pipes.
script = "\n".join([
    "import os, select, threading",
    "ep = select.epoll(); r, w = os.pipe(); ep.register(r, select.EPOLLIN)",
    "t = threading.Thread(target=os.write, args=(w, b'x')); t.start(); t.join()",
    "assert ep.poll(5) == [(r, select.EPOLLIN)]",
    "pid = os.posix_spawn('/bin/true', ['true'], dict(os.environ))",
    "assert os.waitpid(pid, 0)[1] == 0",
])
run("python3", ["/usr/bin/python3", "-c", script])
# busybox: a shell, a pipeline, ps (reads /proc), a refused TCP connect to loopback.
run("busybox", ["/bin/busybox", "sh", "-c",
    "busybox ls / >/dev/null && busybox ps >/dev/null && echo x | busybox sed s/x/y/"
    " | busybox grep -q y && ! busybox nc -w 1 127.0.0.1 9 </dev/null 2>/dev/null"])
# A Go binary (the runtime's threads, futexes, signals, epoll): umoci writes an OCI layout.
run("go", ["/usr/bin/umoci", "init", "--layout", os.path.join(work, "layout")])
# apt: reads its lists and resolves a package, without locking the host's.
run("apt-get", ["/usr/bin/apt-get", "-s", "-o", "Debug::NoLocking=1", "install", "busybox-static"])
subprocess.run(["rm", "-rf", work], check=True)
"""


@x86_64_only
@requires_root
@pytest.mark.skipif(
    not os.path.exists("/usr/bin/umoci"), reason="umoci (a Go binary) comes with make setup"
)
def test_ordinary_programs_run_unchanged_under_the_default_profile() -> None:
    """Debian's python3 (threads, epoll, posix_spawn), busybox, a Go binary and
    apt-get run under Docker's capabilities, no_new_privs and the default
    allow-list as they do without it."""
    out = run_filtered(DEFAULT, DOCKER_CAPS, _ORDINARY, drop=True)
    assert out == {key: [0, ""] for key in ("python3", "busybox", "go", "apt-get")}, out
    bare = run_filtered(UNCONFINED, None, _ORDINARY)
    assert bare == out


def test_default_tables_are_consistent() -> None:
    """No name is listed twice, a capability allows only what the list does
    not, and libseccomp knows every name but the few recorded as newer than
    it (an unknown one is skipped silently: ENOSYS in the sandbox)."""
    import pyseccomp  # type: ignore[import-untyped]

    assert len(set(DEFAULT_ALLOWED)) == len(DEFAULT_ALLOWED)
    listed = set(DEFAULT_ALLOWED)
    for cap, names in _ALLOWED_WITH.items():
        assert cap in CAPABILITIES
        assert not set(names) & listed, cap
    every = listed | {n for _, names in _ALLOWED_ON_ARCH for n in names}
    every |= {n for names in _ALLOWED_WITH.values() for n in names}
    unknown = {n for n in every if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) == -1}
    known_elsewhere = {n for _, names in _ALLOWED_ON_ARCH for n in names} - listed
    assert unknown - known_elsewhere == _NEWER_THAN_LIBSECCOMP - known_elsewhere
    # What a container has no business doing is not on the list.
    for name in ("mount", "unshare", "setns", "bpf", "keyctl", "io_uring_setup",
                 "userfaultfd", "kexec_load", "init_module", "open_by_handle_at",
                 "move_pages", "mbind", "clone", "clone3", "personality"):  # fmt: skip
        assert name not in listed, name


# -- Docker profiles --------------------------------------------------------------


@requires_root
def test_profile_denies_mkdir_with_its_errno(tmp_path: Path) -> None:
    """A Docker profile refusing mkdir/mkdirat with errnoRet 13: EACCES; a name
    libseccomp does not know is skipped, everything else is allowed."""
    path = write_profile(
        tmp_path / "nomkdir.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {
                    "names": ["mkdir", "mkdirat", "corral_no_such_syscall"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 13,
                    "comment": "ignored, like any key Docker does not know",
                }
            ],
        },
    )
    assert parse_seccomp(path) == path
    target = tmp_path / "made"
    out = run_filtered(
        path,
        DOCKER_CAPS,
        f"""
        out["mkdir"] = py(os.mkdir, {str(target)!r})
        fd = os.open({str(tmp_path)!r}, os.O_RDONLY)
        out["mkdirat"] = py(lambda: os.mkdir("made", dir_fd=fd))
        out["listdir"] = py(os.listdir, {str(tmp_path)!r})
        """,
    )
    assert out == {"mkdir": "EACCES", "mkdirat": "EACCES", "listdir": "ok"}
    assert not target.exists()


@requires_root
def test_profile_masked_eq_on_an_argument(tmp_path: Path) -> None:
    """SCMP_CMP_MASKED_EQ (value: the mask, valueTwo: what to compare): UDP
    sockets refused with or without SOCK_CLOEXEC, TCP ones allowed."""
    path = write_profile(
        tmp_path / "noudp.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {
                    "name": "socket",
                    "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 1, "value": 15, "valueTwo": 2, "op": "SCMP_CMP_MASKED_EQ"}],
                }
            ],
        },
    )
    out = run_filtered(
        parse_seccomp(path),
        DOCKER_CAPS,
        """
        out["udp"] = py(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        out["udp_cloexec"] = py(socket.socket, socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        out["tcp"] = py(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        """,
    )
    assert out == {"udp": "EPERM", "udp_cloexec": "EPERM", "tcp": "ok"}


@x86_64_only
@requires_root
def test_profile_includes_and_excludes(tmp_path: Path) -> None:
    """includes.caps: the rule holds only if the sandbox keeps every cap named;
    excludes.caps: not if it keeps any; arches (Docker's names) and minKernel
    are the host's."""
    path = write_profile(
        tmp_path / "caps.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["rmdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "excludes": {"caps": ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]}},
                {"names": ["chdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "includes": {"minKernel": "99.0"}},
                {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "includes": {"arches": ["amd64"], "minKernel": "3.10"}},
                {"names": ["rename"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "excludes": {"arches": ["s390x", "amd64"]}},
            ],
        },
    )  # fmt: skip
    new, missing = str(tmp_path / "new"), str(tmp_path / "missing")
    probes = f"""
        out["mkdir"] = py(os.mkdir, {new!r})
        out["rmdir"] = py(os.rmdir, {missing!r})
        out["chdir"] = py(os.chdir, "/")
        out["getcwd"] = py(os.getcwd)
        out["rename"] = py(os.rename, {missing!r}, {new!r} + "2")
        """
    with_admin = run_filtered(path, [0, SYS_ADMIN], probes)
    without = run_filtered(path, [0], probes)
    expected = {"chdir": "ok", "getcwd": "EACCES", "rename": "ENOENT"}
    assert with_admin == {"mkdir": "EACCES", "rmdir": "ENOENT", **expected}
    assert without == {"mkdir": "ok", "rmdir": "EACCES", **expected}


def test_profile_rule_equal_to_the_default_is_dropped(tmp_path: Path) -> None:
    """An allow rule in an allow-by-default profile (libseccomp would refuse
    it) is dropped, as runc does; same-argument comparisons are alternatives."""
    path = write_profile(
        tmp_path / "redundant.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
            ],
        },
    )  # fmt: skip
    assert parse_seccomp(path) == path
    bare = compile_filter(
        write_profile(tmp_path / "bare.json", {"defaultAction": "SCMP_ACT_ALLOW"}), None
    )
    redundant = compile_filter(path, None)
    assert bare is not None and redundant is not None and len(bare[0]) < len(redundant[0])


# -- bad input: one line naming the field ----------------------------------------

_ACTIONS = (
    "SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, SCMP_ACT_KILL_THREAD, "
    "SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_TRACE, SCMP_ACT_LOG"
)
_OPS = (
    "SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_GT, "
    "SCMP_CMP_MASKED_EQ"
)
_EXPECTED = 'seccomp: expected "default", "unconfined" or the absolute path of a Docker seccomp profile (JSON), got'


def _rule(**kw: object) -> dict[str, object]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", **kw}],
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("foo", f"{_EXPECTED} 'foo'"),
        ("profiles/seccomp.json", f"{_EXPECTED} 'profiles/seccomp.json'"),
        ("", f"{_EXPECTED} ''"),
        (5, f"{_EXPECTED} 5"),
        (None, f"{_EXPECTED} None"),
        ("/corral/no/such/profile.json", "seccomp: cannot read /corral/no/such/profile.json: No such file or directory"),
        ("/", "seccomp: cannot read /: Is a directory"),
    ],
)  # fmt: skip
def test_parse_rejects_settings(value: object, message: str) -> None:
    """Not default, unconfined or an absolute path to a readable file: one line."""
    with pytest.raises(SpecError) as exc:
        parse_seccomp(value)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("\xff", "is not valid JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        ([], ": expected a JSON object (a Docker seccomp profile), got a list"),
        ({}, f": defaultAction: expected one of {_ACTIONS}, got nothing"),
        ({"defaultAction": "SCMP_ACT_NOPE"}, f": defaultAction: expected one of {_ACTIONS}, got 'SCMP_ACT_NOPE'"),
        (_rule(action="SCMP_ACT_NOPE"), f": syscalls[0].action: expected one of {_ACTIONS}, got 'SCMP_ACT_NOPE'"),
        (_rule(action="SCMP_ACT_NOTIFY"), ": syscalls[0].action: SCMP_ACT_NOTIFY is not supported: corral runs no seccomp listener"),
        (_rule(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_NOPE"}]), f": syscalls[0].args[0].op: expected one of {_OPS}, got 'SCMP_CMP_NOPE'"),
        (_rule(args=[{"index": 0, "value": 1}]), f": syscalls[0].args[0].op: expected one of {_OPS}, got nothing"),
        (_rule(args=[{"index": 6, "op": "SCMP_CMP_EQ"}]), ": syscalls[0].args[0].index: expected an argument index 0 to 5, got 6"),
        (_rule(args=[{"index": "0", "op": "SCMP_CMP_EQ"}]), ": syscalls[0].args[0].index: expected an argument index 0 to 5, got '0'"),
        (_rule(args=[{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]), ": syscalls[0].args[0].value: expected an unsigned 64-bit number, got -1"),
        (_rule(args={"index": 0}), ": syscalls[0].args: expected a list, got an object"),
        (_rule(errnoRet=True), ": syscalls[0].errnoRet: expected an errno number 0 to 4095, got True"),
        (_rule(errnoRet=12345), ": syscalls[0].errnoRet: expected an errno number 0 to 4095, got 12345"),
        (_rule(includes={"caps": ["CAP_NOPE"]}), ": syscalls[0].includes.caps[0]: expected a capability like CAP_SYS_ADMIN, got 'CAP_NOPE'"),
        (_rule(excludes={"caps": "CAP_SYS_ADMIN"}), ": syscalls[0].excludes.caps: expected a list, got a string"),
        (_rule(includes={"minKernel": "4"}), ": syscalls[0].includes.minKernel: expected a kernel version like '4.8', got '4'"),
        (_rule(includes=["caps"]), ": syscalls[0].includes: expected an object, got a list"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "mkdir", "action": "SCMP_ACT_ERRNO"}]}, ": syscalls[0].names: expected a list, got a string"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", 7], "action": "SCMP_ACT_ERRNO"}]}, ": syscalls[0].names[1]: expected a syscall name like mkdir, got 7"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "mkdir", "names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}, ': syscalls[0]: use either "name" or "names", not both'),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}, ': syscalls[0]: expected "names", a list of syscall names'),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": ["mkdir"]}, ": syscalls[0]: expected an object, got a string"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {"mkdir": 1}}, ": syscalls: expected a list, got an object"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_NOPE"]}, ": architectures[1]: expected an architecture like SCMP_ARCH_X86_64, got 'SCMP_ARCH_NOPE'"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "x86_64", "subArchitectures": None}]}, ": archMap[0].architecture: expected an architecture like SCMP_ARCH_X86_64, got 'x86_64'"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86"], "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, ': use either "architectures" or "archMap", not both'),
        ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}, ": flags: not supported: the filter is loaded with prctl(2), without flags"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": "EPERM"}, ": defaultErrnoRet: expected an errno number 0 to 4095, got 'EPERM'"),
    ],
)  # fmt: skip
def test_parse_rejects_bad_profiles(tmp_path: Path, content: object, message: str) -> None:
    """A bad profile is one line: the field, the file, where in it, what was expected."""
    path = tmp_path / "profile.json"
    if isinstance(content, str):
        path.write_bytes(content.encode("latin-1") if content == "\xff" else content.encode())
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(SpecError) as exc:
        parse_seccomp(str(path), field="sandboxes.web.seccomp")
    sep = "" if message.startswith(":") else " "
    assert str(exc.value) == f"sandboxes.web.seccomp: {path}{sep}{message}"
    assert "\n" not in str(exc.value)


def test_architectures_known_only_to_newer_libseccomp_are_accepted(tmp_path: Path) -> None:
    """Docker's own profiles may list archMap entries for architectures this
    libseccomp lacks: fine unless this host is one of them."""
    path = write_profile(
        tmp_path / "archmap.json",
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "archMap": [
                {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_LOONGARCH64", "subArchitectures": None},
            ],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}],
        },
    )  # fmt: skip
    assert parse_seccomp(path) == path


# -- the cache, the loader, import cost ---------------------------------------------


def test_compiled_filters_are_cached(tmp_path: Path) -> None:
    """The same setting and capabilities give the very same programs (the
    same object: not compiled again); a changed profile file is compiled
    again; unconfined is no filter. The default is two programs."""
    first = compile_filter(DEFAULT, DOCKER_CAPS)
    again = compile_filter(DEFAULT, list(reversed(DOCKER_CAPS)))
    assert first is again and first is not None and len(first) == 2
    assert all(p and len(p) % 8 == 0 for p in first)
    assert compile_filter(DEFAULT, [*DOCKER_CAPS, SYS_ADMIN]) != first
    assert compile_filter(UNCONFINED, DOCKER_CAPS) is None

    rule = {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}
    path = write_profile(
        tmp_path / "p.json", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}
    )
    one = compile_filter(path, None)
    assert compile_filter(path, None) is one
    write_profile(
        tmp_path / "p.json",
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule, {**rule, "names": ["rmdir"]}]},
    )
    two = compile_filter(path, None)
    assert two is not None and one is not None and len(two[0]) > len(one[0])


def test_load_seccomp_refuses_what_is_not_a_program() -> None:
    """Bytes that cannot be a sock_filter array are refused before the kernel sees them."""
    for junk in (b"", b"1234567", b"\0" * 8 * 4097):
        with pytest.raises(OSError, match="not a BPF program"):
            load_seccomp(junk)


def test_import_is_cheap() -> None:
    """Importing the module (the CLI does) does not load pyseccomp, whose import
    runs ldconfig; unconfined never does."""
    code = (
        "import sys; from supervisor._runtime._seccomp import compile_filter, parse_seccomp; "
        "parse_seccomp('unconfined'); parse_seccomp('default'); compile_filter('unconfined', None); "
        "print('pyseccomp' in sys.modules)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        check=True,
    )
    assert p.stdout == b"False\n"
