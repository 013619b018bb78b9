"""The built-in ``busybox`` base: a complete tiny rootfs from one static binary.

Built once from the host's static busybox (Debian's ``busybox-static``)
into the image store (:mod:`._store`) as the image ``busybox``: one layer,
built in the store's scratch space and renamed into place; an interrupted
build leaves nothing behind, and concurrent builds wait for one.

The configure step does what the seed's LXC template does where it applies
to a sandbox: the usual top-level directories, ``/var/run -> ../run``, a
minimal ``/etc`` (passwd, group, hosts, hostname, fstab, resolv.conf,
nsswitch.conf) and the host's localtime.
"""

from __future__ import annotations

import os
import struct

from ._errors import RootfsError
from ._store import Image, ImageStore, layer_id_of_recipe

__all__ = ["BUSYBOX_CANDIDATES", "busybox_image", "ensure_busybox", "is_static_elf"]

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
"""Where the host's busybox is looked for (Debian's busybox-static installs /bin/busybox)."""

_FORMAT = 1

_DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "root": 0o700,
    "run": 0o755, "var": 0o755, "var/tmp": 0o1777, "var/log": 0o755, "home": 0o755,
    "mnt": 0o755, "opt": 0o755,
}  # fmt: skip

_ETC = {
    "passwd": (
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ),
    "group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "hostname": "corral\n",
    "fstab": "# the sandbox's mounts are made by corral\n",
    "resolv.conf": "",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def is_static_elf(path: str) -> bool:
    """True if *path* is an ELF executable without a program interpreter.

    A dynamically linked busybox would not run in a rootfs that has no libc.
    """
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return False
        is64 = head[4] == 2
        endian = "<" if head[5] == 1 else ">"
        if is64:
            (phoff,) = struct.unpack_from(endian + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        else:
            (phoff,) = struct.unpack_from(endian + "I", head, 28)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _find_busybox() -> str:
    for c in BUSYBOX_CANDIDATES:
        if os.path.isfile(c) and is_static_elf(c):
            return c
    found = [c for c in BUSYBOX_CANDIDATES if os.path.isfile(c)]
    if found:
        raise RootfsError(
            f"busybox at {found[0]} is dynamically linked; install the static one"
            " (apt-get install busybox-static)"
        )
    raise RootfsError("no busybox found on the host (apt-get install busybox-static)")


RECIPE = {"builder": "busybox", "format": _FORMAT}
"""The busybox base's recipe: the host's static busybox, configured."""


def busybox_image(store: ImageStore) -> Image:
    """The store's ``busybox`` image, built first if needed (atomically;
    concurrent callers wait for one build).

    :class:`RootfsError` if it cannot be built (a full disk: the message
    names the store and the reason); nothing of a failed build is left.
    """
    # The fast path reads one name and one description: it runs on every
    # sandbox start.
    img = store.tagged("busybox")
    if img is not None and img.source.get("key") == _KEY and _present(store, img):
        return img
    try:
        with store.building(_KEY) as build:
            img = store.tagged("busybox")  # built while we waited for the lock
            if img is not None and img.source.get("key") == _KEY and _present(store, img):
                return img
            layer = layer_id_of_recipe(RECIPE)
            if not build.has_layer(layer):
                work = build.scratch("busybox")
                _build(work, _find_busybox())
                build.commit_layer(layer, work)
            config = {
                "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                "entrypoint": None,
                "cmd": ["/bin/sh"],
                "workdir": "/",
                "user": "",
                "exposed_ports": [],
            }
            return build.commit_image([layer], config, {**RECIPE, "key": _KEY}, "busybox")
    except OSError as exc:
        # The store, not exc.filename: a failed copy names its source.
        raise RootfsError(
            f"cannot build the busybox base in {store.root}: {exc.strerror or exc}"
        ) from exc


_KEY = "busybox/sha256:8d5e34530c6e08aef617ffa452edc87d5caedeec206d71f1635a904c1e55fbbf"
"""``"busybox/" + layer_id_of_recipe(RECIPE)``, written out: hashing it at
import would put hashlib (OpenSSL) on every start's path. A test checks the
two agree; a change of the recipe changes it."""


def _present(store: ImageStore, img: Image) -> bool:
    return all(os.path.isdir(store.layer_path(layer)) for layer in img.layers)


def ensure_busybox(store_root: str | os.PathLike[str]) -> str:
    """The directory of the busybox base in the image store at
    *store_root* (``STATE_DIR/images``), built first if needed."""
    store = ImageStore(store_root)
    return store.lowerdirs(busybox_image(store))[0]


def _build(tmp: str, source: str) -> None:
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(tmp)
    for d, mode in _DIRS.items():
        (root / d).mkdir(exist_ok=True)
        os.chmod(root / d, mode)
    shutil.copy2(source, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    try:
        applets = subprocess.run(
            [source, "--list-full"], check=True, capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise RootfsError(f"cannot list busybox applets of {source}: {exc}") from exc
    for applet in applets:
        link = root / applet
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    os.symlink("../run", root / "var/run")
    for name, text in _ETC.items():
        (root / "etc" / name).write_text(text)
    try:
        # Copy the content, not the link: the sandbox has no zoneinfo.
        shutil.copyfile("/etc/localtime", root / "etc/localtime")
    except OSError:
        pass
