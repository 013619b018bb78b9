"""The ``lxc-template`` builder: an LXC template script run as LXC runs it,
its rootfs made one layer of the store.

The seed reads LXC's ``lxc-centos``: a shell script that ``lxc-create``
runs to fill a container's rootfs and append to its config. Any such
script works here: the ones Debian's ``lxc`` package ships in
``/usr/share/lxc/templates`` (``lxc-busybox``, ``lxc-download``,
``lxc-local``, ``lxc-oci``), those of ``lxc-templates`` (``lxc-debian``,
``lxc-centos``...), or one of your own.

The calling convention is lxc-create's (``create_run_template`` in LXC's
``src/lxc/lxccontainer.c``): the container's directory ``PATH`` holds a
``config`` that LXC wrote before the template runs (``lxc.rootfs.path =
dir:PATH/rootfs``) and that the template appends to; the template is run
as ``TEMPLATE --path=PATH --name=NAME --rootfs=PATH/rootfs OPTIONS...``,
under umask 022, in a mount namespace of its own. LXC sets no ``LXC_*``
variable for a template (those are for its hooks), and neither do we.

Where we differ from lxc-create, and why:

- ``PATH`` is in the store's scratch space, so an interrupted or failed
  build removes all of it (the seed's ``revert``), and ``/etc/lxc/
  default.conf`` is not copied into the config: it configures LXC's own
  runtime (a veth on ``lxcbr0``, AppArmor), which corral does not use.
- Besides the mount namespace, the template gets a PID namespace
  (``unshare --pid --fork --kill-child``) and a UTS one: when it exits, or
  when an interrupted build kills it, the kernel ends everything it
  started, daemons that left its process group included, so nothing can
  write into the layer after it is committed; a ``hostname`` it runs
  cannot rename the host.
- Its environment is fixed (``PATH``, ``HOME``, ``LC_ALL=C``, a ``TMPDIR``
  in the scratch space, and the caller's proxy variables), not the
  caller's: the same recipe gives the same image whoever builds it.

What becomes of its result: the rootfs is one store layer; ``/dev`` is
emptied (see :func:`_settle_dev`); the config it wrote is kept in the
image's ``source`` as ``lxc_config``, and the parts of it that mean the
same under corral are the image's defaults (``lxc.init.cmd``,
``lxc.init.cwd``, ``lxc.environment``, ``lxc.init.uid``/``gid``). Its mount
entries, capabilities and network are LXC's runtime's business and are not
applied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import RootfsError
from ._process import set_child_subreaper, stop_group
from ._store import Image, ImageStore, check_tag, layer_id_of_recipe

__all__ = ["TEMPLATES_DIR", "LxcTemplateRecipe", "build_lxc_template"]

TEMPLATES_DIR = "/usr/share/lxc/templates"
"""Where a template given by name is looked up, as ``lxc-NAME`` (LXC's
``LXCTEMPLATEDIR`` on Debian)."""

_FORMAT = 1
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LXC_OWN = ("--path", "--rootfs", "--name", "--mapped-uid", "--mapped-gid")
"""The template's arguments LXC itself passes: an option cannot set them."""
_PROXIES = ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy")
_GRACE = 5.0
"""Seconds an interrupted template has for its own clean-up (its ``trap
revert``) before it and its PID namespace are killed."""


@dataclass(frozen=True)
class LxcTemplateRecipe:
    """What an ``lxc-template`` image is made of (its recipe keys,
    docs/images.md)."""

    template: str = ""
    """A name (``busybox``: ``/usr/share/lxc/templates/lxc-busybox``) or a
    path to an executable script (anything with a ``/``), as lxc-create's
    ``-t`` takes it."""
    options: tuple[str, ...] = ()
    """More arguments for the template, after LXC's own (lxc-create's
    ``-- OPTIONS``)."""
    name: str | None = None
    """The container's name (``--name``); None: the template's name."""
    tag: str | None = None
    """The image's name; None: :attr:`default_tag`."""

    @property
    def template_path(self) -> str:
        """The script that is run (LXC's ``get_template_path``)."""
        if "/" in self.template:
            return os.path.abspath(self.template)
        return os.path.join(TEMPLATES_DIR, f"lxc-{self.template}")

    @property
    def _short(self) -> str:
        """The template's name: ``busybox`` for ``lxc-busybox`` or ``busybox``."""
        return os.path.basename(self.template_path).removeprefix("lxc-")

    @property
    def container_name(self) -> str:
        """The ``--name`` the template gets."""
        return self.name if self.name is not None else self._short

    def check(self) -> LxcTemplateRecipe:
        """This recipe, or one line saying which key is wrong."""
        if not self.template or ("/" not in self.template and not _NAME.fullmatch(self.template)):
            raise RootfsError(
                "lxc-template: template: expected a name like busybox"
                f" ({TEMPLATES_DIR}/lxc-NAME) or a path to a script, got {self.template!r}"
            )
        path = self.template_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if "/" in self.template:
                raise RootfsError(f"lxc-template: template: no such file {path}") from None
            raise RootfsError(
                f"lxc-template: template: no template {path} (Debian's lxc package has"
                " busybox, download, local and oci: apt-get install lxc)"
            ) from None
        except OSError as exc:
            raise RootfsError(f"lxc-template: template: {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RootfsError(f"lxc-template: template: {path} is not a file")
        if not os.access(path, os.X_OK):
            raise RootfsError(
                f"lxc-template: template: {path} is not executable (LXC runs it as a program:"
                " chmod +x it)"
            )
        for option in self.options:
            if "\0" in option:
                raise RootfsError(f"lxc-template: options: a NUL byte in {option!r}")
            if option.split("=", 1)[0] in _LXC_OWN:
                raise RootfsError(
                    f"lxc-template: options: {option.split('=', 1)[0]} is one of LXC's own"
                    " arguments, which the build sets (the container's name is the name key)"
                )
        if not _NAME.fullmatch(self.container_name):
            what = "name" if self.name is not None else f"name (from the template {path})"
            raise RootfsError(
                f"lxc-template: {what}: expected a container name (letters, digits, '.', '_',"
                f" '-', at most 64), got {self.container_name!r}"
            )
        if self.tag is not None:
            check_tag(self.tag)
        return self

    def data(self) -> dict[str, Any]:
        """The recipe as plain data (what the build cache is keyed by): the
        template's path and the SHA-256 of its content, the options, the
        name, and the content of the host files it is known to copy (see
        docs/images.md). Reads those files; one line if one cannot be read."""
        path = self.template_path
        try:
            with open(path, "rb") as f:
                script = f.read()
        except OSError as exc:
            raise RootfsError(f"lxc-template: template: {path}: {exc.strerror}") from None
        # lxc-busybox (and templates like it) copy the host's busybox: a
        # new busybox is a new image. The one the template finds on its PATH.
        busybox = shutil.which("busybox", path=_PATH) if b"busybox" in script else None
        return {
            "builder": "lxc-template",
            "format": _FORMAT,
            "template": path,
            "template_sha256": hashlib.sha256(script).hexdigest(),
            "options": list(self.options),
            "name": self.container_name,
            "files": [[f, _sha256(f, "options")] for f in _option_files(self.options)],
            "busybox": _sha256(busybox, "busybox") if busybox else None,
        }

    @property
    def default_tag(self) -> str:
        """The recipe's tag, or ``lxc-NAME`` (the template's name), with
        ``+HASH`` when options or a name of its own make it another image."""
        if self.tag is not None:
            return self.tag
        tag = f"lxc-{self._short}"
        if self.options or self.container_name != self._short:
            variant = {"options": list(self.options), "name": self.container_name}
            tag += "+" + layer_id_of_recipe(variant)[7:15]
        return tag


def _option_files(options: Sequence[str]) -> list[str]:
    """The host files the options name (``/x`` or ``--opt=/x``, anything
    with a ``/`` that is a regular file): a tarball for lxc-local, a
    busybox for lxc-busybox's ``--busybox-path``. Directories are not
    hashed (a tree costs more to hash than the cache saves)."""
    out = []
    for option in options:
        for word in (option, option.split("=", 1)[1] if "=" in option else ""):
            if "/" in word and os.path.isfile(word) and word not in out:
                out.append(word)
    return out


def _sha256(path: str, key: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise RootfsError(f"lxc-template: {key}: cannot read {path}: {exc.strerror}") from None


def build_lxc_template(
    store: ImageStore,
    recipe: LxcTemplateRecipe,
    tag: str | None = None,
    output: Callable[[str], None] | None = None,
) -> Image:
    """The image of *recipe*, from the store's cache or built now by its
    template; named *tag* (default: :attr:`LxcTemplateRecipe.default_tag`).
    *output* gets the command run and the template's output lines. One
    line on failure (RootfsError, with the template's last line), and
    nothing left in the store."""
    recipe.check()
    if os.geteuid() != 0:
        raise RootfsError(
            "lxc-template: needs root: a template makes device nodes and owns files as"
            " root, in namespaces of its own"
        )
    if shutil.which("unshare") is None:
        raise RootfsError("lxc-template: unshare not found (apt-get install util-linux)")
    name = check_tag(tag or recipe.default_tag)
    data = recipe.data()
    layer = layer_id_of_recipe(data)
    key = "lxc-template/" + layer[7:]
    try:
        with store.building(key) as build:
            for img in store.images():
                if img.source.get("key") == key and all(build.has_layer(x) for x in img.layers):
                    store.tag(img, name)
                    return store.find(name)
            # LXC's layout: LXCPATH/NAME is the container's directory (--path),
            # with its config and its rootfs; all of it in the scratch space.
            path = os.path.join(build.scratch("lxc"), recipe.container_name)
            rootfs = os.path.join(path, "rootfs")
            os.mkdir(path, 0o755)
            os.mkdir(rootfs, 0o755)
            config_file = os.path.join(path, "config")
            with open(config_file, "w") as f:
                f.write(f"lxc.rootfs.path = dir:{rootfs}\n")
            _run_template(recipe, path, rootfs, output, tmpdir=build.scratch("lxc-tmp"))
            _check_rootfs(recipe, rootfs)
            _settle_dev(rootfs)
            _refuse_devices(recipe, rootfs)
            try:
                with open(config_file, errors="replace") as f:
                    lxc_config = f.read()
            except FileNotFoundError:
                lxc_config = ""  # a template may replace it; without one, LXC's defaults
            lxc = _parse_config(lxc_config)
            config = _defaults(lxc, rootfs)
            build.commit_layer(layer, rootfs)
            source = {**data, "key": key, "lxc_config": lxc_config.replace(path, "$LXC_PATH")}
            return build.commit_image([layer], config, source, name)
    except OSError as exc:
        # A full disk, say: one line naming the store (not exc.filename,
        # which for a failed copy is its source).
        raise RootfsError(
            f"lxc-template: cannot build in {store.root}: {exc.strerror or exc}"
        ) from exc


def _run_template(
    recipe: LxcTemplateRecipe,
    path: str,
    rootfs: str,
    output: Callable[[str], None] | None,
    tmpdir: str,
) -> None:
    """Run the template as lxc-create does, its output lines to *output*."""
    template = recipe.template_path
    command = [
        template, f"--path={path}", f"--name={recipe.container_name}", f"--rootfs={rootfs}",
        *recipe.options,
    ]  # fmt: skip
    argv = [
        "unshare", "--mount", "--propagation", "private", "--uts",
        "--pid", "--fork", "--kill-child", "--mount-proc", "--",
        *command,
    ]  # fmt: skip
    env = {"PATH": _PATH, "HOME": "/root", "LC_ALL": "C", "TMPDIR": tmpdir}
    for var in _PROXIES:
        for name in (var, var.upper()):
            if name in os.environ:
                env[name] = os.environ[name]
    if output is not None:
        output("$ " + shlex.join(command))
    # Its own session: a terminal's Ctrl-C reaches us, and we stop it. We
    # are the subreaper of the PID namespace's init (unshare's child): if
    # unshare dies first, it is still ours to wait for.
    set_child_subreaper()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        env=env,
        umask=0o022,
    )
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.strip():
                tail = [*tail[-19:], line]
            if output is not None:
                output(line)
        proc.wait()
    except BaseException:
        # The template in its PID namespace ignores SIGTERM unless it traps
        # it (the seed's `trap revert`); the command it waits for does not.
        # SIGKILL after the grace ends the namespace and all in it.
        stop_group(proc, grace=_GRACE)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        said = f": {tail[-1].strip()}" if tail else " with no output"
        raise RootfsError(f"lxc-template: {template} failed (status {proc.returncode}){said}")


def _check_rootfs(recipe: LxcTemplateRecipe, rootfs: str) -> None:
    """The template made a rootfs where it was told to."""
    try:
        is_dir = stat.S_ISDIR(os.lstat(rootfs).st_mode)
    except FileNotFoundError:
        is_dir = False
    if not is_dir:
        raise RootfsError(
            f"lxc-template: {recipe.template_path} left no directory at its --rootfs"
            " (a symlink is not one)"
        )
    if not os.listdir(rootfs):
        raise RootfsError(
            f"lxc-template: {recipe.template_path} made nothing in its --rootfs"
            " (does it write where --rootfs says?)"
        )


def _settle_dev(rootfs: str) -> None:
    """Empty the rootfs's /dev, keeping it an empty directory (0755).

    Every sandbox gets a fresh tmpfs on /dev from the runtime, with its own
    nodes, ``pts``, ``shm`` and links (``_mount_dev`` in
    ``supervisor/_runtime/_linux/_child.py``): nothing of the image's /dev
    is ever seen. And what templates leave there would do harm in a layer:
    a ``null`` or ``console`` node made with ``mknod`` is a device on a
    lower layer, and a character device 0/0 is what overlayfs reads as a
    whiteout. A /dev that is not a directory (a symlink) would be refused
    by the runtime; it becomes one.
    """
    dev = os.path.join(rootfs, "dev")
    try:
        st = os.lstat(dev)
    except FileNotFoundError:
        os.mkdir(dev, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(dev)
        os.mkdir(dev, 0o755)
        return
    with os.scandir(dev) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    os.chmod(dev, 0o755)


def _refuse_devices(recipe: LxcTemplateRecipe, rootfs: str) -> None:
    """One line if the template made a device node outside /dev: a layer
    holds none (an OCI import refuses them too), and a 0/0 one would be an
    overlay whiteout."""
    for top, dirs, files in os.walk(rootfs):
        for entry in (*dirs, *files):
            path = os.path.join(top, entry)
            mode = os.lstat(path).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                raise RootfsError(
                    f"lxc-template: {recipe.template_path} made a device node"
                    f" /{os.path.relpath(path, rootfs)} outside /dev: an image holds none"
                )


def _parse_config(text: str) -> dict[str, list[str]]:
    """The ``lxc.*`` keys of an LXC config, each with its values in order,
    read as LXC's ``parse_line`` reads them (``key = value``, the value
    trimmed and one pair of surrounding quotes removed)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line.startswith("lxc.") or "=" not in line:
            continue  # comments, blank lines, and what LXC ignores
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:
            value = value[1:-1]
        out.setdefault(key.strip(), []).append(value)
    return out


def _split_quoted(text: str) -> list[str]:
    """Words as LXC splits ``lxc.init.cmd`` (``lxc_string_split_quoted``):
    separated by blanks; a word that starts with a quote runs to the next
    same quote (no escapes); an unterminated quoted word is dropped."""
    words: list[str] = []
    state, start = " ", 0
    for i, c in enumerate(text):
        if state == " ":
            if c.isspace():
                continue
            start, state = i, (c if c in "'\"" else "a")
        elif state == "a":
            if c.isspace():
                words.append(text[start:i])
                state = " "
        elif c == state:
            words.append(text[start + 1 : i])
            state = " "
    if state == "a":
        words.append(text[start:])
    return words


def _defaults(lxc: dict[str, list[str]], rootfs: str) -> dict[str, Any]:
    """The image's defaults, from what the template's config says LXC
    would run: ``lxc.init.cmd`` is the container's init under LXC, so the
    image's command (lxc-oci sets it to the OCI image's entrypoint and cmd);
    without it LXC runs /sbin/init, which under corral (tini is PID 1, no
    consoles) is wrong: the image's command is then ``/bin/sh`` if it has
    one, else none (a sandbox names its own)."""
    env = {"PATH": _PATH}
    for entry in [*lxc.get("lxc.environment", []), *lxc.get("lxc.environment.runtime", [])]:
        if not entry:
            env = {"PATH": _PATH}  # an empty value clears the list, as in LXC
        elif "=" in entry:
            k, v = entry.split("=", 1)
            env[k] = v
        # A bare KEY passes LXC's own environment on: corral passes none of its own.
    init = lxc.get("lxc.init.cmd", [""])[-1]
    if init:
        cmd: list[str] | None = _split_quoted(init)
    else:
        cmd = ["/bin/sh"] if os.path.lexists(os.path.join(rootfs, "bin", "sh")) else None
    uid = lxc.get("lxc.init.uid", [""])[-1]
    gid = lxc.get("lxc.init.gid", [""])[-1]
    user = f"{uid or 0}:{gid}" if gid else uid
    return {
        "env": [f"{k}={v}" for k, v in env.items()],
        "entrypoint": None,
        "cmd": cmd or None,
        "workdir": lxc.get("lxc.init.cwd", ["/"])[-1] or "/",
        "user": user,
        "exposed_ports": [],
    }
