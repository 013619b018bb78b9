"""Root file systems: building, caching and configuring sandbox bases.

A base is a read-only directory in the cache; each sandbox runs on an
overlayfs with a private writable layer on top of it (mounted by the
runtime in :mod:`supervisor`). Builders:

- ``busybox``: from the host's static busybox, offline; the default.
"""

from __future__ import annotations

from ._busybox import ensure_busybox as ensure_busybox
from ._busybox import is_static_elf as is_static_elf
from ._errors import RootfsError as RootfsError

BUILTIN_BASES = ("busybox",)
"""Names accepted as ``rootfs`` besides a directory path."""

__all__ = ["BUILTIN_BASES", "RootfsError", "ensure_busybox", "is_static_elf"]
