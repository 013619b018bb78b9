"""Images: the store's build cache, a cold Debian build against debootstrap,
and sandbox start on a 5-layer image against a 1-layer one; one run.

Usage (as root; on a shared machine under the tests' lock)::

    .venv/bin/python benchmarks/images.py [--runs 30] [--skip-cold]

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
3. **start on 5 layers against 1**: create, wait for and destroy a sandbox
   running ``true`` (the library: ``Runtime.create``/``wait``/``destroy``)
   on busybox (one layer) and on busybox with four small layers on top (a
   file each, one whiteout), interleaved, median of RUNS each.

The last lines are exactly ``cached_build_ms: X``,
``debian_cold_ratio_vs_debootstrap: X`` (ours / debootstrap; below 1 is
faster) and ``start_5layer_ratio: X`` (5 layers / 1 layer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--skip-cold", action="store_true", help="no cold Debian builds")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/images.py: run as root")
    if not args.skip_cold and shutil.which("debootstrap") is None:
        sys.exit("benchmarks/images.py: debootstrap not found (make setup-bench)")
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-images-"))
    try:
        state = scratch / "state"
        state.mkdir()
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
        print(f"cached_build_ms: {cli * 1000:.1f}")
        print(f"debian_cold_ratio_vs_debootstrap: {ratio}")
        print(f"start_5layer_ratio: {five / one:.3f}")
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
