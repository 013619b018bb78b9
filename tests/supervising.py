"""Helpers for tests that run a fleet under a real supervisor."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

import events
from supervisor import Supervisor
from supervisor._cli._output_reader import format_record, read_records
from supervisor._core._fleet import Fleet, parse_fleet
from supervisor._core._supervisor import Supervisor as CoreSupervisor

from .conftest import Dirs

HOG = "x=0123456789abcdef; while :; do x=$x$x; done"
TIMEOUT = 60


def fleet(*sandboxes: dict[str, Any], **supervisor: Any) -> Fleet:
    doc: dict[str, Any] = {"sandbox": list(sandboxes)}
    if supervisor:
        doc["supervisor"] = supervisor
    return parse_fleet(doc)


async def wait_event(
    sup: CoreSupervisor, pred: Callable[[events.Event], bool], timeout: float = TIMEOUT
) -> events.Event:
    """The first event (past or future) matching *pred*."""
    assert sup.bus is not None
    with sup.bus.subscribe() as sub:
        last = 0
        for ev in sup.bus.replay(1):
            last = ev.seq
            if pred(ev):
                return ev
        with trio.fail_after(timeout):
            async for ev in sub:
                if ev.seq > last and pred(ev):
                    return ev
    raise AssertionError("unreachable")


def output(dirs: Dirs, name: str) -> str:
    """What the sandbox wrote (stdout and stderr), from its output log."""
    log = Path(dirs.state, "logs", f"{name}.log")
    if not log.exists():
        return ""
    records = read_records(str(log))
    return b"".join(format_record(r, timestamps=False) for r in records).decode()


async def wait_log(dirs: Dirs, name: str, text: str) -> None:
    """Wait until the sandbox's output starts with *text*."""
    with trio.fail_after(TIMEOUT):
        while not output(dirs, name).startswith(text):
            await trio.sleep(0.01)


def run(
    f: Fleet,
    dirs: Dirs,
    body: Callable[[Supervisor], Awaitable[None]],
    setup: Callable[[Supervisor], None] | None = None,
) -> list[events.Event]:
    """Run the fleet, call *body*, stop the fleet; return every event from the journal.

    *setup*, if given, sees the supervisor before it runs.
    """
    sup = Supervisor(f, state_dir=str(dirs.state), run_dir=str(dirs.run))
    if setup is not None:
        setup(sup)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            try:
                await body(sup)
            finally:
                sup.stop("test done")

    trio.run(main)
    journal = events.Journal(os.path.join(dirs.state, "journal"))
    try:
        return list(journal.replay(1))
    finally:
        journal.close()


def of(evs: list[events.Event], kind: type[events.Event], sandbox: str) -> list[Any]:
    return [e for e in evs if isinstance(e, kind) and e.sandbox == sandbox]


async def request(
    path: str, method: str, params: dict[str, Any] | None = None, fds: Sequence[int] = ()
) -> dict[str, Any]:
    """One connection, one request (with *fds*); the answer map (ok or error)."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        await s.connect(path)
        params = dict(params or {}, fds=len(fds)) if fds else params or {}
        data = msgpack.packb({"id": 7, "method": method, "params": params})
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        assert await s.sendmsg([data], anc) == len(data)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            data = await s.recv(65536)
            assert data, f"{method}: connection closed without an answer"
            unpacker.feed(data)
            for msg in unpacker:
                if "progress" not in msg:
                    assert msg["id"] == 7
                    return msg  # type: ignore[no-any-return]
