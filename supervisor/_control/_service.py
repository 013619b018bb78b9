"""The supervisor as corral runs it: the core, plus its control socket.

The core (:mod:`supervisor._core`) sits below the control plane and does not
import it; it runs whatever :class:`~supervisor._core._supervisor.Service`
objects it is given. This module gives it the control socket's: the
package's public :class:`supervisor.Supervisor` is this class, so
``Supervisor(fleet).run()`` serves ``RUN_DIR/control.sock`` as ``corral up``
does.
"""

from __future__ import annotations

import os

import trio

from .._core import _supervisor as core
from ._client import CONTROL_SOCKET, call
from ._server import serve_control

__all__ = ["Supervisor", "control_service"]


async def control_service(
    supervisor: core.Supervisor, *, task_status: trio.TaskStatus[None]
) -> None:
    """Serve the control socket (``RUN_DIR/control.sock``) of *supervisor*."""
    assert supervisor.runtime is not None
    await serve_control(
        supervisor,
        os.path.join(supervisor.runtime.run_dir, CONTROL_SOCKET),
        group=supervisor.fleet.supervisor.socket_group,
        idle_timeout=supervisor.fleet.supervisor.socket_idle_timeout,
        task_status=task_status,
    )


class Supervisor(core.Supervisor):
    """Runs a fleet (see :class:`supervisor._core._supervisor.Supervisor`),
    reachable over its control socket (``docs/control.md``); services given
    to it run after the control socket's."""

    default_services = (control_service,)

    def _ask_to_hand_over(self, run_dir: str) -> int:
        answer = call(os.path.join(run_dir, CONTROL_SOCKET), "handover")
        return int(answer["pid"])
