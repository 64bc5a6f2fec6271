"""What a node knows of one connection before it is spliced (the per-connection object)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from homenet.node.preamble import Request


@dataclass(slots=True, eq=False)
class Handshake:
    """One connection from accept to splice (hashed by identity).

    The acceptor admits it (``source``), the node reads its first bytes and picks a plane,
    the data plane parses its request, the router turns the request into a target.
    """

    sock: socket.socket
    peer: str
    #: Bytes already read from the connection (by whoever handed it to the node).
    buf: bytes = b""
    #: Hops this connection already went through (0 for a client that dialed us).
    depth: int = 0
    request: Request | None = None
    trailing: bytes = b""
    #: Admission unit (IPv4 address or IPv6 /64) while it holds a handshake slot.
    source: str | None = None
    #: ALPN protocol the client chose, when the connection came over TLS.
    alpn: str = ""
    #: The task serving this handshake (cancelled when the acceptor drops it to make room).
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Loop time it was accepted at (its handshake deadline counts from there).
    since: float = 0.0
    #: It came over TLS (terminated by this node).
    tls: bool = False
    #: A hop the HTTP gateway opens for a request: its socket is the gateway's own, never
    #: handed over to a sibling worker.
    gateway: bool = False

    @property
    def request_line(self) -> str:
        """What a token over this request signs: the very line that routes it."""
        assert self.request is not None
        return f"HN/1 {self.request.verb.value} {self.request.arg}"
