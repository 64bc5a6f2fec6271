"""RelayService: the Listen stream, and the operator's listeners/kick calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from homenet import __version__
from homenet.control.auth import CURRENT_KEY, real_peer
from homenet.control.discovery import answer_from_pb, query_to_pb
from homenet.control.errors import abort, code_of_status_value
from homenet.control.siblings import Siblings, is_local
from homenet.control.v1 import relay_pb2, relay_pb2_grpc
from homenet.node.listeners import (
    Event,
    Incoming,
    Listener,
    ListenerError,
    ListenerNotFound,
    ListenerSession,
    PoolGrant,
    QueryEvent,
)
from homenet.node.log import fields
from homenet.node.query import Query, QueryError
from homenet.node.relay import Registration, Relay
from homenet.node.server import GrpcPlane

log = logging.getLogger("homenet.control.relay")

REGISTER_TIMEOUT = 10.0

Context = grpc.aio.ServicerContext[relay_pb2.ListenerMessage, relay_pb2.RelayMessage]


def one_line(text: str, limit: int = 300) -> str:
    """Text from a remote node, made safe to show on one line."""
    return "".join(ch if ch.isprintable() else " " for ch in text[:limit])


def to_event_message(event: Event) -> relay_pb2.RelayMessage:
    if isinstance(event, Incoming):
        return relay_pb2.RelayMessage(
            incoming=relay_pb2.Incoming(
                ticket=event.ticket, client=event.client, expires_in=event.expires_in, endpoint=event.endpoint
            )
        )
    if isinstance(event, PoolGrant):
        return relay_pb2.RelayMessage(
            pool_grant=relay_pb2.PoolGrant(ticket=event.ticket, expires_in=event.expires_in, endpoint=event.endpoint)
        )
    if isinstance(event, QueryEvent):
        q = event.query
        assert isinstance(q, Query)
        return relay_pb2.RelayMessage(
            query=relay_pb2.ForwardedQuery(id=event.id, request=query_to_pb(q), timeout=q.timeout)
        )
    return relay_pb2.RelayMessage(ping=relay_pb2.Ping(seq=event.seq))


class RelayServicer(relay_pb2_grpc.RelayServiceServicer):
    """Translates the Listen stream to :class:`Relay` calls and its events back to messages."""

    def __init__(
        self,
        relay: Relay,
        grpc_plane: GrpcPlane,
        name: str,
        fleet_kick: Callable[[str], Awaitable[bool]] | None = None,
        siblings: Siblings | None = None,
    ) -> None:
        self.relay = relay
        self.grpc_plane = grpc_plane
        self.name = name
        #: Kicks a listener another relay of the fleet holds.
        self.fleet_kick = fleet_kick
        #: The other workers of this node (ListListeners answers for all of them).
        self.siblings = siblings

    async def Listen(
        self, request_iterator: AsyncIterator[relay_pb2.ListenerMessage], context: Context
    ) -> AsyncIterator[relay_pb2.RelayMessage]:
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                first = await anext(request_iterator)
        except (TimeoutError, StopAsyncIteration):
            await abort(context, ListenerError("send register first, within 10s"))
        if first.WhichOneof("msg") != "register":
            await abort(context, ListenerError("the first message must be register"))
        r = first.register
        reg = Registration(r.listen_id, r.resume_secret, r.name[:128], r.version[:64], r.pool_size, r.node_id)
        peer = real_peer(self.grpc_plane, context.peer())
        try:
            lst, session, secret = self.relay.register(reg, peer, CURRENT_KEY.get())
        except ListenerError as exc:
            log.info("listener.refused", extra=fields(listen_id=r.listen_id[:80], peer=peer, reason=str(exc)))
            await abort(context, exc)
        yield relay_pb2.RelayMessage(
            registered=relay_pb2.Registered(
                listen_id=lst.listen_id,
                resume_secret=secret,
                ping_interval=self.relay.settings.ping_interval,
                pool_size=lst.pool_size,
                relay_name=self.name,
            )
        )
        reader = asyncio.ensure_future(self._read(request_iterator, session))
        reason = "stream ended"
        try:
            while (event := await session.next_event()) is not None:
                yield to_event_message(event)
            reason = session.close_reason
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.relay.unregister(lst, session, reason)

    async def _read(self, messages: AsyncIterator[relay_pb2.ListenerMessage], session: ListenerSession) -> None:
        try:
            async for msg in messages:
                session.heard()
                kind = msg.WhichOneof("msg")
                if kind == "dial_failed":
                    self.relay.dialbacks.failed(session, msg.dial_failed.ticket, msg.dial_failed.reason)
                elif kind == "query_result":
                    r = msg.query_result
                    answer = (
                        QueryError.from_code(code_of_status_value(r.error_code), one_line(r.error))
                        if r.error_code
                        else answer_from_pb(r.response)
                    )
                    self.relay.queries.answered(session, r.id, answer)
        except Exception as exc:  # a broken stream: the listener is gone
            session.close(f"stream broke: {type(exc).__name__}")
            return
        session.close("listener closed its stream")

    async def ListListeners(
        self, request: relay_pb2.ListListenersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> relay_pb2.ListListenersResponse:
        worker = self.siblings.index if self.siblings is not None else 0
        listeners = [to_listener_message(lst, worker) for lst in self.relay.registry.all()]
        if self.siblings is not None and not is_local(context):
            listeners.extend(await self.siblings.listeners())
            listeners.sort(key=lambda x: x.listen_id)
        return relay_pb2.ListListenersResponse(listeners=listeners)

    async def Kick(
        self, request: relay_pb2.KickRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> relay_pb2.KickResponse:
        if self.relay.kick(request.listen_id):
            return relay_pb2.KickResponse(kicked=True)
        if self.fleet_kick is not None and await self.fleet_kick(request.listen_id):
            return relay_pb2.KickResponse(kicked=True)
        where = "in this fleet" if self.fleet_kick is not None else "on this relay"
        await abort(context, ListenerNotFound(f"no listener {request.listen_id[:80]} {where}"))


def to_listener_message(lst: Listener, worker: int = 0) -> relay_pb2.Listener:
    return relay_pb2.Listener(
        worker=worker,
        listen_id=lst.listen_id,
        peer=lst.peer,
        since=lst.since,
        active_sessions=lst.active,
        total_sessions=lst.total,
        bytes_up=lst.bytes_up,
        bytes_down=lst.bytes_down,
        pool_parked=len(lst.pool),
        pool_size=lst.pool_size,
        name=lst.name,
        version=lst.version or __version__,
        state="online" if lst.online else "offline",
    )
