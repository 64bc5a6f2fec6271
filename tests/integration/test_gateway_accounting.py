"""The gateway gives a listener's sessions back: each client connection through it is one of
the listener's sessions while it lasts, with its bytes, and no more once it ended (a bench
found the count only ever grew, until the listener refused everyone at its cap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from homenet.node.auth import Credentials
from homenet.node.keys import client_key
from tests.conftest import StartNode
from tests.helpers import NodeProc, node_args, spawn
from tests.integration.fleet_support import listener_records, until
from tests.integration.gateway_support import client, http_echo

pytestmark = pytest.mark.timeout(60)

CONNECTIONS = 12


def _admin(node: NodeProc) -> Credentials:
    found = client_key(key_file=str(node.stderr_path.parent / "state" / "keys.toml"), env={})
    assert found is not None
    return Credentials(*found)


async def test_gateway_connections_are_the_listener_s_sessions_and_end(start_node: StartNode, tmp_path: Path) -> None:
    relay = await start_node(args=node_args("127.0.0.1", "--max-listener-sessions", "5"))
    admin = _admin(relay)
    async with http_echo() as echo:
        home = await spawn(
            ["rl", relay.url, "--to", f"127.0.0.1:{echo.port}", "--listen-id", "web",
             "--state-dir", str(tmp_path / "web")],
            tmp_path / "web-proc", ready="LISTENING ",
        )  # fmt: skip
        try:
            for i in range(CONNECTIONS):  # more than the listener's cap, one after another
                async with client(relay.port) as c:
                    resp = await c.request(
                        "POST", f"/n{i}", [("host", "x"), ("hn-route", "web"), ("content-length", "1000")], b"z" * 1000
                    )
                    assert resp.status == 200, (i, resp)

            async def given_back() -> bool:
                [rec] = [x for x in await listener_records(relay, admin) if x.listen_id == "web"]
                return rec.active_sessions == 0 and rec.total_sessions == CONNECTIONS

            await until("every gateway session given back", given_back)
            [rec] = [x for x in await listener_records(relay, admin) if x.listen_id == "web"]
            assert rec.bytes_up > CONNECTIONS * 1000
            assert rec.bytes_down > CONNECTIONS * 1000
        finally:
            await home.stop()


async def test_a_route_refused_further_on_gives_the_listener_s_session_back(
    start_node: StartNode, tmp_path: Path
) -> None:
    """home1 answers 502 for a closed port behind it: each such request held one of home1's
    sessions at the relay for good, until home1 refused everyone at its cap."""
    from tests.integration.rl_support import start_home
    from tests.integration.support import closed_port

    relay = await start_node(args=node_args("127.0.0.1", "--max-listener-sessions", "3"))
    admin = _admin(relay)
    await start_home(start_node, relay.url, tmp_path / "home")
    async with http_echo() as echo:
        with closed_port() as dead:
            for i in range(6):  # twice the cap
                async with client(relay.port) as c:
                    resp = await c.request("GET", f"/{i}", [("host", "x"), ("hn-route", f"home1/127.0.0.1:{dead}")])
                    assert resp.status == 502, (i, resp)
        async with client(relay.port) as c:
            resp = await c.request("GET", "/ok", [("host", "x"), ("hn-route", f"home1/127.0.0.1:{echo.port}")])
            assert resp.status == 200, resp

        async def given_back() -> bool:
            [rec] = [x for x in await listener_records(relay, admin) if x.listen_id == "home1"]
            return rec.active_sessions == 0 and rec.total_sessions == 7

        await until("every session given back", given_back)
