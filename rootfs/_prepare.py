"""Images named by what makes them: a sandbox's ``rootfs`` (or ``image``)
may name an image that is not in the store yet, and it is made on first
use.

- ``oci:PATH[:REF]``: the OCI image *REF* (a tag or ``sha256:DIGEST``;
  default: the only one) of the layout directory or tarball *PATH*
  (skopeo's transport syntax), imported now (its layers found in the store
  are not imported again) and named by its id: the sandbox runs what
  *PATH* held when its fleet was loaded, whatever is written there later.
- ``debian:SUITE`` (``debian:bookworm``): the ``debian`` builder's image of
  that suite with the default recipe (minbase, the host's mirror), built
  now if the store has no image of that name (minutes, once).

Anything else names an image of the store, a built-in base or a
directory, and is left as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from ._errors import RootfsError
from ._store import ImageStore

__all__ = ["is_prepared_ref", "prepare_image", "split_oci"]

_DEBIAN = re.compile(r"^debian:([a-z][a-z0-9.-]*)$")


def is_prepared_ref(ref: str) -> bool:
    """True if *ref* names an image made on first use (``oci:``, ``debian:SUITE``)."""
    return (ref.startswith("oci:") and len(ref) > 4) or bool(_DEBIAN.match(ref))


def split_oci(ref: str, field: str = "rootfs") -> tuple[str, str | None]:
    """``oci:PATH[:REF]`` as (PATH, REF or None); one line if PATH is not absolute."""
    path, _, image_ref = ref.removeprefix("oci:").partition(":")
    if not path.startswith("/"):
        raise RootfsError(
            f"{field}: expected oci:/ABSOLUTE/PATH[:TAG] (a layout directory or a tarball),"
            f" got {ref!r}"
        )
    return path, image_ref or None


def prepare_image(store: ImageStore, ref: str, output: Callable[[str], None] | None = None) -> str:
    """What a sandbox should name for *ref* once its image is in *store*:
    an ``oci:`` image's id after importing it, *ref* itself after building
    a missing ``debian:SUITE``, and any other *ref* as it is. *output* gets
    a line per step. One line (RootfsError) on failure, nothing left."""
    if ref.startswith("oci:"):
        from ._import import ImportProgress, import_oci

        path, image_ref = split_oci(ref)
        if not os.path.exists(path):
            raise RootfsError(f"rootfs {ref!r}: {path}: no such layout directory or tarball")

        def progress(p: ImportProgress) -> None:
            if output is not None and not p.cached:
                output(f"{ref}: layer {p.index} of {p.count} imported ({p.elapsed:.1f} s)")

        image = import_oci(store, path, image_ref, None, progress)
        return image.id
    match = _DEBIAN.match(ref)
    if match is not None and store.tagged(ref) is None:
        from ._debian import DebianRecipe, build_debian

        recipe = DebianRecipe(suite=match.group(1)).check()
        if output is not None:
            output(f"{ref}: not in the store: building it from {recipe.mirror} (once)")
        build_debian(store, recipe, ref, output)
    return ref


def main(argv: list[str]) -> int:
    """``python -m rootfs._prepare STORE REF``: prepare *REF* in the store
    at *STORE*; print what to name on stdout, progress and the one-line
    error on stderr. The supervisor runs this as a child, so that stopping
    it stops the build (SIGTERM: the build reverts) without a thread left
    behind."""
    import sys

    from ._store import reverting

    if len(argv) != 3:
        sys.stderr.write("usage: python -m rootfs._prepare STORE REF\n")
        return 2

    def output(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        with reverting():
            print(prepare_image(ImageStore(argv[1]), argv[2], output))
    except RootfsError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    except KeyboardInterrupt:  # BuildInterrupted too: the build has reverted
        return 130
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv))
