"""Fail closed: a target the node does not allow gets a 403 and never sees a connection."""

from __future__ import annotations

import contextlib

import pytest

from tests.conftest import StartNode
from tests.helpers import NodeProc, echo_server
from tests.integration.support import (
    OK_REPLY,
    connected,
    have_ipv6_loopback,
    refused_reply,
    request,
    stays,
    wait_status,
)

#: Node flags under which 127.0.0.x is NOT an allowed target. Broad rules never open loopback.
NOT_ALLOWED = {
    "no-allow": [],
    "other-net": ["--allow", "10.99.0.0/16"],
    "all-v4": ["--allow", "0.0.0.0/0"],
    "all-v6": ["--allow", "::/0"],
    "other-loopback": ["--allow", "127.0.0.2/32"],
}

#: Spellings of the listening servers' addresses (only spellings that, were the node to dial
#: them anyway, would still land on loopback: the test must never reach anything else).
SPELLINGS = {
    "ipv4": "127.0.0.1:{port}",
    "v4-mapped": "[::ffff:127.0.0.1]:{port}",
    "v4-mapped-hex": "[::ffff:7f00:1]:{port}",
    "localhost": "localhost:{port}",
}
SPELLINGS_V6 = {"ipv6-loopback": "[::1]:{port6}", "ipv6-loopback-long": "[0:0:0:0:0:0:0:1]:{port6}"}
needs_v6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.mark.parametrize("flags", NOT_ALLOWED.values(), ids=NOT_ALLOWED.keys())
async def test_refused_target_is_never_reached(start_node: StartNode, flags: list[str]) -> None:
    node = await start_node(*flags)
    spellings = list(SPELLINGS.values()) + (list(SPELLINGS_V6.values()) if have_ipv6_loopback() else [])
    async with contextlib.AsyncExitStack() as stack:
        v4 = await stack.enter_async_context(echo_server())
        v6 = await stack.enter_async_context(echo_server("::1")) if have_ipv6_loopback() else None

        def untouched() -> bool:
            return v4.connections == 0 and (v6 is None or v6.connections == 0)

        for spelling in spellings:
            hop = spelling.format(port=v4.port, port6=v6.port if v6 else 0)
            reply, rest = await refused_reply(node, request(hop) + b"payload that must go nowhere")
            assert (reply.code, reply.name) == (403, "forbidden"), (hop, reply)
            assert rest == b""
            assert untouched(), f"{hop} was reached by a refused request"
        # no event marks "a connection that never happens": watch the counters for a while
        await stays("a refused request reached a target", untouched)
    refusals = len(spellings)
    await wait_status(node, "refusals counted", lambda st: st.refused_sessions == refusals and st.total_sessions == 0)


async def _echo_via(node: NodeProc, hop: str) -> bytes:
    async with connected(node.host, node.port) as conn:
        await conn.send(request(hop) + b"x")
        await conn.shutdown_write()
        return await conn.until_eof()


async def test_allowing_one_loopback_address_opens_only_that_one(start_node: StartNode) -> None:
    """Control case for the test above: the same server is reachable once it is named exactly."""
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as allowed, echo_server("127.0.0.2") as other:
        for hop in (allowed.endpoint, f"[::ffff:127.0.0.1]:{allowed.port}", f"localhost:{allowed.port}"):
            assert await _echo_via(node, hop) == OK_REPLY + b"x", hop
        assert allowed.connections == 3
        reply, _ = await refused_reply(node, request(other.endpoint))
        assert reply.code == 403, reply
        await stays("127.0.0.2 was reached", lambda: other.connections == 0)


@needs_v6
async def test_ipv6_loopback_node_and_target(start_node: StartNode) -> None:
    """A node on [::1] serves both planes there and dials [::1] once allowed."""
    node = await start_node("--allow", "::1/128", bind="::1")
    assert node.url.startswith("hn://[::1]:"), node.url
    async with echo_server("::1") as echo, echo_server() as v4:
        assert await _echo_via(node, f"[::1]:{echo.port}") == OK_REPLY + b"x"
        reply, _ = await refused_reply(node, request(v4.endpoint))
        assert reply.code == 403, reply
        assert (echo.connections, v4.connections) == (1, 0)
    st = await wait_status(node, "the session closed", lambda st: st.total_sessions == 1 and st.active_sessions == 0)
    assert st.address == node.url
