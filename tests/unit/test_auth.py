"""Verifier: timestamped, single-use HMAC tokens checked against a keys file (values in, verdicts out)."""

from __future__ import annotations

import contextlib
import hmac
import secrets
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homenet.node import auth as auth_mod
from homenet.node.auth import SKEW, AuthError, Credentials, Verifier, mac
from homenet.node.keys import Key, KeyStore, Secret

NOW = 1_800_000_000.0
CONTEXT = "HN/1 CONNECT 10.0.0.5:22"


class Clock:
    """A settable wall clock for the verifier."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    """A keys file with one key per role (and an admin key)."""
    ks = KeyStore(tmp_path / "keys.toml")
    for kid, roles in (("alice", ["connect"]), ("lister", ["listen"]), ("q", ["query"]), ("root", ["admin"])):
        ks.add(kid, roles)
    return ks


def creds(store: KeyStore, kid: str) -> Credentials:
    key = store.get(kid)
    assert key is not None
    return Credentials(key.id, key.secret)


def refusal(verifier: Verifier, token: dict[str, str], role: str = "connect", context: str = CONTEXT) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(context, token, role)
    assert "\n" not in info.value.reason
    return info.value


# -- the good path -------------------------------------------------------------------------------


def test_good_token_names_its_key(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    assert set(token) == {"key", "ts", "nonce", "mac"}
    key = v.verify(CONTEXT, token, "connect")
    assert isinstance(key, Key)
    assert key.id == "alice"


def test_token_carries_no_secret(store: KeyStore) -> None:
    c = creds(store, "alice")
    token = c.token(CONTEXT, now=NOW)
    assert all(c.secret.reveal() not in value for value in token.values())


def test_every_token_has_a_fresh_nonce(store: KeyStore) -> None:
    c = creds(store, "alice")
    nonces = {c.token(CONTEXT, now=NOW)["nonce"] for _ in range(500)}
    assert len(nonces) == 500


def test_admin_implies_every_role(store: KeyStore) -> None:
    clock = Clock()
    v = Verifier(store, clock=clock)
    for role in ("connect", "listen", "query", "admin"):
        assert v.verify(CONTEXT, creds(store, "root").token(CONTEXT, now=NOW), role).id == "root"


@pytest.mark.parametrize("offset", [-SKEW, -SKEW + 1, 0.0, SKEW - 1, SKEW])
def test_timestamps_within_the_skew_pass(store: KeyStore, offset: float) -> None:
    v = Verifier(store, clock=Clock())
    assert v.verify(CONTEXT, creds(store, "alice").token(CONTEXT, now=NOW + offset), "connect").id == "alice"


# -- refusals ------------------------------------------------------------------------------------


def test_wrong_mac(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    flipped = token["mac"][:-1] + ("A" if token["mac"][-1] != "A" else "B")
    err = refusal(v, {**token, "mac": flipped})
    assert err.reason == "bad credentials"
    assert not err.forbidden


def test_mac_signed_with_another_secret(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    forged = Credentials("alice", Secret("x" * 32)).token(CONTEXT, now=NOW)
    assert refusal(v, forged).reason == "bad credentials"


@pytest.mark.parametrize(
    "other",
    ["HN/1 CONNECT 10.0.0.6:22", "HN/1 CONNECT 10.0.0.5:222", "HN/1 TICKET 10.0.0.5:22", "HN/1 CONNECT 10.0.0.5:22 "],
)
def test_token_is_bound_to_its_request(store: KeyStore, other: str) -> None:
    """A token for one hop cannot be moved to another (the MAC covers what routes the stream)."""
    v = Verifier(store, clock=Clock())
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    assert refusal(v, token, context=other).reason == "bad credentials"
    assert v.verify(CONTEXT, token, "connect").id == "alice"  # the failed try did not burn it


@pytest.mark.parametrize("field", ["key", "ts", "nonce"])
def test_every_signed_field_is_covered_by_the_mac(store: KeyStore, field: str) -> None:
    v = Verifier(store, clock=Clock())
    token = creds(store, "root").token(CONTEXT, now=NOW)
    changed = {"key": "alice", "ts": str(int(NOW) + 1), "nonce": "AAAAAAAAAAAAAAAA"}[field]
    assert refusal(v, {**token, field: changed}).reason == "bad credentials"


def test_unknown_key_looks_like_a_bad_mac(store: KeyStore) -> None:
    """No oracle for which key ids exist: same reason, same code path."""
    v = Verifier(store, clock=Clock())
    token = Credentials("mallory", Secret("y" * 32)).token(CONTEXT, now=NOW)
    err = refusal(v, token)
    assert err.reason == "bad credentials"
    assert not err.forbidden


@pytest.mark.parametrize("offset", [-SKEW - 1, SKEW + 1, -3600.0, 3600.0, -NOW])
def test_expired_or_future_timestamps(store: KeyStore, offset: float) -> None:
    v = Verifier(store, clock=Clock())
    err = refusal(v, creds(store, "alice").token(CONTEXT, now=NOW + offset))
    assert "expired" in err.reason
    assert "skew" in err.reason
    assert not err.forbidden


def test_replayed_nonce(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    v.verify(CONTEXT, token, "connect")
    err = refusal(v, dict(token))
    assert err.reason == "replayed credentials"
    assert not err.forbidden


def test_replay_stays_refused_until_the_token_has_expired(store: KeyStore) -> None:
    clock = Clock()
    v = Verifier(store, clock=clock)
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    v.verify(CONTEXT, token, "connect")
    for step in (1, SKEW / 2, SKEW):  # the whole validity window of the token
        clock.now = NOW + step
        assert refusal(v, token).reason == "replayed credentials"
    clock.now = NOW + SKEW + 1
    assert "expired" in refusal(v, token).reason
    clock.now = NOW + 3 * SKEW  # the nonce is forgotten by now: the timestamp still refuses it
    assert "expired" in refusal(v, token).reason


def test_replay_with_a_rewound_clock_is_still_refused(store: KeyStore) -> None:
    clock = Clock()
    v = Verifier(store, clock=clock)
    token = creds(store, "alice").token(CONTEXT, now=NOW)
    v.verify(CONTEXT, token, "connect")
    clock.now = NOW - SKEW  # the wall clock stepped back: the token is valid again by its ts
    assert refusal(v, token).reason == "replayed credentials"


def test_same_nonce_under_two_keys_is_not_a_replay(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    a, r = creds(store, "alice"), creds(store, "root")
    nonce = "n0nce-n0nce-n0nce"
    ts = str(int(NOW))
    for c in (a, r):
        token = {"key": c.key_id, "ts": ts, "nonce": nonce, "mac": mac(c.secret, CONTEXT, c.key_id, ts, nonce)}
        assert v.verify(CONTEXT, token, "connect").id == c.key_id


def test_refused_tokens_are_not_remembered(store: KeyStore) -> None:
    """A forged token with a victim's nonce must not make the victim's real token a 'replay'."""
    v = Verifier(store, clock=Clock())
    good = creds(store, "alice").token(CONTEXT, now=NOW)
    refusal(v, {**good, "mac": "A" * 43})
    assert v.verify(CONTEXT, good, "connect").id == "alice"


@pytest.mark.parametrize(
    ("kid", "role"), [("alice", "listen"), ("alice", "admin"), ("q", "connect"), ("lister", "query")]
)
def test_role_missing_is_forbidden(store: KeyStore, kid: str, role: str) -> None:
    v = Verifier(store, clock=Clock())
    err = refusal(v, creds(store, kid).token(CONTEXT, now=NOW), role=role)
    assert err.forbidden
    assert err.reason == f"key {kid} lacks the {role} role"


def test_forbidden_token_is_still_consumed(store: KeyStore) -> None:
    """A key without the role cannot retry the same token elsewhere."""
    v = Verifier(store, clock=Clock())
    token = creds(store, "q").token(CONTEXT, now=NOW)
    assert refusal(v, token, role="connect").forbidden
    assert refusal(v, token, role="query").reason == "replayed credentials"


def test_missing_key_asks_for_one(store: KeyStore) -> None:
    v = Verifier(store, clock=Clock())
    for token in ({}, {"ts": "1", "nonce": "n" * 16, "mac": "m"}, {"key": ""}):
        err = refusal(v, token, role="query")
        assert err.reason == "this needs a key with the query role (set HOMENET_KEY=ID:SECRET)"
        assert not err.forbidden


def _good(store: KeyStore) -> dict[str, str]:
    return creds(store, "alice").token(CONTEXT, now=NOW)


MALFORMED: list[tuple[str, str]] = [
    ("ts", ""),
    ("ts", "-1"),
    ("ts", "+1800000000"),
    ("ts", "1800000000.0"),
    ("ts", "1e9"),
    ("ts", " 1800000000"),
    ("ts", "0x6b49d200"),
    ("ts", "1" * 13),
    ("ts", "١٨٠٠٠٠٠٠٠٠"),  # Arabic-Indic digits: str.isdigit() says yes, int() would too
    ("ts", "１８００００００００"),  # fullwidth digits
    ("nonce", ""),
    ("nonce", "short"),
    ("nonce", "n" * 7),
    ("nonce", "n" * 65),
    ("mac", ""),
]


@pytest.mark.parametrize(("field", "value"), MALFORMED, ids=[f"{f}={v!r}" for f, v in MALFORMED])
def test_malformed_fields(store: KeyStore, field: str, value: str) -> None:
    v = Verifier(store, clock=Clock())
    err = refusal(v, {**_good(store), field: value})
    assert err.reason == "malformed credentials"
    assert not err.forbidden


@pytest.mark.parametrize("mac_value", ["é" * 43, "\x00" * 43, "A" * 10_000, "AAAA AAAA"])
def test_odd_macs_are_bad_credentials(store: KeyStore, mac_value: str) -> None:
    v = Verifier(store, clock=Clock())
    assert refusal(v, {**_good(store), "mac": mac_value}).reason == "bad credentials"


def test_nonce_length_bounds_are_inclusive(store: KeyStore) -> None:
    c = creds(store, "alice")
    v = Verifier(store, clock=Clock())
    ts = str(int(NOW))
    for nonce in ("n" * 8, "m" * 64):
        token = {"key": c.key_id, "ts": ts, "nonce": nonce, "mac": mac(c.secret, CONTEXT, c.key_id, ts, nonce)}
        assert v.verify(CONTEXT, token, "connect").id == "alice"


# -- constant time -------------------------------------------------------------------------------


@pytest.fixture
def compares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every hmac.compare_digest call the verifier makes (the real one still decides)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def test_mac_compared_in_constant_time(store: KeyStore, compares: list[tuple[bytes, bytes]]) -> None:
    v = Verifier(store, clock=Clock())
    token = _good(store)
    v.verify(CONTEXT, token, "connect")
    assert compares == [(token["mac"].encode(), token["mac"].encode())]
    compares.clear()
    refusal(v, {**_good(store), "mac": "B" * 43})
    assert len(compares) == 1


def test_unknown_key_still_computes_and_compares_a_mac(store: KeyStore, compares: list[tuple[bytes, bytes]]) -> None:
    """Unknown ids take the same path as known ones (no timing oracle on which ids exist)."""
    v = Verifier(store, clock=Clock())
    refusal(v, Credentials("mallory", Secret("z" * 32)).token(CONTEXT, now=NOW))
    assert len(compares) == 1
    assert len(compares[0][0]) == 43  # a real HMAC-SHA256, base64url


def test_secret_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = secrets.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(secrets, "compare_digest", spy)
    assert Secret("a" * 32) == Secret("a" * 32)
    assert Secret("a" * 32) != Secret("b" * 32)
    assert len(calls) == 2


# -- replay cache bounds -------------------------------------------------------------------------


def test_replay_cache_forgets_only_expired_nonces(store: KeyStore) -> None:
    clock = Clock()
    v = Verifier(store, clock=clock)
    c = creds(store, "alice")
    old = c.token(CONTEXT, now=NOW)
    v.verify(CONTEXT, old, "connect")
    clock.now = NOW + 2 * SKEW + 1
    v.verify(CONTEXT, c.token(CONTEXT, now=clock.now), "connect")  # sweeps the first nonce
    assert len(v._seen) == 1


def test_a_full_replay_cache_never_lets_a_replay_through(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "REPLAY_CACHE", 4)
    v = Verifier(store, clock=Clock())
    captured = creds(store, "root").token(CONTEXT, now=NOW)
    v.verify(CONTEXT, captured, "connect")
    flooder = creds(store, "alice")
    for _ in range(8):  # all within the skew window: none of them has expired
        with contextlib.suppress(AuthError):  # refusing new tokens while full is a fine answer too
            v.verify(CONTEXT, flooder.token(CONTEXT, now=NOW), "connect")
    with pytest.raises(AuthError):
        v.verify(CONTEXT, captured, "connect")


# -- fuzz: only AuthError, whatever the peer sends ------------------------------------------------

_VALUE = st.text(max_size=24) | st.sampled_from(["alice", "root", "q", "", "1800000000", "n" * 16, "A" * 43])
_TOKEN = st.fixed_dictionaries({}, optional={"key": _VALUE, "ts": _VALUE, "nonce": _VALUE, "mac": _VALUE, "x": _VALUE})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=_TOKEN, role=st.sampled_from(["connect", "listen", "query", "admin"]), context=st.text(max_size=32))
def test_fuzz_tokens_only_raise_auth_error(store: KeyStore, token: dict[str, str], role: str, context: str) -> None:
    v = Verifier(store, clock=Clock())
    with pytest.raises(AuthError) as info:
        v.verify(context, token, role)
    assert info.value.reason
    assert "\n" not in info.value.reason
    assert len(info.value.reason) < 200
