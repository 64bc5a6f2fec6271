"""A node's control API for programs: :class:`Client` (status, sessions, listeners, peers,
kick, query) and :func:`query`, over gRPC on the node's one port.

Answers are the API's own protobuf messages (``homenet.v1``, what ``hnctl --json`` prints);
calls that list things return the list. Every call has a deadline; calls that failed for a
reason that may pass (the node unreachable, ``unavailable``, ``432 moving``) are made again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from homenet.client.options import Key, attempts, check_retries, credentials
from homenet.control.client import ControlClient, ControlError
from homenet.control.v1 import discovery_pb2, fleet_pb2, node_pb2, relay_pb2
from homenet.node.address import DEFAULT_PORT, ListenId, Route, parse_url
from homenet.node.client import Dialing
from homenet.node.errors import UsageError
from homenet.node.forward import Forwarder
from homenet.node.tls import TLSError, client_context

T = TypeVar("T")

#: The node :class:`Client` talks to when none is named (as ``hnctl``'s default).
DEFAULT_NODE = f"127.0.0.1:{DEFAULT_PORT}"


def retryable(exc: BaseException) -> bool:
    """Whether a failed call may succeed if made again (see ``ControlError.retryable``)."""
    return isinstance(exc, ControlError) and exc.retryable


class Client:
    """One node's control API at ``node`` (``HOST[:PORT]``, its one port); use it as an async
    context manager, or call :meth:`close`.

    ``key`` signs every call (operator calls need an ``admin`` key, queries a ``query`` key
    unless the node is open); ``tls`` talks TLS to the node, verified with ``tls_ca`` (else
    the system store). ``timeout`` is each attempt's deadline; ``retries`` extra attempts are
    made for retryable failures. Errors are :class:`~homenet.control.client.ControlError`
    with ``.code`` and the one line ``hnctl`` prints.
    """

    def __init__(
        self,
        node: str = DEFAULT_NODE,
        *,
        key: Key = None,
        timeout: float = 5.0,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retries: int = 2,
    ) -> None:
        self.retries = check_retries(retries)
        self._control = ControlClient(node, timeout, credentials(key), tls, tls_ca, tls_cert, tls_key)

    @property
    def node(self) -> str:
        """The node's ``HOST:PORT``."""
        return self._control.target

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._control.channel.close(None)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        return await attempts(self.retries, retryable, call)

    async def status(self) -> node_pb2.NodeStatus:
        """The node's identity, state, uptime and counters (``hnctl status``)."""
        return await self._call(self._control.status)

    async def sessions(self) -> list[node_pb2.Session]:
        """Sessions spliced now (``hnctl sessions``; an admin call)."""
        return list((await self._call(self._control.sessions)).sessions)

    async def listeners(self) -> list[relay_pb2.Listener]:
        """Listeners registered on this relay (``hnctl listeners``; an admin call)."""
        return list((await self._call(self._control.listeners)).listeners)

    async def peers(self, with_entries: bool = False) -> fleet_pb2.PeersResponse:
        """This relay's fleet as it sees it (``hnctl peers``; ``with_entries``: each peer's
        listeners too; an admin call)."""
        return await self._call(lambda: self._control.peers(with_entries))

    async def kick(self, listen_id: str) -> None:
        """End a listener's stream and free its listenId (``hnctl kick``; an admin call);
        an unknown listenId raises ``ControlError`` with code 404."""
        await self._call(lambda: self._control.kick(listen_id))

    async def query(self, path: Sequence[str] = (), *, name: str = "", type_: str = "") -> discovery_pb2.QueryResponse:
        """Services of the node at the end of ``path`` (listenIds from this node; empty: this
        node), filtered by ``name`` (part of a name or listenId) and ``type_`` (``ssh``,
        ``_http._tcp``...)."""
        hops = list(path)
        return await self._call(lambda: self._control.query(hops, name, type_))


@contextlib.asynccontextmanager
async def query_endpoint(
    url: str,
    *,
    timeout: float = 5.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> AsyncIterator[tuple[str, list[str], bool]]:
    """:func:`query_target` for calls: a ``ws://`` or ``wss://`` relay is reached through a
    local forwarder whose every connection is one WebSocket tunnel (an HTTP-only network), so
    the control call stays plain gRPC to that local port."""
    node, path, tls = query_target(url)
    route = parse_url(url)
    if not route.ws:
        yield node, path, tls
        return
    try:
        ctx = client_context(tls_ca, tls_cert, tls_key) if route.tls else None
    except TLSError as exc:
        raise UsageError(str(exc)) from None
    forwarder = Forwarder(Route(route.entry, (), tls=route.tls, ws=True), "127.0.0.1", 0, Dialing(timeout, None, ctx))
    local = await forwarder.start()
    try:
        yield str(local), path, False  # TLS, if any, is the tunnel's
    finally:
        await forwarder.close()


def query_target(url: str) -> tuple[str, list[str], bool]:
    """The node to ask, the listenId path beyond it and whether to talk TLS, for a query of
    ``url`` (``hn[s]://NODE[:PORT][/LISTENID...]``); a usage error if a hop is not a listenId."""
    route = parse_url(url)
    bad = [str(h) for h in route.hops if not isinstance(h, ListenId)]
    if bad:
        raise UsageError(f"query path must be listenIds of nodes, not {bad[0]}")
    return str(route.entry), [str(h) for h in route.hops], route.tls


async def query(
    url: str,
    *,
    name: str = "",
    type_: str = "",
    key: Key = None,
    timeout: float = 5.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    retries: int = 2,
) -> discovery_pb2.QueryResponse:
    """The services a remote node discovered (``hnctl query URL``), through any chain of relays:
    ``query("hn://relay.example.net/home1", type_="ssh", key="alice:SECRET")``."""
    async with (
        query_endpoint(url, timeout=timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as (node, path, tls),
        Client(
            node, key=key, timeout=timeout, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, retries=retries
        ) as client,
    ):
        return await client.query(path, name=name, type_=type_)
