"""``corral volume``: the named volumes (``STATE_DIR/volumes/NAME``):
``ls`` and ``rm``.

A named volume is made the first time a sandbox mounts it
(``volumes = ["NAME:/TARGET"]``) and kept until removed here; ``rm`` of a
volume a sandbox of this run directory mounts is refused with the
sandbox's name.
"""

from __future__ import annotations

import argparse
import json
import os

from .._errors import CorralError, SpecError
from ._common import no_verb, run_dir, state_dir, tree_size

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    from ._parser import Subparsers

__all__ = ["add_parsers"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``volume`` and its verbs."""
    volume = sub.add_parser(
        "volume",
        help="list and remove named volumes",
        description="Named volumes: directories corral keeps in STATE_DIR/volumes for the"
        ' sandboxes that mount them (volumes = ["NAME:/TARGET"]).',
    )
    volume.set_defaults(func=lambda args: no_verb(volume))  # argparse requires a verb anyway
    verbs = volume.add_subparsers(dest="volume_verb", metavar="VERB", required=True)
    ls = verbs.add_parser("ls", help="list the volumes, their size and who mounts them")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)
    rm = verbs.add_parser("rm", help="remove volumes (refused while a sandbox mounts one)")
    rm.add_argument("names", metavar="NAME", nargs="+")
    rm.set_defaults(func=_rm)


def _folder() -> str:
    return os.path.join(state_dir(), "volumes")


def _users() -> dict[str, list[str]]:
    """The sandboxes of this run directory, by the named volume they mount."""
    folder = os.path.join(run_dir(), "sandboxes")
    out: dict[str, list[str]] = {}
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, entry)) as f:
                record = json.load(f)
            mounts = record["spec"].get("mounts") or []
            name = str(record.get("name", entry[:-5]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for m in mounts:
            if isinstance(m, dict) and m.get("kind") == "volume":
                out.setdefault(str(m.get("source")), []).append(name)
    return out


def _ls(args: argparse.Namespace) -> int:
    from ._common import human_size

    try:
        # Dot entries are volumes being removed (see _rm).
        names = sorted(n for n in os.listdir(_folder()) if not n.startswith("."))
    except FileNotFoundError:
        names = []
    users = _users()
    if not args.json and not names:
        print('no volumes (a sandbox with volumes = ["NAME:/TARGET"] makes one)')
        return 0
    if not args.json:
        print(f"{'NAME':<30} {'SIZE':>10}  USED BY")
    for name in names:
        path = os.path.join(_folder(), name)
        size = tree_size(path)
        used = users.get(name, [])
        if args.json:
            print(json.dumps({"name": name, "path": path, "size": size, "used_by": used}))
        else:
            print(f"{name:<30} {human_size(size):>10}  {', '.join(used) or '-'}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    import shutil

    from .._runtime._mounts import VOLUME_NAME_RE

    users = _users()
    for name in args.names:
        if not VOLUME_NAME_RE.match(name):
            raise SpecError("NAME", f"expected a volume name, got {name!r}")
        path = os.path.join(_folder(), name)
        if not os.path.isdir(path):
            raise CorralError(f"no volume {name!r} (corral volume ls lists them)")
        if users.get(name):
            raise CorralError(
                f"volume {name!r} is mounted by sandbox {users[name][0]!r}:"
                " remove the sandbox first"
            )
        # Renamed away first: a half-removed volume is never mounted.
        doomed = os.path.join(_folder(), f".{name}.removing.{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        print(f"removed {name}")
    return 0
