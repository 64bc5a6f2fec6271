"""The shortest path through a real node: one hop to an echo server."""

from __future__ import annotations

from homenet.node.address import parse_url
from homenet.node.client import open_route
from tests.conftest import StartNode
from tests.helpers import echo_server


async def test_one_hop_echo(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo:
        opened = await open_route(parse_url(f"{node.url}/{echo.endpoint}"), first=b"ping")
        import asyncio

        loop = asyncio.get_running_loop()
        got = opened.early
        while len(got) < 4:
            got += await loop.sock_recv(opened.sock, 10)
        opened.sock.close()
        assert got == b"ping"
