"""``homenet node --workers N``: worker processes on one port act as one node.

Real processes on loopback: a relay with 2 workers (``SO_REUSEPORT``, or one shared socket),
a home node remote-listening on it, an echo target. Connections land on both workers; a
listener's clients reach it whichever worker accepted them (the connection is handed over);
the control view answers for every worker; a worker killed -9 is started again and takes
only its own sessions with it; SIGTERM drains them all.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import grpc
import pytest

from homenet.control.v1 import node_pb2, node_pb2_grpc
from homenet.control.workers import WorkerSpec
from homenet.node.auth import Credentials
from homenet.node.keys import client_key
from homenet.node.preamble import Verb, encode_request
from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, node_args
from tests.integration.rl_support import start_home, two_hop_request
from tests.integration.support import (
    OK_REPLY,
    Conn,
    admin_metadata,
    channel,
    dial,
    hnctl,
    node_conn,
    open_session,
    wait_status,
)

pytestmark = pytest.mark.timeout(90)

SESSIONS = 20  # all on one worker of two by chance: 2 * 2**-20


def relay_args(*extra: str) -> list[str]:
    return node_args("127.0.0.1", "--workers", "2", "--allow", "127.0.0.0/8", "--drain-grace", "5", *extra)


async def sessions(node: NodeProc) -> list[node_pb2.Session]:
    async with channel(node) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        method = "/homenet.v1.NodeService/ListSessions"
        resp = await stub.ListSessions(
            node_pb2.ListSessionsRequest(), timeout=5.0, metadata=admin_metadata(node, method)
        )
        return list(resp.sessions)


def worker_pids(node: NodeProc) -> dict[int, int]:
    """worker index -> pid of its latest incarnation (from the supervisor's log)."""
    out: dict[int, int] = {}
    for m in re.finditer(r"worker\.started worker=(\d+) pid=(\d+)", node.stderr_path.read_text()):
        out[int(m[1])] = int(m[2])
    return out


async def echo_ok(conn: Conn, payload: bytes) -> bool:
    try:
        await conn.send(payload)
        return await conn.exactly(len(payload), timeout=5.0) == payload
    except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
        return False


async def via_listener(relay: NodeProc, listen_id: str, target: str) -> Conn:
    """A session through ``relay`` to ``listen_id`` and on to ``target`` (both replies read)."""
    conn = await node_conn(relay)
    try:
        await conn.send(two_hop_request(listen_id, target))
        for _ in range(2):
            reply = await conn.reply()
            assert reply.raw == OK_REPLY, reply
    except BaseException:
        await conn.close()
        raise
    return conn


async def until(what: str, check: object, timeout: float = 20.0) -> None:
    """Poll an async ``check`` until it is true (the state changes in another process)."""
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_workers_act_as_one_node(start_node: StartNode, tmp_path: Path) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=relay_args())
        _, url = await start_home(start_node, relay.url, tmp_path / "home")
        listen_id = url.rsplit("/", 1)[1]
        direct = [await open_session(relay, echo.endpoint) for _ in range(SESSIONS)]
        remote = [await via_listener(relay, listen_id, echo.endpoint) for _ in range(SESSIONS)]
        try:
            for i, conn in enumerate(direct + remote):
                assert await echo_ok(conn, f"ping {i}\n".encode() * 100)
            live = await sessions(relay)
            assert {s.worker for s in live} == {0, 1}, "connections should land on both workers"
            assert len(live) == 2 * SESSIONS
            st = await wait_status(relay, "every session counted", lambda s: s.active_sessions == 2 * SESSIONS)
            assert (st.workers, st.workers_up, st.listeners) == (2, 2, 1)
            assert st.fleet_peers == 0, "siblings are the node, not a fleet"
        finally:
            for conn in direct + remote:
                await conn.close()
        listed = await hnctl("--node", relay.endpoint, "listeners", env=_admin_env(relay))
        assert listed.code == 0, listed.stderr
        assert len([ln for ln in listed.stdout.decode().splitlines() if ln.startswith(listen_id + " ")]) == 1, (
            listed.stdout.decode()
        )
        status = await hnctl("--node", relay.endpoint, "status", env=_admin_env(relay))
        assert "workers    2/2 answered" in status.stdout.decode(), status.stdout.decode()
        assert echo.connections == 2 * SESSIONS


async def test_a_killed_worker_is_restarted_and_loses_only_its_sessions(start_node: StartNode, tmp_path: Path) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=relay_args())
        _, url = await start_home(start_node, relay.url, tmp_path / "home")
        listen_id = url.rsplit("/", 1)[1]
        conns = [await open_session(relay, echo.endpoint) for _ in range(SESSIONS)]
        try:
            by_port = {s.client.rsplit(":", 1)[1]: s.worker for s in await sessions(relay)}
            workers = [by_port[str(c.writer.get_extra_info("sockname")[1])] for c in conns]
            victim = workers[0]
            pid = worker_pids(relay)[victim]
            os.kill(pid, signal.SIGKILL)
            alive = [await echo_ok(c, b"still there?\n") for c in conns]
            assert alive == [w != victim for w in workers], "exactly the killed worker's sessions end"
        finally:
            for conn in conns:
                await conn.close()

        async def restarted() -> bool:
            pids = worker_pids(relay)
            return pids.get(victim, pid) != pid

        await until("the worker is started again", restarted)
        await wait_status(relay, "both workers answer", lambda s: s.workers_up == 2)

        async def reachable() -> bool:  # its listener (if the victim held it) reconnected
            try:
                conn = await via_listener(relay, listen_id, echo.endpoint)
            except (AssertionError, ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
                return False  # refused (moving, offline) or cut while the listener comes back
            try:
                return await echo_ok(conn, b"back\n")
            finally:
                await conn.close()

        await until("the listener is reachable again", reachable)
        for _ in range(SESSIONS):  # and every new connection works, on either worker
            assert await reachable()


async def test_sigterm_drains_every_worker(start_node: StartNode) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=relay_args())
        conns = [await open_session(relay, echo.endpoint) for _ in range(SESSIONS)]
        assert {s.worker for s in await sessions(relay)} == {0, 1}
        relay.proc.send_signal(signal.SIGTERM)
        for conn in conns:  # sessions go on while the node drains
            assert await echo_ok(conn, b"draining\n")
        for conn in conns:
            await conn.close()
        async with asyncio.timeout(8.0):  # well before the 5 s drain grace + the kill margin
            code = await relay.proc.wait()
        assert code == 0, relay.stderr()
        log = relay.stderr_path.read_text()
        assert log.count("node.stopped") == 2, log[-3000:]
        assert "worker.exited" not in log


async def test_one_shared_socket(start_node: StartNode) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=relay_args("--worker-accept", "shared"))
        for i in range(SESSIONS):
            conn = await open_session(relay, echo.endpoint)
            try:
                assert await echo_ok(conn, f"{i}\n".encode())
            finally:
                await conn.close()
        st = await wait_status(relay, "counted", lambda s: s.total_sessions == SESSIONS)
        assert st.workers_up == 2


async def test_a_signed_request_is_good_once_per_node_not_once_per_worker(start_node: StartNode) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=relay_args("--connect-auth", "direct"))
        found = client_key(key_file=str(relay.stderr_path.parent / "state" / "keys.toml"), env={})
        assert found is not None
        hop = echo.endpoint
        line = encode_request(Verb.CONNECT, hop, Credentials(*found).token(f"HN/1 CONNECT {hop}"))
        codes = []
        for i in range(SESSIONS):  # the same captured line, again and again, landing on both workers
            # one source per attempt: each replay is a failed login, and 5 from one source block it
            conn = await dial(relay.host, relay.port, source=f"127.0.0.{10 + i}")
            try:
                await conn.send(line)
                codes.append((await conn.reply()).code)
            finally:
                await conn.close()
        assert codes == [200] + [401] * (SESSIONS - 1), codes
        assert echo.connections == 1


def _admin_env(node: NodeProc) -> dict[str, str]:
    from tests.integration.support import cli_env

    return cli_env(HOMENET_KEY_FILE=str(node.stderr_path.parent / "state" / "keys.toml"))


async def test_a_worker_s_private_port_takes_only_its_siblings(start_node: StartNode) -> None:
    """A local process cannot use a worker's private loopback port to skip what the node's
    port asks (TLS, client certificates): plain requests and unsigned calls are refused there."""
    relay = await start_node(args=relay_args())
    await wait_status(relay, "both workers answer", lambda s: s.workers_up == 2)
    environ = Path(f"/proc/{worker_pids(relay)[0]}/environ").read_bytes().split(b"\0")
    spec = WorkerSpec.loads(
        next(e for e in environ if e.startswith(b"HOMENET_WORKER_SPEC=")).split(b"=", 1)[1].decode()
    )
    private = spec.private.port
    async with echo_server() as echo:
        conn = await dial("127.0.0.1", private)
        try:
            await conn.send(encode_request(Verb.CONNECT, echo.endpoint))
            reply = await conn.reply()
            assert (reply.code, reply.reason) == (403, "this is a worker's private port: connect to the node's port")
        finally:
            await conn.close()
        assert echo.connections == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{private}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node_pb2_grpc.NodeServiceStub(ch).GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "this is a worker's private port: call the node's port"
