"""Discovery queries: answer from this node's table, or forward down a chain of listeners."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from homenet.node.address import MAX_HOPS
from homenet.node.auth import AuthError, Verifier
from homenet.node.discovery import Discovery, Service
from homenet.node.errors import Code, HomeNetError
from homenet.node.listeners import (
    LISTEN_ID,
    ListenerNotFound,
    ListenerOffline,
    ListenerRegistry,
    ListenerSession,
    QueryEvent,
)

#: Seconds each hop keeps for itself out of the caller's deadline.
HOP_MARGIN = 0.25
MIN_TIMEOUT = 0.3


#: What kind of failure a query had, as a code (the kinds name them in logs and tests).
QUERY_CODES: dict[str, Code] = {
    "not_found": Code.NOT_FOUND,
    "unavailable": Code.UNAVAILABLE,
    "deadline": Code.GATEWAY_TIMEOUT,
    "invalid": Code.BAD_REQUEST,
    "failed": Code.INTERNAL,
    "unauthenticated": Code.UNAUTHORIZED,
    "forbidden": Code.FORBIDDEN,
}
_KINDS = {code: kind for kind, code in QUERY_CODES.items()}


class QueryError(HomeNetError):
    """A query that failed; ``kind`` is one of :data:`QUERY_CODES`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, QUERY_CODES.get(kind, Code.INTERNAL))
        self.kind = kind if kind in QUERY_CODES else "failed"
        self.message = message

    @classmethod
    def from_code(cls, code: Code, message: str) -> QueryError:
        """The error a node reported with ``code`` (an unknown code is a plain failure)."""
        return cls(_KINDS.get(code, "failed"), message)


@dataclass(frozen=True, slots=True)
class Query:
    """What to ask, and of whom: ``path`` of listenIds from the node that got the query.

    ``origin`` is the path the client gave the first node, ``token`` the client's proof of a
    query key over it (checked by the node that answers).
    """

    path: tuple[str, ...] = ()
    name: str = ""
    type: str = ""
    timeout: float = 5.0
    origin: tuple[str, ...] = ()
    token: dict[str, str] = field(default_factory=dict)

    @property
    def context(self) -> str:
        return query_context(self.origin, self.name, self.type)


def query_context(origin: Sequence[str], name: str, type_: str) -> str:
    """What a query token signs."""
    return "\n".join(("query", "/".join(origin), name, type_))


@dataclass(slots=True)
class QueryAnswer:
    services: list[Service] = field(default_factory=list)
    node: str = ""
    discovery_enabled: bool = False


#: Asks the fleet's owner of ``query.path[0]`` to answer ``query`` (raises QueryError).
FleetQueries = Callable[["Query"], Awaitable["QueryAnswer"]]


class ListenerQueries:
    """Queries forwarded down listener streams, waiting for their answers (relay role)."""

    def __init__(self, registry: ListenerRegistry) -> None:
        self.registry = registry
        self._pending: dict[int, tuple[ListenerSession, asyncio.Future[QueryAnswer]]] = {}
        self._ids = 0

    async def forward(self, listen_id: str, query: Query) -> QueryAnswer:
        """Ask listener ``listen_id`` (and, through it, the rest of ``query.path``)."""
        try:
            lst = self.registry.get(listen_id)
        except ListenerNotFound as exc:
            raise QueryError("not_found", str(exc)) from None
        except ListenerOffline as exc:
            raise QueryError("unavailable", str(exc)) from None
        session = lst.session
        assert session is not None
        self._ids += 1
        qid = self._ids
        fut: asyncio.Future[QueryAnswer] = asyncio.get_running_loop().create_future()
        self._pending[qid] = (session, fut)
        session.send(QueryEvent(qid, query))
        try:
            async with asyncio.timeout(query.timeout + 0.1):
                return await fut
        except TimeoutError:
            raise QueryError("deadline", f"listener {listen_id} did not answer within {query.timeout:g}s") from None
        finally:
            self._pending.pop(qid, None)

    def answered(self, session: ListenerSession, qid: int, answer: QueryAnswer | QueryError) -> None:
        """A listener's answer to query ``qid`` (ignored unless it came from the asked session)."""
        pending = self._pending.get(qid)
        if pending is None or pending[0] is not session or pending[1].done():
            return
        if isinstance(answer, QueryError):
            pending[1].set_exception(answer)
        else:
            pending[1].set_result(answer)

    def fail(self, session: ListenerSession) -> None:
        """``session`` went offline: its pending queries fail now."""
        for s, fut in list(self._pending.values()):
            if s is session and not fut.done():
                fut.set_exception(QueryError("unavailable", "listener went offline while answering"))


class QueryRouter:
    """Answers :class:`Query` for one node (its relay role forwards the rest of the path).

    A query that reached this node down a chain (``listen_id`` set) carries the client's
    query key in the request: the node that answers from its own table checks it when its
    ``query_auth`` is ``required`` (the data is its, so the decision is its). A query asked of
    this node directly was checked on its metadata by the gRPC interceptor.
    """

    def __init__(
        self,
        node_name: str,
        forwarder: ListenerQueries,
        discovery: Discovery | None,
        verifier: Verifier | None,
        fleet: FleetQueries | None = None,
    ) -> None:
        self.node_name = node_name
        self.forwarder = forwarder
        self.discovery = discovery
        self.verifier = verifier
        #: Asks the relay of the fleet that owns the path's first listener (a local miss).
        self.fleet = fleet

    async def query(self, q: Query, listen_id: str | None = None, forwarded: bool = False) -> QueryAnswer:
        """Answer ``q``; ``listen_id`` is our id on the relay that forwarded it (if any);
        ``forwarded``: a peer of the fleet asked (never asked further in the fleet)."""
        check_path(q.path)
        if not q.path:
            if listen_id is not None and q.origin and q.origin[-1] != listen_id:
                raise QueryError("invalid", f"query was meant for {q.origin[-1][:64]}, not {listen_id}")
            if self.verifier is not None and listen_id is not None:
                try:
                    self.verifier.verify(q.context, q.token, "query")
                except AuthError as exc:
                    raise QueryError("forbidden" if exc.forbidden else "unauthenticated", exc.reason) from None
            if self.discovery is None:
                return QueryAnswer([], self.node_name, False)
            return QueryAnswer(self.discovery.query(q.name, q.type), self.node_name, True)
        nxt = Query(q.path[1:], q.name, q.type, max(MIN_TIMEOUT, q.timeout - HOP_MARGIN), q.origin, q.token)
        try:
            return await self.forwarder.forward(q.path[0], nxt)
        except QueryError as exc:
            if exc.kind != "not_found" or self.fleet is None or forwarded:
                raise
        return await self.fleet(
            Query(q.path, q.name, q.type, max(MIN_TIMEOUT, q.timeout - HOP_MARGIN), q.origin, q.token)
        )


def check_path(path: Sequence[str]) -> None:
    if len(path) > MAX_HOPS:
        raise QueryError("invalid", f"query path longer than {MAX_HOPS} hops")
    for hop in path:
        if not LISTEN_ID.fullmatch(hop):
            raise QueryError("invalid", f"bad hop {hop[:80]!r}: a query path is made of listenIds")
