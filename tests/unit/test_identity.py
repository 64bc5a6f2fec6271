"""Listener identities: one state file per (relay route, role), an exclusive lock on each, the
relay's refusal of a takeover war, and a listen key's namespace (values in, verdicts out)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from homenet.control.errors import status_of
from homenet.control.rl import IdentityBusy, StateFile
from homenet.node.keys import KeyStore
from homenet.node.limits import SourceLimiter
from homenet.node.listeners import (
    WAR_HOLD,
    WAR_TAKEOVERS,
    WAR_WINDOW,
    ListenerForbidden,
    ListenerRegistry,
    TakeoverWar,
)
from homenet.node.relay import Registration, Relay, RelaySettings

URL = "hn://127.0.0.1:6969"


# -- one identity per role -----------------------------------------------------------------------
def test_each_role_on_one_relay_has_its_own_state_file(tmp_path: Path) -> None:
    node = StateFile(str(tmp_path), URL)
    a = StateFile(str(tmp_path), URL, "rl -> 127.0.0.1:8080")
    b = StateFile(str(tmp_path), URL, "rl -> 127.0.0.1:8081")
    a_named = StateFile(str(tmp_path), URL, "rl -> 127.0.0.1:8080", "web")
    paths = {f.path for f in (node, a, b, a_named)}
    assert len(paths) == 4
    # a home node keeps the file earlier versions wrote (keyed by the relay URL alone)
    assert node.path == tmp_path / "rl" / f"{hashlib.sha256(URL.encode()).hexdigest()[:16]}.json"
    assert StateFile(str(tmp_path), URL, "node", "home1").path == node.path
    a.save("Xk3", "s3cret")
    assert a.load() == ("Xk3", "s3cret")
    assert node.load() == ("", "")  # the other identities saw nothing
    assert b.load() == ("", "")


def test_a_second_holder_of_an_identity_is_told_who_holds_it(tmp_path: Path) -> None:
    first = StateFile(str(tmp_path), URL, "rl -> 127.0.0.1:8080")
    second = StateFile(str(tmp_path), URL, "rl -> 127.0.0.1:8080")
    first.acquire()
    try:
        with pytest.raises(IdentityBusy) as err:
            second.acquire()
        msg = str(err.value)
        assert f"is in use by process {os.getpid()}:" in msg
        assert msg.endswith("run this one with its own --state-dir or --listen-id")
        assert "\n" not in msg
        StateFile(str(tmp_path), URL).acquire()  # another role is another identity
    finally:
        first.release()
    second.acquire()  # free again once released (a killed process releases it too: flock)
    second.release()


def test_a_node_identity_names_only_the_state_dir_flag(tmp_path: Path) -> None:
    first, second = StateFile(str(tmp_path), URL), StateFile(str(tmp_path), URL)
    first.acquire()
    try:
        with pytest.raises(IdentityBusy, match=r"run this one with its own --state-dir$"):
            second.acquire()
    finally:
        first.release()


def test_no_state_dir_means_no_identity_to_lock(tmp_path: Path) -> None:
    f = StateFile("", URL)
    f.acquire()
    f.acquire()
    f.release()
    assert f.load() == ("", "")


# -- takeover wars ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LiveSession:
    closed = False


def _live(reg: ListenerRegistry, listen_id: str, secret: str) -> None:
    lst, _, _ = reg.claim(listen_id, secret)
    lst.session = LiveSession()  # type: ignore[assignment]


def test_repeated_takeovers_of_a_live_id_are_refused_and_the_holder_keeps_it() -> None:
    clock = Clock()
    reg = ListenerRegistry(clock=clock)
    lst, secret, _ = reg.claim("home1", "")
    lst.session = LiveSession()  # type: ignore[assignment]
    for _ in range(WAR_TAKEOVERS - 1):  # a reconnecting owner takes over its stale stream: fine
        clock.now += 1.0
        _live(reg, "home1", secret)
    holder = reg.lookup("home1")
    clock.now += 1.0
    with pytest.raises(TakeoverWar, match=r"two live processes with one identity .*--state-dir") as err:
        reg.claim("home1", secret)
    assert status_of(err.value).name == "ABORTED"  # the listener gives up instead of retrying
    assert reg.lookup("home1") is holder
    # for the hold period every takeover is refused, even once the takeovers are old
    clock.now += WAR_WINDOW + 1
    with pytest.raises(TakeoverWar):
        reg.claim("home1", secret)
    clock.now += WAR_HOLD
    _live(reg, "home1", secret)


def test_takeovers_spread_out_are_reconnects_not_a_war() -> None:
    clock = Clock()
    reg = ListenerRegistry(clock=clock)
    lst, secret, _ = reg.claim("home1", "")
    lst.session = LiveSession()  # type: ignore[assignment]
    for _ in range(10):
        clock.now += WAR_WINDOW / (WAR_TAKEOVERS - 1) + 0.1
        _live(reg, "home1", secret)


def test_claims_of_an_offline_id_are_never_a_war() -> None:
    clock = Clock()
    reg = ListenerRegistry(clock=clock)
    _, secret, _ = reg.claim("home1", "")
    for _ in range(10):
        clock.now += 0.1
        reg.claim("home1", secret)  # no live session: the owner comes back, nothing is taken over


# -- a listen key's namespace ------------------------------------------------------------------
@pytest.fixture
def relay(tmp_path: Path) -> Relay:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("home1", ["listen"])
    store.add("home1-nas", ["listen"])
    return Relay(SourceLimiter(), store, "relay-node-id", RelaySettings(ping_interval=60.0))


def _register(relay: Relay, listen_id: str, key_id: str) -> str:
    key = relay.keys.get(key_id)
    lst, _, _ = relay.register(Registration(listen_id, "", "", "", 0, ""), "127.0.0.1:1", key)
    return lst.listen_id


@pytest.mark.parametrize("claim", ["", "home1", "home1-web", "home1-Xk3_9"])
def test_a_listen_key_claims_its_id_and_its_namespace(relay: Relay, claim: str) -> None:
    assert _register(relay, claim, "home1") == (claim or "home1")


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        ("home2", "key home1 may claim only the listenId home1 or home1-SUFFIX, not home2"),
        ("home1-nas", "key home1 may claim only the listenId home1 or home1-SUFFIX, not home1-nas"),  # a key's own
        ("home1_web", "key home1 may claim only the listenId home1 or home1-SUFFIX, not home1_web"),
    ],
)
def test_a_listen_key_claims_nothing_else(relay: Relay, claim: str, why: str) -> None:
    with pytest.raises(ListenerForbidden) as err:
        _register(relay, claim, "home1")
    assert str(err.value) == why
