"""Images: the store's build cache, a cold Debian build against debootstrap,
an OCI import against ``umoci unpack``, and sandbox start on a 5-layer image
against a 1-layer one; one run.

Usage (as root; on a shared machine under the tests' lock)::

    .venv/bin/python benchmarks/images.py [--runs 30] [--oci-runs 9] [--skip-cold] [--oci-only]

What it measures, in a private state directory (removed at the end):

1. **cached build**: ``corral image build debian --package python3-minimal``
   when the store has that recipe already, as a user runs it (a CLI
   process: interpreter, imports, the store's lookup), median of RUNS; and
   the library call alone (:func:`rootfs._debian.build_debian`).
2. **cold Debian build** against **debootstrap** alone, same mirror (the
   host's apt mirror), same suite and variant (bookworm, minbase), no extra
   package: our builder (mmdebstrap in its own mount namespace, then the
   configure step, then the store's commit) against ``debootstrap
   --variant=minbase``. One run each, alternating which goes first is not
   possible in one run: ours goes second, so the mirror's caches favour it
   no more than the network does. Both download every package.
3. **OCI import** against **umoci unpack** of the same layout. The layout
   is made here, offline, by umoci itself (``init``, ``new``, then
   ``repack --refresh-bundle`` after each change to the bundle's rootfs),
   from the tree of the Debian image of step 1 (bookworm minbase with
   python3-minimal: about 7,800 entries, 190 MB): layer 1 the tree without
   ``usr/share`` and the Python standard library, layer 2 ``usr/share``,
   layer 3 ``usr/lib/python3.*``, layer 4 an application on top (a few
   hundred files of mixed sizes, text and random bytes, some hardlinks; an
   edited ``/etc/passwd``; ``usr/share/doc`` and a few files deleted, i.e.
   whiteouts). The device nodes in the Debian tree's ``/dev`` are left out
   (images carry none; corral refuses them). Timed, each into a fresh
   destination after a ``sync``, the three alternating, the order rotating
   every round, median of OCI_RUNS: ``corral image import LAYOUT bench``
   into a fresh store (a CLI process, as typed); ``umoci unpack --image
   LAYOUT:bench BUNDLE``; and ``umoci raw unpack`` (the rootfs alone, no
   config.json or mtree) for reference. The work differs: corral keeps each
   layer in its own directory (a deleted file becomes a whiteout; nothing
   is deleted) and verifies both digests of each layer; umoci verifies the
   same digests but applies the layers on one rootfs (deleting what a
   whiteout removes), and ``unpack`` then writes a runtime config and an
   mtree manifest with a SHA-256 of every file. After the first round the
   two results are compared: the overlay of corral's layers, mounted, and
   umoci's rootfs must list the same entries (type, mode, owner, size, link
   target).
4. **start on 5 layers against 1**: create, wait for and destroy a sandbox
   running ``true`` (the library: ``Runtime.create``/``wait``/``destroy``)
   on busybox (one layer) and on busybox with four small layers on top (a
   file each, one whiteout), interleaved, median of RUNS each.

The last lines are exactly ``cached_build_ms: X``,
``debian_cold_ratio_vs_debootstrap: X`` (ours / debootstrap; below 1 is
faster), ``oci_import_ratio_vs_umoci: X`` (corral image import / umoci
unpack) and ``start_5layer_ratio: X`` (5 layers / 1 layer). ``--oci-only``
runs step 3 alone (building the Debian image first if it must).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _corral import scratch_dir

sys.path.append(str(Path(__file__).resolve().parent.parent))

from rootfs import ImageStore, busybox_image, layer_id_of_recipe
from rootfs._debian import DebianRecipe, build_debian, host_mirror
from supervisor import Runtime, SandboxSpec


def _cli(state: Path, *args: str) -> float:
    env = {**os.environ, "CORRAL_STATE_DIR": str(state)}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env=env, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    return time.perf_counter() - start


def cached_build(state: Path, runs: int) -> tuple[float, float]:
    """(CLI median, library median) seconds of a cached debian build."""
    _cli(state, "image", "build", "debian", "--package", "python3-minimal")  # the cold one
    cli = [_cli(state, "image", "build", "debian", "--package", "python3-minimal")]
    cli += [_cli(state, "image", "build", "debian", "--package", "python3-minimal")
            for _ in range(runs - 1)]  # fmt: skip
    store = ImageStore(state / "images")
    recipe = DebianRecipe(packages=("python3-minimal",))
    lib = []
    for _ in range(runs):
        start = time.perf_counter()
        build_debian(store, recipe)
        lib.append(time.perf_counter() - start)
    return statistics.median(cli), statistics.median(lib)


def cold_builds(scratch: Path) -> tuple[float, float]:
    """(debootstrap, ours) seconds of a cold minbase build from the host's mirror."""
    mirror = host_mirror()
    target = scratch / "debootstrap"
    start = time.perf_counter()
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "debootstrap", "--variant=minbase", "bookworm", str(target), mirror],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    theirs = time.perf_counter() - start
    shutil.rmtree(target)
    store = ImageStore(scratch / "cold-images")
    start = time.perf_counter()
    build_debian(store, DebianRecipe(mirror=mirror))
    ours = time.perf_counter() - start
    return theirs, ours


# --------------------------------------------------------------------------- OCI import

OCI_TAG = "bench"


def _umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=900)


def _repack(layout: Path, bundle: Path) -> None:
    # --refresh-bundle: the next repack diffs against what this one packed.
    _umoci("repack", "--refresh-bundle", "--no-history", "--image", f"{layout}:{OCI_TAG}",
           str(bundle))  # fmt: skip


def _app_files(root: Path) -> None:
    """An application's files: mixed sizes, text and random bytes, a few hardlinks."""
    rng = random.Random(15)  # the same layer every run
    app = root / "opt" / "app"
    for n in range(400):
        kind = rng.random()
        folder = app / f"pkg{n % 20}"
        folder.mkdir(parents=True, exist_ok=True)
        if kind < 0.6:  # source and config files: small, compressible
            line = f"value_{n} = {rng.random()!r}  # some text that compresses\n"
            (folder / f"mod{n}.py").write_text(line * rng.randint(2, 150))
        elif kind < 0.9:  # data files: up to 256 KiB of random bytes
            (folder / f"data{n}.bin").write_bytes(rng.randbytes(rng.randint(8 << 10, 256 << 10)))
        else:  # libraries: up to 2 MiB, half random
            size = rng.randint(256 << 10, 2 << 20)
            data = rng.randbytes(size // 2) + bytes(size - size // 2)
            (folder / f"lib{n}.so").write_bytes(data)
    for n, lib in enumerate(sorted(app.glob("pkg*/lib*.so"))[:10]):
        os.link(lib, app / f"link{n}.so")


def oci_layout(tree: str, scratch: Path) -> Path:
    """An OCI layout of four gzip layers, made by umoci from the Debian *tree* (see above)."""
    layout, bundle, held = scratch / "oci-layout", scratch / "oci-bundle", scratch / "oci-held"
    _umoci("init", "--layout", str(layout))
    _umoci("new", "--image", f"{layout}:{OCI_TAG}")
    _umoci("unpack", "--image", f"{layout}:{OCI_TAG}", str(bundle))
    rootfs = bundle / "rootfs"
    subprocess.run(["cp", "-a", f"{tree}/.", str(rootfs)], check=True)
    for dev in (rootfs / "dev").iterdir():
        if dev.is_char_device() or dev.is_block_device():
            dev.unlink()
    later = ["usr/share", *(str(p.relative_to(rootfs)) for p in rootfs.glob("usr/lib/python3.*"))]
    held.mkdir()
    for n, rel in enumerate(later):
        os.rename(rootfs / rel, held / str(n))
    _repack(layout, bundle)  # layer 1: the base
    for n, rel in enumerate(later):  # layers 2 and 3
        os.rename(held / str(n), rootfs / rel)
        _repack(layout, bundle)
    _app_files(rootfs)  # layer 4: an application, and what it removed and changed
    with open(rootfs / "etc" / "passwd", "a") as f:
        f.write("app:x:1000:1000::/opt/app:/usr/sbin/nologin\n")
    shutil.rmtree(rootfs / "usr" / "share" / "doc")
    for rel in ("etc/motd", "usr/bin/perl5.36.0", "usr/share/zoneinfo/UTC"):
        with contextlib.suppress(FileNotFoundError):
            (rootfs / rel).unlink()
    _repack(layout, bundle)
    shutil.rmtree(bundle)
    shutil.rmtree(held)
    return layout


def _layout_stats(layout: Path) -> tuple[int, int, int, int]:
    """(layers, compressed bytes, uncompressed bytes, tar entries) of the layout's image."""
    import gzip
    import tarfile

    from rootfs import open_image

    image = open_image(str(layout), OCI_TAG)
    stored = raw = entries = 0
    for layer in image.layers:
        stored += layer.size
        with layer.open() as blob, gzip.GzipFile(fileobj=blob) as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tf:
                entries += sum(1 for _ in tf)
            raw += gz.tell()
    return len(image.layers), stored, raw, entries


_LIST = (
    r"-mindepth 1 \( -type d -printf '%P d %m %U:%G\n' \)"
    r" -o \( -type f -printf '%P f %m %U:%G %s\n' \)"
    r" -o \( -type l -printf '%P l %U:%G %l\n' \) -o -printf '%P %y %m %U:%G\n'"
)


def _listing(root: str, lowerdirs: list[str] | None = None) -> list[str]:
    """The entries below *root*, or below the overlay of *lowerdirs* mounted there."""
    script = f"find {root} {_LIST} | sort"
    if lowerdirs is not None:
        script = f"mount -t overlay overlay -o lowerdir={':'.join(lowerdirs)} {root} && {script}"
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    return out.splitlines()


def oci_imports(layout: Path, scratch: Path, runs: int) -> dict[str, list[float]]:
    """Seconds of each import of *layout*, by contender, alternating (see above)."""
    out = scratch / "oci-out"
    image = f"{layout}:{OCI_TAG}"
    commands = {
        "corral": [sys.executable, "-m", "supervisor", "image", "import", str(layout), OCI_TAG],
        "umoci": ["umoci", "unpack", "--image", image, str(out)],
        "umoci-raw": ["umoci", "raw", "unpack", "--image", image, str(out)],
    }
    env = {**os.environ, "CORRAL_STATE_DIR": str(out)}
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for i in range(runs + 1):  # round 0 warms the page cache and checks the results
        for name in names[i % 3 :] + names[: i % 3]:
            subprocess.run(["rm", "-rf", str(out)], check=True)
            os.sync()  # no writeback of the last run's files during this one
            start = time.perf_counter()
            subprocess.run(commands[name], env=env, check=True, capture_output=True, timeout=900)
            elapsed = time.perf_counter() - start
            if i > 0:
                times[name].append(elapsed)
            elif name == "corral":
                store = ImageStore(out / "images")
                ours = _listing(str(scratch / "oci-mnt"), store.lowerdirs(store.find(OCI_TAG)))
            elif name == "umoci":
                theirs = _listing(str(out / "rootfs"))
        if i == 0:
            if ours != theirs:
                diff = sorted(set(ours) ^ set(theirs))[:10]
                sys.exit(f"benchmarks/images.py: corral's and umoci's trees differ: {diff}")
            print(f"oci import: corral's layers, mounted, and umoci's rootfs list the same"
                  f" {len(ours)} entries")  # fmt: skip
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return times


def oci_section(state: Path, scratch: Path, runs: int) -> float:
    """The OCI import benchmark (step 3); its ratio corral / umoci unpack."""
    recipe = DebianRecipe(packages=("python3-minimal",))
    # Step 1 built it; alone, the tests' image cache may have it (only read).
    cache = ImageStore(os.environ.get("CORRAL_TEST_IMAGE_CACHE", "/var/cache/corral-tests/images"))
    store = ImageStore(state / "images")
    debian = store.tagged(recipe.default_tag)
    if debian is None and (cached := cache.tagged(recipe.default_tag)) is not None:
        debian, store = cached, cache
    if debian is None:
        debian = build_debian(store, recipe)
    (tree,) = store.lowerdirs(debian)
    (scratch / "oci-mnt").mkdir()
    start = time.perf_counter()
    layout = oci_layout(tree, scratch)
    made = time.perf_counter() - start
    count, stored, raw, entries = _layout_stats(layout)
    print(f"oci layout made by umoci from {recipe.default_tag} ({tree}) in {made:.1f} s:"
          f" {count} gzip layers, {entries} tar entries, {stored / 2**20:.1f} MiB compressed,"
          f" {raw / 2**20:.1f} MiB uncompressed")  # fmt: skip
    times = oci_imports(layout, scratch, runs)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, label in (
        ("corral", "corral image import (each layer its own store layer)"),
        ("umoci", "umoci unpack (one rootfs + config.json + mtree)"),
        ("umoci-raw", "umoci raw unpack (one rootfs)"),
    ):
        t = sorted(times[name])
        print(f"  {label}: median {medians[name]:.2f} s, min {t[0]:.2f}, max {t[-1]:.2f}"
              f" (n={len(t)})")  # fmt: skip
    print(f"  corral / umoci raw unpack: {medians['corral'] / medians['umoci-raw']:.3f}")
    return medians["corral"] / medians["umoci"]


def layered_starts(state: Path, runs: int) -> tuple[float, float]:
    """(1 layer, 5 layers) median seconds of create + wait + destroy of `true`."""
    store = ImageStore(state / "images")
    base = busybox_image(store)
    layers = list(base.layers)
    with store.building("bench-5-layers") as build:
        for n in range(4):
            layer = layer_id_of_recipe({"bench-layer": n})
            if not build.has_layer(layer):
                work = Path(build.scratch("bench"))
                (work / "etc").mkdir()
                (work / "etc" / f"layer{n}").write_text(f"{n}\n")
                if n == 3:  # a whiteout, as images have them
                    os.mknod(work / "etc" / "hostname", 0o600 | 0o020000, os.makedev(0, 0))
                build.commit_layer(layer, str(work))
            layers.append(layer)
        build.commit_image(layers, dict(base.config), {"key": "bench-5-layers"}, "bench:5")
    runtime = Runtime(state_dir=state, run_dir=state / "run")
    times: dict[str, list[float]] = {"busybox": [], "bench:5": []}
    for i in range(runs):
        for rootfs in ("busybox", "bench:5"):
            start = time.perf_counter()
            sb = runtime.create(SandboxSpec(name=f"img-bench-{i}", argv=("true",), rootfs=rootfs))
            sb.wait()
            sb.destroy()
            times[rootfs].append(time.perf_counter() - start)
    return statistics.median(times["busybox"]), statistics.median(times["bench:5"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--oci-runs", type=int, default=9, help="OCI imports of each contender")
    parser.add_argument("--skip-cold", action="store_true", help="no cold Debian builds")
    parser.add_argument("--oci-only", action="store_true", help="the OCI import alone")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/images.py: run as root")
    if not (args.skip_cold or args.oci_only) and shutil.which("debootstrap") is None:
        sys.exit("benchmarks/images.py: debootstrap not found (make setup-bench)")
    if shutil.which("umoci") is None:
        sys.exit("benchmarks/images.py: umoci not found (make setup-vm installs it)")
    scratch = scratch_dir("corral-bench-images-")
    try:
        state = scratch / "state"
        state.mkdir()
        if args.oci_only:
            print(f"oci_import_ratio_vs_umoci: {oci_section(state, scratch, args.oci_runs):.3f}")
            return 0
        cli, lib = cached_build(state, args.runs)
        print(f"cached debian build: CLI {cli * 1000:.1f} ms (median of {args.runs}),"
              f" library {lib * 1000:.2f} ms")  # fmt: skip
        one, five = layered_starts(state, args.runs)
        print(f"sandbox start, create+wait+destroy of true: 1 layer {one * 1000:.2f} ms,"
              f" 5 layers {five * 1000:.2f} ms (medians of {args.runs}, interleaved)")  # fmt: skip
        ratio = "skipped"
        if not args.skip_cold:
            theirs, ours = cold_builds(scratch)
            print(f"cold bookworm minbase from {host_mirror()}: debootstrap {theirs:.1f} s,"
                  f" corral (mmdebstrap + configure + store) {ours:.1f} s")  # fmt: skip
            ratio = f"{ours / theirs:.3f}"
        oci = oci_section(state, scratch, args.oci_runs)
        print(f"cached_build_ms: {cli * 1000:.1f}")
        print(f"debian_cold_ratio_vs_debootstrap: {ratio}")
        print(f"oci_import_ratio_vs_umoci: {oci:.3f}")
        print(f"start_5layer_ratio: {five / one:.3f}")
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
