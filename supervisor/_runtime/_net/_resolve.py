"""Host names in an egress allow-list, turned into addresses when the
sandbox starts.

The kernel filters addresses, not names: each name of a sandbox's
``egress`` is resolved once, by the host's resolver (``getaddrinfo``:
``/etc/hosts``, then DNS, as ``/etc/nsswitch.conf`` says), when the sandbox
is created — and again when it is restarted, which creates it anew. Every
IPv4 address the name has then is allowed; the name is not followed
afterwards (docs/network.md says why).
"""

from __future__ import annotations

from ..._errors import SandboxError

__all__ = ["resolve_egress"]


def resolve_egress(
    allowed: tuple[str, ...] | None, field: str = "egress"
) -> tuple[str, ...] | None:
    """*allowed* (normalized by :func:`~._model.parse_egress`) with each
    host name replaced by every IPv4 address it resolves to now (as
    ``ADDRESS/32``, its ``:PORT/PROTO`` kept). Raises
    :class:`~supervisor.SandboxError` naming *field* and the name if a
    name does not resolve. Blocks for as long as the resolver takes: call
    it from a worker thread, never from the event loop."""
    import ipaddress

    if not allowed:
        return allowed
    out: list[str] = []
    found: dict[str, list[str]] = {}
    for entry in allowed:
        host, sep, service = entry.partition(":")
        try:
            ipaddress.IPv4Network(host)
        except ValueError:
            pass
        else:
            out.append(entry)
            continue
        if host not in found:
            found[host] = _addresses(host, field)
        out += [f"{address}/32{sep}{service}" for address in found[host]]
    return tuple(dict.fromkeys(out))


def _addresses(name: str, field: str) -> list[str]:
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SandboxError(f"{field}: cannot resolve {name!r}: {exc.strerror}") from None
    except UnicodeError:  # pragma: no cover - parse_egress lets only ASCII names through
        raise SandboxError(f"{field}: cannot resolve {name!r}: not a valid host name") from None
    addresses = sorted({str(info[4][0]) for info in infos}, key=ipaddress.IPv4Address)
    if not addresses:  # pragma: no cover - getaddrinfo raises rather than answer nothing
        raise SandboxError(f"{field}: {name!r} has no IPv4 address")
    return addresses
