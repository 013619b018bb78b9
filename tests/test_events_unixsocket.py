"""The Unix-socket helpers both servers use (events.unixsocket): binding, unbinding, admission."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from events import SocketError
from events.unixsocket import (
    ConnectionSlots,
    bind_socket,
    peer_allowed,
    peer_privileged,
    unbind_socket,
)

_CONNECT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)"
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory (socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="corral-us-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_bind_replaces_a_stale_socket_and_refuses_a_live_one(sock_dir: Path) -> None:
    """A socket file nobody listens on is replaced; a live one is a SocketError naming the service."""
    path = str(sock_dir / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()

    async def main() -> None:
        sock = await bind_socket(path, None, 0o640, what="things")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with pytest.raises(SocketError, match=f"cannot serve things at {path}: another server"):
            await bind_socket(path, None, 0o640, what="things")
        unbind_socket(sock, path, os.stat(path).st_ino)
        assert not os.path.exists(path)

    trio.run(main)


def test_bind_refuses_to_remove_what_is_not_a_socket(sock_dir: Path) -> None:
    """A plain file at the path is left alone."""
    path = sock_dir / "s.sock"
    path.write_text("data")
    with pytest.raises(SocketError, match="it exists and is not a socket"):
        trio.run(lambda: bind_socket(str(path), None, 0o660, what="control"))
    assert path.read_text() == "data"


def test_unbind_leaves_a_newer_servers_file(sock_dir: Path) -> None:
    """Only the file this server bound is removed; unbinding twice is harmless."""
    path = str(sock_dir / "s.sock")

    async def main() -> None:
        old = await bind_socket(path, None, 0o660, what="things")
        ino = os.stat(path).st_ino
        os.unlink(path)
        newer = await bind_socket(path, None, 0o660, what="things")
        unbind_socket(old, path, ino)
        assert os.path.exists(path)
        unbind_socket(old, path, ino)
        unbind_socket(newer, path, os.stat(path).st_ino)
        assert not os.path.exists(path)

    trio.run(main)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_peer_allowed_by_the_credentials_at_connect(sock_dir: Path) -> None:
    """Root and members of the group (primary or supplementary) are admitted,
    others not; only root (here the server's user too) is privileged."""
    os.chmod(sock_dir, 0o755)
    path = str(sock_dir / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o666)
    server.listen(1)
    server.settimeout(30)  # a client that cannot connect fails the test, not hangs it

    def admitted(socket_group: int | None, **ids: object) -> tuple[bool, bool]:
        """(allowed, privileged) for a client started with *ids*."""
        client = subprocess.Popen([sys.executable, "-c", _CONNECT, path], **ids)  # type: ignore[call-overload]
        try:
            conn, _ = server.accept()
            with conn:
                return peer_allowed(conn, socket_group), peer_privileged(conn)
        finally:
            client.wait(timeout=30)

    with server:
        assert admitted(None) == (True, True)  # root
        assert admitted(None, user=65534, group=65534, extra_groups=[]) == (False, False)
        assert admitted(4242, user=65534, group=65534, extra_groups=[]) == (False, False)
        assert admitted(4242, user=65534, group=4242, extra_groups=[]) == (True, False)
        assert admitted(4242, user=65534, group=65534, extra_groups=[4242]) == (True, False)
        # Root's groups do not make a member privileged, nor gid 0.
        assert admitted(4242, user=65534, group=0, extra_groups=[4242]) == (True, False)


def test_connection_slots_count_each_class_apart() -> None:
    """Each class is refused past its own bound, whatever the other holds;
    a place given back (once, however often released) is free again."""
    slots = ConnectionSlots(limit=2, privileged_limit=3)
    others = [slots.take(False), slots.take(False)]
    assert None not in others and slots.take(False) is None
    root = [slots.take(True) for _ in range(3)]
    assert None not in root and slots.take(True) is None
    assert (slots.live(False), slots.live(True)) == (2, 3)
    first = others[0]
    assert first is not None
    first.release()
    first.release()
    assert slots.live(False) == 1
    with slots.take(False) as again:  # type: ignore[union-attr]
        assert not again.privileged and slots.live(False) == 2
    assert (slots.live(False), slots.live(True)) == (1, 3)
    assert slots.busy_message(False).startswith("2 connections of users other than root")
    assert slots.busy_message(True).startswith("3 connections of root")
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionSlots(limit=0)


def test_the_socket_file_appears_only_once_it_is_listening(sock_dir: Path) -> None:
    """bind_socket listens under a name of its own and renames it into
    place: whoever finds the path can connect (a path bound but not yet
    listening refused connections, and a benchmark that waited for the
    file took the starting supervisor for a dead one). With no room for the
    longer name the socket is bound in place; nothing else is left."""

    async def main() -> None:
        for name in ("s.sock", "x" * (107 - len(str(sock_dir)) - 1)):
            path = str(sock_dir / name)
            assert len(os.fsencode(path)) <= 107
            sock = await bind_socket(path, None, 0o600, what="things")
            try:
                assert os.listdir(sock_dir) == [name]
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(path)
            finally:
                unbind_socket(sock, path, os.stat(path).st_ino)
            assert os.listdir(sock_dir) == []

    trio.run(main)
