"""A real headless Chromium for the dashboard's tests, driven over the DevTools protocol on a pipe.

Debian's ``chromium`` package is all it needs: no driver, no debugging port, no browser library
and no download. With ``--remote-debugging-pipe`` the browser reads commands on its descriptor 3
and writes answers and events on its descriptor 4, each one JSON text ended by a NUL byte.
The browser runs with the flags that keep it off the network (it would try to reach Google
otherwise), in a fresh profile, and pages may only be opened at http://127.0.0.1. Its host
resolver answers no name at all, except the test's own names that it maps to 127.0.0.1
(``--host-resolver-rules``; a test of host-name routing asks for ``*.relay.test``), and it uses
no proxy: whatever a page asks for, nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Where the dashboard's pages may come from: the node's admin address on loopback.
LOOPBACK = "http://127.0.0.1:"
#: The one address the browser may reach.
LOOPBACK_IP = "127.0.0.1"
#: Headless, and nothing of its own on the network: no sync, updates, field trials, QUIC or proxy.
FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI; the sandbox needs user namespaces CI may not have
    "--disable-gpu",
    "--disable-quic",
    "--no-proxy-server",  # an http_proxy of the environment would otherwise get the mapped names
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
#: Seconds for any one DevTools command (they answer in milliseconds).
CALL_TIMEOUT = 10.0
# descriptors 3 and 4 are where Chromium expects its pipe; sh moves them there (no preexec_fn)
_EXEC = 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2'
#: Why a browser test cannot run here (it names the package to install).
MISSING = (
    "Debian's chromium package is not installed (no chromium or chromium-browser on PATH, no "
    "$HOMENET_CHROMIUM): `./dev test` installs it when run as root with apt-get, or run "
    "`apt-get install chromium`"
)


def resolver_rules(loopback_names: Sequence[str]) -> str:
    """``--host-resolver-rules``: each of ``loopback_names`` (``*.relay.test``) is 127.0.0.1,
    any other name fails to resolve (first matching rule wins; 127.0.0.1 itself is left alone)."""
    for name in loopback_names:
        assert re.fullmatch(r"[A-Za-z0-9*.-]+", name), f"not a host pattern: {name!r}"
    mapped = [f"MAP {name} {LOOPBACK_IP}" for name in loopback_names]
    return "--host-resolver-rules=" + ", ".join([*mapped, "MAP * ~NOTFOUND", f"EXCLUDE {LOOPBACK_IP}"])


def find_chromium() -> str | None:
    """The browser to run: ``$HOMENET_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH."""
    return os.environ.get("HOMENET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class DevToolsError(Exception):
    """The browser refused a command, or a page's script threw."""


@dataclass
class Browser:
    """One Chromium process and its DevTools pipe."""

    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.WriteTransport
    #: Host patterns the browser resolves to 127.0.0.1 (see :func:`resolver_rules`).
    loopback_names: tuple[str, ...] = ()
    #: Events of every page, in order (``method`` and ``params``).
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: int = 0
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _pump: asyncio.Task[None] | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> dict[str, Any]:
        """Send one command; its result (raises :class:`DevToolsError` if the browser refused it)."""
        self._ids += 1
        msg: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        answer = self._pending[self._ids] = asyncio.get_running_loop().create_future()
        self.writer.write(json.dumps(msg).encode() + b"\0")
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await answer
        finally:
            self._pending.pop(msg["id"], None)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def _read(self) -> None:
        try:
            while raw := await self.reader.readuntil(b"\0"):
                msg = json.loads(raw[:-1])
                if "id" in msg:
                    fut = self._pending.get(msg["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    self.events.append(msg)
                    async with self._arrived:
                        self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the browser is gone
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DevToolsError("the browser closed its DevTools pipe"))

    def reaches_loopback(self, url: str) -> bool:
        """``url`` is http(s)/ws(s) to 127.0.0.1, or to a name this browser maps there."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        names = host == LOOPBACK_IP or any(fnmatchcase(host, p) for p in self.loopback_names)
        return parts.scheme in ("http", "https", "ws", "wss") and names

    async def open(self, url: str, width: int, height: int) -> Page:
        """A new tab of ``width`` x ``height`` CSS pixels showing ``url`` (loopback only)."""
        assert self.reaches_loopback(url), f"the browser may only load {LOOPBACK}... (or a mapped name), not {url}"
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.call(f"{domain}.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        nav = await page.call("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise DevToolsError(f"cannot load {url}: {nav['errorText']}")
        await page.event("Page.loadEventFired")
        return page


@dataclass
class Page:
    """One tab, attached to by its DevTools session."""

    browser: Browser
    session: str

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.call(method, params, self.session)

    def events(self, method: str) -> list[dict[str, Any]]:
        """This tab's events named ``method`` so far (their ``params``)."""
        return [
            e["params"] for e in self.browser.events if e.get("sessionId") == self.session and e["method"] == method
        ]

    async def event(self, method: str, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """The first event named ``method`` of this tab (waits for it)."""
        async with asyncio.timeout(timeout), self.browser._arrived:
            while not (seen := self.events(method)):
                await self.browser._arrived.wait()
        return seen[0]

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a script run in the page (awaited if it is a promise)."""
        out = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in out:
            raise DevToolsError(f"{expression!r} threw: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def until(self, what: str, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy (the page refreshes on its own timer)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not (value := await self.evaluate(expression)):
            if loop.time() > end:
                raise AssertionError(f"the page never showed {what} within {timeout:g} s")
            await asyncio.sleep(0.05)
        return value

    async def screenshot(self) -> bytes:
        """A PNG of the whole page (as tall as its content, at least the viewport)."""
        metrics = await self.call("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        viewport = metrics["cssLayoutViewport"]
        clip = {
            "x": 0,
            "y": 0,
            "width": viewport["clientWidth"],
            "height": max(size["height"], viewport["clientHeight"]),
            "scale": 1,
        }
        shot = await self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def chromium(binary: str, tmp: Path, *, loopback_names: Sequence[str] = ()) -> AsyncIterator[Browser]:
    """Run ``binary`` headless with a fresh profile under ``tmp``; closed (or killed) at the end.

    ``loopback_names`` (host patterns such as ``*.relay.test``) resolve to 127.0.0.1, every
    other name to nothing. Its own log goes to ``tmp/chromium.log``.
    """
    rules = resolver_rules(loopback_names)
    profile = tmp / "chromium-profile"
    profile.mkdir(parents=True)
    loop = asyncio.get_running_loop()
    cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads them on its fd 3
    out_r, out_w = os.pipe()  # the browser writes on its fd 4, we read
    reader = asyncio.StreamReader(limit=64 << 20, loop=loop)  # a screenshot comes as one message
    async with contextlib.AsyncExitStack() as stack:
        ours = [os.fdopen(out_r, "rb", 0), os.fdopen(cmd_w, "wb", 0)]
        for f in ours:
            stack.callback(f.close)  # closing twice is harmless: the transports close them too
        try:
            with (tmp / "chromium.log").open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", _EXEC, binary, *FLAGS, rules, f"--user-data-dir={profile}", "about:blank",
                    stdin=cmd_r, stdout=out_w, stderr=log, start_new_session=True,
                )  # fmt: skip
        finally:
            os.close(cmd_r)
            os.close(out_w)
        stack.push_async_callback(_stop, proc)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), ours[0]
        )
        stack.callback(read_transport.close)
        write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, ours[1])
        stack.callback(write_transport.close)
        browser = Browser(proc, reader, write_transport, tuple(loopback_names))
        browser._pump = pump = loop.create_task(browser._read())
        stack.push_async_callback(_finish, pump)
        try:
            await browser.call("Browser.getVersion")
            yield browser
        finally:
            with contextlib.suppress(DevToolsError, TimeoutError):
                await browser.call("Browser.close")
            await _stop(proc)  # before the pipes close (and again by the stack if we never got here)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Wait for the browser to exit (it was asked to close); kill its process group if it does not."""
    try:
        async with asyncio.timeout(10.0):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: the browser and its helpers
        await proc.wait()
    with contextlib.suppress(ProcessLookupError):  # a helper left behind in the group
        os.killpg(proc.pid, signal.SIGKILL)


async def _finish(pump: asyncio.Task[None]) -> None:
    pump.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pump
