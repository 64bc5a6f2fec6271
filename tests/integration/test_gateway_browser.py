"""A home's web page in a real browser through the HTTP gateway (issue 14): Debian's headless Chromium.

The target is Python's own ``http.server`` (``python -m http.server``'s handler, in a thread on
127.0.0.1) serving a page, a PNG the test draws, a script and a text file from a directory; the
same server answers ``/ws`` with a WebSocket echo (wsproto's frames), so the page's WebSocket
is same-origin, as a real app's would be. A relay with ``--http-domain relay.test``, a home node
``home1`` remote-listening on it, and two ``homenet rl`` forwarders to the server: ``web`` on
home1 and ``web`` on the relay itself.

Chromium maps ``*.relay.test`` to 127.0.0.1 (``--host-resolver-rules``; every other name fails)
and loads the page three times: by host name behind the home node
(``http://web.home1.relay.test:PORT/``), by host name of a listener of the relay
(``http://web.relay.test:PORT/``) and by path through the home node
(``http://127.0.0.1:PORT/hn/home1/127.0.0.1:WEB/index.html``, whose relative links stay under
the prefix and whose absolute one, ``/abs.txt``, follows the ``hn-route`` cookie). Each time
the test reads the rendered DOM (the image decoded at its size, the echo written by the page's
script, the WebSocket closed cleanly, the absolute link's text), the browser's network log
(only 127.0.0.1 was reached) and what the target received (``X-Forwarded-*`` set, nothing of
HomeNet's), and keeps a screenshot in test-artifacts/ (or ``$HOMENET_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import socket
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as WsFrames
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from tests.conftest import StartNode
from tests.helpers import NodeProc, node_args
from tests.integration.browser_support import MISSING, Browser, chromium, find_chromium
from tests.integration.gateway_support import Procs
from tests.integration.rl_support import start_home
from tests.integration.test_dashboard_browser import artifacts_dir, page_errors, png_size

pytestmark = pytest.mark.timeout(60)

DOMAIN = "relay.test"
WIDTH, HEIGHT = 800, 600
#: The picture the page shows: four coloured quarters, drawn by the test.
PIC_SIZE = (120, 80)
QUARTERS = ((230, 57, 70), (42, 157, 143), (38, 70, 83), (244, 162, 97))
ABS_TEXT = "reached by an absolute link"

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>HomeNet gateway test page</title>
<link rel="icon" href="data:,">
<style>
body { font: 16px sans-serif; margin: 24px; }
img { width: 240px; image-rendering: pixelated; border: 1px solid #888; }
dt { font-weight: bold; margin-top: 8px; }
dd { font-family: monospace; margin-left: 16px; }
</style>
</head>
<body>
<h1>Served from home</h1>
<img id="pic" src="pic.png" alt="the test picture">
<dl>
<dt>page</dt><dd id="where">(no script)</dd>
<dt>WebSocket echo</dt><dd id="echo">waiting</dd>
<dt>WebSocket close</dt><dd id="closed">open</dd>
<dt>/abs.txt</dt><dd id="abs">waiting</dd>
</dl>
<script src="app.js"></script>
</body>
</html>
"""

# relative URLs only, except /abs.txt: under /hn/ROUTE/ they stay under the prefix, and the
# absolute one must follow the hn-route cookie
APP_JS = """"use strict";
const show = (id, text) => { document.getElementById(id).textContent = text; };
show("where", location.href);
const url = new URL("ws", location.href);
url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const sock = new WebSocket(url);
sock.onopen = () => sock.send("hello from " + location.href);
sock.onmessage = (event) => { show("echo", event.data); sock.close(1000, "done"); };
sock.onclose = (event) => show("closed", event.code + (event.wasClean ? " clean" : " unclean"));
sock.onerror = () => console.error("WebSocket error on " + url);
fetch("/abs.txt")
  .then((r) => (r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status))))
  .then((text) => show("abs", text.trim()))
  .catch((err) => { show("abs", "failed: " + err.message); console.error("/abs.txt: " + err.message); });
"""

#: What the page shows, read off its DOM as JSON (the picture drawn on a canvas to read pixels).
READ_DOM = """(() => {
  const text = (id) => document.getElementById(id).textContent;
  const img = document.getElementById("pic");
  let pixels = null;
  if (img.complete && img.naturalWidth > 0) {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const at = (x, y) => [...ctx.getImageData(x, y, 1, 1).data.slice(0, 3)];
    const w = img.naturalWidth, h = img.naturalHeight;
    pixels = [at(w / 4, h / 4), at(3 * w / 4, h / 4), at(w / 4, 3 * h / 4), at(3 * w / 4, 3 * h / 4)];
  }
  return {
    title: document.title,
    where: text("where"),
    echo: text("echo"),
    closed: text("closed"),
    abs: text("abs"),
    img: {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, pixels: pixels},
  };
})()"""
#: The page's script is done: its WebSocket closed (or failed) and /abs.txt came (or failed).
DONE = (
    'document.getElementById("closed").textContent !== "open"'
    ' && document.getElementById("abs").textContent !== "waiting"'
)


def make_png(width: int, height: int) -> bytes:
    """An RGB PNG of four coloured quarters (:data:`QUARTERS`: top left, top right, bottom left, bottom right)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(QUARTERS[2 * (y >= height // 2) + (x >= width // 2)])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    pixels = zlib.compress(bytes(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -- the target: python -m http.server, plus a WebSocket echo at /ws -----------------------------------
@dataclass(frozen=True)
class Seen:
    """One request as the target received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{self.path}: {name} sent {len(values)} times: {values}"
        return values[0] if values else None


class Site(http.server.ThreadingHTTPServer):
    """``python -m http.server``'s server (a thread per connection), on 127.0.0.1; remembers what it got."""

    # a handler thread is joined by server_close(): everything the test starts, it stops
    daemon_threads = False

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(SiteHandler, directory=str(root)))
        self.seen: list[Seen] = []
        #: Close codes of the WebSocket closing handshakes the browser started.
        self.ws_closes: list[int] = []
        #: WebSocket connections open now (shut down if still open at the end).
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """The stock file handler (HTTP/1.0, a connection per request); ``GET /ws`` is a WebSocket echo."""

    server: Site
    #: Seconds a read may wait (a stuck connection cannot hold the test's teardown).
    timeout = 10.0

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's names
        pass  # the test checks what arrived; stderr stays quiet

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.seen.append(Seen(self.command, self.path, [(k.lower(), v) for k, v in self.headers.items()]))
        if self.path.split("?", 1)[0] == "/ws":
            self._websocket()
        else:
            super().do_GET()

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        upgrade = (self.headers.get("Upgrade") or "").lower() == "websocket"
        if not (upgrade and key and self.headers.get("Sec-WebSocket-Version") == "13"):
            self.send_error(400, "expected a WebSocket handshake")
            return
        self.close_connection = True
        # the 101 is written by hand: the stock handler would say HTTP/1.0
        accept = generate_accept_token(key.encode("ascii"))
        self.wfile.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        frames = WsFrames(ConnectionType.SERVER)
        text: list[str] = []
        with self.server.lock:
            self.server.live.add(self.connection)
        try:
            while True:
                data = self.rfile.read1(1 << 16)
                frames.receive_data(data or None)
                for event in frames.events():
                    if isinstance(event, TextMessage):
                        text.append(event.data)
                        if event.message_finished:
                            self.wfile.write(frames.send(TextMessage(data="".join(text))))
                            text.clear()
                    elif isinstance(event, BytesMessage):
                        self.wfile.write(frames.send(BytesMessage(data=event.data)))
                    elif isinstance(event, Ping):
                        self.wfile.write(frames.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        with self.server.lock:
                            self.server.ws_closes.append(event.code)
                        self.wfile.write(frames.send(event.response()))
                        return  # the server closes the TCP connection first (RFC 6455 7.1.1)
                if not data:
                    return
        finally:
            with self.server.lock:
                self.server.live.discard(self.connection)


@contextlib.asynccontextmanager
async def serve_site(root: Path) -> AsyncIterator[Site]:
    """Serve ``root`` (and /ws) on 127.0.0.1 until the block ends; every thread is joined."""
    site = Site(root)
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, name="site")
    thread.start()
    try:
        yield site
    finally:
        async with asyncio.timeout(15.0):
            await asyncio.to_thread(site.shutdown)
            with site.lock:
                for sock in site.live:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # a WebSocket still open ends now
            await asyncio.to_thread(site.server_close)  # joins the handler threads
            await asyncio.to_thread(thread.join)


# -- one page load -------------------------------------------------------------------------------------
@dataclass
class Load:
    """A way to name the route: the URL Chromium loads, and the paths the target must see."""

    name: str
    url: str
    #: The Host (and X-Forwarded-Host) the target sees.
    host: str
    #: The target's path of the page (``/`` serves index.html).
    page_path: str
    #: The hn-route cookie the gateway sets (path prefix only).
    route_cookie: str | None = None

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Visit:
    """What one load showed, sent and received."""

    dom: dict[str, Any]
    errors: list[str]
    requests: list[str]
    websockets: list[str]
    responses: list[dict[str, Any]]
    handshakes: list[dict[str, Any]]
    cookies: list[dict[str, Any]]
    #: The Cookie header the browser sent, by URL (DevTools' requestWillBeSentExtraInfo).
    sent_cookies: dict[str, str | None]
    pic: bytes
    seen: list[Seen]


async def visit(browser: Browser, load: Load, site: Site) -> Visit:
    """Load ``load.url`` in a new tab, wait until its script is done, keep its screenshot."""
    first = len(site.seen)
    page = await browser.open(load.url, WIDTH, HEIGHT)
    try:
        await page.until("the WebSocket closed and /abs.txt read", DONE)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {await page.evaluate(READ_DOM)} errors={page_errors(page)}") from None
    dom: dict[str, Any] = await page.evaluate(READ_DOM)
    (artifacts_dir() / f"gateway-{load.name}.png").write_bytes(await page.screenshot())
    responses = [e["response"] for e in page.events("Network.responseReceived")]
    pic_ids = [e["requestId"] for e in page.events("Network.responseReceived") if e["response"]["url"].endswith(".png")]
    pic = b""
    if pic_ids:
        got = await page.call("Network.getResponseBody", {"requestId": pic_ids[0]})
        pic = base64.b64decode(got["body"]) if got["base64Encoded"] else got["body"].encode()
    cookies = (await page.call("Network.getCookies", {"urls": [load.url]}))["cookies"]
    info = await page.call("Target.getTargetInfo")
    await browser.call("Target.closeTarget", {"targetId": info["targetInfo"]["targetId"]})
    urls = {e["requestId"]: e["request"]["url"] for e in page.events("Network.requestWillBeSent")}
    sent_cookies = {
        urls[e["requestId"]]: next((v for k, v in e["headers"].items() if k.lower() == "cookie"), None)
        for e in page.events("Network.requestWillBeSentExtraInfo")
        if e["requestId"] in urls
    }
    return Visit(
        dom=dom,
        errors=page_errors(page),
        requests=[e["request"]["url"] for e in page.events("Network.requestWillBeSent")],
        websockets=[e["url"] for e in page.events("Network.webSocketCreated")],
        responses=responses,
        handshakes=[e["response"] for e in page.events("Network.webSocketHandshakeResponseReceived")],
        cookies=cookies,
        sent_cookies=sent_cookies,
        pic=pic,
        seen=site.seen[first:],
    )


def check(load: Load, got: Visit, png: bytes, browser: Browser) -> None:
    """What the browser rendered and reached, and what the target received, for one load."""
    prefix = load.url.rsplit("/", 1)[0] + "/"  # the page's directory: relative links stay in it
    ws_url = "ws" + prefix[len("http") :] + "ws"
    dom = got.dom
    # the rendered page
    assert dom["title"] == "HomeNet gateway test page", dom
    assert dom["where"] == load.url, dom
    assert dom["echo"] == f"hello from {load.url}", f"no WebSocket echo: {dom}"
    assert dom["closed"] == "1000 clean", dom
    assert dom["abs"] == ABS_TEXT, f"the absolute link failed: {dom}"
    img = dom["img"]
    assert img["complete"], dom
    assert (img["width"], img["height"]) == png_size(png) == PIC_SIZE, dom
    assert img["pixels"] == [list(c) for c in QUARTERS], f"the picture decoded wrong: {dom}"
    assert got.pic == png, "the browser received other bytes than the PNG"
    assert got.errors == [], got.errors

    # what the browser reached: this origin only, on 127.0.0.1, every answer a 200, one 101
    wanted = [load.url, prefix + "pic.png", prefix + "app.js", load.origin + "/abs.txt"]
    assert sorted(got.requests) == sorted(wanted), got.requests
    assert got.websockets == [ws_url], got.websockets
    assert all(browser.reaches_loopback(u) for u in got.requests + got.websockets)
    answers = sorted((r["url"], r["status"], r["remoteIPAddress"]) for r in got.responses)
    assert answers == sorted((u, 200, "127.0.0.1") for u in wanted), got.responses
    assert [h["status"] for h in got.handshakes] == [101], got.handshakes
    assert set(got.sent_cookies) == set(wanted), got.sent_cookies
    if load.route_cookie is None:
        assert got.cookies == [], got.cookies
        assert set(got.sent_cookies.values()) == {None}, got.sent_cookies
    else:
        ((cookie,),) = [got.cookies]
        want = ("hn-route", load.route_cookie, "/", True, "Lax")
        assert (cookie["name"], cookie["value"], cookie["path"], cookie["httpOnly"], cookie["sameSite"]) == want
        # the browser sends it with every request after the page's: the target must not see it
        after_page = {u: c for u, c in got.sent_cookies.items() if u != load.url}
        assert after_page == dict.fromkeys(wanted[1:], f"hn-route={load.route_cookie}"), got.sent_cookies

    # what the target received: the same five requests, forwarded, with nothing of HomeNet's
    paths = sorted(s.path for s in got.seen)
    assert paths == sorted([load.page_path, "/pic.png", "/app.js", "/abs.txt", "/ws"]), paths
    for s in got.seen:
        where = f"{load.name} {s.path}: {s.headers}"
        assert s.method == "GET", where
        assert s.one("host") == load.host, where
        assert s.one("x-forwarded-for") == "127.0.0.1", where
        assert s.one("x-forwarded-proto") == "http", where
        assert s.one("x-forwarded-host") == load.host, where
        assert not [k for k, _ in s.headers if k.startswith("hn-")], where
        assert s.all("cookie") == [], f"a cookie reached the target (the browser's only one is HomeNet's): {where}"
        assert s.all("authorization") == [], where
    (ws,) = [s for s in got.seen if s.path == "/ws"]
    assert ws.one("upgrade") == "websocket", ws.headers
    assert "upgrade" in (ws.one("connection") or "").lower(), ws.headers
    assert ws.one("origin") == load.origin, ws.headers


def _start_at(procs: Procs, tier: int) -> StartNode:
    """``procs.start`` in the shape rl_support's helpers call (``start(args=[...])``)."""

    async def start(*, args: list[str]) -> NodeProc:
        return await procs.start(args, tier=tier)

    return start


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    """Real ``homenet`` processes of the test; all are stopped at teardown, listeners first."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        await p.stop_all()


def write_site(root: Path, png: bytes) -> None:
    root.mkdir()
    (root / "index.html").write_text(INDEX_HTML)
    (root / "app.js").write_text(APP_JS)
    (root / "pic.png").write_bytes(png)
    (root / "abs.txt").write_text(ABS_TEXT + "\n")


def _loads(relay: NodeProc, site: Site) -> Iterator[Load]:
    port = relay.port
    behind_home = f"web.home1.{DOMAIN}:{port}"
    yield Load("host", f"http://{behind_home}/", behind_home, "/")
    on_relay = f"web.{DOMAIN}:{port}"
    yield Load("host-listener", f"http://{on_relay}/", on_relay, "/")
    route = f"home1/{site.endpoint}"
    local = f"127.0.0.1:{port}"
    yield Load("path", f"http://{local}/hn/{route}/index.html", local, "/index.html", quote(route, safe=""))


async def test_a_home_page_with_an_image_and_a_websocket_in_chromium(procs: Procs, tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip(MISSING)
    png = make_png(*PIC_SIZE)
    write_site(tmp_path / "site", png)
    async with serve_site(tmp_path / "site") as site:
        relay = await procs.start(node_args("127.0.0.1", "--http-domain", DOMAIN))
        on_relay = ["rl", relay.url, "--to", site.endpoint, "--listen-id", "web", "--state-dir", str(tmp_path / "w1")]
        (home, home_url), rl = await asyncio.gather(
            start_home(_start_at(procs, 1), relay.url, tmp_path / "home1"),
            procs.start(on_relay, ready="LISTENING ", tier=1),
        )
        assert (home_url, rl.url) == (f"{relay.url}/home1", f"{relay.url}/web")
        on_home = ["rl", home.url, "--to", site.endpoint, "--listen-id", "web", "--state-dir", str(tmp_path / "w2")]
        nested = await procs.start(on_home, ready="LISTENING ", tier=2)
        assert nested.url == f"{home.url}/web"

        async with chromium(binary, tmp_path / "browser", loopback_names=[f"*.{DOMAIN}"]) as browser:
            for load in _loads(relay, site):
                check(load, await visit(browser, load, site), png, browser)
        # each close was recorded before the target answered it, so before the page showed it
        assert site.ws_closes == [1000, 1000, 1000], site.ws_closes
