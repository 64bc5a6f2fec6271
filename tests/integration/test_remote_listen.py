"""Remote Listen through real processes: a relay, home nodes that listen on it, real clients.

The relay in these tests is a plain node (no --allow): it reaches only its listeners. Home
nodes allow 127.0.0.0/8 and dial the echo target themselves.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import grpc
import pytest

from homenet.node.address import parse_url
from homenet.node.client import open_route
from tests.conftest import StartNode
from tests.helpers import echo_server, pattern
from tests.integration.rl_support import (
    SOURCES,
    GrpcListener,
    by_id,
    dial_from,
    grpc_listener,
    hnctl,
    home_args,
    list_listeners,
    listening_url,
    log_lines,
    node_status,
    pool_full,
    redeem,
    refused_ticket,
    settled_fds,
    start_home,
    two_hop_request,
    wait_fds_back,
    wait_listeners,
)
from tests.integration.support import (
    OK_REPLY,
    TIMEOUT,
    Conn,
    connected,
    dial,
    homenet,
    refused_reply,
    request,
    running,
)

#: The relay's activation line: the hop count, and the client's address (for the home's penalties).
ACTIVATION = re.compile(rb"HN/1 200 ok hop=1 client=127\.0\.0\.[0-9]+:[0-9]+\n")


async def echo_through(conn: Conn, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read everything until the far end closes."""
    await conn.send(payload)
    await conn.shutdown_write()
    return await conn.until_eof()


# -- clients reach a home target through the relay --------------------------------------------------
async def test_connect_and_listen_reach_a_home_target(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    async with echo_server() as echo:
        _, url = await start_home(nodes, relay.url, tmp_path / "home")
        assert url == f"{relay.url}/home1"

        text = 'héllo, home\t— 1 2 3 "quoted" end'
        r = await homenet("connect", f"{url}/{echo.endpoint}", "--data", text)
        assert (r.code, r.stdout, r.stderr) == (0, text.encode(), "")

        big = pattern(1 << 20, seed=11)  # through stdin, binary, larger than any one buffer
        r = await homenet("connect", f"{url}/{echo.endpoint}", stdin=big)
        assert (r.code, r.stderr) == (0, "")
        assert r.stdout == big

        listen = ["listen", f"{url}/{echo.endpoint}", "--port", "0"]
        async with running(listen, tmp_path / "listen", ready="LISTENING ") as fwd:
            assert fwd.url.startswith("tcp://127.0.0.1:")
            for i in range(3):
                data = pattern(50_000 + i, seed=100 + i)
                async with connected(fwd.host, fwd.port) as conn:
                    assert await echo_through(conn, data) == data
        assert echo.connections == 5

        # the relay itself reaches only its listeners: a direct target is not for it to dial
        reply, rest = await refused_reply(relay, request(echo.endpoint))
        assert (reply.code, rest) == (403, b"")
        assert echo.connections == 5


CLIENTS = 200
#: Sessions being opened at once. The home's dial-backs all come from one address, and the
#: relay counts them against that address's handshake cap (64).
OPENING = 48


def _payload(i: int) -> bytes:
    """A distinct payload per client (distinct length too, so a mix-up cannot pass)."""
    return f"client-{i:04d}|".encode() + pattern(4096 + 61 * i, seed=i)


@pytest.mark.parametrize(("pool", "clients"), [(4, CLIENTS), (0, 12)], ids=["pool", "dial-back"])
async def test_concurrent_sessions_byte_exact_and_nothing_leaks(
    nodes: StartNode, tmp_path: Path, pool: int, clients: int
) -> None:
    """Many sessions at once through one listener: every byte back to its own client.

    All sessions are spliced at the same time before any payload moves. With a pool the first
    clients take parked connections and the rest are dialed back; with ``--pool-size 0`` every
    one is dialed back. Afterwards the relay's and the home's sockets come back to what they
    were before (nothing leaked per session).
    """
    relay = await nodes()
    async with echo_server() as echo:
        home, _ = await start_home(nodes, relay.url, tmp_path / "home", "--pool-size", str(pool))
        await wait_listeners(relay, "the pool parked", pool_full("home1", pool))
        async with connected(relay.host, relay.port) as warm:  # lazily made things exist before the baseline
            assert await echo_through(warm, two_hop_request("home1", echo.endpoint) + b"warm") == (
                OK_REPLY * 2 + b"warm"
            )
        await wait_listeners(relay, "the pool refilled", pool_full("home1", pool))
        relay_base, home_base = await settled_fds(relay.proc.pid), await settled_fds(home.proc.pid)

        conns: list[Conn] = []
        opening = asyncio.Semaphore(OPENING)

        async def open_one(i: int) -> Conn:
            async with opening:
                conn = await dial_from(SOURCES[i % len(SOURCES)], relay.host, relay.port)
                conns.append(conn)
                await conn.send(two_hop_request("home1", echo.endpoint))
                for _ in range(2):
                    reply = await conn.reply()
                    assert reply.raw == OK_REPLY, f"client {i}: {reply}"
                return conn

        try:
            async with asyncio.timeout(60):
                opened = await asyncio.gather(*(open_one(i) for i in range(clients)))
            await wait_listeners(
                relay, f"{clients} sessions at once", lambda ls: by_id(ls, "home1")[0].active_sessions == clients
            )
            async with asyncio.timeout(60):
                got = await asyncio.gather(*(echo_through(c, _payload(i)) for i, c in enumerate(opened)))
        finally:
            await asyncio.gather(*(c.close() for c in conns))
        bad = [i for i, data in enumerate(got) if data != _payload(i)]
        assert not bad, f"{len(bad)}/{clients} clients got wrong bytes, first {bad[:5]}: {got[bad[0]][:80]!r}"
        assert echo.connections == clients + 1
        # the sessions went the ways they were meant to: parked connections, else dial-backs
        via_pool = sum(" via the pool of " in ln for ln in log_lines(home, "session.open"))
        if pool:
            assert 0 < via_pool < clients, via_pool
        else:
            assert via_pool == 0, via_pool

        await wait_fds_back(relay.proc.pid, relay_base, "relay after the sessions")
        await wait_fds_back(home.proc.pid, home_base, "home after the sessions")
        done = await wait_listeners(
            relay,
            "every session closed and the pool refilled",
            lambda ls: pool_full("home1", pool)(ls) and by_id(ls, "home1")[0].active_sessions == 0,
        )
        assert by_id(done, "home1")[0].total_sessions == clients + 1
        st = await node_status(home)
        assert (st.active_sessions, st.total_sessions) == (0, clients + 1)


async def test_a_burst_of_dial_backs_from_one_listener_is_served(nodes: StartNode) -> None:
    relay = await nodes()
    waiting = 80
    clients: list[Conn] = []
    backs: list[Conn] = []
    tickets: list[str] = []
    served: set[str] = set()
    async with grpc_listener(relay, "busy") as lst:
        try:
            for i in range(waiting):  # clients from many addresses: each under its cap
                clients.append(await dial_from(SOURCES[i % len(SOURCES)], relay.host, relay.port))
                await clients[-1].send(request("busy"))
            tickets = [(await lst.next_event("incoming")).incoming.ticket for _ in range(waiting)]
            # the listener dials every one back at once: all connected before the first request line
            backs = [await dial(relay.host, relay.port) for _ in tickets]

            async def answer(conn: Conn, ticket: str) -> bytes:
                try:
                    await conn.send(f"HN/1 TICKET {ticket}\n".encode())
                    raw = (await conn.reply()).raw
                except (OSError, AssertionError) as exc:
                    return repr(exc).encode()
                if ACTIVATION.fullmatch(raw):
                    served.add(ticket)
                return raw

            replies = await asyncio.gather(*(answer(c, t) for c, t in zip(backs, tickets, strict=True)))
            refused = [r for r in replies if not ACTIVATION.fullmatch(r)]
            assert not refused, f"{len(refused)}/{waiting} dial-backs refused, e.g. {refused[0]!r}"
        finally:
            for ticket in set(tickets) - served:  # let the stranded clients go now, not after the TTL
                conn, _ = await redeem(relay, "TICKET", ticket)
                await conn.close()
            await asyncio.gather(*(c.close() for c in [*clients, *backs]))


async def test_rl_mode_forwards_every_client_to_its_one_target(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    async with echo_server() as echo:
        args = ["rl", relay.url, "--to", echo.endpoint, "--listen-id", "svc", "--state-dir", str(tmp_path / "st")]
        async with running([*args, "--log-level", "debug"], tmp_path / "rl", ready="LISTENING ") as rl:
            assert rl.url == f"{relay.url}/svc"
            for text in ("one service", "and again"):
                r = await homenet("connect", rl.url, "--data", text)  # no target hop: the listenId is the service
                assert (r.code, r.stdout, r.stderr) == (0, text.encode(), "")
            data = pattern(200_000, seed=5)
            async with connected(relay.host, relay.port) as conn:
                assert await echo_through(conn, request("svc") + data) == OK_REPLY + data
        assert echo.connections == 3
        # its stream ended with the process: the id is offline now, not silently routed elsewhere
        reply, _ = await refused_reply(relay, request("svc"))
        assert reply.code == 503


# -- chains ---------------------------------------------------------------------------------------
async def test_chain_of_three_pipelined_and_hop_by_hop(nodes: StartNode, tmp_path: Path) -> None:
    """home remote-listens on A through B (``--rl hn://B/a``); clients reach it as hn://B/a/h/..."""
    b = await nodes()
    a = await nodes("--rl", b.url, "--listen-id", "a", "--state-dir", str(tmp_path / "a"))
    assert listening_url(await a.next_line("LISTENING ")) == f"{b.url}/a"
    home, url = await start_home(nodes, f"{b.url}/a", tmp_path / "h", listen_id="h")
    assert url == f"{b.url}/a/h"
    await wait_listeners(a, "h's pool parked at A", pool_full("h", 4))
    await wait_listeners(b, "a's pool parked at B", pool_full("a", 4))
    base = [(p, await settled_fds(p.proc.pid)) for p in (b, a, home)]
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        data = pattern(300_000, seed=9)
        hops = ("a", "h", echo.endpoint)

        # pipelined by the product's client: every request and the payload in one write
        opened = await open_route(parse_url(f"{url}/{echo.endpoint}"), first=data, timeout=TIMEOUT)
        try:
            got = opened.early
            async with asyncio.timeout(TIMEOUT):
                while len(got) < len(data):
                    chunk = await loop.sock_recv(opened.sock, 1 << 16)
                    assert chunk, "route closed early"
                    got += chunk
        finally:
            opened.sock.close()
        assert got == data

        # pipelined on the wire, by hand: one write, then three replies and the echo
        async with connected(b.host, b.port) as conn:
            assert await echo_through(conn, b"".join(request(h) for h in hops) + data) == OK_REPLY * 3 + data

        # hop by hop: each request waits for the previous reply
        async with connected(b.host, b.port) as conn:
            for hop in hops:
                await conn.send(request(hop))
                assert (await conn.reply()).raw == OK_REPLY, hop
            assert await echo_through(conn, data) == data

        r = await homenet("connect", f"{url}/{echo.endpoint}", "--data", "three hops")
        assert (r.code, r.stdout) == (0, b"three hops")
        assert echo.connections == 4
    for proc, fds_before in base:  # B, A and home each let go of every session
        await wait_fds_back(proc.proc.pid, fds_before, f"{proc.url} after the sessions")


# -- tickets --------------------------------------------------------------------------------------
async def test_forged_tickets_are_refused(nodes: StartNode) -> None:
    relay = await nodes()
    for verb in ("TICKET", "POOL"):
        for forged in ("forged123", "A" * 22):
            reply = await refused_ticket(relay, verb, forged)
            assert (reply.code, reply.name) == (401, "unauthorized"), reply


async def test_dial_back_ticket_is_single_use_and_expires(nodes: StartNode) -> None:
    relay = await nodes()
    async with grpc_listener(relay, "tk", pool_size=0) as lst:
        assert lst.registered is not None
        assert lst.registered.pool_size == 0
        async with connected(relay.host, relay.port) as client:
            await client.send(request("tk") + b"from the client")
            incoming = (await lst.next_event("incoming")).incoming
            assert 0 < incoming.expires_in <= 10
            assert incoming.client.startswith("127.0.0.1:")
            back, reply = await redeem(relay, "TICKET", incoming.ticket)
            try:
                assert ACTIVATION.fullmatch(reply.raw), reply.raw
                assert await back.exactly(15) == b"from the client"
                await back.send(b"from the listener")
                assert (await client.reply()).raw == OK_REPLY
                assert await client.exactly(17) == b"from the listener"
                # a second use while the first session is still spliced
                assert (await refused_ticket(relay, "TICKET", incoming.ticket)).code == 401
            finally:
                await back.close()
        assert (await refused_ticket(relay, "TICKET", incoming.ticket)).code == 401

        # a ticket nobody uses: the client gives up after its TTL, the ticket is dead after it
        async with connected(relay.host, relay.port) as late:
            await late.send(request("tk"))
            unused = (await lst.next_event("incoming")).incoming
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            reply = await late.reply(timeout=unused.expires_in + 3)
            assert (reply.code, reply.name) == (504, "gateway-timeout"), reply
            assert loop.time() - t0 >= unused.expires_in - 0.5
        assert (await refused_ticket(relay, "TICKET", unused.ticket)).code == 401


async def test_pool_grant_is_single_use_and_of_one_kind(nodes: StartNode) -> None:
    relay = await nodes()
    async with grpc_listener(relay, "pl", pool_size=1) as lst:
        assert lst.registered is not None
        assert lst.registered.pool_size == 1
        grant = (await lst.next_event("pool_grant")).pool_grant
        parked = await dial(relay.host, relay.port)
        try:
            await parked.send(f"HN/1 POOL {grant.ticket}\n".encode())
            await wait_listeners(relay, "the connection parked", pool_full("pl", 1))
            async with connected(relay.host, relay.port) as client:
                await client.send(request("pl") + b"hello pool")
                assert ACTIVATION.fullmatch((await parked.reply()).raw)
                assert await parked.exactly(10) == b"hello pool"
                await parked.send(b"pong")
                assert (await client.reply()).raw == OK_REPLY
                assert await client.exactly(4) == b"pong"
        finally:
            await parked.close()
        assert (await refused_ticket(relay, "POOL", grant.ticket)).code == 401

        # the relay refills the pool; a pool ticket cannot be used to answer a client...
        again = (await lst.next_event("pool_grant")).pool_grant
        assert again.ticket != grant.ticket
        assert (await refused_ticket(relay, "TICKET", again.ticket)).code == 401
        # ...and trying it the wrong way used it up
        assert (await refused_ticket(relay, "POOL", again.ticket)).code == 401


async def test_a_ticket_dies_with_its_session(nodes: StartNode) -> None:
    relay = await nodes()
    lst = await GrpcListener.open(relay)
    try:
        await lst.register("sb", pool_size=0)
        async with connected(relay.host, relay.port) as client:
            await client.send(request("sb"))
            incoming = (await lst.next_event("incoming")).incoming
            await lst.close()  # the listener's stream ends with a client still waiting
            await wait_listeners(relay, "sb offline", lambda ls: by_id(ls, "sb")[0].state == "offline")
            reply = await client.reply(timeout=1.0)  # told at once, not after the dial-back TTL
            assert reply.code == 503, reply
        assert (await refused_ticket(relay, "TICKET", incoming.ticket)).code == 401
    finally:
        await lst.close()


# -- who may hold a listenId ------------------------------------------------------------------------
async def test_a_second_node_cannot_take_a_live_listen_id(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    first, _ = await start_home(nodes, relay.url, tmp_path / "first", listen_id="dup")
    [before] = by_id(await list_listeners(relay), "dup")
    # quiet logs so the refusal is the process's only stderr line
    args = home_args(relay.url, tmp_path / "second", listen_id="dup")
    second = await nodes(args=[*args, "--log-level", "warning"])
    async with asyncio.timeout(TIMEOUT):
        code = await second.proc.wait()
    assert code == 1
    lines = second.stderr().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"\S+: error: relay {re.escape(relay.url)} refused dup: .*live node.*", lines[0]), lines
    [after] = by_id(await list_listeners(relay), "dup")
    assert (after.peer, after.since, after.state) == (before.peer, before.since, "online")
    assert first.proc.returncode is None
    async with echo_server() as echo:
        r = await homenet("connect", f"{relay.url}/dup/{echo.endpoint}", "--data", "still mine")
        assert (r.code, r.stdout) == (0, b"still mine")


async def test_refusal_line_names_the_program(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    async with grpc_listener(relay, "taken"):
        r = await homenet("rl", relay.url, "--to", "127.0.0.1:9", "--listen-id", "taken", "--state-dir", str(tmp_path))
    assert r.code == 1
    assert r.stderr.startswith(f"homenet: error: relay {relay.url} refused taken: "), r.stderr


async def test_resume_secret_takes_the_id_over_and_ends_the_old_stream(nodes: StartNode) -> None:
    relay = await nodes()
    async with grpc_listener(relay, "g") as one:
        assert one.registered is not None
        secret = one.registered.resume_secret
        assert len(secret) >= 16

        for wrong, status in (("", "ALREADY_EXISTS"), ("not-the-secret", "ALREADY_EXISTS")):
            other = await GrpcListener.open(relay)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await other.register("g", wrong)
                assert refused.value.code().name == status
            finally:
                await other.close()
        bad = await GrpcListener.open(relay)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bad.register("no/slash")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await bad.close()
        assert not one.ended.is_set()

        async with grpc_listener(relay, "g", secret) as two:
            assert two.registered is not None
            assert (two.registered.listen_id, two.registered.resume_secret) == ("g", secret)
            async with asyncio.timeout(TIMEOUT):
                await one.ended.wait()
            [rec] = by_id(await list_listeners(relay), "g")
            assert rec.state == "online"
            # clients now reach the new stream
            async with connected(relay.host, relay.port) as client:
                await client.send(request("g"))
                incoming = (await two.next_event("incoming")).incoming
                back, reply = await redeem(relay, "TICKET", incoming.ticket)
                await back.close()
                assert ACTIVATION.fullmatch(reply.raw), reply.raw
                assert (await client.reply()).raw == OK_REPLY


# -- operator view ------------------------------------------------------------------------------
async def test_hnctl_listeners_kick_and_status(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    home, _ = await start_home(nodes, relay.url, tmp_path / "home", "--pool-size", "2", "--name", "den")
    await wait_listeners(relay, "the pool parked", pool_full("home1", 2))
    payload = b"x" * 1000
    async with echo_server() as echo, connected(relay.host, relay.port) as conn:
        assert await echo_through(conn, two_hop_request("home1", echo.endpoint) + payload) == (OK_REPLY * 2 + payload)
    await wait_listeners(
        relay,
        "the session counted",
        lambda ls: pool_full("home1", 2)(ls) and by_id(ls, "home1")[0].total_sessions == 1,
    )

    r = await hnctl(relay, "listeners", "--json")
    assert (r.code, r.stderr) == (0, "")
    [x] = json.loads(r.stdout)
    assert {k: x[k] for k in ("listen_id", "state", "name", "pool_size", "pool_parked")} == {
        "listen_id": "home1",
        "state": "online",
        "name": "den",
        "pool_size": 2,
        "pool_parked": 2,
    }
    assert (int(x["active_sessions"]), int(x["total_sessions"])) == (0, 1)
    # the relay relays the home's reply line and the target's bytes: counted as they crossed it
    assert int(x["bytes_up"]) == len(request(echo.endpoint)) + len(payload)
    assert int(x["bytes_down"]) == len(OK_REPLY) + len(payload)
    assert re.fullmatch(r"127\.0\.0\.1:[0-9]+", x["peer"]), x["peer"]
    assert abs(float(x["since"]) - time.time()) < 60

    r = await hnctl(relay, "listeners")
    assert r.code == 0
    header, row = r.stdout.decode().splitlines()
    assert header.split()[:3] == ["LISTENID", "STATE", "PEER"]
    assert row.split()[:2] == ["home1", "online"]

    async with grpc_listener(relay, "hand") as hand:
        r = await hnctl(relay, "status", "--json")
        assert r.code == 0
        assert int(json.loads(r.stdout)["listeners"]) == 2

        r = await hnctl(relay, "kick", "hand")
        assert (r.code, r.stdout, r.stderr) == (0, b"kicked hand\n", "")
        async with asyncio.timeout(TIMEOUT):
            await hand.ended.wait()
        assert [x.listen_id for x in await list_listeners(relay)] == ["home1"]
        r = await hnctl(relay, "status", "--json")
        assert int(json.loads(r.stdout)["listeners"]) == 1
        reply, _ = await refused_reply(relay, request("hand"))
        assert reply.code == 404

    r = await hnctl(relay, "kick", "nobody")
    assert r.code == 1
    assert len(r.stderr_lines) == 1, r.stderr
    assert "nobody" in r.stderr

    # a kicked home node comes back by itself (its stream ended; it reconnects with its secret)
    r = await hnctl(relay, "kick", "home1")
    assert r.code == 0
    assert listening_url(await home.next_line("LISTENING ")) == f"{relay.url}/home1"
    await wait_listeners(relay, "home1 back", pool_full("home1", 2))
