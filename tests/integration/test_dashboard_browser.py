"""The dashboard in a real browser: Debian's headless Chromium against a relay with traffic.

A relay (``--metrics-bind 127.0.0.1:0``) with a home remote-listening on it and two sessions
held open to an echo server, one direct and one through the listener. Chromium loads the admin
address; the test reads the DOM the page's script rendered (node, listener, sessions, traffic,
fleet, no error), keeps a screenshot, then closes one session and waits for the same page, never
reloaded, to show it gone on its next poll. The browser may load only http://127.0.0.1 URLs,
and the test checks that it did.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from homenet.node.preamble import Verb, encode_request
from tests.conftest import StartNode
from tests.helpers import echo_server, node_args
from tests.integration.browser_support import MISSING, Page, chromium, find_chromium
from tests.integration.rl_support import start_home, two_hop_request
from tests.integration.support import Conn, node_conn
from tests.integration.test_metrics import admin_url

pytestmark = pytest.mark.timeout(60)

WIDTH, HEIGHT = 1280, 900
REPO = Path(__file__).resolve().parents[2]

#: What the page shows, read off its DOM as JSON.
READ_DOM = """(() => {
  const text = (el) => el ? el.textContent.trim() : null;
  const table = (id) => [...document.querySelectorAll("#" + id + " tbody tr")].map(
    (tr) => ({cls: tr.className, cells: [...tr.cells].map(text)}));
  const facts = (id) => Object.fromEntries(
    [...document.querySelectorAll("#" + id + " dd")].map((dd) => [dd.dataset.key, text(dd)]));
  const error = document.getElementById("error");
  return {
    title: document.title,
    name: text(document.getElementById("node-name")),
    summary: text(document.getElementById("summary")),
    error: {text: text(error), shown: !error.hidden && error.getClientRects().length > 0},
    node: facts("node"),
    traffic: facts("traffic"),
    listeners: table("listeners"),
    sessions: table("sessions"),
    peers: table("peers"),
    styled: getComputedStyle(document.querySelector("table")).borderCollapse === "collapse",
    updated: Number(document.body.dataset.updated || 0),
    mark: window.homenetTestMark || null,
  };
})()"""


def artifacts_dir() -> Path:
    """``$HOMENET_TEST_ARTIFACTS``, else ``<repo>/test-artifacts`` (kept after the run, ignored by git)."""
    out = Path(os.environ.get("HOMENET_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (its IHDR chunk), after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR", data[:32]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def echoed(conn: Conn, replies: int, payload: bytes) -> None:
    """``replies`` reply lines (200 each), then ``payload`` back from the echo server."""
    for _ in range(replies):
        assert (await conn.reply()).code == 200
    assert await conn.exactly(len(payload)) == payload


async def dom(page: Page) -> dict[str, Any]:
    got: dict[str, Any] = await page.evaluate(READ_DOM)
    return got


def page_errors(page: Page) -> list[str]:
    """Script exceptions, console errors and error log entries of the tab (CSP violations among them).

    The browser's own request for /favicon.ico (the node serves none) is not the page's error.
    """
    out = [str(e["exceptionDetails"]) for e in page.events("Runtime.exceptionThrown")]
    out += [str(e["args"]) for e in page.events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
    out += [
        f"{e['entry'].get('url', '')}: {e['entry']['text']}"
        for e in page.events("Log.entryAdded")
        if e["entry"]["level"] == "error" and not e["entry"].get("url", "").endswith("/favicon.ico")
    ]
    return out


async def test_the_dashboard_renders_and_refreshes_in_chromium(nodes: StartNode, tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip(MISSING)
    async with echo_server() as echo:
        relay = await nodes(
            args=node_args(
                "127.0.0.1", "--name", "dash-relay", "--allow", "127.0.0.0/8", "--metrics-bind", "127.0.0.1:0"
            )
        )
        _, url = await start_home(nodes, relay.url, tmp_path / "home")
        listen_id = url.rsplit("/", 1)[1]
        base = await admin_url(relay)
        direct, via_home = await node_conn(relay), await node_conn(relay)
        try:
            await direct.send(encode_request(Verb.CONNECT, echo.endpoint) + b"direct")
            await echoed(direct, 1, b"direct")
            await via_home.send(two_hop_request(listen_id, echo.endpoint) + b"via home")
            await echoed(via_home, 2, b"via home")

            async with chromium(binary, tmp_path / "browser") as browser:
                page = await browser.open(base, WIDTH, HEIGHT)
                await page.until("the node's state", "Number(document.body.dataset.updated || 0) > 0")
                first = await dom(page)
                shot = await page.screenshot()
                artifact = artifacts_dir() / "dashboard.png"
                artifact.write_bytes(shot)

                assert (first["name"], first["title"]) == ("dash-relay", "HomeNet dash-relay"), first
                assert first["summary"] == "2 sessions open · 1 listener · serving", first
                assert first["error"] == {"text": "", "shown": False}, first
                assert first["styled"], "dashboard.css did not apply (blocked by the CSP?)"
                assert first["node"]["address"] == relay.url, first
                assert first["node"]["state"] == "serving", first
                assert first["traffic"]["sessions open"] == "2", first
                assert first["traffic"]["sessions total"] == "2", first
                assert first["traffic"]["refused"] == "0", first
                assert [r["cells"][:2] for r in first["listeners"]] == [[listen_id, "online"]], first
                assert sorted(r["cells"][2] for r in first["sessions"]) == sorted([echo.endpoint, listen_id]), first
                assert first["peers"] == [{"cls": "empty", "cells": ["not in a fleet"]}], first

                # live: one session ends, and the same page (never reloaded) shows it on its next poll
                await page.evaluate("window.homenetTestMark = 'not reloaded'")
                await direct.close()
                await page.until(
                    "one session open",
                    "document.querySelector('#traffic dd[data-key=\"sessions open\"]').textContent === '1'",
                )
                second = await dom(page)
                assert second["mark"] == "not reloaded", second
                assert second["updated"] > first["updated"], second
                assert second["summary"] == "1 session open · 1 listener · serving", second
                assert [r["cells"][2] for r in second["sessions"]] == [listen_id], second
                assert second["traffic"]["sessions total"] == "2", second
                assert second["error"] == {"text": "", "shown": False}, second

                requested = [e["request"]["url"] for e in page.events("Network.requestWillBeSent")]
                documents = [e for e in page.events("Network.requestWillBeSent") if e["type"] == "Document"]
                assert page_errors(page) == []
        finally:
            await direct.close()
            await via_home.close()

    assert requested, "the browser made no request"
    assert all(u.startswith(base) for u in requested), f"the page loaded something off its node: {requested}"
    assert {base, base + "dashboard.css", base + "dashboard.js", base + "api/state"} <= set(requested), requested
    assert len(documents) == 1, "the page reloaded instead of refreshing in place"
    assert png_size(shot) == (WIDTH, HEIGHT), png_size(shot)
    assert len(shot) > 16 * 1024, f"{artifact} is {len(shot)} bytes: blank?"
