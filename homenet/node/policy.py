"""Which addresses a node may dial for a direct ``ip:port`` hop (default: none).

Pure decisions on values; resolution and dialing live in :mod:`homenet.node.dialer`.

Rules, in order:

1. The address is normalised first (IPv4-mapped, IPv4-compatible and NAT64 IPv6 spellings
   become the IPv4 address they carry), so one address has one verdict however it is written.
2. The node's own listening endpoint is never dialed (a route into itself is a loop).
3. A *guarded* address (loopback, link-local, unspecified, multicast, broadcast, cloud
   metadata) is allowed only by a rule that names its range explicitly: a rule that lies
   inside the guarded range (``127.0.0.1/32`` or ``127.0.0.0/8``, not ``0.0.0.0/0``).
   Metadata endpoints are their own ranges, so only a rule naming them exactly allows them.
4. Anything else is allowed when some ``--allow`` rule contains it.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from homenet.node.errors import Code, HomeNetError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

#: Cloud metadata services: reachable only when named exactly.
METADATA = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32", "168.63.129.16/32")
)

#: Ranges a broad rule never opens; most specific first so a rule is judged against the
#: narrowest guarded range that holds the address.
GUARDED: tuple[tuple[IPNetwork, str], ...] = (
    *((n, "cloud metadata") for n in METADATA),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv6Network("::1/128"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "unspecified"),
    (ipaddress.IPv6Network("::/128"), "unspecified"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
    (ipaddress.IPv4Network("255.255.255.255/32"), "broadcast"),
)


class PolicyError(HomeNetError):
    """A target the policy refuses; the message is safe to send to the client."""

    default_code = Code.FORBIDDEN


def normalise(addr: IPAddress) -> IPAddress:
    """Return the canonical address: IPv4 carried in IPv6 becomes IPv4; zone ids dropped."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(addr.packed)
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64:
            return ipaddress.IPv4Address(addr.packed[-4:])
        # IPv4-compatible (::a.b.c.d, deprecated) but not :: or ::1
        if addr.packed[:12] == bytes(12) and int(addr) > 1:
            return ipaddress.IPv4Address(addr.packed[-4:])
    return addr


def parse_rule(spec: str, lan: Callable[[], Iterable[IPNetwork]]) -> list[IPNetwork]:
    """Parse one ``--allow`` value: a CIDR, a bare address, or ``lan``."""
    if spec.strip().lower() == "lan":
        return list(lan())
    try:
        net = ipaddress.ip_network(spec.strip(), strict=False)
    except ValueError:
        raise ValueError(f"bad --allow {spec!r}: expected a CIDR like 192.168.1.0/24, or 'lan'") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = normalise(net.network_address)
        if isinstance(mapped, ipaddress.IPv4Address):
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return [net]


def interface_addresses() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Every address of this host's interfaces, with its prefix (zone ids dropped)."""
    import ifaddr

    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            host = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                out.append(ipaddress.ip_interface(f"{host.split('%', 1)[0]}/{ip.network_prefix}"))
            except ValueError:
                continue
    return out


def lan_networks() -> list[IPNetwork]:
    """The private subnets of this host's interfaces (what ``--allow lan`` means)."""
    return [
        i.network
        for i in interface_addresses()
        if i.network.is_private and not (i.network.is_loopback or i.network.is_link_local)
    ]


def local_addresses() -> list[IPAddress]:
    """Every address of this host's interfaces (what a wildcard bind listens on)."""
    return [normalise(i.ip) for i in interface_addresses()]


#: Seconds the host's interfaces are trusted before they are listed again (addresses change).
HOST_TTL = 5.0
T = TypeVar("T")


def refreshed(compute: Callable[[], T], seconds: float = HOST_TTL) -> Callable[[], T]:
    """``compute`` again at most every ``seconds`` (the same answer in between)."""
    last: list[tuple[float, T]] = []

    def get() -> T:
        now = time.monotonic()
        if not last or now - last[0][0] >= seconds:
            last[:] = [(now, compute())]
        return last[0][1]

    return get


#: This host's addresses now: an address added after the node started must not let it dial itself.
host_addresses = refreshed(lambda: frozenset(local_addresses()))
#: The private subnets this host is on now (where a discovered LAN service may be).
host_subnets = refreshed(lambda: tuple(lan_networks()))


@dataclass(frozen=True)
class TargetPolicy:
    """Allow rules for direct targets, plus the node's own endpoint (never dialed)."""

    allow: tuple[IPNetwork, ...] = ()
    own: tuple[tuple[IPAddress, int], ...] = ()
    #: This host's addresses (a wildcard listener is reached by any of them), asked at check time.
    local: Callable[[], frozenset[IPAddress]] = field(default=host_addresses, compare=False, repr=False)

    @classmethod
    def from_specs(cls, specs: Sequence[str], lan: Callable[[], Iterable[IPNetwork]] = lan_networks) -> TargetPolicy:
        rules: list[IPNetwork] = []
        for spec in specs:
            rules.extend(parse_rule(spec, lan))
        return cls(tuple(rules))

    def with_own(self, addr: IPAddress, port: int) -> TargetPolicy:
        """The same policy that also refuses ``addr:port`` (the node's own listener)."""
        return TargetPolicy(self.allow, (*self.own, (normalise(addr), port)), self.local)

    def _is_local(self, addr: IPAddress) -> bool:
        return addr.is_loopback or addr.is_unspecified or addr in self.local()

    def check(self, addr: IPAddress, port: int) -> None:
        """Raise :class:`PolicyError` unless dialing ``addr:port`` is allowed."""
        addr = normalise(addr)
        for own_addr, own_port in self.own:
            if port == own_port and (addr == own_addr or (own_addr.is_unspecified and self._is_local(addr))):
                raise PolicyError(f"{_fmt(addr, port)} is this node's own listener")
        guarded = next(((net, kind) for net, kind in GUARDED if addr in net), None)
        for rule in self.allow:
            if rule.version != addr.version or addr not in rule:
                continue
            if guarded is None or rule.subnet_of(guarded[0]):  # type: ignore[arg-type]
                return
        if guarded is not None:
            raise PolicyError(
                f"{_fmt(addr, port)} is {guarded[1]}; allowed only if named explicitly (--allow {guarded[0]})"
            )
        raise PolicyError(f"{_fmt(addr, port)} is not allowed here (the node operator can add --allow CIDR)")


def _fmt(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
