"""Every hop counts, direct ``ip:port`` ones too: two nodes that allow each other cannot
bounce a pipelined route back and forth (each bounce holds one more session on each node)."""

from __future__ import annotations

import asyncio

import pytest

from homenet.node.address import MAX_HOPS
from tests.conftest import StartNode
from tests.integration.support import node_conn, request

pytestmark = pytest.mark.timeout(60)


async def test_a_route_bouncing_between_two_nodes_stops_at_the_hop_limit(start_node: StartNode) -> None:
    a = await start_node("--allow", "127.0.0.0/8")
    b = await start_node("--allow", "127.0.0.0/8")
    lines = [request(b.endpoint if i % 2 == 0 else a.endpoint) for i in range(40)]
    conn = await node_conn(a)
    try:
        await conn.send(b"".join(lines) + b"payload")
        codes = []
        while True:
            reply = await conn.reply()
            codes.append(reply.code)
            if reply.code != 200:
                break
        assert codes == [200] * (MAX_HOPS + 1) + [430], codes
        assert await conn.until_eof() == b""
    finally:
        await conn.close()


async def test_a_split_request_line_is_counted_too(start_node: StartNode) -> None:
    """A client cannot dodge the count by sending the next line's first byte alone: the node
    reads the line to its end and stamps it before the target sees it."""
    a = await start_node("--allow", "127.0.0.0/8")
    seen = bytearray()
    got_line = asyncio.Event()
    connected = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        seen.extend(await reader.readline())
        got_line.set()
        writer.close()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await node_conn(a)
    try:
        await conn.send(request(f"127.0.0.1:{port}") + b"H")
        async with asyncio.timeout(10.0):
            await connected.wait()  # the node dialed the target and holds the cut line
        await conn.send(b"N/1 CONNECT 127.0.0.1:1 depth=0\n")
        async with asyncio.timeout(10.0):
            await got_line.wait()
        assert bytes(seen) == b"HN/1 CONNECT 127.0.0.1:1 depth=1\n"
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()
