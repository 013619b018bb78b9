"""``corral commit NAME IMAGE``: a sandbox's files as a new image.

Like ``docker commit`` (and ``lxc-snapshot``): the sandbox's writable
layer goes on top of the layers of the image it runs on (see
:mod:`supervisor._runtime._commit`). Any sandbox of this run directory:
a ``corral run`` or one of a fleet. No supervisor needed: the sandbox's
record says where it is, and its cgroup is frozen for the copy directly.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    from ._parser import Subparsers

__all__ = ["add_parsers"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``commit``."""
    commit = sub.add_parser(
        "commit",
        help="make a new image of a sandbox: its image plus what it changed",
        description="Make image IMAGE of sandbox NAME: the layers of the image it runs on, and"
        " its writable layer on top, with the image's defaults (docs/images.md). A running"
        " sandbox is paused while its layer is copied, then runs on.",
    )
    commit.add_argument("name", metavar="NAME", help="a sandbox: of `corral run` or a fleet's")
    commit.add_argument("image", metavar="IMAGE", help="the new image's name, e.g. app:2")
    commit.set_defaults(func=_commit)


def _commit(args: argparse.Namespace) -> int:
    from rootfs import reverting

    from .._runtime._commit import commit
    from .._runtime._sandbox import Runtime

    runtime = Runtime()
    with reverting():
        image = commit(runtime, args.name, args.image)
    print(f"{args.image}: {image.id}")
    return 0
