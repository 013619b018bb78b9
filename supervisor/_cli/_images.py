"""``corral image``: the image store (``STATE_DIR/images``, see
:mod:`rootfs._store`): ``ls``, ``inspect``, ``build``, ``import``, ``rm``,
``prune``. ``build run`` runs a sandbox (:mod:`supervisor._runtime._commit`).

No supervisor needed: the store is files. An image a sandbox uses (any
sandbox of this run directory: a ``corral run`` or one of a fleet) is
never removed; ``rm`` says which sandbox uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from ._common import UsageError, no_verb, run_dir, state_dir, tree_size

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    from typing import Any

    from rootfs import Image, ImageStore

    from ._parser import Subparsers

__all__ = ["add_parsers"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``image`` and its verbs."""
    image = sub.add_parser(
        "image",
        help="list, build, inspect and remove images",
        description="The image store below STATE_DIR/images: root file systems as stacks of"
        " shared read-only layers (docs/images.md).",
    )
    image.set_defaults(func=lambda args: no_verb(image))  # argparse requires a verb anyway
    verbs = image.add_subparsers(dest="image_verb", metavar="VERB", required=True)
    ls = verbs.add_parser("ls", help="list the images")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)
    inspect = verbs.add_parser("inspect", help="show one image")
    inspect.add_argument("ref", metavar="IMAGE", help="a name (busybox) or an id (prefix)")
    inspect.set_defaults(func=_inspect)
    build = verbs.add_parser(
        "build",
        help="build an image: busybox, debian (mmdebstrap from Debian's mirror),"
        " lxc-template (an LXC template script) or run (a command on another image)",
        description="Build an image into the store, or find it there: a recipe is built once"
        " (docs/images.md). An interrupted build (SIGINT, SIGTERM, SIGHUP) leaves nothing.",
        usage="%(prog)s [-h] RECIPE [--tag TAG] [options] [-- TEMPLATE-OPTIONS...]",
    )
    # lxc-create's `-- OPTIONS`: the template's own arguments.
    build.after_dashes = "template_options"
    build.add_argument(
        "recipe",
        metavar="RECIPE",
        choices=["busybox", "debian", "lxc-template", "run"],
        help="busybox, debian, lxc-template or run",
    )
    build.add_argument(
        "--tag", help="the image's name (default: busybox, debian:SUITE, lxc-TEMPLATE...)"
    )
    deb = build.add_argument_group("debian")
    deb.add_argument("--suite", default="bookworm", help="the Debian suite (default: bookworm)")
    deb.add_argument("--variant", default="minbase", help="mmdebstrap's variant (minbase)")
    deb.add_argument(
        "--package", action="append", default=[], help="extra packages (repeat, or a,b)"
    )
    deb.add_argument("--mirror", help="the Debian mirror (default: the one the host's apt uses)")
    deb.add_argument(
        "--root-password-hash", help="a crypt(3) hash for root (default: root is locked)"
    )
    lxc = build.add_argument_group(
        "lxc-template", "after a '--': more arguments for the template, after LXC's own"
    )
    lxc.add_argument(
        "--template",
        metavar="NAME|PATH",
        default="",
        help="a template of /usr/share/lxc/templates (busybox: lxc-busybox) or a script's path",
    )
    lxc.add_argument("--name", help="the container's name given to it (default: the template's)")
    run = build.add_argument_group("run")
    run.add_argument("--from", dest="base", metavar="IMAGE", help="the image to build on")
    run.add_argument("--run", metavar="CMD", help="the command (sh -c) whose changes are kept")
    run.add_argument(
        "--env", "-e", action="append", default=[], metavar="K=V", help="set a variable for it"
    )
    build.set_defaults(func=_build)
    imp = verbs.add_parser(
        "import",
        help="import an OCI image: a layout directory, an oci-archive or a docker save tarball",
        description="Import an OCI image into the store (docs/images.md): every digest is"
        " verified, every layer becomes a shared store layer; a hostile layer is refused in"
        " one line and leaves nothing.",
    )
    imp.add_argument("source", metavar="SOURCE", help="a layout directory or a tarball")
    imp.add_argument(
        "ref", metavar="REF", nargs="?", help="a tag or sha256:DIGEST (default: the only image)"
    )
    imp.add_argument("--tag", help="the image's name (default: REF, or oci:SHORT-ID)")
    imp.set_defaults(func=_import)
    rm = verbs.add_parser("rm", help="remove images (refused while a sandbox uses one)")
    rm.add_argument("refs", metavar="IMAGE", nargs="+", help="names or ids")
    rm.set_defaults(func=_rm)
    prune = verbs.add_parser(
        "prune", help="remove unnamed images, unused layers and what killed builds left"
    )
    prune.add_argument("--json", action="store_true", help="what was removed, as JSON")
    prune.set_defaults(func=_prune)


def _store() -> ImageStore:
    from rootfs import ImageStore

    return ImageStore(os.path.join(state_dir(), "images"))


def _users(store: ImageStore) -> dict[str, list[str]]:
    """The sandboxes of this run directory, by the image id they run on."""
    from rootfs import BUILTIN_BASES, StoreError

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
            ref = str(record["spec"]["rootfs"])
            image_id = record.get("image")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if not isinstance(image_id, str):
            # A record of an older corral: what its rootfs names now.
            if ref.startswith(("/", ".")):
                continue  # a directory, not an image
            try:
                image_id = store.find("busybox" if ref in BUILTIN_BASES else ref).id
            except StoreError:
                continue
        out.setdefault(image_id, []).append(str(record.get("name", entry[:-5])))
    return out


def _row(image: Image, store: ImageStore) -> dict[str, Any]:
    return {
        "id": image.id,
        "tags": list(image.tags),
        "layers": len(image.layers),
        "builder": image.source.get("builder", ""),
        "created": image.created,
        "size": sum(tree_size(store.layer_path(layer)) for layer in image.layers),
    }


def _ls(args: argparse.Namespace) -> int:
    from ._common import human_size

    store = _store()
    rows = [_row(i, store) for i in store.images()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no images (corral image build busybox, or a sandbox on busybox, makes one)")
        return 0
    print(f"{'NAME':<30} {'ID':<14} {'LAYERS':>6} {'SIZE':>10}  {'BUILDER':<12} CREATED")
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
        for name in row["tags"] or ["<none>"]:
            print(
                f"{name:<30} {row['id'][7:19]:<14} {row['layers']:>6}"
                f" {human_size(row['size']):>10}  {row['builder']:<12} {created}"
            )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    store = _store()
    image = store.find(args.ref)
    print(json.dumps(image.describe() | {"lowerdirs": store.lowerdirs(image)}, indent=2))
    return 0


def _build(args: argparse.Namespace) -> int:
    import sys

    from rootfs import busybox_image, reverting

    def output(line: str) -> None:
        sys.stderr.write(f"  {line}\n")

    store = _store()
    if args.template_options and args.recipe != "lxc-template":
        raise UsageError(
            f"image build {args.recipe}: arguments after '--' are an LXC template's"
            f" (lxc-template only), got {args.template_options[0]!r}"
        )
    if args.recipe == "run":
        return _build_run(args)
    with reverting():
        if args.recipe == "busybox":
            image = busybox_image(store)
            if args.tag:
                store.tag(image, args.tag)
        elif args.recipe == "lxc-template":
            from rootfs._lxc import LxcTemplateRecipe, build_lxc_template

            template = LxcTemplateRecipe(
                template=args.template,
                options=tuple(args.template_options),
                name=args.name,
                tag=args.tag,
            ).check()
            sys.stderr.write(
                f"corral: building {template.default_tag} from {template.template_path}"
                " (once; later builds of this recipe are found in the store)\n"
            )
            image = build_lxc_template(store, template, output=output)
        else:
            from rootfs._debian import DebianRecipe, build_debian, host_mirror, parse_packages

            recipe = DebianRecipe(
                suite=args.suite,
                variant=args.variant,
                packages=parse_packages(args.package),
                mirror=args.mirror or host_mirror(),
                root_password=args.root_password_hash,
            ).check()
            sys.stderr.write(
                f"corral: building {args.tag or recipe.default_tag} from {recipe.mirror}"
                " (once; later builds of this recipe are found in the store)\n"
            )
            image = build_debian(store, recipe, args.tag, output)
    print(f"{', '.join(image.tags) or args.recipe}: {image.id}")
    return 0


def _build_run(args: argparse.Namespace) -> int:
    """``build run``: the command in a sandbox on ``--from``, its changes a layer on top."""
    import sys

    from rootfs import reverting

    from .._runtime._commit import RunRecipe, build_run
    from .._runtime._sandbox import Runtime

    if args.base is None or args.run is None:
        raise UsageError("image build run: expected --from IMAGE and --run 'COMMAND'")
    recipe = RunRecipe(base=args.base, command=args.run, env=tuple(args.env)).check()

    def output(line: str) -> None:
        sys.stderr.write(f"  {line}\n")

    # The sandbox dies with this process, however it ends; what a killed
    # build left is swept by the next `corral run` or build (as `run` does).
    runtime = Runtime(die_with_caller=True)
    runtime.sweep_claims()
    with reverting():
        image = build_run(runtime, recipe, args.tag, output)
    print(f"{', '.join(image.tags) or 'run'}: {image.id}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import sys

    from rootfs import reverting
    from rootfs._import import ImportProgress, import_oci

    from ._common import human_size

    tty = sys.stderr.isatty()

    done = [0]  # bytes imported so far (layers the store had are not)

    def progress(p: ImportProgress) -> None:
        # On a terminal one line, rewritten; otherwise a line per layer.
        what = "in the store already" if p.cached else human_size(p.size)
        if not p.cached:
            done[0] += p.size
        rate = f", {human_size(int(done[0] / p.elapsed))}/s" if done[0] and p.elapsed > 0 else ""
        line = f"layer {p.index} of {p.count} {p.digest[7:19]} {what}, {p.elapsed:.1f} s{rate}"
        if tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if p.index == p.count else ""))
        else:
            sys.stderr.write(f"corral: {line}\n")
        sys.stderr.flush()

    with reverting():
        image = import_oci(_store(), args.source, args.ref, args.tag, progress)
    print(f"{', '.join(image.tags)}: {image.id}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store()
    users = _users(store)
    for ref in args.refs:
        image = store.remove(ref, lambda i: users.get(i.id, []))
        print(f"removed {ref} ({image.short_id})")
    return 0


def _prune(args: argparse.Namespace) -> int:
    store = _store()
    users = _users(store)
    removed = store.prune(keep=lambda image_id: image_id in users)
    if args.json:
        print(json.dumps(removed))
    else:
        print(
            f"removed {len(removed['images'])} images, {len(removed['layers'])} layers,"
            f" {len(removed['builds'])} leftovers of killed builds"
        )
    return 0
