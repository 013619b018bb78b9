"""Images made from sandboxes: ``corral commit`` and the ``run`` recipe.

A sandbox's writable layer (``STATE_DIR/sandboxes/NAME/upper``) is an
overlayfs upper directory, and that is already the form of a store layer:
whiteouts are 0:0 character devices, an opaque directory carries
``trusted.overlay.opaque=y``. So a commit is a copy of it (``cp -a``: owners,
modes, times, hard links, xattrs, device nodes) put on top of the layers of
the image the sandbox runs on, with that image's defaults.

What the copy must not carry over as it is (checked on Linux 6.18 with
the module's defaults: ``redirect_dir``, ``metacopy`` and ``index`` off,
which are also the options corral mounts with):

- ``trusted.overlay.origin`` (a copied-up file's file handle in the lower
  layer it came from), ``impure`` (a directory holding such files), ``nlink``
  (hard-link counts kept with ``index=on``) and ``uuid`` (the upper root's
  overlay identity) describe an upper directory's ties to its own mount:
  they are dropped. A lower layer never reads them.
- ``trusted.overlay.redirect`` (a renamed directory) and ``metacopy`` (a
  file whose data stayed below) need mount options corral does not use, and
  a metacopy file's data is not in the layer at all: a layer holding either
  (which corral's mounts cannot make) is refused, as is any other
  ``trusted.overlay.*`` attribute this code does not know.
- A device node other than a whiteout is refused: a sandbox with
  ``CAP_MKNOD`` can make one (unusable on its ``nodev`` overlay), and in the
  store, which the host's users can reach, it would open the device.
- A sandbox in a user namespace (``userns``) wrote its files as host ids
  ``base`` and up: they are shifted back to the image's ids. Its overlay is
  mounted with ``userxattr``, so it marks an opaque directory
  ``user.overlay.opaque``: the copy marks it both ways, as every layer of
  the store is.

A running sandbox is frozen (its cgroup's freezer, ``docker commit``'s
default pause) while its layer is copied, so the copy is one moment of it,
and thawed after however the copy ends; one paused already stays paused.

The ``run`` recipe (``corral image build run``) is the Dockerfile ``RUN``
step: a sandbox on a base image runs a command, and what it wrote becomes
a new layer on the base. Its cache key is the base image's id, the command
and the environment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rootfs import (
    BUILTIN_BASES,
    Image,
    ImageStore,
    RootfsError,
    StoreError,
    busybox_image,
    check_tag,
    layer_id_of_recipe,
)

from .._errors import CgroupError, CorralError, SandboxError, os_failure
from ._checkpoint import spec_from_dict
from ._records import record_path
from ._sandbox import Runtime
from ._spec import SandboxSpec, parse_env, validate_name

__all__ = ["RunRecipe", "build_run", "commit"]

_DROPPED = frozenset({"origin", "impure", "nlink", "uuid"})
"""``trusted.overlay.*`` attributes that tie an upper directory to its own
mount (see the module's docstring): dropped from a committed layer."""
_KEPT = frozenset({"opaque"})
"""``trusted.overlay.*`` attributes a lower layer reads: kept."""
_PREFIXES = ("trusted.overlay.", "user.overlay.")


def commit(
    runtime: Runtime,
    name: str,
    tag: str | None = None,
    *,
    on_frozen: Callable[[], None] | None = None,
) -> Image:
    """A new image of sandbox *name* (of *runtime*'s run directory): the
    layers of the image it runs on, and its writable layer on top; the base
    image's defaults; named *tag*.

    A running sandbox is frozen while its layer is copied (*on_frozen* is
    called then, before the copy) and thawed after, however the copy ends;
    one that has exited but is not removed yet is copied as it is. *name*
    is a sandbox's, or a fleet's instance (``web-0``). Raises
    :class:`~supervisor.SandboxError` (one line) for a sandbox that is not
    there or runs on a directory rather than an image, or whose layer holds
    what an image may not; :class:`rootfs.StoreError` for a bad *tag*.
    Nothing is left in the store by a commit that fails or is interrupted.
    """
    try:
        return _commit(runtime, name, tag, on_frozen)
    except OSError as exc:
        raise SandboxError(f"commit of {name!r}: {os_failure(exc)}") from exc


def _commit(
    runtime: Runtime, name: str, tag: str | None, on_frozen: Callable[[], None] | None
) -> Image:
    validate_name(name, "sandbox")
    if tag is not None:
        check_tag(tag)  # before anything is made
    record, spec = _record(runtime, name)
    name = spec.name  # a fleet's instance web-0 is sandbox web-0.GENERATION
    store = runtime.images
    base = _base_of(store, record, spec)
    sdir = os.path.join(runtime.state_dir, "sandboxes", name)
    upper = os.path.join(sdir, "upper")
    if not os.path.isdir(upper):
        raise SandboxError(f"sandbox {name!r} has no writable layer ({upper} is gone)")
    shift = None
    if spec.security.userns:
        # Its root's host id: the group the runtime gave the sandbox's
        # directory (which the sandbox itself cannot change), unless set.
        root = spec.security.userns_base
        shift = (root if root is not None else os.stat(sdir).st_gid, spec.security.userns_size)
    # One commit of a sandbox at a time: two would freeze and thaw it
    # under each other.
    with store.building(f"commit/{name}") as build:
        work = build.scratch("commit")
        with _frozen(runtime, record, name, on_frozen):
            _copy(upper, work, name)
        _clean(work, name)
        if shift is not None:
            from ._userns import shift_owners

            shift_owners(work, -shift[0], shift[0], shift[1])
        # A commit is a moment of a sandbox, not a recipe: its layer has an
        # id of its own (hashing the tree would cost more than it tells).
        source = {"builder": "commit", "base": base.id, "sandbox": name}
        layer = layer_id_of_recipe({**source, "nonce": uuid.uuid4().hex})
        build.commit_layer(layer, work)
        return build.commit_image(
            [*base.layers, layer], dict(base.config), {**source, "key": f"commit/{name}"}, tag
        )


def _record(runtime: Runtime, name: str) -> tuple[dict[str, Any], SandboxSpec]:
    """The record of sandbox *name* (see :meth:`Runtime.records`), and its
    spec. *name* is a sandbox's (a ``corral run --name``), or a fleet's
    instance (``web-0``: its newest generation, ``web-0.2``), or a fleet's
    sandbox (``web``: its first instance), as the control verbs take them."""
    import json

    path = record_path(runtime.run_dir, name)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        record = _instance_record(runtime, name)
    except (OSError, ValueError) as exc:
        raise SandboxError(f"sandbox {name!r}: its record {path} is unusable: {exc}") from None
    try:
        return record, spec_from_dict(record["spec"])
    except (KeyError, TypeError, ValueError, CorralError) as exc:
        raise SandboxError(f"sandbox {name!r}: its record is unusable: {exc}") from None


def _instance_record(runtime: Runtime, name: str) -> dict[str, Any]:
    """The record of a fleet's instance *name* (or of sandbox *name*'s first)."""
    found: dict[str, dict[str, Any]] = {}
    for record in runtime.records():
        labels = record.get("labels")
        if not isinstance(labels, dict) or labels.get("instance") not in (name, f"{name}-0"):
            continue
        key = str(labels["instance"])
        newest = found.get(key)
        if newest is None or _generation(record) > _generation(newest):
            found[key] = record
    chosen = found.get(name) or found.get(f"{name}-0")
    if chosen is None:
        raise SandboxError(
            f"no sandbox {name!r} in {runtime.run_dir}"
            " (the name of a `corral run`, or a fleet's instance like web-0)"
        )
    return chosen


def _generation(record: Mapping[str, Any]) -> int:
    try:
        return int(record["labels"].get("generation", 0))
    except (TypeError, ValueError):
        return 0


def _base_of(store: ImageStore, record: Mapping[str, Any], spec: SandboxSpec) -> Image:
    """The image the sandbox of *record* runs on."""
    name, rootfs = spec.name, spec.rootfs
    image_id = record.get("image")
    if "image" not in record:
        # A record of an older corral: the image its rootfs names now.
        if rootfs in BUILTIN_BASES:
            image_id = _id_of(store, "busybox")
        elif not rootfs.startswith(("/", ".")):
            image_id = _id_of(store, rootfs)
    if not isinstance(image_id, str):
        raise SandboxError(
            f"sandbox {name!r} runs on the directory {rootfs!r}, not an image of the store:"
            " only a sandbox on an image can be committed (its layers are the new image's base)"
        )
    try:
        return store.find(image_id)
    except StoreError:
        raise SandboxError(
            f"sandbox {name!r} runs on image {image_id}, which is no longer in the store"
        ) from None


def _id_of(store: ImageStore, ref: str) -> str | None:
    try:
        return store.find(ref).id
    except StoreError:
        return None


@contextlib.contextmanager
def _frozen(
    runtime: Runtime,
    record: Mapping[str, Any],
    name: str,
    on_frozen: Callable[[], None] | None,
) -> Iterator[None]:
    """Freeze sandbox *name* for the block if anything runs in it, and thaw
    it after, whatever happens: interrupted too (the thaw is never cut
    short by a signal). A sandbox paused already is left as it is."""
    cgroup = None
    with contextlib.suppress(CorralError, OSError, KeyError, TypeError):
        found = runtime.cgroups.attach(f"corral-{name}", [str(p) for p in record["cgroup"]])
        if found.pids():
            cgroup = found  # else gone or empty: nothing runs that could write
    try:
        if cgroup is not None and cgroup.is_frozen():
            cgroup = None  # paused by its owner: copied as it is, left paused
    except CgroupError as exc:
        raise SandboxError(f"sandbox {name!r}: cannot freeze it for the copy: {exc}") from None
    if cgroup is None:
        yield
        return
    try:
        try:
            cgroup.freeze()
        except CgroupError as exc:
            raise SandboxError(f"sandbox {name!r}: cannot freeze it for the copy: {exc}") from None
        if on_frozen is not None:
            on_frozen()
        yield
    finally:
        with _signals_held():
            try:
                cgroup.thaw()
            except CgroupError:
                # Removed meanwhile (its `corral run` ended): nothing to thaw.
                if all(os.path.isdir(p) for p in cgroup.paths):
                    raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the block: a second Ctrl-C must
    not cut a thaw short and leave a sandbox frozen. They are delivered after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _copy(upper: str, work: str, name: str) -> None:
    """Copy the writable layer *upper* into *work* with everything
    overlayfs keeps in it: owners, modes, times, hard links, xattrs and
    whiteouts (``cp -a`` as root; ``--reflink`` shares blocks where it can)."""
    try:
        # subprocess.run kills and waits for cp if we are interrupted.
        proc = subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", f"{upper}/.", work],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise SandboxError(f"sandbox {name!r}: cannot run cp: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"cp exited with status {proc.returncode}"]
        raise SandboxError(f"sandbox {name!r}: copying its writable layer: {lines[-1]}")


def _clean(top: str, name: str) -> None:
    """Drop the overlay attributes that tie sandbox *name*'s copied upper
    directory (*top*) to its mount; refuse what a layer may not hold
    (see the module's docstring)."""

    def fail(exc: OSError) -> None:
        raise exc

    _clean_one(top, top, name)
    for root, dirs, files in os.walk(top, onerror=fail):
        for n in dirs + files:
            _clean_one(os.path.join(root, n), top, name)


def _clean_one(path: str, top: str, name: str) -> None:
    st = os.lstat(path)
    if stat.S_ISBLK(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev != 0):
        # A sandbox with CAP_MKNOD can make one (unusable on its nodev
        # overlay); in the store, which the host's users can reach, it
        # would be a door to the device. The OCI importer refuses them too.
        kind = "block" if stat.S_ISBLK(st.st_mode) else "character"
        raise SandboxError(
            f"sandbox {name!r}: its writable layer holds a {kind} device"
            f" {_inside(path, top)} ({os.major(st.st_rdev)}:{os.minor(st.st_rdev)}),"
            " which an image may not: remove it first"
        )
    for attr in os.listxattr(path, follow_symlinks=False):
        # user.overlay.*: what an overlay mounted with userxattr (a sandbox
        # in a user namespace) writes instead.
        prefix = next((p for p in _PREFIXES if attr.startswith(p)), None)
        if prefix is None:
            continue
        what = attr[len(prefix) :]
        if what in _DROPPED:
            os.removexattr(path, attr, follow_symlinks=False)
        elif what == "opaque":
            # Both markers, so that every mount reads it (see rootfs._oci).
            for p in _PREFIXES:
                try:
                    os.setxattr(path, p + what, b"y", follow_symlinks=False)
                except OSError as exc:
                    # No user attributes here (tmpfs before Linux 6.6): the
                    # trusted one is what a mount without userxattr reads.
                    if exc.errno != errno.EOPNOTSUPP or p == _PREFIXES[0]:
                        raise
        elif what not in _KEPT:
            raise SandboxError(
                f"sandbox {name!r}: its writable layer has an overlayfs attribute a commit"
                f" cannot keep: {attr} on {_inside(path, top)}"
                " (made by a mount with redirect_dir or metacopy?)"
            )


def _inside(path: str, top: str) -> str:
    """*path* as the sandbox saw it (below its root *top*)."""
    rel = os.path.relpath(path, top)
    return "/" if rel == "." else "/" + rel


@dataclass(frozen=True)
class RunRecipe:
    """The ``run`` recipe: *command* (``/bin/sh -c``) run in a sandbox on
    image *base*, with *env* (``K=V`` items) added to the image's."""

    base: str
    """An image: a name, an id (prefix) or ``busybox``."""
    command: str
    env: tuple[str, ...] = field(default=())

    def check(self) -> RunRecipe:
        """This recipe, or one line saying which key is wrong."""
        if not self.base:
            raise RootfsError("run: from: expected an image to build on, got nothing")
        if not self.command.strip() or "\0" in self.command:
            raise RootfsError(f"run: run: expected a shell command, got {self.command!r}")
        try:
            parse_env(self.env)
        except CorralError as exc:
            raise RootfsError(f"run: {exc}") from None
        return self

    def data(self, base_id: str) -> dict[str, object]:
        """The recipe as plain data, on the base image *base_id*: what the
        build cache is keyed by (the environment as the sandbox gets it:
        later items win, order does not matter)."""
        env = parse_env(self.env)
        return {
            "builder": "run",
            "format": 1,
            "base": base_id,
            "run": self.command,
            "env": [f"{k}={v}" for k, v in sorted(env.items())],
        }


def build_run(
    runtime: Runtime,
    recipe: RunRecipe,
    tag: str | None = None,
    output: Callable[[str], None] | None = None,
) -> Image:
    """The image of *recipe*: from the store's cache, or built now by
    running its command in a sandbox on its base (*output* gets the
    command's output lines) and putting what it wrote on top of the base.
    Named *tag* if given. :class:`RootfsError` with the command's status and
    last lines if it fails; nothing is left of a failed or interrupted build
    (the sandbox is removed either way)."""
    try:
        return _build_run(runtime, recipe, tag, output)
    except OSError as exc:
        raise RootfsError(f"run: {os_failure(exc)}") from exc


def _build_run(
    runtime: Runtime,
    recipe: RunRecipe,
    tag: str | None,
    output: Callable[[str], None] | None,
) -> Image:
    recipe.check()
    if tag is not None:
        check_tag(tag)
    store = runtime.images
    try:
        base = busybox_image(store) if recipe.base in BUILTIN_BASES else store.find(recipe.base)
    except StoreError as exc:
        raise RootfsError(f"run: from: {exc}") from None
    data = recipe.data(base.id)
    layer = layer_id_of_recipe(data)
    key = "run/" + layer[7:]
    with store.building(key) as build:
        for img in store.images():
            if img.source.get("key") == key and all(build.has_layer(x) for x in img.layers):
                if tag is None:
                    return img
                store.tag(img, tag)
                return store.find(tag)
        if not build.has_layer(layer):
            work = build.scratch("run")
            _run(runtime, base, recipe, work, output)
            build.commit_layer(layer, work)
        return build.commit_image(
            [*base.layers, layer], dict(base.config), {**data, "key": key}, tag
        )


_TAIL = 5
"""Lines of a failed command's output its error repeats."""


def _run(
    runtime: Runtime,
    base: Image,
    recipe: RunRecipe,
    work: str,
    output: Callable[[str], None] | None,
) -> None:
    """Run *recipe*'s command in a new sandbox on *base*; copy what it wrote
    into *work*; remove the sandbox."""
    name = f"build-{os.urandom(6).hex()}"
    spec = SandboxSpec(
        name=name,
        argv=("/bin/sh", "-c", recipe.command),
        rootfs=base.id,
        env=parse_env(recipe.env),
    )
    read, write = os.pipe()
    try:
        with open(os.devnull, "rb") as null:
            sandbox = runtime.create(spec, stdio=(null.fileno(), write, write))
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    tail: list[str] = []
    with sandbox, os.fdopen(read, "rb") as lines:
        # Until the end of its output: once the command ends, its init does,
        # and the kernel kills whatever else still holds the pipe.
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\n")
            tail = [*tail[-(_TAIL - 1) :], line]
            if output is not None:
                output(line)
        result = sandbox.wait()
        if result.status != 0:
            on = base.tags[0] if base.tags else base.short_id
            message = f"run: {recipe.command!r} on {on} failed with status {result.status}"
            if tail:
                message += "; its last lines:" + "".join(f"\n  {x}" for x in tail)
            else:
                message += " (it printed nothing)"
            raise RootfsError(message)
        _copy(os.path.join(sandbox.state_path, "upper"), work, name)
    _clean(work, name)
