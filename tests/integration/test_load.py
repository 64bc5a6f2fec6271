"""Volume and concurrency through one real node: every byte arrives, in order, every time."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.helpers import echo_server, node_args, pattern
from tests.integration.support import OK_REPLY, TIMEOUT, Conn, cpu_seconds, dial, limited_node, request, wait_status

BIG = 256 << 20
CHUNK = 1 << 20
CONNECTIONS = 1000


@pytest.mark.slow
async def test_256_mib_both_ways_byte_exact(start_node: StartNode) -> None:
    """Stream 256 MiB up while reading the echo down at the same time; sha256 both sides."""
    node = await start_node("--allow", "127.0.0.1/32")
    block = bytearray(pattern(CHUNK, seed=256))
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0

    async def upload(conn: Conn) -> None:
        for i in range(BIG // CHUNK):
            block[:8] = i.to_bytes(8, "big")  # every chunk differs: a lost or swapped one shows
            chunk = bytes(block)
            sent.update(chunk)
            conn.writer.write(chunk)
            await conn.writer.drain()
        conn.writer.write_eof()

    async def download(conn: Conn) -> None:
        nonlocal received
        while data := await conn.reader.read(CHUNK):
            got.update(data)
            received += len(data)

    async with echo_server() as echo:
        conn = await dial(node.host, node.port)
        try:
            await conn.send(request(echo.endpoint))
            assert (await conn.reply()).raw == OK_REPLY
            async with asyncio.timeout(90):
                await asyncio.gather(upload(conn), download(conn))
        finally:
            await conn.close()
    assert received == BIG
    assert got.hexdigest() == sent.hexdigest()
    st = await wait_status(node, "the session closed", lambda st: st.total_sessions == 1 and st.active_sessions == 0)
    assert (st.bytes_up, st.bytes_down) == (BIG, BIG)


def _payload(i: int) -> bytes:
    """A distinct payload per connection (distinct length too, so a mix-up cannot pass)."""
    return f"conn-{i:04d}|".encode() + pattern(2048 + 37 * i, seed=i)


#: Clients come from 20 loopback addresses, 50 each: under the node's cap of 64 handshakes
#: in progress per source, so only the total cap (256) can bite.
SOURCES = [f"127.0.1.{i}" for i in range(1, 21)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pacing",
    [128, CONNECTIONS],
    ids=["paced", "burst"],
)
async def test_1000_concurrent_connections_byte_exact(start_node: StartNode, pacing: int) -> None:
    """1,000 sessions open at once through one node, each echoing its own payload.

    ``paced`` opens them at most 128 handshakes at a time (under the node's cap on handshakes
    in progress, 256 by default); ``burst`` dials all 1,000 at once, as real clients may.
    """
    node = await start_node("--allow", "127.0.0.1/32")
    conns: list[Conn] = []
    opening = asyncio.Semaphore(pacing)

    async def open_one(i: int) -> Conn:
        async with opening:
            conn = await dial(node.host, node.port, source=SOURCES[i % len(SOURCES)])
            conns.append(conn)
            await conn.send(request(echo.endpoint))
            reply = await conn.reply()
            assert reply.raw == OK_REPLY, reply
            return conn

    async def exchange(i: int, conn: Conn) -> bytes:
        await conn.send(_payload(i))
        await conn.shutdown_write()
        return await conn.until_eof(timeout=60)

    async with echo_server() as echo:
        try:
            async with asyncio.timeout(60):
                opened = await asyncio.gather(*(open_one(i) for i in range(CONNECTIONS)))
            # every session is spliced at the same time before any payload moves
            await wait_status(node, "all sessions spliced", lambda st: st.active_sessions == CONNECTIONS)
            assert echo.connections == CONNECTIONS
            async with asyncio.timeout(60):
                echoed = await asyncio.gather(*(exchange(i, c) for i, c in enumerate(opened)))
        finally:
            await asyncio.gather(*(c.close() for c in conns))
    bad = [i for i, data in enumerate(echoed) if data != _payload(i)]
    assert not bad, f"{len(bad)} connections got wrong bytes, first {bad[:10]}"
    total = sum(len(_payload(i)) for i in range(CONNECTIONS))
    st = await wait_status(node, "every session closed", lambda st: st.active_sessions == 0)
    assert (st.total_sessions, st.bytes_up, st.bytes_down, st.refused_sessions) == (CONNECTIONS, total, total, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_out_of_descriptors_backs_off_and_recovers(tmp_path: Path) -> None:
    """A node at its descriptor limit neither spins nor floods its log, and serves again after.
    (It now refuses new sessions with 429 before the limit, keeping headroom for the control
    plane; a connection that still cannot be accepted waits in the backlog.)"""
    conns: list[Conn] = []
    async with (
        echo_server() as echo,
        limited_node(node_args("127.0.0.1", "--allow", "127.0.0.1/32"), tmp_path, nofile=96) as node,
    ):
        try:
            for _ in range(200):  # open sessions until the node cannot accept any more
                conn = await dial(node.host, node.port)
                conns.append(conn)
                await conn.send(request(echo.endpoint))
                try:
                    reply = await conn.reply(timeout=1.0)
                except TimeoutError:
                    break  # this one waits in the backlog: the node is out of descriptors
                if reply.raw != OK_REPLY:
                    assert reply.raw == b"HN/1 429 too-many node near its descriptor limit; retry later\n", reply
                    break  # the headroom: refused before the limit
            else:
                raise AssertionError("the node never ran out of descriptors")
            log_before = node.stderr_path.stat().st_size
            cpu_before = cpu_seconds(node.proc.pid)
            await asyncio.sleep(2.0)  # the point: watch the node while it stays out of descriptors
            cpu = cpu_seconds(node.proc.pid) - cpu_before
            logged = node.stderr_path.stat().st_size - log_before
            for c in conns:
                await c.close()
            conns.clear()
            # once descriptors are back, the node serves again
            async with asyncio.timeout(TIMEOUT):
                while True:
                    conn = await dial(node.host, node.port)
                    try:
                        await conn.send(request(echo.endpoint) + b"back")
                        await conn.shutdown_write()
                        if await conn.until_eof() == OK_REPLY + b"back":
                            break
                    finally:
                        await conn.close()
                    await asyncio.sleep(0.1)
        finally:
            for c in conns:
                await c.close()
    assert cpu < 0.5, f"the node burnt {cpu:.2f}s of CPU in 2s while out of descriptors"
    assert logged < 20_000, f"the node logged {logged} bytes in 2s while out of descriptors"
