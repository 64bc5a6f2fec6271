"""The data plane through real node processes: direct hops, chains, half-close, bad input."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, pattern
from tests.integration.support import (
    OK_REPLY,
    HashServer,
    closed_port,
    connected,
    hash_server,
    node_conn,
    open_session,
    refused_reply,
    request,
    wait_status,
)

CHAIN = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def start_chain(start_node: StartNode) -> list[NodeProc]:
    """Three nodes on three loopback addresses, each allowed to dial all of 127.0.0.0/8."""
    return list(await asyncio.gather(*(start_node("--allow", "127.0.0.0/8", bind=h) for h in CHAIN)))


def chain_hops(nodes: list[NodeProc], target: str) -> list[str]:
    """What the client asks each node for: the next node, and the last one the target."""
    return [n.endpoint for n in nodes[1:]] + [target]


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


async def test_chain_hop_by_hop(start_node: StartNode) -> None:
    nodes = await start_chain(start_node)
    assert [n.host for n in nodes] == list(CHAIN)
    data = pattern(1 << 20, seed=2)
    async with echo_server() as echo, connected(nodes[0].host, nodes[0].port) as conn:
        for hop in chain_hops(nodes, echo.endpoint):
            await conn.send(request(hop))
            assert (await conn.reply()).raw == OK_REPLY
        await conn.send(data)
        await conn.shutdown_write()
        assert await conn.until_eof() == data
        assert echo.connections == 1
    for n in nodes:  # every node spliced exactly one session and saw every byte both ways
        await wait_status(n, "the session closed", lambda st: st.total_sessions == 1 and st.active_sessions == 0)


async def test_chain_pipelined_in_one_write(start_node: StartNode) -> None:
    nodes = await start_chain(start_node)
    data = pattern(1 << 20, seed=3)
    async with echo_server() as echo, connected(nodes[0].host, nodes[0].port) as conn:
        preamble = b"".join(request(h) for h in chain_hops(nodes, echo.endpoint))
        await conn.send(preamble + data)  # one write: every request and the payload
        await conn.shutdown_write()
        stream = await conn.until_eof()
    # three replies in order, then the target's bytes, nothing else in between
    assert stream[: 3 * len(OK_REPLY)] == OK_REPLY * 3
    assert stream[3 * len(OK_REPLY) :] == data


@pytest.mark.parametrize("failing_hop", [0, 1, 2])
async def test_chain_pipelined_replies_in_order(start_node: StartNode, failing_hop: int) -> None:
    """When hop N fails, the client reads N ``200``s, then that hop's error line, then EOF."""
    nodes = await start_chain(start_node)
    with closed_port() as dead:
        async with echo_server() as echo:
            hops = chain_hops(nodes, echo.endpoint)
            hops[failing_hop] = f"127.0.0.1:{dead}"
            async with connected(nodes[0].host, nodes[0].port) as conn:
                await conn.send(b"".join(request(h) for h in hops) + b"payload that never arrives")
                for _ in range(failing_hop):
                    assert (await conn.reply()).raw == OK_REPLY
                err = await conn.reply()
                assert (err.code, err.name) == (502, "bad-gateway"), err
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
    "http-get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "random-16": _garbage(1, 16),
    "random-4k": _garbage(2, 4096),
    "tls-hello-ish": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "bad-verb": b"HN/1 FETCH 127.0.0.1:1\n",
    "no-hop": b"HN/1 CONNECT\n",
    "bad-hop": b"HN/1 CONNECT not a hop\n",
    "nul": b"HN/1 CONNECT 127.0.0.1:1\x00\n",
}


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_gets_one_400_line_and_close(start_node: StartNode, payload: bytes) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo:
        live = await open_session(node, echo.endpoint)  # a session already open must not notice
        try:
            for _ in range(3):
                reply, rest = await refused_reply(node, payload)
                assert reply.raw.startswith(b"HN/1 400 bad-request"), reply
                assert reply.reason, "a refusal says why"
                assert rest == b"", "exactly one line, then the node closes"
            await live.send(b"still here")
            assert await live.exactly(10) == b"still here"
            # and new clients are still served
            fresh = await open_session(node, echo.endpoint)
            try:
                await fresh.send(b"fresh")
                assert await fresh.exactly(5) == b"fresh"
            finally:
                await fresh.close()
        finally:
            await live.close()
    st = await wait_status(node, "refusals counted", lambda st: st.refused_sessions >= 3)
    assert st.refused_sessions == 3


@pytest.mark.parametrize(
    ("payload", "code", "name"),
    [
        (b"HN/2 CONNECT 127.0.0.1:1\n", 505, "version-not-supported"),
        (b"HN/1 CONNECT " + b"a" * 2048 + b"\n", 413, "too-large"),
        (b"HN/1 CONNECT " + b"a" * 2048, 413, "too-large"),
    ],
    ids=["version", "long-line", "long-no-newline"],
)
async def test_bad_preamble_codes(start_node: StartNode, payload: bytes, code: int, name: str) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    reply, rest = await refused_reply(node, payload)
    assert (reply.code, reply.name) == (code, name), reply
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
