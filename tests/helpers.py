"""Small helpers shared by the tests (not fixtures)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

from supervisor import Runtime, SandboxExit, SandboxSpec

T = TypeVar("T")


def run_capture(runtime: Runtime, spec: SandboxSpec) -> tuple[SandboxExit, str, str]:
    """Run a sandbox to its end; return how it ended and its stdout, stderr."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        open("/dev/null", "rb") as null,
    ):
        with runtime.create(spec, stdio=(null.fileno(), out.fileno(), err.fileno())) as sb:
            result = sb.wait()
        out.seek(0)
        err.seek(0)
        return result, out.read().decode(), err.read().decode()


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll *cond* until it returns something true, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
