"""Serving on a Unix stream socket: binding, admitting peers, unbinding.

What the event socket (:func:`events.serve_events`) and the supervisor's
control socket share, so that both treat their socket file and their peers
the same way:

- :func:`bind_socket` listens at a path, replacing a *stale* socket file
  (one nobody listens on any more: a crashed server's) but refusing to
  take over from a live server or to remove anything that is not a socket.
  The file gets a mode and, optionally, a group (its owner is the server's
  user).
- :func:`peer_allowed` admits a connected peer by its credentials as the
  kernel recorded them at ``connect()`` (``SO_PEERCRED``,
  ``SO_PEERGROUPS``): root, the server's own user, or a member of the
  group. File modes alone are not trusted: a socket file may be reached
  through a descriptor or a bind mount.
- :func:`unbind_socket` closes the listening socket and removes its file,
  unless another server has replaced it since.

Imports trio (the sockets are trio sockets); ``import events`` does not
import this module.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import stat
import struct

import trio

from ._errors import SocketError

__all__ = ["bind_socket", "peer_allowed", "unbind_socket"]

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


async def bind_socket(
    path: str, group: int | None, mode: int, *, what: str
) -> trio.socket.SocketType:
    """Listen on a Unix stream socket at *path* with *mode* and *group*.

    A stale socket file at *path* is replaced; a live one (a server answers
    there) or a file that is not a socket is a :class:`SocketError`, as is
    any failure to bind. *what* names the service in messages (``"cannot
    serve events at PATH: ..."``). The file's owner is left as it is (root,
    when the server runs as root); with *group* its group is set. The
    backlog is 128.
    """
    _remove_stale(path, what)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot serve {what} at {path}: {exc}") from exc
    return sock


def unbind_socket(sock: trio.socket.SocketType, path: str, ino: int) -> None:
    """Close the listening socket and remove its file (idempotent).

    *ino* is the inode of the file :func:`bind_socket` made (``os.stat``
    right after it): the file is removed only if it is still that one, as a
    newer server may have replaced it already.
    """
    sock.close()
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"cannot serve {what} at {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # A Unix connect does not wait: it succeeds, is refused (nobody
        # listens: stale) or finds the backlog full (EAGAIN: alive).
        probe.setblocking(False)
        err = probe.connect_ex(path)
    if err in (0, errno.EAGAIN):
        raise SocketError(f"cannot serve {what} at {path}: another server is listening there")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def peer_allowed(sock: trio.socket.SocketType | socket.socket, group: int | None) -> bool:
    """Whether the peer of the connected *sock* may talk to this server.

    Admitted: root, the server's own effective user, or, with *group*, a
    process whose primary or supplementary groups included *group* when it
    connected.
    """
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, gid = struct.unpack("3i", creds)
    if uid in (0, os.geteuid()):
        return True
    if group is None:
        return False
    if gid == group:
        return True
    # The supplementary groups the peer had when it connected, from the
    # kernel (SO_PEERGROUPS): never /proc/PID, whose PID may be reused.
    size = 4 * 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 4 * 65536:
                size *= 16
                continue
            return False
        return group in array.array("I", raw[: len(raw) - len(raw) % 4])
