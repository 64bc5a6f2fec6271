"""A Python client of a node's control API (what ``hnctl`` uses); every call has a deadline."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from homenet.control.auth import call_metadata
from homenet.control.errors import CODE_OF_STATUS, code_of
from homenet.control.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
)
from homenet.node.address import DEFAULT_PORT, parse_endpoint
from homenet.node.auth import Credentials
from homenet.node.errors import Code, HomeNetError
from homenet.node.query import query_context


class ControlError(HomeNetError):
    """A control call failed; the message is one line saying what to do, ``code`` what kind.

    ``retryable``: the call may succeed if made again in a moment (the node could not be
    reached, or it said unavailable or moving); never set for a refusal.
    """

    def __init__(self, reason: str = "", code: Code | None = None, *, retryable: bool = False) -> None:
        super().__init__(reason, code)
        self.retryable = retryable


#: Codes a node sends with UNAVAILABLE that say "again in a moment" (not: the target refused).
_TRANSIENT = (Code.MOVING, Code.UNAVAILABLE)


def _describe(exc: grpc.aio.AioRpcError, target: str) -> ControlError:
    status, details = exc.code(), exc.details() or ""
    code = code_of(exc)
    if code is not None and code not in (Code.UNAUTHORIZED, Code.FORBIDDEN, Code.INTERNAL):
        # the node (or one down the route) says what went wrong
        return ControlError(details, code, retryable=status == grpc.StatusCode.UNAVAILABLE and code in _TRANSIENT)
    if code is None and status == grpc.StatusCode.UNAVAILABLE:
        return ControlError(
            f"node {target} is unreachable ({details or 'unavailable'}); is it running?", Code.BAD_GATEWAY,
            retryable=True,
        )  # fmt: skip
    if code is None and status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ControlError(f"node {target} did not answer in time", Code.GATEWAY_TIMEOUT)
    if status == grpc.StatusCode.UNIMPLEMENTED:
        return ControlError(f"node {target} does not support this call (older version?)", Code.BAD_REQUEST)
    return ControlError(f"node {target}: {status.name.lower()}: {details}", code or CODE_OF_STATUS.get(status))


def open_channel(
    target: str,
    tls: bool = False,
    tls_ca: str | None = None,
    options: list[tuple[str, Any]] | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> grpc.aio.Channel:
    """A channel to a node's one port: plaintext, or TLS verified with ``tls_ca`` (or the
    system store), presenting ``cert``/``key`` to nodes that require client certificates."""
    if not tls:
        return grpc.aio.insecure_channel(target, options=options)

    def read(path: str | None, what: str) -> bytes | None:
        try:
            return Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ControlError(f"cannot read {what} {path}: {exc.strerror}") from None

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca, "--tls-ca"),
        private_key=read(key, "--tls-key"),
        certificate_chain=read(cert, "--tls-cert"),
    )
    return grpc.aio.secure_channel(target, creds, options=options)


class ControlClient:
    """Talks to one node's gRPC API at ``HOST:PORT`` (the node's one port)."""

    def __init__(
        self, node: str, timeout: float = 5.0, creds: Credentials | None = None, tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:  # fmt: skip
        ep = parse_endpoint(node, DEFAULT_PORT)
        self.target = str(ep)
        self.timeout = timeout
        self.creds = creds
        self.channel = open_channel(self.target, tls, tls_ca, cert=tls_cert, key=tls_key)
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.relay = relay_pb2_grpc.RelayServiceStub(self.channel)
        self.discovery = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)
        self.fleet = fleet_pb2_grpc.FleetServiceStub(self.channel)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.channel.close(None)

    async def _call(self, service: str, method: str, call: Any, request: Any) -> Any:
        """One unary call with a deadline and credentials; errors become one-line ControlErrors."""
        metadata = call_metadata(self.creds, f"/homenet.v1.{service}/{method}")
        try:
            return await call(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _describe(exc, self.target) from None

    async def status(self) -> node_pb2.NodeStatus:
        resp: node_pb2.NodeStatus = await self._call(
            "NodeService", "GetStatus", self.nodes.GetStatus, node_pb2.GetStatusRequest()
        )
        return resp

    async def sessions(self) -> node_pb2.ListSessionsResponse:
        resp: node_pb2.ListSessionsResponse = await self._call(
            "NodeService", "ListSessions", self.nodes.ListSessions, node_pb2.ListSessionsRequest()
        )
        return resp

    async def listeners(self) -> relay_pb2.ListListenersResponse:
        resp: relay_pb2.ListListenersResponse = await self._call(
            "RelayService", "ListListeners", self.relay.ListListeners, relay_pb2.ListListenersRequest()
        )
        return resp

    async def peers(self, with_entries: bool = False) -> fleet_pb2.PeersResponse:
        resp: fleet_pb2.PeersResponse = await self._call(
            "FleetService", "Peers", self.fleet.Peers, fleet_pb2.PeersRequest(with_entries=with_entries)
        )
        return resp

    async def kick(self, listen_id: str) -> relay_pb2.KickResponse:
        resp: relay_pb2.KickResponse = await self._call(
            "RelayService", "Kick", self.relay.Kick, relay_pb2.KickRequest(listen_id=listen_id)
        )
        return resp

    async def query(self, path: list[str], name: str = "", type_: str = "") -> discovery_pb2.QueryResponse:
        """Services of the node at the end of ``path`` (listenIds from this node)."""
        request = discovery_pb2.QueryRequest(path=path, name=name, type=type_)
        if self.creds is not None:  # for the node at the end of the path, which answers
            request.auth.CopyFrom(discovery_pb2.QueryAuth(**self.creds.token(query_context(path, name, type_))))
        resp: discovery_pb2.QueryResponse = await self._call("DiscoveryService", "Query", self.discovery.Query, request)
        return resp
