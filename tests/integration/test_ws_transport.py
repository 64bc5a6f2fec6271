"""The WebSocket transport through real processes: ``homenet connect|listen ws(s)://...`` and
``--rl ws(s)://RELAY``, served on the relay's one port.

Where it matters, the clients reach the node through an *HTTP-only gate*: a TCP relay of the
test's own that passes a connection only if it starts with an HTTP request line (what a
firewall or proxy that allows nothing but HTTP lets through), and counts what it refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, pattern
from tests.integration.rl_support import start_home
from tests.integration.support import (
    TIMEOUT,
    HashServer,
    closed_port,
    connected,
    hash_server,
    hnctl,
    homenet,
    running,
)
from tests.ws_support import Certs, make_certs

MiB = 1 << 20


def ws(node: NodeProc, *hops: str, scheme: str = "ws") -> str:
    return f"{scheme}://{node.endpoint}" + "".join(f"/{h}" for h in hops)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- an HTTP-only gate ---------------------------------------------------------------------------
@dataclass
class Gate:
    """Passes to ``port`` only the connections that begin with ``GET ``; counts both kinds."""

    port: int
    listen_port: int = 0
    passed: int = 0
    refused: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(TIMEOUT):
                    first = await reader.readexactly(4)
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                return
            if first != b"GET ":
                self.refused += 1
                return
            self.passed += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            up_writer.write(first)
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def http_only_gate(node: NodeProc) -> AsyncIterator[Gate]:
    gate = Gate(node.port)
    server = await asyncio.start_server(gate.handle, "127.0.0.1", 0)
    gate.listen_port = int(server.sockets[0].getsockname()[1])
    try:
        yield gate
    finally:
        server.close()
        await gate.close()
        await server.wait_closed()


# -- homenet connect -----------------------------------------------------------------------------
async def test_connect_ws_64_mib_byte_exact_through_stdin(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    data = pattern(64 * MiB, seed=14)
    async with echo_server() as echo, http_only_gate(node) as gate:
        url = f"ws://127.0.0.1:{gate.listen_port}/{echo.endpoint}"
        res = await homenet("connect", url, stdin=data, timeout=180)
    assert (res.code, res.stderr) == (0, "")
    assert len(res.stdout) == len(data)
    assert res.stdout == data
    assert (gate.passed, gate.refused) == (1, 0)
    assert echo.connections == 1


async def test_connect_ws_half_close_crosses_a_chain(start_node: StartNode) -> None:
    """stdin's EOF travels in the tunnel, then across a second node; the answer comes back."""
    first = await start_node("--allow", "127.0.0.0/8")
    second = await start_node("--allow", "127.0.0.0/8", bind="127.0.0.2")
    data = pattern(300_000, seed=15)
    async with hash_server() as target:
        res = await homenet("connect", ws(first, second.endpoint, target.endpoint), stdin=data)
        assert (res.code, res.stderr) == (0, "")
        assert res.stdout == HashServer.answer(data)
        res = await homenet("connect", ws(first, second.endpoint, target.endpoint), "--data", "hello")
        assert (res.code, res.stderr) == (0, "")
        assert res.stdout == HashServer.answer(b"hello")


async def test_connect_ws_failures_are_one_line(start_node: StartNode) -> None:
    node = await start_node("--allow", "10.99.0.0/16")
    async with echo_server() as echo:
        with closed_port() as dead:
            forbidden, no_node, bad_scheme, no_target = await asyncio.gather(
                homenet("connect", ws(node, echo.endpoint), "--data", "x"),
                homenet("connect", f"ws://127.0.0.1:{dead}/{echo.endpoint}", "--data", "x"),
                homenet("connect", f"wsx://{node.endpoint}/{echo.endpoint}", "--data", "x"),
                homenet("connect", ws(node), "--data", "x"),
            )
        assert echo.connections == 0
    assert forbidden.code == 1, forbidden
    assert "forbidden (403)" in one_line(forbidden.stderr)
    assert no_node.code == 1, no_node
    assert one_line(no_node.stderr).endswith(f"cannot reach node 127.0.0.1:{dead}: connection refused")
    assert bad_scheme.code == 2, bad_scheme
    assert "ws://" in one_line(bad_scheme.stderr)
    assert no_target.code == 1, no_target
    assert "names no target" in one_line(no_target.stderr)


@pytest.mark.parametrize("command", ["connect", "listen", "rl", "node"])
async def test_help_names_the_websocket_schemes(command: str) -> None:
    res = await homenet(command, "--help")
    assert res.code == 0
    assert "ws://" in res.stdout.decode(), res.stdout.decode()


# -- homenet listen ------------------------------------------------------------------------------
async def test_listen_ws_forwards_every_connection(start_node: StartNode, tmp_path: Path) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo, http_only_gate(node) as gate:
        url = f"ws://127.0.0.1:{gate.listen_port}/{echo.endpoint}"
        async with running(["listen", url, "--port", "0"], tmp_path / "listen", ready="LISTENING ") as fwd:
            line = fwd.url  # the word after LISTENING
            assert line.startswith("tcp://127.0.0.1:")
            port = int(line.rsplit(":", 1)[1])

            async def one(i: int) -> bytes:
                payload = pattern(200_000 + i, seed=i)
                async with connected("127.0.0.1", port) as conn:
                    await conn.send(payload)
                    await conn.shutdown_write()
                    got = await conn.until_eof()
                assert got == payload
                return got

            await asyncio.gather(*(one(i) for i in range(5)))
        assert (gate.passed, gate.refused) == (5, 0)
        assert echo.connections == 5


# -- --rl ws:// ----------------------------------------------------------------------------------
async def test_a_home_node_listens_over_ws_and_is_reached(nodes: StartNode, tmp_path: Path) -> None:
    """The RL stream, the warm pool and the dial-backs all cross the HTTP-only gate."""
    relay = await nodes()
    async with echo_server() as echo, http_only_gate(relay) as gate:
        relay_ws = f"ws://127.0.0.1:{gate.listen_port}"
        _home, url = await start_home(nodes, relay_ws, tmp_path / "home")
        assert url == f"{relay_ws}/home1"
        # a plain client of the relay, and a ws client through the gate, reach the home's target
        direct = await homenet("connect", f"{relay.url}/home1/{echo.endpoint}", "--data", "via hn")
        assert (direct.code, direct.stdout, direct.stderr) == (0, b"via hn", "")
        big = pattern(4 * MiB, seed=16)
        tunneled = await homenet("connect", f"{url}/{echo.endpoint}", stdin=big, timeout=60)
        assert (tunneled.code, tunneled.stderr) == (0, "")
        assert tunneled.stdout == big
        assert echo.connections == 2
        assert gate.refused == 0
        assert gate.passed >= 3  # the RL stream, the home's connections to the relay, our client


async def test_rl_one_service_over_ws(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    async with echo_server() as echo, http_only_gate(relay) as gate:
        relay_ws = f"ws://127.0.0.1:{gate.listen_port}"
        args = ["rl", relay_ws, "--to", echo.endpoint, "--state-dir", str(tmp_path / "rl")]
        async with running(args, tmp_path / "rl", ready="LISTENING ") as fwd:
            assert fwd.url.startswith(f"{relay_ws}/")
            listen_id = fwd.url.rsplit("/", 1)[1]
            res = await homenet("connect", f"{relay.url}/{listen_id}", "--data", "one service")
            assert (res.code, res.stdout, res.stderr) == (0, b"one service", "")
        assert gate.refused == 0


# -- wss -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("wsscerts"))


async def test_wss_connect_and_listen_verify_the_relay(nodes: StartNode, tmp_path: Path, certs: Certs) -> None:
    relay = await nodes("--allow", "127.0.0.1/32", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    async with echo_server() as echo:
        url = ws(relay, echo.endpoint, scheme="wss")
        data = pattern(2 * MiB, seed=17)
        res = await homenet("connect", url, "--tls-ca", str(certs.ca), stdin=data, timeout=60)
        assert (res.code, res.stderr) == (0, "")
        assert res.stdout == data

        wrong = await homenet("connect", url, "--tls-ca", str(certs.other_ca), "--data", "x")
        assert wrong.code == 1, wrong
        assert "cannot verify 127.0.0.1" in one_line(wrong.stderr)

        plain = await homenet("connect", ws(relay, echo.endpoint), "--data", "x")
        assert plain.code == 1, plain
        one_line(plain.stderr)  # a plaintext tunnel to a TLS-only port: one clear line

        listen = ["listen", url, "--tls-ca", str(certs.ca), "--port", "0"]
        async with running(listen, tmp_path / "listen", ready="LISTENING ") as fwd:
            port = int(fwd.url.rsplit(":", 1)[1])
            async with connected("127.0.0.1", port) as conn:
                await conn.send(b"over wss")
                assert await conn.exactly(8) == b"over wss"
    assert echo.connections == 2  # never the failed ones


async def test_a_home_node_listens_over_wss(nodes: StartNode, tmp_path: Path, certs: Certs) -> None:
    """Over wss:// a client's half-close crosses TLS too (it travels in the tunnel), unlike
    over hns:// (README, TLS: known limit)."""
    relay = await nodes("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    async with echo_server() as echo, hash_server() as target:
        relay_wss = f"wss://{relay.endpoint}"
        _home, url = await start_home(nodes, relay_wss, tmp_path / "home", "--tls-ca", str(certs.ca))
        assert url == f"{relay_wss}/home1"
        res = await homenet("connect", f"{url}/{echo.endpoint}", "--tls-ca", str(certs.ca), "--data", "home over wss")
        assert (res.code, res.stdout, res.stderr) == (0, b"home over wss", "")
        data = pattern(1 * MiB, seed=18)
        res = await homenet("connect", f"{url}/{target.endpoint}", "--tls-ca", str(certs.ca), stdin=data)
        assert (res.code, res.stderr) == (0, "")
        assert res.stdout == HashServer.answer(data)


async def test_hnctl_query_ws_goes_through_the_tunnel(nodes: StartNode, tmp_path: Path) -> None:
    """An operator behind an HTTP-only proxy asks a home for its services over ws://: the gRPC
    call rides a tunnel (the gate lets only `GET ` connections through)."""
    relay = await nodes()
    _home, _ = await start_home(nodes, relay.url, tmp_path / "home")
    async with http_only_gate(relay) as gate:
        res = await hnctl("query", f"ws://127.0.0.1:{gate.listen_port}/home1", "--json")
        assert res.code == 0, res.stderr
        assert isinstance(json.loads(res.stdout), list), res.stdout  # the home's services (none here)
        plain = await hnctl("query", f"ws://127.0.0.1:{gate.listen_port}/home1")
        assert plain.code == 0, plain.stderr
        assert "runs without discovery" in plain.stdout.decode(), plain.stdout
        assert gate.refused == 0
        assert gate.passed >= 1
