"""Sandbox networking: modes, the corral bridge, addresses, NAT, DNS files.

``network`` of a sandbox (docs/network.md):

- ``none`` (the default): a network namespace of its own with ``lo`` only;
- ``bridge``: the same, plus ``eth0``, one end of a veth pair whose other
  end is on the bridge of corral's network (``corral0``), an address leased
  from that network's subnet, a default route through the bridge, and NAT
  to the outside (:mod:`._bridge`);
- ``host``: the host's network namespace (no isolation of the network).

All netlink work is done through pyroute2 (:mod:`._links`); the rules are
corral's own nftables table ``inet corral``, applied whole, atomically,
with ``nft -j`` (:mod:`._nft`).
"""

from __future__ import annotations

from ._model import NETWORK_MODES, Port, check_ports, parse_egress, parse_network, parse_port

__all__ = ["NETWORK_MODES", "Port", "check_ports", "parse_egress", "parse_network", "parse_port"]
