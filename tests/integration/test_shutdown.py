"""SIGTERM drains: no new sessions, open ones keep working, then a clean exit."""

from __future__ import annotations

import asyncio
import signal
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, proc_env
from tests.integration.support import TIMEOUT, Conn, channel, closed_port, node_conn, open_session, request


async def _new_sessions_refused(node: NodeProc) -> str:
    """Probe the node until it refuses new sessions; returns how it refused.

    SIGTERM is handled asynchronously in the node, so a probe may still be served just after
    the signal. Probes ask for a closed port: a node still serving answers ``502`` and makes
    no session, one that is draining answers ``503`` or is not listening any more.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + TIMEOUT
    with closed_port() as dead:
        while loop.time() < end:
            try:
                conn = await node_conn(node)
            except ConnectionRefusedError:
                return "connection refused"
            except ConnectionResetError:  # it was in the backlog when the listener closed
                return "connection reset"
            try:
                await conn.send(request(f"127.0.0.1:{dead}"))
                reply = await conn.reply()
            except (ConnectionResetError, BrokenPipeError):
                return "connection reset"
            except AssertionError:  # EOF without a reply line
                return "closed"
            finally:
                await conn.close()
            if reply.code != 502:
                assert (reply.code, reply.name) == (503, "unavailable"), reply
                return "503"
            await asyncio.sleep(0.02)
    raise AssertionError("the node kept serving new requests after SIGTERM")


async def _echo(conn: Conn, data: bytes) -> None:
    await conn.send(data)
    assert await conn.exactly(len(data)) == data


async def test_sigterm_drains_open_session_then_exits_0(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--drain-grace", "30")
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        conn = await open_session(node, echo.endpoint)
        try:
            await _echo(conn, b"before")
            node.proc.send_signal(signal.SIGTERM)
            await _new_sessions_refused(node)
            # the session opened before the signal still carries bytes both ways
            for i in range(5):
                await _echo(conn, f"during drain {i}".encode() * 1000)
            assert node.proc.returncode is None, "the node left before its open session ended"
            await conn.shutdown_write()
            assert await conn.until_eof() == b""
            closed_at = loop.time()
        finally:
            await conn.close()
        async with asyncio.timeout(5):  # far sooner than the 30 s grace: it exits when drained
            code = await node.proc.wait()
        assert code == 0, node.stderr()
        assert loop.time() - closed_at < 5
        assert echo.connections == 1


async def test_sigterm_with_idle_node_exits_0_promptly(start_node: StartNode) -> None:
    node = await start_node("--drain-grace", "30")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    node.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        code = await node.proc.wait()
    assert code == 0, node.stderr()
    assert loop.time() - t0 < 5


async def test_sigterm_grace_expires_with_session_open(start_node: StartNode) -> None:
    """The client never closes: the node waits its grace period, closes the session, exits 0."""
    node = await start_node("--allow", "127.0.0.1/32", "--drain-grace", "1")
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        conn = await open_session(node, echo.endpoint)
        try:
            await _echo(conn, b"before")
            t0 = loop.time()
            node.proc.send_signal(signal.SIGTERM)
            await _echo(conn, b"still served within the grace period")
            async with asyncio.timeout(1 + 4):
                code = await node.proc.wait()
            waited = loop.time() - t0
            assert code == 0, node.stderr()
            assert waited >= 0.8, f"exited after {waited:.2f}s: it did not wait for the open session"
            # the node closed the session it gave up on
            try:
                rest = await conn.until_eof(timeout=5)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
        finally:
            await conn.close()


async def test_second_sigterm_cuts_the_drain_short(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--drain-grace", "30")
    async with echo_server() as echo:
        conn = await open_session(node, echo.endpoint)
        try:
            await _echo(conn, b"before")
            node.proc.send_signal(signal.SIGTERM)
            await _new_sessions_refused(node)  # the first signal was taken
            assert node.proc.returncode is None
            node.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):  # not the 30 s grace
                code = await node.proc.wait()
            assert code == 0, node.stderr()
            try:  # the open session was closed, not left behind
                rest = await conn.until_eof(timeout=5)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
        finally:
            await conn.close()


async def test_health_watchers_hear_not_serving_on_sigterm(start_node: StartNode) -> None:
    """Shutdown tells peers first: a health Watch stream opened before SIGTERM sees NOT_SERVING."""
    node = await start_node("--drain-grace", "30")
    async with channel(node) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        try:
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            node.proc.send_signal(signal.SIGTERM)
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            watch.cancel()
    async with asyncio.timeout(10):
        code = await node.proc.wait()
    assert code == 0, node.stderr()


async def test_connect_cli_reports_a_session_cut_by_the_node(start_node: StartNode) -> None:
    """`homenet connect` with stdin still open; the node gives up on it at shutdown: exit 1, one line."""
    node = await start_node("--allow", "127.0.0.1/32", "--drain-grace", "1")
    async with echo_server() as echo:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "homenet", "connect", f"{node.url}/{echo.endpoint}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=proc_env(node.stderr_path.parent),
        )  # fmt: skip
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            proc.stdin.write(b"hello\n")
            await proc.stdin.drain()
            async with asyncio.timeout(TIMEOUT):
                assert await proc.stdout.readexactly(6) == b"hello\n"  # the session is up
            node.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):
                code = await proc.wait()
                err = (await proc.stderr.read()).decode()
            assert code == 1, err
            assert len(err.splitlines()) == 1, err
            assert "Traceback" not in err
            async with asyncio.timeout(TIMEOUT):
                assert await node.proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            proc.stdin.close()


async def test_open_health_watch_does_not_hold_a_drained_node(start_node: StartNode) -> None:
    node = await start_node("--drain-grace", "4")
    loop = asyncio.get_running_loop()
    async with channel(node) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        try:
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            t0 = loop.time()
            node.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(2.5):  # no data session to drain: well under the 4 s grace
                code = await node.proc.wait()
            assert code == 0, node.stderr()
            assert loop.time() - t0 < 2.5
        finally:
            watch.cancel()
