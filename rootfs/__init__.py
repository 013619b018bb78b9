"""Root file systems: building, caching and configuring sandbox bases.

Images live in a content-addressed store (:class:`ImageStore`, below
``STATE_DIR/images``) as stacks of shared read-only layers; each sandbox
runs on an overlayfs with its image's layers below and a private writable
layer on top (mounted by the runtime in :mod:`supervisor`). Builders:

- ``busybox``: from the host's static busybox, offline; the default.
- ``debian``: Debian's mmdebstrap from the host's apt mirror
  (:mod:`rootfs._debian`).
- ``lxc-template``: an LXC template script (``lxc-busybox``, the seed's
  ``lxc-centos``...) run as lxc-create runs it (:mod:`rootfs._lxc`).

OCI images (a layout directory, an ``oci-archive`` or a ``docker save``
tarball) are read by :func:`open_image`, and each of their layers is turned
into an overlayfs lower layer by :func:`apply_layer`.

The names are imported when first used: ``corral --version`` and the
verbs that need no image do not pay for the store's imports.
"""

from __future__ import annotations

from ._errors import RootfsError as RootfsError

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:
    from ._busybox import busybox_image as busybox_image
    from ._busybox import ensure_busybox as ensure_busybox
    from ._busybox import is_static_elf as is_static_elf
    from ._oci import ImageConfig as ImageConfig
    from ._oci import Layer as Layer
    from ._oci import OciError as OciError
    from ._oci import OciImage as OciImage
    from ._oci import apply_layer as apply_layer
    from ._oci import open_image as open_image
    from ._prepare import is_prepared_ref as is_prepared_ref
    from ._prepare import prepare_image as prepare_image
    from ._store import BuildContext as BuildContext
    from ._store import Image as Image
    from ._store import ImageStore as ImageStore
    from ._store import StoreError as StoreError
    from ._store import check_tag as check_tag
    from ._store import layer_id_of_recipe as layer_id_of_recipe
    from ._store import reverting as reverting

BUILTIN_BASES = ("busybox",)
"""Names accepted as ``rootfs`` besides an image of the store or a directory path."""

_LAZY = {
    "busybox_image": "_busybox",
    "ensure_busybox": "_busybox",
    "is_static_elf": "_busybox",
    "ImageConfig": "_oci",
    "Layer": "_oci",
    "OciError": "_oci",
    "OciImage": "_oci",
    "apply_layer": "_oci",
    "open_image": "_oci",
    "is_prepared_ref": "_prepare",
    "prepare_image": "_prepare",
    "BuildContext": "_store",
    "Image": "_store",
    "ImageStore": "_store",
    "StoreError": "_store",
    "check_tag": "_store",
    "layer_id_of_recipe": "_store",
    "reverting": "_store",
}

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'rootfs' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


__all__ = [
    "BUILTIN_BASES",
    "BuildContext",
    "Image",
    "ImageConfig",
    "ImageStore",
    "Layer",
    "OciError",
    "OciImage",
    "RootfsError",
    "StoreError",
    "apply_layer",
    "busybox_image",
    "check_tag",
    "ensure_busybox",
    "is_prepared_ref",
    "is_static_elf",
    "layer_id_of_recipe",
    "open_image",
    "prepare_image",
    "reverting",
]
