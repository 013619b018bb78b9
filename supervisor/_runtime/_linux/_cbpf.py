"""Classic BPF for seccomp: the few instructions corral writes itself.

libseccomp builds every seccomp filter's rules. Two small programs it
cannot make are written here, from these names: the ``sysinfo``
notification filter (:mod:`._sysinfo`) and the stub that returns ENOSYS
for syscalls newer than a profile's list
(:func:`supervisor._runtime._seccomp._enosys_above`).
"""

from __future__ import annotations

import struct

__all__ = [
    "AUDIT_ARCH_I386",
    "AUDIT_ARCH_X86_64",
    "JEQ_K",
    "JGE_K",
    "JGT_K",
    "LD_W_ABS",
    "RET_ERRNO",
    "RET_K",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_USER_NOTIF",
    "insn",
]

# <linux/bpf_common.h>
LD_W_ABS = 0x20  # A = seccomp_data word at k (nr: 0, arch: 4)
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
RET_K = 0x06
# <linux/seccomp.h>, <linux/audit.h>
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
RET_ERRNO = 0x00050000  # SECCOMP_RET_ERRNO; the errno in the low 16 bits
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    """One ``struct sock_filter``: a jump's *jt*/*jf* count the
    instructions skipped when it holds or not."""
    return struct.pack("=HBBI", code, jt, jf, k)
