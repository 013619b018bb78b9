"""OCI images: reading them, and turning their layers into overlayfs lower layers.

An image comes from an OCI image layout (a directory as ``skopeo copy ...
oci:DIR:TAG`` or umoci writes it, or the same packed in a tar: an
``oci-archive``) or from a ``docker save``/``podman save`` tarball (a
``docker-archive``). :func:`open_image` reads the index, the manifest and the
config, verifies each against the digest that names it, and describes the
layers without reading them. A tarball is read in place: its members are
found once, then read at their offsets.

:func:`apply_layer` streams one layer into an empty directory and verifies it
on the way: the bytes as stored against the manifest's digest, the
uncompressed tar against the config's ``diff_id``. OCI whiteouts become what
overlayfs expects of a lower layer: ``DIR/.wh.NAME`` a character device 0:0
``DIR/NAME``, ``DIR/.wh..wh..opq`` the attribute ``trusted.overlay.opaque=y``
on ``DIR``.

A layer is hostile input. Every path is walked from a descriptor of the
destination one component at a time with ``O_NOFOLLOW``, and every file is
made relative to its parent's descriptor, so a symlink in the layer is never
followed, whatever it points at (absolute symlinks are normal in images: they
are resolved inside the sandbox, later). Refused, each with one line naming
the entry: absolute names and names with ``..``; a path through a symlink or
a file; a hardlink to anything but an earlier entry of the same layer;
device files; ``trusted.overlay.*`` attributes carried by the tar; a
truncated or damaged tar or gzip stream.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import queue
import re
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from ._errors import RootfsError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["ImageConfig", "Layer", "OciError", "OciImage", "apply_layer", "open_image"]

PLATFORM = ("linux", "amd64")
"""The (os, architecture) chosen from a multi-platform image index."""

_INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
_CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)
# Uncompressed or gzip; which one is told by the magic bytes, not the type.
_LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
# What docker save writes for its layers (it names no media type).
_DOCKER_LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar"

_REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"  # docker save (25 and later) writes it

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_JSON = 16 << 20  # an index, a manifest or a config; a long history stays far below
_MAX_NESTING = 4  # image indexes within image indexes
_MAX_LINKS = 16  # symlinks followed to find a member of a tarball

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_WHITEOUT_META = ".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, ...): nothing for overlayfs
_OVERLAY_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")
"""Both: overlayfs reads the first, and with ``userxattr`` (the mounts of
user-namespace sandboxes, whose root cannot read ``trusted.*``) the second."""
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
_PAX_XATTR = "SCHILY.xattr."
_NO_ID = 2**32 - 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OciError(RootfsError):
    """An OCI image could not be read, or one of its layers could not be applied.

    ``str(err)`` is one line naming the image, blob or layer entry at fault.
    """


@dataclass(frozen=True)
class Layer:
    """One layer of an image, not yet read."""

    digest: str
    """``sha256:HEX`` of the blob as stored (compressed or not)."""
    diff_id: str
    """``sha256:HEX`` of the uncompressed tar, from the config's ``rootfs.diff_ids``."""
    media_type: str
    size: int
    """The size of the blob as stored, in bytes."""
    opener: Callable[[], BinaryIO] = field(repr=False, compare=False)
    """Opens the blob as stored; :meth:`open` is the way to call it."""

    def open(self) -> BinaryIO:
        """A new binary stream of the blob as stored, unverified (:func:`apply_layer` verifies)."""
        return self.opener()


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that say how to run it."""

    digest: str
    """``sha256:HEX`` of the config blob: the image ID docker shows."""
    env: list[str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    workdir: str
    user: str
    exposed_ports: list[str]
    """Sorted, as ``80/tcp``."""
    os: str
    architecture: str


@dataclass(frozen=True)
class OciImage:
    """An image whose index, manifest and config were read and verified."""

    source: str
    manifest_digest: str | None
    """``sha256:HEX`` of the manifest; None for a docker-archive, which has none
    (``config.digest`` identifies every image)."""
    config: ImageConfig
    layers: tuple[Layer, ...]
    """Bottom first, the order in which they are stacked."""


# --------------------------------------------------------------------------- reading


def open_image(source: str, ref: str | None = None) -> OciImage:
    """Read the image *ref* of *source* and verify its index, manifest and config.

    *source* is an OCI image layout directory, or a tarball: an OCI layout
    packed in a tar (``oci-archive``) or a ``docker save`` archive. In a
    layout, *ref* is a tag (the ``org.opencontainers.image.ref.name``
    annotation) or a manifest digest ``sha256:HEX``; in a docker archive a
    RepoTag (``busybox:latest``; ``busybox`` means the same) or the image ID.
    None selects the only image there is. A multi-platform index resolves to
    its ``linux/amd64`` image.

    Layers are not read: :func:`apply_layer` verifies each as it applies it.
    :class:`OciError` if anything is missing, malformed, unsupported or does
    not match its digest.
    """
    if os.path.isdir(source):
        store: _Store = _DirStore(source)
    elif os.path.isfile(source):
        store = _TarStore(source)
    elif os.path.lexists(source):
        raise OciError(f"{source}: neither a directory nor a tarball")
    else:
        raise OciError(f"{source}: no such file or directory")
    if store.has("index.json"):
        image = _open_layout(store, ref)
        if image is not None:
            return image
        if not store.has("manifest.json"):
            raise OciError(f"{source}: no image {ref!r} in index.json ({_tags_in(store)})")
    if store.has("manifest.json"):
        return _open_docker_archive(store, ref)
    if isinstance(store, _DirStore):
        raise OciError(f"{source}: not an OCI image layout (no index.json)")
    raise OciError(f"{source}: neither an OCI archive nor a docker archive (no index.json)")


class _Store(abc.ABC):
    """The files of an image source, by their path inside it."""

    where: str

    @abc.abstractmethod
    def has(self, name: str) -> bool:
        """True if *name* is a file (or, in a tarball, a link to one)."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """The size of the file *name*, which exists."""

    @abc.abstractmethod
    def opener(self, name: str) -> Callable[[], BinaryIO]:
        """What opens the file *name*, which exists, for reading."""

    def read(self, name: str, what: str) -> bytes:
        """The whole of *name*, a small JSON document described as *what* in errors."""
        if not self.has(name):
            raise OciError(f"{self.where}: {what} is missing (no {name})")
        try:
            with self.opener(name)() as f:
                data = f.read(_MAX_JSON + 1)
        except OSError as exc:
            raise OciError(f"{self.where}: cannot read {name}: {exc.strerror or exc}") from exc
        if len(data) > _MAX_JSON:
            raise OciError(f"{self.where}: {what} is larger than {_MAX_JSON >> 20} MiB")
        return data


class _DirStore(_Store):
    def __init__(self, root: str) -> None:
        self.where = root
        self._root = root

    def _path(self, name: str) -> str:
        # Names come from docker's manifest.json too: never leave the source.
        if name.startswith("/") or ".." in name.split("/"):
            raise OciError(f"{self.where}: {name!r} points outside the image")
        return os.path.join(self._root, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        return os.path.getsize(self._path(name))

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        path = self._path(name)

        def open_blob() -> BinaryIO:
            return open(path, "rb")

        return open_blob


class _TarStore(_Store):
    """A tarball read in place: one pass finds the members, each read seeks to its data."""

    def __init__(self, path: str) -> None:
        self.where = path
        self._path = path
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError as exc:
            raise OciError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
        for prefix, kind in (
            (b"\xfd7zXZ\x00", "xz"),
            (b"BZh", "bzip2"),
            (_ZSTD_MAGIC, "zstd"),
        ):
            if magic.startswith(prefix):
                raise OciError(f"{path}: compressed with {kind}; decompress it first")
        self._gzipped = magic.startswith(_GZIP_MAGIC)
        self._members: dict[str, tuple[int, int]] = {}
        self._links: dict[str, str] = {}
        try:
            # Not a stream: an uncompressed tarball's contents are skipped by seeking.
            with self._open_raw() as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
                for m in tf:
                    self._index(m)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise OciError(
                f"{path}: not a readable tar archive ({str(exc) or 'truncated'})"
            ) from exc
        except OSError as exc:
            raise OciError(f"{path}: cannot read it: {exc.strerror or exc}") from exc

    def _open_raw(self) -> BinaryIO | gzip.GzipFile:
        # Opened by name, a GzipFile closes its file; it seeks forward by decompressing.
        return gzip.open(self._path, "rb") if self._gzipped else open(self._path, "rb")

    def _index(self, m: tarfile.TarInfo) -> None:
        name = _archive_name(m.name)
        self._members.pop(name, None)
        self._links.pop(name, None)
        if m.isreg() and not m.issparse():
            self._members[name] = (m.offset_data, m.size)
        elif m.issym():
            # docker save links a layer it already wrote: abc/layer.tar -> ../def/layer.tar
            self._links[name] = posixpath.normpath(
                posixpath.join(posixpath.dirname(name), m.linkname)
            )
        elif m.islnk():
            self._links[name] = _archive_name(m.linkname)

    def _find(self, name: str) -> tuple[int, int] | None:
        for _ in range(_MAX_LINKS):
            if name in self._members:
                return self._members[name]
            if name not in self._links:
                return None
            name = self._links[name]
        return None

    def has(self, name: str) -> bool:
        return self._find(_archive_name(name)) is not None

    def size(self, name: str) -> int:
        found = self._find(_archive_name(name))
        assert found is not None, name
        return found[1]

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        found = self._find(_archive_name(name))
        assert found is not None, name
        offset, size = found

        def open_member() -> BinaryIO:
            raw = self._open_raw()
            try:
                raw.seek(offset)
            except BaseException:
                raw.close()
                raise
            return io.BufferedReader(_Slice(raw, size))

        return open_member


class _Slice(io.RawIOBase):
    """The next *size* bytes of *source*, which it closes when closed."""

    def __init__(self, source: BinaryIO | gzip.GzipFile, size: int) -> None:
        super().__init__()
        self._source = source
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(min(len(view), self._left)) if self._left else b""
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _archive_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest[len("sha256:") :]


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise OciError(f"{what}: not JSON ({exc})") from None


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise OciError(f"{what}: not a JSON object")
    return value


def _strings(value: object, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OciError(f"{what}: not a list of strings")
    return list(value)


def _string(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OciError(f"{what}: not a string")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise OciError(f"{what}: {value!r} is not a sha256 digest")
    return value


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, object]
    platform: tuple[str, str] | None


def _descriptor(value: object, what: str) -> _Descriptor:
    d = _object(value, what)
    media_type = d.get("mediaType")
    if not isinstance(media_type, str):
        raise OciError(f"{what}: no mediaType")
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OciError(f"{what}: no size")
    annotations = d.get("annotations") or {}
    platform = d.get("platform")
    return _Descriptor(
        media_type,
        _digest(d.get("digest"), what),
        size,
        _object(annotations, f"{what}: annotations"),
        (
            (str(platform.get("os")), str(platform.get("architecture")))
            if isinstance(platform, dict)
            else None
        ),
    )


def _verified(store: _Store, desc: _Descriptor, what: str) -> bytes:
    """The blob *desc* names, a small JSON document, checked against its size and digest."""
    if desc.size > _MAX_JSON:
        raise OciError(f"{store.where}: {what}: larger than {_MAX_JSON >> 20} MiB")
    data = store.read(_blob_name(desc.digest), what)
    if _sha256(data) != desc.digest or len(data) != desc.size:
        raise OciError(
            f"{store.where}: {what}: the blob does not match its digest"
            f" (it is {_sha256(data)}, {len(data)} bytes)"
        )
    return data


def _manifests(store: _Store, data: bytes, what: str) -> list[_Descriptor]:
    doc = _object(_json(data, f"{store.where}: {what}"), f"{store.where}: {what}")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise OciError(f"{store.where}: {what}: no manifests list")
    return [_descriptor(e, f"{store.where}: {what}: manifest {i}") for i, e in enumerate(entries)]


def _tags_in(store: _Store) -> str:
    try:
        descs = _manifests(store, store.read("index.json", "index.json"), "index.json")
    except OciError:
        return "it cannot be read"
    tags = [str(d.annotations[_REF_NAME]) for d in descs if _REF_NAME in d.annotations]
    return "tags: " + ", ".join(tags) if tags else "it has no tags"


def _open_layout(store: _Store, ref: str | None) -> OciImage | None:
    layout = _object(
        _json(store.read("oci-layout", "the oci-layout file"), f"{store.where}: oci-layout"),
        f"{store.where}: oci-layout",
    )
    version = layout.get("imageLayoutVersion")
    if not isinstance(version, str) or version.split(".")[0] != "1":
        raise OciError(f"{store.where}: unsupported imageLayoutVersion {version!r}")
    top = _manifests(store, store.read("index.json", "index.json"), "index.json")
    chosen = _select(store, top, ref)
    if chosen is None:
        return None
    desc = chosen
    for _ in range(_MAX_NESTING):
        if desc.media_type not in _INDEX_TYPES:
            break
        what = f"index {_short(desc.digest)}"
        desc = _for_platform(store, _manifests(store, _verified(store, desc, what), what), what)
    if desc.media_type not in _MANIFEST_TYPES:
        raise OciError(
            f"{store.where}: {_short(desc.digest)} has unsupported media type {desc.media_type}"
        )
    return _read_manifest(store, desc)


def _select(store: _Store, descs: list[_Descriptor], ref: str | None) -> _Descriptor | None:
    if ref is None:
        if len(descs) == 1:
            return descs[0]
        if not descs:
            raise OciError(f"{store.where}: index.json lists no image")
        raise OciError(
            f"{store.where}: index.json lists {len(descs)} images; name one ({_tags_in(store)})"
        )
    if _DIGEST.fullmatch(ref):
        return _find_digest(store, descs, ref, 0)
    tagged = [
        d
        for d in descs
        if d.annotations.get(_REF_NAME) == ref or d.annotations.get(_CONTAINERD_NAME) == ref
    ]
    if len(tagged) > 1:
        # One tag on the image of each platform, without an index above them.
        return _for_platform(store, tagged, f"tag {ref!r}")
    return tagged[0] if tagged else None


def _find_digest(
    store: _Store, descs: list[_Descriptor], digest: str, depth: int
) -> _Descriptor | None:
    for d in descs:
        if d.digest == digest:
            return d
    if depth >= _MAX_NESTING:
        return None
    for d in descs:
        if d.media_type in _INDEX_TYPES:
            what = f"index {_short(d.digest)}"
            found = _find_digest(
                store, _manifests(store, _verified(store, d, what), what), digest, depth + 1
            )
            if found is not None:
                return found
    return None


def _for_platform(store: _Store, descs: list[_Descriptor], what: str) -> _Descriptor:
    for d in descs:
        if d.platform == PLATFORM:
            return d
    if len(descs) == 1 and descs[0].platform is None:
        return descs[0]
    has = ", ".join(sorted({"/".join(d.platform) for d in descs if d.platform})) or "none named"
    raise OciError(f"{store.where}: {what}: no {'/'.join(PLATFORM)} image (platforms: {has})")


_ZSTD_REFUSED = "is zstd-compressed; only gzip and uncompressed layers are supported"


def _is_zstd(media_type: str) -> bool:
    return media_type.endswith(("+zstd", ".zstd"))


def _check_layer_type(store: _Store, media_type: str, what: str) -> None:
    if _is_zstd(media_type):
        raise OciError(f"{store.where}: {what} {_ZSTD_REFUSED}")
    if media_type not in _LAYER_TYPES:
        raise OciError(f"{store.where}: {what} has unsupported media type {media_type}")


def _read_manifest(store: _Store, desc: _Descriptor) -> OciImage:
    what = f"manifest {_short(desc.digest)}"
    doc = _object(
        _json(_verified(store, desc, what), f"{store.where}: {what}"), f"{store.where}: {what}"
    )
    if doc.get("schemaVersion") != 2:
        raise OciError(
            f"{store.where}: {what}: schemaVersion is {doc.get('schemaVersion')!r}, not 2"
        )
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in _MANIFEST_TYPES:
        raise OciError(
            f"{store.where}: {what}: its mediaType {media_type} is not an image manifest"
        )
    if "config" not in doc:
        raise OciError(f"{store.where}: {what}: no config")
    config_desc = _descriptor(doc["config"], f"{store.where}: {what}: config")
    if config_desc.media_type not in _CONFIG_TYPES:
        raise OciError(
            f"{store.where}: {what}: config has unsupported media type {config_desc.media_type}"
            " (not a container image)"
        )
    entries = doc.get("layers")
    if not isinstance(entries, list):
        raise OciError(f"{store.where}: {what}: no layers list")
    layer_descs = [
        _descriptor(e, f"{store.where}: {what}: layer {i}") for i, e in enumerate(entries)
    ]
    for d in layer_descs:
        _check_layer_type(store, d.media_type, f"layer {_short(d.digest)}")
    config_what = f"config {_short(config_desc.digest)}"
    config, diff_ids = _parse_config(
        _verified(store, config_desc, config_what), config_desc.digest, store.where, config_what
    )
    if len(diff_ids) != len(layer_descs):
        raise OciError(
            f"{store.where}: {config_what} lists {len(diff_ids)} diff_ids"
            f" for the {len(layer_descs)} layers of {what}"
        )
    layers = []
    for d, diff_id in zip(layer_descs, diff_ids, strict=True):
        name = _blob_name(d.digest)
        if not store.has(name):
            raise OciError(f"{store.where}: layer {_short(d.digest)} is missing (no {name})")
        if store.size(name) != d.size:
            raise OciError(
                f"{store.where}: layer {_short(d.digest)} is {store.size(name)} bytes;"
                f" {what} says {d.size}"
            )
        layers.append(Layer(d.digest, diff_id, d.media_type, d.size, store.opener(name)))
    return OciImage(store.where, desc.digest, config, tuple(layers))


def _parse_config(data: bytes, digest: str, where: str, what: str) -> tuple[ImageConfig, list[str]]:
    doc = _object(_json(data, f"{where}: {what}"), f"{where}: {what}")
    rootfs = _object(doc.get("rootfs"), f"{where}: {what}: rootfs")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise OciError(f"{where}: {what}: rootfs has no diff_ids list")
    diff_ids = [_digest(d, f"{where}: {what}: diff_id") for d in raw_ids]
    run = _object(doc.get("config") or {}, f"{where}: {what}: config")
    ports = _object(run.get("ExposedPorts") or {}, f"{where}: {what}: ExposedPorts")
    config = ImageConfig(
        digest=digest,
        env=_strings(run.get("Env"), f"{where}: {what}: Env") or [],
        entrypoint=_strings(run.get("Entrypoint"), f"{where}: {what}: Entrypoint"),
        cmd=_strings(run.get("Cmd"), f"{where}: {what}: Cmd"),
        workdir=_string(run.get("WorkingDir"), f"{where}: {what}: WorkingDir"),
        user=_string(run.get("User"), f"{where}: {what}: User"),
        exposed_ports=sorted(ports),
        os=_string(doc.get("os"), f"{where}: {what}: os"),
        architecture=_string(doc.get("architecture"), f"{where}: {what}: architecture"),
    )
    return config, diff_ids


@dataclass(frozen=True)
class _DockerEntry:
    config: str
    tags: list[str]
    layers: list[str]


def _open_docker_archive(store: _Store, ref: str | None) -> OciImage:
    what = f"{store.where}: manifest.json"
    doc = _json(store.read("manifest.json", "manifest.json"), what)
    if not isinstance(doc, list):
        raise OciError(f"{what}: not a JSON list")
    entries = []
    for i, e in enumerate(doc):
        entry = _object(e, f"{what}: image {i}")
        config = entry.get("Config")
        if not isinstance(config, str):
            raise OciError(f"{what}: image {i}: no Config")
        names = _strings(entry.get("Layers"), f"{what}: image {i}: Layers")
        if names is None:
            raise OciError(f"{what}: image {i}: no Layers")
        tags = _strings(entry.get("RepoTags"), f"{what}: image {i}: RepoTags") or []
        entries.append(_DockerEntry(config, tags, names))
    chosen = _select_docker(store, entries, ref)
    config_data = store.read(chosen.config, f"config {chosen.config}")
    digest = _sha256(config_data)
    # The config's name is its digest: HEX.json (docker before 25) or blobs/sha256/HEX.
    stem = posixpath.basename(_archive_name(chosen.config)).removesuffix(".json")
    if re.fullmatch(r"[0-9a-f]{64}", stem) and f"sha256:{stem}" != digest:
        raise OciError(
            f"{store.where}: config {chosen.config} does not match its digest (it is {digest})"
        )
    config_what = f"config {_short(digest)}"
    config, diff_ids = _parse_config(config_data, digest, store.where, config_what)
    if len(diff_ids) != len(chosen.layers):
        raise OciError(
            f"{store.where}: {config_what} lists {len(diff_ids)} diff_ids"
            f" for the {len(chosen.layers)} layers in manifest.json"
        )
    layers = []
    for name, diff_id in zip(chosen.layers, diff_ids, strict=True):
        if not store.has(name):
            raise OciError(f"{store.where}: layer {name} is missing")
        # docker save writes each layer uncompressed, named by its v1 ID (not a
        # digest) before docker 25: then the blob's digest is its diff_id.
        stored = _archive_name(name)
        blob_digest = "sha256:" + stored.rsplit("/", 1)[-1]
        if not (stored.startswith("blobs/sha256/") and _DIGEST.fullmatch(blob_digest)):
            blob_digest = diff_id
        layers.append(
            Layer(blob_digest, diff_id, _DOCKER_LAYER_TYPE, store.size(name), store.opener(name))
        )
    return OciImage(store.where, None, config, tuple(layers))


def _select_docker(store: _Store, entries: list[_DockerEntry], ref: str | None) -> _DockerEntry:
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        tags = ", ".join(t for e in entries for t in e.tags) or "none"
        raise OciError(
            f"{store.where}: manifest.json lists {len(entries)} images; name one (tags: {tags})"
        )
    wanted = {ref}
    if ":" not in ref.rsplit("/", 1)[-1]:
        wanted.add(ref + ":latest")
    for e in entries:
        if wanted & set(e.tags):
            return e
    if _DIGEST.fullmatch(ref):
        for e in entries:
            if store.has(e.config) and _sha256(store.read(e.config, "config")) == ref:
                return e
    tags = ", ".join(t for e in entries for t in e.tags) or "none"
    raise OciError(f"{store.where}: no image {ref!r} in manifest.json (tags: {tags})")


# --------------------------------------------------------------------------- applying


class _Feed:
    """A layer's tar, read and verified in a thread of its own while the caller extracts it.

    The thread reads the blob as stored in large chunks, hashes and counts
    them (a blob longer than *limit* is an error at once, not after the
    whole of a hostile blob has been read), inflates it if it is gzip, hashes
    the tar, and queues the tar's bytes. The caller reads them in order (as
    tarfile reads a stream: once, front to back); an error the thread met is
    raised to the caller after the bytes that came before it. Inflating and
    hashing release the GIL: they run on another core while the caller's
    thread extracts, whose time goes to the kernel creating files.
    """

    _TAIL = 1 << 16  # bytes kept behind the read position: well over tarfile's read-ahead
    _QUEUED = 8  # chunks read ahead of the extraction (8 MiB at most)

    def __init__(self, blob: BinaryIO, what: str, limit: int) -> None:
        self._blob = blob
        self._what = what
        self._limit = limit
        self._stored = hashlib.sha256()
        self.total = 0
        """Bytes of the blob read so far."""
        first = self._read_stored()
        while len(first) < len(_ZSTD_MAGIC) and (more := self._read_stored()):
            first += more
        if first.startswith(_ZSTD_MAGIC):
            raise OciError(f"{what} {_ZSTD_REFUSED}")
        gzipped = first.startswith(_GZIP_MAGIC)
        # Uncompressed, the blob is the tar: one hash is both digests.
        self._tar = hashlib.sha256() if gzipped else self._stored
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self._QUEUED)
        self._abandoned = threading.Event()
        # The reading side: the tar's bytes from offset _start on, some read already.
        self._window = b""
        self._start = 0
        self._pos = 0
        self._ended = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(first, gzipped), name=f"corral {what}", daemon=True
        )
        self._thread.start()

    # -- the thread --------------------------------------------------------------

    def _read_stored(self) -> bytes:
        data = self._blob.read(_CHUNK)
        # Hashed as soon as read: after a stop, the caller reads on from here.
        self._stored.update(data)
        self.total += len(data)
        if self.total > self._limit:
            raise OciError(
                f"{self._what}: the blob is larger than the {self._limit} bytes expected"
            )
        return data

    def _run(self, first: bytes, gzipped: bool) -> None:
        end: BaseException | None = None
        try:
            if gzipped:
                self._inflate(first)
            else:
                data = first
                while data:
                    self._put(data)
                    data = self._read_stored()
        except _Abandoned:
            return
        except BaseException as exc:  # the caller raises it, where its read gets there
            end = exc
        with contextlib.suppress(_Abandoned):
            self._put(end)

    def _put(self, item: bytes | BaseException | None) -> None:
        if self._abandoned.is_set():
            raise _Abandoned
        self._queue.put(item)

    def _inflate(self, data: bytes) -> None:
        # wbits 31: one gzip member, whose header, CRC-32 and size zlib checks.
        member = zlib.decompressobj(wbits=31)
        while True:
            out = member.decompress(data, _CHUNK)  # at most _CHUNK: a bomb stays small
            if out:
                self._tar.update(out)
                self._put(out)
            if member.eof:
                following = self._next_member(member.unused_data)
                if following is None:
                    return
                data, member = following, zlib.decompressobj(wbits=31)
            elif member.unconsumed_tail:
                data = member.unconsumed_tail
            else:
                data = self._read_stored()
                # With no more input, one more call with none flushes what zlib holds.
                if not data and not out:
                    raise EOFError("the gzip stream ends early")

    def _next_member(self, rest: bytes) -> bytes | None:
        """The start of the gzip member after this one; None at the end.

        Zero padding after a member is skipped, as gzip and Python's gzip read it.
        """
        while not (rest := rest.lstrip(b"\0")):
            rest = self._read_stored()
            if not rest:
                return None
        while len(rest) < len(_GZIP_MAGIC) and (more := self._read_stored()):
            rest += more
        if not rest.startswith(_GZIP_MAGIC):
            raise gzip.BadGzipFile(f"not a gzip member after the first ({rest[:2]!r})")
        return rest

    # -- the caller's side ---------------------------------------------------------

    def _more(self) -> bool:
        """Take the thread's next chunk into the window; False at the end."""
        if self._error is not None:
            raise self._error
        if self._ended:
            return False
        item = self._queue.get()
        if item is None:
            self._ended = True
            return False
        if isinstance(item, BaseException):
            self._error = item
            return False
        keep = max(self._start, self._pos - self._TAIL)
        self._window = self._window[keep - self._start :] + item
        self._start = keep
        return True

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        end = self._pos + size
        while self._start + len(self._window) < end and self._more():
            pass
        data = self._window[self._pos - self._start : end - self._start]
        if not data and size and self._error is not None:
            raise self._error
        self._pos += len(data)
        return data

    def at(self, offset: int, size: int) -> bytes | None:
        """The *size* bytes from *offset* or fewer at the end; reads on as needed.

        None if they were read so long ago they are forgotten."""
        while self._start + len(self._window) < offset + size and self._more():
            pass
        if offset < self._start:
            return None
        return self._window[offset - self._start : offset - self._start + size]

    def drain(self) -> None:
        """Read the tar to its end (the thread reads the blob to its end)."""
        while True:
            self._pos = self._start + len(self._window)
            if not self._more():
                break
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the thread and wait for it: the tar is read no further."""
        self._abandoned.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.01)  # frees a put waiting for room
        self._thread.join()

    def drain_blob(self) -> None:
        """After :meth:`stop`: read the rest of the blob, for its digest."""
        while self._read_stored():
            pass

    def blob_digest(self) -> str:
        """The digest of the blob as read so far (the whole of it after :meth:`drain`)."""
        return "sha256:" + self._stored.hexdigest()

    def tar_digest(self) -> str:
        return "sha256:" + self._tar.hexdigest()

    # tarfile's file-object protocol: a stream read once, front to back.
    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("write")

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("seek")

    def close(self) -> None:
        pass


class _Abandoned(Exception):
    """The feed's reader stopped it: its thread ends."""


class _Bad(Exception):
    """A layer entry that is refused; the message says why, the caller names the entry."""


class _Damaged(Exception):
    """A tar that tarfile read to an end that is not the end of the archive."""


def apply_layer(layer: Layer, dest: str, *, stop: threading.Event | None = None) -> None:
    """Extract *layer* into the empty directory *dest*, as an overlayfs lower layer.

    Whiteouts become 0:0 character devices and opaque markers the
    ``trusted.overlay.opaque`` attribute (this needs root). Owners, modes,
    times and ``SCHILY.xattr`` attributes are kept. The blob is verified
    while it streams: its bytes against ``layer.digest`` and ``layer.size``,
    the uncompressed tar against ``layer.diff_id`` (a thread of its own
    reads, inflates and hashes it ahead of the extraction).

    :class:`OciError`, one line naming the entry where there is one, for a
    hostile or damaged layer or a mismatch; nothing is ever written outside
    *dest*, but what was extracted before the error is left for the caller
    to delete. Once *stop* is set (from another thread: layers are applied
    side by side), the extraction ends at the next entry with
    :class:`OciError` ``...: stopped``.
    """
    what = f"layer {_short(layer.digest)}"
    if _is_zstd(layer.media_type):
        raise OciError(f"{what} {_ZSTD_REFUSED}")
    try:
        root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OciError(f"{what}: cannot open {dest}: {exc.strerror or exc}") from exc
    try:
        if os.listdir(root):
            raise OciError(f"{what}: {dest} is not empty; a layer is applied to an empty directory")
        try:
            blob = layer.open()
        except OSError as exc:
            raise OciError(f"{what}: cannot open its blob: {exc.strerror or exc}") from exc
        with blob:
            _apply(layer, blob, root, what, stop)
    finally:
        os.close(root)


def _apply(
    layer: Layer, blob: BinaryIO, root: int, what: str, stop: threading.Event | None
) -> None:
    try:
        feed = _Feed(blob, what, layer.size)
    except OSError as exc:
        raise OciError(f"{what}: cannot read its blob: {exc.strerror or exc}") from exc
    extractor = _Extractor(root)
    problem: str | None
    try:
        with tarfile.open(fileobj=feed, mode="r|") as tf:
            for member in tf:
                if stop is not None and stop.is_set():
                    raise OciError(f"{what}: stopped")
                try:
                    extractor.add(tf, member)
                except _Bad as exc:
                    raise OciError(f"{what}: entry {member.name!r}: {exc}") from None
                except gzip.BadGzipFile:
                    raise
                except OSError as exc:
                    raise OciError(f"{what}: entry {member.name!r}: {exc.strerror or exc}") from exc
                except (OverflowError, ValueError) as exc:
                    # An out-of-range owner or time, a NUL in a link target.
                    raise OciError(f"{what}: entry {member.name!r}: {exc}") from None
            extractor.finish()
            _check_end(feed, tf.offset)
        feed.drain()
    except _Damaged as exc:
        problem = str(exc)
    except EOFError:
        problem = "truncated: the gzip stream ends early"
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc) or "truncated" in str(exc):
            problem = "truncated: the tar ends inside an entry"
        else:
            problem = f"not a valid tar ({exc})"
    except tarfile.TarError as exc:
        problem = f"not a valid tar ({exc})"
    except (gzip.BadGzipFile, zlib.error) as exc:
        problem = f"damaged gzip stream ({exc})"
    except OSError as exc:
        raise OciError(f"{what}: cannot read its blob: {exc.strerror or exc}") from exc
    else:
        problem = None
    finally:
        extractor.close()
        feed.stop()
    if problem is not None:
        raise OciError(f"{what}: {_altered(feed, layer)}{problem}")
    if feed.blob_digest() != layer.digest:
        raise OciError(f"{what}: the blob does not match its digest (it is {feed.blob_digest()})")
    if feed.total != layer.size:
        raise OciError(f"{what}: the blob is {feed.total} bytes, not the {layer.size} expected")
    if feed.tar_digest() != layer.diff_id:
        raise OciError(
            f"{what}: the uncompressed tar does not match diff_id {layer.diff_id}"
            f" (it is {feed.tar_digest()})"
        )


def _altered(feed: _Feed, layer: Layer) -> str:
    """What to say first about a blob that does not parse: that it was altered, if it was."""
    try:
        feed.drain_blob()
    except (OSError, OciError):
        return ""
    if feed.blob_digest() == layer.digest:
        return ""
    return f"the blob does not match its digest (it is {feed.blob_digest()}); "


def _check_end(tar: _Feed, offset: int) -> None:
    """Tell a tar that ends with its end-of-archive block from one tarfile gave up on.

    tarfile ends quietly at a cut or unreadable header. Accepted, as Go's
    archive/tar (which wrote most layers) accepts it: a tar that ends at an
    entry's boundary with no end-of-archive block at all.
    """
    block = tar.at(offset, tarfile.BLOCKSIZE)
    if not block or block.count(0) == len(block) == tarfile.BLOCKSIZE:
        return
    if len(block) < tarfile.BLOCKSIZE:
        raise _Damaged(f"truncated: the tar ends inside a header at byte {offset}")
    raise _Damaged(f"not a valid tar (a damaged header at byte {offset})")


def _entry_parts(name: str) -> tuple[str, ...]:
    """The components of an entry's path below the layer's root; ``./`` is normal."""
    if name.startswith("/"):
        raise _Bad("an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Bad("'..' in its path")
    return parts


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    found = []
    for key, value in m.pax_headers.items():
        if not key.startswith(_PAX_XATTR):
            continue
        name = key[len(_PAX_XATTR) :]
        if name.startswith(_OVERLAY_XATTRS):
            raise _Bad(f"it carries the overlayfs attribute {name}, which a layer may not set")
        # tarfile decodes binary values with surrogateescape: this restores the bytes.
        found.append((name, value.encode("utf-8", "surrogateescape")))
    return found


def _mtime_ns(m: tarfile.TarInfo) -> int:
    return round(m.mtime * 1_000_000_000)


class _Extractor:
    """Makes a layer's entries below the directory open as *root*, never through a symlink."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._cached: tuple[tuple[str, ...], int] | None = None  # the last parent walked
        # Non-directories made so far, by path: what a hardlink may point at.
        self._kinds: dict[tuple[str, ...], str] = {}
        # Directories' times are set last: each entry made inside one changes it.
        self._dir_times: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        self._drop_cache()

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _opendir(self, parts: tuple[str, ...], create: bool) -> int:
        """A new descriptor of the directory *parts*, made (0755) where missing if *create*."""
        if self._cached is not None and self._cached[0] == parts:
            return os.dup(self._cached[1])
        fd = os.dup(self._root)
        try:
            for i, name in enumerate(parts):
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise _Bad(f"{'/'.join(parts[: i + 1])!r} on its path is {kind}") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (parts, os.dup(fd))
        return fd

    def _replace(self, parent: int, parts: tuple[str, ...], keep_dir: bool) -> bool:
        """Remove what an earlier entry made at *parts*; True if it is a directory kept."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._drop_cache()
            n = len(parts)
            self._kinds = {p: k for p, k in self._kinds.items() if p[:n] != parts}
            self._dir_times = {p: t for p, t in self._dir_times.items() if p[:n] != parts}
            # The fd-based rmtree: it never follows a symlink in the tree.
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
            self._kinds.pop(parts, None)
        return False

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Make entry *m* of *tf* (whose data is read from *tf*)."""
        parts = _entry_parts(m.name)
        # (uid_t)-1 is "leave unchanged" to chown, not an owner.
        if not (0 <= m.uid < _NO_ID and 0 <= m.gid < _NO_ID):
            raise _Bad(f"its owner {m.uid}:{m.gid} is out of range")
        if not parts:
            if not m.isdir():
                raise _Bad("the layer's root is not a directory")
            self._set_meta(self._root, m, _xattrs(m))
            self._dir_times[()] = _mtime_ns(m)
            return
        base = parts[-1]
        if base == _OPAQUE:
            self._opaque(parts[:-1])
        elif base.startswith(_WHITEOUT_META):
            return
        elif base.startswith(_WHITEOUT):
            self._whiteout(parts[:-1], base[len(_WHITEOUT) :], m)
        elif m.ischr() or m.isblk():
            raise _Bad("device files are not allowed in a layer")
        elif m.islnk():
            self._hardlink(parts, m)
        elif m.isdir() or m.isreg() or m.issym() or m.isfifo():
            self._make(tf, parts, m, _xattrs(m))
        else:
            raise _Bad(f"unsupported tar entry type {m.type!r}")

    def _opaque(self, dir_parts: tuple[str, ...]) -> None:
        fd = self._opendir(dir_parts, create=True)
        try:
            os.setxattr(fd, _OVERLAY_OPAQUE[0], b"y")
            try:
                os.setxattr(fd, _OVERLAY_OPAQUE[1], b"y")
            except OSError as exc:
                # A file system without user attributes (tmpfs before Linux
                # 6.6): only user-namespace sandboxes lose the mark.
                if exc.errno != errno.EOPNOTSUPP:
                    raise
        finally:
            os.close(fd)

    def _whiteout(self, dir_parts: tuple[str, ...], name: str, m: tarfile.TarInfo) -> None:
        if name in ("", ".", ".."):
            raise _Bad("a whiteout that names no file")
        parts = (*dir_parts, name)
        parent = self._opendir(dir_parts, create=True)
        try:
            self._replace(parent, parts, keep_dir=False)
            # What overlayfs takes for a whiteout: a character device 0:0.
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
            self._kinds[parts] = "whiteout"
        finally:
            os.close(parent)

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        try:
            target = _entry_parts(m.linkname)
        except _Bad:
            raise _Bad(f"its hardlink target {m.linkname!r} is outside the layer") from None
        kind = self._kinds.get(target)
        if not target or target == parts or kind not in ("file", "symlink", "fifo"):
            raise _Bad(f"its hardlink target {m.linkname!r} is not an earlier entry of this layer")
        source_dir = self._opendir(target[:-1], create=False)
        try:
            parent = self._opendir(parts[:-1], create=True)
            try:
                self._replace(parent, parts, keep_dir=False)
                os.link(
                    target[-1],
                    parts[-1],
                    src_dir_fd=source_dir,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
                self._kinds[parts] = kind
            finally:
                os.close(parent)
        finally:
            os.close(source_dir)

    def _make(
        self,
        tf: tarfile.TarFile,
        parts: tuple[str, ...],
        m: tarfile.TarInfo,
        xattrs: list[tuple[str, bytes]],
    ) -> None:
        name = parts[-1]
        parent = self._opendir(parts[:-1], create=True)
        try:
            kept = self._replace(parent, parts, keep_dir=m.isdir())
            if m.isdir():
                if not kept:
                    os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
                try:
                    self._set_meta(fd, m, xattrs)
                finally:
                    os.close(fd)
                self._dir_times[parts] = _mtime_ns(m)
            elif m.isreg():
                fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
                try:
                    _copy(tf, m, fd)
                    self._set_meta(fd, m, xattrs)
                    os.utime(fd, ns=(_mtime_ns(m), _mtime_ns(m)))
                finally:
                    os.close(fd)
                self._kinds[parts] = "file"
            else:
                if m.issym():
                    os.symlink(m.linkname, name, dir_fd=parent)
                    self._kinds[parts] = "symlink"
                else:
                    os.mkfifo(name, 0o600, dir_fd=parent)
                    self._kinds[parts] = "fifo"
                os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
                if m.isfifo():
                    # Just made as a FIFO, so not a symlink; Linux cannot chmod without following.
                    os.chmod(name, m.mode & 0o7777, dir_fd=parent)
                # setxattr takes no dir_fd: the parent's /proc path stands for it.
                for key, value in xattrs:
                    os.setxattr(f"/proc/self/fd/{parent}/{name}", key, value, follow_symlinks=False)
                os.utime(
                    name,
                    ns=(_mtime_ns(m), _mtime_ns(m)),
                    dir_fd=parent,
                    follow_symlinks=False,
                )
        finally:
            os.close(parent)

    @staticmethod
    def _set_meta(fd: int, m: tarfile.TarInfo, xattrs: Iterable[tuple[str, bytes]]) -> None:
        # In this order: chown clears set-ID bits and file capabilities.
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for key, value in xattrs:
            os.setxattr(fd, key, value)

    def finish(self) -> None:
        """Set the directories' times, now that nothing more is made inside them."""
        for parts, ns in self._dir_times.items():
            try:
                fd = self._opendir(parts, create=False)
            except (FileNotFoundError, _Bad):
                continue  # replaced by a later entry
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)


def _copy(tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
    stream = tf.fileobj
    if m.sparse is None and stream is not None and stream.tell() == m.offset_data:
        # Read straight from the tar's stream, which is at m's data (tarfile
        # skips to the next header itself): extractfile's two buffering
        # layers cost more than the write of most files.
        left = m.size
        while left:
            chunk = stream.read(min(left, _CHUNK))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            left -= len(chunk)
            _write_all(fd, chunk)
        return
    src = tf.extractfile(m)
    assert src is not None  # a regular file
    while chunk := src.read(_CHUNK):
        _write_all(fd, chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
