"""The built-in ``busybox`` base: a complete tiny rootfs from one static binary.

Built once from the host's static busybox (Debian's ``busybox-static``)
into the cache, atomically: everything happens in a temporary directory
beside the final one, which is renamed into place at the end. An
interrupted build leaves nothing behind, and two concurrent builds both
succeed (the loser removes its copy).

The configure step does what the seed's LXC template does where it applies
to a sandbox: the usual top-level directories, ``/var/run -> ../run``, a
minimal ``/etc`` (passwd, group, hosts, hostname, fstab, resolv.conf,
nsswitch.conf) and the host's localtime.
"""

from __future__ import annotations

import os
import struct

from ._errors import RootfsError

__all__ = ["BUSYBOX_CANDIDATES", "ensure_busybox", "is_static_elf"]

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
"""Where the host's busybox is looked for (Debian's busybox-static installs /bin/busybox)."""

_MANIFEST = ".corral-rootfs.json"
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


def ensure_busybox(cache_dir: str | os.PathLike[str]) -> str:
    """Return the path of the cached busybox base, building it first if needed.

    :class:`RootfsError` if it cannot be built (a full disk: the message
    names the path and the reason); nothing of a failed build is left.
    """
    dest = os.path.join(os.fspath(cache_dir), "busybox")
    # The fast path is one stat: it runs on every sandbox start.
    if os.path.isfile(os.path.join(dest, _MANIFEST)):
        return dest
    try:
        _build_atomically(os.fspath(cache_dir), dest)
    except OSError as exc:
        # The directory, not exc.filename: a failed copy names its source.
        raise RootfsError(
            f"cannot build the busybox base in {cache_dir}: {exc.strerror or exc}"
        ) from exc
    return dest


def _build_atomically(cache: str, dest: str) -> None:
    import shutil
    import tempfile

    source = _find_busybox()
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".busybox.build-", dir=cache)
    try:
        _build(tmp, source)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isfile(os.path.join(dest, _MANIFEST)):
                # A leftover without a manifest is a broken base: replace it.
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        # Reached with tmp still there on failure, interruption, or a lost race.
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _build(tmp: str, source: str) -> None:
    import json
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
    (root / _MANIFEST).write_text(
        json.dumps({"format": _FORMAT, "builder": "busybox", "source": source}) + "\n"
    )
