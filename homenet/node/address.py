"""HomeNet addresses: ``hn://HOST[:PORT]/HOP[/HOP...]`` and the hops they are made of.

The scheme says how the client reaches the route's first node: ``hn`` (TCP), ``hns`` (TLS),
``ws`` (a WebSocket, for clients behind proxies that pass only HTTP) or ``wss`` (a WebSocket
over TLS). The hops after it are the same whatever the transport.

Pure values and parsing; nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from homenet.node.errors import UsageError

DEFAULT_PORT = 6969
MAX_HOPS = 8

_LISTEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
#: scheme -> (TLS, WebSocket) for the connection to a route's first node.
SCHEMES = {"hn": (False, False), "hns": (True, False), "ws": (False, True), "wss": (True, True)}
_SCHEME_OF = {flags: scheme for scheme, flags in SCHEMES.items()}


class AddressError(UsageError, ValueError):
    """A URL, hop or host:port that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host (IPv4/IPv6 literal or DNS name) and a TCP port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenId:
    """A hop naming a listener (or a discovered service) known to the previous hop."""

    value: str

    def __str__(self) -> str:
        return self.value


Hop = Endpoint | ListenId


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed ``hn://`` URL: where to connect first, then the hops to ask for in order.

    ``tls`` and ``ws`` say how the first node is reached (TLS, a WebSocket, both: ``wss://``).
    """

    entry: Endpoint
    hops: tuple[Hop, ...]
    tls: bool = False
    ws: bool = False

    @property
    def scheme(self) -> str:
        return _SCHEME_OF[self.tls, self.ws]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.entry}" + "".join(f"/{h}" for h in self.hops)

    def prefix(self, n: int) -> Route:
        """The route through the first ``n`` hops (``hn://relay/home1`` for n=1)."""
        return Route(self.entry, self.hops[:n], self.tls, self.ws)


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def _numeric_spelling(host: str) -> bool:
    """True for legacy IPv4 spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) that
    resolvers turn into addresses: only the dotted-quad form is an address here."""
    try:
        socket.inet_aton(host)
    except OSError:
        return host.replace(".", "").isdigit()
    return True


def parse_port(text: str, what: str = "port") -> int:
    """Parse a TCP port 1-65535 (0 is refused: it names no service)."""
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 65535:
        raise AddressError(f"bad {what} {text!r}: expected a number 1-65535")
    return int(text)


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """Parse ``IPv4:port``, ``[IPv6]:port`` or ``hostname:port`` (port optional with a default)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"bad IPv6 address {host!r}") from None
        if "%" in host:
            raise AddressError(f"bad address {text!r}: zone ids are not supported")
        host = str(ip)
        if rest.startswith(":"):
            port = parse_port(rest[1:])
        elif not rest and default_port is not None:
            port = default_port
        else:
            raise AddressError(f"bad address {text!r}: expected [IPv6]:port")
        return Endpoint(host, port)
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = text, ""
    if ":" in host:
        raise AddressError(f"bad address {text!r}: write IPv6 addresses as [addr]:port")
    if not port_s:
        if default_port is None:
            raise AddressError(f"bad address {text!r}: expected host:port")
        port = default_port
    else:
        port = parse_port(port_s)
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if not _valid_hostname(host) or _numeric_spelling(host.rstrip(".")):
            raise AddressError(f"bad host {host!r}: expected an IPv4 address or a DNS name") from None
        host = host.lower().rstrip(".")
    return Endpoint(host, port)


def parse_hop(text: str) -> Hop:
    """Parse one hop: a listenId, or a target ``host:port`` the previous hop dials itself."""
    if ":" in text or text.startswith("["):
        return parse_endpoint(text)
    if _LISTEN_ID.fullmatch(text):
        return ListenId(text)
    raise AddressError(f"bad hop {text!r}: expected a listenId ([A-Za-z0-9_-]{{1,64}}) or host:port")


def parse_url(url: str) -> Route:
    """Parse ``hn://HOST[:PORT]/HOP[/HOP...]`` (``hns://`` asks for TLS, ``ws://`` for a
    WebSocket, ``wss://`` for both)."""
    scheme, sep, rest = url.partition("://")
    transport = SCHEMES.get(scheme) if sep else None
    if transport is None:
        raise AddressError(f"bad URL {url!r}: expected hn://HOST[:PORT]/HOP... (or hns://, ws://, wss://)")
    authority, _, path = rest.partition("/")
    if not authority:
        raise AddressError(f"bad URL {url!r}: missing host")
    entry = parse_endpoint(authority, DEFAULT_PORT)
    parts = path.split("/") if path else []
    if parts and parts[-1] == "":
        parts.pop()  # tolerate one trailing slash
    if any(p == "" for p in parts):
        raise AddressError(f"bad URL {url!r}: empty hop")
    if len(parts) > MAX_HOPS:
        raise AddressError(f"bad URL {url!r}: more than {MAX_HOPS} hops")
    return Route(entry, tuple(parse_hop(p) for p in parts), *transport)
