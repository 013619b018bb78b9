"""The control socket: requests, typed errors, bad input, who may connect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import msgpack
import pytest
import trio

import events
from supervisor import Supervisor
from supervisor._control_client import ControlError, call

from .conftest import Dirs, requires_root
from .supervising import fleet, run, wait_event

pytestmark = requires_root


def _sock(dirs: Dirs) -> str:
    return str(dirs.run / "control.sock")


def _raw(path: str, data: bytes) -> list[object]:
    """Send raw bytes, half-close, read every answer until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the server answered and closed early (too large)
        unpacker = msgpack.Unpacker(raw=False)
        try:
            while chunk := s.recv(65536):
                unpacker.feed(chunk)
        except ConnectionResetError:
            pass
        return list(unpacker)


def test_requests_and_typed_errors(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)

        def check() -> None:
            assert call(path, "ping") == {"pid": os.getpid()}
            with pytest.raises(ControlError) as err:
                call(path, "frobnicate")
            assert err.value.code == "unknown_method"
            assert str(err.value) == "unknown method 'frobnicate'"
            with pytest.raises(ControlError) as err:
                call(path, "checkpoint", {"name": "nope"})
            assert err.value.code == "invalid"
            assert str(err.value) == "name: no sandbox instance 'nope' in this fleet"
            with pytest.raises(ControlError) as err:
                call(path, "checkpoint", {"name": 5})
            assert err.value.code == "invalid" and "name: expected a string" in str(err.value)
            assert call(path, "checkpoints") == []

        await trio.to_thread.run_sync(check)

    run(f, dirs, body)


def test_bad_input_is_answered_or_dropped_and_others_carry_on(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)

        def check() -> None:
            # Several requests in one write, answered by id; wrong shapes typed.
            answers = _raw(
                path,
                msgpack.packb({"id": 1, "method": "ping"})
                + msgpack.packb({"id": "x", "method": "ping"})
                + msgpack.packb([1, 2, 3])
                + msgpack.packb({"id": 4, "method": "ping", "params": [1]}),
            )
            by_id = {a["id"]: a for a in answers}  # type: ignore[index]
            assert by_id[1]["ok"] is True
            assert by_id[4]["error"]["code"] == "invalid"
            assert sum(1 for a in answers if not a["ok"]) == 3  # type: ignore[index]
            # Garbage: one answer without an id, then the connection closes.
            (answer,) = _raw(path, b"\xc1" * 10)
            assert answer["id"] is None and answer["error"]["code"] == "invalid"  # type: ignore[index]
            # Oversized: dropped.
            big = msgpack.packb({"id": 1, "method": "ping", "params": {"x": "y" * (2 << 20)}})
            (answer,) = _raw(path, big)
            assert answer["error"]["message"] == "request too large"  # type: ignore[index]
            # A client that connects and never reads or writes harms nobody.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
                idle.connect(path)
                assert call(path, "ping")["pid"] == os.getpid()

        await trio.to_thread.run_sync(check)
        inst = sup.instance("web-0")
        assert inst is not None and inst.state == "running"

    run(f, dirs, body)


def test_a_peer_that_is_not_root_nor_in_the_group_is_refused(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)
        # Open the file modes wide, so only SO_PEERCRED can refuse.
        for d in (dirs.run.parent, dirs.run):
            os.chmod(d, 0o755)
        os.chmod(path, 0o666)
        code = (
            "import sys; from supervisor._control_client import call, ControlError\n"
            "try:\n call(sys.argv[1], 'ping')\n"
            "except ControlError as e:\n print(e.code, e)\n"
        )
        r = await trio.run_process(
            [sys.executable, "-c", code, path],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert r.stdout.decode().strip() == "forbidden permission denied", r.stderr

    run(f, dirs, body)


def test_a_stale_socket_file_is_replaced(dirs: Dirs) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(_sock(dirs))
    stale.close()  # the file stays, nobody listens
    f = fleet({"name": "web", "command": "exec sleep 1000"})

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert (await trio.to_thread.run_sync(call, _sock(dirs), "ping"))["pid"] == os.getpid()

    run(f, dirs, body)
    assert not os.path.exists(_sock(dirs))


def test_cli_without_a_supervisor_says_so(dirs: Dirs) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "checkpoint", "web"],
        env=dirs.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 125
    assert r.stderr.splitlines()[-1] == (
        f"corral: no supervisor at {dirs.run}/control.sock (is `corral up` running? see --socket)"
    )
