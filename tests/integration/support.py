"""Integration-test support: raw data-plane clients, target servers, CLI runs, gRPC channels.

Everything here talks only to 127.0.0.0/8 and [::1]. The wire bytes are checked with this
module's own parser, never the product's, so a product parser bug cannot hide itself.
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

from homenet.control.auth import call_metadata
from homenet.control.v1 import node_pb2, node_pb2_grpc
from homenet.node.auth import Credentials
from homenet.node.keys import client_key
from tests.conftest import StartNode
from tests.helpers import EchoServer, NodeProc, proc_env, spawn

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


def _loopback(host: str) -> str:
    host = host.strip("[]")
    assert host.startswith("127.") or host == "::1", f"tests talk to loopback only, not {host}"
    return host


async def dial(host: str, port: int, source: str | None = None) -> Conn:
    """Open a TCP connection to ``host:port`` (127.0.0.0/8 or [::1] only), from ``source`` if given."""
    local = (_loopback(source), 0) if source is not None else None
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(_loopback(host), port, limit=1 << 20, local_addr=local)
    return Conn(reader, writer)


async def echoed(node: NodeProc, line: bytes, payload: bytes, source: str | None = None) -> bytes:
    """Everything the node sends back for ``line`` + ``payload`` then a half-close (reply + echo)."""
    conn = await dial(node.host, node.port, source=source)
    try:
        await conn.send(line + payload)
        await conn.shutdown_write()
        return await conn.until_eof()
    finally:
        await conn.close()


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


CHAIN = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def start_chain(start_node: StartNode) -> list[NodeProc]:
    """Three nodes on three loopback addresses, each allowed to dial all of 127.0.0.0/8."""
    # every start is awaited even if one fails, so the fixture knows (and stops) all of them
    started = await asyncio.gather(
        *(start_node("--allow", "127.0.0.0/8", bind=h) for h in CHAIN), return_exceptions=True
    )
    for result in started:
        if isinstance(result, BaseException):
            raise result
    return [r for r in started if isinstance(r, NodeProc)]


# -- targets -----------------------------------------------------------------------------------
class HashServer(EchoServer):
    """Reads until EOF, then answers ``<length> <sha256 hex>\\n`` and closes (half-close probe)."""

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

    @staticmethod
    def answer(data: bytes) -> bytes:
        """What the server sends back for ``data``."""
        return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


@contextlib.asynccontextmanager
async def hash_server(host: str = "127.0.0.1") -> AsyncIterator[HashServer]:
    srv = HashServer(host)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


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


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for configs that must name one)."""
    with closed_port(host) as port:
        return port


# -- waiting -----------------------------------------------------------------------------------
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


async def run_cli(
    module: str, *args: str, stdin: bytes | None = None, timeout: float = 30.0, env: dict[str, str] | None = None
) -> CliResult:
    """Run ``python -m MODULE ARGS`` to completion; kill it if it outlives ``timeout``."""
    return await run_program(sys.executable, "-m", module, *args, stdin=stdin, timeout=timeout, env=env)


async def run_program(
    program: str, *args: str, stdin: bytes | None = None, timeout: float = 30.0, env: dict[str, str] | None = None
) -> CliResult:
    """Run ``PROGRAM ARGS`` to completion; kill it if it outlives ``timeout``.

    ``env`` defaults to :func:`cli_env`; pass ``tests.helpers.proc_env(tmp_path)`` to share the
    state directory (and so the admin key) of the test's nodes.
    """
    proc = await asyncio.create_subprocess_exec(
        program, *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env if env is not None else cli_env(),
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


async def homenet(
    *args: str, stdin: bytes | None = None, timeout: float = 30.0, env: dict[str, str] | None = None
) -> CliResult:
    return await run_cli("homenet", *args, stdin=stdin, timeout=timeout, env=env)


async def hnctl(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> CliResult:
    return await run_cli("homenet.cli.hnctl", *args, timeout=timeout, env=env)


@contextlib.asynccontextmanager
async def running(args: list[str], tmp: Path, ready: str) -> AsyncIterator[NodeProc]:
    """A ``python -m homenet ARGS`` process, up once it printed ``ready``; stopped after."""
    proc = await spawn(args, tmp, ready=ready)
    try:
        yield proc
    finally:
        await proc.stop(signal.SIGTERM)


_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); sys.argv[0] = 'homenet'; "
    "runpy.run_module('homenet', run_name='__main__', alter_sys=True)"
)


@contextlib.asynccontextmanager
async def limited_node(args: list[str], tmp: Path, nofile: int) -> AsyncIterator[NodeProc]:
    """``homenet ARGS`` with at most ``nofile`` open files (soft and hard), up once READY."""
    tmp.mkdir(parents=True, exist_ok=True)
    err = tmp / "limited.stderr"
    with err.open("wb") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LIMITED, str(nofile), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=fh, env=proc_env(tmp),
        )  # fmt: skip
    node = NodeProc(proc, err)
    node._reader = asyncio.get_running_loop().create_task(node._pump())
    try:
        node.url = (await node.next_line("READY ")).split()[1]
        yield node
    finally:
        await node.stop(signal.SIGTERM)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- control plane ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def channel(node: NodeProc) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to the node's one port (never through a proxy)."""
    ch = grpc.aio.insecure_channel(node.endpoint, options=[("grpc.enable_http_proxy", 0)])
    try:
        yield ch
    finally:
        await ch.close(None)


def admin_metadata(node: NodeProc, method: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata signing one call of ``method`` with the admin key the test's nodes made
    (zero-config first key, in the state directory tests.helpers.proc_env gives them)."""
    keys = node.stderr_path.parent / "state" / "keys.toml"
    found = client_key(key_file=str(keys), env={})
    assert found is not None, f"no key in {keys}"
    return call_metadata(Credentials(*found), method)


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
