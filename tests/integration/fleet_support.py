"""Fleet test support: a round-robin TCP front (the fleet's one address), cuttable links
between relays (partitions), and a fleet of real relay processes on 127.0.0.x.

Everything here listens and dials on 127.0.0.0/8 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from homenet.control.auth import call_metadata
from homenet.control.v1 import fleet_pb2, fleet_pb2_grpc, relay_pb2, relay_pb2_grpc
from homenet.node.auth import Credentials
from homenet.node.keys import KeyStore, Secret
from tests.helpers import NodeProc
from tests.integration.support import TIMEOUT, channel


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


@dataclass
class Proxy:
    """A TCP forwarder on 127.0.0.1: each connection goes to the next backend that answers
    (round robin). ``cut()`` closes every connection and refuses new ones until ``heal()``."""

    backends: list[tuple[str, int]]
    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _next: itertools.count[int] = field(default_factory=itertools.count)
    _live: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    cut_off: bool = False

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        self.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(len(self.backends)):
            host, port = self.backends[next(self._next) % len(self.backends)]
            with contextlib.suppress(OSError):
                upstream = await asyncio.open_connection(host, port)
                break
        if upstream is None:
            writer.transport.abort()
            return
        ur, uw = upstream
        self._live |= {writer, uw}
        try:
            await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
        finally:
            for w in (writer, uw):
                self._live.discard(w)
                w.transport.abort()

    def cut(self) -> None:
        self.cut_off = True
        for w in list(self._live):
            w.transport.abort()

    def heal(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def proxy(backends: list[tuple[str, int]]) -> AsyncIterator[Proxy]:
    p = await Proxy(backends).start()
    try:
        yield p
    finally:
        await p.close()


def free_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (each relay binds its own 127.0.0.x)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        ok = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise AssertionError("no port free on every relay address")


Start = Callable[..., Awaitable[NodeProc]]


@dataclass
class Fleet:
    """Relays on 127.0.0.x peering through one cuttable link each way, behind one front."""

    relays: list[NodeProc]
    hosts: list[str]
    port: int
    front: Proxy
    #: links[(i, j)]: relay i watches relay j through this proxy
    links: dict[tuple[int, int], Proxy]
    key_file: Path
    admin: Credentials
    fleet_key: Credentials
    args: list[list[str]]
    start: Start

    @property
    def url(self) -> str:
        return f"hn://{self.front.endpoint}"

    async def restart(self, i: int) -> NodeProc:
        """Start relay ``i`` again, on its address, after it died."""
        self.relays[i] = await self.start(args=self.args[i])
        return self.relays[i]

    def partition(self, i: int) -> None:
        """Relay ``i`` no longer hears its peers, nor they it."""
        for (a, b), link in self.links.items():
            if i in (a, b):
                link.cut()

    def heal(self, i: int) -> None:
        for (a, b), link in self.links.items():
            if i in (a, b):
                link.heal()


def fleet_args(
    host: str, port: int, key_file: Path, peers: list[str], state: Path, extra: tuple[str, ...] = ()
) -> list[str]:
    """``homenet node`` args of one relay of a test fleet (fast pings, a short moving hold)."""
    return [
        "node", "--bind", host, "--port", str(port), "--no-mdns", "--log-level", "debug",
        "--fleet-key-file", str(key_file), "--state-dir", str(state), "--moving-hold", "4",
        "--keys-file", str(state.parent / "keys.toml"), "--ping-interval", "0.5", "--drain-grace", "1",
        *[a for p in peers for a in ("--peers", p)], *extra,
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def fleet(start: Start, tmp: Path, n: int = 3, extra: tuple[str, ...] = ()) -> AsyncIterator[Fleet]:
    """``n`` relays on 127.0.0.21.. with a fleet key, each watching every other through a
    link of its own, behind a round-robin front; keys: an admin key and a listen key home1..9."""
    hosts = [f"127.0.0.{21 + i}" for i in range(n)]
    port = free_port(hosts)
    key_file = tmp / "fleet.key"
    key_file.write_text(f"fleet:{secrets.token_urlsafe(24)}\n")
    key_file.chmod(0o600)
    fid, fsecret = key_file.read_text().strip().split(":", 1)
    store = KeyStore(tmp / "keys.toml")
    admin = store.add("admin", ["admin"])
    async with contextlib.AsyncExitStack() as stack:
        links = {}
        for i in range(n):
            for j in range(n):
                if i != j:
                    links[(i, j)] = await stack.enter_async_context(proxy([(hosts[j], port)]))
        relays, args = [], []
        for i in range(n):
            peers = [links[(i, j)].endpoint for j in range(n) if j != i]
            args.append(fleet_args(hosts[i], port, key_file, peers, tmp / f"relay{i}", extra))
            relays.append(await start(args=args[-1]))
        front = await stack.enter_async_context(proxy([(h, port) for h in hosts]))
        yield Fleet(
            relays, hosts, port, front, links, key_file, Credentials(admin.id, admin.secret),
            Credentials(fid, Secret(fsecret)), args, start,
        )  # fmt: skip


async def peers_of(relay: NodeProc, admin: Credentials) -> fleet_pb2.PeersResponse:
    async with channel(relay) as ch:
        resp: fleet_pb2.PeersResponse = await fleet_pb2_grpc.FleetServiceStub(ch).Peers(
            fleet_pb2.PeersRequest(with_entries=True),
            timeout=5.0,
            metadata=call_metadata(admin, "/homenet.v1.FleetService/Peers"),
        )
    return resp


async def local_listeners(relay: NodeProc, admin: Credentials) -> dict[str, str]:
    """listenId -> state of the listeners registered on ``relay`` itself."""
    return {x.listen_id: x.state for x in await listener_records(relay, admin)}


async def listener_records(relay: NodeProc, admin: Credentials) -> list[relay_pb2.Listener]:
    async with channel(relay) as ch:
        resp = await relay_pb2_grpc.RelayServiceStub(ch).ListListeners(
            relay_pb2.ListListenersRequest(),
            timeout=5.0,
            metadata=call_metadata(admin, "/homenet.v1.RelayService/ListListeners"),
        )
    return list(resp.listeners)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> float:
    """Poll ``check`` until true; the seconds it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not await check():
        if loop.time() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.05)
    return loop.time() - t0


def tls_files(tmp: Path, name: str, ips: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and one server certificate for ``name`` and ``ips``: (ca, cert, key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HomeNet fleet test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = tmp / "ca.pem", tmp / "relay.pem", tmp / "relay.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths
