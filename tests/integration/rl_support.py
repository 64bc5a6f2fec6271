"""Remote Listen test support: home nodes, a hand-driven gRPC listener, fd counts, log waits.

Everything here talks only to 127.0.0.0/8. The gRPC listener speaks RelayService itself, so
tests can hold real tickets and pool grants and check how the relay treats them on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from homenet.control.auth import call_metadata
from homenet.control.v1 import node_pb2, node_pb2_grpc, relay_pb2, relay_pb2_grpc
from homenet.node.auth import Credentials
from homenet.node.keys import client_key
from tests.conftest import StartNode
from tests.helpers import NodeProc, node_args
from tests.integration.support import TIMEOUT, CliResult, Conn, Reply, channel, dial, request, run_cli

#: How far from its baseline a process's socket count may settle after a scenario
#: (a gRPC channel of the harness being torn down, a pool connection being re-parked).
FD_SLACK = 2


# -- keys: operator calls need the admin key ----------------------------------------------------
def keys_file(node: NodeProc) -> Path:
    """The keys file of the test's nodes: ``TMP/state/keys.toml``, where the harness keeps
    state (tests.helpers.proc_env) and :func:`stopped_in_reverse` points every node."""
    return node.stderr_path.parent / "state" / "keys.toml"


def admin(node: NodeProc) -> Credentials:
    """The admin key the first node of the test created (zero-config first key)."""
    found = client_key(key_file=str(keys_file(node)), env={})
    assert found is not None, f"no key in {keys_file(node)}"
    return Credentials(*found)


def admin_metadata(node: NodeProc, method: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata signing one call of ``method`` (e.g. ``/homenet.v1.RelayService/Kick``)."""
    return call_metadata(admin(node), method)


async def hnctl(node: NodeProc, *args: str) -> CliResult:
    """``hnctl --node NODE ARGS`` signed with the test's admin key."""
    return await run_cli("homenet.cli.hnctl", "--node", node.endpoint, "--key-file", str(keys_file(node)), *args)


@contextlib.asynccontextmanager
async def stopped_in_reverse(start_node: StartNode, tmp: Path) -> AsyncIterator[StartNode]:
    """``start_node``, but the processes are stopped in reverse start order at the end.

    Listeners go before their relay: a relay's SIGTERM otherwise waits its whole drain grace
    on their live Listen streams (a product bug reported by test_rl_chaos), which would
    cost every test seconds. Every node shares one keys file (``TMP/state/keys.toml``, see
    :func:`keys_file`) even when it has a state directory of its own.
    """
    procs: list[NodeProc] = []
    keys = ["--keys-file", str(tmp / "state" / "keys.toml")]

    async def start(*extra: str, bind: str = "127.0.0.1", args: list[str] | None = None) -> NodeProc:
        if args is None:
            proc = await start_node(*extra, *keys, bind=bind)
        else:
            proc = await start_node(bind=bind, args=[*args, *keys] if args[0] == "node" else args)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(procs):
            await proc.stop()


def home_args(relay_url: str, state_dir: Path, *extra: str, listen_id: str | None = None) -> list[str]:
    """``homenet node`` args for a home node remote-listening on ``relay_url``.

    Home nodes dial their targets themselves, so they allow 127.0.0.0/8; the state directory
    is always the test's own (never the user's ``~/.local/state``).
    """
    args = node_args("127.0.0.1", "--rl", relay_url, "--allow", "127.0.0.0/8", "--state-dir", str(state_dir))
    if listen_id is not None:
        args += ["--listen-id", listen_id]
    return [*args, *extra]


async def start_home(
    nodes: StartNode, relay_url: str, state_dir: Path, *extra: str, listen_id: str | None = "home1"
) -> tuple[NodeProc, str]:
    """A home node remote-listening on ``relay_url``; returns it and the URL it announced."""
    home = await nodes(args=home_args(relay_url, state_dir, *extra, listen_id=listen_id))
    return home, listening_url(await home.next_line("LISTENING "))


def listening_url(line: str) -> str:
    """The URL of a ``LISTENING hn://...`` line."""
    parts = line.split()
    assert len(parts) == 2, line
    assert parts[0] == "LISTENING", line
    return parts[1]


def listen_id_of(line: str) -> str:
    """The listenId a ``LISTENING hn://RELAY/.../ID`` line announces."""
    return listening_url(line).rsplit("/", 1)[1]


async def relisten(proc: NodeProc, within: float) -> str:
    """The URL of the process's next ``LISTENING`` line, which must come within ``within`` s."""
    try:
        return listening_url(await proc.next_line("LISTENING ", timeout=within))
    except TimeoutError:
        raise AssertionError(f"no new LISTENING line within {within:g}s; stderr:\n{proc.stderr()}") from None


def two_hop_request(listen_id: str, target: str) -> bytes:
    """Pipelined requests: the relay's listener, then the listener's target."""
    return request(listen_id) + request(target)


# -- the relay's view --------------------------------------------------------------------------
_LIST = "/homenet.v1.RelayService/ListListeners"


async def list_listeners(relay: NodeProc) -> list[relay_pb2.Listener]:
    async with channel(relay) as ch:
        stub = relay_pb2_grpc.RelayServiceStub(ch)
        req = relay_pb2.ListListenersRequest()
        resp = await stub.ListListeners(req, timeout=5.0, metadata=admin_metadata(relay, _LIST))
    return list(resp.listeners)


async def wait_listeners(
    relay: NodeProc, what: str, check: Callable[[list[relay_pb2.Listener]], bool], timeout: float = TIMEOUT
) -> list[relay_pb2.Listener]:
    """Poll ListListeners until ``check`` holds (registry changes have no event to await)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    async with channel(relay) as ch:
        stub = relay_pb2_grpc.RelayServiceStub(ch)
        while True:
            req = relay_pb2.ListListenersRequest()
            got = list((await stub.ListListeners(req, timeout=5.0, metadata=admin_metadata(relay, _LIST))).listeners)
            if check(got):
                return got
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}; listeners:\n{got}")
            await asyncio.sleep(0.05)


def by_id(listeners: list[relay_pb2.Listener], listen_id: str) -> list[relay_pb2.Listener]:
    return [x for x in listeners if x.listen_id == listen_id]


def pool_full(listen_id: str, size: int) -> Callable[[list[relay_pb2.Listener]], bool]:
    """Check: ``listen_id`` is online with ``size`` warm connections parked."""

    def check(ls: list[relay_pb2.Listener]) -> bool:
        return any(x.state == "online" and x.pool_parked == size for x in by_id(ls, listen_id))

    return check


async def node_status(node: NodeProc) -> node_pb2.NodeStatus:
    async with channel(node) as ch:
        meta = admin_metadata(node, "/homenet.v1.NodeService/GetStatus")
        return await node_pb2_grpc.NodeServiceStub(ch).GetStatus(
            node_pb2.GetStatusRequest(), timeout=5.0, metadata=meta
        )


# -- processes: open descriptors and logs --------------------------------------------------------
@dataclass(frozen=True)
class Fds:
    """A process's open descriptors by kind."""

    sockets: int
    pipes: int
    total: int


def fds(pid: int) -> Fds:
    sockets = pipes = total = 0
    base = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(base):
        try:
            link = os.readlink(base / entry)
        except OSError:  # closed while we looked
            continue
        total += 1
        sockets += link.startswith("socket:")
        pipes += link.startswith("pipe:")
    return Fds(sockets, pipes, total)


async def settled_fds(pid: int, quiet: float = 0.3, timeout: float = TIMEOUT) -> Fds:
    """The process's fd counts once they stopped changing for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last, since = fds(pid), loop.time()
    while loop.time() - since < quiet:
        if loop.time() > end:
            raise AssertionError(f"fd count of {pid} never settled (last {last})")
        await asyncio.sleep(0.05)
        now = fds(pid)
        if now != last:
            last, since = now, loop.time()
    return last


async def wait_fds_back(pid: int, baseline: Fds, what: str, timeout: float = TIMEOUT) -> Fds:
    """Poll until ``pid`` holds at most FD_SLACK sockets more than ``baseline``.

    Pipes are the splice carriers: a bounded free list (64 pipes, 128 fds) may keep some
    after a burst, so they are checked against that bound, not the baseline.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        now = fds(pid)
        if now.sockets <= baseline.sockets + FD_SLACK and now.pipes <= baseline.pipes + 128:
            return now
        if loop.time() > end:
            raise AssertionError(f"{what}: fds did not come back to {baseline} (now {now})")
        await asyncio.sleep(0.05)


def log_lines(proc: NodeProc, event: str) -> list[str]:
    """The process's stderr log lines of ``event`` (text format: ``TS LEVEL event k=v ...``)."""
    try:
        text = proc.stderr_path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if f" {event} " in f"{ln} "]


async def wait_log(proc: NodeProc, event: str, after: int = 0, timeout: float = TIMEOUT) -> str:
    """Poll the process's stderr until it logged ``event`` more than ``after`` times; the new line."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(lines := log_lines(proc, event)) <= after:
        if loop.time() > end:
            raise AssertionError(f"no {event} log line within {timeout:g}s; stderr:\n{proc.stderr()}")
        await asyncio.sleep(0.02)
    return lines[after]


# -- the data plane, by hand ----------------------------------------------------------------------
#: Client source addresses. The relay caps connections in handshake per source address (64),
#: so crowds of clients come from several loopback addresses, as they would from many hosts.
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 10))


async def dial_from(source: str, host: str, port: int) -> Conn:
    """Open a TCP connection to ``host:port`` from the local address ``source`` (127.0.0.0/8)."""
    assert source.startswith("127."), source
    assert host.startswith("127."), host
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20, local_addr=(source, 0))
    return Conn(reader, writer)


async def redeem(relay: NodeProc, verb: str, ticket: str) -> tuple[Conn, Reply]:
    """Dial the relay as a listener would (``HN/1 TICKET|POOL <ticket>``); the reply line."""
    conn = await dial(relay.host, relay.port)
    try:
        await conn.send(f"HN/1 {verb} {ticket}\n".encode("ascii"))
        return conn, await conn.reply()
    except BaseException:
        await conn.close()
        raise


async def refused_ticket(relay: NodeProc, verb: str, ticket: str) -> Reply:
    """Redeem a ticket the relay must refuse: its one reply line, then the connection closes."""
    conn, reply = await redeem(relay, verb, ticket)
    try:
        assert await conn.until_eof() == b"", "the relay sent bytes after its refusal"
    finally:
        await conn.close()
    return reply


# -- a listener driven by hand over gRPC -------------------------------------------------------
@dataclass
class GrpcListener:
    """One RelayService.Listen stream opened by the test itself (no homenet listener code).

    Pings are answered as they come; other events are queued for :meth:`next_event`.
    """

    ch: grpc.aio.Channel
    call: grpc.aio.StreamStreamCall[relay_pb2.ListenerMessage, relay_pb2.RelayMessage]
    registered: relay_pb2.Registered | None = None
    events: asyncio.Queue[relay_pb2.RelayMessage | None] = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, relay: NodeProc) -> GrpcListener:
        ch = grpc.aio.insecure_channel(relay.endpoint, options=[("grpc.enable_http_proxy", 0)])
        stub = relay_pb2_grpc.RelayServiceStub(ch)
        return cls(ch, stub.Listen(timeout=60.0))  # type: ignore[call-arg]  # the stubs miss aio's form

    async def register(self, listen_id: str = "", secret: str = "", pool_size: int = 0) -> relay_pb2.Registered:
        """Send ``register``; the relay's ``registered`` (raises AioRpcError if refused)."""
        msg = relay_pb2.Register(listen_id=listen_id, resume_secret=secret, name="test-listener", pool_size=pool_size)
        async with asyncio.timeout(TIMEOUT):
            await self.call.write(relay_pb2.ListenerMessage(register=msg))
            first = await self.call.read()
        assert isinstance(first, relay_pb2.RelayMessage), f"stream ended before registered: {first!r}"
        assert first.WhichOneof("msg") == "registered", first
        self.registered = first.registered
        self._pump = asyncio.get_running_loop().create_task(self._read())
        return first.registered

    async def _read(self) -> None:
        try:
            while isinstance(msg := await self.call.read(), relay_pb2.RelayMessage):
                if msg.WhichOneof("msg") == "ping":
                    await self.call.write(relay_pb2.ListenerMessage(pong=relay_pb2.Pong(seq=msg.ping.seq)))
                else:
                    await self.events.put(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            self.ended.set()
            await self.events.put(None)

    async def next_event(self, kind: str, timeout: float = TIMEOUT) -> relay_pb2.RelayMessage:
        """The next event of ``kind`` (``incoming`` or ``pool_grant``); others are dropped."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.events.get()
                assert msg is not None, f"the relay ended the stream before {kind}"
                if msg.WhichOneof("msg") == kind:
                    return msg

    async def close(self) -> None:
        self.call.cancel()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.ch.close(None)


@contextlib.asynccontextmanager
async def grpc_listener(
    relay: NodeProc, listen_id: str = "", secret: str = "", pool_size: int = 0
) -> AsyncIterator[GrpcListener]:
    """A registered hand-driven listener, closed at the end of the block."""
    lst = await GrpcListener.open(relay)
    try:
        await lst.register(listen_id, secret, pool_size)
        yield lst
    finally:
        await lst.close()
