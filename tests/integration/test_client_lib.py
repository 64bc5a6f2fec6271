"""The Python client library (``homenet.client``) against real nodes on 127.0.0.1.

Routes as asyncio streams and as a blocking socket-like object (through one node, and through
relay + home), the control calls, remote listen as an async context manager, and the errors:
each carries the numeric code and is the very line the CLI prints for the same failure.
Retries are shown against a scripted data-plane node (a real asyncio server) that answers
``432 moving`` on purpose, which a real node does only in the middle of a fleet move.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from homenet import client
from homenet.client import Client, Code, ControlError, Error, Refused, RouteFailed, UsageError
from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, pattern, proc_env
from tests.integration.rl_support import admin, by_id, hnctl, start_home, wait_listeners
from tests.integration.support import TIMEOUT, CliResult, closed_port, homenet, wait_status
from tests.integration.test_security import _issue, _write, sender

#: A well-formed key that no node knows (its id is the nodes' admin key's: a wrong secret).
BAD_SECRET = "A" * 32


async def echo_all(url: str, data: bytes, *, key: client.Key = None, first: bytes = b"", retries: int = 2) -> bytes:
    """Send ``data`` over ``url`` with the asyncio API, half-close, read the target to EOF."""
    reader, writer = await client.open_connection(url, key=key, timeout=TIMEOUT, first=first, retries=retries)
    try:
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            await writer.drain()
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def blocking_echo(url: str, data: bytes, first: bytes = b"") -> bytes:
    """The same with the blocking API (run in a thread: it must not block the test's loop)."""
    with client.connect(url, timeout=TIMEOUT, first=first) as conn:
        conn.settimeout(TIMEOUT)
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def in_thread(fn: Callable[..., bytes], *args: object) -> bytes:
    async with asyncio.timeout(TIMEOUT * 2):
        return await asyncio.to_thread(fn, *args)


def cli_line(res: CliResult) -> str:
    """The one error line a CLI run printed (and checks it printed exactly one, exit 1)."""
    assert res.code == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# -- routes ------------------------------------------------------------------------------------
async def test_open_connection_echoes_byte_exact_through_a_node(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    data = pattern(3 << 20, seed=31)
    async with echo_server() as echo:
        url = f"{node.url}/{echo.endpoint}"
        assert await echo_all(url, data) == data
        # ``first`` rides with the request line: it is the target's first input
        assert await echo_all(url, data[:1000], first=b"first:") == b"first:" + data[:1000]
    await wait_status(node, "both sessions closed", lambda st: st.total_sessions == 2 and st.active_sessions == 0)


async def test_open_connection_through_relay_and_home(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    _, home_url = await start_home(nodes, relay.url, tmp_path / "home-state")
    data = pattern(2 << 20, seed=32)
    async with echo_server() as echo:
        assert await echo_all(f"{home_url}/{echo.endpoint}", data) == data
        assert echo.connections == 1


async def test_blocking_connection_through_a_node_and_relay(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes("--allow", "127.0.0.1/32")
    _, home_url = await start_home(nodes, relay.url, tmp_path / "home-state")
    data = pattern(1 << 20, seed=33)
    async with echo_server() as echo:
        assert await in_thread(blocking_echo, f"{relay.url}/{echo.endpoint}", data) == data
        got = await in_thread(blocking_echo, f"{home_url}/{echo.endpoint}", data, b"hello ")
        assert got == b"hello " + data
        assert echo.connections == 2


async def test_blocking_connect_refuses_a_running_loop_and_tls_routes() -> None:
    with pytest.raises(RuntimeError, match="open_connection"):
        client.connect("hn://127.0.0.1:1/127.0.0.1:1")

    for scheme in ("hns", "ws", "wss"):  # their TLS or tunnel would die with connect()'s loop

        def tls(scheme: str = scheme) -> None:
            client.connect(f"{scheme}://127.0.0.1:1/127.0.0.1:1")

        with pytest.raises(UsageError, match="hn:// routes only") as info:
            await asyncio.to_thread(tls)  # refused before any dial
        assert info.value.code == Code.BAD_REQUEST


async def test_tls_route_and_control_over_tls(start_node: StartNode, tmp_path: Path) -> None:
    """hns://: the route's first node is verified with ``tls_ca``; the node ends the session
    (the target closes after its blob), so both TLS connections close from the node's side."""
    ca = _issue("HomeNet client-lib test CA", None, ca=True)
    leaf = _issue("127.0.0.1", ca, ca=False)
    ca_pem = str(_write(tmp_path / "ca.pem", None, ca[0]))
    other_ca = str(_write(tmp_path / "other.pem", None, _issue("Another CA", None, ca=True)[0]))
    cert, key = _write(tmp_path / "node.pem", None, leaf[0]), _write(tmp_path / "node.key", leaf[1], None)
    node = await start_node("--allow", "127.0.0.1/32", "--tls-cert", str(cert), "--tls-key", str(key))
    blob = pattern(300_000, seed=35)
    async with sender(blob) as port:
        url = f"hns://{node.endpoint}/127.0.0.1:{port}"
        reader, writer = await client.open_connection(url, tls_ca=ca_pem, timeout=TIMEOUT)
        try:
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == blob
        finally:
            writer.close()
            await writer.wait_closed()
        with pytest.raises(RouteFailed) as info:
            await client.open_connection(url, tls_ca=other_ca, timeout=TIMEOUT)
        assert "TLS: cannot verify 127.0.0.1" in str(info.value)
        assert not client.retryable(info.value)
    async with Client(node.endpoint, tls=True, tls_ca=ca_pem, timeout=TIMEOUT) as ctl:
        assert (await ctl.status()).state == "serving"


# -- control -----------------------------------------------------------------------------------
async def test_status_listeners_sessions_kick(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes("--name", "the-relay")
    home, home_url = await start_home(nodes, relay.url, tmp_path / "home-state", "--name", "home-node")
    async with Client(relay.endpoint, key=admin(relay), timeout=TIMEOUT) as ctl, echo_server() as echo:
        assert ctl.node == relay.endpoint
        st = await ctl.status()
        assert (st.name, st.address, st.state, st.listeners) == ("the-relay", relay.url, "serving", 1)

        (lst,) = await ctl.listeners()
        assert (lst.listen_id, lst.state, lst.name) == ("home1", "online", "home-node")

        reader, writer = await client.open_connection(f"{home_url}/{echo.endpoint}", timeout=TIMEOUT)
        try:
            writer.write(b"ping")
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(4) == b"ping"
            sessions = await ctl.sessions()
            assert [s.target for s in sessions] == ["home1"]
        finally:
            writer.close()
            await writer.wait_closed()

        await ctl.kick("home1")  # the home node's stream ends; it registers again by itself
        await wait_listeners(relay, "home1 back", lambda xs: [x.state for x in by_id(xs, "home1")] == ["online"])
        assert home.proc.returncode is None


async def test_query_reaches_the_home_node_through_the_relay(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    await start_home(nodes, relay.url, tmp_path / "home-state", "--name", "home-node")
    resp = await client.query(f"{relay.url}/home1", timeout=TIMEOUT)
    assert resp.node == "home-node"
    assert not resp.discovery_enabled  # the harness runs nodes with --no-mdns
    assert list(resp.services) == []
    async with Client(relay.endpoint, timeout=TIMEOUT) as ctl:
        assert (await ctl.query(["home1"], name="x", type_="ssh")).node == "home-node"

    with pytest.raises(UsageError, match="listenIds") as info:
        await client.query(f"{relay.url}/home1/127.0.0.1:22")
    assert info.value.code == 400


# -- remote listen -----------------------------------------------------------------------------
async def test_remote_listen_grants_a_url_and_tears_down(start_node: StartNode) -> None:
    relay = await start_node()
    data = pattern(500_000, seed=34)
    async with echo_server() as echo:
        async with client.remote_listen(relay.url, to=echo.endpoint, timeout=TIMEOUT) as url:
            prefix = f"{relay.url}/"
            assert url.startswith(prefix)
            listen_id = url.removeprefix(prefix)
            assert await echo_all(url, data) == data
            listed = await wait_listeners(relay, "online", lambda xs: len(by_id(xs, listen_id)) == 1)
            assert by_id(listed, listen_id)[0].state == "online"
        # the stream ended with the block: the relay holds the id offline for its owner
        await wait_listeners(relay, "offline", lambda xs: [x.state for x in by_id(xs, listen_id)] != ["online"])
        with pytest.raises(RouteFailed) as info:
            await client.open_connection(url, timeout=TIMEOUT, retries=0)
        assert info.value.code == Code.UNAVAILABLE, info.value
        assert echo.connections == 1


async def test_remote_listen_claims_an_id_and_refusals_carry_codes(start_node: StartNode) -> None:
    relay = await start_node()
    async with (
        echo_server() as echo,
        client.remote_listen(relay.url, to=echo.endpoint, listen_id="svc-a", timeout=TIMEOUT) as url,
    ):
        assert url == f"{relay.url}/svc-a"
        with pytest.raises(Refused) as taken:  # another owner (its own identity) wants the live id
            async with client.remote_listen(relay.url, to=echo.endpoint, listen_id="svc-a", timeout=TIMEOUT):
                raise AssertionError("granted twice")
        assert taken.value.code == Code.CONFLICT, taken.value
        assert "svc-a" in str(taken.value)


async def test_remote_listen_needs_a_good_key(start_node: StartNode) -> None:
    relay = await start_node("--rl-auth", "required")
    with pytest.raises(Refused) as info:
        async with client.remote_listen(relay.url, to="127.0.0.1:1", key=f"home1:{BAD_SECRET}", timeout=TIMEOUT):
            raise AssertionError("granted with a bad key")
    assert info.value.code == Code.UNAUTHORIZED, info.value


async def test_remote_listen_to_nothing_times_out() -> None:
    with closed_port() as dead, pytest.raises(client.ListenTimeout) as info:
        async with client.remote_listen(f"hn://127.0.0.1:{dead}", to="127.0.0.1:1", timeout=1.0):
            raise AssertionError("granted by a closed port")
    assert info.value.code == Code.GATEWAY_TIMEOUT
    assert f"127.0.0.1:{dead}" in str(info.value)


# -- errors: the code, and the line the CLI prints ---------------------------------------------
async def test_forbidden_target_is_403_like_the_cli(start_node: StartNode) -> None:
    node = await start_node()  # allows no direct target
    async with echo_server() as echo:
        url = f"{node.url}/{echo.endpoint}"
        with pytest.raises(RouteFailed) as info:
            await client.open_connection(url, timeout=TIMEOUT)
        res = await homenet("connect", url, "--data", "x", env=proc_env(node.stderr_path.parent))
        assert echo.connections == 0, "a refused target never sees a connection"
    err = info.value
    assert isinstance(err, Error)
    assert (err.code, err.hop) == (403, 0)
    assert int(err.code) == 403
    assert cli_line(res) == f"homenet: error: {err}"


async def test_unknown_listen_id_is_404_like_the_cli(nodes: StartNode) -> None:
    relay = await nodes()
    with pytest.raises(RouteFailed) as route:
        await client.open_connection(f"{relay.url}/nobody-here", timeout=TIMEOUT)
    assert route.value.code == Code.NOT_FOUND
    async with Client(relay.endpoint, key=admin(relay), timeout=TIMEOUT) as ctl:
        with pytest.raises(ControlError) as kick:
            await ctl.kick("nobody-here")
    assert kick.value.code == 404
    assert cli_line(await hnctl(relay, "kick", "nobody-here")) == f"hnctl: error: {kick.value}"


async def test_bad_key_is_401_like_the_cli(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32", "--connect-auth", "direct")
    bad = f"{admin(node).key_id}:{BAD_SECRET}"
    async with echo_server() as echo:
        url = f"{node.url}/{echo.endpoint}"
        with pytest.raises(RouteFailed) as route:
            await client.open_connection(url, key=bad, timeout=TIMEOUT)
        env = {**proc_env(node.stderr_path.parent), "HOMENET_KEY": bad}
        res = await homenet("connect", url, "--data", "x", env=env)
        assert echo.connections == 0
        # the good key opens the same route
        assert await echo_all(url, b"signed", key=admin(node)) == b"signed"
    assert route.value.code == Code.UNAUTHORIZED
    assert cli_line(res) == f"homenet: error: {route.value}"
    async with Client(node.endpoint, key=bad, timeout=TIMEOUT) as ctl:
        with pytest.raises(ControlError) as control:
            await ctl.sessions()
    assert control.value.code == 401
    assert not control.value.retryable


async def test_unreachable_node_is_502_retryable_like_the_cli(tmp_path: Path) -> None:
    with closed_port() as dead:
        url = f"hn://127.0.0.1:{dead}/127.0.0.1:1"
        with pytest.raises(RouteFailed) as route:
            await client.open_connection(url, timeout=TIMEOUT, retries=1)
        res = await homenet("connect", url, "--data", "x", env=proc_env(tmp_path))
        async with Client(f"127.0.0.1:{dead}", timeout=3.0, retries=0) as ctl:
            with pytest.raises(ControlError) as control:
                await ctl.status()
    assert (route.value.code, route.value.hop) == (502, None)
    assert client.retryable(route.value), "a refused first node is worth another try"
    assert str(route.value).endswith(f"cannot reach node 127.0.0.1:{dead}: connection refused")
    assert cli_line(res) == f"homenet: error: {route.value}"
    assert control.value.code == 502
    assert control.value.retryable


async def test_bad_url_and_key_are_usage_errors() -> None:
    with pytest.raises(UsageError) as url:
        await client.open_connection("http://127.0.0.1/x")
    with pytest.raises(UsageError) as key:
        await client.open_connection("hn://127.0.0.1:1/127.0.0.1:1", key="no-colon")
    with pytest.raises(UsageError):
        await client.open_connection("hn://127.0.0.1:1/127.0.0.1:1", retries=-1)
    assert url.value.code == key.value.code == 400


# -- retries, against a scripted data-plane node ------------------------------------------------
@dataclass
class ScriptedNode:
    """Answers the n-th connection's request line with ``replies[n]`` (the last one repeats);
    after a ``200`` it echoes. Counts connections, so a test sees how many attempts were made."""

    replies: list[bytes]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = self.replies[min(self.connections, len(self.replies) - 1)]
        self.connections += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                self.requests.append(await reader.readline())
                writer.write(reply)  # a 200 and the target's first bytes in one segment
                await writer.drain()
                if reply.startswith(b"HN/1 200 "):
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"hn://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/10.0.0.5:22"  # never dialed


@contextlib.asynccontextmanager
async def scripted(*replies: bytes) -> AsyncIterator[ScriptedNode]:
    node = ScriptedNode(list(replies))
    node.server = await asyncio.start_server(node._handle, "127.0.0.1", 0)
    try:
        yield node
    finally:
        node.server.close()
        await node.server.wait_closed()


MOVING = b"HN/1 432 moving listener home1 is moving to another relay\n"


async def test_moving_is_retried_then_the_route_opens_with_its_early_bytes() -> None:
    async with scripted(MOVING, MOVING, b"HN/1 200 ok\nbanner\n") as node:
        assert await echo_all(node.url, b"payload", retries=2) == b"banner\npayload"
        assert node.connections == 3
        assert node.requests == [b"HN/1 CONNECT 10.0.0.5:22\n"] * 3


async def test_moving_retries_are_bounded() -> None:
    async with scripted(MOVING) as node:
        with pytest.raises(RouteFailed) as info:
            await client.open_connection(node.url, timeout=TIMEOUT, retries=1)
        assert node.connections == 2
    assert (info.value.code, info.value.hop) == (432, 0)


async def test_refusals_are_not_retried() -> None:
    for reply, code in (
        (b"HN/1 403 forbidden 10.0.0.5:22 is not allowed\n", 403),
        (b"HN/1 401 unauthorized bad key\n", 401),
        (b"HN/1 502 bad-gateway connection refused\n", 502),
    ):
        async with scripted(reply, b"HN/1 200 ok\n") as node:
            with pytest.raises(RouteFailed) as info:
                await client.open_connection(node.url, timeout=TIMEOUT, retries=3)
            assert node.connections == 1, reply
        assert info.value.code == code


async def test_blocking_connection_returns_early_bytes_first() -> None:
    async with scripted(b"HN/1 200 ok\nSSH-2.0-banner\r\n") as node:

        def run() -> bytes:
            with client.connect(node.url, timeout=TIMEOUT) as conn:
                conn.settimeout(TIMEOUT)
                assert conn.pending() == len(b"SSH-2.0-banner\r\n")
                head = conn.recv(4)  # a short read leaves the rest of the early bytes
                assert head == b"SSH-"
                buf = bytearray(100)
                n = conn.recv_into(buf)
                assert bytes(buf[:n]) == b"2.0-banner\r\n"
                assert conn.pending() == 0
                conn.sendall(b"after")
                conn.shutdown(socket.SHUT_WR)
                rest = b""
                while chunk := conn.recv(4096):
                    rest += chunk
            return head + bytes(buf[:n]) + rest

        assert await in_thread(run) == b"SSH-2.0-banner\r\nafter"


async def test_status_via_the_cli_and_the_library_agree(start_node: StartNode) -> None:
    """hnctl is a thin shell over the library: same answer, same node."""
    node: NodeProc = await start_node("--name", "agree")
    async with Client(node.endpoint, timeout=TIMEOUT) as ctl:
        st = await ctl.status()
    res = await hnctl(node, "status", "--json")
    assert res.code == 0, res.stderr
    assert st.name == "agree"
    assert f'"name": "{st.name}"' in res.stdout.decode()
