"""A Python client of a node's control API (what ``hnctl`` uses); every call has a deadline."""

from __future__ import annotations

from types import TracebackType

import grpc

from homenet.control.v1 import discovery_pb2, discovery_pb2_grpc, node_pb2, node_pb2_grpc, relay_pb2, relay_pb2_grpc
from homenet.node.address import DEFAULT_PORT, parse_endpoint


class ControlError(Exception):
    """A control call failed; the message is one line saying what to do."""


def _describe(exc: grpc.aio.AioRpcError, target: str) -> str:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "offline" in details:
        return details  # a listener down the route, not the node we talk to
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"node {target} is unreachable ({details or 'unavailable'}); is it running?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return details if "did not answer" in details else f"node {target} did not answer in time"
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        return details
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"node {target} does not support this call (older version?)"
    return f"node {target}: {code.name.lower()}: {exc.details()}"


class ControlClient:
    """Talks to one node's gRPC API at ``HOST:PORT`` (the node's one port)."""

    def __init__(self, node: str, timeout: float = 5.0) -> None:
        ep = parse_endpoint(node, DEFAULT_PORT)
        self.target = str(ep)
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(self.target)
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.relay = relay_pb2_grpc.RelayServiceStub(self.channel)
        self.discovery = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.channel.close(None)

    async def status(self) -> node_pb2.NodeStatus:
        try:
            return await self.nodes.GetStatus(node_pb2.GetStatusRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControlError(_describe(exc, self.target)) from None

    async def sessions(self) -> node_pb2.ListSessionsResponse:
        try:
            return await self.nodes.ListSessions(node_pb2.ListSessionsRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControlError(_describe(exc, self.target)) from None

    async def listeners(self) -> relay_pb2.ListListenersResponse:
        try:
            return await self.relay.ListListeners(relay_pb2.ListListenersRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControlError(_describe(exc, self.target)) from None

    async def kick(self, listen_id: str) -> relay_pb2.KickResponse:
        try:
            return await self.relay.Kick(relay_pb2.KickRequest(listen_id=listen_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControlError(_describe(exc, self.target)) from None

    async def query(self, path: list[str], name: str = "", type_: str = "") -> discovery_pb2.QueryResponse:
        """Services of the node at the end of ``path`` (listenIds from this node)."""
        request = discovery_pb2.QueryRequest(path=path, name=name, type=type_)
        try:
            return await self.discovery.Query(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ControlError(_describe(exc, self.target)) from None
