"""The ``network`` setting of a sandbox and the networks a fleet declares,
checked (plain text, no I/O)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..._errors import SpecError

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    import ipaddress
    from typing import Any, NamedTuple
else:
    from .._tuples import NamedTuple

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_NETWORK",
    "NETWORK_MODES",
    "NetworkDecl",
    "Port",
    "check_decls",
    "check_ports",
    "is_bridged",
    "is_host_name",
    "network_name",
    "parse_egress",
    "parse_ifname",
    "parse_network",
    "parse_network_decl",
    "parse_port",
    "ula_prefix",
]

NETWORK_MODES = ("none", "bridge", "host")
"""What ``network`` may be besides ``sandbox:NAME`` and a declared network's name."""
DEFAULT_NETWORK = "corral"
"""The name of the network ``bridge`` means (its state: ``STATE_DIR/network/corral``)."""
DEFAULT_BRIDGE = "corral0"
"""The default network's bridge."""
RESERVED = (*NETWORK_MODES, DEFAULT_NETWORK)
"""Names a declared network may not have: the modes, and the default network's."""
BRIDGE_PREFIX = "cr-"
"""A declared network's bridge is ``cr-NAME`` unless it says otherwise."""
IFNAMSIZ = 15
"""The longest interface name the kernel takes."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")
# The kernel refuses '/', ':', whitespace, "." and ".."; corral also keeps
# to the characters other tools (nft, ip, systemd-networkd) never quote.
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def parse_network(value: object, field: str = "network") -> str:
    """A sandbox's network: ``none``, ``bridge`` (corral's default
    network), ``host``, ``sandbox:NAME`` (the network namespace of the
    running sandbox NAME), or the name of a declared network (as with
    Docker's and podman's ``--network NAME``). Whether such a network
    exists is checked where it is known (the fleet, the state directory)."""
    if isinstance(value, str) and value.startswith("sandbox:"):
        if not _NAME.match(value[len("sandbox:") :]):
            raise SpecError(field, f"expected sandbox:NAME with a sandbox's name, got {value!r}")
        return value
    if isinstance(value, str) and (value in NETWORK_MODES or _NETWORK_NAME.match(value)):
        if value == DEFAULT_NETWORK:
            raise SpecError(field, f"{value!r} is the default network: say 'bridge'")
        return value
    raise SpecError(
        field,
        f"expected one of {', '.join(NETWORK_MODES)}, sandbox:NAME or a network's name,"
        f" got {value!r}",
    )


def is_bridged(network: str) -> bool:
    """True if *network* (a parsed ``network``) puts a sandbox on a bridge
    of its own: ``bridge`` or a declared network."""
    return network not in ("none", "host") and not network.startswith("sandbox:")


def network_name(network: str) -> str | None:
    """The corral network a sandbox with *network* is on (``bridge`` is
    the default network, ``corral``), or None if it is on none of them."""
    if not is_bridged(network):
        return None
    return DEFAULT_NETWORK if network == "bridge" else network


def parse_ifname(value: object, field: str) -> str:
    """An interface name the kernel takes: 1-15 letters, digits, ``_ . -``."""
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise SpecError(
            field,
            f"expected an interface name (1-{IFNAMSIZ} letters, digits, '_', '.' or '-',"
            f" starting with a letter or digit), got {value!r}",
        )
    return value


class NetworkDecl(NamedTuple):
    """A network a fleet declares (``[network.NAME]``), checked as text:
    whether its subnet is free on this host is checked at start-up."""

    name: str
    subnet: str | None = None
    """Its IPv4 subnet (``10.20.0.0/24``); None: the first free /24 of
    corral's range, chosen when it is first declared and kept."""
    gateway: str | None = None
    """The bridge's address (in the subnet); None: the subnet's first host."""
    bridge: str = ""
    """The bridge's interface name (``cr-NAME`` unless given)."""
    subnet6: str | None = None
    """Its IPv6 prefix (``ipv6 = true``: a unique local one of its own,
    ``fdXX:XXXX:XXXX::/64``; or ``subnet6``); None: no IPv6."""

    def settings(self) -> dict[str, str]:
        """What it says, as a network's recorded settings would."""
        out = {"bridge": self.bridge}
        if self.subnet is not None:
            out["subnet"] = self.subnet
            out["gateway"] = self.gateway or _first_host(self.subnet)
        if self.subnet6 is not None:
            out["subnet6"] = self.subnet6
        return out


def _first_host(subnet: str) -> str:
    import ipaddress

    return str(ipaddress.IPv4Network(subnet).network_address + 1)


_DECL_KEYS = ("subnet", "gateway", "bridge", "ipv6", "subnet6")


def ula_prefix(name: str) -> str:
    """A unique local IPv6 /64 for network *name* (RFC 4193: ``fd`` and a
    40-bit global ID, here hashed from the host's machine id and the name,
    so that two hosts' networks of one name differ and one host's stays
    the same)."""
    import hashlib
    import ipaddress

    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = ""
    digest = hashlib.sha256(f"corral network {machine} {name}".encode()).digest()
    return str(ipaddress.IPv6Network((b"\xfd" + digest[:5] + bytes(10), 64)))


def _subnet6(value: object, subnet: str | None) -> str:
    import ipaddress

    net = ipaddress.IPv6Network(_prefix(value, "subnet6", 6, "fd00:10:20::/64", (48, 120)))
    if subnet is not None and net.num_addresses < ipaddress.IPv4Network(subnet).num_addresses:
        raise SpecError(
            "subnet6",
            f"{value!r} is smaller than the IPv4 subnet {subnet!r} (a sandbox's IPv6 address"
            " is its IPv4 address's place in the subnet)",
        )
    return str(net)


def parse_network_decl(name: object, table: object) -> NetworkDecl:
    """One ``[network.NAME]`` table: its optional ``subnet`` (an IPv4
    network, /8 to /30), ``gateway`` (an address in it, neither its
    network nor its broadcast address) and ``bridge`` (an interface name).
    Raises :class:`SpecError` naming the field."""
    import ipaddress

    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise SpecError(
            "name",
            "expected a network name of 1-15 letters, digits, '_' or '-' (a network's name"
            f" is an interface name's), got {name!r}",
        )
    if name in RESERVED:
        raise SpecError("name", f"{name!r} is reserved (none, bridge, host and corral are)")
    if not isinstance(table, dict):
        raise SpecError("network", f"expected a table like [network.{name}], got {table!r:.60}")
    for key in table:
        if key not in _DECL_KEYS:
            raise SpecError(key, f"unknown key (expected one of: {', '.join(_DECL_KEYS)})")
    subnet = gateway = None
    if "subnet" in table:
        subnet = _subnet(table["subnet"])
    if "gateway" in table:
        if subnet is None:
            raise SpecError("gateway", "a gateway needs the subnet it is in: set subnet too")
        gateway = _gateway(table["gateway"], ipaddress.IPv4Network(subnet))
    if "bridge" in table:
        bridge = parse_ifname(table["bridge"], "bridge")
    elif len(BRIDGE_PREFIX + name) <= IFNAMSIZ:
        bridge = BRIDGE_PREFIX + name
    else:
        raise SpecError(
            "bridge",
            f"the bridge {BRIDGE_PREFIX + name!r} would be longer than an interface name"
            f" ({IFNAMSIZ}): name the bridge, or the network in 12 characters",
        )
    if bridge == DEFAULT_BRIDGE:
        raise SpecError("bridge", f"{bridge!r} is the default network's bridge")
    ipv6 = table.get("ipv6", "subnet6" in table)
    if not isinstance(ipv6, bool):
        raise SpecError("ipv6", f"expected true or false, got {ipv6!r}")
    subnet6 = None
    if "subnet6" in table:
        if not ipv6:
            raise SpecError("subnet6", "set with ipv6 = false: leave one of them out")
        subnet6 = _subnet6(table["subnet6"], subnet)
    elif ipv6:
        subnet6 = ula_prefix(name)
    return NetworkDecl(
        name, subnet, gateway or (_first_host(subnet) if subnet else None), bridge, subnet6
    )


def _prefix(value: object, field: str, version: int, example: str, lengths: tuple[int, int]) -> str:
    """*value* as an IPv*version* network for *field*: no host bits, a
    prefix length within *lengths*, unicast; one line naming the field if not."""
    import ipaddress

    try:
        if not isinstance(value, str) or "/" not in value:
            raise ValueError
        net = ipaddress.ip_network(value, strict=False)
        if net.version != version:
            raise ValueError
    except ValueError:
        raise SpecError(
            field, f"expected an IPv{version} network like {example}, got {value!r}"
        ) from None
    if net.network_address != ipaddress.ip_address(value.partition("/")[0]):
        raise SpecError(field, f"{value!r} has host bits set: the network is {str(net)!r}")
    low, high = lengths
    if not low <= net.prefixlen <= high:
        raise SpecError(field, f"expected a prefix length from /{low} to /{high}, got {value!r}")
    if net.is_loopback or net.is_multicast or net.is_link_local or net.is_unspecified:
        raise SpecError(field, f"expected a unicast network, got {value!r}")
    return str(net)


def _subnet(value: object) -> str:
    import ipaddress

    net = ipaddress.IPv4Network(_prefix(value, "subnet", 4, "10.20.0.0/24", (8, 30)))
    if net.overlaps(ipaddress.IPv4Network("240.0.0.0/4")):
        raise SpecError("subnet", f"expected a unicast network, got {value!r}")
    return str(net)


def _gateway(value: object, net: ipaddress.IPv4Network) -> str:
    import ipaddress

    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise SpecError("gateway", f"expected an IPv4 address, got {value!r}") from None
    if address not in net or address in (net.network_address, net.broadcast_address):
        raise SpecError("gateway", f"{value!r} is not a host address of the subnet {str(net)!r}")
    return str(address)


def _overlap(a: str, b: str) -> bool:
    import ipaddress

    return ipaddress.IPv4Network(a).overlaps(ipaddress.IPv4Network(b))


def check_decls(decls: Sequence[NetworkDecl]) -> list[str]:
    """What is wrong between declared networks (each one line): two with
    overlapping subnets, or with one bridge."""
    import ipaddress

    problems = []
    for i, a in enumerate(decls):
        for b in decls[:i]:
            if a.bridge == b.bridge:
                problems.append(
                    f"network {a.name!r}: bridge: {a.bridge!r} is network {b.name!r}'s bridge too"
                )
            if (
                a.subnet6
                and b.subnet6
                and ipaddress.IPv6Network(a.subnet6).overlaps(ipaddress.IPv6Network(b.subnet6))
            ):
                problems.append(
                    f"network {a.name!r}: subnet6: {a.subnet6} overlaps network {b.name!r}'s"
                    f" {b.subnet6}"
                )
            if a.subnet and b.subnet and _overlap(a.subnet, b.subnet):
                problems.append(
                    f"network {a.name!r}: subnet: {a.subnet} overlaps network {b.name!r}'s"
                    f" {b.subnet}"
                )
    return problems


class Port(NamedTuple):
    """A published port: the host's *host_port* (on *host_ip*, or on every
    address of the host) forwarded to the sandbox's *port*."""

    host_ip: str | None
    host_port: int
    port: int
    proto: str = "tcp"

    def describe(self) -> str:
        """The port in the grammar it was given in."""
        ip = f"{self.host_ip}:" if self.host_ip else ""
        return f"{ip}{self.host_port}:{self.port}/{self.proto}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (records, leases, the control socket)."""
        return self._asdict()


def parse_port(text: object, field: str = "ports") -> Port:
    """``HOST_PORT:PORT[/PROTO]`` or ``HOST_IP:HOST_PORT:PORT[/PROTO]``
    (Docker's short syntax; PROTO ``tcp`` or ``udp``)."""
    import ipaddress

    expected = f"expected [HOST_IP:]HOST_PORT:PORT[/tcp|udp] like 8080:80, got {text!r}"
    if not isinstance(text, str):
        raise SpecError(field, expected)
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise SpecError(field, f"{text!r}: expected the protocol tcp or udp, got {proto!r}")
    parts = spec.split(":")
    if len(parts) == 2:
        host_ip, host_port, port = None, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host_port, port = parts
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise SpecError(field, f"{text!r}: expected an IPv4 address, got {host_ip!r}") from None
    else:
        raise SpecError(field, expected)
    numbers = []
    for p in (host_port, port):
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise SpecError(field, f"{text!r}: expected a port number 1-65535, got {p!r}")
        numbers.append(int(p))
    return Port(host_ip, numbers[0], numbers[1], proto)


def check_ports(ports: Sequence[Port], network: str) -> tuple[Port, ...]:
    """The ports, each host port once; only a bridged sandbox publishes any."""
    out = tuple(ports)
    if out and not is_bridged(network):
        raise SpecError(
            "ports",
            "only a bridged sandbox (network = 'bridge' or a network's name) publishes ports",
        )
    seen: dict[tuple[str | None, int, str], Port] = {}
    for p in out:
        key = (p.host_ip, p.host_port, p.proto)
        if key in seen:
            raise SpecError("ports", f"{p.describe()!r}: the host port is published twice")
        seen[key] = p
    return out


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}\.?$")


def is_host_name(text: str) -> bool:
    """Whether *text* is a host name as RFC 1123 has them (labels of 1-63
    letters, digits and inner hyphens; 253 characters at most; a final dot
    allowed), lowercase. A name whose last label is all digits is refused:
    ``10.0.0.300`` is a mistyped address, not a name (RFC 3696, section 2)."""
    if len(text.rstrip(".")) > 253 or not _HOST_NAME.match(text):
        return False
    return not text.rstrip(".").rpartition(".")[2].isdigit()


def parse_egress(value: object, field: str = "egress") -> tuple[str, ...] | None:
    """Where a bridged sandbox may connect to: ``"all"`` (None), ``"none"``
    (an empty tuple), or a list of ``HOST`` and ``HOST:PORT[/tcp|udp]``
    entries, HOST an IPv4 address, a CIDR or a host name (normalized:
    ``ADDRESS/LEN``, a name in lowercase, ``:PORT/PROTO``). Names are only
    checked here; they are resolved when the sandbox starts
    (:func:`~._resolve.resolve_egress`)."""
    import ipaddress

    if value == "all":
        return None
    if value == "none":
        return ()
    expected = (
        "expected 'all', 'none' or a list like ['10.0.0.0/8', '192.0.2.1:53/udp',"
        f" 'deb.debian.org:443'], got {value!r:.60}"
    )
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SpecError(field, expected)
    out = []
    for entry in value:
        host_text, sep, service = entry.partition(":")
        what = "the address"
        try:
            host = str(ipaddress.IPv4Network(host_text, strict=False))
        except ValueError:
            host = host_text.lower()
            if not is_host_name(host):
                raise SpecError(
                    field,
                    f"{entry!r}: expected an IPv4 address, a CIDR or a host name,"
                    f" got {host_text!r}",
                ) from None
            what = "the name"
        if not sep:
            out.append(host)
            continue
        port, _, proto = service.partition("/")
        proto = proto or "tcp"
        if not port.isdigit() or not 1 <= int(port) <= 65535 or proto not in ("tcp", "udp"):
            raise SpecError(
                field, f"{entry!r}: expected PORT[/tcp|udp] after {what}, got {service!r}"
            )
        out.append(f"{host}:{int(port)}/{proto}")
    return tuple(dict.fromkeys(out))
