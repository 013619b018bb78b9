"""The ``oci`` builder: an OCI image (a layout directory, an ``oci-archive``
or a ``docker save``/``podman save`` tarball) into the store.

Every layer becomes a store layer of its own, addressed by its ``diff_id``
(the digest of its uncompressed tar, which the image config lists): two
images that share a base layer store it once, and an import finds the
layers it already has. Digests are verified while the layers are read
(:mod:`._oci`); a hostile layer fails the import with one line and leaves
nothing (the build's revert).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ._oci import OciImage, apply_layer, open_image
from ._store import Image, ImageStore

__all__ = ["ImportProgress", "import_oci"]


@dataclass(frozen=True)
class ImportProgress:
    """Where an import is: layer *index* (1-based) of *count*, its digest
    and compressed size, whether the store had it, seconds so far."""

    index: int
    count: int
    digest: str
    size: int
    cached: bool
    elapsed: float


def import_oci(
    store: ImageStore,
    source: str,
    ref: str | None = None,
    tag: str | None = None,
    progress: Callable[[ImportProgress], None] | None = None,
) -> Image:
    """Import the image *ref* (a tag or a digest; None: the only one) of
    *source* into *store*, named *tag* (default: *ref* if it is a tag, or
    the archive's own name for it); return it. Raises a RootfsError (one
    line) with nothing left behind."""
    image = open_image(source, ref)
    name = tag or _default_name(image, ref)
    # A docker-archive has no manifest: its config names the image.
    key = "oci/" + (image.manifest_digest or image.config.digest)
    start = time.monotonic()
    with store.building(key) as build:
        layers = []
        count = len(image.layers)
        for index, layer in enumerate(image.layers, 1):
            cached = build.has_layer(layer.diff_id)
            if not cached:
                work = build.scratch("oci-layer")
                apply_layer(layer, work)
                build.commit_layer(layer.diff_id, work)
            layers.append(layer.diff_id)
            if progress is not None:
                progress(
                    ImportProgress(
                        index, count, layer.digest, layer.size, cached, time.monotonic() - start
                    )
                )
        c = image.config
        config = {
            "env": list(c.env),
            "entrypoint": list(c.entrypoint) if c.entrypoint is not None else None,
            "cmd": list(c.cmd) if c.cmd is not None else None,
            "workdir": c.workdir or "/",
            "user": c.user,
            "exposed_ports": list(c.exposed_ports),
        }
        source_info = {
            "builder": "oci",
            "key": key,
            "source": source,
            "ref": ref,
            "manifest": image.manifest_digest or "",
            "config": c.digest,
        }
        return build.commit_image(layers, config, source_info, name)


def _default_name(image: OciImage, ref: str | None) -> str:
    """*ref* if it is a tag; else ``oci:`` and the config's short digest
    (the id docker shows), so that the image has a name to be kept by."""
    if ref is not None and not ref.startswith("sha256:"):
        return ref
    return "oci:" + image.config.digest.removeprefix("sha256:")[:12]
