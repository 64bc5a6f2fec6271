"""The control plane on the data plane's port: gRPC health, reflection, NodeService, hnctl."""

from __future__ import annotations

import json
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from homenet.control.v1 import node_pb2, node_pb2_grpc
from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, proc_env
from tests.integration.support import (
    OK_REPLY,
    HashServer,
    admin_metadata,
    channel,
    closed_port,
    connected,
    hash_server,
    hnctl,
    open_session,
    request,
    wait_status,
)

DEADLINE = 5.0
LIST_SESSIONS = "/homenet.v1.NodeService/ListSessions"


async def test_health_and_reflection_on_the_data_port(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo, channel(node) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "homenet.v1.NodeService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service

        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=DEADLINE)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        answer = await call.read()
        names = {s.name for s in answer.list_services_response.service}
        assert {"homenet.v1.NodeService", "grpc.health.v1.Health"} <= names

        # the same port still carries data-plane sessions while the channel is open
        async with connected(node.host, node.port) as conn:
            await conn.send(request(echo.endpoint) + b"both planes")
            await conn.shutdown_write()
            assert await conn.until_eof() == OK_REPLY + b"both planes"


async def test_get_status_counts_a_session(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--name", "counter-node")
    up, down = b"u" * 70_000, b"d" * 1_234
    async with echo_server() as echo, channel(node) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        before = await stub.GetStatus(node_pb2.GetStatusRequest(), timeout=DEADLINE)
        assert before.name == "counter-node"
        assert before.address == node.url
        assert before.state == "serving"
        assert (before.active_sessions, before.total_sessions, before.bytes_up, before.bytes_down) == (0, 0, 0, 0)

        # an echo session in two exchanges; the counters are looked at between them
        conn = await open_session(node, echo.endpoint)
        try:
            await conn.send(up)
            assert await conn.exactly(len(up)) == up
            during = await stub.GetStatus(node_pb2.GetStatusRequest(), timeout=DEADLINE)
            assert (during.active_sessions, during.total_sessions) == (1, 1)
            listed = await stub.ListSessions(
                node_pb2.ListSessionsRequest(), timeout=DEADLINE, metadata=admin_metadata(node, LIST_SESSIONS)
            )
            assert [s.target for s in listed.sessions] == [echo.endpoint]
            assert listed.sessions[0].dialed == echo.endpoint
            assert listed.sessions[0].bytes_up == len(up)
            await conn.send(down)
            assert await conn.exactly(len(down)) == down
            await conn.shutdown_write()
            assert await conn.until_eof() == b""
        finally:
            await conn.close()
    total = len(up) + len(down)
    after = await wait_status(node, "the session closed", lambda st: st.active_sessions == 0)
    assert (after.total_sessions, after.bytes_up, after.bytes_down) == (1, total, total)
    assert after.refused_sessions == 0
    assert after.uptime_seconds >= before.uptime_seconds


async def test_bytes_up_and_down_are_not_swapped(start_node: StartNode) -> None:
    """A target that answers a short digest to a long upload: up and down must differ."""
    node = await start_node("--allow", "127.0.0.1/32")
    data = b"x" * 100_000
    async with hash_server() as target, connected(node.host, node.port) as conn:
        await conn.send(request(target.endpoint) + data)
        await conn.shutdown_write()
        assert await conn.until_eof() == OK_REPLY + HashServer.answer(data)
    st = await wait_status(node, "the session closed", lambda st: st.total_sessions == 1 and st.active_sessions == 0)
    assert (st.bytes_up, st.bytes_down) == (len(data), len(HashServer.answer(data)))


def _json(text: bytes) -> Any:
    return json.loads(text.decode())


async def _hnctl_ok(node: NodeProc, *args: str) -> str:
    # the nodes' state directory holds their admin key: hnctl on the same host finds it there
    res = await hnctl("--node", node.endpoint, *args, env=proc_env(node.stderr_path.parent))
    assert res.code == 0, res.stderr
    assert res.stderr == ""
    return res.stdout.decode()


async def test_hnctl_status_and_sessions(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--name", "hnctl-node")
    async with echo_server() as echo:
        text = await _hnctl_ok(node, "status")
        assert "hnctl-node" in text
        assert node.url in text
        assert "serving" in text

        st = _json((await _hnctl_ok(node, "status", "--json")).encode())
        assert st["name"] == "hnctl-node"
        assert st["address"] == node.url
        assert st["state"] == "serving"
        assert int(st["total_sessions"]) == 0

        assert _json((await _hnctl_ok(node, "sessions", "--json")).encode()) == []

        conn = await open_session(node, echo.endpoint)
        try:
            await conn.send(b"12345")
            assert await conn.exactly(5) == b"12345"
            sessions = _json((await _hnctl_ok(node, "sessions", "--json")).encode())
            assert len(sessions) == 1
            (s,) = sessions
            assert s["target"] == echo.endpoint
            assert s["dialed"] == echo.endpoint
            assert s["client"].startswith("127.0.0.1:")
            assert int(s["bytes_up"]) == 5
            assert int(s["bytes_down"]) == 5
            table = await _hnctl_ok(node, "sessions")
            assert echo.endpoint in table.splitlines()[1]

            st = _json((await _hnctl_ok(node, "status", "--json")).encode())
            assert int(st["active_sessions"]) == 1
        finally:
            await conn.close()
    await wait_status(node, "the session closed", lambda st: st.active_sessions == 0)
    st = _json((await _hnctl_ok(node, "status", "--json")).encode())
    assert (int(st["active_sessions"]), int(st["total_sessions"])) == (0, 1)


async def test_hnctl_unreachable_node_fails_in_one_line() -> None:
    with closed_port() as port:
        res = await hnctl("--node", f"127.0.0.1:{port}", "--timeout", "3", "status")
    assert res.code == 1, res
    assert len(res.stderr_lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"127.0.0.1:{port}" in res.stderr
