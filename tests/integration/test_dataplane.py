"""The data plane through real node processes: direct hops, chains, half-close, bad input."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, pattern
from tests.integration.support import (
    CHAIN,
    OK_REPLY,
    HashServer,
    closed_port,
    connected,
    hash_server,
    node_conn,
    open_session,
    refused_reply,
    request,
    start_chain,
    wait_status,
)


def chain_hops(nodes: list[NodeProc], target: str) -> list[str]:
    """What the client asks each node for: the next node, and the last one the target."""
    return [n.endpoint for n in nodes[1:]] + [target]


async def check_chain_counters(nodes: list[NodeProc], hops: list[str], data: bytes) -> None:
    """Node i relays the requests meant for the nodes after it (up), their replies (down), and
    the payload both ways; its own request and reply are not session bytes."""
    for i, node in enumerate(nodes):
        up = sum(len(request(h)) for h in hops[i + 1 :]) + len(data)
        down = len(OK_REPLY) * (len(hops) - i - 1) + len(data)
        st = await wait_status(node, "the session closed", lambda st: st.active_sessions == 0)
        assert (st.total_sessions, st.bytes_up, st.bytes_down) == (1, up, down), (i, st)


async def test_direct_target_byte_exact(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    data = pattern(3 << 20, seed=1)
    async with echo_server() as echo:
        conn = await open_session(node, echo.endpoint)
        try:
            send = asyncio.create_task(conn.send(data))
            got = await conn.exactly(len(data))
            await send
            await conn.shutdown_write()
            assert await conn.until_eof() == b""
        finally:
            await conn.close()
        assert got == data
        assert echo.connections == 1


async def test_crlf_request_line_is_accepted(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo, connected(node.host, node.port) as conn:
        await conn.send(f"HN/1 CONNECT {echo.endpoint}\r\n".encode() + b"\r\nbody\r\n")
        await conn.shutdown_write()
        assert await conn.until_eof() == OK_REPLY + b"\r\nbody\r\n"  # only the terminator is eaten


async def test_chain_hop_by_hop(start_node: StartNode) -> None:
    nodes = await start_chain(start_node)
    assert [n.host for n in nodes] == list(CHAIN)
    data = pattern(1 << 20, seed=2)
    async with echo_server() as echo, connected(nodes[0].host, nodes[0].port) as conn:
        hops = chain_hops(nodes, echo.endpoint)
        for hop in hops:
            await conn.send(request(hop))
            assert (await conn.reply()).raw == OK_REPLY  # wait for each reply before the next request
        await conn.send(data)
        await conn.shutdown_write()
        assert await conn.until_eof() == data
        assert echo.connections == 1
    await check_chain_counters(nodes, hops, data)


async def test_chain_pipelined_in_one_write(start_node: StartNode) -> None:
    nodes = await start_chain(start_node)
    data = pattern(1 << 20, seed=3)
    async with echo_server() as echo, connected(nodes[0].host, nodes[0].port) as conn:
        hops = chain_hops(nodes, echo.endpoint)
        await conn.send(b"".join(request(h) for h in hops) + data)  # one write: every request and the payload
        await conn.shutdown_write()
        stream = await conn.until_eof()
        assert echo.connections == 1
    # three replies, then the target's bytes, nothing else in between
    assert stream[: 3 * len(OK_REPLY)] == OK_REPLY * 3
    assert stream[3 * len(OK_REPLY) :] == data
    await check_chain_counters(nodes, hops, data)


async def test_chain_pipelined_replies_in_order(start_node: StartNode) -> None:
    """When hop N fails, the client reads N ``200``s, then that hop's error line, then EOF."""
    nodes = await start_chain(start_node)
    with closed_port() as dead:
        async with echo_server() as echo:
            for failing_hop in range(len(nodes)):
                hops = chain_hops(nodes, echo.endpoint)
                hops[failing_hop] = f"127.0.0.1:{dead}"
                async with connected(nodes[0].host, nodes[0].port) as conn:
                    await conn.send(b"".join(request(h) for h in hops) + b"payload that never arrives")
                    for _ in range(failing_hop):
                        assert (await conn.reply()).raw == OK_REPLY, failing_hop
                    err = await conn.reply()
                    assert (err.code, err.name) == (502, "bad-gateway"), (failing_hop, err)
                    assert f"127.0.0.1:{dead}" in err.reason
                    assert await conn.until_eof() == b""
            assert echo.connections == 0


async def test_node_refuses_to_dial_itself(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.0/8")
    reply, rest = await refused_reply(node, request(node.endpoint))
    assert (reply.code, reply.name) == (403, "forbidden"), reply
    assert rest == b""


@pytest.mark.parametrize("hops", [1, 3], ids=["one-hop", "chain"])
async def test_half_close_still_gets_whole_response(start_node: StartNode, hops: int) -> None:
    """The client shuts its write side at once; the target answers only after that EOF."""
    nodes = await start_chain(start_node) if hops == 3 else [await start_node("--allow", "127.0.0.1/32")]
    data = pattern(2 << 20, seed=4)
    async with hash_server() as target, connected(nodes[0].host, nodes[0].port) as conn:
        await conn.send(b"".join(request(h) for h in chain_hops(nodes, target.endpoint)) + data)
        await conn.shutdown_write()
        stream = await conn.until_eof()
        assert stream == OK_REPLY * hops + HashServer.answer(data)
        assert target.connections == 1


async def test_half_close_with_no_payload(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with hash_server() as target:
        conn = await open_session(node, target.endpoint)
        try:
            await conn.shutdown_write()
            assert await conn.until_eof() == HashServer.answer(b"")
        finally:
            await conn.close()


def _garbage(seed: int, n: int) -> bytes:
    data = random.Random(seed).randbytes(n)
    # a first byte of H or P could start a valid HN/ or gRPC preamble; keep it garbage
    return (b"\x00" + data[1:]) if data[:1] in (b"H", b"P") else data


GARBAGE = {
    "random-16": _garbage(1, 16),
    "random-4k": _garbage(2, 4096),
    "tls-hello-ish": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "bad-verb": b"HN/1 FETCH 127.0.0.1:1\n",
    "no-hop": b"HN/1 CONNECT\n",
    "bad-hop": b"HN/1 CONNECT not a hop\n",
    "nul": b"HN/1 CONNECT 127.0.0.1:1\x00\n",
}


async def test_garbage_gets_one_400_line_and_close(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo:
        live = await open_session(node, echo.endpoint)  # a session already open must not notice
        try:
            for what, payload in GARBAGE.items():
                reply, rest = await refused_reply(node, payload)
                assert reply.raw.startswith(b"HN/1 400 bad-request "), (what, reply)
                assert reply.reason, "a refusal says why"
                assert rest == b"", "exactly one line, then the node closes"
                # the open session and new clients are still served
                await live.send(what.encode())
                assert await live.exactly(len(what)) == what.encode()
                fresh = await open_session(node, echo.endpoint)
                try:
                    await fresh.send(b"fresh")
                    assert await fresh.exactly(5) == b"fresh"
                finally:
                    await fresh.close()
        finally:
            await live.close()
    n = len(GARBAGE)
    await wait_status(node, "refusals counted", lambda st: st.refused_sessions == n and st.total_sessions == n + 1)


BAD_PREAMBLES = {
    "version": (b"HN/2 CONNECT 127.0.0.1:1\n", 505, "version-not-supported"),
    "long-line": (b"HN/1 CONNECT " + b"a" * 2048 + b"\n", 413, "too-large"),
    "long-no-newline": (b"HN/1 CONNECT " + b"a" * 2048, 413, "too-large"),
}


async def test_bad_preamble_codes(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    for what, (payload, code, name) in BAD_PREAMBLES.items():
        reply, rest = await refused_reply(node, payload)
        assert (reply.code, reply.name) == (code, name), (what, reply)
        assert rest == b""


@pytest.mark.parametrize("sent", [b"", b"HN/1 CONN"], ids=["silent", "partial-preamble"])
async def test_handshake_deadline(start_node: StartNode, sent: bytes) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--handshake-timeout", "1")
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        conn = await node_conn(node)
        try:
            t0 = loop.time()
            if sent:
                await conn.send(sent)
            reply = await conn.reply(timeout=5.0)
            waited = loop.time() - t0
            assert (reply.code, reply.name) == (408, "timeout"), reply
            assert await conn.until_eof(timeout=5.0) == b""
        finally:
            await conn.close()
        assert 0.8 <= waited <= 4.0, waited
        # the node still serves (and a prompt client is not cut off by the deadline)
        ok = await open_session(node, echo.endpoint)
        try:
            await ok.send(b"after")
            assert await ok.exactly(5) == b"after"
        finally:
            await ok.close()


async def test_target_half_closes_first(start_node: StartNode) -> None:
    """The target says its piece and shuts its write side; the client can still send to it."""
    node = await start_node("--allow", "127.0.0.1/32")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def banner_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"banner")
            writer.write_eof()
            received.set_result(await reader.read())
        finally:
            writer.close()

    server = await asyncio.start_server(banner_then_listen, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with connected(node.host, node.port) as conn:
            await conn.send(request(f"127.0.0.1:{port}"))
            assert await conn.until_eof() == OK_REPLY + b"banner"  # the target's EOF reached us
            data = pattern(500_000, seed=9)
            await conn.send(data)  # ... and our direction is still open
            await conn.shutdown_write()
            async with asyncio.timeout(10):
                assert await received == data
    finally:
        server.close()
        await server.wait_closed()


async def test_max_sessions_answers_429(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--max-sessions", "2")
    async with echo_server() as echo:
        first = await open_session(node, echo.endpoint)
        second = await open_session(node, echo.endpoint)
        try:
            reply, rest = await refused_reply(node, request(echo.endpoint) + b"x")
            assert (reply.code, reply.name) == (429, "too-many"), reply
            assert rest == b""
            assert echo.connections == 2
            await first.close()
            await wait_status(node, "a slot freed", lambda st: st.active_sessions == 1)
            third = await open_session(node, echo.endpoint)
            try:
                await third.send(b"in")
                assert await third.exactly(2) == b"in"
            finally:
                await third.close()
        finally:
            await first.close()
            await second.close()


async def test_idle_session_is_closed(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--idle-timeout", "1.5")
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        conn = await open_session(node, echo.endpoint)
        try:
            for _ in range(4):  # traffic keeps it open past the timeout
                await asyncio.sleep(0.4)  # the point is to let time pass between bytes
                await conn.send(b"tick")
                assert await conn.exactly(4) == b"tick"
            t0 = loop.time()
            try:
                rest = await conn.until_eof(timeout=5)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
            assert 1.0 <= loop.time() - t0 <= 5
        finally:
            await conn.close()
