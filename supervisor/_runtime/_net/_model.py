"""The ``network`` setting of a sandbox, checked (plain text, no I/O)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..._errors import SpecError

__all__ = [
    "NETWORK_MODES",
    "Port",
    "check_ports",
    "is_host_name",
    "parse_egress",
    "parse_network",
    "parse_port",
]

NETWORK_MODES = ("none", "bridge", "host")
"""What ``network`` may be (besides ``sandbox:NAME``)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_network(value: object, field: str = "network") -> str:
    """A sandbox's network mode: ``none``, ``bridge``, ``host`` or
    ``sandbox:NAME`` (the network namespace of the running sandbox NAME)."""
    if isinstance(value, str) and value.startswith("sandbox:"):
        if not _NAME.match(value[len("sandbox:") :]):
            raise SpecError(field, f"expected sandbox:NAME with a sandbox's name, got {value!r}")
        return value
    if not isinstance(value, str) or value not in NETWORK_MODES:
        raise SpecError(
            field, f"expected one of {', '.join(NETWORK_MODES)} or sandbox:NAME, got {value!r}"
        )
    return value


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
    if out and network != "bridge":
        raise SpecError("ports", "only a sandbox with network = 'bridge' publishes ports")
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
