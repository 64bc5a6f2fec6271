"""``--metrics-bind``: Prometheus metrics and the dashboard's state, scraped from real nodes.

A relay with a home remote-listening on it, an echo target, real traffic (direct sessions of
known sizes, sessions through the listener, refusals, a bad key); each scrape is parsed with
prometheus_client's own parser and the figures must move exactly as the traffic did. A fleet
of two relays shows its peers and the hops forwarded between them.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from homenet import __version__
from homenet.node.auth import Credentials
from homenet.node.keys import client_key
from homenet.node.preamble import Verb, encode_request
from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server, node_args, spawn
from tests.integration.fleet_support import fleet, listener_records, until
from tests.integration.rl_support import start_home, two_hop_request
from tests.integration.support import OK_REPLY, dial, echoed, node_conn, wait_status

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def admin_url(node: NodeProc) -> str:
    """The admin address the node logged (``--metrics-bind ...:0`` picks a free port)."""
    async with asyncio.timeout(10.0):
        while not (m := re.search(r"admin\.listening url=(\S+)", node.stderr_path.read_text())):
            await asyncio.sleep(0.05)
    return m[1]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=5.0) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url, headers)


async def scrape(node: NodeProc) -> Samples:
    status, headers, body = await get(await admin_url(node) + "metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def settled(node: NodeProc) -> Samples:
    """A scrape once no data session is open (sessions end asynchronously in the node)."""
    async with asyncio.timeout(10.0):
        while value(samples := await scrape(node), "homenet_sessions_open", plane="data") != 0:
            await asyncio.sleep(0.05)
    return samples


def admin_creds(node: NodeProc) -> Credentials:
    found = client_key(key_file=str(node.stderr_path.parent / "state" / "keys.toml"), env={})
    assert found is not None
    return Credentials(*found)


def signed(creds: Credentials, hop: str) -> bytes:
    return encode_request(Verb.CONNECT, hop, creds.token(f"HN/1 CONNECT {hop}"))


async def test_a_relays_metrics_move_as_its_traffic_did(start_node: StartNode, tmp_path: Path) -> None:
    async with echo_server() as echo:
        relay = await start_node(
            args=node_args(
                "127.0.0.1", "--allow", "127.0.0.0/8", "--connect-auth", "direct", "--metrics-bind", "127.0.0.1:0"
            )
        )
        _, url = await start_home(start_node, relay.url, tmp_path / "home")
        listen_id = url.rsplit("/", 1)[1]
        creds = admin_creds(relay)
        before = await settled(relay)
        assert value(before, "homenet_listeners_online") == 1
        info = [dict(k[1]) for k, v in before.items() if k[0] == "homenet_build_info" and v == 1]
        assert [i["version"] for i in info] == [__version__], info

        sizes = [1, 1000, 65536, 300_000]
        for n in sizes:  # direct sessions: exactly these bytes each way
            payload = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            got = await echoed(relay, signed(creds, echo.endpoint), payload)
            assert got == OK_REPLY + payload
        for i in range(3):  # through the listener (a pool connection or a dial-back)
            got = await echoed(relay, two_hop_request(listen_id, echo.endpoint), b"via home")
            assert got == OK_REPLY * 2 + b"via home", (i, got)
        assert (await echoed(relay, b"HN/1 CONNECT nosuchlistener\n", b""))[:7] == b"HN/1 40"
        assert (await echoed(relay, b"HN/1 BOGUS\n", b""))[:12] == b"HN/1 400 bad"
        bad = Credentials(creds.key_id, creds.secret.__class__("not-the-secret-" + "x" * 20))
        reply = await echoed(relay, signed(bad, echo.endpoint), b"", source="127.0.0.9")
        assert reply.startswith(b"HN/1 401 "), reply
        after = await settled(relay)

    data_ok = moved(before, after, "homenet_sessions_total", plane="data", code="200")
    assert data_ok == len(sizes) + 3
    assert moved(before, after, "homenet_sessions_total", plane="data", code="404") == 1
    assert moved(before, after, "homenet_sessions_total", plane="data", code="400") == 1
    assert moved(before, after, "homenet_sessions_total", plane="data", code="401") == 1
    assert moved(before, after, "homenet_refusals_total", code="401") == 1
    assert moved(before, after, "homenet_auth_failures_total") == 1
    # up = client to target; the three listener sessions add their second request line and payload
    second_hop = len(two_hop_request(listen_id, echo.endpoint).split(b"\n", 1)[1]) + len(b"via home")
    assert moved(before, after, "homenet_bytes_total", direction="up") == sum(sizes) + 3 * second_hop
    assert moved(before, after, "homenet_bytes_total", direction="down") == sum(sizes) + 3 * (
        len(OK_REPLY) + len(b"via home")
    )
    assert moved(before, after, "homenet_setup_seconds_count") == data_ok
    assert moved(before, after, "homenet_handshake_seconds_count") >= data_ok + 3
    assert value(after, "homenet_setup_seconds_bucket", le="+Inf") == value(after, "homenet_setup_seconds_count")
    via_home = moved(before, after, "homenet_pool_hits_total") + moved(
        before, after, "homenet_dialbacks_total", outcome="ok"
    )
    assert via_home == 3, "each client of the listener came by a parked connection or a dial-back"
    assert value(after, "homenet_sessions_open", plane="data") == 0
    assert value(after, "process_open_fds") > 0


async def test_the_dashboard_state_and_pages(start_node: StartNode, tmp_path: Path) -> None:
    async with echo_server() as echo:
        relay = await start_node(args=node_args("127.0.0.1", "--allow", "127.0.0.0/8", "--metrics-bind", "127.0.0.1:0"))
        _, url = await start_home(start_node, relay.url, tmp_path / "home")
        base = await admin_url(relay)
        conn = await node_conn(relay)
        try:
            await conn.send(encode_request(Verb.CONNECT, echo.endpoint) + b"hi")
            assert (await conn.reply()).code == 200
            status, headers, body = await get(base + "api/state")
            assert status == 200
            assert headers["content-type"] == "application/json"
            state = json.loads(body)
            assert state["status"]["state"] == "serving"
            assert [x["listen_id"] for x in state["listeners"]] == [url.rsplit("/", 1)[1]]
            assert [s["target"] for s in state["sessions"]] == [echo.endpoint]
            assert state["fleet"]["peers"] == []
        finally:
            await conn.close()
    status, headers, body = await get(base)
    assert status == 200
    assert b"/dashboard.js" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    for path, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, _ = await get(base + path)
        assert (status, headers["content-type"].split(";")[0]) == (200, ctype)
    assert (await get(base + "nothing-here"))[0] == 404


async def test_a_home_reports_its_remote_listen_stream(start_node: StartNode, tmp_path: Path) -> None:
    relay = await start_node()
    home, _ = await start_home(start_node, relay.url, tmp_path / "home", "--metrics-bind", "127.0.0.1:0")
    samples = await scrape(home)
    route = relay.url
    assert value(samples, "homenet_rl_connected", relay=route) == 1, sorted(k for k in samples if "rl" in k[0])
    assert value(samples, "homenet_rl_reconnects_total", relay=route) == 0


async def test_a_fleet_relay_reports_its_peers_and_forwards(start_node: StartNode, tmp_path: Path) -> None:
    async with echo_server() as echo, fleet(start_node, tmp_path, n=2, extra=("--metrics-bind", "127.0.0.1:0")) as f:
        a, b = f.relays
        home = await spawn(
            ["rl", a.url, "--to", echo.endpoint, "--listen-id", "h1", "--state-dir", str(tmp_path / "h1")],
            tmp_path / "home1", ready="LISTENING ",
        )  # fmt: skip
        try:
            await until("a holds h1", lambda: _holds(a, f.admin, "h1"))

            async def b_sees_h1() -> bool:
                s = await scrape(b)
                return sum(v for k, v in s.items() if k[0] == "homenet_fleet_peer_listeners") == 1

            await until("b sees h1 in a's directory", b_sees_h1)
            before = await scrape(b)
            got = await echoed(b, b"HN/1 CONNECT h1\n", b"across")
            assert got == OK_REPLY + b"across"
            after = await scrape(b)
            forwards = {dict(k[1])["peer"]: v for k, v in after.items() if k[0] == "homenet_fleet_forwards_total"}
            ups = {dict(k[1])["peer"]: v for k, v in after.items() if k[0] == "homenet_fleet_peer_up"}
            assert list(ups.values()) == [1.0], ups
            (peer,) = forwards
            assert moved(before, after, "homenet_fleet_forwards_total", peer=peer) == 1
        finally:
            await home.stop()


async def _holds(relay: NodeProc, admin: Credentials, listen_id: str) -> bool:
    return any(x.listen_id == listen_id and x.state == "online" for x in await listener_records(relay, admin))


async def test_refusals_at_accept_and_the_caps_are_exported(start_node: StartNode) -> None:
    node = await start_node(
        args=node_args("127.0.0.1", "--max-per-source", "1", "--max-sessions", "7", "--metrics-bind", "127.0.0.1:0")
    )
    before = await scrape(node)
    assert value(before, "homenet_sessions_max") == 7
    assert value(before, "homenet_handshakes_max") == 256
    held = await dial(node.host, node.port, source="127.0.0.5")  # in handshake: it sends nothing
    try:
        async with asyncio.timeout(10.0):
            while value(await scrape(node), "homenet_handshakes") < 1:
                await asyncio.sleep(0.05)
        refused = await echoed(node, b"", b"", source="127.0.0.5")
        assert refused.startswith(b"HN/1 429 "), refused
    finally:
        await held.close()
    after = await scrape(node)
    assert moved(before, after, "homenet_sessions_total", plane="unknown", code="429") == 1
    assert moved(before, after, "homenet_refusals_total", code="429") == 1


async def test_a_multi_worker_node_serves_its_workers_metrics_merged(start_node: StartNode) -> None:
    """Worker 0 serves the node's metrics address: every worker's counters summed (the
    node's totals), process_* families labelled by worker."""
    node = await start_node(
        args=node_args("127.0.0.1", "--workers", "2", "--allow", "127.0.0.0/8", "--metrics-bind", "127.0.0.1:0")
    )
    async with echo_server() as echo:
        sessions = 20  # all on one worker of two by chance: 2 * 2**-20
        for i in range(sessions):
            got = await echoed(node, encode_request(Verb.CONNECT, echo.endpoint), b"w%d" % i)
            assert got == OK_REPLY + b"w%d" % i
        status = await wait_status(node, "every session counted", lambda s: s.total_sessions == sessions)
        assert status.workers_up == 2
    after = await settled(node)
    assert value(after, "homenet_sessions_total", plane="data", code="200") == sessions
    assert value(after, "homenet_bytes_total", direction="up") == status.bytes_up
    cpu = {dict(k[1])["worker"] for k in after if k[0] == "process_cpu_seconds_total"}
    assert cpu == {"0", "1"}, after.keys()
    info = [k for k, v in after.items() if k[0] == "homenet_build_info" and v == 1]
    assert len(info) == 1, info
