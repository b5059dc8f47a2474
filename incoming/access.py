"""Who may call the backend API, and where handovers may go (docs/deployment/access.rst).

Safe by default: the backend API and metrics on a listener that also serves browsers
answer only this host and `--backend-networks`, and a ticket's `signalFinishURL`
must name the host that asked for it or one of `--handover-hosts`; otherwise anyone
reaching the port could mint tickets, fill the disk and make the server POST to
internal URLs. `--open-access` restores the 2014 server's openness.

A request from a proxy on this host (nginx) that names its client in `Forwarded`,
`X-Forwarded-For` or `X-Real-IP` is judged by that client (the last entry, the one
the nearest proxy wrote); a proxy on this host that names nobody is this host.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from twisted.internet import address as tw_address
from twisted.internet.threads import deferToThread
from twisted.web.iweb import IRequest

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
_RELAY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


@dataclass(frozen=True)
class Caller:
    """Where a request came from: its addresses (empty: a Unix socket, or a proxy's
    header that names none) and whether that is this host."""

    addresses: frozenset[Address]
    local: bool

    def describe(self) -> str:
        return ", ".join(sorted(map(str, self.addresses))) or "an unknown address"


def caller_of(request: IRequest) -> Caller:
    peer, own = request.getClientAddress(), request.getHost()
    if not isinstance(peer, tw_address.IPv4Address | tw_address.IPv6Address):
        return Caller(frozenset(), True)  # a Unix socket: a process of this host
    address = _address(peer.host)
    own_address = _address(getattr(own, "host", ""))
    if address is None or not (address.is_loopback or address == own_address):
        return Caller(frozenset(filter(None, [address])), False)
    relayed = [_relayed_client(name, request) for name in _RELAY_HEADERS]
    named = [_address(text) for text in relayed if text is not None]
    if not named:
        return Caller(frozenset(filter(None, [address, own_address])), True)
    if None in named:  # a header that names no address: nobody we know
        return Caller(frozenset(), False)
    addresses = frozenset(a for a in named if a is not None)
    return Caller(addresses, all(a.is_loopback for a in addresses))


@dataclass(frozen=True)
class Access:
    """The rules: `networks` may call the backend API besides this host; handovers may
    go to the caller's own host and to `handover_hosts`; `open` lifts both."""

    networks: frozenset[Network] = frozenset()
    handover_hosts: frozenset[str] = frozenset()
    open: bool = False

    def may_call(self, caller: Caller) -> bool:
        if self.open or caller.local:
            return True
        return bool(caller.addresses) and all(
            any(a in n for n in self.networks) for a in caller.addresses
        )

    async def handover_refusal(self, host: str, caller: Caller) -> str | None:
        """Why a ticket for `caller` may not hand over to `host`; None if it may. A name
        must resolve to the caller's addresses only (for this host: also loopback)."""
        host = host.lower().rstrip(".")
        if self.open or host in self.handover_hosts:
            return None
        literal = _address(host.strip("[]"))
        addresses = frozenset({literal}) if literal is not None else await resolve(host)
        if not addresses:
            return f"signalFinishURL host {host!r} does not resolve"
        if all(a in caller.addresses or (caller.local and a.is_loopback) for a in addresses):
            return None
        return (
            f"signalFinishURL host {host!r} is not the caller's ({caller.describe()}); "
            "allow it with --handover-hosts"
        )


async def resolve(host: str) -> frozenset[Address]:
    """The addresses of `host` (an address itself, or a name, resolved in a thread)."""
    literal = _address(host.strip("[]"))
    if literal is not None:
        return frozenset({literal})
    try:
        infos: list[Any] = await deferToThread(
            socket.getaddrinfo, host, None, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(filter(None, (_address(info[4][0]) for info in infos)))


@lru_cache(maxsize=4096)  # the same few callers and backends, a ticket after another
def _address(text: str) -> Address | None:
    """An IP address (an IPv4 one mapped into IPv6 as the IPv4 address); None if not one."""
    try:
        address = ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _relayed_client(header: bytes, request: IRequest) -> str | None:
    """The client the nearest proxy named in `header` (the last entry, which is the one it
    wrote), as text, maybe no address at all (`unknown`, `_hidden`); None if absent."""
    values = request.requestHeaders.getRawHeaders(header)
    if not values:
        return None
    last: str = values[-1].decode("latin-1").split(",")[-1].strip()
    if header == b"forwarded":
        pairs = (p.partition("=") for p in last.split(";"))
        last = next((v.strip() for k, _, v in pairs if k.strip().lower() == "for"), "")
    last = last.strip('"')
    if last.startswith("["):  # [v6]:port
        last = last[1:].partition("]")[0]
    elif last.count(":") == 1:  # v4:port
        last = last.partition(":")[0]
    return last
