"""Links, addresses and routes, through pyroute2 (netlink; no ``ip``).

Inside a sandbox's network namespace the work is done by a netlink socket
opened there: the calling thread joins the namespace (``setns`` moves only
the calling thread's network namespace), opens the socket, and goes back
at once. A socket stays in the namespace it was opened in. No process is
forked for it (pyroute2's ``NetNS`` would fork a helper, which a threaded
supervisor must not do), and the thread is back in its own namespace
before anything else runs on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

from ..._errors import SandboxError
from .._linux import _syscalls as sc
from ._ipam import Lease
from ._model import DEFAULT_BRIDGE

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    import ipaddress
    from typing import Any, NamedTuple
else:
    from .._tuples import NamedTuple

__all__ = [
    "Used",
    "bridge_exists",
    "ensure_bridge",
    "free_subnet",
    "host_networks",
    "link_alias",
    "owner",
    "plug",
    "remove_bridge",
    "remove_veth",
    "set_forwarding",
    "set_up",
    "uplink_mtu",
    "veth_name",
]

_NODAD = 0x02
"""IFA_F_NODAD: an address corral gives is usable at once (no duplicate
detection: the prefix is corral's, the address the lease's)."""
VETH_PREFIX = "vc"
"""The host ends of sandboxes' veth pairs: ``vc`` and ten hex digits."""
DEFAULT_MTU = 1500


def _iproute() -> Any:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # ~100 ms: imported on use

    return IPRoute()


def veth_name(sandbox: str) -> str:
    """The host end of *sandbox*'s veth pair (at most 15 characters, the
    kernel's limit): stable, so a leftover is found by its sandbox's name."""
    import hashlib

    return VETH_PREFIX + hashlib.sha256(sandbox.encode()).hexdigest()[:10]


class Used(NamedTuple):
    """An IPv4 network the host uses: it has an ``address`` (*shown*) in
    it, or a ``route`` to it, through *device*."""

    net: ipaddress.IPv4Network
    what: str
    device: str
    shown: str

    def describe(self) -> str:
        """How a person reads it: ``the host's route to 10.0.0.0/8 (dev eth1)``."""
        to = "to " if self.what == "route" else ""
        return f"the host's {self.what} {to}{self.shown} (dev {self.device})"


def host_networks() -> list[Used]:
    """The IPv4 networks the host has addresses in or routes to (in any
    table; but the default route), its addresses first."""
    import ipaddress

    addresses, routes = [], []
    with _iproute() as ip:
        names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ip.get_links()}
        for a in ip.get_addr(family=2):
            shown = f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            net = ipaddress.IPv4Network(shown, strict=False)
            addresses.append(Used(net, "address", names.get(a["index"], "?"), shown))
        for r in ip.get_routes(family=2):
            dst = r.get_attr("RTA_DST")
            if dst and r["dst_len"] > 0:
                net = ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False)
                routes.append(Used(net, "route", names.get(r.get_attr("RTA_OIF"), "?"), str(net)))
    return addresses + routes


def free_subnet(
    candidates: Iterable[ipaddress.IPv4Network], used: Sequence[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """The first of *candidates* that overlaps none of *used*."""
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return net
    raise SandboxError("network: every candidate subnet collides with a route of the host")


def uplink_mtu() -> int:
    """The MTU of the interface of the host's default route (1500 without one)."""
    with _iproute() as ip:
        for r in ip.get_default_routes(family=2):
            oif = r.get_attr("RTA_OIF")
            if oif:
                links = ip.get_links(oif)
                if links:
                    return int(links[0].get_attr("IFLA_MTU") or DEFAULT_MTU)
    return DEFAULT_MTU


def owner(network: str) -> str:
    """The alias corral gives the bridge of *network*: what tells its
    bridges from the host's (a bridge that is not corral's is never given
    an address, nor deleted)."""
    return f"corral network {network}"


def _tmp_name(bridge: str) -> str:
    # A bridge is made under this name, given its alias, then renamed: the
    # kernel ignores an alias in the message that makes a link, and a bridge
    # without its alias, left by a kill between the two, would not be ours.
    import hashlib

    return "crn" + hashlib.sha256(bridge.encode()).hexdigest()[:12]


def bridge_exists(name: str) -> bool:
    """True if the host has a link *name*."""
    with _iproute() as ip:
        return bool(ip.link_lookup(ifname=name))


def link_alias(name: str) -> tuple[bool, str | None]:
    """Whether the host has a link *name*, and its alias (None without one)."""
    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            return False, None
        alias = ip.get_links(found[0])[0].get_attr("IFLA_IFALIAS")
        return True, str(alias) if alias else None


def _ours(link: Any, name: str, network: str) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    if (info.get_attr("IFLA_INFO_KIND") if info is not None else None) != "bridge":
        return False
    alias = link.get_attr("IFLA_IFALIAS")
    # corral0 was made without an alias before there were other networks.
    return bool(alias == owner(network) or (not alias and name == DEFAULT_BRIDGE))


def ensure_bridge(
    name: str,
    network: str,
    gateway: str,
    prefix: int,
    mtu: int,
    gateway6: tuple[str, int] | None = None,
) -> None:
    """The bridge *name* of corral's *network*, up, with the address
    *gateway*/*prefix* (and no other), and *gateway6* (address, prefix
    length) if the network has IPv6; made if missing. A link of that name
    that is not that network's bridge is refused."""
    import socket

    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            tmp = _tmp_name(name)
            for index in ip.link_lookup(ifname=tmp):
                ip.link("del", index=index)  # a kill's leftover (the name is ours)
            ip.link("add", ifname=tmp, kind="bridge", mtu=mtu)
            (index,) = ip.link_lookup(ifname=tmp)
            try:
                ip.link("set", index=index, ifalias=owner(network))
                ip.link("set", index=index, ifname=name)
            except BaseException:
                with contextlib.suppress(Exception):
                    ip.link("del", index=index)
                raise
            found = [index]
        index = found[0]
        if not _ours(ip.get_links(index)[0], name, network):
            raise SandboxError(
                f"network {network!r}: the host has a link {name!r} that is not its bridge"
            )
        for family, want in ((socket.AF_INET, (gateway, prefix)), (socket.AF_INET6, gateway6)):
            # Global addresses only: the kernel's link-local one is its own.
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ip.get_addr(index=index, family=family)
                if a["scope"] == 0
            }
            for address, length in have - {want}:
                ip.addr("del", index=index, address=address, prefixlen=length)  # an old subnet's
            if want is not None and want not in have:
                # No duplicate detection: the address is corral's, and usable at once.
                ip.addr("add", index=index, address=want[0], prefixlen=want[1], flags=_NODAD)
        ip.link("set", index=index, state="up")


def remove_bridge(name: str, network: str) -> bool:
    """Delete the bridge *name* of corral's *network* if it exists (and is
    that network's: a link of the host's is left alone); True if it did."""
    removed = False
    with _iproute() as ip:
        for index in ip.link_lookup(ifname=name):
            if _ours(ip.get_links(index)[0], name, network):
                ip.link("del", index=index)
                removed = True
        for index in ip.link_lookup(ifname=_tmp_name(name)):
            ip.link("del", index=index)
            removed = True
    return removed


def remove_veth(name: str) -> None:
    """Delete the veth *name* (and so its peer), if it exists."""
    with _iproute() as ip:
        for index in ip.link_lookup(ifname=name):
            with contextlib.suppress(Exception):
                ip.link("del", index=index)


def set_up(name: str, up: bool, mtu: int | None = None) -> None:
    """Bring the host's link *name* up or down (a veth's host end: down, no
    packet goes in or out of its sandbox), with *mtu* if given."""
    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            raise SandboxError(f"network: the link {name!r} is gone")
        extra = {} if mtu is None else {"mtu": mtu}
        ip.link("set", index=found[0], state="up" if up else "down", **extra)


_BR_STATE_LISTENING = 1
_BR_STATE_FORWARDING = 3


def set_forwarding(name: str, forwarding: bool) -> None:
    """Let the bridge pass frames to and from its port *name* (a veth's
    host end), or not: nothing goes in or out of the sandbox, and the link
    and its carrier stay up, so the sandbox's routes stay as they were (a
    link set down would mark them ``linkdown``, which a dump of them
    would keep and CRIU's restore of them refuse).

    The port is set to the STP state *listening*, which drops every frame
    both ways; with STP off (corral's bridges) the kernel moves only a
    *blocking* port on to forwarding, so it stays there until set back."""
    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            raise SandboxError(f"network: the link {name!r} is gone")
        state = _BR_STATE_FORWARDING if forwarding else _BR_STATE_LISTENING
        ip.link("set", index=found[0], kind="bridge_slave", IFLA_BRPORT_STATE=state)


def link_stats(names: list[str]) -> dict[str, dict[str, int]]:
    """The counters of the host's links *names* (``rx_bytes``, ``tx_packets``,
    ``rx_dropped``...), by name; a link that is gone is left out."""
    out = {}
    wanted = set(names)
    with _iproute() as ip:
        for link in ip.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name not in wanted:
                continue
            stats = link.get_attr("IFLA_STATS64") or {}
            out[name] = {
                k: int(stats.get(k, 0))
                for k in (
                    "rx_bytes",
                    "tx_bytes",
                    "rx_packets",
                    "tx_packets",
                    "rx_dropped",
                    "tx_dropped",
                )
            }
    return out


def plug(pid: int, sandbox: str, bridge: str, lease: Lease, mtu: int, up: bool = True) -> str:
    """Give the sandbox whose init is *pid* its ``eth0``: a veth pair made
    with its peer directly in the init's network namespace, the host end on
    *bridge*; then, inside, the lease's MAC and address, up, and the default
    route. Returns the host end's name. Nothing is left on failure.

    With *up* false the host end stays down (no carrier inside): nothing
    reaches the namespace until :func:`set_up` (a restore's sockets are not
    there yet, and a packet to one that is missing would be answered with a
    reset)."""
    import socket

    host_end = veth_name(sandbox)
    with _iproute() as ip:
        bridge_index = ip.link_lookup(ifname=bridge)
        if not bridge_index:
            raise SandboxError(f"network: the bridge {bridge!r} is gone")
        # On the bridge, and up (or not), as it is made: one request, not three.
        ip.link(
            "add",
            ifname=host_end,
            kind="veth",
            mtu=mtu,
            master=bridge_index[0],
            state="up" if up else "down",
            peer={"ifname": "eth0", "net_ns_pid": pid, "address": lease.mac, "mtu": mtu},
        )
        try:
            with _inside(pid) as inner:
                (eth0,) = inner.link_lookup(ifname="eth0")
                inner.addr("add", index=eth0, address=lease.address, prefixlen=lease.prefix)
                if lease.address6 is not None:
                    inner.addr(
                        "add",
                        index=eth0,
                        address=lease.address6,
                        prefixlen=lease.prefix6,
                        flags=_NODAD,
                    )
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="default", gateway=lease.gateway)
                if lease.gateway6 is not None:
                    inner.route("add", dst="::/0", gateway=lease.gateway6, family=socket.AF_INET6)
        except BaseException:
            with contextlib.suppress(Exception):
                ip.link("del", ifname=host_end)
            raise
    return host_end


@contextlib.contextmanager
def _inside(pid: int) -> Iterator[Any]:
    """A pyroute2 IPRoute whose socket is in *pid*'s network namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(target, sc.CLONE_NEWNET)
            try:
                inner = _iproute()
            finally:
                sc.setns(own, sc.CLONE_NEWNET)  # back before anything else runs here
        finally:
            os.close(target)
    finally:
        os.close(own)
    with inner:
        yield inner
