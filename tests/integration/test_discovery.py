"""LAN discovery through real processes and real mDNS, pinned to 127.0.0.1.

Every zeroconf instance here and every node and publisher the tests start runs mDNS on the
loopback interface only (``interfaces=["127.0.0.1"]`` / ``--mdns-interface 127.0.0.1``), and the
raw packets are sent from 127.0.0.1 with the multicast interface pinned to loopback: nothing
reaches a real interface. Other tests may share loopback mDNS at the same time, so every service
name carries a random token and the tests look only at their own services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from homenet.node.address import parse_url
from homenet.node.client import RouteFailed, open_route
from homenet.node.discovery import HOMENET_TYPE
from homenet.node.errors import Code
from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, pattern, spawn
from tests.integration.support import TIMEOUT, CliResult, cli_env, homenet

LOOPBACK = "127.0.0.1"
HTTP = "_http._tcp.local."
SSH = "_ssh._tcp.local."
#: How soon a service's arrival or goodbye must show in a query (the issue's bound).
SEEN_WITHIN = 3.0
#: How soon a query through a dead hop must fail.
FAIL_FAST = 2.0
WATCH_INTERVAL = 0.5
SERVICE_KEYS = {"name", "type", "listen_id", "host", "addresses", "port", "txt", "first_seen", "last_seen"}
LISTEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

Services = list[dict[str, Any]]


# -- mDNS on loopback ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def loopback_zeroconf() -> AsyncIterator[AsyncZeroconf]:
    """A zeroconf instance bound to 127.0.0.1 only; closed (goodbyes sent) on exit."""
    azc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        yield azc
    finally:
        await azc.async_close()


def service_info(
    instance: str, port: int, *, type_: str = HTTP, txt: dict[str, str] | None = None, host: str = ""
) -> AsyncServiceInfo:
    """A service at 127.0.0.1:``port`` (the only address a test may advertise)."""
    return AsyncServiceInfo(
        type_,
        f"{instance}.{type_}",
        port=port,
        properties=txt or {},
        server=f"{host or 'hn-test-' + secrets.token_hex(3)}.local.",
        addresses=[socket.inet_aton(LOOPBACK)],
    )


async def register(azc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    """Register ``info`` and wait until it is probed and announced."""
    await (await azc.async_register_service(info))


async def unregister(azc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    """Withdraw ``info`` and wait until its goodbyes are sent."""
    await (await azc.async_unregister_service(info))


# -- raw mDNS packets ----------------------------------------------------------------------------------
MDNS_GROUP = ("224.0.0.251", 5353)
PTR, TXT, SRV, A = 12, 16, 33, 1


@contextlib.contextmanager
def loopback_mdns_sender() -> Iterator[socket.socket]:
    """A UDP socket whose multicast can only go out on loopback (else the test is skipped)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((LOOPBACK, 0))  # a 127/8 source is never routed off the host
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4) != socket.inet_aton(LOOPBACK):
            pytest.skip("cannot pin multicast to the loopback interface")
        yield sock
    finally:
        sock.close()


def dns_name(*labels: bytes) -> bytes:
    """Wire form of a name from raw labels (so a label may hold dots, escapes or bad UTF-8)."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def dotted(name: str) -> list[bytes]:
    return [part.encode("ascii") for part in name.rstrip(".").split(".")]


def rr(name: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One resource record (class IN; cache-flush on the unique types)."""
    rclass = 0x0001 if rtype == PTR else 0x8001
    return name + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def mdns_response(*records: bytes) -> bytes:
    return struct.pack("!HHHHHH", 0, 0x8400, 0, len(records), 0, 0) + b"".join(records)


def raw_service(instance: Sequence[bytes], host: str, port: int, ttl: int) -> bytes:
    """A complete answer (PTR, SRV, TXT, A = 127.0.0.1) for an instance zeroconf would never send.

    ``ttl`` 0 makes it the goodbye, so other processes on loopback forget it again.
    """
    full = dns_name(*instance, *dotted(HTTP))
    strings = [b"k%02d=\x1b[2J" % i + b"v" * 180 for i in range(40)]
    strings += [b"=no-key", b"", b"\xff\xfe=not utf-8", b"flag"]
    txt = b"".join(bytes([len(s)]) + s for s in strings)
    return mdns_response(
        rr(dns_name(*dotted(HTTP)), PTR, ttl, full),
        rr(full, SRV, ttl, struct.pack("!HHH", 0, 0, port) + dns_name(*dotted(host))),
        rr(full, TXT, ttl, txt),
        rr(dns_name(*dotted(host)), A, ttl, socket.inet_aton(LOOPBACK)),
    )


def malformed_packets() -> list[bytes]:
    """Datagrams no mDNS parser should choke on."""
    one_answer = struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 0)
    http = dns_name(*dotted(HTTP))
    return [
        b"",
        b"\x00\x01\x02",  # shorter than a header
        struct.pack("!HHHHHH", 0, 0x8400, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF),  # counts, and no records
        one_answer + b"\xc0\x0c" + struct.pack("!HHIH", PTR, 1, 120, 2) + b"\xc0\x0c",  # a name pointing at itself
        one_answer + http + struct.pack("!HHIH", PTR, 1, 120, 200) + b"\x05short",  # rdata cut short
        one_answer + http + struct.pack("!HHIH", PTR, 1, 120, 3) + b"\x3fab",  # a label past the end
        pattern(1400, seed=5),  # noise
    ]


# -- nodes ---------------------------------------------------------------------------------------------
def mdns_node_args(state_dir: Path, name: str, *extra: str) -> list[str]:
    """``homenet node`` args with discovery on, on loopback only, state in the test's directory."""
    return [
        "node", "--bind", LOOPBACK, "--port", "0", "--mdns-interface", LOOPBACK, "--name", name,
        "--state-dir", str(state_dir), "--log-level", "debug", *extra,
    ]  # fmt: skip


async def start_relay(start_node: StartNode, *extra: str) -> NodeProc:
    """A relay without discovery; its short drain keeps teardown from waiting on listener streams."""
    return await start_node("--drain-grace", "1", *extra)


async def start_home(start_node: StartNode, relay: NodeProc, state_dir: Path) -> NodeProc:
    """A home node with discovery, remote-listening on ``relay`` as home1, loopback allowed."""
    args = mdns_node_args(state_dir, "home1", "--rl", relay.url, "--listen-id", "home1", "--allow", "127.0.0.1/32")
    home = await start_node(args=args)
    assert (await home.next_line("LISTENING ")).split() == ["LISTENING", f"{relay.url}/home1"]
    return home


# -- hnctl ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hnctl:
    """Runs the real ``hnctl``, anonymous: its state directory is the test's own, and empty.

    Without that, hnctl would sign with the admin key of whatever node state this host keeps
    in ~/.local/state/homenet, which the test's nodes do not know. The nodes run with the
    harness's relaxed auth, so anonymous queries are allowed.
    """

    state_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return cli_env(HOMENET_STATE_DIR=str(self.state_dir))

    async def __call__(self, *args: str) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "homenet.cli.hnctl", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )  # fmt: skip
        try:
            async with asyncio.timeout(TIMEOUT):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return CliResult(proc.returncode, out, err.decode(errors="replace"))

    async def query(self, url: str, *extra: str) -> Services:
        """``hnctl query URL --json``: the services listed (the command must succeed)."""
        res = await self("query", url, "--json", *extra)
        assert res.code == 0, res.stderr
        data = json.loads(res.stdout)
        assert isinstance(data, list), data
        return data

    async def wait(self, url: str, what: str, check: Callable[[Services], bool], *extra: str) -> Services:
        """Poll ``hnctl query`` until ``check`` holds; no call may start after SEEN_WITHIN.

        A node's table has no event a remote client could await, hence the bounded polling.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + SEEN_WITHIN
        services: Services = []
        while loop.time() <= end:
            services = await self.query(url, *extra)
            if check(services):
                return services
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: not within {SEEN_WITHIN:g}s; last answer: {services}")

    async def wait_listed(self, url: str, name: str, *extra: str) -> dict[str, Any]:
        """The one service called ``name``, once a query lists it."""
        services = await self.wait(url, f"{name!r} listed", lambda s: bool(named(s, name)), *extra)
        [svc] = named(services, name)
        assert set(svc) == SERVICE_KEYS, svc
        return svc

    async def wait_unlisted(self, url: str, name: str) -> None:
        await self.wait(url, f"{name!r} gone", lambda s: not named(s, name))

    @contextlib.asynccontextmanager
    async def watch(self, url: str) -> AsyncIterator[asyncio.subprocess.Process]:
        """``hnctl query URL --watch`` running; terminated (killed if it lingers) on exit."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "homenet.cli.hnctl", "query", url, "--watch", "--interval", str(WATCH_INTERVAL),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                async with asyncio.timeout(TIMEOUT):
                    await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def named(services: Services, name: str) -> Services:
    return [s for s in services if s["name"] == name]


def one_line_error(res: CliResult) -> str:
    """The single stderr line of a failed CLI run (exit 1, nothing on stdout, no traceback)."""
    assert res.code == 1, (res.code, res.stdout, res.stderr)
    assert res.stdout == b""
    assert len(res.stderr_lines) == 1, res.stderr
    return res.stderr_lines[0]


async def next_change(proc: asyncio.subprocess.Process, change: str, name: str) -> list[str]:
    """The columns of the next ``--watch`` line reporting ``change`` of ``name``."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    async with asyncio.timeout(SEEN_WITHIN + WATCH_INTERVAL):
        while raw := await proc.stdout.readline():
            line = raw.decode().rstrip("\n")
            if line.startswith(change + " ") and name in line:
                return [col.strip() for col in line[len(change) :].split("  ") if col.strip()]
    raise AssertionError(f"hnctl --watch ended: {(await proc.stderr.read()).decode(errors='replace')}")


# -- the data plane ------------------------------------------------------------------------------------
async def echo_via(url: str, payload: bytes) -> bytes:
    """Open ``url``, send ``payload`` with the requests, half-close, read until the target closes."""
    opened = await open_route(parse_url(url), first=payload, timeout=TIMEOUT)
    sock = opened.sock
    loop = asyncio.get_running_loop()
    chunks = [opened.early]
    try:
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(TIMEOUT):
            while data := await loop.sock_recv(sock, 1 << 16):
                chunks.append(data)
    finally:
        sock.close()
    return b"".join(chunks)


async def assert_refused(url: str, code: Code) -> None:
    """Opening ``url`` fails with ``code``, answered by the route's last node."""
    route = parse_url(url)
    try:
        opened = await open_route(route, first=b"must never arrive", timeout=TIMEOUT)
    except RouteFailed as exc:
        failed = exc
    else:
        opened.sock.close()
        raise AssertionError(f"{url} opened; expected {int(code)}")
    assert failed.code is code, failed
    assert failed.hop == len(route.hops) - 1, failed


def printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


# -- the tests -----------------------------------------------------------------------------------------
async def test_a_lan_service_is_listed_reached_withdrawn_and_keeps_its_id(
    start_node: StartNode, tmp_path: Path
) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    relay = await start_relay(start_node)
    home = await start_home(start_node, relay, tmp_path / "home")
    url = f"{relay.url}/home1"
    photos, lid = f"Photos Server {tok}", f"photos-server-{tok}-http"
    # another instance whose name slugs the same: it gets the next id, and must keep it
    twin, twin_lid = f"Photos-Server {tok}", f"photos-server-{tok}-http-2"
    async with echo_server() as echo, echo_server() as echo2, loopback_zeroconf() as azc:
        info = service_info(photos, echo.port, txt={"path": "/photos", "v": "1"}, host=f"photos-{tok}")
        await register(azc, info)
        svc = await hn.wait_listed(url, photos)
        assert svc["listen_id"] == lid
        assert svc["type"] == HTTP
        assert svc["host"] == f"photos-{tok}.local"
        assert (svc["addresses"], svc["port"]) == ([LOOPBACK], echo.port)
        assert svc["txt"] == {"path": "/photos", "v": "1"}
        assert 0 < svc["first_seen"] <= svc["last_seen"]

        payload = pattern(300_000, seed=7)
        assert await echo_via(f"{url}/{lid}", payload) == payload
        assert (echo.connections, echo2.connections) == (1, 0)

        await register(azc, service_info(twin, echo2.port))
        assert (await hn.wait_listed(url, twin))["listen_id"] == twin_lid
        assert await echo_via(f"{url}/{twin_lid}", b"twin") == b"twin"
        assert (echo.connections, echo2.connections) == (1, 1)

        await unregister(azc, info)  # goodbye
        await hn.wait_unlisted(url, photos)
        await assert_refused(f"{url}/{lid}", Code.NOT_FOUND)

        # restarted on the same state directory, with only the twin on the LAN: the twin keeps its id
        assert await home.stop() == 0
        saved = json.loads((tmp_path / "home" / "services.json").read_text())
        assert {lid, twin_lid} <= set(saved.values()), saved
        await start_home(start_node, relay, tmp_path / "home")
        assert (await hn.wait_listed(url, twin))["listen_id"] == twin_lid
        assert await echo_via(f"{url}/{twin_lid}", b"twin again") == b"twin again"
        assert (echo.connections, echo2.connections) == (1, 2)


async def test_query_through_a_chain_and_its_failures(start_node: StartNode, tmp_path: Path) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    b = await start_relay(start_node)
    a = await start_relay(start_node, "--rl", b.url, "--listen-id", "a", "--state-dir", str(tmp_path / "a"))
    assert (await a.next_line("LISTENING ")).split() == ["LISTENING", f"{b.url}/a"]
    home = await start_node(
        args=mdns_node_args(
            tmp_path / "h", f"h-{tok}", "--rl", f"{b.url}/a", "--listen-id", "h", "--allow", "127.0.0.1/32"
        )
    )
    url = f"{b.url}/a/h"
    assert (await home.next_line("LISTENING ")).split() == ["LISTENING", url]
    pi, web = f"Garage Pi {tok}", f"Garage Web {tok}"
    async with echo_server() as echo, loopback_zeroconf() as azc:
        await asyncio.gather(
            register(azc, service_info(pi, echo.port, type_=SSH)),
            register(azc, service_info(web, echo.port)),
        )
        svc = await hn.wait_listed(url, pi, "--type", "_ssh._tcp")
        assert (svc["listen_id"], svc["type"], svc["port"]) == (f"garage-pi-{tok}-ssh", SSH, echo.port)
        await hn.wait_listed(url, web)
        only_ssh = await hn.query(url, "--type", "_ssh._tcp")
        assert {s["type"] for s in only_ssh} == {SSH}
        assert [s["name"] for s in await hn.query(url, "--name", f"garage WEB {tok}")] == [web]

        hello = b"SSH-2.0-through-three-nodes\r\n"
        assert await echo_via(f"{url}/{svc['listen_id']}", hello) == hello

        # a hop nobody registered, at the end or in the middle: one line
        assert "no listener nope" in one_line_error(await hn("--timeout", "5", "query", f"{b.url}/a/nope"))
        assert "no listener nope" in one_line_error(await hn("--timeout", "5", "query", f"{b.url}/nope/h"))

        # the home node dies: the hop before it says so at once
        home.proc.kill()
        async with asyncio.timeout(TIMEOUT):
            await home.proc.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        res = await hn("--timeout", "5", "query", url)
        elapsed = loop.time() - started
        line = one_line_error(res)
        assert "listener h is offline" in line, line
        assert elapsed < FAIL_FAST, f"took {elapsed:.2f}s: {line}"


async def test_publish_is_seen_by_a_node_and_by_a_plain_browser(start_node: StartNode, tmp_path: Path) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    node = await start_node(args=mdns_node_args(tmp_path / "node", f"seer-{tok}"))
    name = f"Pub-{tok}"
    full = f"{name}.{HTTP}"
    events = {change: asyncio.Event() for change in ServiceStateChange}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == full:
            events[state_change].set()

    async with echo_server() as echo, loopback_zeroconf() as azc:
        browser = AsyncServiceBrowser(azc.zeroconf, [HTTP], handlers=[on_change])
        try:
            publisher = await spawn(
                ["publish", "--name", name, "--port", str(echo.port), "--type", "_http._tcp",
                 "--txt", "path=/pub", "--txt", "k=v=w", "--mdns-interface", LOOPBACK],
                tmp_path / "publish", ready="PUBLISHED ",
            )  # fmt: skip
            try:
                assert publisher.url == full  # the word after PUBLISHED: the full service name
                async with asyncio.timeout(SEEN_WITHIN):
                    await events[ServiceStateChange.Added].wait()
                info = AsyncServiceInfo(HTTP, full)
                assert await info.async_request(azc.zeroconf, 3000)
                assert info.port == echo.port
                # no hn-public mark: whether a service needs a key is the node operator's choice
                assert info.properties == {b"path": b"/pub", b"k": b"v=w"}
                assert info.parsed_addresses() == [LOOPBACK]

                svc = await hn.wait_listed(node.url, name)
                assert (svc["listen_id"], svc["port"], svc["addresses"]) == (f"pub-{tok}-http", echo.port, [LOOPBACK])
                assert svc["txt"] == {"path": "/pub", "k": "v=w"}
            finally:
                code = await publisher.stop()
            assert code == 0
            async with asyncio.timeout(SEEN_WITHIN):  # it said goodbye on its way out
                await events[ServiceStateChange.Removed].wait()
            await hn.wait_unlisted(node.url, name)
        finally:
            await browser.async_cancel()


async def test_hostile_mdns_neither_crashes_the_node_nor_opens_loopback(start_node: StartNode, tmp_path: Path) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    # no --allow: loopback is no target of this node, whatever mDNS claims
    node = await start_node(args=mdns_node_args(tmp_path / "node", f"victim-{tok}"))
    huge_txt = {f"key{i:02d}": f"\x1b[31m{i:02d}\x07" + "x" * 140 for i in range(50)}  # 50 keys, ~8 KB
    weird = f"Ünïcødé  wéird. name.with dots ☃ {tok} "
    weird += "z" * (63 - len(weird.encode()))  # 63 bytes, the most a label holds
    names = (f"Huge TXT {tok}", weird, f"Loopback {tok}")
    async with echo_server() as echo, loopback_zeroconf() as azc:
        with loopback_mdns_sender() as sender:
            for packet in malformed_packets():
                sender.sendto(packet, MDNS_GROUP)
        infos = [service_info(names[0], echo.port, txt=huge_txt), *(service_info(n, echo.port) for n in names[1:])]
        await asyncio.gather(*(register(azc, info) for info in infos))

        services = await hn.wait(node.url, "all three listed", lambda s: all(named(s, n) for n in names))
        ours = [s for n in names for s in named(services, n)]
        for svc in ours:
            assert LISTEN_ID.fullmatch(svc["listen_id"]), svc["listen_id"]
            assert tok in svc["listen_id"], svc["listen_id"]
            assert len(svc["txt"]) <= 32, svc["txt"]
            for key, value in svc["txt"].items():
                assert len(value) <= 255, key
                assert printable(key), key
                assert printable(value), value
        huge = ours[0]
        assert len(huge["txt"]) == 32
        for key, value in huge["txt"].items():  # control characters dropped, the rest kept
            assert value == huge_txt[key].replace("\x1b", "").replace("\x07", ""), (key, value)

        # each advertises 127.0.0.1, which this node may not dial: refused, and no SYN sent
        for svc in ours:
            await assert_refused(f"{node.url}/{svc['listen_id']}", Code.FORBIDDEN)
        assert echo.connections == 0
        assert node.proc.returncode is None
        assert "Traceback" not in node.stderr_path.read_text(errors="replace")


async def test_names_zeroconf_rejects_are_dropped_quietly(start_node: StartNode, tmp_path: Path) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    node = await start_node(args=mdns_node_args(tmp_path / "node", f"victim-{tok}"))
    hostile = [
        [b"Evil \x1b[31m\x07\x00 " + tok.encode() + b" \xff\xfe"],  # control characters, bad UTF-8
        [b"L" * 63, b"o" * 57 + tok.encode()],  # an instance of two full labels: 121 bytes
    ]
    async with echo_server() as echo, loopback_zeroconf() as azc:
        with loopback_mdns_sender() as sender:
            for i, instance in enumerate(hostile):
                sender.sendto(raw_service(instance, f"evil{i}-{tok}.local.", echo.port, 120), MDNS_GROUP)
            try:
                # a service announced after the hostile ones: once it is listed, they were handled
                await register(azc, service_info(f"After {tok}", echo.port))
                services = await hn.wait(node.url, "the later service listed", lambda s: bool(named(s, f"After {tok}")))
                for svc in services:
                    assert printable(svc["name"]), svc
                    if tok in svc["name"] or tok in svc["listen_id"]:
                        await assert_refused(f"{node.url}/{svc['listen_id']}", Code.FORBIDDEN)
            finally:
                for i, instance in enumerate(hostile):
                    sender.sendto(raw_service(instance, f"evil{i}-{tok}.local.", echo.port, 0), MDNS_GROUP)
        assert echo.connections == 0
    assert node.proc.returncode is None
    stderr = node.stderr_path.read_text(errors="replace")
    assert "never retrieved" not in stderr, node.stderr()
    assert "Traceback" not in stderr, node.stderr()


async def test_watch_prints_added_and_removed(start_node: StartNode, tmp_path: Path) -> None:
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    relay = await start_relay(start_node)
    await start_home(start_node, relay, tmp_path / "home")
    first, second = f"Watch One {tok}", f"Watch Two {tok}"
    async with echo_server() as echo, loopback_zeroconf() as azc:
        await register(azc, service_info(first, echo.port))
        async with hn.watch(f"{relay.url}/home1") as watch:
            # the first poll lists what is there; its line also proves the watch is running
            assert (await next_change(watch, "added", first))[:2] == [first, "_http._tcp"]
            info = service_info(second, echo.port, txt={"a": "1"})
            await register(azc, info)
            assert await next_change(watch, "added", second) == [
                second, "_http._tcp", f"watch-two-{tok}-http", LOOPBACK, str(echo.port), "a=1",
            ]  # fmt: skip
            await unregister(azc, info)
            assert (await next_change(watch, "removed", second))[:3] == [second, "_http._tcp", f"watch-two-{tok}-http"]


async def test_a_record_cannot_make_itself_public_only_the_operator_can(start_node: StartNode, tmp_path: Path) -> None:
    """A LAN device's record saying hn-public=1 (or _homenet._tcp) opens nothing: anonymous
    clients get 401 until the node's operator names the service with --public-service."""
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    strict = ("--connect-auth", "direct", "--allow", "127.0.0.1/32")
    node = await start_node(args=mdns_node_args(tmp_path / "a", f"strict-{tok}", *strict))
    opened = await start_node(
        args=mdns_node_args(tmp_path / "b", f"opened-{tok}", *strict, "--public-service", f"claims-{tok}-homenet")
    )
    async with echo_server() as echo, loopback_zeroconf() as azc:
        await register(azc, service_info(f"Claims {tok}", echo.port, type_=HOMENET_TYPE, txt={"hn-public": "1"}))
        lid = (await hn.wait_listed(node.url, f"Claims {tok}"))["listen_id"]
        assert lid == f"claims-{tok}-homenet"
        with pytest.raises(RouteFailed) as refused:
            await echo_via(f"{node.url}/{lid}", b"anyone?")
        assert refused.value.code is Code.UNAUTHORIZED, refused.value
        assert echo.connections == 0, "the node dialed the record's address for an anonymous client"
        await hn.wait_listed(opened.url, f"Claims {tok}")
        assert await echo_via(f"{opened.url}/{lid}", b"operator said so") == b"operator said so"


async def test_a_registration_cannot_take_a_discovered_service_s_listen_id(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A node that is a relay and a home: an (anonymous) listener claiming the listenId of a
    service the node found would shadow it and take its clients; the claim is refused."""
    tok = secrets.token_hex(3)
    hn = Hnctl(tmp_path / "client")
    node = await start_node(args=mdns_node_args(tmp_path / "n", f"both-{tok}", "--allow", "127.0.0.1/32"))
    async with echo_server() as echo, loopback_zeroconf() as azc:
        await register(azc, service_info(f"Nas {tok}", echo.port))
        lid = (await hn.wait_listed(node.url, f"Nas {tok}"))["listen_id"]
        taken = await homenet(
            "rl", node.url, "--to", echo.endpoint, "--listen-id", lid, "--state-dir", str(tmp_path / "thief"),
            env=cli_env(), timeout=20.0,
        )  # fmt: skip
        assert taken.code == 1, taken
        assert f"listenId {lid} names a service this node found on its LAN" in taken.stderr, taken.stderr
        assert await echo_via(f"{node.url}/{lid}", b"still the NAS") == b"still the NAS"
