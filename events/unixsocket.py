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
- :class:`ConnectionSlots` bounds how many connections are served at once,
  counting *privileged* peers (:func:`peer_privileged`: root and the
  server's own user) apart from everyone else, so that other users filling
  their places can never lock root out.
- :func:`unbind_socket` closes the listening socket and removes its file,
  unless another server has replaced it since.

Imports trio (the sockets are trio sockets); ``import events`` does not
import this module.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import stat
import struct

import trio

from ._errors import SocketError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_PRIVILEGED_CONNECTIONS",
    "ConnectionSlots",
    "Slot",
    "bind_socket",
    "peer_allowed",
    "peer_privileged",
    "unbind_socket",
]

MAX_CONNECTIONS = 128
"""Connections served at once to peers that are not privileged (the group's
members): one more is refused."""
MAX_PRIVILEGED_CONNECTIONS = 1024
"""Connections served at once to privileged peers (root, the server's own
user), counted apart from the others'. A bound still, so that a runaway
script of root's cannot use up the server's descriptors; far above what the
others get, as root's clients are the administrator's own."""

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_SUN_PATH_MAX = 107  # bytes of a socket's path (sun_path, its NUL aside)


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
    # Bound and listening under a name of its own, then renamed into place:
    # a client that finds *path* can connect (between bind and listen it
    # would be refused, and take a live server for a dead one).
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}")
    if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
        tmp = path  # no room for the longer name: bound in place
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if tmp != path:
                os.unlink(tmp)  # a crashed predecessor's, with our PID
        await sock.bind(tmp)
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, -1, group)
        sock.listen(128)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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


def _peer_ids(sock: trio.socket.SocketType | socket.socket) -> tuple[int, int]:
    """The uid and gid of the peer when it connected (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, gid = struct.unpack("3i", creds)
    return uid, gid


def peer_privileged(sock: trio.socket.SocketType | socket.socket) -> bool:
    """Whether the peer of the connected *sock* is root or the server's own
    effective user (as it was when it connected)."""
    return _peer_ids(sock)[0] in (0, os.geteuid())


def peer_allowed(sock: trio.socket.SocketType | socket.socket, group: int | None) -> bool:
    """Whether the peer of the connected *sock* may talk to this server.

    Admitted: root, the server's own effective user, or, with *group*, a
    process whose primary or supplementary groups included *group* when it
    connected.
    """
    uid, gid = _peer_ids(sock)
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


class Slot:
    """One connection's place in a :class:`ConnectionSlots`; given back by
    :meth:`release` or at the end of a ``with`` block (once, however often
    it is called)."""

    def __init__(self, slots: ConnectionSlots, privileged: bool) -> None:
        self._slots: ConnectionSlots | None = slots
        self.privileged = privileged
        """Whether the place is one of the privileged peers'."""

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if self._slots is not None:
            self._slots._live[self.privileged] -= 1
            self._slots = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ConnectionSlots:
    """How many connections a server serves at once: at most *limit* to
    peers that are not privileged, and separately at most *privileged_limit*
    to privileged ones (:func:`peer_privileged`).

    The two are counted apart so that members of the socket's group, however
    many connections they hold, never take root's places: root can always
    connect to see what is going on and stop it. Counting is per server (one
    :class:`ConnectionSlots` each), synchronous, and needs no lock: the
    servers are trio tasks on one thread.
    """

    def __init__(
        self, limit: int = MAX_CONNECTIONS, privileged_limit: int = MAX_PRIVILEGED_CONNECTIONS
    ) -> None:
        if limit < 1 or privileged_limit < 1:
            raise ValueError(f"limits must be at least 1, got {limit} and {privileged_limit}")
        self.limit = limit
        self.privileged_limit = privileged_limit
        # Live connections: [others, privileged] (indexed by the bool).
        self._live = [0, 0]

    def live(self, privileged: bool) -> int:
        """Connections holding a place of that class now."""
        return self._live[privileged]

    def take(self, privileged: bool) -> Slot | None:
        """A place for one more connection of that class, or None if the
        class is full (the caller refuses the connection)."""
        bound = self.privileged_limit if privileged else self.limit
        if self._live[privileged] >= bound:
            return None
        self._live[privileged] += 1
        return Slot(self, privileged)

    def busy_message(self, privileged: bool) -> str:
        """One line for a refused connection of that class."""
        if privileged:
            return (
                f"{self.privileged_limit} connections of root and the server's user are open;"
                " try again when one closes"
            )
        return (
            f"{self.limit} connections of users other than root are open; try again when one closes"
        )
