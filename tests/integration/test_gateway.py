"""The HTTP gateway on the one port (issue 14), end to end.

Real processes (a relay with ``--http-domain``, a home node remote-listening on it, ``homenet
rl`` fixed-target listeners) in front of real targets on 127.0.0.1: an HTTP/1.1 echo server
and a WebSocket echo server (tests/integration/gateway_support.py, h11 and wsproto, not the
product's code). Clients are curl (the program the issue names), http.client, and an h11
client that controls every byte (keep-alive, pipelining, chunked bodies, garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import shutil
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from wsproto.events import AcceptConnection

from tests.helpers import NodeProc, node_args, pattern
from tests.integration.fleet_support import tls_files
from tests.integration.gateway_support import (
    TIMEOUT,
    Client,
    Headers,
    HttpEcho,
    Procs,
    Resp,
    WsClient,
    WsEcho,
    client,
    exchange_raw,
    http_echo,
    parse_response,
    settles,
    sha,
    until_closed,
    ws_echo,
)
from tests.integration.rl_support import home_args
from tests.integration.support import cli_env, run_program
from tests.integration.test_metrics import scrape, value
from tests.integration.test_security import key_env, keys_path, make_keys

pytestmark = pytest.mark.timeout(90)

DOMAIN = "relay.test"
#: A well-formed HomeNet key (nodes with relaxed auth do not check it; the gateway strips it).
FAKE_KEY = "carol:" + "s3cret-" * 5
MIB = 1 << 20


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    """Real ``homenet`` processes of the test; all are stopped at teardown."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        await p.stop_all()


@dataclass
class Stack:
    """A relay (``--http-domain relay.test``), a home node ``home1`` on it, a ``homenet rl``
    listener ``web`` on it (fixed target: the echo), all in front of one HTTP echo target."""

    relay: NodeProc
    home: NodeProc
    echo: HttpEcho

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def via_home(self) -> str:
        """The route to the echo through the home node (relay -> home1 -> 127.0.0.1:PORT)."""
        return f"home1/{self.echo.endpoint}"

    def host(self, name: str | None = None) -> str:
        return f"{name}.{DOMAIN}:{self.port}" if name else f"127.0.0.1:{self.port}"


async def start_stack(procs: Procs, tmp: Path, echo: HttpEcho, *relay_extra: str, svc: bool = False) -> Stack:
    """Start the :class:`Stack`; with ``svc``, also ``homenet rl`` listening on home1 itself as
    ``svc`` (so ``svc.home1.relay.test`` names the two-hop route home1/svc)."""
    relay = await procs.start(node_args("127.0.0.1", "--http-domain", DOMAIN, *relay_extra))
    web = ["rl", relay.url, "--to", echo.endpoint, "--listen-id", "web", "--state-dir", str(tmp / "web")]
    started = await asyncio.gather(
        procs.start(home_args(relay.url, tmp / "home1", listen_id="home1"), tier=1),
        procs.start([*web, "--log-level", "debug"], ready="LISTENING ", tier=1),
        return_exceptions=True,
    )
    for result in started:
        if isinstance(result, BaseException):
            raise result
    home, rl = (r for r in started if isinstance(r, NodeProc))
    assert (await home.next_line("LISTENING ")).split() == ["LISTENING", f"{relay.url}/home1"]
    assert rl.url == f"{relay.url}/web"
    if svc:
        args = ["rl", home.url, "--to", echo.endpoint, "--listen-id", "svc", "--state-dir", str(tmp / "svc")]
        nested = await procs.start(args, ready="LISTENING ", tier=2)
        assert nested.url == f"{home.url}/svc"
    return Stack(relay, home, echo)


def forwarded(host: str, proto: str = "http", chain: str = "127.0.0.1") -> Headers:
    """The headers the gateway appends for a client on 127.0.0.1."""
    return [("x-forwarded-for", chain), ("x-forwarded-proto", proto), ("x-forwarded-host", host)]


def refusal(resp: Resp, status: int, code: str, line: str) -> None:
    """``resp`` is the gateway's own one-line refusal (no Accept: text/html)."""
    assert (resp.status, resp.header("hn-error")) == (status, code), (resp.status, resp.headers, resp.body)
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    assert resp.header("x-echo") is None, "the target answered a refused request"
    assert resp.body.decode() == line + "\n"


# -- 1. naming the route --------------------------------------------------------------------------------


def _curl_response(raw: bytes) -> Resp:
    resp, rest = parse_response(raw)
    assert rest == b"", rest
    return resp


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl program (not installed)")
async def test_curl_reaches_a_listener_by_header_host_name_and_path(procs: Procs, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    env = {k: v for k, v in cli_env().items() if "proxy" not in k.lower()}
    jar = tmp_path / "cookies.txt"
    async with http_echo() as echo:
        relay = await procs.start(node_args("127.0.0.1", "--http-domain", DOMAIN))
        web = ["rl", relay.url, "--to", echo.endpoint, "--listen-id", "web", "--state-dir", str(tmp_path / "web")]
        await procs.start(web, ready="LISTENING ", tier=1)
        port = relay.port

        async def run(*args: str) -> Resp:
            done = await run_program(curl, "-q", "-sS", "-i", "--noproxy", "*", "--max-time", "10", *args, env=env)
            assert done.code == 0, done.stderr
            return _curl_response(done.stdout)

        by_header = await run("-H", "HN-Route: web", f"http://127.0.0.1:{port}/a/b?c=d")
        assert by_header.status == 200
        seen = by_header.echo
        assert (seen["method"], seen["path"]) == ("GET", "/a/b?c=d")
        assert [k for k, _ in by_header.seen_headers] == [
            "host", "user-agent", "accept", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        ]  # fmt: skip
        assert dict(by_header.seen_headers)["host"] == f"127.0.0.1:{port}"
        assert dict(by_header.seen_headers)["user-agent"].startswith("curl/")
        assert by_header.seen_headers[3:] == forwarded(f"127.0.0.1:{port}")
        assert by_header.header("set-cookie") is None

        by_host = await run("--resolve", f"web.{DOMAIN}:{port}:127.0.0.1", f"http://web.{DOMAIN}:{port}/p")
        assert (by_host.status, by_host.echo["path"]) == (200, "/p")
        assert by_host.seen_headers[3:] == forwarded(f"web.{DOMAIN}:{port}")

        by_path = await run("-c", str(jar), f"http://127.0.0.1:{port}/hn/web/first/page?x=1")
        assert (by_path.status, by_path.echo["path"]) == (200, "/first/page?x=1")
        assert by_path.header("set-cookie") == "hn-route=web; Path=/; HttpOnly; SameSite=Lax"
        # curl's cookie engine sends the route back: an absolute path alone reaches it
        followed = await run("-b", str(jar), "-c", str(jar), f"http://127.0.0.1:{port}/style.css")
        assert (followed.status, followed.echo["path"]) == (200, "/style.css")
        assert "cookie" not in dict(followed.seen_headers)
        assert echo.connections == 4


def _http_client_get(port: int, target: str, headers: dict[str, str]) -> Resp:
    """One GET with the standard library's http.client (what many programs use)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", target, headers=headers)
        r = conn.getresponse()
        return Resp(r.status, r.reason, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


async def get(port: int, target: str, **headers: str) -> Resp:
    """GET with http.client in a thread (header names: ``HN_Route`` is sent as ``HN-Route``)."""
    return await asyncio.to_thread(_http_client_get, port, target, {k.replace("_", "-"): v for k, v in headers.items()})


async def routes_and_headers(s: Stack) -> None:
    """1 and 5: a route named by header, host name, path prefix, cookie; what the target sees."""
    echo = s.echo
    port, local = s.port, s.host()
    plain = [("host", local), ("accept-encoding", "identity")]  # what http.client sends by itself

    # HN-Route, to the listener of `homenet rl` and through the home node to a LAN target
    for route in ("web", s.via_home):
        r = await get(port, "/a/b?c=d", HN_Route=route)
        assert (r.status, r.echo["method"], r.echo["path"]) == (200, "GET", "/a/b?c=d"), route
        assert r.seen_headers == plain + forwarded(local), route
        assert r.header("set-cookie") is None
    # the header wins over a host name of the domain
    r = await get(port, "/h", HN_Route="web", Host=f"nosuch.{DOMAIN}")
    assert (r.status, r.echo["path"]) == (200, "/h")

    # <listenId>.relay.test (any case); two levels: svc.home1.relay.test is home1/svc
    for name in ("web", "svc.home1"):
        host = s.host(name)
        r = await get(port, "/by-host", Host=host)
        assert (r.status, r.echo["path"]) == (200, "/by-host"), name
        assert r.seen_headers == [("host", host), ("accept-encoding", "identity"), *forwarded(host)]
    shouted = f"WEB.Relay.Test:{port}"
    r = await get(port, "/", Host=shouted)
    assert (r.status, r.seen_headers[-1]) == (200, ("x-forwarded-host", shouted))
    before = echo.connections
    refusal(
        await get(port, "/", Host=s.host("nosuch")), 404, "404 not-found",
        "HomeNet 404 not-found: no listener or service nosuch on this node",
    )  # fmt: skip

    # /hn/<route>/...: the prefix is cut, the route remembered in a cookie for absolute links
    for route, prefix in ((s.via_home, f"/hn/home1/{s.echo.endpoint}"), ("web", "/hn/web")):
        r = await get(port, f"{prefix}/x/y.html?q=1")
        assert (r.status, r.echo["path"]) == (200, "/x/y.html?q=1"), route
        assert r.seen_headers == plain + forwarded(local)
        cookie = f"hn-route={quote(route, safe='')}"
        assert r.header("set-cookie") == f"{cookie}; Path=/; HttpOnly; SameSite=Lax"
        r = await get(port, "/style.css", Cookie=f"theme=dark; {cookie}")
        assert (r.status, r.echo["path"]) == (200, "/style.css"), route
        assert r.seen_headers == [*plain, ("cookie", "theme=dark"), *forwarded(local)]
        assert r.header("set-cookie") is None
    r = await get(port, f"/hn/home1/{quote(s.echo.endpoint, safe='')}/encoded")
    assert (r.status, r.echo["path"]) == (200, "/encoded")
    r = await get(port, "/hn/web")
    assert (r.status, r.echo["path"]) == (200, "/")

    # no route at all
    refusal(
        await get(port, "/"), 404, "404 not-found",
        f"HomeNet 404 not-found: this request names no route: send an HN-Route header, or use"
        f" {{listenId}}.{DOMAIN}, /hn/ROUTE/...",
    )  # fmt: skip
    refusal(
        await get(port, "/", HN_Route="home1//x"), 400, "400 bad-request",
        "HomeNet 400 bad-request: bad route 'home1//x': expected HOP[/HOP...]",
    )  # fmt: skip
    assert echo.connections == before + 6, "a refused request reached the target"

    # -- 5. what the target sees of a request's headers (the h11 client sends exactly these)
    async with client(port) as c:
        r = await c.request("GET", "/hdr", [
            ("host", "app.example"), ("hn-route", "web"), ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"), ("x-forwarded-host", "spoofed.example"),
            ("authorization", f"Bearer {FAKE_KEY}"), ("cookie", f"a=1; hn-key={FAKE_KEY}; hn-route=web; b=2"),
            ("x-app", "kept"), ("connection", "keep-alive, x-hop"), ("x-hop", "dropped"), ("te", "trailers"),
        ])  # fmt: skip
        assert r.status == 200
        assert r.seen_headers == [
            ("host", "app.example"), ("cookie", "a=1; b=2"), ("x-app", "kept"),
            *forwarded("app.example", chain="198.51.100.7, 127.0.0.1"),
        ]  # fmt: skip
        assert "keep-alive" not in r.names, "a hop-by-hop header of the target reached the client"
        # a non-HomeNet Authorization goes on untouched; a Cookie of HomeNet's cookies alone goes
        for auth in ("Basic dXNlcjpwYXNz", "Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"):
            r = await c.request("GET", "/auth", [("host", "a"), ("hn-route", "web"), ("authorization", auth)])
            assert r.seen_headers == [("host", "a"), ("authorization", auth), *forwarded("a")]
        r = await c.request("GET", "/k", [("host", "a"), ("cookie", f"hn-key={FAKE_KEY}"), ("hn-route", "web")])
        assert r.seen_headers == [("host", "a"), *forwarded("a")]


# -- 2, 3, 4, 9: bodies, keep-alive, pipelining, WebSocket, metrics ---------------------------------------


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


async def http_open(relay: NodeProc) -> float:
    return value(await scrape(relay), "homenet_sessions_open", plane="http")


async def http_idle(relay: NodeProc) -> None:
    """Wait until the relay holds no HTTP connection open (a close reaches it asynchronously)."""
    async with asyncio.timeout(TIMEOUT):
        while await http_open(relay) != 0:
            await asyncio.sleep(0.05)


async def bodies_keep_alive_and_pipelining(s: Stack) -> None:
    """2 and 3: byte-exact 5 MiB bodies both ways, keep-alive, a change of route, pipelining."""
    echo = s.echo
    up = pattern(5 * MIB, seed=1)
    down = pattern(5 * MIB)
    for route in (s.via_home, "web"):
        head = [("host", "files.example"), ("hn-route", route)]
        before = echo.connections
        async with client(s.port) as c:
            # a 5 MiB chunked upload, echoed byte for byte
            r = await c.request("POST", "/upload", [*head, ("transfer-encoding", "chunked")], _chunks(up))
            assert r.status == 200, (route, r.body[:300])
            seen = r.echo
            assert (seen["method"], seen["path"], seen["length"], seen["sha256"]) == (
                "POST", "/upload", len(up), sha(up),
            ), route  # fmt: skip
            assert ["transfer-encoding", "chunked"] in seen["headers"]
            assert (len(r.body), sha(r.body)) == (len(up), sha(up)), route
            # a 5 MiB download (chunked by the target)
            r = await c.request("GET", f"/blob/{len(down)}", head)
            assert r.status == 200
            assert (len(r.body), sha(r.body)) == (len(down), sha(down)), route
            # more requests on the same client connection: one route connection, one at the target
            small = [await c.request("POST", f"/s{i}", [*head, ("content-length", "3")], b"abc") for i in range(3)]
            assert [(x.status, x.echo["path"], x.body) for x in small] == [(200, f"/s{i}", b"abc") for i in range(3)]
            assert {x.echo["conn"] for x in [r, *small]} == {before + 1}, route
            assert echo.connections == before + 1, "the target saw more than one TCP connection"

    # a change of route on one client connection; the old route's connection is closed
    async with client(s.port) as c:
        conns = []
        for route in ("web", s.via_home, "web"):
            r = await c.request("GET", "/switch", [("host", "a"), ("hn-route", route)])
            assert (r.status, r.echo["path"]) == (200, "/switch"), route
            conns.append(r.echo["conn"])
        assert len(set(conns)) == 3, conns
        await settles("the target to see the old route connections closed", lambda: echo.open == 1)

        # pipelining: three requests in one write, three responses in order
        paths = ["/p1", "/p2?x=y", "/p3"]
        rs = await c.pipelined([(p, [("host", "a"), ("hn-route", "web")]) for p in paths])
        assert [(x.status, x.echo["path"]) for x in rs] == [(200, p) for p in paths]
        assert {x.echo["conn"] for x in rs} == {conns[-1]}


async def metrics_move(s: Stack) -> None:
    """9: one keep-alive client is one open HTTP session; responses are counted by status."""
    await http_idle(s.relay)
    before = await scrape(s.relay)
    async with client(s.port) as c:
        for i in range(4):
            r = await c.request("GET", f"/m{i}", [("host", "a"), ("hn-route", "web")])
            assert r.status == 200
        during = await scrape(s.relay)
        assert value(during, "homenet_sessions_open", plane="http") == 1
    refused = parse_response(
        await exchange_raw(s.port, b"GET / HTTP/1.1\r\nHost: a\r\nHN-Route: nosuch\r\nConnection: close\r\n\r\n")
    )
    assert refused[0].status == 404
    await http_idle(s.relay)
    after = await scrape(s.relay)
    for code, n in (("200", 4), ("404", 1)):
        moved = value(after, "homenet_http_responses_total", code=code) - value(
            before, "homenet_http_responses_total", code=code
        )
        assert moved == n, (code, moved)
    assert value(after, "homenet_sessions_open", plane="http") == 0


async def websocket_passes_through(s: Stack, ws: WsEcho) -> None:
    """4: ``Upgrade: websocket`` goes on to the target's WebSocket echo (text, 1 MiB binary)."""
    route = f"home1/127.0.0.1:{ws.port}"
    wsc = await WsClient.open(s.port, f"127.0.0.1:{s.port}", "/chat?room=1", [(b"hn-route", route.encode())])
    try:
        assert isinstance(wsc.answer, AcceptConnection), wsc.answer
        assert await wsc.echo("hello through the gateway") == "hello through the gateway"
        blob = pattern(MIB, seed=7)
        back = await wsc.echo(blob)
        assert isinstance(back, bytes)
        assert (len(back), sha(back)) == (len(blob), sha(blob))
        assert await wsc.echo("after the binary one") == "after the binary one"
        ((target, heads),) = ws.handshakes
        assert target == "/chat?room=1"
        names = [k for k, _ in heads]
        assert "hn-route" not in names
        assert [h for h in heads if h[0].startswith("x-forwarded-")] == forwarded(f"127.0.0.1:{s.port}")
        mid = await scrape(s.relay)
        assert value(mid, "homenet_http_responses_total", code="101") == 1
        # an upgraded connection is still an open session of the HTTP plane (operators
        # see it; --max-sessions caps it)
        assert value(mid, "homenet_sessions_open", plane="http") == 1
    finally:
        closing = await wsc.close()
    assert closing.code == 1000


async def test_routing_bodies_keep_alive_websocket_and_metrics(procs: Procs, tmp_path: Path) -> None:
    async with http_echo() as echo, ws_echo() as ws:
        s = await start_stack(procs, tmp_path, echo, "--metrics-bind", "127.0.0.1:0", svc=True)
        await routes_and_headers(s)
        await bodies_keep_alive_and_pipelining(s)
        await metrics_move(s)
        await websocket_passes_through(s, ws)


# -- 6. auth and policy, exactly as on the data plane ---------------------------------------------------


async def test_keys_login_and_policy_with_default_auth(procs: Procs, tmp_path: Path) -> None:
    keys = make_keys(tmp_path, home1=["listen"], alice=["connect"])
    alice = key_env(keys["alice"])
    async with http_echo() as echo:
        relay = await procs.start(node_args("127.0.0.1"), secure=True)
        home_extra = ["--listen-id", "home1", "--keys-file", str(keys_path(tmp_path))]
        home = await procs.start(
            home_args(relay.url, tmp_path / "home1", *home_extra), tier=1, secure=True,
            env={"HOMENET_KEY": key_env(keys["home1"])},
        )  # fmt: skip
        assert (await home.next_line("LISTENING ")).split() == ["LISTENING", f"{relay.url}/home1"]
        port = relay.port
        route = f"home1/{echo.endpoint}"
        needs_key = (
            f"{echo.endpoint}: this needs a key with the connect role (log in, or send Authorization: Bearer ID:SECRET)"
        )

        # no key: 401, a page with a login link for browsers, one line for programs
        page = await get(port, "/", HN_Route=route, Accept="text/html,application/xhtml+xml")
        assert (page.status, page.header("hn-error")) == (401, "401 unauthorized")
        assert page.header("content-type") == "text/html; charset=utf-8"
        text = page.body.decode()
        assert "<title>HomeNet: unauthorized (401)</title>" in text
        assert f"<p>{needs_key}</p>" in text
        assert '<a href="/.hn/login?next=/">' in text  # back to this page once logged in
        refusal(await get(port, "/", HN_Route=route), 401, "401 unauthorized", f"HomeNet 401 unauthorized: {needs_key}")
        assert echo.connections == 0

        form = await get(port, "/.hn/login?next=/photos/%3Fx%3D1")
        assert '<input type="hidden" name="next" value="/photos/?x=1">' in form.body.decode()

        # a connect key as Authorization: Bearer ID:SECRET
        r = await get(port, "/with-key", HN_Route=route, Authorization=f"Bearer {alice}")
        assert (r.status, r.echo["path"]) == (200, "/with-key")
        assert "authorization" not in dict(r.seen_headers)

        # the login page (loopback: the form is shown), then the cookie it sets
        login = await get(port, "/.hn/login")
        assert (login.status, login.header("content-type")) == (200, "text/html; charset=utf-8")
        assert '<form method="post" action="/.hn/login">' in login.body.decode()
        assert '<input name="key" type="password"' in login.body.decode()
        after = f"/hn/{route}/after?x=1"
        r = await post_form(port, "/.hn/login", {"key": alice, "next": after})
        assert (r.status, r.header("location")) == (303, after)
        assert r.header("set-cookie") == f"hn-key={alice}; Path=/; HttpOnly; SameSite=Strict; Max-Age=86400"
        r = await get(port, after, Cookie=f"hn-key={alice}")
        assert (r.status, r.echo["path"]) == (200, "/after?x=1")
        assert "cookie" not in dict(r.seen_headers)
        cookie = f"hn-key={alice}; hn-route={quote(route, safe='')}"
        r = await get(port, "/absolute.js", Cookie=cookie)
        assert (r.status, r.echo["path"]) == (200, "/absolute.js")
        assert "cookie" not in dict(r.seen_headers)
        refusal(
            await post_form(port, "/.hn/login", {"key": "not a key"}), 400, "400 bad-request",
            "HomeNet 400 bad-request: expected a key as ID:SECRET (the line homenet key new printed)",
        )  # fmt: skip
        out = await get(port, "/.hn/logout", Cookie=cookie)
        assert (out.status, out.header("location")) == (303, "/")
        assert out.header("set-cookie") == "hn-key=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"

        # policy: a target on the relay itself needs --allow, a key does not change that
        reached = echo.connections
        r = await get(port, "/", HN_Route=echo.endpoint, Authorization=f"Bearer {alice}")
        refusal(
            r, 403, "403 forbidden",
            f"HomeNet 403 forbidden: {echo.endpoint} is loopback; allowed only if named explicitly"
            " (--allow 127.0.0.0/8)",
        )  # fmt: skip
        refusal(  # without a key, the key is asked for first (as on the data plane)
            await get(port, "/", HN_Route=echo.endpoint), 401, "401 unauthorized",
            "HomeNet 401 unauthorized: this needs a key with the connect role"
            " (log in, or send Authorization: Bearer ID:SECRET)",
        )  # fmt: skip
        refusal(
            await get(port, "/", HN_Route="nosuch"), 404, "404 not-found",
            "HomeNet 404 not-found: no listener or service nosuch on this node",
        )  # fmt: skip
        assert echo.connections == reached

        # never an open redirect: `next` must be a path of this site
        for evil in (
            "//evil.example/x",
            "https://evil.example/",
            "evil.example",
            "/\\evil.example",
            "/\t/evil.example",
        ):
            r = await post_form(port, "/.hn/login", {"key": alice, "next": evil})
            assert (r.status, r.header("location")) == (303, "/"), evil


def _post_form(port: int, target: str, form: dict[str, str]) -> Resp:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        heads = {"Content-Type": "application/x-www-form-urlencoded"}
        conn.request("POST", target, body=urlencode(form).encode(), headers=heads)
        r = conn.getresponse()
        return Resp(r.status, r.reason, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


async def post_form(port: int, target: str, form: dict[str, str]) -> Resp:
    return await asyncio.to_thread(_post_form, port, target, form)


# -- 7. limits and bad input ------------------------------------------------------------------------


def closing_refusal(raw: bytes, status: int, code: str | None) -> str:
    """``raw`` is one refusal of the node (``HN-Error: code`` unless None), with ``Connection:
    close``, and then EOF; its one text line."""
    resp, rest = parse_response(raw)
    assert resp.status == status, raw[:400]
    hn_error = resp.header("hn-error")
    assert hn_error is not None, raw[:400]
    assert code is None or hn_error == code, raw[:400]
    assert resp.header("connection") == "close"
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    assert rest == b"", rest
    text = resp.body.decode()
    assert text.endswith("\n")
    assert text.count("\n") == 1
    return text[:-1]


@contextlib.asynccontextmanager
async def limits_relay(procs: Procs) -> AsyncIterator[tuple[NodeProc, HttpEcho]]:
    async with http_echo() as echo:
        relay = await procs.start(node_args("127.0.0.1", "--allow", "127.0.0.0/8", "--handshake-timeout", "1"))
        yield relay, echo


async def served(port: int, route: str, n: int = 1) -> None:
    """``n`` requests on one connection all answered by the target."""
    async with client(port) as c:
        for i in range(n):
            r = await c.request("GET", f"/ok{i}", [("host", "a"), ("hn-route", route)])
            assert (r.status, r.echo["path"]) == (200, f"/ok{i}")


async def test_deadlines_garbage_and_refused_bodies(procs: Procs) -> None:
    async with limits_relay(procs) as (relay, echo):
        port, route = relay.port, echo.endpoint
        loop = asyncio.get_running_loop()

        # a head that never completes: 408 at the handshake deadline; others are served meanwhile
        started = loop.time()
        slow = await Client.open(port)
        try:
            await slow.send_raw(b"GET /slow HTTP/1.1\r\nHost: a\r\nHN-Route: " + route.encode() + b"\r\nX-Pad: 1")
            await served(port, route, 3)
            raw = await until_closed(slow.reader)
            took = loop.time() - started
        finally:
            await slow.close()
        line = closing_refusal(raw, 408, "408 timeout")
        assert line == "HomeNet 408 timeout: no complete preamble within 1s"
        assert 0.9 <= took < 2.5, took

        # garbage after a valid method: 400 and close
        for junk in (b"GET \x00\x01\x02\xff HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\x00\x01: \xff\r\n\r\n"):
            line = closing_refusal(await exchange_raw(port, junk), 400, "400 bad-request")
            assert line == "HomeNet 400 bad-request: malformed HTTP request (request line or headers)", line

        # a refused request with a body: the answer, then the connection closes (the body unread)
        for sent in (b"0123456789", b"x" * 1000):
            async with client(port) as c:
                await c.send_raw(
                    b"POST /up HTTP/1.1\r\nHost: a\r\nHN-Route: nosuch\r\nContent-Length: 10000000\r\n\r\n" + sent
                )
                r = await c.response()
                refusal(r, 404, "404 not-found", "HomeNet 404 not-found: no listener or service nosuch on this node")
                assert r.header("connection") == "close"
                assert await c.eof()
        async with client(port) as c:
            await c.send_raw(b"POST /up HTTP/1.1\r\nHost: a\r\nHN-Route: a//b\r\nContent-Length: 4\r\n\r\nbody")
            r = await c.response()
            assert (r.status, r.header("connection")) == (400, "close")
            assert await c.eof()
        await served(port, route)
        assert echo.connections == 2


async def test_head_size_limit_and_keep_alive_after_a_refusal(procs: Procs) -> None:
    async with limits_relay(procs) as (relay, echo):
        port, route = relay.port, echo.endpoint
        head = b"GET /big HTTP/1.1\r\nHost: a\r\nHN-Route: " + route.encode() + b"\r\n"
        big = b"X-Big: " + b"b" * (33 * 1024) + b"\r\n"

        # a head over 32 KiB: 431 and close, whether it arrives whole or never ends
        line = closing_refusal(await exchange_raw(port, head + big + b"\r\n", timeout=3.0), 431, None)
        assert line.startswith("HomeNet "), line
        # (at once: a refusal at the 1 s handshake deadline would be a 408)
        closing_refusal(await exchange_raw(port, head + big + big, timeout=3.0), 431, None)
        # the same as the second request of a keep-alive connection
        async with client(port) as c:
            r = await c.request("GET", "/first", [("host", "a"), ("hn-route", route)])
            assert r.status == 200
            await c.send_raw(head + big + b"\r\n")
            raw = await until_closed(c.reader, 3.0)
            closing_refusal(raw, 431, None)
        async with client(port) as c:
            r = await c.request("GET", "/first", [("host", "a"), ("hn-route", route)])
            assert r.status == 200
            await c.send_raw(head + big + big)  # and never the end of it
            closing_refusal(await until_closed(c.reader, 3.0), 431, None)
        assert echo.connections == 2, "an over-long head reached the target"

        # a refusal of a request without a body keeps the connection for the next request
        async with client(port) as c:
            r = await c.request("GET", "/", [("host", "a"), ("hn-route", "nosuch")])
            assert (r.status, r.header("connection")) == (404, None)
            r = await c.request("GET", "/next", [("host", "a"), ("hn-route", route)])
            assert (r.status, r.echo["path"]) == (200, "/next")
        await served(port, route)


# -- 8. TLS -----------------------------------------------------------------------------------------


def _https(
    port: int, ctx: ssl.SSLContext, requests: list[tuple[str, str, dict[str, str], bytes]]
) -> tuple[str | None, list[Resp]]:
    """Requests (method, target, headers, body) with http.client over TLS; the ALPN protocol
    of the first connection, and the responses."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=TIMEOUT)
    out = []
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        alpn = conn.sock.selected_alpn_protocol()
        for method, target, headers, body in requests:
            conn.request(method, target, body=body or None, headers=headers)
            r = conn.getresponse()
            out.append(Resp(r.status, r.reason, [(k.lower(), v) for k, v in r.getheaders()], r.read()))
    finally:
        conn.close()
    return alpn, out


async def test_the_gateway_over_tls(procs: Procs, tmp_path: Path) -> None:
    keys = make_keys(tmp_path, alice=["connect"])
    alice = key_env(keys["alice"])
    ca, cert, key = tls_files(tmp_path, "relay.test", ["127.0.0.1"])
    async with http_echo() as echo:
        relay = await procs.start(
            node_args("127.0.0.1", "--allow", "127.0.0.0/8", "--tls-cert", str(cert), "--tls-key", str(key)),
            secure=True,
        )
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.set_alpn_protocols(["h2", "http/1.1"])  # as a browser offers them
        host = f"127.0.0.1:{relay.port}"
        route = {"HN-Route": echo.endpoint}
        form = urlencode({"key": alice, "next": "/back"}).encode()
        alpn, (no_key, ok, login) = await asyncio.to_thread(_https, relay.port, ctx, [
            ("GET", "/tls", route, b""),
            ("GET", "/tls?k=1", {**route, "Authorization": f"Bearer {alice}"}, b""),
            ("POST", "/.hn/login", {"Content-Type": "application/x-www-form-urlencoded"}, form),
        ])  # fmt: skip
    assert alpn == "http/1.1"
    assert (no_key.status, no_key.header("hn-error")) == (401, "401 unauthorized")
    assert (ok.status, ok.echo["path"]) == (200, "/tls?k=1")
    assert ok.seen_headers == [("host", host), ("accept-encoding", "identity"), *forwarded(host, proto="https")]
    assert (login.status, login.header("location")) == (303, "/back")
    assert login.header("set-cookie") == f"hn-key={alice}; Path=/; HttpOnly; SameSite=Strict; Secure; Max-Age=86400"
    assert echo.connections == 1
