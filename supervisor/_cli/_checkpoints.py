"""``corral checkpoint``, ``restore`` and ``checkpoints``: CRIU checkpoints.

``checkpoint`` and ``restore`` ask the running supervisor through its
control socket (docs/checkpoint.md); ``checkpoints`` lists what is kept on
disk, with no supervisor needed.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._common import add_socket_option, control_path, human_size, state_dir

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    from ._parser import Subparsers

__all__ = ["add_listing_parser", "add_parsers"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``checkpoint`` and ``restore``."""
    cp = sub.add_parser(
        "checkpoint",
        help="checkpoint a running sandbox with CRIU",
        description="Dump a running sandbox instance of a running `corral up` with CRIU,"
        " together with its writable layer and spec (docs/checkpoint.md). Without"
        " --leave-running the instance is stopped once the checkpoint is complete.",
    )
    cp.add_argument(
        "name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"
    )
    cp.add_argument("--tag", help="name the checkpoint (default: the time, 20261129T101500.123456)")
    cp.add_argument(
        "--leave-running", action="store_true", help="keep the sandbox running afterwards"
    )
    add_socket_option(cp)
    cp.set_defaults(func=_checkpoint)

    rs = sub.add_parser(
        "restore",
        help="restore a sandbox from a checkpoint",
        description="Bring a checkpointed instance back under the running `corral up`, in"
        " new namespaces and a new cgroup with its limits, on its checkpointed files.",
    )
    rs.add_argument(
        "name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"
    )
    rs.add_argument("--from", dest="tag", metavar="TAG", help="which checkpoint (default: latest)")
    rs.add_argument(
        "--as",
        dest="as_name",
        metavar="NEW",
        help="restore into a new instance NEW (the original may keep running)",
    )
    add_socket_option(rs)
    rs.set_defaults(func=_restore)


def add_listing_parser(sub: Subparsers) -> None:
    """Register ``checkpoints`` (apart: ``corral --help`` lists it after the control verbs)."""
    ls = sub.add_parser(
        "checkpoints",
        help="list checkpoints",
        description="List the checkpoints kept on disk (of one instance, or of all).",
    )
    ls.add_argument("name", metavar="NAME", nargs="?", help="an instance (web-0)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ls.set_defaults(func=_checkpoints)


def _checkpoint(args: argparse.Namespace) -> int:
    from .._control._client import call

    path = control_path(args)
    params = {"name": args.name, "tag": args.tag, "leave_running": args.leave_running}
    sys.stderr.write(f"corral: checkpointing {args.name} ...\n")
    r = call(path, "checkpoint", params)
    print(
        f"checkpointed {r['name']} as {r['tag']}: {human_size(r['size'])},"
        f" {r['duration_ms']:.0f} ms, frozen {r['frozen_ms']:.0f} ms"
        + ("" if r["leave_running"] else " (stopped)")
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from .._control._client import call

    path = control_path(args)
    params = {"name": args.name, "tag": args.tag, "as": args.as_name}
    sys.stderr.write(f"corral: restoring {args.as_name or args.name} ...\n")
    r = call(path, "restore", params)
    print(f"restored {r['name']} from {r['source']}/{r['tag']}: pid {r['pid']}")
    if r.get("weakened"):
        sys.stderr.write(f"corral: warning: {r['name']} was restored without {r['weakened']}\n")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    import json
    import time

    from .._runtime._checkpoint import CheckpointStore

    store = CheckpointStore(os.path.join(state_dir(), "checkpoints"))
    names = [args.name] if args.name else list(store.names())
    found = [i for n in names for i in store.list(n)]
    if args.json:
        for i in found:
            print(json.dumps(i.to_json() | {"path": i.path}))
        return 0
    if not found:
        print("no checkpoints" + (f" of {args.name}" if args.name else ""))
        return 0
    print(f"{'NAME':<20} {'TAG':<28} {'CREATED':<20} {'SIZE':>10} {'FROZEN':>9}  MODE")
    for i in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))
        mode = "leave-running" if i.leave_running else "stopped"
        print(
            f"{i.name:<20} {i.tag:<28} {created:<20} {human_size(i.size):>10}"
            f" {i.frozen * 1000:>6.0f} ms  {mode}"
        )
    return 0
