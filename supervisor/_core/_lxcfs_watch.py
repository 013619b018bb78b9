"""The supervisor's watch on corral's lxcfs (docs/view.md).

An lxcfs that ends (a crash, a kill) leaves every running sandbox's view
answering ENOTCONN. The watch sleeps on the lxcfs's pidfd (no polling);
when it turns readable, a new lxcfs is started and every running
sandbox's view re-attached to it (:meth:`Lxcfs.recover`, in a worker
thread). An lxcfs that keeps dying soon after its start is started again
after a delay that doubles each time, as the restart plugin does. At
start-up the watch takes over the lxcfs a predecessor left (or, if that
died while no supervisor ran, starts a new one for the sandboxes taken
back).
"""

from __future__ import annotations

import contextlib
import math
import os

import trio

from .._runtime._lxcfs import Lxcfs, LxcfsError
from ._supervisor_log import say

__all__ = ["watch_lxcfs"]

RETRY_MIN = 1.0
RETRY_MAX = 60.0
"""Seconds before starting again an lxcfs that ended soon after its start
(or could not be started), doubling from one to the next."""
STABLE_AFTER = 30.0
"""An lxcfs that ran this long is started again at once when it ends."""


async def watch_lxcfs(lxcfs: Lxcfs, limiter: trio.CapacityLimiter) -> None:
    """Keep corral's lxcfs running while sandboxes have its view; return
    at once for an lxcfs that is not corral's (``off``, or someone else's)."""
    if not lxcfs.own:
        return
    token = trio.lowlevel.current_trio_token()
    found = [trio.Event()]

    def on_found() -> None:
        # Called in the worker thread that started (or took over) one.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(lambda: found[0].set())

    lxcfs.on_found = on_found
    delay = RETRY_MIN
    # First: take over a predecessor's lxcfs, or mend the views of the
    # sandboxes taken back if it died while there was no supervisor.
    retry = True
    started_at = -math.inf
    try:
        while True:
            fd = lxcfs.watch_fd()
            if fd >= 0:
                pid = lxcfs.pid
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
                if trio.current_time() - started_at < STABLE_AFTER:
                    say(
                        f"corral: lxcfs (pid {pid}) ended soon after its start; next in {delay:g} s"
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                else:
                    delay = RETRY_MIN
            elif not retry:
                # None known yet: the first sandbox with the view starts one.
                await found[0].wait()
                found[0] = trio.Event()
                continue
            try:
                if await trio.to_thread.run_sync(lxcfs.recover, limiter=limiter) and fd >= 0:
                    started_at = trio.current_time()
                    say(
                        f"corral: lxcfs (pid {pid}) ended; pid {lxcfs.pid} serves the"
                        " sandboxes' views now"
                    )
                retry = False
            except (LxcfsError, OSError) as exc:
                say(f"corral: lxcfs could not be started again ({exc}); trying in {delay:g} s")
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                retry = True
    finally:
        lxcfs.on_found = None
