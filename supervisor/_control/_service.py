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
from collections.abc import Sequence

import trio

from .._core import _supervisor as core
from .._core._fleet import Fleet
from ._client import CONTROL_SOCKET
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
        task_status=task_status,
    )


class Supervisor(core.Supervisor):
    """Runs a fleet (see :class:`supervisor._core._supervisor.Supervisor`),
    reachable over its control socket (``docs/control.md``).

    *services* come after the control socket's.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        state_dir: str | None = None,
        run_dir: str | None = None,
        handle_signals: bool = False,
        log: bool = False,
        services: Sequence[core.Service] = (),
    ) -> None:
        super().__init__(
            fleet,
            state_dir=state_dir,
            run_dir=run_dir,
            handle_signals=handle_signals,
            log=log,
            services=(control_service, *services),
        )
