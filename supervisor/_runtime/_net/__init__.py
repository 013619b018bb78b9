"""Sandbox networking: modes, corral's bridge networks, addresses, NAT, DNS files.

``network`` of a sandbox (docs/network.md):

- ``none`` (the default): a network namespace of its own with ``lo`` only;
- ``bridge``: the same, plus ``eth0``, one end of a veth pair whose other
  end is on the bridge of corral's default network (``corral0``), an
  address leased from that network's subnet, a default route through the
  bridge, and NAT to the outside (:mod:`._bridge`);
- the name of a network a fleet declares (``[network.NAME]``): the same,
  on that network's bridge, isolated from the other networks;
- ``host``: the host's network namespace (no isolation of the network);
- ``sandbox:NAME``: the network namespace of the running sandbox NAME.

All netlink work is done through pyroute2 (:mod:`._links`); the rules are
corral's own nftables table ``inet corral``, applied whole, atomically,
with ``nft -j`` (:mod:`._nft`).
"""

from __future__ import annotations

from ._model import (
    NETWORK_MODES,
    NetworkDecl,
    Port,
    check_decls,
    check_ports,
    is_bridged,
    network_name,
    parse_egress,
    parse_network,
    parse_network_decl,
    parse_port,
)

__all__ = [
    "NETWORK_COUNTERS",
    "NETWORK_MODES",
    "NetworkDecl",
    "Port",
    "check_decls",
    "check_ports",
    "is_bridged",
    "network_name",
    "parse_egress",
    "parse_network",
    "parse_network_decl",
    "parse_port",
]

NETWORK_COUNTERS: dict[str, tuple[str, str]] = {
    "rx_bytes": ("corral_sandbox_network_receive_bytes_total", "Bytes the sandbox received."),
    "rx_packets": (
        "corral_sandbox_network_receive_packets_total",
        "Packets the sandbox received.",
    ),
    "rx_dropped": (
        "corral_sandbox_network_receive_dropped_total",
        "Packets to the sandbox dropped by its interface.",
    ),
    "tx_bytes": ("corral_sandbox_network_transmit_bytes_total", "Bytes the sandbox sent."),
    "tx_packets": (
        "corral_sandbox_network_transmit_packets_total",
        "Packets the sandbox sent.",
    ),
    "tx_dropped": (
        "corral_sandbox_network_transmit_dropped_total",
        "Packets from the sandbox dropped by its interface.",
    ),
    "denied": (
        "corral_sandbox_network_egress_denied_packets_total",
        "Packets from the sandbox its egress allow-list dropped.",
    ),
}
"""A bridged sandbox's network counters (``stats``, ``inspect``) by the
Prometheus names and help they are exported under: counters (``_total``),
in the node exporter's words (``receive``/``transmit``), labelled by
sandbox and instance."""
