"""The fleet's core: the fleet key, a relay's own feed, its view of its peers, and the relay
rules that keep one owner per listenId (values in, verdicts out; no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from homenet.node.address import Endpoint, ListenId
from homenet.node.errors import Code, RouteError
from homenet.node.fleet import MISS_TTL, Entry, Fleet, FleetDirectory, FleetKey, LocalFeed, Owner
from homenet.node.keys import KeyStore, Secret
from homenet.node.limits import SourceLimiter
from homenet.node.listeners import ListenerConflict, PoolGrant
from homenet.node.relay import Registration, Relay, RelaySettings

A, B = Endpoint("127.0.0.21", 7000), Endpoint("127.0.0.22", 7000)
KEY = FleetKey("fleet", Secret("s" * 32))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the fleet key --------------------------------------------------------------------------------
def test_a_resumption_secret_is_the_same_on_every_relay_and_unique_per_id() -> None:
    again = FleetKey("fleet", Secret("s" * 32))
    assert KEY.resume_secret("home1") == again.resume_secret("home1")
    assert KEY.resume_secret("home1") != KEY.resume_secret("home2")
    assert FleetKey("fleet", Secret("t" * 32)).resume_secret("home1") != KEY.resume_secret("home1")
    assert len(KEY.resume_secret("home1")) == 32


def test_the_fleet_key_is_looked_up_by_its_id_only() -> None:
    key = KEY.get("fleet")
    assert key is not None
    assert key.allows("fleet")
    assert not key.allows("admin")
    assert KEY.get("admin") is None


def test_a_fleet_key_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    path.write_text("fleet:" + "k" * 32 + "\n")
    assert FleetKey.load(str(path)).resume_secret("x") == FleetKey("fleet", Secret("k" * 32)).resume_secret("x")


# -- a relay's own feed ---------------------------------------------------------------------------------
async def test_a_watcher_gets_a_snapshot_then_the_changes() -> None:
    feed = LocalFeed()
    feed.upsert(Entry("a", 1, True))
    sub = feed.subscribe()
    assert sub.snapshot == [Entry("a", 1, True)]
    feed.upsert(Entry("b", 2, True))
    feed.remove("a")
    feed.remove("never-there")  # nothing to tell
    assert await sub.changes.get() == ([Entry("b", 2, True)], [])
    assert await sub.changes.get() == ([], ["a"])
    assert sub.changes.empty()
    feed.unsubscribe(sub)
    feed.upsert(Entry("c", 3, True))
    assert sub.changes.empty()


async def test_a_watcher_that_falls_behind_is_cut_and_starts_over() -> None:
    feed = LocalFeed(queue_limit=3)
    sub = feed.subscribe()
    for i in range(10):
        feed.upsert(Entry(f"l{i}", i, True))
    assert sub.cut
    items = [sub.changes.get_nowait() for _ in range(sub.changes.qsize())]
    assert items[-1] is None  # the end of this watch: the peer resyncs from a fresh snapshot
    assert len(items) == 4


# -- what a relay knows of its peers ---------------------------------------------------------------
def test_a_peer_s_entries_follow_its_watch() -> None:
    d = FleetDirectory("me")
    assert d.up(A, "relay-a", 1, "a")
    d.snapshot(A, [Entry("h1", 10, True), Entry("h2", 11, False)])
    owner = d.lookup("h1")
    assert owner is not None
    assert (owner.relay_id, owner.target, owner.entry.online) == ("relay-a", A, True)
    lookup = d.lookup("h2")
    assert lookup is not None
    assert not lookup.entry.online
    d.delta(A, [Entry("h3", 12, True)], ["h1"])
    assert d.lookup("h1") is None
    assert d.lookup("h3") is not None


def test_of_two_peers_the_newest_online_registration_wins() -> None:
    d = FleetDirectory("me")
    d.up(A, "relay-a", 1, "a")
    d.up(B, "relay-b", 1, "b")
    d.snapshot(A, [Entry("h1", 10, True)])
    d.snapshot(B, [Entry("h1", 20, True)])
    owner = d.lookup("h1")
    assert owner is not None
    assert owner.relay_id == "relay-b"
    d.delta(B, [Entry("h1", 20, False)], [])  # the newer one is offline: the online one is reachable
    owner = d.lookup("h1")
    assert owner is not None
    assert owner.relay_id == "relay-a"


def test_a_dead_watch_makes_its_listeners_moving_for_a_while() -> None:
    clock = Clock()
    d = FleetDirectory("me", moving_hold=5.0, clock=clock)
    d.up(A, "relay-a", 1, "a")
    d.snapshot(A, [Entry("h1", 10, True), Entry("off", 11, False)])
    d.down(A, "reset")
    assert d.lookup("h1") is None
    assert d.moving("h1")
    assert d.moving("off")  # held for its reconnecting listener: that one goes elsewhere too
    assert d.known("h1")
    assert d.moving_count() == 2
    clock.now += 6
    assert not d.moving("h1")
    assert not d.known("h1")


def test_a_listener_seen_again_elsewhere_stops_moving() -> None:
    d = FleetDirectory("me")
    d.up(A, "relay-a", 1, "a")
    d.snapshot(A, [Entry("h1", 10, True)])
    d.down(A, "reset")
    d.up(B, "relay-b", 1, "b")
    d.snapshot(B, [Entry("h1", 20, True)])
    assert not d.moving("h1")
    owner = d.lookup("h1")
    assert owner is not None
    assert owner.relay_id == "relay-b"


def test_a_relay_never_peers_with_itself_and_forgets_a_restarted_peer_s_entries() -> None:
    d = FleetDirectory("me")
    assert not d.up(A, "me", 1, "me")  # DNS named this very relay
    assert d.peers[A].state == "self"
    d.up(B, "relay-b", 1, "b")
    d.snapshot(B, [Entry("h1", 10, True)])
    d.up(B, "relay-b", 2, "b")  # a new epoch: it restarted and holds nothing it held
    assert d.lookup("h1") is None


def test_an_upsert_is_told_to_whoever_watches() -> None:
    d = FleetDirectory("me")
    seen: list[tuple[str, str]] = []
    d.on_upsert(lambda e, rid: seen.append((e.listen_id, rid)))
    d.up(A, "relay-a", 1, "a")
    d.snapshot(A, [Entry("h1", 10, True)])
    d.delta(A, [Entry("h2", 11, True)], [])
    assert seen == [("h1", "relay-a"), ("h2", "relay-a")]


async def test_a_miss_while_moving_is_the_retryable_code() -> None:
    d = FleetDirectory("me")
    d.up(A, "relay-a", 1, "a")
    d.snapshot(A, [Entry("h1", 10, True)])
    d.down(A, "reset")
    fleet = Fleet(KEY, "me-relay-id", d, LocalFeed())
    with pytest.raises(RouteError) as err:
        await fleet.locate(ListenId("h1"))
    assert err.value.code is Code.MOVING
    assert await fleet.locate(ListenId("nobody")) is None


# -- the relay's rules in a fleet -------------------------------------------------------------------
@pytest.fixture
def fleet_relay(tmp_path: Path) -> tuple[Relay, Fleet]:
    d = FleetDirectory("relay-me")
    fleet = Fleet(KEY, "relay-me-0123456789", d, LocalFeed())
    relay = Relay(SourceLimiter(), KeyStore(tmp_path / "keys.toml"), "relay-me", RelaySettings(rl_auth="open"), fleet)
    return relay, fleet


def _reg(listen_id: str, secret: str = "") -> Registration:
    return Registration(listen_id, secret, "", "", 1, "")


def test_registrations_are_announced_with_their_derived_secret(fleet_relay: tuple[Relay, Fleet]) -> None:
    relay, fleet = fleet_relay
    lst, session, secret = relay.register(_reg("h1"), "127.0.0.1:1")
    assert secret == KEY.resume_secret("h1")  # any relay of the fleet can check it
    assert fleet.feed.entries["h1"] == Entry("h1", lst.registered_at, True)
    relay.unregister(lst, session, "gone")
    assert fleet.feed.entries["h1"].online is False
    relay.kick("h1")
    assert "h1" not in fleet.feed.entries


async def test_tickets_name_their_relay(fleet_relay: tuple[Relay, Fleet]) -> None:
    relay, fleet = fleet_relay
    _, session, _ = relay.register(_reg("h1"), "127.0.0.1:1")
    event = await asyncio.wait_for(session.next_event(), 1)
    assert isinstance(event, PoolGrant)
    assert event.ticket.startswith(fleet.ticket_prefix + ".")


def test_a_listener_of_another_relay_moves_here_only_with_its_secret(fleet_relay: tuple[Relay, Fleet]) -> None:
    relay, fleet = fleet_relay
    fleet.directory.up(A, "relay-a", 1, "a")
    fleet.directory.snapshot(A, [Entry("h1", 10, True)])
    with pytest.raises(ListenerConflict, match="held by a live node on another relay of the fleet"):
        relay.register(_reg("h1", "not-the-secret"), "127.0.0.1:1")
    with pytest.raises(ListenerConflict):
        relay.register(_reg("h1"), "127.0.0.1:1")
    lst, _, _ = relay.register(_reg("h1", KEY.resume_secret("h1")), "127.0.0.1:1")
    assert lst.online


def test_a_newer_registration_elsewhere_closes_the_stale_one_here(fleet_relay: tuple[Relay, Fleet]) -> None:
    relay, fleet = fleet_relay
    lst, session, _ = relay.register(_reg("h1"), "127.0.0.1:1")
    fleet.directory.up(A, "relay-a", 1, "a")
    fleet.directory.snapshot(A, [Entry("h1", lst.registered_at - 5, True)])  # older: ours stays
    assert relay.registry.lookup("h1") is lst
    assert not session.closed
    fleet.directory.delta(A, [Entry("h1", lst.registered_at + 5, True)], [])  # newer: ours goes
    assert session.closed
    assert "newer registration on relay relay-a" in session.close_reason
    assert relay.registry.lookup("h1") is None
    assert "h1" not in fleet.feed.entries


async def test_misses_ask_the_peers_once_per_listen_id_and_then_rest_a_while() -> None:
    clock = Clock()
    d = FleetDirectory("me", clock=clock)
    asked: list[str] = []
    gate = asyncio.Event()

    async def ask(listen_id: str) -> Owner | None:
        asked.append(listen_id)
        await gate.wait()
        return Owner("relay-b", B, Entry(listen_id, 1, True)) if listen_id == "real" else None

    fleet = Fleet(KEY, "me-relay-id", d, LocalFeed(), ask=ask)
    waiting = [asyncio.ensure_future(fleet.locate(ListenId("made-up"))) for _ in range(5)]
    gate.set()
    assert await asyncio.gather(*waiting) == [None] * 5
    assert asked == ["made-up"]  # five clients, one question to the peers
    assert await fleet.locate(ListenId("made-up")) is None
    assert asked == ["made-up"]  # a miss rests for MISS_TTL
    clock.now += MISS_TTL + 0.1
    assert await fleet.locate(ListenId("made-up")) is None
    assert asked == ["made-up", "made-up"]
    owner = await fleet.locate(ListenId("real"))
    assert owner is not None
    assert owner.relay_id == "relay-b"
