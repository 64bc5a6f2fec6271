"""Discovery queries: answer from this node's table, or forward down a chain of listeners."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from homenet.node.address import MAX_HOPS
from homenet.node.discovery import Discovery, Service
from homenet.node.listeners import LISTEN_ID

if TYPE_CHECKING:
    from homenet.node.relay import Relay

#: Seconds each hop keeps for itself out of the caller's deadline.
HOP_MARGIN = 0.25
MIN_TIMEOUT = 0.3


class QueryError(Exception):
    """A query that failed; ``kind`` is one of not_found, unavailable, deadline, invalid, failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Query:
    """What to ask, and of whom: ``path`` of listenIds from the node that got the query."""

    path: tuple[str, ...] = ()
    name: str = ""
    type: str = ""
    timeout: float = 5.0


@dataclass(slots=True)
class QueryAnswer:
    services: list[Service] = field(default_factory=list)
    node: str = ""
    discovery_enabled: bool = False


class QueryRouter:
    """Answers :class:`Query` for one node (its relay role forwards the rest of the path)."""

    def __init__(self, node_name: str, relay: Relay, discovery: Discovery | None) -> None:
        self.node_name = node_name
        self.relay = relay
        self.discovery = discovery

    async def query(self, q: Query) -> QueryAnswer:
        check_path(q.path)
        if not q.path:
            if self.discovery is None:
                return QueryAnswer([], self.node_name, False)
            return QueryAnswer(self.discovery.query(q.name, q.type), self.node_name, True)
        nxt = Query(q.path[1:], q.name, q.type, max(MIN_TIMEOUT, q.timeout - HOP_MARGIN))
        return await self.relay.forward_query(q.path[0], nxt)


def check_path(path: Sequence[str]) -> None:
    if len(path) > MAX_HOPS:
        raise QueryError("invalid", f"query path longer than {MAX_HOPS} hops")
    for hop in path:
        if not LISTEN_ID.fullmatch(hop):
            raise QueryError("invalid", f"bad hop {hop[:80]!r}: a query path is made of listenIds")
