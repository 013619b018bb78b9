"""The device policy of a sandbox, one table for both cgroup layouts.

:data:`DEVICE_RULES` says which device nodes a (non-privileged) sandbox may
make and use. On cgroup v1 it becomes the ``devices.allow`` lines written
after ``devices.deny a`` (:func:`v1_lines`). cgroup v2 has no device files:
there the kernel asks a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to
the cgroup, and :func:`device_program` builds that program from the same
table, as runc and crun do. No Python library writes one, so the few
instructions it takes are spelled out here; the kernel's verifier checks
them at every load (:func:`attach_device_program`).

How the kernel runs the program (``include/uapi/linux/bpf.h``): on every
``mknod(2)`` of a node and every ``open(2)`` of one, with R1 pointing at::

    struct bpf_cgroup_dev_ctx {
        __u32 access_type;  /* (BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_* */
        __u32 major;
        __u32 minor;
    };

where the device type is ``BLOCK`` = 1 or ``CHAR`` = 2 and the access a
set of ``MKNOD`` = 1, ``READ`` = 2, ``WRITE`` = 4. It returns 1 to allow and
0 to refuse (the caller gets EPERM). Every program attached to the cgroup
and to its ancestors must allow.

The program stays attached after corral's process exits (the attachment
holds it, not our descriptor), so a sandbox keeps its policy across
supervisor restarts; ``corral exec`` joins the cgroup and so the policy.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import sys
import threading

from ..._errors import CgroupError

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Literal, NamedTuple
else:
    from .._tuples import NamedTuple

__all__ = [
    "DEVICE_RULES",
    "DeviceRule",
    "attach_device_program",
    "attached_device_programs",
    "device_program",
    "load_device_program",
    "v1_lines",
]


class DeviceRule(NamedTuple):
    """What a sandbox may do with one kind of device node."""

    kind: Literal["c", "b"]
    """``c`` for a character device, ``b`` for a block device."""
    major: int | None
    """The major number; ``None`` for any."""
    minor: int | None
    """The minor number; ``None`` for any."""
    access: str
    """What is allowed, in ``rwm`` order: read, write, mknod."""

    def v1_line(self) -> str:
        """The rule as cgroup v1's ``devices.allow`` takes it (and
        ``devices.list`` shows it back): ``c 1:3 rwm``."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {major}:{minor} {self.access}"


DEVICE_RULES = (
    # mknod of any node (as Docker): making a node is not opening it, and
    # images carry nodes (whiteouts are 0:0 character devices).
    DeviceRule("c", None, None, "m"),
    DeviceRule("b", None, None, "m"),
    DeviceRule("c", 1, 3, "rwm"),  # null
    DeviceRule("c", 1, 5, "rwm"),  # zero
    DeviceRule("c", 1, 7, "rwm"),  # full
    DeviceRule("c", 1, 8, "rwm"),  # random
    DeviceRule("c", 1, 9, "rwm"),  # urandom
    DeviceRule("c", 5, 0, "rwm"),  # tty
    DeviceRule("c", 5, 1, "rwm"),  # console
    DeviceRule("c", 5, 2, "rwm"),  # ptmx
    DeviceRule("c", 136, None, "rwm"),  # the pty slaves of /dev/pts
)
"""The device policy of every sandbox that is not privileged: the standard
character devices and ptys; everything else refused. Nothing asks for
``/dev/fuse`` (10:229) today: a rule for it belongs here when something does."""


def v1_lines(rules: tuple[DeviceRule, ...] = DEVICE_RULES) -> tuple[str, ...]:
    """The ``devices.allow`` lines of *rules* (cgroup v1)."""
    return tuple(r.v1_line() for r in rules)


# --- the program -----------------------------------------------------------

# Opcode parts (include/uapi/linux/bpf.h, bpf_common.h): class | op | source.
_LDX, _ALU, _JMP = 0x01, 0x04, 0x05  # classes (_ALU: 32-bit operations)
_MEM, _W = 0x60, 0x00  # a 32-bit load from memory
_K, _X = 0x00, 0x08  # the operand: the immediate, or the source register
_AND, _RSH, _MOV = 0x50, 0x70, 0xB0
_JNE, _JSET, _EXIT = 0x50, 0x40, 0x90

# Registers: R0 holds the return value, R1 the context on entry; the rest
# are ours to use (R2-R5 are never read before they are written here).
_R0, _R1, _TYPE, _ACCESS, _MAJOR, _MINOR = 0, 1, 2, 3, 4, 5

_DEV_BLOCK, _DEV_CHAR = 1, 2  # BPF_DEVCG_DEV_*
_ACC = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_*
_ACC_ALL = 0xFFFF  # every bit the access half of access_type may carry

_LITTLE = sys.byteorder == "little"


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: opcode, the two 4-bit register fields
    (a C bit field: which nibble is which follows the byte order), a
    16-bit jump offset and a 32-bit immediate."""
    regs = (dst | src << 4) if _LITTLE else (dst << 4 | src)
    return struct.pack("=BBhi", code, regs, off, imm)


def _load_word(dst: int, offset: int) -> bytes:
    """``dst = *(u32 *)(R1 + offset)``: a field of the context."""
    return _insn(_LDX | _MEM | _W, dst, _R1, offset)


def _return(value: int) -> list[bytes]:
    """``R0 = value; exit``."""
    return [_insn(_ALU | _MOV | _K, _R0, imm=value), _insn(_JMP | _EXIT)]


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """The instructions that allow what *rule* allows and otherwise fall
    through to the next rule: each test jumps past the block's end."""
    tests: list[tuple[int, int, int]] = [  # (jump opcode, register, immediate)
        (_JMP | _JNE | _K, _TYPE, _DEV_CHAR if rule.kind == "c" else _DEV_BLOCK)
    ]
    allowed = sum(_ACC[a] for a in set(rule.access))
    # Any access bit outside the rule's set (an unknown one too) skips it.
    tests.append((_JMP | _JSET | _K, _ACCESS, _ACC_ALL & ~allowed))
    if rule.major is not None:
        tests.append((_JMP | _JNE | _K, _MAJOR, rule.major))
    if rule.minor is not None:
        tests.append((_JMP | _JNE | _K, _MINOR, rule.minor))
    block_len = len(tests) + 2  # the tests, then "return 1"
    # A jump's offset counts from the instruction after it.
    out = [
        _insn(code, reg, off=block_len - (i + 1), imm=imm)
        for i, (code, reg, imm) in enumerate(tests)
    ]
    return out + _return(1)


@functools.lru_cache(maxsize=4)
def device_program(rules: tuple[DeviceRule, ...] = DEVICE_RULES) -> bytes:
    """The eBPF instructions of a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program
    that allows what *rules* allow and refuses everything else."""
    for rule in rules:
        if rule.kind not in ("c", "b") or not rule.access or set(rule.access) - set(_ACC):
            raise ValueError(f"device rule {rule.v1_line()!r}: expected c|b and rwm")
    prologue = [
        _load_word(_TYPE, 0),  # access_type ...
        _insn(_ALU | _MOV | _X, _ACCESS, _TYPE),
        _insn(_ALU | _RSH | _K, _ACCESS, imm=16),  # ... its access half
        _insn(_ALU | _AND | _K, _TYPE, imm=0xFFFF),  # ... its device type half
        _load_word(_MAJOR, 4),
        _load_word(_MINOR, 8),
    ]
    body = [insn for rule in rules for insn in _rule_block(rule)]
    return b"".join(prologue + body + _return(0))


# --- bpf(2) ----------------------------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD, _BPF_PROG_ATTACH, _BPF_PROG_QUERY = 5, 8, 16
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6  # the attach type
_BPF_F_ALLOW_MULTI = 2
_LICENSE = b"Apache-2.0\0"
"""The program calls no kernel helper, so the kernel asks no GPL-compatible
license of it (it would only for a GPL-only helper)."""
_NAME = b"corral_devices"  # shown by bpftool; at most 15 bytes
_LOG_SIZE = 1 << 16

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2): unsupported architecture {os.uname().machine}")
    ret: int = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def load_device_program(rules: tuple[DeviceRule, ...] = DEVICE_RULES) -> int:
    """Load the program of *rules* (:func:`device_program`); its descriptor
    (close-on-exec, as the kernel makes every bpf descriptor).

    Raises :class:`~supervisor.CgroupError` with one line saying why: not
    permitted (bpf(2) needs CAP_SYS_ADMIN, or CAP_BPF), no such program
    type in this kernel, or the verifier's own words if it refused.
    """
    return _load(device_program(rules))


def _load(insns: bytes) -> int:
    """``BPF_PROG_LOAD`` of *insns* as a cgroup device program; see
    :func:`load_device_program`."""
    license_buf = ctypes.create_string_buffer(_LICENSE)
    insn_buf = ctypes.create_string_buffer(insns, len(insns))

    def attr(log: ctypes.Array[ctypes.c_char] | None) -> ctypes.Array[ctypes.c_char]:
        # union bpf_attr, the BPF_PROG_LOAD part (up to expected_attach_type).
        buf = ctypes.create_string_buffer(72)
        struct.pack_into(
            "=IIQQIIQII16sII",
            buf,
            0,
            _BPF_PROG_TYPE_CGROUP_DEVICE,
            len(insns) // 8,
            ctypes.addressof(insn_buf),
            ctypes.addressof(license_buf),
            1 if log is not None else 0,  # log_level
            len(log) if log is not None else 0,
            ctypes.addressof(log) if log is not None else 0,
            0,  # kern_version: only kprobes need it
            0,  # prog_flags
            _NAME,
            0,  # prog_ifindex
            _BPF_CGROUP_DEVICE,  # expected_attach_type
        )
        return buf

    try:
        return _bpf(_BPF_PROG_LOAD, attr(None))
    except OSError as exc:
        first = exc
    if first.errno in (errno.EPERM, errno.ENOSYS):
        raise CgroupError(
            f"cannot load the device program: bpf(2): {first.strerror}"
            " (it needs CAP_SYS_ADMIN or CAP_BPF, and a kernel with bpf(2))"
        ) from None
    # Refused: load again with the verifier's log, which says why (a
    # kernel without the program type refuses with EINVAL and an empty log).
    log = ctypes.create_string_buffer(_LOG_SIZE)
    try:
        fd = _bpf(_BPF_PROG_LOAD, attr(log))
    except OSError:
        text = log.value.decode(errors="replace").strip()
        # The last lines say why; the statistics after them say nothing.
        lines = [
            line
            for line in text.splitlines()
            if line.strip() and not line.startswith(("processed ", "verification time"))
        ]
        why = " / ".join(lines[-3:]) if lines else "no verifier log: no such program type?"
        raise CgroupError(
            f"cannot load the device program (BPF_PROG_TYPE_CGROUP_DEVICE): {first.strerror}: {why}"
        ) from None
    return fd  # pragma: no cover - refused once, accepted with a log: a fluke


_shared_lock = threading.Lock()
_shared_fd = -1


def _shared_program() -> int:
    """The program of :data:`DEVICE_RULES`, loaded on first use and kept
    for the life of the process: a load runs the verifier (0.13 ms on the
    host, twenty times an attach; ``docs/performance.md``), an attach only
    links the one program to another cgroup. Close-on-exec, so no sandbox
    or helper inherits it."""
    global _shared_fd
    with _shared_lock:  # cgroups are made in worker threads, several at once
        if _shared_fd < 0:
            _shared_fd = load_device_program()
        return _shared_fd


def attach_device_program(path: str, prog_fd: int | None = None) -> None:
    """Attach the device program *prog_fd* (by default the program of
    :data:`DEVICE_RULES`, loaded once per process) to the cgroup v2
    directory *path*.

    Attached with ``BPF_F_ALLOW_MULTI``: a program that something inside
    attaches to a cgroup below adds a check and cannot take ours away
    (every program on the way up must allow). Raises
    :class:`~supervisor.CgroupError` naming the path.
    """
    try:
        fd = _shared_program() if prog_fd is None else prog_fd
    except CgroupError as exc:
        raise CgroupError(f"the device policy of {path}: {exc}") from None
    try:
        cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"open {path}: {exc.strerror}") from None
    try:
        attr = ctypes.create_string_buffer(20)
        # union bpf_attr, the BPF_PROG_ATTACH part: target_fd,
        # attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd.
        struct.pack_into("=IIIII", attr, 0, cg, fd, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI, 0)
        try:
            _bpf(_BPF_PROG_ATTACH, attr)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EPERM:
                hint = " (a program attached above without BPF_F_ALLOW_MULTI forbids it)"
            raise CgroupError(
                f"attach the device program to {path}: {exc.strerror}{hint}"
            ) from None
    finally:
        os.close(cg)


def attached_device_programs(path: str) -> int:
    """How many device programs are attached to the cgroup v2 directory
    *path* itself (not counting its ancestors')."""
    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # union bpf_attr, the BPF_PROG_QUERY part: target_fd, attach_type,
        # query_flags, attach_flags, prog_ids (none: only the count), prog_cnt.
        attr = ctypes.create_string_buffer(28)
        struct.pack_into("=IIIIQI", attr, 0, cg, _BPF_CGROUP_DEVICE, 0, 0, 0, 0)
        _bpf(_BPF_PROG_QUERY, attr)
        count: int = struct.unpack_from("=I", attr, 24)[0]
        return count
    finally:
        os.close(cg)
