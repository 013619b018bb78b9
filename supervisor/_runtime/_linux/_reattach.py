"""Re-attach lxcfs's files in running sandboxes, after lxcfs was restarted.

A program, run as ``python -m supervisor._runtime._linux._reattach
MOUNTPOINT PIDFD:TARGET[,TARGET...]...`` with each PIDFD (a pidfd of a
sandbox's init) inherited. It must join each sandbox's mount namespace
with ``setns``, which the kernel refuses to a process with other threads
(they share its root and working directory): the supervisor has threads,
and no Python may run between fork and exec there, so this is an exec'd
process of its own, single-threaded.

For each sandbox, in the host's mount namespace, it clones each file of
the live lxcfs at MOUNTPOINT into a detached mount (``open_tree``) made
read-only, nosuid, nodev and noexec (``mount_setattr``); then, in the
sandbox's mount namespace, it lazily unmounts the dead lxcfs mount at each
TARGET (a dead FUSE connection answers nothing, so only a lazy unmount
works) and attaches the clone in its place (``move_mount``). This is the
way of lxcfs issue #583 ("lxcfs-reattach"); a mount cannot be made from a
path the sandbox cannot see, and the detached clone needs no path there.

Between the unmount and the attach (microseconds) a reader sees the
kernel's own file. Each failure is one line on stderr, ``PIDFD: reason``;
the exit status is 1 if there was any.
"""

from __future__ import annotations

import errno
import os
import sys

from . import _syscalls as sc
from ._child import LXCFS_FILES

_ATTRS = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
_UNDER = {"proc": sc.PROC_SUPER_MAGIC, "sys": sc.SYSFS_MAGIC}
"""What a target must be once the dead mount is gone: a file of the
sandbox's own procfs or sysfs (else something else is mounted there)."""


def reattach(mountpoint: str, pidfd: int, targets: list[str], host: int) -> None:
    """Re-attach *targets* (``/proc/meminfo``...) in the mount namespace of
    the process of *pidfd*; come back to the namespace *host*."""
    known = {"/" + f for f in LXCFS_FILES}
    for target in targets:
        if target not in known:
            raise ValueError(f"{target} is not a file of the lxcfs view")
    trees: dict[str, int] = {}
    try:
        for target in targets:
            trees[target] = sc.bind_tree(mountpoint + target, _ATTRS)
        sc.setns(pidfd, sc.CLONE_NEWNS)
        try:
            root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for target, tree in trees.items():
                    _replace(root, target, tree)
            finally:
                os.close(root)
        finally:
            sc.setns(host, sc.CLONE_NEWNS)
    finally:
        for tree in trees.values():
            os.close(tree)


def _replace(root: int, target: str, tree: int) -> None:
    try:
        sc.umount2(target, sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # not a mount point any more: gone already
            raise
    where = sc.openat2(root, target.lstrip("/"), os.O_PATH | os.O_NOFOLLOW, sc.RESOLVE_NO_SYMLINKS)
    try:
        if sc.fs_type_of(where, target) != _UNDER[target.split("/")[1]]:
            raise ValueError(f"{target}: something else is mounted there (left as it is)")
        sc.attach_tree_at(tree, where, target)
    finally:
        os.close(where)


def main(argv: list[str]) -> int:
    """Re-attach in each sandbox named on the command line; 1 if any failed."""
    mountpoint, items = argv[0], argv[1:]
    host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    status = 0
    for item in items:
        fd, _, targets = item.partition(":")
        try:
            reattach(mountpoint, int(fd), targets.split(","), host)
        except OSError as exc:
            sys.stderr.write(f"{fd}: {exc.strerror or exc}\n")
            status = 1
        except ValueError as exc:
            sys.stderr.write(f"{fd}: {exc}\n")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
