"""Fail closed: a target the node does not allow gets a 403 and never sees a connection."""

from __future__ import annotations

import pytest

from tests.conftest import StartNode
from tests.helpers import echo_server
from tests.integration.support import OK_REPLY, connected, refused_reply, request, stays, wait_status

#: Node flags under which 127.0.0.x is NOT an allowed target. Broad rules never open loopback.
NOT_ALLOWED = {
    "no-allow": [],
    "other-net": ["--allow", "10.99.0.0/16"],
    "all-v4": ["--allow", "0.0.0.0/0"],
    "all-v6": ["--allow", "::/0"],
    "other-loopback": ["--allow", "127.0.0.2/32"],
}

#: Spellings of the listening server's address (only spellings that, were the node to dial
#: them anyway, would still land on 127.0.0.1: the test must never reach anything else).
SPELLINGS = {
    "ipv4": "127.0.0.1:{port}",
    "v4-mapped": "[::ffff:127.0.0.1]:{port}",
    "v4-mapped-hex": "[::ffff:7f00:1]:{port}",
    "localhost": "localhost:{port}",
}


@pytest.mark.parametrize("flags", NOT_ALLOWED.values(), ids=NOT_ALLOWED.keys())
async def test_refused_target_is_never_reached(start_node: StartNode, flags: list[str]) -> None:
    node = await start_node(*flags)
    async with echo_server() as target:
        for spelling in SPELLINGS.values():
            hop = spelling.format(port=target.port)
            reply, rest = await refused_reply(node, request(hop) + b"payload that must go nowhere")
            assert (reply.code, reply.name) == (403, "forbidden"), (hop, reply)
            assert rest == b""
            assert target.connections == 0, f"{hop} was reached by a refused request"
        # no event marks "a connection that never happens": watch the counter for a while
        await stays("a refused request reached the target", lambda: target.connections == 0)
    refusals = len(SPELLINGS)
    await wait_status(node, "refusals counted", lambda st: st.refused_sessions == refusals and st.total_sessions == 0)


async def test_allowing_one_loopback_address_opens_only_that_one(start_node: StartNode) -> None:
    """Control case for the test above: the same server is reachable once it is named exactly."""
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as allowed, echo_server("127.0.0.2") as other:
        async with connected(node.host, node.port) as conn:
            await conn.send(request(f"[::ffff:127.0.0.1]:{allowed.port}") + b"x")
            await conn.shutdown_write()
            assert await conn.until_eof() == OK_REPLY + b"x"
        assert allowed.connections == 1
        reply, _ = await refused_reply(node, request(other.endpoint))
        assert reply.code == 403, reply
        await stays("127.0.0.2 was reached", lambda: other.connections == 0)
