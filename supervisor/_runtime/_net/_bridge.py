"""Bridge networking: corral's network ``corral`` (bridge ``corral0``), its
leases, its rules, and the files a bridged sandbox resolves names with.

Set-up and tear-down take turns on the network's lock. The first sandbox
on the network makes the bridge (a subnet chosen once, free of the host's
routes, and kept in ``config.json``), corral's nftables table and, if it
was off, IPv4 forwarding (said in one line). The last one to leave removes
the bridge and the table and turns forwarding back off if corral turned it
on: a host with no bridged sandbox has nothing of corral's network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence

from ..._errors import SandboxError
from . import _links, _nft
from ._ipam import Lease, NetworkDir
from ._model import Port

__all__ = [
    "DEFAULT_NETWORK",
    "BridgeNetwork",
    "hosts_file",
    "resolv_conf",
]

DEFAULT_NETWORK = "corral"
_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_CANDIDATES = "10.213.0.0/16"
"""Where the default subnet (a /24) is looked for: the first free one."""


def _candidates() -> Iterator[ipaddress.IPv4Network]:
    return ipaddress.IPv4Network(_CANDIDATES).subnets(new_prefix=24)


class BridgeNetwork:
    """One corral network on this host (state in ``STATE_DIR/network/NAME``;
    whether corral turned forwarding on, in ``RUN_DIR/network``, which a
    reboot clears as it clears the setting)."""

    def __init__(
        self,
        state_dir: str,
        run_dir: str,
        name: str = DEFAULT_NETWORK,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = NetworkDir(state_dir, name)
        self.name = name
        self._flag = os.path.join(run_dir, "network", "forwarding-turned-on")
        self._say = say
        self._mtu: int | None = None
        self._config: dict[str, str] | None = None

    def settings(self) -> dict[str, str]:
        """The network's bridge, subnet and gateway: recorded, or chosen now
        (read once: they never change once chosen)."""
        if self._config is not None:
            return self._config
        config = self.dir.config()
        if config is None:
            subnet = _links.free_subnet(_candidates())
            config = {
                "bridge": f"{self.name}0"[:15],
                "subnet": str(subnet),
                "gateway": str(next(subnet.hosts())),
            }
            self.dir.save_config(config)
        self._config = config
        return config

    def attach(
        self,
        sandbox: str,
        ports: Sequence[Port] = (),
        egress: tuple[str, ...] | None = None,
        address: str | None = None,
        gone: Callable[[str], bool] | None = None,
    ) -> Lease:
        """Lease an address for *sandbox* (*address*, if given: see
        :meth:`NetworkDir.lease` for *gone*), with the bridge and the rules
        up (its published *ports* among them). A host port another sandbox
        has published already is refused in one line."""
        with self.dir.locked():
            config = self.settings()
            taken = {
                (ip, hp, proto): lease.sandbox
                for lease in self.dir.leases()
                for ip, hp, _, proto in lease.ports
                if not (
                    address is not None
                    and lease.address == address
                    and gone is not None
                    and gone(lease.sandbox)
                )
            }
            for p in ports:
                for ip in {p.host_ip, None} if p.host_ip else {None, *(k[0] for k in taken)}:
                    owner = taken.get((ip, p.host_port, p.proto))
                    if owner is not None:
                        raise SandboxError(
                            f"ports: {p.describe()!r}: the host's port {p.host_port}/{p.proto}"
                            f" is published by sandbox {owner!r} already"
                        )
            wanted = tuple((p.host_ip, p.host_port, p.port, p.proto) for p in ports)
            first = not self.dir.leases()
            lease = self.dir.lease(
                sandbox, config["subnet"], config["gateway"], wanted, egress, address, gone
            )
            try:
                # The bridge and the table are there while any lease is: only
                # the first sandbox makes them, and only one with ports or an
                # allow-list changes the rules (a sandbox's start pays no nft).
                if first:
                    self._up(config)
                elif wanted or egress is not None:
                    self._rules(config)
            except BaseException:
                self.dir.release(lease)
                self._down_if_unused(config)
                raise
            return lease

    def plug(self, pid: int, sandbox: str, lease: Lease, up: bool = True) -> str:
        """Give the waiting init *pid* its interface (see :func:`_links.plug`)."""
        config = self.settings()
        return _links.plug(pid, sandbox, config["bridge"], lease, self.mtu(), up)

    def mtu(self) -> int:
        """The MTU of the host's uplink (read once per network object)."""
        if self._mtu is None:
            self._mtu = _links.uplink_mtu()
        return self._mtu

    def detach(self, lease: Lease, veth: str | None = None) -> None:
        """Give *lease* back; the last one takes the bridge and rules down.

        The veth is not deleted here: the kernel deletes it with the
        sandbox's network namespace, in its own time (deleting it first
        costs ~20 ms of waiting for the network to settle, half of a
        bridged sandbox's lifecycle). Addresses are handed out round-robin,
        so the address given back is not reused before that; the start-up
        sweep deletes a veth whose namespace something kept alive."""
        with self.dir.locked():
            self.dir.release(lease)
            config = self.settings()
            if self.dir.leases():
                if lease.ports or lease.egress is not None:
                    self._rules(config)  # its ports and its egress rules go
            else:
                self._down(config)

    def sweep(self, alive: Callable[[str], bool]) -> list[str]:
        """Release the leases of sandboxes that are gone (*alive* says which
        are not), remove their veths; tear down if nothing is left."""
        swept: list[str] = []
        with self.dir.locked():
            config = self.dir.config()
            if config is None:
                return swept
            for lease in self.dir.leases():
                if not alive(lease.sandbox):
                    _links.remove_veth(_links.veth_name(lease.sandbox))
                    self.dir.release(lease)
                    swept.append(f"lease {lease.address} of {lease.sandbox}")
            if not self.dir.leases():
                self._down(config)
            elif swept:
                self._rules(config)
        return swept

    # -- inside the lock ------------------------------------------------------

    def _up(self, config: dict[str, str]) -> None:
        subnet = ipaddress.IPv4Network(config["subnet"])
        _links.ensure_bridge(config["bridge"], config["gateway"], subnet.prefixlen, self.mtu())
        # A port published on the host's 127.0.0.1 is DNAT-ed to a sandbox
        # with its loopback source (masqueraded after): the kernel lets such
        # a packet out of this interface only, not of any other of the host's.
        _write(f"/proc/sys/net/ipv4/conf/{config['bridge']}/route_localnet", "1")
        self._rules(config)

    def _rules(self, config: dict[str, str]) -> None:
        forwards = tuple(
            _nft.Forward(ip, hp, proto, lease.address, port)
            for lease in self.dir.leases()
            for ip, hp, port, proto in lease.ports
        )
        limits = tuple(
            _nft.Egress(lease.address, lease.egress, _nft.counter_name(lease.sandbox))
            for lease in self.dir.leases()
            if lease.egress is not None
        )
        bridge = _nft.Bridge(config["bridge"], config["subnet"], forwards, limits)
        _nft.apply([bridge], self._forwarding_on())

    def _down_if_unused(self, config: dict[str, str]) -> None:
        if not self.dir.leases():
            self._down(config)

    def _down(self, config: dict[str, str]) -> None:
        _nft.delete()
        _links.remove_bridge(config["bridge"])
        if os.path.exists(self._flag):
            _write(_FORWARD, "0")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._flag)

    def _forwarding_on(self) -> bool:
        """Turn IPv4 forwarding on if it is off; True if corral did (now or
        before: then only its bridges' traffic may be forwarded)."""
        if _read(_FORWARD) != "1":
            os.makedirs(os.path.dirname(self._flag), mode=0o700, exist_ok=True)
            with open(self._flag, "w"):
                pass
            _write(_FORWARD, "1")
            if self._say is not None:
                self._say(
                    "corral: turned IPv4 forwarding on (net.ipv4.ip_forward was 0) for its"
                    " bridge; corral's nftables table forwards nothing else, and it is turned"
                    " off again when the last bridged sandbox is gone"
                )
        return os.path.exists(self._flag)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise SandboxError(f"network: cannot read {path}: {exc.strerror}") from None


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise SandboxError(f"network: cannot write {path}: {exc.strerror}") from None


def resolv_conf(path: str = "/etc/resolv.conf") -> str:
    """The sandbox's ``/etc/resolv.conf``: the host's resolvers. A stub on
    loopback (systemd-resolved's 127.0.0.53) is unreachable from a sandbox:
    its upstreams are used instead (``/run/systemd/resolve/resolv.conf``)."""
    text = _text(path)
    if any(ns.startswith("127.") for ns in _nameservers(text)):
        upstream = _text("/run/systemd/resolve/resolv.conf")
        if _nameservers(upstream):
            text = upstream
    lines = [ln for ln in text.splitlines() if not ln.startswith("nameserver 127.")]
    return "# made by corral from the host's resolvers\n" + "\n".join(lines) + "\n"


def hosts_file(address: str | None, hostname: str, peers: Sequence[tuple[str, str]] = ()) -> str:
    """The sandbox's ``/etc/hosts``: localhost, its own name, and *peers*
    (address, names): the other sandboxes of its fleet's network."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{address or '127.0.1.1'}\t{hostname}")
    lines += [f"{a}\t{names}" for a, names in peers]
    return "# made by corral\n" + "\n".join(lines) + "\n"


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _nameservers(text: str) -> list[str]:
    return [
        ln.split()[1]
        for ln in text.splitlines()
        if ln.startswith("nameserver ") and len(ln.split()) > 1
    ]
