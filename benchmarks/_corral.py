"""Running ``corral up`` from a benchmark, in private directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["corral_up", "scratch_dir"]


def scratch_dir(prefix: str) -> Path:
    """A new private temporary directory (``mkdtemp``) that a sandbox's root
    can pass through: 0711. Sandboxes run in a user namespace by default,
    and their root (an unprivileged host uid) must search the directories
    above their layers; corral refuses a start it cannot make, and a
    benchmark waiting for that start would wait for ever."""
    path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    path.chmod(0o711)
    return path


@contextmanager
def corral_up(
    fleet: str, scratch: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Run ``corral up`` on a fleet text; yield (process, event socket, state dir).

    The supervisor is stopped with SIGTERM on exit. *scratch* (created if
    needed) holds its state and is left for the caller; by default a
    temporary directory is used and removed.
    """
    own = scratch is None
    base = scratch_dir("corral-bench-") if scratch is None else scratch
    base.mkdir(parents=True, exist_ok=True)
    (base / "fleet.toml").write_text(fleet)
    env = {**os.environ, "CORRAL_STATE_DIR": str(base / "state"),
           "CORRAL_RUN_DIR": str(base / "run")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "up", str(base / "fleet.toml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    sock = str(base / "run" / "events.sock")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                assert proc.stderr is not None
                raise SystemExit(f"corral up did not start: {proc.stderr.read().decode()}")
            time.sleep(0.01)
        yield proc, sock, base / "state"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if own:
            shutil.rmtree(base, ignore_errors=True)
