"""DiscoveryService, and the protobuf <-> core conversions of discovery answers."""

from __future__ import annotations

from typing import Any

import grpc

from homenet.control.errors import abort
from homenet.control.v1 import discovery_pb2, discovery_pb2_grpc
from homenet.node.discovery import Service
from homenet.node.query import Query, QueryAnswer, QueryError, QueryRouter

#: Metadata of a query a relay of the fleet passes to the listener's relay (never passed on again).
FORWARDED_KEY = "x-homenet-fwd"
#: Longest a query may take, whatever deadline the caller set.
MAX_QUERY_TIMEOUT = 30.0


def service_to_pb(s: Service) -> discovery_pb2.Service:
    return discovery_pb2.Service(
        name=s.name, type=s.type, listen_id=s.listen_id, host=s.host, addresses=s.addresses, port=s.port,
        txt=s.txt, first_seen=s.first_seen, last_seen=s.last_seen,
    )  # fmt: skip


def service_from_pb(m: discovery_pb2.Service) -> Service:
    return Service(
        listen_id=m.listen_id, name=m.name, type=m.type, host=m.host, addresses=list(m.addresses), port=m.port,
        txt=dict(m.txt), first_seen=m.first_seen, last_seen=m.last_seen,
    )  # fmt: skip


def answer_to_pb(a: QueryAnswer) -> discovery_pb2.QueryResponse:
    return discovery_pb2.QueryResponse(
        services=[service_to_pb(s) for s in a.services], node=a.node, discovery_enabled=a.discovery_enabled
    )


def answer_from_pb(m: discovery_pb2.QueryResponse) -> QueryAnswer:
    return QueryAnswer([service_from_pb(s) for s in m.services], m.node, m.discovery_enabled)


def query_from_pb(m: discovery_pb2.QueryRequest, timeout: float) -> Query:
    """A core query from a request; a request from a client (no origin yet) is its own origin."""
    path = tuple(m.path)
    origin = tuple(m.origin_path) if m.origin_path else path
    token = {"key": m.auth.key[:64], "ts": m.auth.ts[:16], "nonce": m.auth.nonce[:64], "mac": m.auth.mac[:64]}
    return Query(path, m.name[:128], m.type[:64], min(timeout, MAX_QUERY_TIMEOUT), origin[:16], token)


def query_to_pb(q: Query) -> discovery_pb2.QueryRequest:
    return discovery_pb2.QueryRequest(
        path=list(q.path), name=q.name, type=q.type, origin_path=list(q.origin),
        auth=discovery_pb2.QueryAuth(**q.token) if q.token else None,
    )  # fmt: skip


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """Query: this node's table, or forwarded down the listener chain."""

    def __init__(self, router: QueryRouter) -> None:
        self.router = router

    async def Query(
        self, request: discovery_pb2.QueryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> discovery_pb2.QueryResponse:
        remaining = context.time_remaining()
        timeout = 5.0 if remaining is None else max(0.1, remaining - 0.05)
        try:
            meta = dict((k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str))
            answer = await self.router.query(query_from_pb(request, timeout), forwarded=FORWARDED_KEY in meta)
        except QueryError as exc:
            await abort(context, exc)
        return answer_to_pb(answer)
