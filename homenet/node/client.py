"""The client side of the data plane: open a route through a chain of nodes.

The requests of every hop (and the caller's first payload) go out in one write; the replies
come back in order, one per hop, as each node splices to the next. The first node is reached
over the route's transport: TCP (``hn://``), TLS (``hns://``), or a WebSocket tunnel
(``ws://``, ``wss://``); either way the caller gets a plain socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from homenet.node.address import Endpoint, Route
from homenet.node.auth import Credentials
from homenet.node.dialer import connect_first, describe_os_error, system_resolve
from homenet.node.errors import Code, HomeNetError
from homenet.node.preamble import NEED_DATA, ProtocolError, Reply, ReplyParser, Verb, encode_request
from homenet.node.tls import TLSError, client_context, connect_tls
from homenet.node.wstunnel import TunnelError, host_header, start_tunnel


class RouteFailed(HomeNetError):
    """A route could not be opened; the message is one line naming the hop and the reason.

    ``code`` is the failing hop's reply code (BAD_GATEWAY when no node answered), ``hop`` its
    index in the route (None when the first node could not be reached).
    """

    default_code = Code.BAD_GATEWAY

    def __init__(self, message: str, code: Code | None = None, hop: int | None = None) -> None:
        super().__init__(message, code)
        self.hop = hop


@dataclass(slots=True)
class Opened:
    """A socket spliced to the route's last hop, and target bytes that came with the replies."""

    sock: socket.socket
    early: bytes
    #: The last reply read (the final request's, when one was given and awaited).
    last: Reply | None = None
    parser: ReplyParser | None = None


@dataclass(frozen=True, slots=True)
class Dialing:
    """How a client opens routes: a deadline for each, the key it signs with, TLS for hns://."""

    timeout: float = 10.0
    creds: Credentials | None = None
    tls: ssl.SSLContext | None = None

    async def open(self, route: Route, **kw: Any) -> Opened:
        """:func:`open_route` with these options (``kw``: its other arguments)."""
        return await open_route(route, timeout=self.timeout, creds=self.creds, tls=self.tls, **kw)

    async def connect(self, route: Route) -> socket.socket:
        """:func:`connect_node` with these options: a connection to the route's first node."""
        return await connect_node(route, self.timeout, self.tls)


async def dial_endpoint(
    ep: Endpoint, timeout: float, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> socket.socket:
    """Connect to a node's endpoint (any address it resolves to), over TLS if ``tls`` is given
    (verifying the node as ``server_hostname``, by default the endpoint's host)."""
    sock = await _dial(ep, timeout)
    if tls is None:
        return sock
    try:
        return await connect_tls(sock, tls, server_hostname or ep.host, timeout)
    except TLSError as exc:
        raise RouteFailed(f"{ep}: {exc}") from None


async def _dial(ep: Endpoint, timeout: float) -> socket.socket:
    try:
        addrs = [ipaddress.ip_address(ep.host)]
    except ValueError:
        try:
            async with asyncio.timeout(timeout):
                addrs = await system_resolve(ep.host, ep.port)
        except (OSError, TimeoutError) as exc:
            raise RouteFailed(f"cannot resolve {ep.host}: {exc}") from None
    try:
        sock, _ = await connect_first(addrs, ep.port, timeout)
    except TimeoutError:
        raise RouteFailed(f"cannot reach node {ep}: timed out") from None
    except OSError as exc:
        raise RouteFailed(f"cannot reach node {ep}: {describe_os_error(exc)}") from None
    return sock


async def connect_node(
    route: Route, timeout: float, tls: ssl.SSLContext | None = None, via: Endpoint | None = None
) -> socket.socket:
    """A plain socket to the first node of ``route``, over the route's transport: what is
    sent on it reaches that node as a client's connection would (no request is sent).

    ``hns://`` and ``wss://`` speak TLS (``tls``, else the system store) and verify the node
    by the route's host, also when ``via`` (another address of that node) is dialed.
    """
    if route.tls and tls is None:
        try:
            tls = client_context()
        except TLSError as exc:
            raise RouteFailed(str(exc)) from None
    ep = via or route.entry
    if not route.ws:
        return await dial_endpoint(ep, timeout, tls if route.tls else None, route.entry.host)
    sock = await _dial(ep, timeout)
    try:
        tunnel = await start_tunnel(
            sock, host=host_header(route.entry), tls=tls if route.tls else None,
            server_hostname=route.entry.host, timeout=timeout,
        )  # fmt: skip
    except (TunnelError, TLSError) as exc:
        raise RouteFailed(f"{ep}: {exc}") from None
    return tunnel.sock


def route_requests(route: Route, creds: Credentials | None = None) -> bytes:
    """The pipelined request lines for every hop of ``route``, each signed with ``creds``."""
    lines = []
    for hop in route.hops:
        arg = str(hop)
        token = creds.token(f"HN/1 CONNECT {arg}") if creds is not None else None
        lines.append(encode_request(Verb.CONNECT, arg, token))
    return b"".join(lines)


async def next_reply(sock: socket.socket, parser: ReplyParser) -> Reply:
    """Read until ``parser`` has the next reply (no deadline: callers set one)."""
    loop = asyncio.get_running_loop()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await loop.sock_recv(sock, 65536))
    assert isinstance(event, Reply)
    return event


async def _replies(route: Route, sock: socket.socket, parser: ReplyParser, names: list[str]) -> Reply | None:
    """Read one reply per request (``names``: what each asked for); the last one, or RouteFailed
    naming the hop that refused."""
    last: Reply | None = None
    for i, name in enumerate(names):
        last = await next_reply(sock, parser)
        if not last.ok:
            where = route.prefix(i) if i else route.entry
            reason = f"{where} refused {name}: {last.code.slug} ({int(last.code)}) {last.reason}".rstrip()
            raise RouteFailed(reason, last.code, i)
    return last


async def open_route(
    route: Route,
    *,
    first: bytes = b"",
    timeout: float = 10.0,
    final: bytes | None = None,
    wait_final: bool = True,
    creds: Credentials | None = None,
    tls: ssl.SSLContext | None = None,
    via: Endpoint | None = None,
) -> Opened:
    """Connect through every hop of ``route``; ``first`` is sent along with the requests.

    ``via`` is another address of the route's first node to connect to (a relay's own
    address behind a load balancer); TLS still verifies the node's name from the route.

    ``final`` is one more request line for the last node (a listener's TICKET or POOL); its
    reply is awaited too unless ``wait_final`` is False (the caller reads it later).
    An ``hns://`` route speaks TLS to its first node (``tls``, else the system store); a
    ``ws://`` or ``wss://`` route reaches it through a WebSocket tunnel (:func:`connect_node`).
    """
    if not route.hops and final is None:
        raise RouteFailed(f"{route} names no target: add a hop, e.g. {route}/127.0.0.1:22")
    loop = asyncio.get_running_loop()
    sock = await connect_node(route, timeout, tls, via)
    parser = ReplyParser()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, route_requests(route, creds) + (final or b"") + first)
            names = [str(h) for h in route.hops]
            if final is not None and wait_final:
                names.append(final.split(b" ", 2)[1].decode().lower())
            last = await _replies(route, sock, parser, names)
        return Opened(sock, parser.trailing() if wait_final or final is None else b"", last, parser)
    except TimeoutError:
        sock.close()
        raise RouteFailed(f"{route}: no answer within {timeout:g}s") from None
    except ProtocolError as exc:
        sock.close()
        why = "connection closed" if "connection closed" in exc.reason else exc.reason
        if route.tls and not route.ws and why == "connection closed":
            why += "; does the node require a client certificate (--tls-cert)?"
        raise RouteFailed(f"{route}: bad reply from the route ({why})") from None
    except OSError as exc:
        sock.close()
        raise RouteFailed(f"{route}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
