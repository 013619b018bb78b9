"""The rootfs package's exceptions.

::

    RootfsError    a base could not be found, built or used
"""

from __future__ import annotations

__all__ = ["RootfsError"]


class RootfsError(Exception):
    """A root file system could not be found, built or used.

    ``str(err)`` is a complete one-line message meant for a user.
    """
