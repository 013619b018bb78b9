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
import hashlib
import ipaddress
import os
from collections.abc import Iterator
from typing import Any

from ..._errors import SandboxError
from .._linux import _syscalls as sc
from ._ipam import Lease

__all__ = [
    "bridge_exists",
    "ensure_bridge",
    "free_subnet",
    "host_routes",
    "plug",
    "remove_bridge",
    "remove_veth",
    "set_up",
    "uplink_mtu",
    "veth_name",
]

VETH_PREFIX = "vc"
"""The host ends of sandboxes' veth pairs: ``vc`` and ten hex digits."""
DEFAULT_MTU = 1500


def _iproute() -> Any:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # ~100 ms: imported on use

    return IPRoute()


def veth_name(sandbox: str) -> str:
    """The host end of *sandbox*'s veth pair (at most 15 characters, the
    kernel's limit): stable, so a leftover is found by its sandbox's name."""
    return VETH_PREFIX + hashlib.sha256(sandbox.encode()).hexdigest()[:10]


def host_routes() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks the host routes or has addresses in (but default)."""
    out = []
    with _iproute() as ip:
        for r in ip.get_routes(family=2):
            dst = r.get_attr("RTA_DST")
            if dst and r["dst_len"] > 0:
                out.append(ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
        for a in ip.get_addr(family=2):
            out.append(
                ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            )
    return out


def free_subnet(candidates: Iterator[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first of *candidates* that overlaps no route or address of the host."""
    used = host_routes()
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


def bridge_exists(name: str) -> bool:
    """True if the host has a link *name*."""
    with _iproute() as ip:
        return bool(ip.link_lookup(ifname=name))


def ensure_bridge(name: str, gateway: str, prefix: int, mtu: int) -> None:
    """The bridge *name*, up, with the address *gateway*/*prefix*; made if
    missing. A link of that name that is not such a bridge is refused."""
    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            ip.link("add", ifname=name, kind="bridge", mtu=mtu)
            found = ip.link_lookup(ifname=name)
        index = found[0]
        link = ip.get_links(index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "bridge":
            raise SandboxError(f"network: the host has a link {name!r} that is not a bridge")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ip.get_addr(index=index)}
        if (gateway, prefix) not in have:
            ip.addr("add", index=index, address=gateway, prefixlen=prefix)
        ip.link("set", index=index, state="up")


def remove_bridge(name: str) -> None:
    """Delete the bridge *name* (if it exists)."""
    with _iproute() as ip:
        for index in ip.link_lookup(ifname=name):
            ip.link("del", index=index)


def remove_veth(name: str) -> None:
    """Delete the veth *name* (and so its peer), if it exists."""
    with _iproute() as ip:
        for index in ip.link_lookup(ifname=name):
            with contextlib.suppress(Exception):
                ip.link("del", index=index)


def set_up(name: str, up: bool) -> None:
    """Bring the host's link *name* up or down (a veth's host end: down, no
    packet goes in or out of its sandbox)."""
    with _iproute() as ip:
        found = ip.link_lookup(ifname=name)
        if not found:
            raise SandboxError(f"network: the link {name!r} is gone")
        ip.link("set", index=found[0], state="up" if up else "down")


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
    host_end = veth_name(sandbox)
    with _iproute() as ip:
        bridge_index = ip.link_lookup(ifname=bridge)
        if not bridge_index:
            raise SandboxError(f"network: the bridge {bridge!r} is gone")
        ip.link(
            "add",
            ifname=host_end,
            kind="veth",
            mtu=mtu,
            peer={"ifname": "eth0", "net_ns_pid": pid, "address": lease.mac, "mtu": mtu},
        )
        try:
            (index,) = ip.link_lookup(ifname=host_end)
            ip.link("set", index=index, master=bridge_index[0], state="up" if up else "down")
            with _inside(pid) as inner:
                (eth0,) = inner.link_lookup(ifname="eth0")
                inner.addr("add", index=eth0, address=lease.address, prefixlen=lease.prefix)
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="default", gateway=lease.gateway)
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
