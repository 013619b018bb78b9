"""corral's nftables table, ``inet corral``: NAT and forwarding for its
bridges, and nothing else of the host's touched.

The whole table is written in one ``nft -j -f -`` transaction (JSON: no
quoting of names into a rule language, and the kernel applies it all or
nothing): the table is added, flushed, and its chains and rules made again
from the networks in use. When none is, the table is deleted.

Why ``nft -j`` rather than libnftables through Python bindings: Debian's
bindings (python3-nftables) are a system package outside the venv, and
the table changes only when a network is set up or torn down, not per
sandbox: one ``nft`` run costs ~4 ms here, against a sandbox start of
~100 ms it is not on the path of (docs/network.md).

Rules, per bridge ``B`` with subnet ``S``:

- forward (filter), first: ``iifname B oifname {the other bridges} ct
  status ! dnat drop``: networks are isolated from each other, as Docker's
  are; only a published port (DNAT-ed) is reached from another network,
  as it is from anywhere;
- postrouting (nat): ``ip saddr S oifname != B masquerade``: the sandboxes
  reach the outside with the host's address;
- forward (filter): ``iifname B accept`` (from the sandboxes),
  ``oifname B ct state established,related accept`` (replies to them),
  ``oifname B drop`` (nothing else comes in, until published ports);
- and, if corral turned IPv4 forwarding on (it was off), a last ``drop``
  in forward: the host, which forwarded nothing before, forwards nothing
  but its bridges' traffic now.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..._errors import SandboxError

TYPE_CHECKING = False  # typing's, without importing it at run time: see _runtime/_tuples.py
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from .._tuples import NamedTuple

if TYPE_CHECKING:
    from ipaddress import IPv4Network

__all__ = [
    "TABLE",
    "Bridge",
    "Egress",
    "Forward",
    "apply",
    "counter_name",
    "counters",
    "delete",
    "objects",
]

TABLE = "corral"


class Forward(NamedTuple):
    """A published port: the host's (*host_ip* or every address) to a sandbox's."""

    host_ip: str | None
    host_port: int
    proto: str
    address: str
    port: int


class Egress(NamedTuple):
    """A sandbox (by *address*) allowed to connect only to *allowed*
    (``ADDRESS/LEN`` or ``ADDRESS/LEN:PORT/PROTO``; none if empty); what
    else it sends is dropped and counted in the named counter *counter*.
    Its bridge port *port* (its veth's host end) lets out only frames from
    its *mac* and its *address*: the allow-list, keyed by the source
    address, cannot be walked around by sending as another sandbox."""

    address: str
    allowed: tuple[str, ...]
    counter: str
    port: str = ""
    mac: str = ""


class Bridge(NamedTuple):
    """What the rules need of one network."""

    name: str
    subnet: str
    forwards: tuple[Forward, ...] = ()
    egress: tuple[Egress, ...] = ()
    subnet6: str | None = None
    """Its IPv6 prefix, masqueraded as its IPv4 subnet is (None: no IPv6)."""


def counter_name(sandbox: str) -> str:
    """The named counter of *sandbox*'s denied packets."""
    import hashlib

    return "denied-" + hashlib.sha256(sandbox.encode()).hexdigest()[:12]


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": list(expr)}}}


def _is(key: str, value: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def ruleset(
    bridges: Sequence[Bridge],
    drop_other_forwarding: bool,
    existing: tuple[set[str], set[str]] = (set(), set()),
) -> dict[str, Any]:
    """The table's contents as nft's JSON commands. The rules are flushed
    and made again; sets and named counters are objects that outlive the
    flush: a counter of a sandbox still there is never made again (a
    packet it counted while the table was being rewritten would be lost),
    and those of *existing* (set names, counter names) no longer wanted
    are deleted."""
    table = {"family": "inet", "name": TABLE}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": table}},
        {"flush": {"table": table}},
        {
            "add": {
                "chain": {
                    **{"family": "inet", "table": TABLE, "name": "postrouting"},
                    **{"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
                }
            }
        },
        {
            "add": {
                "chain": {
                    **{"family": "inet", "table": TABLE, "name": "forward"},
                    **{"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
                }
            }
        },
    ]
    for name, hook in (("prerouting", "prerouting"), ("output", "output")):
        cmds.append(
            {
                "add": {
                    "chain": {
                        **{"family": "inet", "table": TABLE, "name": name},
                        **{"type": "nat", "hook": hook, "prio": -100, "policy": "accept"},
                    }
                }
            }
        )
    cmds.append(
        {
            "add": {
                "chain": {
                    **{"family": "inet", "table": TABLE, "name": "input"},
                    **{"type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
                }
            }
        }
    )
    names = [b.name for b in bridges]
    for b in bridges:
        others = [n for n in names if n != b.name]
        if others:
            cmds.append(
                _rule(
                    "forward",
                    _is("iifname", b.name),
                    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                               "right": {"set": others}}},
                    {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                    {"drop": None},
                )
            )  # fmt: skip
    wanted: tuple[set[str], set[str]] = (set(), set())
    for b in bridges:
        cmds += _egress(b, wanted)
        addr, _, length = b.subnet.partition("/")
        saddr = {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": addr, "len": int(length)}},
            }
        }
        cmds.append(_rule("postrouting", saddr, _is("oifname", b.name, "!="), {"masquerade": None}))
        if b.subnet6:
            addr6, _, length6 = b.subnet6.partition("/")
            saddr6 = {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                    "right": {"prefix": {"addr": addr6, "len": int(length6)}},
                }
            }
            cmds.append(
                _rule("postrouting", saddr6, _is("oifname", b.name, "!="), {"masquerade": None})
            )
        if b.forwards:
            cmds += _published(b)
        cmds.append(_rule("forward", _is("iifname", b.name), {"accept": None}))
        state = {
            "match": {
                "op": "in",
                "left": {"ct": {"key": "state"}},
                "right": ["established", "related"],
            }
        }
        cmds.append(_rule("forward", _is("oifname", b.name), state, {"accept": None}))
        dnat = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
        cmds.append(_rule("forward", _is("oifname", b.name), dnat, {"accept": None}))
        cmds.append(_rule("forward", _is("oifname", b.name), {"drop": None}))
    if drop_other_forwarding:
        cmds.append(_rule("forward", {"drop": None}))
    # Last: no rule refers to them any more (the flush came first).
    cmds += _stale(existing, wanted)
    cmds += _ports(bridges)
    return {"nftables": cmds}


def _ports(bridges: Sequence[Bridge]) -> list[dict[str, Any]]:
    """The table ``bridge corral``: on the bridge port of each sandbox with
    an allow-list, before anything else sees the frame, only its own MAC
    and address go out, and only IPv4 and ARP. Without it a sandbox with
    ``CAP_NET_RAW`` (Docker's default set has it) would send with another
    sandbox's address, which no allow-list restricts, through a packet
    socket; and IPv6, which it has no address for, would reach the host's
    link-local addresses, which the (IPv4) allow-list does not cover."""
    table = {"family": "bridge", "name": TABLE}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": table}},
        {"flush": {"table": table}},
        {
            "add": {
                "chain": {
                    **{"family": "bridge", "table": TABLE, "name": "ports"},
                    **{"type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"},
                }
            }
        },
    ]

    def rule(port: str, *expr: dict[str, Any]) -> dict[str, Any]:
        match = _is("iifname", port)
        body = [match, *expr, {"drop": None}]
        return {"add": {"rule": {"family": "bridge", "table": TABLE, "chain": "ports",
                                 "expr": body}}}  # fmt: skip

    def differs(protocol: str, field: str, value: str) -> dict[str, Any]:
        return {"match": {"op": "!=", "left": {"payload": {"protocol": protocol, "field": field}},
                          "right": value}}  # fmt: skip

    for b in bridges:
        for e in b.egress:
            if not e.port:
                continue
            kinds = {"match": {"op": "!=", "left": {"meta": {"key": "protocol"}},
                               "right": {"set": ["ip", "arp"]}}}  # fmt: skip
            cmds += [
                rule(e.port, differs("ether", "saddr", e.mac)),
                rule(e.port, kinds),
                rule(e.port, differs("ip", "saddr", e.address)),
                rule(e.port, differs("arp", "saddr ip", e.address)),
                rule(e.port, differs("arp", "saddr ether", e.mac)),
            ]
    return cmds


def _stale(existing: tuple[set[str], set[str]], wanted: tuple[set[str], set[str]]) -> list[Any]:
    cmds: list[dict[str, Any]] = []
    for kind, have, want in (("set", existing[0], wanted[0]), ("counter", existing[1], wanted[1])):
        for name in sorted(have - want):
            cmds.append({"delete": {kind: {"family": "inet", "table": TABLE, "name": name}}})
    return cmds


def _egress(b: Bridge, wanted: tuple[set[str], set[str]]) -> list[dict[str, Any]]:
    """The egress allow-lists: for each restricted sandbox, in forward (to
    the outside, other sandboxes through the host) and input (the host
    itself), what it may reach is accepted, replies too, and the rest is
    counted and dropped. Sets hold the lists: one lookup, however long."""
    cmds: list[dict[str, Any]] = []
    if not b.egress:
        return cmds
    state = {
        "match": {
            "op": "in",
            "left": {"ct": {"key": "state"}},
            "right": ["established", "related"],
        }
    }
    for chain in ("forward", "input"):
        cmds.append(_rule(chain, _is("iifname", b.name), state, {"accept": None}))
    for e in b.egress:
        # Added only if missing: an existing counter keeps what it counted.
        cmds.append({"add": {"counter": {"family": "inet", "table": TABLE, "name": e.counter}}})
        wanted[1].add(e.counter)
        tag = e.counter.removeprefix("denied-")
        saddr = {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": e.address,
            }
        }
        nets, services = _merged(e.allowed)
        accepts: list[list[dict[str, Any]]] = []
        if nets:
            name = f"egress-{tag}-net"
            wanted[0].add(name)
            cmds += _set(name, "ipv4_addr", [_prefix(str(x)) for x in nets])
            accepts.append([{"match": {"op": "==", "left": _daddr(), "right": f"@{name}"}}])
        if services:
            name = f"egress-{tag}-svc"
            wanted[0].add(name)
            elements = [
                {"concat": [_prefix(str(net)), proto, port]} for net, proto, port in services
            ]
            cmds += _set(name, ["ipv4_addr", "inet_proto", "inet_service"], elements)
            key = {
                "concat": [
                    _daddr(),
                    {"meta": {"key": "l4proto"}},
                    {"payload": {"protocol": "th", "field": "dport"}},
                ]
            }
            accepts.append([{"match": {"op": "==", "left": key, "right": f"@{name}"}}])
        for chain in ("forward", "input"):
            for match in accepts:
                cmds.append(_rule(chain, _is("iifname", b.name), saddr, *match, {"accept": None}))
            cmds.append(
                _rule(chain, _is("iifname", b.name), saddr, {"counter": e.counter}, {"drop": None})
            )
    return cmds


def _merged(
    allowed: Sequence[str],
) -> tuple[list[IPv4Network], list[tuple[IPv4Network, str, int]]]:
    """*allowed*'s networks, and its (network, protocol, port) services,
    with no two that overlap: nft refuses an interval set whose elements
    do ("conflicting intervals specified"), which a list can easily have
    once names are resolved (a name with an address inside a listed CIDR,
    two names with one address). Overlapping networks are merged into the
    larger; so are those of a service with the same protocol and port."""
    from ipaddress import IPv4Network, collapse_addresses  # egress rules only

    nets: list[IPv4Network] = []
    by_service: dict[tuple[str, int], list[IPv4Network]] = {}
    for entry in allowed:
        net, sep, service = entry.partition(":")
        if not sep:
            nets.append(IPv4Network(net))
            continue
        port, _, proto = service.partition("/")
        by_service.setdefault((proto, int(port)), []).append(IPv4Network(net))
    services = [
        (net, proto, port)
        for (proto, port), group in sorted(by_service.items())
        for net in collapse_addresses(group)
    ]
    return list(collapse_addresses(nets)), services


def _daddr() -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": "daddr"}}


def _prefix(cidr: str) -> dict[str, Any]:
    addr, _, length = cidr.partition("/")
    return {"prefix": {"addr": addr, "len": int(length or 32)}}


def _set(name: str, kind: str | list[str], elements: list[Any]) -> list[dict[str, Any]]:
    """A set with exactly *elements* (made if missing, emptied, filled)."""
    ref = {"family": "inet", "table": TABLE, "name": name}
    return [
        {"add": {"set": {**ref, "type": kind, "flags": ["interval"]}}},
        {"flush": {"set": ref}},
        {"add": {"element": {**ref, "elem": elements}}},
    ]


def objects() -> tuple[set[str], set[str]]:
    """The names of the sets and named counters of corral's table (none if
    there is no table)."""
    import subprocess

    try:
        proc = subprocess.run(
            ["nft", "-j", "list", "table", "inet", TABLE],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return set(), set()
    sets: set[str] = set()
    named: set[str] = set()
    if proc.returncode != 0:
        return sets, named
    try:
        for item in json.loads(proc.stdout).get("nftables", []):
            if isinstance(item.get("set"), dict):
                sets.add(str(item["set"]["name"]))
            elif isinstance(item.get("counter"), dict) and "name" in item["counter"]:
                named.add(str(item["counter"]["name"]))
    except (ValueError, TypeError, AttributeError, KeyError):
        pass
    return sets, named


def counters() -> dict[str, tuple[int, int]]:
    """The named counters of corral's table: name -> (packets, bytes);
    empty if there is no table."""
    import subprocess

    try:
        proc = subprocess.run(
            ["nft", "-j", "list", "counters", "table", "inet", TABLE],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    out = {}
    try:
        for item in json.loads(proc.stdout).get("nftables", []):
            c = item.get("counter")
            if isinstance(c, dict) and "name" in c:
                out[str(c["name"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    except (ValueError, TypeError, AttributeError):
        return {}
    return out


def _published(b: Bridge) -> list[dict[str, Any]]:
    """DNAT of the published ports, for traffic to the host's own addresses
    from outside (prerouting) and from the host itself (output), and the
    masquerades that make the replies come back the same way: from the
    host's loopback (which ``route_localnet`` on the bridge lets out), and
    a sandbox reaching another through the host's address (hairpin)."""
    ipv4 = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
    local = {
        "match": {
            "op": "==",
            "left": {"fib": {"result": "type", "flags": ["daddr"]}},
            "right": "local",
        }
    }
    cmds = []
    for f in b.forwards:
        match: list[dict[str, Any]] = [ipv4, local]
        if f.host_ip:
            match.append(
                {
                    "match": {
                        "op": "==",
                        "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                        "right": f.host_ip,
                    }
                }
            )
        match.append(
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": f.proto, "field": "dport"}},
                    "right": f.host_port,
                }
            }
        )
        to = {"dnat": {"family": "ip", "addr": f.address, "port": f.port}}
        cmds.append(_rule("prerouting", *match, to))
        cmds.append(_rule("output", *match, to))
    dnat = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
    loopback = {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
            "right": {"prefix": {"addr": "127.0.0.0", "len": 8}},
        }
    }
    cmds.append(_rule("postrouting", loopback, _is("oifname", b.name), {"masquerade": None}))
    cmds.append(_rule("postrouting", _is("iifname", b.name), _is("oifname", b.name), dnat,
                      {"masquerade": None}))  # fmt: skip
    return cmds


def apply(bridges: Sequence[Bridge], drop_other_forwarding: bool, lock: int = -1) -> None:
    """Make corral's table what *bridges* need (one transaction), keeping
    what the denied-packet counters of the sandboxes still there counted.
    ``nft`` is given *lock* (the networks' lock, held by the caller): if
    the caller is killed, the lock stays held until ``nft`` has finished,
    so that a sweep never runs before a table it would have removed is
    written."""
    existing = objects()
    _nft(ruleset(bridges, drop_other_forwarding, existing), lock=lock)


def delete(lock: int = -1) -> None:
    """Remove corral's tables, those that exist (*lock*: see :func:`apply`)."""
    cmds: list[dict[str, Any]] = []
    for family in ("inet", "bridge"):
        # Added first: one transaction removes both, whichever was there.
        table = {"family": family, "name": TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}]
    _nft({"nftables": cmds}, lock=lock)


def _nft(doc: dict[str, Any], missing_ok: bool = False, lock: int = -1) -> None:
    import subprocess

    try:
        proc = subprocess.run(
            ["nft", "-j", "-f", "-"],
            input=json.dumps(doc),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            pass_fds=(lock,) if lock >= 0 else (),
        )
    except FileNotFoundError:
        raise SandboxError("network: nft not found (apt-get install nftables)") from None
    except subprocess.TimeoutExpired:
        raise SandboxError("network: nft did not answer in 30 s") from None
    if proc.returncode != 0:
        if missing_ok and "No such file or directory" in proc.stderr:
            return
        said = proc.stderr.strip().splitlines()
        raise SandboxError(
            f"network: nft refused corral's table: {said[0] if said else proc.returncode}"
        )
