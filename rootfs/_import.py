"""The ``oci`` builder: an OCI image (a layout directory, an ``oci-archive``
or a ``docker save``/``podman save`` tarball) into the store.

Every layer becomes a store layer of its own, addressed by its ``diff_id``
(the digest of its uncompressed tar, which the image config lists): two
images that share a base layer store it once, and an import finds the
layers it already has. Digests are verified while the layers are read
(:mod:`._oci`); a hostile layer fails the import with one line and leaves
nothing (the build's revert).

Layers are independent until they are stacked, so the missing ones are
applied side by side, one thread each up to the CPUs this process may use:
most of an import's time is the kernel creating files, which a second core
halves. They are committed to the store and reported in their order.

Each worker thread is confined with Landlock (:mod:`._landlock`) before it
extracts anything: it may change the file system only beneath this
import's layer directories, so an entry that got past the extraction's
own checks still could not write outside them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ._landlock import confine_writes
from ._oci import Layer, OciError, OciImage, apply_layer, open_image
from ._store import Image, ImageStore

__all__ = ["ImportProgress", "import_oci"]

_MAX_WORKERS = 8
"""Layers applied at once at most: each holds two threads, descriptors and
up to 8 MiB read ahead; beyond a few the disk, not the CPUs, is the limit."""


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
        # The layers the store lacks, each once (an image may list one twice).
        work: dict[str, str] = {}
        for layer in image.layers:
            if layer.diff_id not in work and not build.has_layer(layer.diff_id):
                work[layer.diff_id] = build.scratch("oci-layer")
        count = len(image.layers)
        reported = 0
        applied: set[str] = set()  # by the threads, not committed yet
        committed: set[str] = set()

        def report_ready() -> None:
            # In the image's order: each layer once it and those below it are
            # in; one listed again is in the store already by then.
            nonlocal reported
            while reported < count:
                layer = image.layers[reported]
                cached = layer.diff_id not in work or layer.diff_id in committed
                if not cached:
                    if layer.diff_id not in applied:
                        return
                    build.commit_layer(layer.diff_id, work[layer.diff_id])
                    committed.add(layer.diff_id)
                reported += 1
                if progress is not None:
                    progress(
                        ImportProgress(
                            reported, count, layer.digest, layer.size, cached,
                            time.monotonic() - start,
                        )
                    )  # fmt: skip

        report_ready()
        if work:
            _apply_all(image, work, applied, report_ready)
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
        return build.commit_image(
            [layer.diff_id for layer in image.layers], config, source_info, name
        )


def _apply_all(
    image: OciImage, work: dict[str, str], applied: set[str], done: Callable[[], None]
) -> None:
    """Apply the layers *work* names (diff_id: scratch directory) side by
    side; add each to *applied* and call *done* as it is. The first failure
    (or an interrupt) stops the others at their next entry and is raised
    once they have stopped: the build's revert then removes their directories."""
    layers = {layer.diff_id: layer for layer in image.layers if layer.diff_id in work}
    stop = threading.Event()
    workers = min(len(layers), len(os.sched_getaffinity(0)), _MAX_WORKERS)
    confined = threading.local()
    directories = sorted(work.values())

    def extract(layer: Layer, dest: str) -> None:
        # Once per worker thread, before its first layer; the pool's threads
        # end with the pool, so no confined thread outlives this import.
        if not getattr(confined, "done", False):
            try:
                confine_writes(directories)
            except OSError as exc:
                raise OciError(f"cannot confine the layer extraction: {exc.strerror}") from None
            confined.done = True
        apply_layer(layer, dest, stop=stop)

    with ThreadPoolExecutor(workers, thread_name_prefix="corral-layer") as pool:
        futures: dict[Future[None], str] = {
            pool.submit(extract, layer, work[diff_id]): diff_id for diff_id, layer in layers.items()
        }
        try:
            for future in as_completed(futures):
                future.result()
                applied.add(futures[future])
                done()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise


def _default_name(image: OciImage, ref: str | None) -> str:
    """*ref* if it is a tag; else ``oci:`` and the config's short digest
    (the id docker shows), so that the image has a name to be kept by."""
    if ref is not None and not ref.startswith("sha256:"):
        return ref
    return "oci:" + image.config.digest.removeprefix("sha256:")[:12]
