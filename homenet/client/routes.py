"""Routes for programs: a route as asyncio streams, or as a blocking socket-like object.

Both open the route with :func:`homenet.node.client.open_route` (one write for every hop's
request and the first payload, one reply per hop) and retry what may succeed a moment later.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from homenet.client.options import Key, attempts, check_retries, credentials, tls_context
from homenet.node.address import Route, parse_url
from homenet.node.client import Dialing, Opened, RouteFailed
from homenet.node.errors import Code, UsageError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

#: The streams' buffer limit (asyncio's own default).
STREAM_LIMIT = 64 * 1024

#: Reply codes of a hop that say "again in a moment": the listener is moving to another relay
#: of a fleet, or it (or the node) is briefly unavailable.
_TRANSIENT = (Code.MOVING, Code.UNAVAILABLE)


def retryable(exc: BaseException) -> bool:
    """Whether opening a route again may succeed: the first node refused the connection, or a
    hop answered ``432 moving`` or ``503 unavailable``. Never a refusal (4xx), a target's
    failure (502, 504) or a timeout: the same answer would come back, or the deadline again."""
    if not isinstance(exc, RouteFailed):
        return False
    if exc.hop is None:  # no node answered: only a refused connection is worth another try
        return isinstance(exc.__context__, ConnectionRefusedError)
    return exc.code in _TRANSIENT


@dataclass(frozen=True, slots=True)
class Dialer(Dialing):
    """How the library opens routes: :class:`~homenet.node.client.Dialing` (a deadline per
    attempt, a key, TLS) plus ``retries`` extra attempts for :func:`retryable` failures."""

    retries: int = 2

    @classmethod
    def for_route(
        cls,
        route: Route,
        *,
        key: Key = None,
        timeout: float = 10.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retries: int = 2,
    ) -> Dialer:
        """A dialer for ``route``: its TLS context when it is ``hns://`` (a bad CA or client
        certificate raises :class:`~homenet.node.tls.TLSError` here, before any dial)."""
        tls = tls_context(route, tls_ca, tls_cert, tls_key)
        return cls(timeout, credentials(key), tls, check_retries(retries))

    async def open(self, route: Route, **kw: Any) -> Opened:
        """:func:`~homenet.node.client.open_route` with these options, retried."""
        return await attempts(self.retries, retryable, lambda: Dialing.open(self, route, **kw))


def as_route(url: str | Route) -> Route:
    """``url`` parsed (an :class:`~homenet.node.address.AddressError`, code 400, if it is bad)."""
    return url if isinstance(url, Route) else parse_url(url)


async def open_connection(
    url: str | Route,
    *,
    key: Key = None,
    timeout: float = 10.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    retries: int = 2,
    first: bytes = b"",
    limit: int = STREAM_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open ``url`` (``hn://`` or ``hns://``) and return asyncio streams spliced to its target.

    ``first`` goes out with the requests (no round trip before the payload). The target's
    bytes that came with the replies are the reader's first bytes. ``timeout`` bounds each
    attempt; ``retries`` extra attempts are made for failures :func:`retryable` accepts.
    Raises :class:`~homenet.node.client.RouteFailed` (``.code``, ``.hop``) with the one line
    ``homenet connect`` prints.
    """
    route = as_route(url)
    dialer = Dialer.for_route(
        route, key=key, timeout=timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, retries=retries
    )
    return await streams(await dialer.open(route, first=first), limit)


async def streams(opened: Opened, limit: int = STREAM_LIMIT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over an opened route; its early bytes are in the reader before any
    byte the socket delivers (fed before the transport exists, so nothing can overtake them)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if opened.early:
        reader.feed_data(opened.early)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        transport, _ = await loop.create_connection(lambda: protocol, sock=opened.sock)
    except BaseException:
        opened.sock.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def connect(
    url: str | Route,
    *,
    key: Key = None,
    timeout: float = 10.0,
    retries: int = 2,
    first: bytes = b"",
) -> Connection:
    """Open an ``hn://`` route from blocking code; returns a socket-like :class:`Connection`.

    The route is opened on a private event loop that is closed before this returns: what is
    left is an ordinary TCP socket spliced to the target. ``hns://``, ``ws://`` and ``wss://``
    routes are refused (a usage error, code 400): their TLS or WebSocket tunnel runs on an event
    loop that would have to outlive this call; use :func:`open_connection` for them. Must not be
    called from a running event loop.
    """
    route = as_route(url)
    if route.tls or route.ws:
        raise UsageError(
            f"connect() opens hn:// routes only, not {route}: use open_connection() for TLS and WebSocket routes"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("homenet.client.connect() blocks: in async code, use open_connection()")
    dialer = Dialer.for_route(route, key=key, timeout=timeout, retries=retries)
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        opened = runner.run(dialer.open(route, first=first))
    opened.sock.setblocking(True)
    return Connection(opened.sock, opened.early)


class Connection:
    """A route opened by :func:`connect`: a blocking, socket-like object.

    ``recv`` and ``recv_into`` return the target's bytes that came with the route's replies
    before reading the socket. ``fileno()`` is the socket's: before waiting on it with
    ``select``, read until :meth:`pending` is 0 (those bytes are no longer in the kernel).
    """

    def __init__(self, sock: socket.socket, early: bytes = b"") -> None:
        self.socket = sock
        self._early = early

    def pending(self) -> int:
        """Bytes already received with the replies and not yet returned by ``recv``."""
        return len(self._early)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` when the target closed its side."""
        if self._early:
            data = self._early[:bufsize]
            if not flags & socket.MSG_PEEK:
                self._early = self._early[len(data) :]
            return data
        return self.socket.recv(bufsize, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        """Like ``socket.recv_into``; 0 when the target closed its side."""
        if self._early:
            view = memoryview(buffer).cast("B")
            n = min(len(view), nbytes or len(view), len(self._early))
            view[:n] = self._early[:n]
            if not flags & socket.MSG_PEEK:
                self._early = self._early[n:]
            return n
        return self.socket.recv_into(buffer, nbytes, flags)

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        return self.socket.send(data, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        self.socket.sendall(data, flags)

    def shutdown(self, how: int) -> None:
        """``socket.SHUT_WR`` half-closes: the target sees EOF, its answer still arrives."""
        self.socket.shutdown(how)

    def close(self) -> None:
        self._early = b""
        self.socket.close()

    def fileno(self) -> int:
        return self.socket.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.socket.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.socket.gettimeout()

    def getsockname(self) -> Any:
        return self.socket.getsockname()

    def getpeername(self) -> Any:
        """The first node's address (the socket's peer), not the target's."""
        return self.socket.getpeername()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.socket.fileno() < 0 else f"fd={self.socket.fileno()}"
        return f"<homenet.client.Connection {state} pending={len(self._early)}>"
