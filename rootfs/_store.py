"""The image store: root file systems as stacks of shared, read-only layers.

Below ``STATE_DIR/images``::

    layers/sha256/HEX/     one layer: a directory in overlayfs lower-layer
                           form (whiteouts are 0:0 character devices, opaque
                           directories carry trusted.overlay.opaque=y)
    images/sha256/HEX.json one image: its layers (bottom first), the
                           defaults it gives a sandbox, how it was made
    tags/NAME              an image's name: the id of the image it names
    tmp/                   builds in progress, each with its builder's lock
    locks/KEY.lock         one build of a recipe at a time

Everything is content-addressed: an image's id is the SHA-256 of its
description, a layer's is the SHA-256 of its uncompressed tar (an OCI
layer's ``diff_id``) or, for a layer a builder made, of its recipe. Two
images built on the same base store it once; a sandbox mounts an image's
layers as overlayfs lower layers, top first.

Nothing is ever half there. A build works in ``tmp/`` and renames each
finished layer, then the image's description, then its name, into place.
A build that fails or is interrupted (SIGINT; SIGTERM and SIGHUP where
:func:`reverting` is used) removes what it made, as the seed's LXC
template does in its ``revert``; what a build killed outright left is
removed by the next build or ``prune``, once its builder's lock is free.
Concurrent builds of one recipe take turns on its lock: the first builds,
the others find its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

from ._errors import RootfsError

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "BuildContext",
    "Image",
    "ImageStore",
    "StoreError",
    "check_tag",
    "layer_id_of_recipe",
    "reverting",
]


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def _quote(name: str) -> str:
    """``urllib.parse.quote(name, safe="")``, exactly (a tag's file name),
    without importing urllib.parse (and ipaddress) on every start."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in name.encode())


def _unquote(entry: str) -> str:
    """The inverse of :func:`_quote` (listing tags only)."""
    import urllib.parse

    return urllib.parse.unquote(entry)


class StoreError(RootfsError):
    """An image store operation failed (one line)."""


class Image:
    """One image of the store.

    A plain class, not a dataclass: the store is on every ``corral run``'s
    path, and dataclasses (with inspect, ast, tokenize...) would be the
    largest import on it."""

    __slots__ = ("config", "created", "id", "layers", "source", "tags")

    def __init__(
        self,
        id: str,
        layers: tuple[str, ...],
        config: dict[str, Any],
        source: dict[str, Any],
        created: float,
        tags: tuple[str, ...] = (),
    ) -> None:
        self.id = id
        self.layers = layers
        self.config = config
        self.source = source
        self.created = created
        self.tags = tags

    def _fields(self) -> tuple[Any, ...]:
        return (self.id, self.layers, self.config, self.source, self.created, self.tags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # its config and source are dicts

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, layers={self.layers!r}, tags={self.tags!r})"

    id: str
    """``sha256:HEX`` of its description."""
    layers: tuple[str, ...]
    """Its layers' ids, bottom first."""
    config: dict[str, Any]
    """The defaults it gives a sandbox: ``env`` (list of ``K=V``),
    ``entrypoint`` and ``cmd`` (lists or None), ``workdir``, ``user``,
    ``exposed_ports``."""
    source: dict[str, Any]
    """How it was made: ``builder`` and that builder's recipe (``key``
    identifies the recipe for the build cache)."""
    created: float
    tags: tuple[str, ...]
    """Its names in the store (filled in by the store)."""

    @property
    def short_id(self) -> str:
        """The first 12 hex digits of its id, as container tools show it."""
        return self.id.split(":", 1)[1][:12]

    def describe(self) -> dict[str, Any]:
        """Plain data, as ``corral image inspect --json`` shows it."""
        return {
            "id": self.id,
            "tags": list(self.tags),
            "layers": list(self.layers),
            "config": self.config,
            "source": self.source,
            "created": self.created,
        }


def layer_id_of_recipe(recipe: dict[str, Any]) -> str:
    """The id of a layer a builder makes from *recipe* (plain data): a
    built layer is addressed by what it was made from, since hashing a
    whole tree to find its id would cost more than the build's cache saves."""
    import hashlib

    return "sha256:" + hashlib.sha256(_canonical(recipe)).hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _hex(digest: str, what: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise StoreError(f"{what}: expected sha256:<64 hex digits>, got {digest!r}")
    return hexpart


def check_tag(name: str) -> str:
    """*name* if it can name an image (``debian:bookworm``, ``app:1``),
    else a :class:`StoreError` saying what a name looks like: checked
    before a build, so that a bad name never leaves an unnamed image."""
    if not name or len(name) > 200 or name.startswith((".", "/")) or "\n" in name:
        raise StoreError(f"image name: expected a name like debian:bookworm, got {name!r}")
    if name.startswith("sha256:"):
        raise StoreError(f"image name: {name!r} looks like an image id, not a name")
    return name


class ImageStore:
    """The images and layers below *root* (``STATE_DIR/images``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    # -- paths ---------------------------------------------------------------

    def layer_path(self, layer_id: str) -> str:
        """The directory of layer *layer_id* (whether or not it exists)."""
        return os.path.join(self.root, "layers", "sha256", _hex(layer_id, "layer"))

    def _image_path(self, image_id: str) -> str:
        return os.path.join(self.root, "images", "sha256", _hex(image_id, "image") + ".json")

    def _tag_path(self, name: str) -> str:
        # Quoted: a name like "library/debian:12" is one file.
        return os.path.join(self.root, "tags", _quote(check_tag(name)))

    def lowerdirs(self, image: Image) -> list[str]:
        """The overlayfs lower directories of *image*, top layer first."""
        return [self.layer_path(layer) for layer in reversed(image.layers)]

    # -- reading -------------------------------------------------------------

    def _load(self, image_id: str) -> Image:
        try:
            with open(self._image_path(image_id)) as f:
                d = json.load(f)
            return Image(
                id=image_id,
                layers=tuple(str(x) for x in d["layers"]),
                config=dict(d.get("config") or {}),
                source=dict(d.get("source") or {}),
                created=float(d.get("created", 0.0)),
            )
        except FileNotFoundError:
            raise StoreError(f"no image {image_id} in {self.root}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"image {image_id}: its description is unusable: {exc}") from None

    def _tags(self) -> dict[str, str]:
        """Every name, with the id it names."""
        folder = os.path.join(self.root, "tags")
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(folder)):
                if entry.startswith("."):
                    continue
                with contextlib.suppress(OSError), open(os.path.join(folder, entry)) as f:
                    out[_unquote(entry)] = f.read().strip()
        return out

    def images(self) -> list[Image]:
        """Every image, newest first, with its names."""
        by_id: dict[str, list[str]] = {}
        for name, image_id in self._tags().items():
            by_id.setdefault(image_id, []).append(name)
        out = []
        folder = os.path.join(self.root, "images", "sha256")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                if not entry.endswith(".json"):
                    continue
                image_id = "sha256:" + entry[: -len(".json")]
                with contextlib.suppress(StoreError):
                    img = self._load(image_id)
                    out.append(_with_tags(img, by_id.get(image_id, [])))
        return sorted(out, key=lambda i: i.created, reverse=True)

    def find(self, ref: str) -> Image:
        """The image *ref* names: a name, an id, or a unique prefix of one
        (at least 4 hex digits)."""
        tags = self._tags()
        if ref in tags:
            image_id = tags[ref]
        else:
            hexpart = ref.removeprefix("sha256:")
            if len(hexpart) < 4 or not all(c in "0123456789abcdef" for c in hexpart):
                raise StoreError(f"no image named {ref!r} (corral image ls lists them)")
            matches = [i.id for i in self.images() if i.id[7:].startswith(hexpart)]
            if len(matches) != 1:
                what = "no image" if not matches else f"{len(matches)} images"
                raise StoreError(f"{what} with an id starting {hexpart!r}")
            image_id = matches[0]
        img = self._load(image_id)
        return _with_tags(img, [n for n, i in tags.items() if i == image_id])

    def tagged(self, name: str) -> Image | None:
        """The image named *name*, if there is one (one file read: the
        fast path of every sandbox start)."""
        try:
            with open(self._tag_path(name)) as f:
                return _with_tags(self._load(f.read().strip()), [name])
        except (OSError, StoreError):
            return None

    # -- writing -------------------------------------------------------------

    def _private(self) -> None:
        """Make the store's root reachable by root alone (0700), as it is
        made and whenever something is written in it: its layers hold what
        images hold (setuid binaries, an image's secrets) with their owners
        and modes, and a host user must not run or read those from there
        (Docker keeps ``/var/lib/docker`` 0710 for the same reason). No
        sandbox needs to reach it: user-namespace sandboxes see layers
        through idmapped mounts, or shifted copies, made by root."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if os.stat(self.root).st_mode & 0o077:
            os.chmod(self.root, 0o700)

    def tag(self, image: Image, name: str) -> None:
        """Name *image* *name* (atomically; replacing what the name named)."""
        path = self._tag_path(name)
        self._private()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        _write_atomic(path, image.id + "\n")

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[BuildContext]:
        """A build of recipe *key*: waits for another build of the same
        recipe, then yields a context to make layers and the image in;
        everything it made is removed if the block fails."""
        import hashlib

        self._private()
        os.makedirs(os.path.join(self.root, "locks"), mode=0o755, exist_ok=True)
        lock_path = os.path.join(
            self.root, "locks", hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"
        )
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build of a recipe at a time
            self.sweep_builds()
            ctx = BuildContext(self)
            try:
                yield ctx
            finally:
                ctx.close()
        finally:
            os.close(lock)

    def sweep_builds(self) -> list[str]:
        """Remove what builds that were killed left in ``tmp/`` (their
        builder's lock is free); return those entries."""
        folder = os.path.join(self.root, "tmp")
        swept = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                if not entry.endswith(".lock"):
                    continue
                path = os.path.join(folder, entry)
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live build
                    work = path[: -len(".lock")]
                    shutil.rmtree(work, ignore_errors=True)
                    os.unlink(path)
                    swept.append(entry[: -len(".lock")])
                finally:
                    os.close(fd)
        return swept

    def remove(self, ref: str, users: Callable[[Image], list[str]] | None = None) -> Image:
        """Remove image *ref* (a name removes the name; the image goes with
        its last name, unless it has other names); refused with the
        sandboxes *users* says use it. Its layers go with the next prune."""
        img = self.find(ref)
        in_use = users(img) if users is not None else []
        if in_use:
            raise StoreError(
                f"image {ref!r} is used by sandbox {in_use[0]!r}"
                + (f" and {len(in_use) - 1} more" if len(in_use) > 1 else "")
                + ": remove the sandbox first"
            )
        tags = self._tags()
        if ref in tags:
            _unlink(self._tag_path(ref))
            if any(i == img.id for n, i in tags.items() if n != ref):
                return img  # still named otherwise
        else:
            for name, image_id in tags.items():
                if image_id == img.id:
                    _unlink(self._tag_path(name))
        _unlink(self._image_path(img.id))
        return img

    def prune(self, keep: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
        """Remove images without a name (unless *keep* says a sandbox uses
        the id), layers no image uses, and what killed builds left."""
        removed: dict[str, list[str]] = {"images": [], "layers": [], "builds": []}
        removed["builds"] = self.sweep_builds()
        named = set(self._tags().values())
        used_layers: set[str] = set()
        for img in self.images():
            if img.id in named or (keep is not None and keep(img.id)):
                used_layers.update(img.layers)
                continue
            _unlink(self._image_path(img.id))
            removed["images"].append(img.id)
        folder = os.path.join(self.root, "layers", "sha256")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                layer_id = "sha256:" + entry
                if entry.startswith(".removing-"):
                    # A removal cut short: finish it.
                    shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
                    continue
                if entry.startswith(".") or layer_id in used_layers:
                    continue
                if _remove_tree(os.path.join(folder, entry)):
                    removed["layers"].append(layer_id)
        return removed


class BuildContext:
    """What one build makes, removed again unless committed (see
    :meth:`ImageStore.building`)."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self._made: list[tuple[str, int]] = []
        self._new_layers: list[str] = []
        """Layers this build added to the store: removed again if it fails
        before an image uses them (the seed's revert: nothing left)."""
        self._done = False

    def scratch(self, what: str) -> str:
        """A new empty directory under ``tmp/`` for this build (removed at
        its end), held by this process's lock against :meth:`sweep_builds`."""
        folder = os.path.join(self.store.root, "tmp")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # The lock first, the directory after: a build killed between the
        # two leaves a lock without a directory, which a sweep removes.
        import tempfile  # builds only: not on a start's path

        lock, lock_path = tempfile.mkstemp(prefix=f"{what}-", suffix=".lock", dir=folder)
        fcntl.flock(lock, fcntl.LOCK_EX)
        work = lock_path[: -len(".lock")]
        self._made.append((work, lock))
        os.mkdir(work, 0o755)
        return work

    def has_layer(self, layer_id: str) -> bool:
        """True if the store has layer *layer_id* already (a shared base)."""
        return os.path.isdir(self.store.layer_path(layer_id))

    def commit_layer(self, layer_id: str, work: str) -> str:
        """Move the finished layer in *work* (from :meth:`scratch`) into
        the store as *layer_id*; return its path. If the store has it
        already (content-addressed: the same), ours is dropped."""
        dest = self.store.layer_path(layer_id)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        try:
            os.rename(work, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
        else:
            self._new_layers.append(layer_id)
        return dest

    def commit_image(
        self,
        layers: list[str],
        config: dict[str, Any],
        source: dict[str, Any],
        tag: str | None,
    ) -> Image:
        """Record the image of *layers* (bottom first, all committed) and
        name it *tag*; return it."""
        import hashlib

        for layer in layers:
            if not self.has_layer(layer):
                raise StoreError(f"layer {layer} is not in the store")
        body = {"layers": layers, "config": config, "source": source}
        image_id = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
        path = self.store._image_path(image_id)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if not os.path.exists(path):
            _write_atomic(path, json.dumps({**body, "created": time.time()}, indent=1) + "\n")
        img = self.store._load(image_id)
        if tag is not None:
            self.store.tag(img, tag)
        self._done = True
        return _with_tags(img, [tag] if tag else [])

    def close(self) -> None:
        """Remove every scratch directory still there (a failed or
        interrupted build's, or the rest of a finished one's), and the
        layers a build that made no image added, unless an image uses
        them (a concurrent build of another recipe sharing one)."""
        while self._made:
            work, lock = self._made.pop()
            shutil.rmtree(work, ignore_errors=True)
            _unlink(f"{work}.lock")
            os.close(lock)
        if not self._done and self._new_layers:
            used = {layer for image in self.store.images() for layer in image.layers}
            for layer in self._new_layers:
                if layer not in used:
                    _remove_tree(self.store.layer_path(layer))
        self._new_layers = []


class BuildInterrupted(KeyboardInterrupt):
    """A build was interrupted by SIGTERM or SIGHUP (see :func:`reverting`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def reverting() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP interrupt it like SIGINT
    does (a :class:`BuildInterrupted`), so that a build's clean-up runs:
    the seed's ``trap revert SIGHUP SIGINT SIGTERM``. Main thread only."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise BuildInterrupted(signum)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _with_tags(img: Image, tags: list[str]) -> Image:
    return Image(img.id, img.layers, img.config, img.source, img.created, tuple(sorted(tags)))


def _remove_tree(path: str) -> bool:
    """Remove a layer, renamed away first so that it is never half there
    under its name; False if it was not there."""
    doomed = os.path.join(os.path.dirname(path), f".removing-{os.path.basename(path)}")
    try:
        os.rename(path, doomed)
    except OSError:
        return False
    if os.path.islink(doomed):
        os.unlink(doomed)  # a layer shared from elsewhere: only the link is ours
    else:
        shutil.rmtree(doomed, ignore_errors=True)
    return True


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
