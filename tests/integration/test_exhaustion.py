"""Resource exhaustion over the one port (issue 15 item 2, and the control plane's own checks).

An adversarial review took a node to its descriptor limit with idle HTTP/2 connections that
counted against nothing; legitimate CONNECTs and status calls then timed out. These tests start
real nodes: gRPC connections are capped per source for their whole life, data sessions per
source, the descriptor headroom keeps the control plane answering when the data plane is full,
a blocked source's already-open HTTP/2 connection is refused too, and the in-process control
server answers only connections that came through the node's port.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import grpc
import pytest

from homenet.control.v1 import node_pb2, node_pb2_grpc
from homenet.node.auth import Credentials
from homenet.node.keys import Secret
from homenet.node.preamble import GRPC_PREFACE, Verb, encode_request
from tests.conftest import StartNode
from tests.helpers import echo_server, node_args
from tests.integration.support import (
    OK_REPLY,
    TIMEOUT,
    Conn,
    channel,
    dial,
    free_port,
    limited_node,
    request,
    wait_status,
)

pytestmark = pytest.mark.timeout(90)


async def _preface(node_host: str, port: int, source: str) -> Conn:
    conn = await dial(node_host, port, source=source)
    await conn.send(GRPC_PREFACE)
    return conn


async def _closed(conn: Conn) -> bytes:
    """Everything the node sends before it closes (within the timeout)."""
    return await conn.until_eof(timeout=TIMEOUT)


async def test_grpc_connections_are_capped_per_source_for_their_whole_life(start_node: StartNode) -> None:
    node = await start_node("--max-grpc-per-source", "4")
    held = [await _preface(node.host, node.port, "127.0.0.7") for _ in range(4)]
    try:
        # a preface that then idles still counts: the fifth from that source is refused
        fifth = await _preface(node.host, node.port, "127.0.0.7")
        try:
            got = await _closed(fifth)
            assert got.startswith(b"HN/1 429 too-many more than 4 gRPC connections from one source"), got
        finally:
            await fifth.close()
        # another source is served: a real call through the one port
        status = await wait_status(node, "answers", lambda s: s.state == "serving")
        assert status.state == "serving"
    finally:
        for c in held:
            await c.close()
    # once they are gone, the source may connect again
    async with asyncio.timeout(TIMEOUT):
        while True:
            again = await _preface(node.host, node.port, "127.0.0.7")
            try:
                if not (await _peek(again)).startswith(b"HN/1 429"):
                    break
            finally:
                await again.close()


async def _peek(conn: Conn) -> bytes:
    """The first bytes the node sends (gRPC's SETTINGS frame, or a refusal line)."""
    async with asyncio.timeout(TIMEOUT):
        return await conn.reader.read(64)


async def test_sessions_are_capped_per_source(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--max-sessions-per-source", "3")
    async with echo_server() as echo:
        conns = []
        try:
            for _ in range(3):
                conn = await dial(node.host, node.port, source="127.0.0.8")
                conns.append(conn)
                await conn.send(request(echo.endpoint))
                assert (await conn.reply()).raw == OK_REPLY
            extra = await dial(node.host, node.port, source="127.0.0.8")
            try:
                await extra.send(request(echo.endpoint))
                reply = await extra.reply()
                assert (reply.code, reply.reason) == (429, "more than 3 sessions from one source")
            finally:
                await extra.close()
            other = await dial(node.host, node.port, source="127.0.0.9")
            try:
                await other.send(request(echo.endpoint))
                assert (await other.reply()).raw == OK_REPLY
            finally:
                await other.close()
        finally:
            for c in conns:
                await c.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="descriptor numbers as a use bound: Linux")
async def test_near_the_descriptor_limit_new_sessions_wait_and_status_still_answers(tmp_path: Path) -> None:
    conns: list[Conn] = []
    async with (
        echo_server() as echo,
        limited_node(node_args("127.0.0.1", "--allow", "127.0.0.1/32"), tmp_path, nofile=160) as node,
    ):
        try:
            refusal = None
            for i in range(200):
                conn = await dial(node.host, node.port, source=f"127.0.1.{1 + i % 200}")
                conns.append(conn)
                await conn.send(request(echo.endpoint))
                reply = await conn.reply()
                if reply.code != 200:
                    refusal = reply
                    break
            assert refusal is not None, "the data plane never stopped before the limit"
            assert (refusal.code, refusal.reason) == (429, "node near its descriptor limit; retry later")
            status = await wait_status(node, "still answers", lambda s: s.state == "serving")
            assert status.active_sessions >= 40
        finally:
            for c in conns:
                await c.close()


async def test_a_blocked_source_s_open_grpc_connection_is_refused_too(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--connect-auth", "direct", "--penalty-threshold", "2")
    async with channel(node) as ch:  # opened from 127.0.0.1 before the source is blocked
        stub = node_pb2_grpc.NodeServiceStub(ch)
        assert (await stub.GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)).state == "serving"
        forged = Credentials("nobody", Secret("guessed-guessed-guessed-guessed"))
        for _ in range(2):
            line = encode_request(Verb.CONNECT, "127.0.0.1:1", forged.token("HN/1 CONNECT 127.0.0.1:1"))
            conn = await dial(node.host, node.port, source="127.0.0.1")
            try:
                await conn.send(line)
                assert (await conn.reply()).code == 401
            finally:
                await conn.close()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)
        assert refused.value.details() == "source blocked after repeated failed authentication"


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m[1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            for row in fh.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_private_control_address_answers_no_one_but_the_node(start_node: StartNode) -> None:
    node = await start_node()
    private = _listening_ports(node.proc.pid) - {node.port}
    assert len(private) == 1, private
    (port,) = private
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node_pb2_grpc.NodeServiceStub(ch).GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == "call the node on its port, not its private control address"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_node_s_other_listeners_are_no_targets_even_with_loopback_allowed(
    start_node: StartNode, tmp_path: Path
) -> None:
    health = str(free_port())
    node = await start_node("--allow", "127.0.0.0/8", "--health-port", health, "--metrics-bind", "127.0.0.1:0")
    others = _listening_ports(node.proc.pid) - {node.port}
    assert len(others) == 3, others  # the control server, the health port, the admin address
    for port in sorted(others):
        conn = await dial(node.host, node.port)
        try:
            await conn.send(request(f"127.0.0.1:{port}"))
            reply = await conn.reply()
            assert (reply.code, reply.reason) == (403, f"127.0.0.1:{port} is this node's own listener"), port
        finally:
            await conn.close()
