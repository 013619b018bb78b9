"""Reading OCI images and applying their layers, on images built here with tarfile.

No network and no registry: every layout, archive and layer is made in the
test. The hostile layers are checked two ways: the error names the entry,
and nothing changed outside the destination (a sibling directory stays
empty, and a "victim" directory that symlinks point at, standing in for
/etc, is as it was).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rootfs import Layer, OciError, OciImage, apply_layer, open_image

from .helpers import skopeo

REPO = Path(__file__).resolve().parent.parent

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: whiteouts are device nodes, opaque dirs trusted xattrs"
)
pytestmark = requires_root

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"

Entry = tuple[tarfile.TarInfo, bytes | None]


# --------------------------------------------------------------------------- builders


def _info(name: str, type_: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    return info


def file(
    name: str,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, str] | None = None,
) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, data


def directory(
    name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None
) -> Entry:
    info = _info(name, tarfile.DIRTYPE, mode, uid, gid)
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, None


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777, 0, 0)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644, 0, 0)
    info.linkname = target
    return info, None


def special(name: str, type_: bytes, major: int = 0, minor: int = 0) -> Entry:
    info = _info(name, type_, 0o644, 0, 0)
    info.devmajor, info.devminor = major, minor
    return info, None


def _with(entry: Entry, mtime: float) -> Entry:
    entry[0].mtime = mtime
    return entry


def make_tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_of(tar: bytes, compress: bool = False) -> Layer:
    """A layer whose digests match its bytes, without an image around it."""
    blob = gzip.compress(tar, mtime=0) if compress else tar
    return Layer(
        sha(blob), sha(tar), TAR_GZ if compress else TAR, len(blob), lambda: io.BytesIO(blob)
    )


# The image most tests use: a base layer, and a top layer that deletes a file
# (whiteout), replaces a directory's contents (opaque) and adds a file.
BOTTOM = make_tar(
    directory("./"),
    directory("etc/"),
    file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    file("etc/hostname", b"box\n"),
    directory("bin/"),
    file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
    symlink("bin/sh", "/bin/busybox"),
    hardlink("bin/tool2", "bin/tool"),
    directory("var/"),
    directory("var/cache/"),
    file("var/cache/old1", b"1"),
    file("var/cache/old2", b"2"),
    directory("home/"),
    directory("home/user/", mode=0o700, uid=1000, gid=1000),
    file("home/user/notes", b"n\n", mode=0o600, uid=1000, gid=1000, xattrs={"user.colour": "blue"}),
    special("run/fifo", tarfile.FIFOTYPE),
)
TOP = make_tar(
    file("etc/.wh.passwd"),
    directory("var/cache/"),
    file("var/cache/.wh..wh..opq"),
    file("var/cache/new", b"new\n"),
    file("etc/motd", b"hello\n"),
)
CONFIG: dict[str, object] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/bin", "LANG=C"],
        "Entrypoint": ["/bin/tool"],
        "Cmd": ["--help"],
        "WorkingDir": "/home/user",
        "User": "1000:1000",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
    },
}


@dataclass
class Image:
    """An image's blobs, as a layout stores them."""

    tars: list[bytes]
    blobs: list[bytes]  # the layers as stored: gzip or not
    media_types: list[str]
    config: bytes
    manifest: bytes
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    def all_blobs(self) -> list[bytes]:
        return [*self.blobs, self.config, self.manifest, *self.extra.values()]


def build(
    tars: list[bytes] | None = None,
    compress: list[bool] | None = None,
    config: dict[str, object] | None = None,
    diff_ids: list[str] | None = None,
    media_types: list[str] | None = None,
    raw_config: bytes | None = None,
    manifest_edit: Callable[[dict[str, object]], None] | None = None,
) -> Image:
    tars = [BOTTOM, TOP] if tars is None else tars
    compress = [True, False] if compress is None else compress
    blobs = [gzip.compress(t, mtime=0) if c else t for t, c in zip(tars, compress, strict=True)]
    types = media_types or [TAR_GZ if c else TAR for c in compress]
    doc = dict(CONFIG if config is None else config)
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in tars]}
    config_blob = raw_config if raw_config is not None else json.dumps(doc).encode()
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config_blob), "size": len(config_blob)},
        "layers": [
            {"mediaType": m, "digest": sha(b), "size": len(b)}
            for m, b in zip(types, blobs, strict=True)
        ],
    }
    if manifest_edit:
        manifest_edit(manifest)
    return Image(tars, blobs, types, config_blob, json.dumps(manifest).encode())


def descriptor(
    image: Image, tag: str | None = None, platform: str | None = None
) -> dict[str, object]:
    d: dict[str, object] = {
        "mediaType": OCI_MANIFEST,
        "digest": image.digest,
        "size": len(image.manifest),
    }
    if tag:
        d["annotations"] = {"org.opencontainers.image.ref.name": tag}
    if platform:
        os_, arch = platform.split("/")
        d["platform"] = {"os": os_, "architecture": arch}
    return d


def write_blob(root: Path, data: bytes) -> Path:
    path = root / "blobs" / "sha256" / sha(data).removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_layout(root: Path, images: list[Image], manifests: list[dict[str, object]]) -> Path:
    """An OCI image layout at *root* holding *images*, with *manifests* in index.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    for image in images:
        for blob in image.all_blobs():
            write_blob(root, blob)
    return root


def layout(root: Path, image: Image | None = None, tag: str = "v1") -> Path:
    image = image or build()
    return write_layout(root, [image], [descriptor(image, tag)])


def pack(directory_: Path, tar_path: Path, compress: bool = False) -> Path:
    """A tarball of *directory_*'s contents, as ``oci-archive`` writes one."""
    with tarfile.open(tar_path, "w:gz" if compress else "w") as tf:
        for path in sorted(directory_.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(directory_)), recursive=False)
    return tar_path


def docker_archive(
    path: Path, images: list[tuple[Image, list[str]]], link_shared: bool = True
) -> Path:
    """A ``docker save`` tarball (the format before docker 25): uncompressed
    layers under a v1 ID, HEX.json configs, manifest.json with RepoTags. A
    layer already written is a symlink to the first copy, as docker writes it."""
    entries: list[Entry] = []
    written: dict[str, str] = {}
    manifest = []
    for image, tags in images:
        names: list[str] = []
        for tar in image.tars:
            v1_id = hashlib.sha256(image.config + str(len(names)).encode()).hexdigest()
            name = f"{v1_id}/layer.tar"
            if sha(tar) in written and link_shared:
                entries.append(symlink(name, f"../{written[sha(tar)]}"))
            else:
                entries += [
                    directory(f"{v1_id}/"),
                    file(name, tar),
                    file(f"{v1_id}/VERSION", b"1.0"),
                ]
                written[sha(tar)] = name
            names.append(name)
        config_name = sha(image.config).removeprefix("sha256:") + ".json"
        entries.append(file(config_name, image.config))
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": names})
    entries.append(file("manifest.json", json.dumps(manifest).encode()))
    path.write_bytes(make_tar(*entries))
    return path


def tree(root: Path) -> list[tuple[object, ...]]:
    """Everything below *root* that a layer sets, for comparing extractions."""
    out: list[tuple[object, ...]] = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        row: tuple[object, ...] = (
            str(path.relative_to(root)),
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
        )
        if stat.S_ISREG(st.st_mode):
            row += (path.read_bytes(), st.st_mtime_ns)
        elif stat.S_ISLNK(st.st_mode):
            row += (os.readlink(path),)
        elif stat.S_ISCHR(st.st_mode):
            row += (st.st_rdev,)
        if not stat.S_ISLNK(st.st_mode):
            row += (sorted((k, os.getxattr(path, k)) for k in os.listxattr(path)),)
        out.append(row)
    return out


def apply_all(image: OciImage, where: Path) -> list[Path]:
    dests = []
    for i, layer in enumerate(image.layers):
        dest = where / f"layer{i}"
        dest.mkdir(parents=True)
        apply_layer(layer, str(dest))
        dests.append(dest)
    return dests


@pytest.fixture
def expected(tmp_path: Path) -> list[list[tuple[object, ...]]]:
    """The trees the standard image's layers extract to (from its layout)."""
    image = open_image(str(layout(tmp_path / "reference")))
    return [tree(d) for d in apply_all(image, tmp_path / "reference-out")]


# --------------------------------------------------------------------------- reading


def test_a_layout_is_read_and_described(tmp_path: Path) -> None:
    """The manifest, config and layers of a layout are read, with every digest."""
    image_blobs = build()
    image = open_image(str(layout(tmp_path / "img", image_blobs)), "v1")
    assert image.manifest_digest == image_blobs.digest
    c = image.config
    assert c.digest == sha(image_blobs.config)
    assert c.env == ["PATH=/bin", "LANG=C"]
    assert (c.entrypoint, c.cmd) == (["/bin/tool"], ["--help"])
    assert (c.workdir, c.user) == ("/home/user", "1000:1000")
    assert c.exposed_ports == ["53/udp", "8080/tcp"]
    assert (c.os, c.architecture) == ("linux", "amd64")
    assert [(x.digest, x.diff_id, x.media_type, x.size) for x in image.layers] == [
        (sha(image_blobs.blobs[0]), sha(BOTTOM), TAR_GZ, len(image_blobs.blobs[0])),
        (sha(TOP), sha(TOP), TAR, len(TOP)),
    ]
    with image.layers[1].open() as f:
        assert f.read() == TOP


def test_a_config_without_run_settings_has_empty_defaults(tmp_path: Path) -> None:
    """A scratch-like config (no "config" at all) reads as empty settings."""
    image = open_image(str(layout(tmp_path / "img", build(config={"os": "linux"}))))
    c = image.config
    assert (c.env, c.entrypoint, c.cmd, c.workdir, c.user, c.exposed_ports) == (
        [],
        None,
        None,
        "",
        "",
        [],
    )


def test_layers_become_overlay_lower_layers(tmp_path: Path) -> None:
    """Owners, modes, times, links and xattrs are kept; a whiteout becomes a
    0:0 character device and an opaque marker the trusted.overlay.opaque xattr."""
    image = open_image(str(layout(tmp_path / "img")))
    bottom, top = apply_all(image, tmp_path / "out")

    tool = (bottom / "bin/tool").lstat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755, "the set-user-ID bit survives the chown"
    assert tool.st_mtime_ns == MTIME * 10**9
    assert (bottom / "bin/tool2").lstat().st_ino == tool.st_ino
    assert os.readlink(bottom / "bin/sh") == "/bin/busybox"
    assert (bottom / "bin/sh").lstat().st_mtime_ns == MTIME * 10**9
    home = (bottom / "home/user").lstat()
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    assert home.st_mtime_ns == MTIME * 10**9, "a directory's time is set after its contents"
    assert os.getxattr(bottom / "home/user/notes", "user.colour") == b"blue"
    assert stat.S_ISFIFO((bottom / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE((bottom / "run").lstat().st_mode) == 0o755, "a missing parent is made"

    passwd = (top / "etc/passwd").lstat()
    assert stat.S_ISCHR(passwd.st_mode) and passwd.st_rdev == os.makedev(0, 0)
    assert os.getxattr(top / "var/cache", "trusted.overlay.opaque") == b"y"
    assert (top / "var/cache/new").read_bytes() == b"new\n"
    assert not [p for p in top.rglob("*") if p.name.startswith(".wh.")]


def test_the_applied_layers_mount_as_an_overlay(tmp_path: Path) -> None:
    """Mounted by overlayfs, the whiteout hides the file below and the opaque
    directory hides its old contents: the conversion is what the kernel reads."""
    image = open_image(str(layout(tmp_path / "img")))
    bottom, top = apply_all(image, tmp_path / "out")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={top}:{bottom}", str(mnt)],
        check=True,
    )
    try:
        assert not (mnt / "etc/passwd").exists()
        assert (mnt / "etc/hostname").read_bytes() == b"box\n"
        assert (mnt / "etc/motd").read_bytes() == b"hello\n"
        assert sorted(os.listdir(mnt / "var/cache")) == ["new"]
        assert (mnt / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("kind", ["oci-archive", "oci-archive.gz", "docker-archive"])
def test_tarballs_give_the_same_layers_as_the_layout(
    tmp_path: Path, kind: str, expected: list[list[tuple[object, ...]]]
) -> None:
    """An oci-archive (plain or gzip) and a docker-save archive are read in
    place and extract to the same trees as the layout directory."""
    image_blobs = build()
    if kind == "docker-archive":
        source = docker_archive(tmp_path / "img.tar", [(image_blobs, ["corral/test:1"])])
        ref = "corral/test:1"
    else:
        src = layout(tmp_path / "layout", image_blobs)
        source = pack(src, tmp_path / "img.tar", compress=kind.endswith(".gz"))
        shutil.rmtree(src)  # read from the tarball alone
        ref = "v1"
    image = open_image(str(source), ref)
    assert image.config.digest == sha(image_blobs.config)
    assert image.manifest_digest == (None if kind == "docker-archive" else image_blobs.digest)
    assert [tree(d) for d in apply_all(image, tmp_path / "out")] == expected


def test_images_are_selected_by_tag_or_digest(tmp_path: Path) -> None:
    """With two images in index.json, a tag or a manifest digest picks one;
    none is an error that lists the tags."""
    one = build(tars=[BOTTOM], compress=[True])
    two = build(tars=[BOTTOM, TOP], compress=[False, False])
    root = write_layout(
        tmp_path / "img", [one, two], [descriptor(one, "v1"), descriptor(two, "v2")]
    )
    assert len(open_image(str(root), "v1").layers) == 1
    assert len(open_image(str(root), "v2").layers) == 2
    assert open_image(str(root), two.digest).manifest_digest == two.digest
    with pytest.raises(OciError, match=r"index.json lists 2 images; name one \(tags: v1, v2\)$"):
        open_image(str(root))
    with pytest.raises(OciError, match=r"no image 'v3' in index.json \(tags: v1, v2\)$"):
        open_image(str(root), "v3")


def test_a_multi_platform_index_resolves_to_linux_amd64(tmp_path: Path) -> None:
    """A nested image index (as skopeo copy --all writes it) gives its
    linux/amd64 image; another platform's manifest is reachable by digest."""
    arm = build(tars=[TOP], compress=[False], config={"os": "linux", "architecture": "arm64"})
    amd = build()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(arm, platform="linux/arm64"),
                descriptor(amd, platform="linux/amd64"),
            ],
        }
    ).encode()
    top = {
        "mediaType": OCI_INDEX,
        "digest": sha(index),
        "size": len(index),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }
    root = write_layout(tmp_path / "img", [arm, amd], [top])
    write_blob(root, index)
    assert open_image(str(root), "multi").manifest_digest == amd.digest
    assert open_image(str(root)).config.architecture == "amd64"
    assert open_image(str(root), arm.digest).config.architecture == "arm64"

    arm_only = json.dumps(
        {"schemaVersion": 2, "manifests": [descriptor(arm, platform="linux/arm64")]}
    ).encode()
    root2 = write_layout(
        tmp_path / "img2",
        [arm],
        [{"mediaType": OCI_INDEX, "digest": sha(arm_only), "size": len(arm_only)}],
    )
    write_blob(root2, arm_only)
    with pytest.raises(OciError, match=r"no linux/amd64 image \(platforms: linux/arm64\)$"):
        open_image(str(root2))


def test_docker_archive_images_are_selected_by_repo_tag(tmp_path: Path) -> None:
    """RepoTags select an image (a bare name means :latest); a layer shared
    with an earlier image is a symlink in the archive, and is followed."""
    one = build(tars=[BOTTOM], compress=[False])
    two = build(
        tars=[BOTTOM, TOP],
        compress=[False, False],
        config={"os": "linux", "config": {"Cmd": ["sh"]}},
    )
    tarball = str(
        docker_archive(
            tmp_path / "img.tar", [(one, ["busybox:latest"]), (two, ["other:1", "other:2"])]
        )
    )
    assert open_image(tarball, "busybox:latest").config.digest == sha(one.config)
    assert open_image(tarball, "busybox").config.digest == sha(one.config)
    image = open_image(tarball, "other:2")
    assert image.config.cmd == ["sh"]
    assert [x.digest for x in image.layers] == [sha(BOTTOM), sha(TOP)]
    assert open_image(tarball, sha(two.config)).config.cmd == ["sh"], "by image ID"
    apply_all(image, tmp_path / "out")  # the shared layer, read through its symlink
    with pytest.raises(
        OciError, match=r"lists 2 images; name one \(tags: busybox:latest, other:1, other:2\)$"
    ):
        open_image(tarball)
    with pytest.raises(OciError, match=r"no image 'nope:1' in manifest.json"):
        open_image(tarball, "nope:1")


def test_gzip_is_recognised_by_its_magic_bytes(tmp_path: Path) -> None:
    """A gzip layer whose media type says plain tar is still decompressed."""
    image = open_image(str(layout(tmp_path / "img", build(media_types=[TAR, TAR]))))
    bottom = apply_all(image, tmp_path / "out")[0]
    assert (bottom / "etc/hostname").read_bytes() == b"box\n"


def test_a_tar_without_end_of_archive_blocks_is_accepted(tmp_path: Path) -> None:
    """Like Go's archive/tar: a tar that stops at an entry's boundary is whole."""
    tar = make_tar(file("a", b"x" * 600))[: 512 * 3]
    apply_layer(layer_of(tar), str(tmp_path))
    assert (tmp_path / "a").read_bytes() == b"x" * 600


def test_oci_names_load_on_first_use() -> None:
    """import rootfs (on every sandbox start) does not import tarfile and gzip."""
    code = (
        "import sys, rootfs; "
        "assert 'tarfile' not in sys.modules and 'rootfs._oci' not in sys.modules; "
        "rootfs.open_image; assert 'rootfs._oci' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- refused images


def _alter(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("compress", "where", "then"),
    [
        (False, b"root:x:0:0", ""),  # content: the tar still parses
        (False, b"etc/hostname", r"; not a valid tar \(a damaged header at byte \d+\)"),
        (True, None, r"; damaged gzip stream \(.*\)|; not a valid tar \(.*\)|; truncated.*|"),
    ],
    ids=["plain-content", "plain-header", "gzip"],
)
def test_an_altered_layer_blob_fails_its_digest(
    tmp_path: Path, compress: bool, where: bytes | None, then: str
) -> None:
    """A layer blob changed on disk (same size) is caught while it streams; if
    the change also breaks the tar or gzip stream, the line says both."""
    image_blobs = build(compress=[compress, False])
    root = layout(tmp_path / "img", image_blobs)
    blob = image_blobs.blobs[0]
    _alter(
        root / "blobs/sha256" / sha(blob).removeprefix("sha256:"),
        None if where is None else blob.index(where),
    )
    image = open_image(str(root))
    with pytest.raises(
        OciError,
        match=rf"^layer sha256:\w{{12}}: the blob does not match its digest \(it is sha256:\w{{64}}\)({then})$",
    ):
        apply_all(image, tmp_path / "out")


@pytest.mark.parametrize("blob", ["config", "manifest"])
def test_an_altered_config_or_manifest_is_refused(tmp_path: Path, blob: str) -> None:
    """The manifest is checked against index.json, the config against the manifest."""
    image_blobs = build()
    root = layout(tmp_path / "img", image_blobs)
    data = image_blobs.config if blob == "config" else image_blobs.manifest
    _alter(root / "blobs/sha256" / sha(data).removeprefix("sha256:"))
    with pytest.raises(
        OciError, match=rf"{blob} sha256:\w{{12}}: the blob does not match its digest"
    ):
        open_image(str(root))


def test_a_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    """The uncompressed tar must be what the config's diff_id says."""
    image = open_image(str(layout(tmp_path / "img", build(diff_ids=[sha(b"other"), sha(TOP)]))))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(
        OciError,
        match=rf"^layer sha256:\w{{12}}: the uncompressed tar does not match diff_id {sha(b'other')} \(it is {sha(BOTTOM)}\)$",
    ):
        apply_layer(image.layers[0], str(dest))


def test_a_truncated_blob_in_a_layout_is_refused_before_reading(tmp_path: Path) -> None:
    """A layer blob shorter than the manifest says fails open_image at once."""
    image_blobs = build()
    root = layout(tmp_path / "img", image_blobs)
    path = root / "blobs/sha256" / sha(image_blobs.blobs[0]).removeprefix("sha256:")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        OciError,
        match=rf"layer sha256:\w{{12}} is 100 bytes; manifest sha256:\w{{12}} says {len(image_blobs.blobs[0])}$",
    ):
        open_image(str(root))


_DATA_TAR = make_tar(file("a", b"x" * 2000), file("b", b"y" * 100))


@pytest.mark.parametrize(
    ("blob", "compress", "message"),
    [
        (gzip.compress(_DATA_TAR, mtime=0)[:-30], False, "truncated: the gzip stream ends early"),
        (gzip.compress(_DATA_TAR, mtime=0)[:-4], False, "truncated: the gzip stream ends early"),
        (_DATA_TAR[:1000], False, "truncated: the tar ends inside an entry"),
        (_DATA_TAR[:1000], True, "truncated: the tar ends inside an entry"),
        (_DATA_TAR[: 512 * 5 + 100], False, "truncated: the tar ends inside a header at byte 2560"),
        (_DATA_TAR[: 512 * 5] + b"\x07" * 512 + _DATA_TAR[512 * 6 :], False, r"not a valid tar \(a damaged header at byte 2560\)"),
        (b"", False, r"not a valid tar \(empty file\)"),
    ],
    ids=["gzip-cut", "gzip-no-trailer", "tar-cut-in-data", "tar-cut-in-data-gzip", "tar-cut-in-header", "tar-damaged-header", "empty"],
)  # fmt: skip
def test_truncated_or_damaged_layers_are_refused(
    tmp_path: Path, blob: bytes, compress: bool, message: str
) -> None:
    """A cut or damaged stream is one line saying so, even when its digest matches."""
    with pytest.raises(OciError, match=rf"^layer sha256:\w{{12}}: {message}$"):
        apply_layer(layer_of(blob, compress), str(tmp_path))


def test_a_zstd_blob_or_one_longer_than_its_size_is_refused(tmp_path: Path) -> None:
    """zstd is told by its magic bytes whatever the media type says; a blob
    longer than the manifest's size stops there, not at its end."""
    zstd = b"\x28\xb5\x2f\xfd" + bytes(100)
    layer = Layer(sha(zstd), sha(b""), TAR, len(zstd), lambda: io.BytesIO(zstd))
    with pytest.raises(
        OciError,
        match=r"^layer sha256:\w{12} is zstd-compressed; only gzip and uncompressed layers are supported$",
    ):
        apply_layer(layer, str(tmp_path))
    big = make_tar(file("a", bytes(100_000)))
    layer = Layer(sha(big), sha(big), TAR, 2048, lambda: io.BytesIO(big))
    with pytest.raises(
        OciError, match=r"^layer sha256:\w{12}: the blob is larger than the 2048 bytes expected$"
    ):
        apply_layer(layer, str(tmp_path))


# Larger than the reader's queue of 1 MiB chunks: the thread that inflates
# waits for the extraction, and the tar's end is checked many chunks in.
_BIG_TAR = make_tar(
    *(file(f"small/{n}", b"%d\n" % n) for n in range(300)),
    file("big/random", random.Random(7).randbytes(6 << 20)),
    file("big/zeros", bytes(5 << 20)),
    file("last", b"the end\n"),
)


def _members(tar: bytes, cuts: int, padding: bytes) -> bytes:
    """*tar* as a gzip stream of *cuts* + 1 members, each followed by *padding*."""
    step = len(tar) // (cuts + 1) + 1
    return b"".join(
        gzip.compress(tar[i : i + step], mtime=0) + padding for i in range(0, len(tar), step)
    )


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_a_layer_of_many_chunks_is_applied_whole(tmp_path: Path, compress: bool) -> None:
    """A layer of several MiB, read ahead in chunks while it is extracted, is all there."""
    apply_layer(layer_of(_BIG_TAR, compress), str(tmp_path))
    assert (tmp_path / "big/random").read_bytes() == random.Random(7).randbytes(6 << 20)
    assert (tmp_path / "big/zeros").stat().st_size == 5 << 20
    assert len(os.listdir(tmp_path / "small")) == 300
    assert (tmp_path / "last").read_bytes() == b"the end\n"


@pytest.mark.parametrize("padding", [b"", bytes(1000)], ids=["concatenated", "zero-padded"])
def test_a_gzip_stream_of_several_members_is_one_layer(tmp_path: Path, padding: bytes) -> None:
    """Concatenated gzip members (pigz, appending writers), zero padding after
    them too, as gzip and Python read them: one tar, its diff_id checked."""
    blob = _members(_BIG_TAR, 3, padding)
    layer = Layer(sha(blob), sha(_BIG_TAR), TAR_GZ, len(blob), lambda: io.BytesIO(blob))
    apply_layer(layer, str(tmp_path))
    assert (tmp_path / "last").read_bytes() == b"the end\n"


def test_data_after_a_gzip_member_that_is_not_one_is_refused(tmp_path: Path) -> None:
    """After a member and its padding only another member may follow."""
    blob = _members(_BIG_TAR, 1, bytes(10)) + b"PK\x03\x04"
    layer = Layer(sha(blob), sha(_BIG_TAR), TAR_GZ, len(blob), lambda: io.BytesIO(blob))
    with pytest.raises(OciError, match=r"^layer sha256:\w{12}: damaged gzip stream \(.*\)$"):
        apply_layer(layer, str(tmp_path))


def test_a_damaged_header_many_chunks_in_is_found(tmp_path: Path) -> None:
    """The end-of-archive check sees the bytes where tarfile stopped, however far in."""
    with tarfile.open(fileobj=io.BytesIO(_BIG_TAR)) as tf:
        at = tf.getmember("last").offset
    assert at > 10 << 20
    blob = _BIG_TAR[:at] + b"\x07" * 512 + _BIG_TAR[at + 512 :]
    with pytest.raises(
        OciError,
        match=rf"^layer sha256:\w{{12}}: not a valid tar \(a damaged header at byte {at}\)$",
    ):
        apply_layer(layer_of(blob, True), str(tmp_path))


def test_a_refused_entry_stops_the_reading_thread(tmp_path: Path) -> None:
    """A hostile entry at the start of a large layer: the error at once, and
    the thread that was reading ahead is gone when apply_layer returns."""
    tar = make_tar(file("/abs", b"x"), *(file(f"f{n}", bytes(1 << 20)) for n in range(20)))
    before = set(threading.enumerate())
    with pytest.raises(OciError, match="an absolute path"):
        apply_layer(layer_of(tar, True), str(tmp_path))
    assert set(threading.enumerate()) <= before


def _drop(key: str) -> Callable[[dict[str, object]], None]:
    def edit(manifest: dict[str, object]) -> None:
        del manifest[key]

    return edit


def _helm(manifest: dict[str, object]) -> None:
    config = manifest["config"]
    assert isinstance(config, dict)
    config["mediaType"] = "application/vnd.cncf.helm.config.v1+json"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (lambda: build(raw_config=b"{not json"), r"config sha256:\w{12}: not JSON \(Expecting property name enclosed in double quotes: line 1 column 2 \(char 1\)\)$"),
        (lambda: build(raw_config=b"[]"), r"config sha256:\w{12}: not a JSON object$"),
        (lambda: build(raw_config=b'{"rootfs": {}}'), r"config sha256:\w{12}: rootfs has no diff_ids list$"),
        (lambda: build(config={"config": {"Entrypoint": "/bin/sh"}}), r"config sha256:\w{12}: Entrypoint: not a list of strings$"),
        (lambda: build(diff_ids=[sha(BOTTOM)]), r"config sha256:\w{12} lists 1 diff_ids for the 2 layers of manifest sha256:\w{12}$"),
        (lambda: build(manifest_edit=_drop("config")), r"manifest sha256:\w{12}: no config$"),
        (lambda: build(manifest_edit=_drop("layers")), r"manifest sha256:\w{12}: no layers list$"),
        (lambda: build(manifest_edit=lambda m: m.update(schemaVersion=1)), r"manifest sha256:\w{12}: schemaVersion is 1, not 2$"),
        (lambda: build(media_types=[TAR_GZ, "application/vnd.oci.image.layer.v1.tar+zstd"]), r"layer sha256:\w{12} is zstd-compressed; only gzip and uncompressed layers are supported$"),
        (lambda: build(media_types=[TAR_GZ, "application/x-foo"]), r"layer sha256:\w{12} has unsupported media type application/x-foo$"),
        (
            lambda: build(manifest_edit=_helm),
            r"manifest sha256:\w{12}: config has unsupported media type application/vnd.cncf.helm.config.v1\+json \(not a container image\)$",
        ),
    ],
    ids=["config-not-json", "config-not-object", "config-no-diff-ids", "entrypoint-string", "diff-id-count", "no-config", "no-layers", "schema-1", "zstd", "foreign-layer-type", "helm-chart"],
)  # fmt: skip
def test_malformed_images_are_refused_in_one_line(
    tmp_path: Path, image: Callable[[], Image], message: str
) -> None:
    """Each fault in a manifest or config is one line naming the blob."""
    root = layout(tmp_path / "img", image())
    with pytest.raises(OciError, match=rf"^{tmp_path}/img: {message}") as err:
        open_image(str(root))
    assert "\n" not in str(err.value)


def test_a_missing_blob_is_refused(tmp_path: Path) -> None:
    """A layer the manifest names but the layout lacks fails open_image."""
    image_blobs = build()
    root = layout(tmp_path / "img", image_blobs)
    digest = sha(image_blobs.blobs[1]).removeprefix("sha256:")
    (root / "blobs/sha256" / digest).unlink()
    with pytest.raises(
        OciError, match=rf"layer sha256:{digest[:12]} is missing \(no blobs/sha256/{digest}\)$"
    ):
        open_image(str(root))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), r"not an OCI image layout \(no index.json\)$"),
        (lambda p: None, "no such file or directory$"),
        (lambda p: p.write_bytes(b"not a tar at all" * 100), r"not a readable tar archive"),
        (lambda p: p.write_bytes(b"\xfd7zXZ\x00" + b"\0" * 100), "compressed with xz; decompress it first$"),
    ],
    ids=["empty-dir", "missing", "not-a-tar", "xz"],
)  # fmt: skip
def test_sources_that_are_not_images_are_refused(
    tmp_path: Path, setup: Callable[[Path], None], message: str
) -> None:
    """A path that holds no image says what it is instead."""
    path = tmp_path / "source"
    setup(path)
    with pytest.raises(OciError, match=rf"^{path}: {message}"):
        open_image(str(path))


def test_a_layer_is_applied_to_an_empty_directory_only(tmp_path: Path) -> None:
    """Applying on top of existing files would mix two layers: refused."""
    (tmp_path / "old").write_text("x")
    with pytest.raises(
        OciError, match=rf"{tmp_path} is not empty; a layer is applied to an empty directory$"
    ):
        apply_layer(layer_of(TOP), str(tmp_path))


# --------------------------------------------------------------------------- hostile layers


@dataclass
class Scene:
    """A destination with a sibling that must stay empty and a victim that must stay as it is."""

    dest: Path
    outside: Path
    victim: Path

    def untouched(self) -> None:
        assert os.listdir(self.outside) == []
        assert os.listdir(self.victim) == ["passwd"]
        st = (self.victim / "passwd").lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        assert (self.victim / "passwd").read_bytes() == b"victim\n"
        assert os.listxattr(self.victim) == [] and os.listxattr(self.victim / "passwd") == []


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path / "dest", tmp_path / "outside", tmp_path / "victim")
    for d in (s.dest, s.outside, s.victim):
        d.mkdir()
    (s.victim / "passwd").write_bytes(b"victim\n")
    yield s
    s.untouched()


# (id, entries given the victim's path, the entry refused, what the message says)
HOSTILE: list[tuple[str, Callable[[str], list[Entry]], str, str]] = [
    ("dotdot", lambda v: [file("../outside/evil", b"x")], "../outside/evil", "'..' in its path"),
    ("dotdot-inside", lambda v: [directory("a/"), file("a/../../outside/evil")], "a/../../outside/evil", "'..' in its path"),
    ("absolute", lambda v: [file("/outside-abs/evil")], "/outside-abs/evil", "an absolute path"),
    ("symlink-abs-then-file", lambda v: [symlink("a", v), file("a/passwd", b"pwned")], "a/passwd", "'a' on its path is a symlink"),
    ("symlink-rel-then-file", lambda v: [symlink("a", "../victim"), file("a/passwd", b"pwned")], "a/passwd", "'a' on its path is a symlink"),
    ("symlink-deep", lambda v: [directory("d/"), symlink("d/a", v), file("d/a/sub/x")], "d/a/sub/x", "'d/a' on its path is a symlink"),
    ("symlink-then-dir", lambda v: [symlink("a", v), directory("a/sub/")], "a/sub", "'a' on its path is a symlink"),
    ("symlink-then-symlink", lambda v: [symlink("a", v), symlink("a/link", "/etc/shadow")], "a/link", "'a' on its path is a symlink"),
    ("symlink-then-hardlink", lambda v: [file("f"), symlink("a", v), hardlink("a/passwd", "f")], "a/passwd", "'a' on its path is a symlink"),
    ("symlink-then-whiteout", lambda v: [symlink("a", v), file("a/.wh.passwd")], "a/.wh.passwd", "'a' on its path is a symlink"),
    ("symlink-then-opaque", lambda v: [symlink("a", v), file("a/.wh..wh..opq")], "a/.wh..wh..opq", "'a' on its path is a symlink"),
    ("symlink-then-fifo", lambda v: [symlink("a", v), special("a/fifo", tarfile.FIFOTYPE)], "a/fifo", "'a' on its path is a symlink"),
    ("file-as-parent", lambda v: [file("a"), file("a/b")], "a/b", "'a' on its path is not a directory"),
    ("hardlink-dotdot", lambda v: [hardlink("h", "../victim/passwd")], "h", "its hardlink target '../victim/passwd' is outside the layer"),
    ("hardlink-absolute", lambda v: [hardlink("h", f"{v}/passwd")], "h", "is outside the layer"),
    ("hardlink-later-entry", lambda v: [hardlink("h", "later"), file("later")], "h", "its hardlink target 'later' is not an earlier entry of this layer"),
    ("hardlink-through-symlink", lambda v: [symlink("a", v), hardlink("h", "a/passwd")], "h", "its hardlink target 'a/passwd' is not an earlier entry of this layer"),
    ("hardlink-to-directory", lambda v: [directory("d/"), hardlink("h", "d")], "h", "is not an earlier entry of this layer"),
    ("hardlink-to-itself", lambda v: [file("h"), hardlink("h", "h")], "h", "is not an earlier entry of this layer"),
    ("char-device", lambda v: [special("dev/null", tarfile.CHRTYPE, 1, 3)], "dev/null", "device files are not allowed in a layer"),
    ("block-device", lambda v: [special("dev/sda", tarfile.BLKTYPE, 8, 0)], "dev/sda", "device files are not allowed in a layer"),
    ("whiteout-of-dotdot", lambda v: [file("d/.wh...")], "d/.wh...", "a whiteout that names no file"),
    ("overlay-xattr", lambda v: [directory("d/", xattrs={"trusted.overlay.opaque": "y"})], "d", "it carries the overlayfs attribute trusted.overlay.opaque, which a layer may not set"),
    ("overlay-redirect", lambda v: [file("f", xattrs={"trusted.overlay.redirect": "/x"})], "f", "it carries the overlayfs attribute trusted.overlay.redirect, which a layer may not set"),
    ("root-not-a-directory", lambda v: [file(".")], ".", "the layer's root is not a directory"),
    ("negative-uid", lambda v: [file("f", uid=-5)], "f", "its owner -5:0 is out of range"),
    ("no-change-gid", lambda v: [file("f", gid=2**32 - 1)], "f", "its owner 0:4294967295 is out of range"),
    ("absurd-mtime", lambda v: [_with(file("f"), mtime=1e30)], "f", "timestamp out of range for platform time_t"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("entries", "bad", "message"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
@pytest.mark.parametrize("compress", [False, True], ids=["tar", "gzip"])
def test_hostile_entries_are_refused_and_nothing_escapes(
    scene: Scene, entries: Callable[[str], list[Entry]], bad: str, message: str, compress: bool
) -> None:
    """Each trick is one line naming the entry; the sibling and the victim are untouched."""
    layer = layer_of(make_tar(*entries(str(scene.victim))), compress)
    with pytest.raises(OciError) as err:
        apply_layer(layer, str(scene.dest))
    line = str(err.value)
    assert line.startswith(f"layer {layer.digest[:19]}: entry {bad!r}: ") and line.endswith(message)
    assert "\n" not in line


_NAMES = [
    "a",
    "b",
    "a/b",
    "a/b/c",
    "./a",
    "b/a",
    ".wh.a",
    "a/.wh.b",
    "a/.wh..wh..opq",
    "..",
    "a/..",
    "/a",
    ".",
    "a/.wh...",
]


def _random_entry(rng: random.Random, victim: str) -> Entry:
    name = rng.choice(_NAMES)
    target = rng.choice([*_NAMES, "../victim", victim, f"{victim}/passwd", "/"])
    makers: list[Callable[[], Entry]] = [
        lambda: file(name, b"data", mode=rng.choice([0o644, 0o4755, 0])),
        lambda: directory(name, mode=rng.choice([0o755, 0o500, 0])),
        lambda: symlink(name, target),
        lambda: hardlink(name, target),
        lambda: special(name, tarfile.FIFOTYPE),
        lambda: file(name, xattrs={rng.choice(["user.x", "trusted.overlay.opaque"]): "y"}),
    ]
    return rng.choice(makers)()


@pytest.mark.parametrize("seed", range(3))
def test_random_layers_fail_only_with_oci_error_and_never_escape(tmp_path: Path, seed: int) -> None:
    """Random mixes of the entries above (links to the victim, whiteouts,
    replacements) either apply or fail with one line; nothing escapes."""
    rng = random.Random(seed)
    for i in range(100):
        s = Scene(tmp_path / f"{i}/dest", tmp_path / f"{i}/outside", tmp_path / f"{i}/victim")
        for d in (s.dest, s.outside, s.victim):
            d.mkdir(parents=True)
        (s.victim / "passwd").write_bytes(b"victim\n")
        tar = make_tar(*[_random_entry(rng, str(s.victim)) for _ in range(rng.randrange(1, 8))])
        try:
            apply_layer(layer_of(tar, compress=rng.random() < 0.3), str(s.dest))
        except OciError as exc:
            assert "\n" not in str(exc)
        s.untouched()
        assert sorted(os.listdir(tmp_path / str(i))) == ["dest", "outside", "victim"]


def test_later_entries_replace_earlier_ones_without_following_links(scene: Scene) -> None:
    """A file or directory over a symlink replaces the link itself; a file
    over a directory removes the directory; a whiteout replaces a file; a
    directory over a directory keeps it (and its opaque mark)."""
    v = str(scene.victim)
    tar = make_tar(
        symlink("x", f"{v}/passwd"),
        file("x", b"mine"),
        symlink("a", v),
        directory("a/"),
        file("a/passwd", b"mine too"),
        directory("d/"),
        file("d/f"),
        symlink("d/out", v),
        file("d", b"now a file"),
        file("f", b"1"),
        file("f", b"2"),
        file("o/.wh..wh..opq"),
        directory("o/", mode=0o750),
        file("w"),
        file(".wh.w"),
        symlink("abs", v),
    )
    apply_layer(layer_of(tar), str(scene.dest))
    d = scene.dest
    assert (d / "x").read_bytes() == b"mine" and not (d / "x").is_symlink()
    assert (d / "a").is_dir() and not (d / "a").is_symlink()
    assert (d / "a/passwd").read_bytes() == b"mine too"
    assert (d / "d").read_bytes() == b"now a file"
    assert (d / "f").read_bytes() == b"2"
    assert stat.S_IMODE((d / "o").lstat().st_mode) == 0o750
    assert os.getxattr(d / "o", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR((d / "w").lstat().st_mode)
    assert os.readlink(d / "abs") == v, "a symlink may point anywhere; it is not followed here"


def test_binary_xattrs_such_as_file_capabilities_are_kept(tmp_path: Path) -> None:
    """security.capability (binary) comes through pax headers byte for byte."""
    # VFS_CAP_REVISION_2, effective; permitted: CAP_NET_BIND_SERVICE.
    cap = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)
    tar = make_tar(
        file(
            "ping",
            b"\x7fELF",
            mode=0o755,
            xattrs={"security.capability": cap.decode("utf-8", "surrogateescape")},
        )
    )
    apply_layer(layer_of(tar, compress=True), str(tmp_path))
    assert os.getxattr(tmp_path / "ping", "security.capability") == cap


# --------------------------------------------------------------------------- real tools


@pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (make setup-vm installs it)"
)
@pytest.mark.parametrize("compress", [False, True], ids=["uncompressed", "gzip"])
def test_a_layout_written_by_skopeo_is_read(
    tmp_path: Path, compress: bool, expected: list[list[tuple[object, ...]]]
) -> None:
    """skopeo copy docker-archive: -> oci: (offline) writes a layout we read,
    with the layers gzip-compressed by skopeo (its default) or left as they were."""
    archive = docker_archive(tmp_path / "img.tar", [(build(), ["corral/test:1"])])
    dest = tmp_path / "layout"
    keep = [] if compress else ["--dest-oci-accept-uncompressed-layers"]
    skopeo(
        "--insecure-policy", "copy", "--quiet", *keep, f"docker-archive:{archive}", f"oci:{dest}:t1"
    )
    image = open_image(str(dest), "t1")
    # skopeo 1.9 labels the layers it keeps uncompressed "+gzip" too: they are
    # read as what their first bytes say they are.
    assert [x.media_type for x in image.layers] == [TAR_GZ] * 2
    sizes = [x.size for x in image.layers]
    assert (sizes == [len(BOTTOM), len(TOP)]) is not compress
    assert [tree(d) for d in apply_all(image, tmp_path / "out")] == expected


@pytest.mark.skipif(
    shutil.which("umoci") is None, reason="umoci is not installed (make setup-vm installs it)"
)
def test_layers_written_by_umoci_become_whiteouts(tmp_path: Path) -> None:
    """umoci repack writes a deleted file as a .wh. entry: it becomes a whiteout."""
    lay, bundle = tmp_path / "layout", tmp_path / "bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(lay))
    umoci("new", "--image", f"{lay}:t")
    umoci("unpack", "--image", f"{lay}:t", str(bundle))
    (bundle / "rootfs/etc").mkdir()
    (bundle / "rootfs/etc/passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (bundle / "rootfs/etc/hostname").write_text("box\n")
    umoci("repack", "--image", f"{lay}:t", str(bundle))
    # A repack diffs against the unpacked image: unpack the new one first.
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{lay}:t", str(bundle))
    (bundle / "rootfs/etc/passwd").unlink()
    umoci("repack", "--image", f"{lay}:t", str(bundle))

    image = open_image(str(lay), "t")
    assert [x.media_type for x in image.layers] == [TAR_GZ, TAR_GZ]
    bottom, top = apply_all(image, tmp_path / "out")
    assert (bottom / "etc/passwd").read_text() == "root:x:0:0::/:/bin/sh\n"
    passwd = (top / "etc/passwd").lstat()
    assert stat.S_ISCHR(passwd.st_mode) and passwd.st_rdev == 0
    assert not (top / "etc/hostname").exists()
