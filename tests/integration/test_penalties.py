"""Failed logins count wherever they happen: a guessed ticket at a relay, and a bad key that
reaches a home through its relay (counted against the client's address, not the relay's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from homenet.node.auth import Credentials
from homenet.node.keys import KeyStore, Secret
from homenet.node.preamble import Verb, encode_request
from tests.conftest import StartNode
from tests.helpers import echo_server, spawn
from tests.integration.rl_support import start_home
from tests.integration.support import OK_REPLY, Reply, cli_env, dial, homenet, request

pytestmark = pytest.mark.timeout(60)


def signed(creds: Credentials, hop: str) -> bytes:
    return encode_request(Verb.CONNECT, hop, creds.token(f"HN/1 CONNECT {hop}"))


@pytest.mark.parametrize("verb", ["TICKET", "POOL"])
async def test_guessed_tickets_are_failed_logins(start_node: StartNode, verb: str) -> None:
    relay = await start_node("--penalty-threshold", "3")
    for _ in range(3):
        conn = await dial(relay.host, relay.port, source="127.0.0.11")
        try:
            await conn.send(f"HN/1 {verb} guessed-{verb.lower()}-ticket\n".encode())
            assert (await conn.reply()).code == 401
        finally:
            await conn.close()
    conn = await dial(relay.host, relay.port, source="127.0.0.11")
    try:
        blocked = await conn.reply()  # sent at accept
        assert (blocked.code, blocked.reason) == (429, "source blocked after repeated failed authentication")
    finally:
        await conn.close()


async def _via_home(relay_host: str, relay_port: int, source: str, line: bytes) -> tuple[Reply, Reply, bytes]:
    conn = await dial(relay_host, relay_port, source=source)
    try:
        await conn.send(request("home1") + line + b"ping")
        await conn.shutdown_write()
        first, second = await conn.reply(), await conn.reply()
        return first, second, await conn.until_eof()
    finally:
        await conn.close()


async def test_bad_keys_through_a_relay_count_against_the_client_at_the_home(
    start_node: StartNode, tmp_path: Path
) -> None:
    state = tmp_path / "home"
    state.mkdir()
    key = KeyStore(state / "keys.toml").add("alice", ["connect"])
    alice = Credentials(key.id, key.secret)
    forged = Credentials("alice", Secret("guessed-guessed-guessed-guessed"))
    relay = await start_node()
    await start_home(start_node, relay.url, state, "--connect-auth", "direct", "--penalty-threshold", "2")
    async with echo_server() as echo:
        for _ in range(2):
            hop_ok, refused, _ = await _via_home(relay.host, relay.port, "127.0.0.12", signed(forged, echo.endpoint))
            assert (hop_ok.raw, refused.code, refused.reason) == (OK_REPLY, 401, "bad credentials")
        # the home now refuses that client, even with a good key; the relay and other clients are fine
        hop_ok, blocked, _ = await _via_home(relay.host, relay.port, "127.0.0.12", signed(alice, echo.endpoint))
        assert (hop_ok.raw, blocked.code) == (OK_REPLY, 403)
        assert blocked.reason == "source blocked after repeated failed authentication"
        first, second, rest = await _via_home(relay.host, relay.port, "127.0.0.13", signed(alice, echo.endpoint))
        assert (first.raw, second.raw, rest) == (OK_REPLY, OK_REPLY, b"ping")


async def test_one_source_registers_a_bounded_number_of_anonymous_listeners(
    start_node: StartNode, tmp_path: Path
) -> None:
    relay = await start_node("--max-listeners-per-source", "2")  # the harness runs rl-auth open
    async with echo_server() as echo:
        homes = []
        try:
            for i in range(2):
                args = ["rl", relay.url, "--to", echo.endpoint, "--listen-id", f"anon{i}"]
                home = await spawn([*args, "--state-dir", str(tmp_path / f"anon{i}")], tmp_path / f"p{i}", "LISTENING ")
                homes.append(home)
            third = await homenet(
                "rl", relay.url, "--to", echo.endpoint, "--listen-id", "anon2", "--state-dir", str(tmp_path / "anon2"),
                env=cli_env(), timeout=20.0,
            )  # fmt: skip
            assert third.code == 1, third
            assert "this source holds 2 listeners already" in third.stderr, third.stderr
        finally:
            for h in homes:
                await h.stop()
