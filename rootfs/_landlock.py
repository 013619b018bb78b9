"""Landlock: confine the calling thread's writes to a few directories.

The OCI importer extracts layers in worker threads (:mod:`._import`).
Its own checks keep every entry inside the layer's directory; a worker
confined with :func:`confine_writes` cannot write, create, remove, rename
or truncate anything outside the directories it was given even if a check
missed a case, because the kernel refuses it (EACCES).

A Landlock domain belongs to the thread that made it (and to the threads
and processes it starts later), not to the process: the importer's other
threads, and the store's commit on the main thread, are not confined.
Reading is not restricted (the blobs, Python's own modules); nor are
``chmod``, ``chown``, ``utime`` and extended attributes, which Landlock does
not cover. A worker thread is confined once and ends with its pool.

Where the kernel has no Landlock (before 5.13, or not enabled), nothing is
confined and :func:`confine_writes` says so by returning False: the checks
remain the one line of defence, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable

__all__ = ["confine_writes", "landlock_abi"]

# The syscall numbers are the same on every architecture (the unified table).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_*: every right that changes the file system (reads and
# execution are left out, so they stay unrestricted).
_WRITE_FILE = 1 << 1
_REMOVE_DIR = 1 << 4
_REMOVE_FILE = 1 << 5
_MAKE_CHAR = 1 << 6
_MAKE_DIR = 1 << 7
_MAKE_REG = 1 << 8
_MAKE_SOCK = 1 << 9
_MAKE_FIFO = 1 << 10
_MAKE_BLOCK = 1 << 11
_MAKE_SYM = 1 << 12
_REFER = 1 << 13  # ABI 2: links and renames across directories
_TRUNCATE = 1 << 14  # ABI 3
_ABI1_WRITES = (
    _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_CHAR | _MAKE_DIR | _MAKE_REG
    | _MAKE_SOCK | _MAKE_FIFO | _MAKE_BLOCK | _MAKE_SYM
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none."""
    ret = _libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )  # fmt: skip
    return int(ret) if ret > 0 else 0


def _writes(abi: int) -> int:
    rights = _ABI1_WRITES
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    return rights


def confine_writes(directories: Iterable[str]) -> bool:
    """From now on, the calling thread (and what it starts) may change the
    file system only beneath *directories*. False if the kernel has no
    Landlock (nothing was done); OSError if it has and refused."""
    abi = landlock_abi()
    if abi == 0:
        return False
    rights = _writes(abi)
    attr = struct.pack("=Q", rights)  # struct landlock_ruleset_attr, handled_access_fs only
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for directory in directories:
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # struct landlock_path_beneath_attr is packed: u64, then s32.
                rule = struct.pack("=Qi", rights, fd)
                rbuf = ctypes.create_string_buffer(rule, len(rule))
                ret = _libc.syscall(
                    ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset),
                    ctypes.c_int(_RULE_PATH_BENEATH), rbuf, ctypes.c_uint32(0),
                )  # fmt: skip
                if ret < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule {directory}: {os.strerror(err)}")
            finally:
                os.close(fd)
        # Needed unless the thread has CAP_SYS_ADMIN; a per-thread flag, and
        # this thread execs nothing.
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        if _libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return True
