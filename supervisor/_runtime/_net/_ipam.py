"""Addresses of corral's networks, leased to sandboxes and kept on disk.

``STATE_DIR/network/``::

    lock                taken while any network is set up or torn down
    NET/config.json     the network: bridge, subnet, gateway, and whether
                        the subnet was declared or chosen
    NET/leases/ADDRESS  one lease: the sandbox it belongs to (JSON)

One lock for every network: corral's nftables table and the forwarding
switch are the host's, written from the leases of all of them.

A lease is made whole or not at all: written to a temporary file, then
``link``-ed to its address's name, which fails if the address is taken. So
two sandboxes never get one address, and a crash leaves a whole lease (of
a sandbox that is gone: the start-up sweep removes it) or none. Leases
outlive the supervisor, so a sandbox taken back keeps its address.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator

from ..._errors import SandboxError
from .._records import write_atomic

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from .._tuples import NamedTuple

if TYPE_CHECKING:
    import ipaddress

__all__ = ["Lease", "NetworkDir", "known_networks", "locked", "mac_of"]


class Lease(NamedTuple):
    """One address of the network, held by one sandbox."""

    address: str
    sandbox: str
    prefix: int
    gateway: str
    mac: str
    ports: tuple[tuple[str | None, int, int, str], ...] = ()
    """Its published ports: (host IP or None, host port, port, protocol)."""
    egress: tuple[str, ...] | None = None
    """Where it may connect to (None: anywhere; see ``parse_egress``): host
    names are resolved to addresses when the lease is made."""
    address6: str | None = None
    """On a network with IPv6: its IPv6 address, the IPv4 address's place
    in the subnet at the same place in the IPv6 prefix (not in the lease's
    file: it follows from the address and the network's settings)."""
    prefix6: int = 0
    gateway6: str | None = None


def mac_of(address: str) -> str:
    """A stable, locally administered MAC for *address* (``02:c0:`` and its
    four bytes): the same address always has the same MAC, so peers' ARP
    caches stay right across restarts."""
    import ipaddress

    octets = ipaddress.IPv4Address(address).packed
    return "02:c0:" + ":".join(f"{b:02x}" for b in octets)


@contextlib.contextmanager
def locked(state_dir: str) -> Iterator[int]:
    """Hold the lock of every network of *state_dir* (set-ups and
    tear-downs take turns); yields its descriptor, which a child that must
    finish its work before the next holder starts (``nft``) inherits: a
    lock on an open file is held while any process has it open, so a
    killed holder's ``nft`` still holds it until it is done."""
    root = os.path.join(state_dir, "network")
    os.makedirs(root, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def known_networks(state_dir: str) -> list[str]:
    """The networks *state_dir* has settings of (used or declared once)."""
    root = os.path.join(state_dir, "network")
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if os.path.exists(os.path.join(root, n, "config.json"))]


class NetworkDir:
    """The on-disk state of one network (see the module's docstring)."""

    def __init__(self, state_dir: str, name: str) -> None:
        self.name = name
        self.path = os.path.join(state_dir, "network", name)
        self.leases_dir = os.path.join(self.path, "leases")

    def config(self) -> dict[str, str] | None:
        """The network's recorded settings, or None before its first use."""
        try:
            with open(os.path.join(self.path, "config.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SandboxError(
                f"network {self.name!r}: cannot read its config.json: {exc}"
            ) from exc
        return {str(k): str(v) for k, v in data.items()}

    def save_config(self, config: dict[str, str]) -> None:
        """Record the network's settings (atomically)."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        write_atomic(os.path.join(self.path, "config.json"), json.dumps(config, indent=1))

    def lease(
        self,
        sandbox: str,
        subnet: str,
        gateway: str,
        ports: tuple[tuple[str | None, int, int, str], ...] = (),
        egress: tuple[str, ...] | None = None,
        address: str | None = None,
        gone: Callable[[str], bool] | None = None,
    ) -> Lease:
        """A free address of *subnet* for *sandbox*, leased (see the module);
        *address* if given (a restored sandbox's: its connections are bound
        to it), refused in one line if it is another sandbox's, unless
        *gone* says that sandbox has ended (its removal, which gives the
        lease back, may come after the restore of its checkpoint)."""
        import ipaddress

        net = ipaddress.IPv4Network(subnet)
        if address is not None:
            return self._lease_one(sandbox, net, gateway, ports, egress, address, gone)
        taken = set(self._names())
        os.makedirs(self.leases_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.leases_dir, f".{sandbox}.{os.getpid()}.tmp")
        # The hosts by number, not a list of them: a /16 has 65,534.
        first, count = int(net.network_address) + 1, net.num_addresses - 2
        # Round-robin from after the last address handed out: one given back
        # is not handed out again before its veth is gone with its sandbox.
        start = self._next() % count
        for n in range(count):
            index = (start + n) % count
            address = str(ipaddress.IPv4Address(first + index))
            if address == gateway or address in taken:
                continue
            lease = Lease(address, sandbox, net.prefixlen, gateway, mac_of(address), ports, egress)
            with open(tmp, "w") as f:
                json.dump(lease._asdict(), f)
            try:
                os.link(tmp, os.path.join(self.leases_dir, address))
            except FileExistsError:
                continue  # taken meanwhile by another supervisor's sandbox
            finally:
                os.unlink(tmp)
            write_atomic(os.path.join(self.path, "next"), str(index + 1))
            return lease
        raise SandboxError(
            f"network {self.name!r}: no free address in {subnet} ({len(taken)} leased)"
        )

    def _lease_one(
        self,
        sandbox: str,
        net: ipaddress.IPv4Network,
        gateway: str,
        ports: tuple[tuple[str | None, int, int, str], ...],
        egress: tuple[str, ...] | None,
        address: str,
        gone: Callable[[str], bool] | None,
    ) -> Lease:
        import ipaddress

        if ipaddress.IPv4Address(address) not in net or address == gateway:
            raise SandboxError(
                f"network {self.name!r}: the address {address} is not one of {net}'s"
                " sandbox addresses (was the network's subnet changed?)"
            )
        lease = Lease(address, sandbox, net.prefixlen, gateway, mac_of(address), ports, egress)
        tmp = os.path.join(self.leases_dir, f".{sandbox}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(lease._asdict(), f)
        path = os.path.join(self.leases_dir, address)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                holder = self._read(address)
                if holder is None or gone is None or not gone(holder):
                    raise SandboxError(
                        f"network {self.name!r}: the address {address} is leased to sandbox"
                        f" {holder!r}"
                    ) from None
                # Taken over whole (the caller holds the network's lock);
                # the ended holder's release leaves a lease not its own.
                os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return lease

    def sweep_tmp(self) -> None:
        """Remove the half-made leases of processes that died making them
        (``.SANDBOX.PID.tmp``: never linked, so never anybody's address)."""
        try:
            names = os.listdir(self.leases_dir)
        except FileNotFoundError:
            return
        for name in names:
            pid = name.rsplit(".", 2)[-2] if name.endswith(".tmp") else ""
            if name.startswith(".") and pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.leases_dir, name))

    def has_leases(self) -> bool:
        """True if any sandbox holds an address of the network."""
        return bool(self._names())

    def _next(self) -> int:
        try:
            with open(os.path.join(self.path, "next")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def release(self, lease: Lease) -> None:
        """Give *lease*'s address back (if it is still this sandbox's)."""
        path = os.path.join(self.leases_dir, lease.address)
        with contextlib.suppress(FileNotFoundError):
            if self._read(lease.address) == lease.sandbox:
                os.unlink(path)

    def leases(self) -> list[Lease]:
        """Every lease of the network."""
        out = []
        for name in self._names():
            try:
                with open(os.path.join(self.leases_dir, name)) as f:
                    data = json.load(f)
                data["ports"] = tuple(tuple(p) for p in data.get("ports") or ())
                if data.get("egress") is not None:
                    data["egress"] = tuple(data["egress"])
                out.append(Lease(**data))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def _names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.leases_dir) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def _read(self, address: str) -> str | None:
        try:
            with open(os.path.join(self.leases_dir, address)) as f:
                return str(json.load(f).get("sandbox"))
        except (OSError, ValueError, AttributeError):
            return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
