"""A Python client of a node's control API (what ``hnctl`` uses); every call has a deadline."""

from __future__ import annotations

from types import TracebackType

import grpc

from homenet.control.v1 import node_pb2, node_pb2_grpc, relay_pb2, relay_pb2_grpc
from homenet.node.address import DEFAULT_PORT, parse_endpoint


class ControlError(Exception):
    """A control call failed; the message is one line saying what to do."""


def _describe(exc: grpc.aio.AioRpcError, target: str) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"node {target} is unreachable ({exc.details() or 'unavailable'}); is it running?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"node {target} did not answer in time"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{exc.details()}"
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
