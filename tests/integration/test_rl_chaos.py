"""Remote Listen when processes die, freeze or stop: relays and home nodes come back by themselves.

Bounds come from the product's defaults: reconnect backoff capped at 1.5 s (rl_backoff_max),
a relay pings every --ping-interval seconds and a listener drops a stream silent for three
intervals, the relay keeps an offline listenId for its owner for 60 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.helpers import echo_server
from tests.integration.rl_support import (
    by_id,
    hnctl,
    home_args,
    list_listeners,
    log_lines,
    pool_full,
    relisten,
    settled_fds,
    start_home,
    two_hop_request,
    wait_fds_back,
    wait_listeners,
    wait_log,
)
from tests.integration.support import TIMEOUT, closed_port, homenet, refused_reply, request

#: Seconds a listener may take to be back once its relay (or itself) is up again:
#: at most one backoff step (capped at 1.5 s) plus a registration round trip.
BACK_WITHIN = 2.0


async def assert_clients_work(url: str, text: str) -> None:
    """A real ``homenet connect`` through ``url`` to a fresh echo target, byte-exact."""
    async with echo_server() as echo:
        r = await homenet("connect", f"{url}/{echo.endpoint}", "--data", text)
    assert (r.code, r.stdout, r.stderr) == (0, text.encode(), ""), r


async def test_relay_killed_and_restarted_on_its_port(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    home, url = await start_home(nodes, relay.url, tmp_path / "home")
    await assert_clients_work(url, "before")
    await wait_listeners(relay, "the pool parked", pool_full("home1", 4))
    home_base = await settled_fds(home.proc.pid)

    await relay.stop(signal.SIGKILL)
    await wait_log(home, "rl.reconnecting")  # it noticed, and keeps trying
    again = await nodes("--port", str(relay.port))
    assert again.url == relay.url
    assert await relisten(home, BACK_WITHIN) == url  # same listenId, within 2 s of the relay's READY

    [rec] = by_id(await list_listeners(again), "home1")
    assert rec.state == "online"
    await assert_clients_work(url, "after the relay came back")
    # the failed attempts and the dead relay's connections left nothing open in the home
    await wait_listeners(again, "the pool parked again", pool_full("home1", 4))
    await wait_fds_back(home.proc.pid, home_base, "home after the relay came back")
    await home.stop()  # before the new relay: see stopped_in_reverse


@pytest.mark.parametrize("explicit_id", [True, False], ids=["listen-id", "random-id"])
async def test_home_killed_and_restarted_takes_its_id_back(nodes: StartNode, tmp_path: Path, explicit_id: bool) -> None:
    relay = await nodes()
    state = tmp_path / "home"
    lid = "home1" if explicit_id else None
    home, url = await start_home(nodes, relay.url, state, listen_id=lid)
    listen_id = url.rsplit("/", 1)[1]
    if not explicit_id:
        assert len(listen_id) >= 16, listen_id  # >= 96 random bits
    await wait_listeners(relay, "the pool parked", pool_full(listen_id, 4))
    relay_base = await settled_fds(relay.proc.pid)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await home.stop(signal.SIGKILL)
    # The relay learns of the death from the stream; a client that races it is dialed back
    # and left waiting (test_a_ticket_dies_with_its_session). Once it knows, answers are at once.
    await wait_listeners(relay, "the listener offline", lambda ls: by_id(ls, listen_id)[0].state == "offline")
    with closed_port() as port:
        reply, rest = await refused_reply(relay, two_hop_request(listen_id, f"127.0.0.1:{port}"))
    elapsed = loop.time() - t0
    assert (reply.code, reply.name, rest) == (503, "unavailable", b""), reply
    assert "offline" in reply.reason, reply
    assert elapsed < 1.0, f"'listener offline' took {elapsed:.2f}s after the kill"
    reply, _ = await refused_reply(relay, request("no-such-listener"))
    assert (reply.code, reply.name) == (404, "not-found"), reply
    # the relay let go of the dead node's stream and parked connections
    await wait_fds_back(relay.proc.pid, relay_base, "relay after the home died")

    if explicit_id:  # while its owner is away, nobody else may take the id
        impostor = await nodes(args=[*home_args(relay.url, tmp_path / "other", listen_id=lid), "--log-level", "error"])
        async with asyncio.timeout(TIMEOUT):
            assert await impostor.proc.wait() == 1
        assert "offline" in impostor.stderr(), impostor.stderr()

    back = await nodes(args=home_args(relay.url, state, listen_id=lid))  # same state dir, same flags
    assert await relisten(back, BACK_WITHIN) == url

    r = await hnctl(relay, "listeners", "--json")
    assert r.code == 0, r.stderr
    mine = [x for x in json.loads(r.stdout) if x["listen_id"] == listen_id]
    assert len(mine) == 1, mine
    assert mine[0]["state"] == "online"
    await assert_clients_work(url, "home again")
    await wait_listeners(relay, "the pool parked again", pool_full(listen_id, 4))
    await wait_fds_back(relay.proc.pid, relay_base, "relay after the home came back")


async def test_a_blackholed_relay_is_detected_and_left(nodes: StartNode, tmp_path: Path) -> None:
    """SIGSTOP the relay: its TCP connections stay open but nothing answers on them."""
    relay = await nodes("--ping-interval", "0.5")
    home, url = await start_home(nodes, relay.url, tmp_path / "home")
    await wait_listeners(relay, "the pool parked", pool_full("home1", 4))
    home_base = await settled_fds(home.proc.pid)
    assert log_lines(home, "rl.reconnecting") == []

    loop = asyncio.get_running_loop()
    os.kill(relay.proc.pid, signal.SIGSTOP)
    try:
        t0 = loop.time()
        line = await wait_log(home, "rl.reconnecting", timeout=10)
        detected = loop.time() - t0
        # 3 silent ping intervals (1.5 s), plus scheduling slack on a busy machine
        assert detected <= 1.5 + 0.75, f"took {detected:.2f}s to notice: {line}"
        assert "silent" in line, line
    finally:
        os.kill(relay.proc.pid, signal.SIGCONT)

    # the home's retry may be stuck in a registration the frozen relay never answered (5 s max)
    assert await relisten(home, 5.0 + 1.5 + BACK_WITHIN) == url
    [rec] = by_id(await list_listeners(relay), "home1")
    assert rec.state == "online"
    await assert_clients_work(url, "after the freeze")
    await wait_listeners(relay, "the pool parked again", pool_full("home1", 4))
    await wait_fds_back(home.proc.pid, home_base, "home after the freeze")


async def test_a_frozen_listener_is_dropped_by_the_relay(nodes: StartNode, tmp_path: Path) -> None:
    """SIGSTOP the home node: the relay stops hearing pongs and takes it offline (3 intervals)."""
    relay = await nodes("--ping-interval", "0.5")
    home, url = await start_home(nodes, relay.url, tmp_path / "home")
    await wait_listeners(relay, "the pool parked", pool_full("home1", 4))
    relay_base = await settled_fds(relay.proc.pid)

    loop = asyncio.get_running_loop()
    os.kill(home.proc.pid, signal.SIGSTOP)
    try:
        t0 = loop.time()
        await wait_listeners(relay, "home1 offline", lambda ls: by_id(ls, "home1")[0].state == "offline")
        dropped = loop.time() - t0
        # 3 intervals without a pong, checked once per interval, plus scheduling slack
        assert dropped <= 1.5 + 0.5 + 0.75, f"the relay took {dropped:.2f}s to drop a frozen listener"
        # its parked connections went with it: clients are told at once instead of hanging
        t1 = loop.time()
        reply, _ = await refused_reply(relay, request("home1"))
        assert reply.code == 503, reply
        assert loop.time() - t1 < 1.0
    finally:
        os.kill(home.proc.pid, signal.SIGCONT)

    assert await relisten(home, 1.5 + BACK_WITHIN) == url
    await assert_clients_work(url, "thawed")
    await wait_listeners(relay, "the pool parked again", pool_full("home1", 4))
    await wait_fds_back(relay.proc.pid, relay_base, "relay after the listener came back")


async def test_an_offline_id_is_held_for_its_owner_then_freed(
    nodes: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOMENET_OFFLINE_HOLD", "1.0")  # the relay's hold, shortened (processes inherit it)
    relay = await nodes()
    home, _ = await start_home(nodes, relay.url, tmp_path / "home")
    await home.stop(signal.SIGKILL)
    await wait_listeners(relay, "home1 offline", lambda ls: by_id(ls, "home1")[0].state == "offline")
    reply, _ = await refused_reply(relay, request("home1"))
    assert reply.code == 503, reply

    # after the hold the id is forgotten: clients get 404, and another node may claim it
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while (await refused_reply(relay, request("home1")))[0].code != 404:
        assert loop.time() - t0 < 1.0 + 3.0, "the offline hold never ended"
        await asyncio.sleep(0.1)
    _, url = await start_home(nodes, relay.url, tmp_path / "newcomer")
    assert url == f"{relay.url}/home1"


async def test_sigterm_on_a_relay_lets_its_listeners_go_at_once(nodes: StartNode, tmp_path: Path) -> None:
    relay = await nodes()
    home, _ = await start_home(nodes, relay.url, tmp_path / "home")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    relay.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(3.0):
            code = await relay.proc.wait()
    finally:
        if relay.proc.returncode is None:  # do not make the teardown wait the grace out
            relay.proc.kill()
            await relay.proc.wait()
    assert code == 0
    await wait_log(home, "rl.reconnecting", timeout=1.0)
    assert loop.time() - t0 < 3.0
