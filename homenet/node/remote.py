"""The listener side of Remote Listen: dial back for waiting clients, keep a warm pool.

The control plane (the gRPC stream) feeds :class:`RemoteListen` with events; this module
opens the data connections to the relay (through the relay's route, which may cross other
relays) and hands each activated connection to ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from homenet.node.address import AddressError, Endpoint, Route, parse_endpoint
from homenet.node.client import Dialing, RouteFailed, dial_endpoint, next_reply
from homenet.node.log import fields
from homenet.node.preamble import ProtocolError, Reply, Verb, encode_request
from homenet.node.splice import Splices

log = logging.getLogger("homenet.remote")

#: Takes an activated connection: (socket, description, bytes already read, hop depth).
Serve = Callable[[socket.socket, str, bytes, int], Awaitable[None]]
#: Tells the relay a dial-back failed: (ticket, reason).
ReportFailure = Callable[[str, str], Awaitable[None]]


def advertised(route: Route, endpoint: str) -> Endpoint | None:
    """The address a relay asked us to dial back or park at, if we may use it.

    Only for a relay we reach directly (no hops), and only a global IP address: a relay must
    not be able to point its listener at the listener's own LAN, loopback or link-local
    neighbours (the listener would knock there with the relay's bytes).
    """
    if not endpoint or route.hops:
        return None
    try:
        ep = parse_endpoint(endpoint)
        addr = ipaddress.ip_address(ep.host)
    except (AddressError, ValueError):
        return None
    return ep if addr.is_global else None


def hop_depth(reply: Reply | None) -> int:
    """The hop count a relay announces in its activation reply (field ``hop``; 1 if absent)."""
    hop = reply.fields.get("hop", "") if reply is not None else ""
    return int(hop) if hop.isdigit() and len(hop) <= 3 else 1


class RemoteListen:
    """One registration's data connections; owns their tasks until :meth:`close`."""

    def __init__(
        self, relay_route: Route, serve: Serve, report_failure: ReportFailure, dialing: Dialing, pool_size: int = 64
    ) -> None:
        self.route = relay_route
        self.serve = serve
        self.report_failure = report_failure
        self.dialing = dialing
        #: Warm connections the relay agreed to at registration: more grants are ignored (a
        #: relay must not make its listener open thousands of connections).
        self.pool_size = pool_size
        self.parking = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as a task owned by this registration (cancelled on close)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def incoming(self, ticket: str, client: str, endpoint: str = "") -> None:
        """A client is waiting at the relay: dial back with ``ticket`` (at ``endpoint``, the
        relay's own address, when it gave one we may use)."""
        self.spawn(self._dial_back(ticket, client, advertised(self.route, endpoint)))

    def pool_grant(self, ticket: str, endpoint: str = "") -> None:
        """The relay allows one more parked connection (ignored past the agreed pool size)."""
        if self.parking >= self.pool_size:
            log.debug("rl.pool_grant_ignored", extra=fields(parked=self.parking, pool_size=self.pool_size))
            return
        self.parking += 1
        self.spawn(self._park(ticket, advertised(self.route, endpoint)))

    async def _dial_back(self, ticket: str, client: str, via: Endpoint | None) -> None:
        try:
            opened = await self.dialing.open(self.route, final=encode_request(Verb.TICKET, ticket), via=via)
        except RouteFailed as exc:
            log.warning("rl.dial_back_failed", extra=fields(client=client, error=str(exc)))
            with contextlib.suppress(Exception):
                await self.report_failure(ticket, str(exc))
            return
        depth = hop_depth(opened.last)
        await self.serve(opened.sock, f"{client} via {self.route.entry}", opened.early, depth)

    async def _park(self, ticket: str, via: Endpoint | None) -> None:
        """Park one warm connection; it stops counting against the pool size once a client
        activates it (the relay grants its replacement at once)."""
        activated = await self._parked(ticket, via)
        if activated is None:
            return
        sock, desc, early, depth = activated
        await self.serve(sock, desc, early, depth)

    async def _parked(self, ticket: str, via: Endpoint | None) -> tuple[socket.socket, str, bytes, int] | None:
        try:
            return await self._wait_parked(ticket, via)
        finally:
            self.parking -= 1

    async def _wait_parked(self, ticket: str, via: Endpoint | None) -> tuple[socket.socket, str, bytes, int] | None:
        try:
            opened = await self.dialing.open(
                self.route, final=encode_request(Verb.POOL, ticket), wait_final=False, via=via
            )
        except RouteFailed as exc:
            log.debug("rl.park_failed", extra=fields(error=str(exc)))
            return None
        sock, parser = opened.sock, opened.parser
        assert parser is not None
        try:
            reply = await next_reply(sock, parser)  # parked until a client comes (or the relay drops it)
        except (OSError, ProtocolError):
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        if not reply.ok:
            log.debug("rl.park_refused", extra=fields(code=int(reply.code), reason=reply.reason))
            sock.close()
            return None
        client = reply.fields.get("client", "?")
        return sock, f"{client} via the pool of {self.route.entry}", parser.trailing(), hop_depth(reply)

    async def close(self) -> None:
        """Cancel dial-backs and close parked connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class FixedTarget:
    """``homenet rl --to HOST:PORT``: every activated connection is spliced to one target."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, idle_timeout: float | None = None) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.splices = Splices(idle_timeout=idle_timeout)

    async def serve(self, sock: socket.socket, desc: str, early: bytes, depth: int) -> None:
        """Dial the target and splice; on failure close the client's connection."""
        try:
            target = await dial_endpoint(Endpoint(self.host, self.port), self.timeout)
        except RouteFailed as exc:
            log.warning("rl.target_failed", extra=fields(target=f"{self.host}:{self.port}", error=str(exc)))
            sock.close()
            return
        with contextlib.suppress(OSError):  # the target went away at once: both are closed
            await self.splices.start(sock, target, to_b=early)

    def close(self) -> None:
        self.splices.abort_all("closing")
        self.splices.pool.close()
