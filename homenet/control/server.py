"""The node's in-process gRPC server: NodeService, health and reflection.

It listens on a loopback port that only the node's one public port splices to; the servicers
only translate between protobuf and the node core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from homenet import __version__
from homenet.control.siblings import Siblings, is_local, merge_status
from homenet.control.v1 import node_pb2, node_pb2_grpc
from homenet.node.server import Node
from homenet.node.sessions import SessionTable

#: gRPC service names this node serves (health reports on each and on "").
SERVICES = (node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,)
MAX_MESSAGE = 4 * 1024 * 1024


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    """NodeService: status and sessions of one node."""

    def __init__(
        self,
        node: Node,
        listeners: Callable[[], int],
        fleet: Callable[[], tuple[int, int, int]] | None = None,
        siblings: Siblings | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.node = node
        #: This process's metrics in the text format (for the worker that serves them all).
        self.metrics = metrics
        self.sessions: SessionTable = node.sessions
        self.listeners = listeners
        #: (peers up, peers, listeners on peers) of this relay's fleet
        self.fleet = fleet
        #: The other workers of this node (None: a single-process node).
        self.siblings = siblings

    async def GetStatus(
        self, request: node_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.NodeStatus:
        own = self.own_status()
        if self.siblings is None or is_local(context):
            return own
        return merge_status(own, await self.siblings.statuses(), self.siblings.count)

    def own_status(self) -> node_pb2.NodeStatus:
        """This process's status (a worker's own, without its siblings')."""
        n = self.node
        t = self.sessions.totals
        up, peers, on_peers = self.fleet() if self.fleet is not None else (0, 0, 0)
        own = node_pb2.NodeStatus(
            name=n.settings.name,
            version=__version__,
            uptime_seconds=max(0.0, time.time() - n.started),
            address=n.url,
            active_sessions=len(self.sessions),
            total_sessions=t.sessions,
            bytes_up=t.bytes_up,
            bytes_down=t.bytes_down,
            refused_sessions=t.refused,
            listeners=self.listeners(),
            state=n.state,
            fleet_peers_up=up,
            fleet_peers=peers,
            fleet_listeners=on_peers,
            workers=1,
            workers_up=1,
        )
        return own

    async def ListSessions(
        self, request: node_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.ListSessionsResponse:
        own = self.own_sessions()
        if self.siblings is not None and not is_local(context):
            own.extend(await self.siblings.sessions())
            own.sort(key=lambda s: (s.since, s.worker, s.id))
        return node_pb2.ListSessionsResponse(sessions=own)

    async def GetMetrics(
        self, request: node_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.Metrics:
        worker = self.siblings.index if self.siblings is not None else 0
        text = self.metrics().decode() if self.metrics is not None else ""
        return node_pb2.Metrics(text=text, worker=worker)

    def own_sessions(self) -> list[node_pb2.Session]:
        """This process's live sessions, oldest first."""
        worker = self.siblings.index if self.siblings is not None else 0
        return [
            node_pb2.Session(
                id=s.id,
                client=s.client,
                target=s.target,
                dialed=s.dialed,
                since=s.since,
                bytes_up=s.bytes_up,
                bytes_down=s.bytes_down,
                worker=worker,
            )
            for s in sorted(self.sessions.live.values(), key=lambda s: s.id)
        ]


#: Milliseconds a gRPC connection may stay without any call before the node closes it.
GRPC_IDLE_MS = 120_000


class ControlServer:
    """The gRPC server of one node, bound to a private loopback port."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = ()) -> None:
        self.server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_concurrent_streams", 1000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                # a connection with no call for this long is closed (one that sent its preface
                # and then idles must not hold its descriptors forever); streams keep theirs
                ("grpc.max_connection_idle_ms", GRPC_IDLE_MS),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = HealthServicer()
        self.port = 0
        #: The plaintext health-only server (for probes when the one port speaks TLS).
        self._health_server: grpc.aio.Server | None = None

    def add_node(
        self,
        node: Node,
        listeners: Callable[[], int],
        fleet: Callable[[], tuple[int, int, int]] | None = None,
        siblings: Siblings | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> NodeServicer:
        servicer = NodeServicer(node, listeners, fleet, siblings, metrics)
        node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, self.server)
        return servicer

    async def start(self) -> tuple[str, int]:
        """Register health and reflection, bind 127.0.0.1:0, start; returns the endpoint."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return ("127.0.0.1", self.port)

    async def serve_health(self, bind: str, port: int) -> int:
        """Also answer ``grpc.health.v1`` (and nothing else) in plaintext on ``bind:port``, from the
        same health state: a probe's port when the one port speaks TLS. Returns the port."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 16)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = f"[{bind}]" if ":" in bind else bind
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen on {bind}:{port} for health")
        await server.start()
        self._health_server = server
        return bound

    async def not_serving(self) -> None:
        """Tell health watchers the node is going away (first step of shutdown)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop the control server (calls in flight get ``grace`` seconds); the health port stays
        up, saying NOT_SERVING, until :meth:`stop_health` (probes must see the drain to its end)."""
        await self.server.stop(grace)

    async def stop_health(self) -> None:
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
