"""Services: what the core runs beside the fleet, and how the control socket is one."""

from __future__ import annotations

import os

import trio

import events
from supervisor import Supervisor
from supervisor._core import _supervisor as core

from .conftest import Dirs, requires_root
from .supervising import fleet, wait_event

pytestmark = requires_root


def test_the_core_runs_the_services_it_is_given_and_nothing_else(dirs: Dirs) -> None:
    """A core supervisor serves no control socket; a given service starts before the
    fleet, sees every event up to the last, and is cancelled after it."""
    kinds: list[str] = []
    cancelled: list[bool] = []

    async def service(sup: core.Supervisor, *, task_status: trio.TaskStatus[None]) -> None:
        assert sup.bus is not None
        with sup.bus.subscribe() as sub:
            task_status.started()
            try:
                async for ev in sub:
                    kinds.append(ev.kind)
                await trio.sleep_forever()  # the bus closed after the last event
            except trio.Cancelled:
                cancelled.append(True)
                raise

    sup = core.Supervisor(
        fleet({"name": "web", "command": "exec sleep 1000"}),
        state_dir=str(dirs.state),
        run_dir=str(dirs.run),
        services=[service],
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await wait_event(sup, lambda e: isinstance(e, events.Started))
            assert os.path.exists(dirs.run / "events.sock")
            assert not os.path.exists(dirs.run / "control.sock")
            sup.stop("test done")

    trio.run(main)
    assert kinds[0] == "supervisor_started"
    assert "started" in kinds
    assert kinds[-1] == "supervisor_stopped"
    assert cancelled == [True]


def test_the_public_supervisor_is_the_core_with_its_control_socket(dirs: Dirs) -> None:
    """supervisor.Supervisor runs the control socket first, then the services it is given."""
    started: list[bool] = []

    async def service(sup: core.Supervisor, *, task_status: trio.TaskStatus[None]) -> None:
        started.append(os.path.exists(dirs.run / "control.sock"))
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor(
        fleet({"name": "web", "command": "exec sleep 1000"}),
        state_dir=str(dirs.state),
        run_dir=str(dirs.run),
        services=[service],
    )
    assert isinstance(sup, core.Supervisor)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            assert os.path.exists(dirs.run / "control.sock")
            sup.stop("test done")

    trio.run(main)
    assert started == [True]
    assert not os.path.exists(dirs.run / "control.sock")
