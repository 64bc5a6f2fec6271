"""The router: which hop needs which key, listeners before services, and where a listener may
be told to dial back (values in, verdicts out; nothing here opens a socket: every hop that
would be dialed is refused by the policy first).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from homenet.node.address import Endpoint, ListenId, parse_url
from homenet.node.auth import AuthError, Authorizer, Credentials, Verifier
from homenet.node.connection import Handshake
from homenet.node.dialer import Dialer, DialError
from homenet.node.discovery import HOMENET_TYPE, PublicServices, Service
from homenet.node.errors import Code, HomeNetError
from homenet.node.keys import KeyStore
from homenet.node.limits import SourceLimiter
from homenet.node.listeners import Listener, ListenerOffline, PoolGrant
from homenet.node.policy import TargetPolicy
from homenet.node.preamble import Request, Verb
from homenet.node.relay import Registration, Relay, RelaySettings
from homenet.node.remote import advertised
from homenet.node.router import Router
from homenet.node.sessions import Target

HOP = "10.9.8.7:22"  # refused by the empty policy: never dialed


class FakeListeners:
    def __init__(self, known: dict[str, Listener | ListenerOffline]) -> None:
        self.known = known
        self.reached: list[str] = []

    def lookup(self, hop: ListenId) -> Listener | None:
        found = self.known.get(hop.value)
        if isinstance(found, ListenerOffline):
            raise found
        return found

    async def connect(self, hs: Handshake, listener: Listener) -> Target:
        self.reached.append(listener.listen_id)
        return Target(socket.socket(), f"listener {listener.listen_id}")


class FakeServices:
    def __init__(self, *services: Service) -> None:
        self.by_id = {s.listen_id: s for s in services}

    def by_listen_id(self, listen_id: str) -> Service | None:
        return self.by_id.get(listen_id)


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("alice", ["connect"])
    store.add("bob", ["query"])
    return store


def router(
    keys: KeyStore, mode: str, listeners: FakeListeners | None = None, *services: Service, public: tuple[str, ...] = ()
) -> Router:
    dialer = Dialer(TargetPolicy.from_specs([]), timeout=1.0)
    return Router(
        dialer, Authorizer(Verifier(keys), SourceLimiter()), mode, listeners, FakeServices(*services),
        public=PublicServices(public),
    )  # fmt: skip


def hs(hop: str, signer: str | None = None, keys: KeyStore | None = None) -> Handshake:
    fields: dict[str, str] = {}
    if signer is not None:
        assert keys is not None
        key = keys.get(signer)
        assert key is not None
        fields = Credentials(key.id, key.secret).token(f"HN/1 CONNECT {hop}")
    h = Handshake(socket.socket(), "127.0.0.5:4000", source="127.0.0.5")
    h.request = Request(Verb.CONNECT, hop, fields)
    return h


def svc(listen_id: str, claims_public: bool = False) -> Service:
    """A discovered service; ``claims_public``: its record says it is HomeNet's and public
    (which must change nothing: only the operator makes a service public)."""
    type_ = HOMENET_TYPE if claims_public else "_ssh._tcp.local."
    txt = {"hn-public": "1"} if claims_public else {}
    return Service(listen_id, listen_id, type_, "box.local.", ["169.254.1.1"], 22, txt)


async def outcome(r: Router, h: Handshake, hop: Endpoint | ListenId) -> tuple[Code, str]:
    try:
        target = await r.route(h, hop)
    except HomeNetError as exc:
        return exc.code, type(exc).__name__
    target.sock.close()
    return Code.OK, target.dialed


@pytest.mark.parametrize(
    ("mode", "signer", "want"),
    [
        ("direct", None, (Code.UNAUTHORIZED, "AuthError")),
        ("direct", "bob", (Code.FORBIDDEN, "AuthError")),  # a key without the connect role
        ("direct", "alice", (Code.FORBIDDEN, "DialError")),  # allowed to ask; the policy still refuses
        ("none", None, (Code.FORBIDDEN, "DialError")),
        ("all", None, (Code.UNAUTHORIZED, "AuthError")),
    ],
)
async def test_direct_targets_need_a_connect_key_unless_none(
    keys: KeyStore, mode: str, signer: str | None, want: tuple[Code, str]
) -> None:
    h = hs(HOP, signer, keys)
    assert await outcome(router(keys, mode), h, Endpoint("10.9.8.7", 22)) == want
    h.sock.close()


@pytest.mark.parametrize(("mode", "needs_key"), [("none", False), ("direct", False), ("all", True)])
async def test_listeners_need_a_key_only_with_all(keys: KeyStore, mode: str, needs_key: bool) -> None:
    listeners = FakeListeners({"home1": Listener("home1", b"")})
    h = hs("home1")
    got = await outcome(router(keys, mode, listeners), h, ListenId("home1"))
    assert got == ((Code.UNAUTHORIZED, "AuthError") if needs_key else (Code.OK, "listener home1"))
    assert listeners.reached == ([] if needs_key else ["home1"])
    h.sock.close()


@pytest.mark.parametrize(
    ("mode", "public", "signer", "want"),
    [
        ("direct", ("nas-ssh",), None, (Code.FORBIDDEN, "RouteError")),  # public: no key asked, then the policy
        ("direct", ("_ssh._tcp",), None, (Code.FORBIDDEN, "RouteError")),  # by type
        ("direct", (), None, (Code.UNAUTHORIZED, "AuthError")),
        ("direct", ("other",), None, (Code.UNAUTHORIZED, "AuthError")),
        ("direct", (), "alice", (Code.FORBIDDEN, "RouteError")),
        ("all", ("nas-ssh",), None, (Code.UNAUTHORIZED, "AuthError")),
        ("none", (), None, (Code.FORBIDDEN, "RouteError")),
    ],
)
async def test_services_need_a_key_unless_the_operator_made_them_public(
    keys: KeyStore, mode: str, public: tuple[str, ...], signer: str | None, want: tuple[Code, str]
) -> None:
    h = hs("nas-ssh", signer, keys)
    r = router(keys, mode, FakeListeners({}), svc("nas-ssh"), public=public)
    assert await outcome(r, h, ListenId("nas-ssh")) == want
    h.sock.close()


async def test_a_record_that_calls_itself_public_still_needs_a_key(keys: KeyStore) -> None:
    h = hs("fake", None, keys)
    r = router(keys, "direct", FakeListeners({}), svc("fake", claims_public=True))
    assert await outcome(r, h, ListenId("fake")) == (Code.UNAUTHORIZED, "AuthError")
    h.sock.close()


async def test_a_listener_shadows_a_service_of_the_same_id(keys: KeyStore) -> None:
    listeners = FakeListeners({"nas": Listener("nas", b"")})
    h = hs("nas")
    assert await outcome(router(keys, "direct", listeners, svc("nas", claims_public=True)), h, ListenId("nas")) == (
        Code.OK,
        "listener nas",
    )
    h.sock.close()


async def test_unknown_and_offline_listenids(keys: KeyStore) -> None:
    listeners = FakeListeners({"away": ListenerOffline("listener away is offline")})
    r = router(keys, "all", listeners)
    h = hs("nobody")
    with pytest.raises(HomeNetError, match=r"^no listener or service nobody on this node$") as err:
        await r.route(h, ListenId("nobody"))  # unknown: 404 before any key is asked for
    assert err.value.code is Code.NOT_FOUND
    assert await outcome(r, h, ListenId("away")) == (Code.UNAVAILABLE, "ListenerOffline")
    no_relay = Router(r.dialer, r.authorizer, "direct")
    with pytest.raises(HomeNetError, match=r"^no listener nobody on this node$"):
        await no_relay.route(h, ListenId("nobody"))
    h.sock.close()


def test_auth_errors_are_route_errors_with_their_code() -> None:
    assert AuthError("x").code is Code.UNAUTHORIZED
    assert DialError(Code.FORBIDDEN, "x").code is Code.FORBIDDEN


# -- where a listener dials back ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "endpoint", "used"),
    [
        ("hn://relay.example:6969", "", False),
        ("hn://relay.example:6969", "203.0.113.7:6969", False),  # documentation range: not global
        ("hn://relay.example:6969", "8.8.8.8:6969", True),  # parsed only, never dialed here
        ("hn://relay.example:6969", "[2606:4700::1111]:6969", True),
        ("hn://relay.example:6969", "10.0.0.7:6969", False),  # the listener's own LAN: never
        ("hn://relay.example:6969", "127.0.0.1:6969", False),
        ("hn://relay.example:6969", "169.254.169.254:80", False),
        ("hn://relay.example:6969", "pod-7.relay.example:6969", False),  # names are not followed
        ("hn://relay.example:6969", "garbage", False),
        ("hn://b.example/a", "8.8.8.8:6969", False),  # through a chain: the route decides
    ],
)
def test_a_listener_follows_only_a_global_advertised_address(url: str, endpoint: str, used: bool) -> None:
    got = advertised(parse_url(url), endpoint)
    assert (got is not None) == used
    if used:
        assert got is not None
        assert str(got) == endpoint


async def test_a_relay_tells_its_listeners_where_to_dial_back(keys: KeyStore) -> None:
    relay = Relay(SourceLimiter(), keys, "id", RelaySettings(advertise="198.51.100.9:6969", rl_auth="open"))
    _, session, _ = relay.register(Registration("h", "", "", "", 2, ""), "127.0.0.1:1", None)
    events = [await session.next_event() for _ in range(2)]
    assert all(isinstance(e, PoolGrant) and e.endpoint == "198.51.100.9:6969" for e in events), events
