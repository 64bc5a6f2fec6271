"""One control view over the worker processes of a node.

A call reaches whichever worker accepted its connection; that worker answers for the whole
node by asking its siblings (their private ports, with the node's own fleet key, marked
local so they answer for themselves only) and merging. A sibling that does not answer in
:data:`DEADLINE` is left out, and the status says how many answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from homenet.control.auth import call_metadata
from homenet.control.v1 import node_pb2, node_pb2_grpc, relay_pb2, relay_pb2_grpc
from homenet.node.auth import Credentials

log = logging.getLogger("homenet.siblings")

#: Metadata of a sibling's call: answer for this worker only.
LOCAL_KEY = "x-homenet-local"
#: Seconds a sibling has to answer.
DEADLINE = 1.0
T = TypeVar("T")


def is_local(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether a call asks for this worker alone."""
    return any(k == LOCAL_KEY for k, _ in context.invocation_metadata() or ())


class Siblings:
    """The other workers of this node, as gRPC channels to their private ports."""

    def __init__(self, index: int, targets: Sequence[str], creds: Credentials) -> None:
        #: This worker's index (the ``worker`` of its sessions and listeners).
        self.index = index
        self.creds = creds
        self._channels = [grpc.aio.insecure_channel(t, options=[("grpc.enable_retries", 0)]) for t in targets]

    @property
    def count(self) -> int:
        """Workers of the node, this one included."""
        return len(self._channels) + 1

    def _meta(self, method: str) -> tuple[tuple[str, str], ...]:
        return ((LOCAL_KEY, "1"), *call_metadata(self.creds, method))

    async def _gather(self, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> list[T]:
        results = await asyncio.gather(*(call(ch) for ch in self._channels), return_exceptions=True)
        out: list[T] = []
        for r in results:
            if isinstance(r, BaseException):
                log.debug("siblings.no_answer", exc_info=r)
            else:
                out.append(r)
        return out

    async def _ask(self, service: str, name: str, request: Any) -> list[Any]:
        """Every sibling's answer to ``service.name(request)`` (those that answered in time)."""
        method = f"/homenet.v1.{service}/{name}"
        stubs = {"NodeService": node_pb2_grpc.NodeServiceStub, "RelayService": relay_pb2_grpc.RelayServiceStub}

        async def one(ch: grpc.aio.Channel) -> Any:
            call = getattr(stubs[service](ch), name)
            return await call(request, timeout=DEADLINE, metadata=self._meta(method))

        return await self._gather(one)

    async def statuses(self) -> list[node_pb2.NodeStatus]:
        return await self._ask("NodeService", "GetStatus", node_pb2.GetStatusRequest())

    async def sessions(self) -> list[node_pb2.Session]:
        answers = await self._ask("NodeService", "ListSessions", node_pb2.ListSessionsRequest())
        return [s for a in answers for s in a.sessions]

    async def metrics(self) -> list[node_pb2.Metrics]:
        return await self._ask("NodeService", "GetMetrics", node_pb2.GetMetricsRequest())

    async def listeners(self) -> list[relay_pb2.Listener]:
        answers = await self._ask("RelayService", "ListListeners", relay_pb2.ListListenersRequest())
        return [x for a in answers for x in a.listeners]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)


def merge_status(own: node_pb2.NodeStatus, others: list[node_pb2.NodeStatus], workers: int) -> node_pb2.NodeStatus:
    """The node's status: ``own`` with the siblings' counters added."""
    out = node_pb2.NodeStatus()
    out.CopyFrom(own)
    for st in others:
        out.active_sessions += st.active_sessions
        out.total_sessions += st.total_sessions
        out.bytes_up += st.bytes_up
        out.bytes_down += st.bytes_down
        out.refused_sessions += st.refused_sessions
        out.listeners += st.listeners
        out.uptime_seconds = max(out.uptime_seconds, st.uptime_seconds)
    out.workers = workers
    out.workers_up = 1 + len(others)
    out.fleet_peers = out.fleet_peers_up = 0  # the siblings are the node, not its fleet
    out.fleet_listeners = 0
    return out
