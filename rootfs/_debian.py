"""The ``debian`` builder: a Debian root file system from Debian's mirror,
made by Debian's own ``mmdebstrap``, then configured as the seed's LXC
template configures its distribution.

Why mmdebstrap, not debootstrap: it resolves dependencies with apt (so
``packages`` are installed the way apt would, in one pass), downloads in
parallel, and writes straight into the target directory; it is packaged
in Debian 12 and is what Debian's own image tooling uses. ``benchmarks/
images.py`` measures it against debootstrap on the same mirror.

It runs in a mount namespace of its own (``unshare --mount``): whatever it
mounts in the target for the packages' scripts (``/proc``, ``/sys``,
``/dev``) goes with that namespace, however the build ends. A build killed
outright can never leave a host mount below the store for a clean-up to
walk into.

The configure step (the template's ``configure_*``), per the seed:
``/var/run -> ../run``, the host's nameservers in ``/etc/resolv.conf``
(until networking gives sandboxes their own), the hostname, a minimal
``/etc/hosts`` and ``/etc/fstab``, the root password locked unless the
recipe sets one; no getty or console setup: tini is PID 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ._errors import RootfsError
from ._process import set_child_subreaper, stop_group
from ._store import Image, ImageStore, layer_id_of_recipe

__all__ = ["DebianRecipe", "build_debian", "host_mirror", "parse_packages"]

VARIANTS = ("minbase", "buildd", "required", "important", "standard", "apt", "essential")
_FORMAT = 1


def host_mirror(sources: str = "/etc/apt/sources.list.d/debian.sources") -> str:
    """The Debian mirror the host's apt uses (its first ``deb`` URI), or
    ``http://deb.debian.org/debian``."""
    for path in (sources, "/etc/apt/sources.list"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri.rstrip("/")
            if line.startswith("deb ") and "security" not in line:
                parts = [p for p in line.split()[1:] if not p.startswith("[")]
                if parts:
                    return parts[0].rstrip("/")
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class DebianRecipe:
    """What a ``debian`` image is made of (its recipe keys, docs/images.md)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    mirror: str = field(default_factory=host_mirror)
    hostname: str = "corral"
    root_password: str | None = None
    """A crypt(3) hash for root (``openssl passwd -6``); None: locked."""

    def check(self) -> DebianRecipe:
        """This recipe, or one line saying which key is wrong."""
        if not self.suite or not all(c.isalnum() or c in "-." for c in self.suite):
            raise RootfsError(f"debian: suite: expected a name like bookworm, got {self.suite!r}")
        if self.variant not in VARIANTS:
            raise RootfsError(
                f"debian: variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        for p in self.packages:
            if not p or not all(c.isalnum() or c in "+-.:" for c in p):
                raise RootfsError(f"debian: packages: expected package names, got {p!r}")
        if not self.mirror.startswith(("http://", "https://", "file:/")):
            raise RootfsError(
                f"debian: mirror: expected an http(s) or file URL, got {self.mirror!r}"
            )
        return self

    def data(self) -> dict[str, object]:
        """The recipe as plain data (what the build cache is keyed by)."""
        return {
            "builder": "debian",
            "format": _FORMAT,
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(self.packages),
            "mirror": self.mirror,
            "hostname": self.hostname,
            "root_password": self.root_password is not None,
            "password_hash": self.root_password or "",
        }

    @property
    def default_tag(self) -> str:
        """``debian:SUITE``, with ``-VARIANT`` and ``+N`` (packages) when they differ."""
        tag = f"debian:{self.suite}"
        if self.variant != "minbase":
            tag += f"-{self.variant}"
        if self.packages:
            tag += "+" + layer_id_of_recipe(self.data())[7:15]
        return tag


def build_debian(
    store: ImageStore,
    recipe: DebianRecipe,
    tag: str | None = None,
    output: Callable[[str], None] | None = None,
) -> Image:
    """The image of *recipe*, from the store's cache or built now (minutes,
    the first time); named *tag* (default: :attr:`DebianRecipe.default_tag`).
    *output* gets mmdebstrap's progress lines. One line on failure
    (RootfsError), and nothing left in the store."""
    recipe.check()
    for tool in ("mmdebstrap", "unshare"):
        if shutil.which(tool) is None:
            raise RootfsError(f"debian: {tool} not found (apt-get install mmdebstrap util-linux)")
    data = recipe.data()
    layer = layer_id_of_recipe(data)
    key = "debian/" + layer[7:]
    name = tag or recipe.default_tag
    with store.building(key) as build:
        for img in store.images():
            if img.source.get("key") == key and all(build.has_layer(x) for x in img.layers):
                store.tag(img, name)
                return store.find(name)
        if not build.has_layer(layer):
            work = build.scratch("debian")
            # Its temporary files (a gpg home...) in the build's scratch
            # space too: an interrupted build removes them with the rest.
            _mmdebstrap(recipe, work, output, tmpdir=build.scratch("debian-tmp"))
            _configure(recipe, work)
            build.commit_layer(layer, work)
        config = {
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "entrypoint": None,
            "cmd": ["/bin/bash"],
            "workdir": "/",
            "user": "",
            "exposed_ports": [],
        }
        return build.commit_image([layer], config, {**data, "key": key}, name)


def _mmdebstrap(
    recipe: DebianRecipe, target: str, output: Callable[[str], None] | None, tmpdir: str
) -> None:
    argv: list[str] = [
        "unshare", "--mount", "--propagation", "private", "--",
        "mmdebstrap", "--mode=root", f"--variant={recipe.variant}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    ]  # fmt: skip
    if recipe.packages:
        argv.append("--include=" + ",".join(recipe.packages))
    argv += [recipe.suite, target, recipe.mirror]
    # Its own process group: a terminal's Ctrl-C reaches us, and we stop it
    # (and wait for it), not it half way on its own. We are the subreaper of
    # what it starts, so that an interrupted build leaves no process behind.
    set_child_subreaper()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        env={**os.environ, "TMPDIR": tmpdir},
    )
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = [*tail[-19:], line]
            if output is not None:
                output(line)
        proc.wait()
    except BaseException:
        # Its mounts are in its own namespace: once it and what it started
        # are gone, its target is plain files and no apt or dpkg of it runs on.
        stop_group(proc, grace=30)
        raise
    if proc.returncode != 0:
        reason = next((x for x in reversed(tail) if x.startswith("E:")), tail[-1] if tail else "")
        raise RootfsError(
            f"debian: mmdebstrap {recipe.suite} from {recipe.mirror} failed"
            f" (status {proc.returncode}): {reason.removeprefix('E: ')}"
        )


def _configure(recipe: DebianRecipe, root: str) -> None:
    """The template's configure step, for a sandbox under tini."""
    run = os.path.join(root, "var", "run")
    if not os.path.islink(run):
        shutil.rmtree(run, ignore_errors=True)
        os.symlink("../run", run)
    _write(root, "etc/hostname", recipe.hostname + "\n")
    _write(
        root,
        "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    _write(root, "etc/fstab", "# the sandbox's mounts are made by corral\n")
    _write(root, "etc/resolv.conf", _host_nameservers())
    _set_root_password(root, recipe.root_password)


def _host_nameservers(path: str = "/etc/resolv.conf") -> str:
    try:
        with open(path) as f:
            lines = [x for x in f if x.split()[:1] in (["nameserver"], ["search"], ["options"])]
    except OSError:
        lines = []
    return "".join(lines)


def _set_root_password(root: str, hashed: str | None) -> None:
    """Root's password: *hashed*, or locked (``*``: no password logs in)."""
    path = os.path.join(root, "etc", "shadow")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return  # no shadow file (the essential variant has no passwd): no password to lock
    out = []
    for line in lines:
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1:
            fields[1] = hashed if hashed is not None else "*"
            line = ":".join(fields)
        out.append(line)
    _write(root, "etc/shadow", "\n".join(out) + "\n", mode=0o640)


def _write(root: str, rel: str, text: str, mode: int = 0o644) -> None:
    """Write a file of the image, replacing a symlink rather than following
    it (a package may have made /etc/resolv.conf a link to the host's run)."""
    path = os.path.join(root, rel)
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def parse_packages(values: Sequence[str]) -> tuple[str, ...]:
    """``--package a,b --package c`` as one tuple."""
    return tuple(p for v in values for p in v.split(",") if p)
