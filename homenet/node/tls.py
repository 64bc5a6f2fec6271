"""TLS on the one port, kept outside the core: a TLS connection is terminated by asyncio's
SSL transport and bridged to one end of a socketpair; the other end is a plain socket that
the node (or a client) uses exactly like a TCP connection: same handshake, same splice.

ALPN names the plane: ``h2`` for gRPC, ``homenet/1`` for the data plane (the node still
checks the first bytes, so a mislabeled connection cannot cross planes).
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from typing import Any, cast

from homenet.node.errors import Code, HomeNetError

ALPN_DATA = "homenet/1"
ALPN_GRPC = "h2"
ALPN_HTTP = "http/1.1"
_HIGH_WATER = 256 * 1024


class TLSError(HomeNetError):
    """A TLS handshake or setup failed; the message is one line for the user."""

    default_code = Code.BAD_GATEWAY


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """Context for a node serving both planes over TLS (mTLS when ``client_ca`` is given)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load TLS certificate/key: {exc}") from None
    # the server's order wins: a browser offers h2 and http/1.1 and must get the HTTP
    # gateway, not the gRPC plane; gRPC clients offer only h2, data clients only homenet/1
    ctx.set_alpn_protocols([ALPN_DATA, ALPN_HTTP, ALPN_GRPC])
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Context for hns:// routes: the system store, or ``ca`` (a PEM bundle); ``cert`` and
    ``key`` are this client's certificate for nodes that require one (mTLS)."""
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load TLS CA {ca}: {exc}") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"cannot load TLS client certificate {cert}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_DATA])
    return ctx


#: Seconds between looks for a half-closed client's full close.
_GONE_POLL = 0.5


class _Half(asyncio.Protocol):
    """One side of a bridge: what it receives is written to the other side, with flow control."""

    def __init__(self, close_peer_on_eof: bool = False, is_tls: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.close_peer_on_eof = close_peer_on_eof
        self.is_tls = is_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        other = self.peer.transport if self.peer is not None else None
        if other is None or other.is_closing():
            return False
        if other.can_write_eof():
            other.write_eof()  # half-close travels on
            return not self.is_tls  # a TLS transport closes itself after its peer's close_notify
        # asyncio's TLS transports cannot half-close. A node closes TLS when its target is
        # done (the client then sees the end); a client keeps it open after its own EOF so
        # the reply still arrives (the target does not see that EOF: README, TLS).
        if self.close_peer_on_eof or self._peer_gone():
            other.close()
            return False
        self._watch_gone()
        return True

    def _watch_gone(self) -> None:
        """Half-closed: look again now and then for the program's full close (no event tells)."""
        other = self.peer.transport if self.peer is not None else None
        if other is None or other.is_closing() or self.transport is None or self.transport.is_closing():
            return
        if self._peer_gone():
            other.close()
            return
        asyncio.get_running_loop().call_later(_GONE_POLL, self._watch_gone)

    def _peer_gone(self) -> bool:
        """The plain side's program closed its socket (not just its writing half): nothing
        will read the reply, so the TLS connection must end too (else it waits for the node)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None and not self.is_tls else None
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if exc is None:
                self.peer.transport.close()
            else:
                self.peer.transport.abort()


async def _bridge(make_tls: Any, server: bool) -> tuple[socket.socket, asyncio.Transport]:
    loop = asyncio.get_running_loop()
    inner, outer = socket.socketpair()
    plain, tls = _Half(close_peer_on_eof=server), _Half(is_tls=True)
    plain.peer, tls.peer = tls, plain
    try:
        await loop.connect_accepted_socket(lambda: plain, outer)
        transport, _ = await make_tls(lambda: tls)
    except BaseException:
        if plain.transport is not None:
            plain.transport.abort()
        else:
            outer.close()
        inner.close()
        raise
    inner.setblocking(False)
    return inner, transport


async def accept_tls(sock: socket.socket, ctx: ssl.SSLContext, timeout: float) -> tuple[socket.socket, str]:
    """Terminate TLS on an accepted socket; returns the plain inner socket and the ALPN protocol."""
    loop = asyncio.get_running_loop()
    try:
        inner, transport = await _bridge(
            lambda factory: loop.connect_accepted_socket(factory, sock, ssl=ctx, ssl_handshake_timeout=timeout),
            server=True,
        )
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        raise TLSError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from None
    obj = transport.get_extra_info("ssl_object")
    alpn = obj.selected_alpn_protocol() if obj is not None else None
    return inner, alpn or ""


async def connect_tls(sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str, timeout: float) -> socket.socket:
    """Start TLS on a connected socket (client side); returns the plain inner socket."""
    loop = asyncio.get_running_loop()
    try:
        inner, _ = await _bridge(
            lambda factory: loop.create_connection(
                factory, sock=sock, ssl=ctx, server_hostname=server_hostname, ssl_handshake_timeout=timeout
            ),
            server=False,
        )
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(f"TLS: cannot verify {server_hostname}: {exc.verify_message} (try --tls-ca)") from None
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        raise TLSError(f"TLS handshake with {server_hostname} failed: {getattr(exc, 'reason', None) or exc}") from None
    return inner
