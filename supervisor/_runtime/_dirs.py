"""Where corral keeps its files on the host, by default.

A module of its own, with no imports, so that a one-shot CLI verb that only
needs a path (``corral ps`` finding the control socket) does not load the
whole runtime to learn it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_RUN_DIR", "DEFAULT_STATE_DIR", "make_run_dir"]

DEFAULT_STATE_DIR = "/var/lib/corral"
"""Sandboxes' writable layers, logs and checkpoints (``CORRAL_STATE_DIR`` overrides)."""
DEFAULT_RUN_DIR = "/run/corral"
"""A running supervisor's sockets (``CORRAL_RUN_DIR`` overrides)."""


def make_run_dir(path: str) -> None:
    """Make the run directory *path* (and its parents) if it is missing,
    and let anyone search it, not list it (0711).

    A user-namespace sandbox's root, an unprivileged host user, binds its
    lxcfs files from ``RUN_DIR/lxcfs``, and members of ``socket_group``
    connect to the control socket there: a 0700 run directory failed every
    default sandbox of a fresh ``corral up`` that started corral's lxcfs.
    What is inside keeps its own modes (0700 directories, 0600 files,
    sockets only their owner and group may connect to). A run directory
    made 0700 (by an older corral) is opened up the same way."""
    import os

    os.makedirs(path, mode=0o711, exist_ok=True)
    mode = os.stat(path).st_mode & 0o7777
    if mode & 0o011 != 0o011:
        os.chmod(path, mode | 0o011)
