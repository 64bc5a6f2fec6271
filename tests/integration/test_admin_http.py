"""The admin HTTP server on real loopback TCP: keys, penalties, methods, limits, keep-alive."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from homenet.control.admin import AdminServer, Page
from homenet.node.keys import Key, KeyStore
from homenet.node.limits import SourceLimiter

PAGE = b"homenet_up 1\n"


async def _page() -> Page:
    return Page(PAGE, "text/plain")


async def _broken() -> Page:
    raise RuntimeError("a bug in a page")


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("root", ["admin"])
    store.add("alice", ["connect"])
    return store


def _key(store: KeyStore, kid: str) -> Key:
    key = store.get(kid)
    assert key is not None
    return key


@pytest.fixture
async def admin(keys: KeyStore) -> AsyncIterator[tuple[AdminServer, int]]:
    server = AdminServer(
        {"/metrics": _page, "/broken": _broken}, keys, SourceLimiter(threshold=3), open_access=False,
        max_connections=4,
    )  # fmt: skip
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close()


async def http(port: int, raw: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``raw`` on a new connection, read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    got = b""
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5.0):
            while chunk := await reader.read(1 << 20):
                got += chunk
    except ConnectionResetError:  # closed unread: the reply, if any, came first
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
    return got


def get(path: str = "/metrics", auth: str | None = None, close: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def bearer(key: Key) -> str:
    return f"Bearer {key.id}:{key.secret.reveal()}"


def basic(kid: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{kid}:{secret}".encode()).decode()


async def test_an_admin_key_as_bearer_or_basic_reads_the_page(admin: tuple[AdminServer, int], keys: KeyStore) -> None:
    _, port = admin
    root = _key(keys, "root")
    for auth in (bearer(root), basic("root", root.secret.reveal())):
        resp = await http(port, get(auth=auth))
        assert resp.startswith(b"HTTP/1.1 200 OK\r\n"), resp
        assert resp.endswith(b"\r\n\r\n" + PAGE)
        assert b"cache-control: no-store" in resp


async def test_no_key_is_asked_for_and_is_no_failed_login(admin: tuple[AdminServer, int]) -> None:
    server, port = admin
    for _ in range(5):
        resp = await http(port, get())
        assert resp.startswith(b"HTTP/1.1 401 "), resp
        assert b'www-authenticate: Basic realm="HomeNet admin"' in resp
    assert server.limiter.failures_total == 0


async def test_wrong_keys_are_refused_and_then_the_source_is_blocked(
    admin: tuple[AdminServer, int], keys: KeyStore
) -> None:
    server, port = admin
    root, alice = _key(keys, "root"), _key(keys, "alice")
    wrong = [
        bearer(alice),  # a real key without the admin role
        basic("root", "not-the-secret"),
        "Basic " + base64.b64encode("root:s\u00e9cret".encode()).decode(),  # not ASCII: refused, no crash
    ]
    for auth in wrong:
        resp = await http(port, get(auth=auth), source="127.0.0.7")
        assert resp.startswith(b"HTTP/1.1 401 "), resp
    assert server.limiter.failures_total == 3
    assert await http(port, get(auth=bearer(root)), source="127.0.0.7") == b"", "a blocked source is closed at once"
    other = await http(port, get(auth=bearer(root)), source="127.0.0.8")
    assert other.startswith(b"HTTP/1.1 200 "), "other sources are not blocked"


async def test_methods_bodies_paths_and_bugs(admin: tuple[AdminServer, int], keys: KeyStore) -> None:
    _, port = admin
    auth = bearer(_key(keys, "root"))
    post = f"POST /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n".encode()
    assert (await http(port, post)).startswith(b"HTTP/1.1 405 ")
    body = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 5\r\n\r\nhello".encode()
    assert (await http(port, body)).startswith(b"HTTP/1.1 413 ")
    assert (await http(port, get("/nothing", auth))).startswith(b"HTTP/1.1 404 ")
    assert (await http(port, get("/broken", auth))).startswith(b"HTTP/1.1 500 ")
    head = await http(port, get(auth=auth).replace(b"GET", b"HEAD", 1))
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert head.endswith(b"\r\n\r\n"), "HEAD has no body"


async def test_garbage_and_oversized_heads_get_one_error_and_a_close(admin: tuple[AdminServer, int]) -> None:
    _, port = admin
    assert (await http(port, b"\x16\x03\x01 not http at all\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    endless = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Big: aaaaaaaaaaaaaaaaaaaa\r\n" * 2000  # no end
    resp = await http(port, endless)
    assert resp.startswith(b"HTTP/1.1 431 "), resp[:100]


async def test_keep_alive_serves_several_requests_on_one_connection(
    admin: tuple[AdminServer, int], keys: KeyStore
) -> None:
    _, port = admin
    auth = bearer(_key(keys, "root"))
    resp = await http(port, get(auth=auth, close=False) * 2 + get(auth=auth))
    assert resp.count(b"HTTP/1.1 200 OK") == 3, resp


async def test_connections_over_the_cap_are_closed(admin: tuple[AdminServer, int], keys: KeyStore) -> None:
    _, port = admin
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        await asyncio.sleep(0)  # let the server take them
        async with asyncio.timeout(5.0):
            while len(admin[0]._conns) < 4:
                await asyncio.sleep(0.01)
        assert await http(port, get(auth=bearer(_key(keys, "root")))) == b""
    finally:
        for _, w in held:
            w.close()
            await w.wait_closed()
