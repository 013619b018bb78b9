"""The control socket: requests, typed errors, bad input, who may connect."""

from __future__ import annotations

import array
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio

import events
from supervisor import Supervisor
from supervisor._control._client import ControlError, call
from supervisor._control._server import MAX_CONNECTIONS, MAX_FDS, MAX_PRIVILEGED_CONNECTIONS

from .conftest import Dirs, corral, requires_root
from .helpers import wait_for
from .supervising import fleet, run, wait_event

pytestmark = requires_root


def _sock(dirs: Dirs) -> str:
    return str(dirs.run / "control.sock")


def _raw(path: str, data: bytes) -> list[Any]:
    """Send raw bytes, half-close, read every answer until the server closes."""
    # Any: decoded msgpack is whatever the server sent; the tests check its shape.
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


_CALL_AS_NOBODY = (
    "import sys; from supervisor._control._client import ControlError, call\n"
    "try:\n    print(call(sys.argv[1], sys.argv[2]))\n"
    "except ControlError as exc:\n    print(exc.code, exc)\n"
)


async def _call_as_nobody(dirs: Dirs, method: str, groups: Sequence[int] = ()) -> str:
    """*method* called on the control socket by user nobody (in *groups*
    too): what it printed, the result or ``CODE message``."""
    for d in (dirs.run.parent, dirs.run):
        os.chmod(d, 0o755)
    r = await trio.run_process(
        [sys.executable, "-c", _CALL_AS_NOBODY, _sock(dirs), method],
        user=65534,
        group=65534,
        extra_groups=list(groups),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert not r.stderr, r.stderr.decode()
    return r.stdout.decode().strip()


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
            by_id = {a["id"]: a for a in answers}
            assert by_id[1]["ok"] is True
            assert by_id[4]["error"]["code"] == "invalid"
            assert sum(1 for a in answers if not a["ok"]) == 3
            # Garbage: one answer without an id, then the connection closes.
            (answer,) = _raw(path, b"\xc1" * 10)
            assert answer["id"] is None and answer["error"]["code"] == "invalid"
            # Oversized: dropped.
            big = msgpack.packb({"id": 1, "method": "ping", "params": {"x": "y" * (2 << 20)}})
            (answer,) = _raw(path, big)
            assert answer["error"]["message"] == "request too large"
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
        # Open the file modes wide, so only SO_PEERCRED can refuse.
        os.chmod(_sock(dirs), 0o666)
        assert await _call_as_nobody(dirs, "ping") == "forbidden permission denied"

    run(f, dirs, body)


def test_hostile_clients_are_dropped_and_bounded(dirs: Dirs) -> None:
    """Truncated frames, random bytes, descriptor floods, too many
    connections, a client that never reads: each gets an error or is
    dropped; the fleet, the supervisor and other clients carry on."""
    # A long idle bound: held connections must not be closed for idling
    # (and give their places back) while the test fills the bound.
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_idle_timeout="10m")

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)

        def check() -> None:
            ping = msgpack.packb({"id": 1, "method": "ping"})
            # Connections beyond the bound are told so and closed: root has
            # a bound of its own (the group's is tested below). First, while
            # no connection of a client that left may still hold a place:
            # the server learns of a close only when it next reads or writes.
            held = []
            try:
                codes = []
                for _ in range(MAX_PRIVILEGED_CONNECTIONS + 1):
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    held.append(c)
                    c.connect(path)  # blocking: waits for room in the listen backlog
                    c.settimeout(30)
                    # Answered before the next connects: each one served
                    # holds its place, so only the last can be refused.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        c.sendall(ping)  # a refused one was answered and closed
                    answer = msgpack.unpackb(c.recv(65536))
                    codes.append("ok" if answer["ok"] else answer["error"]["code"])
                assert codes == ["ok"] * MAX_PRIVILEGED_CONNECTIONS + ["busy"]
            finally:
                for c in held:
                    c.close()

            def served() -> bool:
                try:
                    return bool(call(path, "ping"))
                except ControlError:
                    return False

            wait_for(served, what="the held connections to be closed")
            # A truncated frame, then end of file: no answer, closed.
            assert _raw(path, ping[:-2]) == []
            # A truncated frame that stays: others are served meanwhile.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
                stuck.connect(path)
                stuck.sendall(
                    msgpack.packb({"id": 1, "method": "ping", "params": {"x": "y" * 1000}})[:500]
                )
                assert call(path, "ping")["pid"] == os.getpid()
            # Random bytes: an answer (errors, or a lucky valid request) or a
            # dropped connection, never a dead server.
            rng = random.Random(6)
            for _ in range(200):
                for answer in _raw(path, rng.randbytes(rng.randrange(1, 2048))):
                    assert isinstance(answer, dict) and "id" in answer
            # Too many descriptors: dropped, and ours are closed.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, open("/dev/null") as null:
                s.settimeout(30)
                s.connect(path)
                fds = array.array("i", [null.fileno()] * (MAX_FDS + 1))
                s.sendmsg([ping], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                answer = msgpack.unpackb(s.recv(65536))
                assert answer["error"] == {
                    "code": "invalid",
                    "message": f"more than {MAX_FDS} descriptors",
                }
                assert s.recv(65536) == b""
            # A request that says it carries descriptors but does not.
            answers = _raw(path, msgpack.packb({"id": 3, "method": "ping", "params": {"fds": 2}}))
            assert (
                answers[0]["error"]["message"] == "fds: the request says 2 descriptors, 0 arrived"
            )
            answers = _raw(path, msgpack.packb({"id": 3, "method": "ping", "params": {"fds": "x"}}))
            assert answers[0]["error"]["code"] == "invalid"
            # Exec with a wrong number of descriptors, or wrong types.
            bad_execs: list[dict[str, Any]] = [
                {"name": "web-0", "argv": ["true"]},
                {"name": "web-0", "argv": "true", "tty": True},
                {"name": "web-0", "argv": [], "tty": True},
                {"name": "web-0", "argv": ["true"], "tty": "yes"},
                {"name": "web-0", "argv": ["true"], "tty": True, "env": {"A=B": "c"}},
            ]
            for params in bad_execs:
                with pytest.raises(ControlError) as err:
                    call(path, "exec", params)
                assert err.value.code == "invalid", params
            bad_calls: list[tuple[str, dict[str, Any]]] = [
                ("stop", {"name": "web-0", "timeout": -1}),
                ("kill", {"name": "web-0", "signal": 999}),
                ("stats", {"names": "web"}),
                ("add", {"path": 5}),
                ("exec_signal", {"exec_id": "x"}),
            ]
            for method, params in bad_calls:
                with pytest.raises(ControlError) as err:
                    call(path, method, params)
                assert err.value.code == "invalid", (method, params)
            # A client that sends and never reads: its answers back up and
            # it stops being read (64 in flight at most); others are fine.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as greedy:
                greedy.connect(path)
                greedy.setblocking(False)
                flood = msgpack.packb({"id": 1, "method": "ps"}) * 4096
                with contextlib.suppress(BlockingIOError):
                    greedy.send(flood)
                assert call(path, "ping")["pid"] == os.getpid()

        await trio.to_thread.run_sync(check)
        inst = sup.instance("web-0")
        assert inst is not None and inst.state == "running"

    evs = run(f, dirs, body)
    assert [e.kind for e in evs if e.sandbox == "web-0"] == [
        "created", "started", "stopping", "exited", "stopped",
    ]  # fmt: skip


def test_a_member_of_the_socket_group_is_admitted(dirs: Dirs) -> None:
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_group=4242)

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert "'name': 'web-0'" in await _call_as_nobody(dirs, "ps", [4242])

    run(f, dirs, body)


def test_a_member_of_the_socket_group_cannot_replace_the_supervisor(dirs: Dirs) -> None:
    """handover (what `corral up --takeover` asks) is root's: a group
    member may drive sandboxes, not end who supervises them."""
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_group=4242)

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        assert await _call_as_nobody(dirs, "handover", [4242]) == (
            "forbidden handover: only root may replace the supervisor"
        )
        assert not sup._stopping.is_set()

    evs = run(f, dirs, body)
    assert not [e for e in evs if e.kind == "supervisor_stopping" and "handed" in e.reason]  # type: ignore[attr-defined]


# Run as a member of socket_group: holds N connections, each admitted (its
# ping answered), then asks on one more; prints "OKS CODE", then keeps them
# all open until its stdin closes.
_HOLD_CONTROL = textwrap.dedent(
    """
    import socket, sys, msgpack
    path, n = sys.argv[1], int(sys.argv[2])

    def ping(s):
        try:
            s.sendall(msgpack.packb({"id": 1, "method": "ping"}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused: its answer is waiting to be read
        unpacker = msgpack.Unpacker(raw=False)
        while data := s.recv(65536):
            unpacker.feed(data)
            for answer in unpacker:
                return "ok" if answer["ok"] else answer["error"]["code"]
        return "closed"

    held, codes = [], []
    for _ in range(n + 1):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)  # blocking: waits for room in the listen backlog
        s.settimeout(30)
        held.append(s)
        codes.append(ping(s))
    print(codes[:n].count("ok"), codes[n], flush=True)
    sys.stdin.read()
    """
)


def test_root_is_served_while_the_group_holds_every_place(dirs: Dirs) -> None:
    """Members of socket_group holding all their places (idle) are told
    ``busy`` for one more; root's ping is still answered."""
    # A long idle bound: the held connections must outlast the test.
    f = fleet(
        {"name": "web", "command": "exec sleep 1000"},
        socket_group=4242,
        socket_idle_timeout="10m",
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)
        for d in (dirs.run.parent, dirs.run):
            os.chmod(d, 0o755)

        def check() -> None:
            # Leaving the block closes its stdin: it lets go and exits.
            with subprocess.Popen(
                [sys.executable, "-c", _HOLD_CONTROL, path, str(MAX_CONNECTIONS)],
                user=65534,
                group=65534,
                extra_groups=[4242],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            ) as holder:
                assert holder.stdout is not None
                assert holder.stdout.readline().split() == [str(MAX_CONNECTIONS), "busy"]
                assert call(path, "ping")["pid"] == os.getpid()

        await trio.to_thread.run_sync(check)

    run(f, dirs, body)


def _to_the_end(s: socket.socket) -> list[Any]:
    """Every message until the server closes (the socket's timeout is the deadline)."""
    unpacker = msgpack.Unpacker(raw=False)
    while chunk := s.recv(65536):
        unpacker.feed(chunk)
    return list(unpacker)


def test_an_idle_connection_is_told_so_and_closed(dirs: Dirs) -> None:
    """With nothing in flight, a connection that sends no complete request
    within socket_idle_timeout gets an ``idle`` answer and is closed: silent
    from the start, after an answer, or stalled mid-request. A request that
    runs longer than the bound keeps its connection open."""
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_idle_timeout="200ms")
    idle = {
        "id": None,
        "ok": False,
        "error": {"code": "idle", "message": "no request for 0.2s; the connection is closed"},
    }

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        path = _sock(dirs)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(path)
            return s

        def check() -> None:
            ping = msgpack.packb({"id": 1, "method": "ping"})
            with connect() as silent:
                assert _to_the_end(silent) == [idle]
            with connect() as done:
                done.sendall(ping)
                answer, *rest = _to_the_end(done)
                assert answer["ok"] is True and rest == [idle]
            with connect() as stalled:
                stalled.sendall(ping[:-2])
                assert _to_the_end(stalled) == [idle]
            # An exec of cat waits for its input: its connection has a
            # request in flight, and is kept while a later connection,
            # made once it had started, is closed for idling.
            stdin_r, stdin_w = os.pipe()
            out_r, out_w = os.pipe()
            with connect() as running:
                request = {
                    "id": 2,
                    "method": "exec",
                    "params": {"name": "web-0", "argv": ["cat"], "fds": 3},
                }
                fds = array.array("i", [stdin_r, out_w, out_w])
                running.sendmsg(
                    [msgpack.packb(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                )
                for fd in (stdin_r, out_w):
                    os.close(fd)
                unpacker = msgpack.Unpacker(raw=False)
                while not (got := list(unpacker)):
                    data = running.recv(65536)
                    assert data, "closed before the exec started"
                    unpacker.feed(data)
                assert "progress" in got[0], got
                with connect() as later:
                    assert _to_the_end(later) == [idle]
                os.write(stdin_w, b"still here\n")
                os.close(stdin_w)
                with os.fdopen(out_r, "rb") as out:
                    assert out.read() == b"still here\n"
                answers = got[1:] + _to_the_end(running)
                assert answers == [{"id": 2, "ok": True, "result": {"status": 0}}, idle]

        await trio.to_thread.run_sync(check)

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


# -- what a member of socket_group may add: [supervisor] socket_policy ------------

_ADD_AS_NOBODY = (
    "import os, sys; from supervisor._control._client import Client, ControlError\n"
    "fds = [os.open(sys.argv[2], os.O_RDONLY)] if sys.argv[3] == 'fd' else []\n"
    "try:\n"
    "    with Client(sys.argv[1]) as c:\n"
    "        rows = c.answer(c.request('add', {'path': sys.argv[2]}, fds=fds))\n"
    "    print('ok', *[r['name'] for r in rows])\n"
    "except ControlError as exc:\n    print(exc.code, exc)\n"
)


async def _add_as_nobody(dirs: Dirs, doc: str, *, fd: bool = True) -> str:
    """A fleet file *doc* added by user nobody in group 4242 (passing the
    file open unless not *fd*): ``ok NAMES`` or ``CODE message``."""
    for d in (dirs.run.parent, dirs.run):
        os.chmod(d, 0o755)
    files = dirs.run.parent / "added"
    files.mkdir(mode=0o755, exist_ok=True)
    path = files / f"add-{len(list(files.iterdir()))}.toml"
    path.write_text(doc)
    path.chmod(0o644)
    r = await trio.run_process(
        [sys.executable, "-c", _ADD_AS_NOBODY, _sock(dirs), str(path), "fd" if fd else "path"],
        user=65534,
        group=65534,
        extra_groups=[4242],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert not r.stderr, r.stderr.decode()
    return r.stdout.decode().strip()


def _entry(name: str, extra: str = "") -> str:
    return f'[[sandbox]]\nname = "{name}"\ncommand = "exec sleep 1000"\n{extra}\n'


def test_the_socket_policy_holds_what_a_group_member_adds(dirs: Dirs, tmp_path: Path) -> None:
    """By default a member of socket_group adds only sandboxes without
    more power than the defaults: privileged, added capabilities, the host
    network, host paths, unconfined and chosen host ids are each refused
    as forbidden in one line naming the key and the rule; an ordinary one
    is added; root adds what it likes."""
    f = fleet({"name": "web", "command": "exec sleep 1000"}, socket_group=4242)
    refused = {
        "privileged = true": "privileged: forbidden to members of socket_group by"
        " [supervisor] socket_policy: privileged sandboxes",
        'cap_add = ["ALL"]': "cap_add: forbidden to members of socket_group by"
        " [supervisor] socket_policy: adding ALL",
        'network = "host"': "network: forbidden to members of socket_group by"
        " [supervisor] socket_policy: the host network",
        'volumes = ["/:/host"]': "volumes: /: forbidden to members of socket_group by"
        " [supervisor] socket_policy: host paths outside its volume_roots (none)",
        'rootfs = "/"': "rootfs: forbidden",
        'seccomp = "unconfined"': "seccomp: forbidden",
        "no_new_privs = false": "no_new_privs: forbidden",
        "userns = true\nuserns_base = 200000": "userns_base: forbidden",
        "userns = false": "userns: forbidden to members of socket_group by [supervisor]"
        " socket_policy: the host root as the sandbox root (userns = false)",
    }

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        for i, (line, why) in enumerate(refused.items()):
            out = await _add_as_nobody(dirs, _entry(f"bad{i}", line))
            assert out.startswith("forbidden "), out
            assert f"sandbox 'bad{i}': {why}" in out, out
            assert sup.instance(f"bad{i}-0") is None
        # Not passed open: the supervisor will not read it for the member.
        out = await _add_as_nobody(dirs, _entry("plain0"), fd=False)
        assert out == (
            "forbidden add: a member of socket_group passes the fleet file open, as a"
            " descriptor (corral add does)"
        )
        assert await _add_as_nobody(dirs, _entry("plain")) == "ok plain-0"
        doc = tmp_path / "root.toml"
        doc.write_text(_entry("root", 'cap_add = ["NET_ADMIN"]\nnetwork = "host"'))
        p = await trio.to_thread.run_sync(lambda: corral(dirs, "add", str(doc)))
        assert p.returncode == 0, p.stderr

    run(f, dirs, body)


def test_a_socket_policy_lets_members_have_what_it_names(dirs: Dirs, tmp_path: Path) -> None:
    """socket_policy = { cap_add = ["NET_ADMIN"], volume_roots = [ROOT],
    root_mapped = true }: a member may keep NET_ADMIN, mount what is below
    ROOT and add a root-mapped sandbox; a link from below ROOT to outside
    it is judged by where it leads."""
    root = tmp_path / "shared"
    (root / "data").mkdir(parents=True)
    (root / "out").symlink_to("/etc")
    for d in (tmp_path, root, root / "data"):
        os.chmod(d, 0o755)
    f = fleet(
        {"name": "web", "command": "exec sleep 1000"},
        socket_group=4242,
        socket_policy={"cap_add": ["NET_ADMIN"], "volume_roots": [str(root)], "root_mapped": True},
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        ok = _entry("ok", f'cap_add = ["NET_ADMIN"]\nvolumes = ["{root}/data:/data"]')
        assert await _add_as_nobody(dirs, ok) == "ok ok-0"
        assert await _add_as_nobody(dirs, _entry("mapped", "userns = false")) == "ok mapped-0"
        out = await _add_as_nobody(dirs, _entry("out", f'volumes = ["{root}/out:/x"]'))
        assert out.startswith("forbidden ") and "volumes: " in out and str(root) in out, out
        out = await _add_as_nobody(dirs, _entry("caps", 'cap_add = ["SYS_ADMIN"]'))
        assert "cap_add: forbidden to members of socket_group" in out, out

    run(f, dirs, body)


def test_bad_socket_policies_are_one_line_each() -> None:
    from supervisor._core._fleet import FleetError, parse_fleet

    for policy, expected in (
        ({"caps": 1}, "socket_policy.caps: unknown key"),
        ({"privileged": "yes"}, "socket_policy.privileged: expected true or false"),
        ({"cap_add": ["FLY"]}, "socket_policy.cap_add: expected capability names"),
        ({"volume_roots": ["srv"]}, "socket_policy.volume_roots: expected a list of absolute"),
        ("none", "socket_policy: expected a table"),
    ):
        doc = {"supervisor": {"socket_policy": policy}, "sandbox": [{"name": "w", "command": "x"}]}
        with pytest.raises(FleetError, match=f"supervisor: {re.escape(expected)}"):
            parse_fleet(doc)
