"""Bridge networking: corral's networks (the default one, ``corral`` on
the bridge ``corral0``, and those fleets declare), their leases, their
rules, and the files a bridged sandbox resolves names with.

Set-ups and tear-downs of every network take turns on one lock
(:func:`._ipam.locked`): corral's nftables table and the forwarding switch
are the host's, each written from the leases of all the networks. The
first sandbox on a network makes its bridge, once its subnet is found to
collide with no route or address of the host (a subnet corral chose is
chosen again then; a declared one is refused), and writes the table with
it; the last one to leave removes the bridge. The table, and forwarding if
corral turned it on, go with the last network in use: a host with no
bridged sandbox has nothing of corral's network.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence

from ..._errors import SandboxError
from . import _links, _nft
from ._ipam import Lease, NetworkDir, known_networks, locked
from ._model import DEFAULT_BRIDGE, DEFAULT_NETWORK, NetworkDecl, Port

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py

if TYPE_CHECKING:
    import ipaddress

__all__ = [
    "DEFAULT_NETWORK",
    "BridgeNetwork",
    "Networks",
    "hosts_file",
    "resolv_conf",
]

_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_FORWARD6 = "/proc/sys/net/ipv6/conf/all/forwarding"
_CANDIDATES = "10.213.0.0/16"
"""Where a subnet nobody declared (a /24) is looked for: the first free one."""
_SETTINGS = ("bridge", "subnet", "gateway", "subnet6")


def _candidates() -> Iterator[ipaddress.IPv4Network]:
    import ipaddress

    return ipaddress.IPv4Network(_CANDIDATES).subnets(new_prefix=24)


class Networks:
    """Every corral network of one state directory (``STATE_DIR/network``;
    whether corral turned forwarding on, in ``RUN_DIR/network``, which a
    reboot clears as it clears the setting)."""

    def __init__(
        self, state_dir: str, run_dir: str, say: Callable[[str], None] | None = None
    ) -> None:
        self.state_dir = state_dir
        self._flag = os.path.join(run_dir, "network", "forwarding-turned-on")
        self._say = say
        self._mtu: int | None = None
        self._nets: dict[str, BridgeNetwork] = {}
        self._guard = threading.Lock()

    def get(self, name: str = DEFAULT_NETWORK) -> BridgeNetwork:
        """The network *name* (whether it exists is checked on use)."""
        with self._guard:
            net = self._nets.get(name)
            if net is None:
                net = self._nets[name] = BridgeNetwork(self, name)
            return net

    def known(self) -> list[str]:
        """The networks with settings here (used or declared once)."""
        return known_networks(self.state_dir)

    def mtu(self) -> int:
        """The MTU of the host's uplink (read once)."""
        if self._mtu is None:
            self._mtu = _links.uplink_mtu()
        return self._mtu

    def declare(self, decls: Sequence[NetworkDecl]) -> None:
        """Record the settings of the networks a fleet declares, checked
        against the host: a subnet that collides with a route or an address
        of the host (but those of the network's own bridge), a bridge name
        the host has a link of or another network has, or settings changed
        while sandboxes hold addresses of the network are refused in one
        line (:class:`~supervisor.SandboxError`), and then none is recorded.
        A network that does not say its subnet keeps the one chosen before,
        or gets the first free /24 of corral's range."""
        import ipaddress

        if not decls:
            return  # a fleet without networks pays nothing (pyroute2's import is ~100 ms)
        with locked(self.state_dir):
            used = _links.host_networks()
            recorded = {n: self.get(n).dir.config() for n in self.known()}
            chosen: list[ipaddress.IPv4Network] = []
            plan = []
            for d in decls:
                net = self.get(d.name)
                old = recorded.get(d.name)
                where = f"network {d.name!r}"
                if d.subnet6 is not None:
                    _check_forwarding6(d.name)
                for other, cfg in recorded.items():
                    if other != d.name and cfg is not None and cfg.get("bridge") == d.bridge:
                        raise SandboxError(f"{where}: bridge: {d.bridge!r} is network {other!r}'s")
                exists, alias = _links.link_alias(d.bridge)
                if exists and alias != _links.owner(d.name):
                    raise SandboxError(
                        f"{where}: bridge: the host has a link {d.bridge!r} (not corral's)"
                    )
                # Its own bridge's routes are its own (it is up: sandboxes use it).
                mine = {d.bridge, *((old["bridge"],) if old else ())}
                theirs = [u for u in used if u.device not in mine]
                if d.subnet is not None:
                    clash = _clash(ipaddress.IPv4Network(d.subnet), theirs)
                    if clash:
                        raise SandboxError(f"{where}: subnet: {d.subnet} collides with {clash}")
                    config = {**d.settings(), "chosen": "declared"}
                elif (
                    old
                    and old.get("subnet")
                    and (
                        net.dir.has_leases()
                        or not _clash(ipaddress.IPv4Network(old["subnet"]), theirs)
                    )
                ):
                    config = {**old, "bridge": d.bridge, "chosen": "auto"}
                else:
                    others = [
                        ipaddress.IPv4Network(c["subnet"])
                        for n, c in recorded.items()
                        if n != d.name and c is not None and c.get("subnet")
                    ]
                    subnet = _links.free_subnet(
                        _candidates(), [u.net for u in theirs] + others + chosen
                    )
                    config = _auto(d.bridge, subnet)
                config.pop("subnet6", None)
                if d.subnet6 is not None:
                    config["subnet6"] = d.subnet6
                chosen.append(ipaddress.IPv4Network(config["subnet"]))
                changed = [k for k in _SETTINGS if old is not None and old.get(k) != config.get(k)]
                if changed and net.dir.has_leases():
                    assert old is not None
                    key = changed[0]
                    raise SandboxError(
                        f"{where}: {key}: {config.get(key, 'none')} in the fleet, but"
                        f" {old.get(key, 'none')} for the sandboxes on it now: stop them"
                        f" first, or keep the {key}"
                    )
                plan.append((net, old if changed else None, config))
            for net, old, config in plan:
                if old is not None and old.get("bridge"):
                    # Not in use (no lease): only a kill could have left it.
                    _links.remove_bridge(old["bridge"], net.name)
                net.dir.save_config(config)

    def sweep(self, alive: Callable[[str], bool]) -> list[str]:
        """Release the leases of sandboxes that are gone (*alive* says which
        are not) on every network, remove their veths and the bridges of
        networks left unused, and the table if no network is in use."""
        swept: list[str] = []
        with locked(self.state_dir) as lock:
            changed = False
            for name in self.known():
                net = self.get(name)
                config = net.dir.config()
                net.dir.sweep_tmp()
                for lease in net.dir.leases():
                    if not alive(lease.sandbox):
                        _links.remove_veth(_links.veth_name(lease.sandbox))
                        net.dir.release(lease)
                        swept.append(f"lease {lease.address} of {lease.sandbox} on {name}")
                        changed = True
                if config and config.get("bridge") and not net.dir.has_leases():
                    changed |= _links.remove_bridge(config["bridge"], name)
            if changed or not any(self.get(n).dir.has_leases() for n in self.known()):
                self._table(lock)
        return swept

    def published(self) -> dict[tuple[str | None, int, str], str]:
        """The host ports published by sandboxes on any network: (host IP
        or None, port, protocol) -> the sandbox's name."""
        return {
            (ip, hp, proto): lease.sandbox
            for name in self.known()
            for lease in self.get(name).dir.leases()
            for ip, hp, _, proto in lease.ports
        }

    # -- inside the lock ------------------------------------------------------

    def _table(self, lock: int) -> None:
        """Write corral's table for the networks in use, or remove it (and
        forwarding, if corral turned it on) when none is."""
        bridges = [b for b in (self.get(n).rules() for n in self.known()) if b is not None]
        if not bridges:
            _nft.delete(lock)
            if os.path.exists(self._flag):
                _write(_FORWARD, "0")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._flag)
            return
        _nft.apply(bridges, self._forwarding_on(), lock)

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
                    " bridges; corral's nftables table forwards nothing else, and it is turned"
                    " off again when the last bridged sandbox is gone"
                )
        return os.path.exists(self._flag)


def _check_forwarding6(network: str) -> None:
    """Refuse IPv6 on *network* in one line if the host does not forward
    IPv6. Turning it on would stop the host from taking router
    advertisements on every interface whose ``accept_ra`` is 1 (its own
    IPv6 default route among them): not corral's call to make."""
    if _read(_FORWARD6) != "1":
        raise SandboxError(
            f"network {network!r}: ipv6: the host does not forward IPv6"
            " (net.ipv6.conf.all.forwarding = 0); corral does not turn it on, since"
            " that changes how the host takes its own routes (docs/network.md)"
        )


def _with_ipv6(lease: Lease, config: dict[str, str]) -> Lease:
    """*lease* with its IPv6 address and gateway, on a network with a
    ``subnet6``: the IPv4 address's and gateway's places in the subnet, at
    the same places in the prefix (one lease, both families)."""
    import ipaddress

    if not config.get("subnet6"):
        return lease
    net4 = ipaddress.IPv4Network(config["subnet"])
    net6 = ipaddress.IPv6Network(config["subnet6"])

    def place(address: str) -> str:
        offset = int(ipaddress.IPv4Address(address)) - int(net4.network_address)
        return str(net6.network_address + offset)

    return lease._replace(
        address6=place(lease.address), prefix6=net6.prefixlen, gateway6=place(lease.gateway)
    )


def _clash(subnet: ipaddress.IPv4Network, used: Sequence[_links.Used]) -> str | None:
    """What of *used* *subnet* overlaps, said for a person; None if nothing."""
    for u in used:
        if subnet.overlaps(u.net):
            return u.describe()
    return None


def _auto(bridge: str, subnet: ipaddress.IPv4Network) -> dict[str, str]:
    return {
        "bridge": bridge,
        "subnet": str(subnet),
        "gateway": str(subnet.network_address + 1),
        "chosen": "auto",
    }


class BridgeNetwork:
    """One corral network (state in ``STATE_DIR/network/NAME``)."""

    def __init__(self, hub: Networks, name: str) -> None:
        self.hub = hub
        self.dir = NetworkDir(hub.state_dir, name)
        self.name = name
        self._config: dict[str, str] | None = None

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
        has published already, an unknown network, or a subnet that
        collides with the host's routes now is refused in one line."""
        with locked(self.hub.state_dir) as lock:
            config = self.dir.config()
            if config is None:
                if self.name != DEFAULT_NETWORK:
                    known = [n for n in self.hub.known() if n != DEFAULT_NETWORK]
                    raise SandboxError(
                        f"network: no network {self.name!r} here (a fleet declares one with"
                        f" [network.{self.name}]; known: {', '.join(known) or 'none'})"
                    )
                config = {"bridge": DEFAULT_BRIDGE, "chosen": "auto"}
            if ports:
                taken = self.hub.published()
                if address is not None and gone is not None:
                    # The ports of the ended sandbox whose address this
                    # restore takes over are its own again.
                    taken = {k: v for k, v in taken.items() if not gone(v)}
                for p in ports:
                    for ip in {p.host_ip, None} if p.host_ip else {None, *(k[0] for k in taken)}:
                        owner = taken.get((ip, p.host_port, p.proto))
                        if owner is not None:
                            raise SandboxError(
                                f"ports: {p.describe()!r}: the host's port"
                                f" {p.host_port}/{p.proto} is published by sandbox {owner!r}"
                                " already"
                            )
            wanted = tuple((p.host_ip, p.host_port, p.port, p.proto) for p in ports)
            first = not self.dir.has_leases()
            if first and not _links.link_alias(config["bridge"])[0]:
                config = self._fresh(config)
            if config.get("subnet6"):
                _check_forwarding6(self.name)
            lease = self.dir.lease(
                sandbox, config["subnet"], config["gateway"], wanted, egress, address, gone
            )
            try:
                # The bridge and the table are there while any lease is: only
                # the first sandbox makes them, and only one with ports or an
                # allow-list changes the rules (a sandbox's start pays no nft).
                if first:
                    self._up(config, lock)
                elif wanted or egress is not None:
                    self.hub._table(lock)
            except BaseException:
                self.dir.release(lease)
                if not self.dir.has_leases():
                    self._down(config, lock)
                raise
            self._config = config
            return _with_ipv6(lease, config)

    def plug(self, pid: int, sandbox: str, lease: Lease, up: bool = True) -> str:
        """Give the waiting init *pid* its interface (see :func:`_links.plug`)."""
        bridge, mtu = self.port()
        return _links.plug(pid, sandbox, bridge, lease, mtu, up)

    def port(self) -> tuple[str, int]:
        """The bridge's name and the MTU of its ports: for the veths
        :meth:`plug` makes, and for one CRIU makes (its restore of a
        namespace it keeps in its images)."""
        # Read by attach: settings never change while a sandbox holds a lease.
        config = self._config or self.dir.config()
        if config is None:
            raise SandboxError(f"network {self.name!r}: its settings are gone")
        return config["bridge"], self.hub.mtu()

    def detach(self, lease: Lease, veth: str | None = None) -> None:
        """Give *lease* back; the last one takes the bridge down (and the
        table, with the last network in use).

        The veth is not deleted here: the kernel deletes it with the
        sandbox's network namespace, in its own time (deleting it first
        costs ~20 ms of waiting for the network to settle, half of a
        bridged sandbox's lifecycle). Addresses are handed out round-robin,
        so the address given back is not reused before that; the start-up
        sweep deletes a veth whose namespace something kept alive."""
        with locked(self.hub.state_dir) as lock:
            self.dir.release(lease)
            config = self.dir.config()
            if self.dir.has_leases():
                if lease.ports or lease.egress is not None:
                    self.hub._table(lock)  # its ports and its egress rules go
            elif config is not None:
                self._down(config, lock)

    def rules(self) -> _nft.Bridge | None:
        """What corral's table needs of this network; None if no sandbox is on it."""
        leases = self.dir.leases()
        config = self.dir.config()
        if not leases or config is None:
            return None
        forwards = tuple(
            _nft.Forward(ip, hp, proto, lease.address, port)
            for lease in leases
            for ip, hp, port, proto in lease.ports
        )
        limits = tuple(
            _nft.Egress(
                lease.address,
                lease.egress,
                _nft.counter_name(lease.sandbox),
                _links.veth_name(lease.sandbox),
                lease.mac,
            )
            for lease in leases
            if lease.egress is not None
        )
        return _nft.Bridge(
            config["bridge"], config["subnet"], forwards, limits, config.get("subnet6")
        )

    # -- inside the lock ------------------------------------------------------

    def _fresh(self, config: dict[str, str]) -> dict[str, str]:
        """*config* if its subnet is free of the host's routes and addresses
        now (its bridge is not there); else, if corral chose it, another one
        (recorded); a declared one is refused in one line."""
        import ipaddress

        used = _links.host_networks()
        subnet = config.get("subnet")
        if subnet:
            clash = _clash(ipaddress.IPv4Network(subnet), used)
            if clash is None:
                return config
            if config.get("chosen", "auto") != "auto":
                raise SandboxError(f"network {self.name!r}: subnet: {subnet} collides with {clash}")
        others = [
            ipaddress.IPv4Network(c["subnet"])
            for c in (self.hub.get(n).dir.config() for n in self.hub.known() if n != self.name)
            if c is not None and c.get("subnet")
        ]
        fresh = _auto(
            config["bridge"], _links.free_subnet(_candidates(), [u.net for u in used] + others)
        )
        if config.get("subnet6"):
            fresh["subnet6"] = config["subnet6"]
        self.dir.save_config(fresh)
        return fresh

    def _up(self, config: dict[str, str], lock: int) -> None:
        import ipaddress

        subnet = ipaddress.IPv4Network(config["subnet"])
        gateway6 = None
        if config.get("subnet6"):
            probe = _with_ipv6(Lease(config["gateway"], "", 0, config["gateway"], ""), config)
            gateway6 = (str(probe.gateway6), probe.prefix6)
        _links.ensure_bridge(
            config["bridge"],
            self.name,
            config["gateway"],
            subnet.prefixlen,
            self.hub.mtu(),
            gateway6,
        )
        # A port published on the host's 127.0.0.1 is DNAT-ed to a sandbox
        # with its loopback source (masqueraded after): the kernel lets such
        # a packet out of this interface only, not of any other of the host's.
        _write(f"/proc/sys/net/ipv4/conf/{config['bridge']}/route_localnet", "1")
        self.hub._table(lock)

    def _down(self, config: dict[str, str], lock: int) -> None:
        _links.remove_bridge(config["bridge"], self.name)
        self.hub._table(lock)


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


def hosts_file(
    address: str | None,
    hostname: str,
    peers: Sequence[tuple[str, str]] = (),
    address6: str | None = None,
) -> str:
    """The sandbox's ``/etc/hosts``: localhost, its own name (at its IPv6
    *address6* too, if it has one), and *peers* (address, names): the other
    sandboxes of its fleet's network."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{address or '127.0.1.1'}\t{hostname}")
    if address6:
        lines.append(f"{address6}\t{hostname}")
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
