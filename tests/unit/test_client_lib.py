"""``homenet.client`` pieces without a node: early bytes come first (streams and the blocking
object, over real socket pairs), what is retried, what is a usage error, what loads gRPC."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from homenet import client
from homenet.client import Code, Connection, Credentials, RouteFailed, UsageError, retryable
from homenet.client.options import check_retries, credentials
from homenet.client.routes import streams
from homenet.node.client import Opened

SECRET = "s" * 24


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


async def test_streams_put_early_bytes_before_what_the_socket_holds(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    ours.setblocking(False)
    peer.sendall(b"LATER")  # already in the kernel when the transport starts reading
    peer.shutdown(socket.SHUT_WR)
    reader, writer = await streams(Opened(ours, b"EARLY"))
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b"EARLYLATER"
        writer.write(b"up")
        writer.write_eof()
        async with asyncio.timeout(5):
            await writer.drain()
        assert peer.recv(10) == b"up"
    finally:
        writer.close()
        await writer.wait_closed()


def test_connection_recv_returns_early_bytes_first(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"LATER")
    with Connection(ours, b"EARLY") as conn:
        conn.settimeout(5)
        assert conn.recv(2, socket.MSG_PEEK) == b"EA"
        assert conn.pending() == 5, "a peek consumes nothing"
        assert conn.recv(2) == b"EA"
        buf = bytearray(10)
        assert conn.recv_into(buf, 2) == 2
        assert bytes(buf[:2]) == b"RL"
        assert conn.recv(100) == b"Y"
        assert conn.pending() == 0
        assert conn.recv(100) == b"LATER"
        conn.sendall(b"up")
        assert peer.recv(10) == b"up"
        conn.shutdown(socket.SHUT_WR)
        assert peer.recv(10) == b""
        assert conn.fileno() == ours.fileno()
    assert ours.fileno() == -1, "leaving the block closes the socket"


def _refused() -> RouteFailed:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise RouteFailed("cannot reach node 127.0.0.1:1: connection refused") from None
    except RouteFailed as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_refused(), True),
        (RouteFailed("hn://n/x: no answer within 1s"), False),  # a timeout: the next one would wait as long
        (RouteFailed("moving", Code.MOVING, 1), True),
        (RouteFailed("offline", Code.UNAVAILABLE, 0), True),
        (RouteFailed("forbidden", Code.FORBIDDEN, 0), False),
        (RouteFailed("unauthorized", Code.UNAUTHORIZED, 0), False),
        (RouteFailed("target refused", Code.BAD_GATEWAY, 1), False),
        (RouteFailed("target timed out", Code.GATEWAY_TIMEOUT, 1), False),
        (ConnectionRefusedError(), False),
    ],
)
def test_what_is_retried(exc: BaseException, expected: bool) -> None:
    assert retryable(exc) is expected


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_retries_must_be_a_count(bad: object) -> None:
    with pytest.raises(UsageError):
        check_retries(bad)  # type: ignore[arg-type]


def test_keys() -> None:
    creds = credentials(f"alice:{SECRET}")
    assert creds is not None
    assert (creds.key_id, creds.secret.reveal()) == ("alice", SECRET)
    assert SECRET not in repr(creds)
    assert credentials(creds) is creds
    assert credentials(None) is None
    with pytest.raises(UsageError) as info:
        credentials("alice")
    assert info.value.code == 400
    assert isinstance(creds, Credentials)


def test_routes_do_not_load_grpc_and_the_rest_loads_on_use() -> None:
    """``homenet connect`` imports the library: it must not pay for gRPC (start-up time)."""
    code = (
        "import sys, homenet.client as c; assert 'grpc' not in sys.modules, 'grpc loaded'; "
        "assert 'tenacity' not in sys.modules, 'tenacity loaded'; "
        "c.Client; c.query; c.remote_listen; c.ControlError; c.Refused; assert 'grpc' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    with pytest.raises(AttributeError):
        _ = client.NoSuchThing  # type: ignore[attr-defined]
    assert set(client.__all__) <= set(dir(client)) | set(client._LAZY)
