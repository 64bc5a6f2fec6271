"""KeyStore, key references and the client's key lookup: files in, keys (or one-line errors) out."""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path

import pytest

from homenet.node import keys as keys_mod
from homenet.node.auth import Credentials
from homenet.node.keys import (
    ROLES,
    Key,
    KeyFileError,
    KeyStore,
    Secret,
    client_key,
    ensure_first_key,
    load_keys,
    new_secret,
    parse_key_ref,
)
from homenet.node.log import JsonFormatter, TextFormatter, fields
from homenet.node.settings import Settings

SECRET = "s3cr3t-s3cr3t-s3cr3t-s3cr3t"  # 27 base64url characters
OTHER = "0ther-0ther-0ther-0ther-0ther"


class Monotonic:
    """Stands in for time.monotonic in the keys module: the reload throttle is driven by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mono(monkeypatch: pytest.MonkeyPatch) -> Monotonic:
    clock = Monotonic()
    monkeypatch.setattr(time, "monotonic", clock)  # the keys file's reload throttle reads it
    return clock


def one_line_error(path: Path) -> str:
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def same(a: Key | None, b: Key | None) -> bool:
    """Equal as credentials (the file keeps ``created`` in whole seconds)."""
    assert a is not None
    assert b is not None
    return (a.id, a.roles, a.secret) == (b.id, b.roles, b.secret)


def bump_mtime(path: Path, seconds: int = 10) -> None:
    """Make a rewrite visible even on file systems with coarse timestamps."""
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + seconds * 1_000_000_000))


# -- secrets never show themselves -------------------------------------------------------------


def test_secret_repr_and_str_mask_the_value() -> None:
    s = Secret(SECRET)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", repr([s]), repr({"k": s})):
        assert SECRET not in text
        assert "…" in text
    assert s.reveal() == SECRET


def test_key_and_credentials_repr_hide_the_secret() -> None:
    key = Key("alice", Secret(SECRET), frozenset({"connect"}))
    creds = Credentials("alice", Secret(SECRET))
    for obj in (key, creds):
        assert SECRET not in repr(obj)
        assert SECRET not in str(obj)
    assert "alice" in repr(key)


def test_settings_repr_hides_the_node_key() -> None:
    s = Settings(key=f"home1:{SECRET}")
    assert SECRET not in repr(s)
    assert SECRET not in str(s)


def test_a_secret_in_a_log_line_is_masked() -> None:
    extra = fields(secret=Secret(SECRET), key=f"alice:{SECRET}", resume_secret=SECRET, nested={"token": SECRET})
    record = logging.makeLogRecord(
        {"name": "homenet", "levelno": logging.INFO, "levelname": "INFO", "msg": "key.used", **extra}
    )
    for formatter in (TextFormatter(), JsonFormatter()):
        assert SECRET not in formatter.format(record)


def test_new_secrets_are_long_random_and_url_safe() -> None:
    seen = {new_secret().reveal() for _ in range(200)}
    assert len(seen) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", s) for s in seen)  # 192 bits


def test_secret_equality_and_hash() -> None:
    assert Secret(SECRET) == Secret(SECRET)
    assert Secret(SECRET) != Secret(OTHER)
    assert Secret(SECRET) != SECRET  # never equal to the plain string
    assert hash(Secret(SECRET)) == hash(Secret(SECRET))


# -- key references (HOMENET_KEY) ----------------------------------------------------------------


def test_parse_key_ref() -> None:
    kid, secret = parse_key_ref(f"  alice:{SECRET}\n")
    assert kid == "alice"
    assert secret.reveal() == SECRET


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alice",
        SECRET,
        f":{SECRET}",
        "alice:",
        "alice:short",
        f"al ice:{SECRET}",
        f"alice:{SECRET}=",
        f"alice:{SECRET}:x",
        f"{'a' * 65}:{SECRET}",
        f"alice:{'s' * 129}",
        f"älice:{SECRET}",
    ],
)
def test_bad_key_refs_are_one_line(text: str) -> None:
    with pytest.raises(KeyFileError) as info:
        parse_key_ref(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert "ID:SECRET" in msg
    if len(text) > 22:
        assert SECRET not in msg  # a mistyped secret is not echoed back


# -- the keys file ---------------------------------------------------------------------------------


def test_add_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.toml"
    store = KeyStore(path)
    assert len(store) == 0
    key = store.add("alice", ["connect", "query"])
    assert key.roles == frozenset({"connect", "query"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert key.secret.reveal() in path.read_text()
    assert [k.id for k in KeyStore(path).all()] == ["alice"]
    assert same(KeyStore(path).get("alice"), key)


def test_rewrite_keeps_mode_0600_even_if_loosened(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    store = KeyStore(path)
    store.add("alice", ["connect"])
    path.chmod(0o644)
    store.add("bob", ["listen"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_add_then_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    store = KeyStore(path)
    alice = store.add("alice", ["connect"])
    bob = store.add("bob", ["listen"])
    assert store.revoke("alice") is True
    assert store.revoke("alice") is False
    assert store.get("alice") is None
    assert alice.secret.reveal() not in path.read_text()
    assert bob.secret.reveal() in path.read_text()
    assert [k.id for k in KeyStore(path).all()] == ["bob"]


def test_reserved_listen_ids(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("home1", ["listen"])
    store.add("ops", ["admin"])
    store.add("alice", ["connect"])
    assert store.reserved_listen_ids() == {"home1", "ops"}


@pytest.mark.parametrize(
    ("kid", "roles", "match"),
    [
        ("alice", ["connect"], "exists"),
        ("al ice", ["connect"], "bad key id"),
        ("", ["connect"], "bad key id"),
        ("a" * 65, ["connect"], "bad key id"),
        ("bob", [], "roles must be"),
        ("bob", ["root"], "roles must be"),
        ("bob", ["connect", "superuser"], "roles must be"),
    ],
)
def test_add_refuses(tmp_path: Path, kid: str, roles: list[str], match: str) -> None:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("alice", ["connect"])
    before = (tmp_path / "keys.toml").read_text()
    with pytest.raises(KeyFileError, match=match) as info:
        store.add(kid, roles)
    assert "\n" not in str(info.value)
    assert (tmp_path / "keys.toml").read_text() == before


def test_reload_on_mtime_change(tmp_path: Path, mono: Monotonic) -> None:
    """A running node (store A) sees keys the CLI (store B) adds and revokes, within a second."""
    path = tmp_path / "keys.toml"
    running = KeyStore(path)
    cli = KeyStore(path)
    alice = cli.add("alice", ["connect"])
    bump_mtime(path)
    assert same(running.get("alice"), alice)  # first look since start
    cli.revoke("alice")
    bump_mtime(path, 20)
    mono.now += 0.5
    assert running.get("alice") is not None  # throttled: not re-read within the second
    mono.now += 0.6
    assert running.get("alice") is None


def test_no_reload_without_a_change(tmp_path: Path, mono: Monotonic, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.toml"
    KeyStore(path).add("alice", ["connect"])
    store = KeyStore(path)
    loads: list[Path] = []
    real = keys_mod.load_keys

    def counting(p: Path) -> dict[str, Key]:
        loads.append(p)
        return real(p)

    monkeypatch.setattr(keys_mod, "load_keys", counting)
    for _ in range(5):
        mono.now += 2
        assert store.get("alice") is not None
    assert loads == []


def test_deleted_file_means_no_keys(tmp_path: Path, mono: Monotonic) -> None:
    path = tmp_path / "keys.toml"
    store = KeyStore(path)
    store.add("alice", ["connect"])
    path.unlink()
    mono.now += 2
    assert store.get("alice") is None
    assert store.all() == []


def test_keystore_without_a_path_is_empty() -> None:
    store = KeyStore(None)
    assert store.all() == []
    assert store.get("admin") is None
    assert ensure_first_key(store) is None


def test_load_keys_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[keys.alice]\nsecret = "{SECRET}"\nroles = ["connect", "query"]\ncreated = 1700000000\n'
        f'[keys.home-1_x]\nsecret = "{OTHER}"\nroles = ["listen"]\n'
    )
    keys = load_keys(path)
    assert sorted(keys) == ["alice", "home-1_x"]
    assert keys["alice"].roles == frozenset({"connect", "query"})
    assert keys["alice"].secret.reveal() == SECRET
    assert keys["alice"].created == 1700000000.0
    assert keys["home-1_x"].created == 0.0


BAD_FILES: list[tuple[str, str, str]] = [
    ("not-toml", "this is not toml", "not valid TOML"),
    ("keys-not-table", "keys = 1\n", "[keys.ID] tables expected"),
    ("entry-not-table", "[keys]\nalice = 1\n", "bad key 'alice'"),
    ("bad-id", f'[keys."al ice"]\nsecret = "{SECRET}"\nroles = ["connect"]\n', "bad key 'al ice'"),
    ("no-secret", '[keys.alice]\nroles = ["connect"]\n', "key alice needs a secret"),
    ("short-secret", '[keys.alice]\nsecret = "short"\nroles = ["connect"]\n', "key alice needs a secret"),
    ("secret-not-str", '[keys.alice]\nsecret = 12345678901234567890123\nroles = ["connect"]\n', "needs a secret"),
    ("secret-bad-chars", f'[keys.alice]\nsecret = "{SECRET}+/"\nroles = ["connect"]\n', "needs a secret"),
    ("no-roles", f'[keys.alice]\nsecret = "{SECRET}"\n', "roles must be among"),
    ("empty-roles", f'[keys.alice]\nsecret = "{SECRET}"\nroles = []\n', "roles must be among"),
    ("unknown-role", f'[keys.alice]\nsecret = "{SECRET}"\nroles = ["root"]\n', "roles must be among"),
    ("roles-not-list", f'[keys.alice]\nsecret = "{SECRET}"\nroles = "admin"\n', "roles must be among"),
    ("role-not-str", f'[keys.alice]\nsecret = "{SECRET}"\nroles = [1]\n', "roles must be among"),
    ("binary", "\x00\x01\x02", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "match"), [(t, m) for _, t, m in BAD_FILES], ids=[i for i, _, _ in BAD_FILES])
def test_bad_files_give_one_line_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    assert match in one_line_error(path)
    with pytest.raises(KeyFileError):
        KeyStore(path)  # a node refuses to start on it, with the same message


def test_bad_file_error_never_shows_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nsecret = "{SECRET}"\nroles = ["root"]\n')
    assert SECRET not in one_line_error(path)


def test_unreadable_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.mkdir()
    assert "cannot read keys file" in one_line_error(path)


def test_non_utf8_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(b'[keys.alice]\nsecret = "\xff\xfe"\n')
    one_line_error(path)


# -- zero configuration: the first admin key ----------------------------------------------------------


def test_first_key_is_admin_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.toml"
    store = KeyStore(path)
    key = ensure_first_key(store)
    assert key is not None
    assert key.id == "admin"
    assert key.roles == frozenset(ROLES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.get("admin") == key
    assert same(KeyStore(path).get("admin"), key)
    assert ensure_first_key(store) is None
    assert ensure_first_key(KeyStore(path)) is None


def test_no_first_key_when_a_file_exists(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("")  # an operator's empty file: no keys, and none made up
    store = KeyStore(path)
    assert ensure_first_key(store) is None
    assert store.all() == []


# -- which key a client signs with ----------------------------------------------------------------


def _keyfile(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    """One key per source, each with its own id so the winner is plain to see."""
    local = KeyStore(tmp_path / "local" / "keys.toml")
    local.add("local-user", ["connect"])
    ensure = local.add("local-admin", ["admin"])
    assert ensure.id == "local-admin"
    return {
        "key": f"explicit:{SECRET}",
        "key_file": _keyfile(tmp_path, "flag.key", f"flagfile:{SECRET}\n"),
        "HOMENET_KEY": f"envkey:{SECRET}",
        "HOMENET_KEY_FILE": _keyfile(tmp_path, "env.key", f"envfile:{SECRET}"),
        "local": str(tmp_path / "local" / "keys.toml"),
    }


def _pick(src: dict[str, str], *use: str) -> str | None:
    env = {k: src[k] for k in use if k.startswith("HOMENET_")}
    found = client_key(
        key=src["key"] if "key" in use else None,
        key_file=src["key_file"] if "key_file" in use else None,
        env=env,
        local_keys=Path(src["local"]) if "local" in use else None,
    )
    return None if found is None else found[0]


def test_client_key_precedence(sources: dict[str, str]) -> None:
    every = ("key", "key_file", "HOMENET_KEY", "HOMENET_KEY_FILE", "local")
    assert _pick(sources, *every) == "explicit"
    assert _pick(sources, *every[1:]) == "flagfile"
    assert _pick(sources, "HOMENET_KEY_FILE", "local") == "envfile"
    assert _pick(sources, "HOMENET_KEY", "local") == "envkey"
    assert _pick(sources, "local") == "local-admin"  # only an admin key is taken from a node's file
    assert _pick(sources) is None


def test_client_key_env_key_beats_env_key_file(sources: dict[str, str]) -> None:
    assert _pick(sources, "HOMENET_KEY", "HOMENET_KEY_FILE") == "envkey"


def test_client_key_reads_the_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HOMENET_KEY_FILE", "HOMENET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOMENET_KEY", f"fromenv:{SECRET}")
    found = client_key()
    assert found is not None
    assert found[0] == "fromenv"


def test_key_file_may_be_a_keys_file_with_one_key(tmp_path: Path) -> None:
    one = _keyfile(tmp_path, "one.toml", f'[keys.solo]\nsecret = "{SECRET}"\nroles = ["connect"]\n')
    found = client_key(key_file=one, env={})
    assert found is not None
    assert found[0] == "solo"
    assert found[1].reveal() == SECRET


def test_key_file_with_two_keys_is_ambiguous(tmp_path: Path) -> None:
    two = _keyfile(
        tmp_path,
        "two.toml",
        f'[keys.a]\nsecret = "{SECRET}"\nroles = ["connect"]\n[keys.b]\nsecret = "{OTHER}"\nroles = ["connect"]\n',
    )
    with pytest.raises(KeyFileError, match="holds 2 keys") as info:
        client_key(key_file=two, env={})
    assert "\n" not in str(info.value)


BAD_EXPLICIT: list[tuple[str | None, str | None, dict[str, str], str]] = [
    ("nonsense", None, {}, "ID:SECRET"),
    (None, None, {"HOMENET_KEY": "nonsense"}, "ID:SECRET"),
    (None, "/nonexistent/homenet/key", {}, "cannot read key file"),
    (None, None, {"HOMENET_KEY_FILE": "/nonexistent/homenet/key"}, "cannot read key file"),
]


@pytest.mark.parametrize(("key", "key_file", "env", "match"), BAD_EXPLICIT)
def test_bad_explicit_keys_raise(key: str | None, key_file: str | None, env: dict[str, str], match: str) -> None:
    with pytest.raises(KeyFileError, match=match) as info:
        client_key(key=key, key_file=key_file, env=env)
    assert "\n" not in str(info.value)


def test_bad_local_keys_file_is_ignored(tmp_path: Path) -> None:
    local = tmp_path / "keys.toml"
    local.write_text("garbage =")
    assert client_key(env={}, local_keys=local) is None
    assert client_key(env={}, local_keys=tmp_path / "missing.toml") is None


def test_local_keys_without_an_admin_give_nothing(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.toml")
    store.add("alice", ["connect", "listen", "query"])
    assert client_key(env={}, local_keys=tmp_path / "keys.toml") is None


def test_a_keys_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.toml"
    KeyStore(path).add("alice", ["connect"])
    assert not [r for r in caplog.records if r.getMessage() == "keys.file_readable"]
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="homenet.keys"):
        store = KeyStore(path)
    assert store.get("alice") is not None, "still loaded: a warning, not a refusal"
    [record] = [r for r in caplog.records if r.getMessage() == "keys.file_readable"]
    assert record.__dict__["hn"] == {"path": str(path), "mode": "0o644", "fix": f"chmod 600 {path}"}


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root (CI runs as root)")
def test_root_managing_keys_keeps_the_node_user_s_ownership(tmp_path: Path) -> None:
    """`homenet key new` as root on a keys file the service user owns (systemd DynamicUser)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4321, 4321)
    store = KeyStore(state / "keys.toml")
    store.add("first", ["connect"])  # a new file: its directory's owner
    assert (state / "keys.toml").stat().st_uid == 4321
    os.chown(state / "keys.toml", 4322, 4322)
    store.add("second", ["connect"])  # an existing file: its own owner
    st = (state / "keys.toml").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4322, 4322, 0o600)
