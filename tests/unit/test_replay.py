"""The replay table the workers of one node share: claims, expiry, a full window, two processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from homenet.node.auth import AuthError, Credentials, Verifier
from homenet.node.keys import KeyStore
from homenet.node.replay import ReplayTable, ReplayTableFull, fingerprint

NOW = 1_800_000_000.0
CONTEXT = "HN/1 CONNECT 10.0.0.5:22"


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    path = tmp_path / "replay.table"
    ReplayTable.create(path)
    return path


def test_a_nonce_is_claimed_once_until_it_expires(table_path: Path) -> None:
    t = ReplayTable(table_path)
    try:
        assert t.claim("alice", "nonce-1", NOW, NOW + 120)
        assert not t.claim("alice", "nonce-1", NOW + 119, NOW + 239)
        assert t.claim("bob", "nonce-1", NOW, NOW + 120), "the same nonce under another key is not a replay"
        assert t.claim("alice", "nonce-1", NOW + 120, NOW + 240), "forgotten once it expired"
        assert not t.claim("alice", "nonce-1", NOW + 121, NOW + 241)
    finally:
        t.close()


def test_two_mappings_of_one_file_see_each_others_claims(table_path: Path) -> None:
    a, b = ReplayTable(table_path), ReplayTable(table_path)
    try:
        assert a.claim("alice", "n" * 16, NOW, NOW + 120)
        assert not b.claim("alice", "n" * 16, NOW, NOW + 120)
        b.close()
        again = ReplayTable(table_path)  # a restarted worker maps the same file
        try:
            assert not again.claim("alice", "n" * 16, NOW + 60, NOW + 180)
        finally:
            again.close()
    finally:
        a.close()


def _same_window(slots: int, probe: int, count: int) -> list[str]:
    """``count`` nonces of key ``k`` whose fingerprints all pick the same probe window."""
    want: int | None = None
    out: list[str] = []
    i = 0
    while len(out) < count:
        nonce = f"nonce-{i}"
        base = fingerprint("k", nonce) % (slots - probe)
        want = base if want is None else want
        if base == want:
            out.append(nonce)
        i += 1
    return out


def test_a_full_window_refuses_and_never_forgets_a_live_nonce(tmp_path: Path) -> None:
    path = tmp_path / "small.table"
    ReplayTable.create(path, slots=64)
    t = ReplayTable(path, slots=64, probe=8)
    try:
        nonces = _same_window(64, 8, 9)
        for n in nonces[:8]:
            assert t.claim("k", n, NOW, NOW + 120)
        with pytest.raises(ReplayTableFull):
            t.claim("k", nonces[8], NOW + 1, NOW + 121)
        for n in nonces[:8]:
            assert not t.claim("k", n, NOW + 2, NOW + 122), "a live nonce was dropped to make room"
        assert t.claim("k", nonces[8], NOW + 120, NOW + 240), "expired slots are taken again"
    finally:
        t.close()


def test_a_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.table"
    ReplayTable.create(path, slots=128)
    with pytest.raises(ValueError, match="is not"):
        ReplayTable(path)


def test_the_table_file_is_private(table_path: Path) -> None:
    assert table_path.stat().st_mode & 0o777 == 0o600


CLAIMER = """
import sys
from homenet.node.replay import ReplayTable
t = ReplayTable(sys.argv[1])
won = sum(t.claim("alice", f"nonce-{i}", 1.0, 1e12) for i in range(int(sys.argv[2])))
t.close()
print(won)
"""


def test_processes_racing_for_the_same_nonces_win_each_once(table_path: Path) -> None:
    n = 3000
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, str(table_path), str(n)], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    wins = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        wins.append(int(out))
    assert sum(wins) == n, wins


# -- the verifier with a shared table ------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    ks = KeyStore(tmp_path / "keys.toml")
    ks.add("alice", ["connect"])
    return ks


def _alice(store: KeyStore) -> Credentials:
    key = store.get("alice")
    assert key is not None
    return Credentials(key.id, key.secret)


def test_a_token_accepted_by_one_worker_is_a_replay_on_another(store: KeyStore, table_path: Path) -> None:
    shared = [ReplayTable(table_path) for _ in range(2)]
    try:
        first, second = (Verifier(store, clock=lambda: NOW, shared=t) for t in shared)
        token = _alice(store).token(CONTEXT, now=NOW)
        assert first.verify(CONTEXT, token, "connect").id == "alice"
        with pytest.raises(AuthError, match="replayed credentials") as err:
            second.verify(CONTEXT, token, "connect")
        assert not err.value.forbidden, "a replay counts as a failed login"
    finally:
        for t in shared:
            t.close()


def test_a_refused_token_takes_no_slot(store: KeyStore, table_path: Path) -> None:
    shared = ReplayTable(table_path)
    try:
        v = Verifier(store, clock=lambda: NOW, shared=shared)
        token = _alice(store).token(CONTEXT, now=NOW)
        with pytest.raises(AuthError, match="bad credentials"):
            v.verify(CONTEXT, {**token, "mac": "x" * 43}, "connect")
        assert shared.claim("alice", token["nonce"], NOW, NOW + 120), "a bad MAC must not burn the nonce"
    finally:
        shared.close()


def test_a_full_table_refuses_the_login_as_busy(store: KeyStore, tmp_path: Path) -> None:
    path = tmp_path / "tiny.table"
    ReplayTable.create(path, slots=3)
    shared = ReplayTable(path, slots=3, probe=1)
    try:
        v = Verifier(store, clock=lambda: NOW, shared=shared)
        creds = _alice(store)
        refusals: list[AuthError] = []
        for _ in range(20):
            try:
                v.verify(CONTEXT, creds.token(CONTEXT, now=NOW), "connect")
            except AuthError as exc:
                refusals.append(exc)
        assert len(refusals) >= 18, "at most 2 of the 3 one-slot windows had room"
        assert all(e.forbidden and "too many logins" in e.reason for e in refusals), [e.reason for e in refusals]
    finally:
        shared.close()
