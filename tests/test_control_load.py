"""The control socket under load: 50 clients at once against 50 sandboxes,
and verbs racing each other on one sandbox. Every call is answered and the
fleet ends in the state the calls imply."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import events
from supervisor import Supervisor

from .conftest import Dirs, requires_root
from .supervising import fleet, request, run, wait_event

pytestmark = requires_root

N = 50


async def ok(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """The result of a request that must succeed."""
    msg = await request(path, method, params)
    assert msg["ok"], (method, params, msg)
    return msg["result"]


def test_fifty_clients_against_fifty_sandboxes(dirs: Dirs) -> None:
    f = fleet({"name": "s", "command": "exec sleep 1000", "replicas": N})

    async def body(sup: Supervisor) -> None:
        for i in range(N):

            def is_started(e: events.Event, i: int = i) -> bool:
                return isinstance(e, events.Started) and e.instance == i

            await wait_event(sup, is_started)
        path = str(dirs.run / "control.sock")
        answered: list[str] = []

        async def client(i: int) -> None:
            name = f"s-{i}"
            # Everything a client may do, in an order that must succeed.
            assert len(await ok(path, "ps")) == N
            assert (await ok(path, "inspect", {"name": name}))["state"] == "running"
            assert (await ok(path, "pause", {"name": name}))[0]["state"] == "paused"
            (stats,) = await ok(path, "stats", {"names": [name]})
            assert stats["state"] == "paused" and stats["pids_current"] >= 1
            assert (await ok(path, "resume", {"name": name}))[0]["state"] == "running"
            with open("/dev/null", "r+b") as null:
                fds = [null.fileno()] * 3
                exec_params = {"name": name, "argv": ["sh", "-c", "exit 3"]}
                assert (await request(path, "exec", exec_params, fds))["result"] == {"status": 3}
            (row,) = await ok(path, "restart", {"name": name, "timeout": 5})
            assert row["state"] == "running" and row["generation"] == 1
            assert (await ok(path, "stop", {"name": name, "timeout": 5}))[0]["state"] == "stopped"
            (row,) = await ok(path, "start", {"name": name})
            assert row["state"] == "running" and row["generation"] == 2
            answered.append(name)

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for i in range(N):
                    nursery.start_soon(client, i)
        assert sorted(answered) == sorted(f"s-{i}" for i in range(N))
        rows = await ok(path, "ps")
        assert {(r["state"], r["generation"]) for r in rows} == {("running", 2)}
        for inst in sup.instances:
            assert inst.busy is None and not inst.execs

    evs = run(f, dirs, body)
    for i in range(N):
        kinds = [e.kind for e in evs if e.sandbox == f"s-{i}"]
        assert kinds[:16] == [
            "created", "started", "paused", "resumed", "exec_started", "exec_exited",
            "stopping", "exited", "stopped", "created", "started",
            "stopping", "exited", "stopped", "created", "started",
        ], kinds  # fmt: skip


def test_racing_verbs_on_one_sandbox_get_one_answer_each(dirs: Dirs) -> None:
    f = fleet({"name": "s", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = str(dirs.run / "control.sock")
        answers: list[dict[str, Any]] = []

        async def one(method: str) -> None:
            answers.append(await request(path, method, {"name": "s-0"}))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one, "pause")
        # One pause wins; the others are refused by the state machine.
        assert sum(a["ok"] for a in answers) == 1
        refused = [a["error"] for a in answers if not a["ok"]]
        assert {e["code"] for e in refused} == {"wrong_state"}
        inst = sup.instance("s-0")
        assert inst is not None and inst.state == "paused"

        answers.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "resume")
            nursery.start_soon(one, "stop")
            nursery.start_soon(one, "resume")
        assert len(answers) == 3
        # Whatever the order, it ends stopped, never stuck frozen.
        assert inst.state == "stopped"
        assert inst.sandbox is None

    evs = run(f, dirs, body)
    assert [e.kind for e in evs if e.sandbox == "s-0"].count("paused") == 1


@pytest.mark.parametrize("verb", ["stop", "restart", "rm"])
def test_a_verb_during_a_pause_never_leaves_a_frozen_sandbox(dirs: Dirs, verb: str) -> None:
    f = fleet({"name": "s", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = str(dirs.run / "control.sock")
        async with trio.open_nursery() as nursery:
            # The pause may win or be refused (stopping); the other verb works.
            nursery.start_soon(request, path, "pause", {"name": "s-0"})
            nursery.start_soon(ok, path, verb, {"name": "s-0", "timeout": 5})
        inst = sup.instance("s-0")
        if verb == "restart":
            assert inst is not None and inst.state in ("running", "paused")
            if inst.state == "paused":
                await ok(path, "resume", {"name": "s-0"})
            assert inst.sandbox is not None
        elif verb == "stop":
            assert inst is not None and inst.state == "stopped"
        else:
            assert inst is None

    run(f, dirs, body)
