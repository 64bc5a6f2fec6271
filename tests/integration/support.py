"""Integration-test support: raw data-plane clients, target servers, CLI runs, gRPC channels.

Everything here talks only to 127.0.0.0/8. Nothing imports the product's protocol code: the
tests check the wire bytes on their own, so a parser bug cannot hide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from homenet.control.v1 import node_pb2, node_pb2_grpc
from tests.helpers import NodeProc, spawn

#: Upper bound of any single wait in these tests (the node answers in milliseconds).
TIMEOUT = 10.0
OK_REPLY = b"HN/1 200 ok\n"
_REPLY = re.compile(rb"HN/1 ([0-9]{3}) ([a-z][a-z-]*)(?: ([\x20-\x7e]*))?\n")


def request(hop: str) -> bytes:
    """The wire request line asking the node for ``hop``."""
    return f"HN/1 CONNECT {hop}\n".encode("ascii")


@dataclass(frozen=True)
class Reply:
    """A reply line as read off the wire."""

    raw: bytes
    code: int
    name: str
    reason: str


def parse_reply(line: bytes) -> Reply:
    """Check one reply line against the wire format (``HN/1 CODE NAME[ REASON]\\n``)."""
    m = _REPLY.fullmatch(line)
    assert m is not None, f"not a HomeNet reply line: {line!r}"
    return Reply(line, int(m.group(1)), m.group(2).decode(), (m.group(3) or b"").decode())


@dataclass
class Conn:
    """A plain TCP client connection (asyncio streams) with bounded reads."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF, we can still read."""
        self.writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def reply(self, timeout: float = TIMEOUT) -> Reply:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        return parse_reply(line)

    async def exactly(self, n: int, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readexactly(n)

    async def until_eof(self, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def dial(host: str, port: int) -> Conn:
    """Open a TCP connection to ``host:port`` (127.0.0.0/8 only)."""
    assert host.startswith("127.") or host == "::1", host
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    return Conn(reader, writer)


@contextlib.asynccontextmanager
async def connected(host: str, port: int) -> AsyncIterator[Conn]:
    conn = await dial(host, port)
    try:
        yield conn
    finally:
        await conn.close()


async def node_conn(node: NodeProc) -> Conn:
    return await dial(node.host, node.port)


async def open_session(node: NodeProc, hop: str) -> Conn:
    """A connection through ``node`` to ``hop``, after its ``200 ok`` was read."""
    conn = await node_conn(node)
    try:
        await conn.send(request(hop))
        reply = await conn.reply()
        assert reply.raw == OK_REPLY, reply
    except BaseException:
        await conn.close()
        raise
    return conn


async def refused_reply(node: NodeProc, payload: bytes) -> tuple[Reply, bytes]:
    """Send ``payload`` first; return the node's one reply line and whatever came after it."""
    async with connected(node.host, node.port) as conn:
        await conn.send(payload)
        reply = await conn.reply()
        rest = await conn.until_eof()
    return reply, rest


# -- targets -----------------------------------------------------------------------------------
@dataclass
class HashServer:
    """Reads until EOF, then answers ``<length> <sha256 hex>\\n`` and closes (half-close probe)."""

    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        digest = hashlib.sha256()
        n = 0
        try:
            while data := await reader.read(1 << 18):
                digest.update(data)
                n += len(data)
            writer.write(f"{n} {digest.hexdigest()}\n".encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @staticmethod
    def answer(data: bytes) -> bytes:
        """What the server sends back for ``data``."""
        return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


@contextlib.asynccontextmanager
async def hash_server(host: str = "127.0.0.1") -> AsyncIterator[HashServer]:
    srv = HashServer(host)
    srv.server = await asyncio.start_server(srv._handle, host, 0)
    srv.port = srv.server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        srv.server.close()
        await srv.server.wait_closed()


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port bound on ``host`` but not listening: connecting to it is refused, and nobody
    else can take it while the block runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for configs that must name one)."""
    with closed_port(host) as port:
        return port


# -- waiting -----------------------------------------------------------------------------------
async def wait_until(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until true (for state that has no event to await); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def stays(what: str, check: Callable[[], bool], duration: float = 0.5) -> None:
    """Poll ``check`` for ``duration`` seconds; fail the first time it is false."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    while loop.time() < end:
        assert check(), what
        await asyncio.sleep(0.02)
    assert check(), what


# -- processes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CliResult:
    """How a CLI run ended."""

    code: int
    stdout: bytes
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of CLI runs: ours without HOMENET_* (so a developer's shell cannot leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMENET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def run_cli(module: str, *args: str, stdin: bytes | None = None, timeout: float = 30.0) -> CliResult:
    """Run ``python -m MODULE ARGS`` to completion; kill it if it outlives ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return CliResult(proc.returncode, out, err.decode(errors="replace"))


async def homenet(*args: str, stdin: bytes | None = None, timeout: float = 30.0) -> CliResult:
    return await run_cli("homenet", *args, stdin=stdin, timeout=timeout)


async def hnctl(*args: str, timeout: float = 30.0) -> CliResult:
    return await run_cli("homenet.cli.hnctl", *args, timeout=timeout)


@contextlib.asynccontextmanager
async def running(args: list[str], tmp: Path, ready: str) -> AsyncIterator[NodeProc]:
    """A ``python -m homenet ARGS`` process, up once it printed ``ready``; stopped after."""
    proc = await spawn(args, tmp, ready=ready)
    try:
        yield proc
    finally:
        await proc.stop(signal.SIGTERM)


# -- control plane ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def channel(node: NodeProc) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to the node's one port (never through a proxy)."""
    ch = grpc.aio.insecure_channel(node.endpoint, options=[("grpc.enable_http_proxy", 0)])
    try:
        yield ch
    finally:
        await ch.close(None)


async def status(node: NodeProc) -> node_pb2.NodeStatus:
    async with channel(node) as ch:
        return await node_pb2_grpc.NodeServiceStub(ch).GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)


async def wait_status(node: NodeProc, what: str, check: Callable[[node_pb2.NodeStatus], bool]) -> node_pb2.NodeStatus:
    """Poll GetStatus until ``check`` holds (counters settle when a session's close is seen)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + TIMEOUT
    async with channel(node) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        while True:
            st = await stub.GetStatus(node_pb2.GetStatusRequest(), timeout=5.0)
            if check(st):
                return st
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}; last status:\n{st}")
            await asyncio.sleep(0.05)
