"""What the builders that run a host tool share: being the subreaper of
what it starts, and stopping it, and everything it started, when a build
is interrupted.

A builder starts its tool in a session of its own (``start_new_session``):
a terminal's Ctrl-C reaches the build, which stops the tool and waits for
it, rather than the tool stopping half way on its own. The build's
process is a subreaper, so what the tool started and left behind is
re-parented to it and reaped here, by the tool's process group, never
anything else of the caller's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["set_child_subreaper", "stop_group"]


def set_child_subreaper() -> None:
    """Make this process the subreaper of its descendants
    (``PR_SET_CHILD_SUBREAPER``): an orphan of a build's tool is ours to
    reap, not the host's init's, so a build knows when it is gone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def stop_group(proc: subprocess.Popen[str], grace: float) -> None:
    """Stop *proc* (the leader of its own process group) and everything in
    its group, and wait for them all: SIGTERM first, so that the tool's own
    clean-up runs (a template's ``trap revert``), SIGKILL after *grace*
    seconds, then reap what outlived *proc* and was re-parented to us."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
    finally:
        # Also when a second Ctrl-C cuts the grace short: the user wants
        # out, and nothing of the tool may outlive the build.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(ChildProcessError):
            while True:
                os.waitpid(-proc.pid, 0)
