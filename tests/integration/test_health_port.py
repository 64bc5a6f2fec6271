"""The plaintext health port: grpc.health.v1 only, the same state as the one port's, so a
Kubernetes probe sees the drain (NOT_SERVING) while established sessions go on."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from homenet.control.v1 import node_pb2, node_pb2_grpc
from tests.conftest import StartNode
from tests.helpers import echo_server
from tests.integration.fleet_support import free_port
from tests.integration.support import OK_REPLY, TIMEOUT, connected, request


async def _health(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def test_the_health_port_follows_the_drain(start_node: StartNode) -> None:
    port = free_port(["127.0.0.1"])
    node = await start_node("--allow", "127.0.0.1/32", "--health-port", str(port), "--drain-grace", "5")
    assert await _health(port) == "SERVING"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # health only: nothing else there
        status = node_pb2_grpc.NodeServiceStub(ch).GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await status
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    async with (
        echo_server() as echo,
        connected(node.host, node.port) as conn,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        await conn.send(request(echo.endpoint) + b"one")
        assert await conn.exactly(len(OK_REPLY) + 3) == OK_REPLY + b"one"
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        node.proc.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # the drain, as it starts
        assert await _health(port) == "NOT_SERVING"
        await conn.send(b"two")  # the session goes on while the node drains
        assert await conn.exactly(3) == b"two"
        watch.cancel()
    async with asyncio.timeout(TIMEOUT):
        assert await node.proc.wait() == 0
