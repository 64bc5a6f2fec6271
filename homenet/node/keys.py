"""Named keys: an id, a secret of 192 random bits, and roles. Stored in a TOML keys file.

Roles: ``listen`` (may claim the listenId equal to the key id), ``connect`` (may reach direct
targets and non-public services), ``query`` (may list a node's services), ``admin`` (operator
calls; implies every other role). Secrets are never logged: :class:`Secret` masks its repr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from homenet.node.errors import UsageError
from homenet.node.log import fields
from homenet.node.settings import client_settings

ROLES = ("listen", "connect", "query", "admin")
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{22,128}")  # >= 128 bits of base64url

log = logging.getLogger("homenet.keys")


class KeyFileError(UsageError, ValueError):
    """A bad key, keys file or key reference; the message is one line for the user."""


class Secret:
    """A secret string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('…')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Key:
    """One credential."""

    id: str
    secret: Secret = field(repr=False)
    roles: frozenset[str]
    created: float = 0.0

    def allows(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


def new_secret() -> Secret:
    return Secret(secrets.token_urlsafe(24))


def parse_key_ref(text: str) -> tuple[str, Secret]:
    """``ID:SECRET`` (as in ``HOMENET_KEY``) -> (id, secret)."""
    kid, sep, secret = text.strip().partition(":")
    if not sep or not KEY_ID.fullmatch(kid) or not _SECRET.fullmatch(secret):
        raise KeyFileError("a key is ID:SECRET (the line `homenet key new` printed)")
    return kid, Secret(secret)


class KeyStore:
    """The keys file of a node; reloaded when it changes on disk."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._keys: dict[str, Key] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    def __len__(self) -> int:
        return len(self._keys)

    def all(self) -> list[Key]:
        self._maybe_reload()
        return sorted(self._keys.values(), key=lambda k: k.id)

    def get(self, key_id: str) -> Key | None:
        self._maybe_reload()
        return self._keys.get(key_id)

    def reserved_listen_ids(self) -> set[str]:
        """Ids that only their key may claim as a listenId."""
        return {k.id for k in self.all() if k.allows("listen")}

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            self.reload()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._mtime = {}, None
            return
        if st.st_mtime == self._mtime:
            return
        self._keys = load_keys(self.path)
        self._mtime = st.st_mtime
        if st.st_mode & 0o077:  # secrets others can read: say so each time the file changes
            log.warning(
                "keys.file_readable",
                extra=fields(path=str(self.path), mode=oct(st.st_mode & 0o777), fix=f"chmod 600 {self.path}"),
            )

    def add(self, key_id: str, roles: Iterable[str]) -> Key:
        """Create a key and save the file; raises if the id exists."""
        self.reload()
        if not KEY_ID.fullmatch(key_id):
            raise KeyFileError(f"bad key id {key_id!r}: expected 1-64 of A-Z a-z 0-9 _ -")
        if key_id in self._keys:
            raise KeyFileError(f"key {key_id} exists: revoke it first")
        wanted = frozenset(roles)
        bad = wanted - set(ROLES)
        if bad or not wanted:
            raise KeyFileError(f"roles must be among {', '.join(ROLES)}")
        key = Key(key_id, new_secret(), wanted, time.time())
        self._keys[key_id] = key
        self.save()
        return key

    def revoke(self, key_id: str) -> bool:
        self.reload()
        if self._keys.pop(key_id, None) is None:
            return False
        self.save()
        return True

    def save(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = ["# HomeNet keys: keep this file private (mode 0600).", ""]
        for k in sorted(self._keys.values(), key=lambda k: k.id):
            roles = ", ".join(f'"{r}"' for r in sorted(k.roles))
            lines += [f"[keys.{k.id}]", f'secret = "{k.secret.reveal()}"', f"roles = [{roles}]"]
            lines += [f"created = {k.created:.0f}", ""]
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines))
            _keep_owner(fh.fileno(), self.path)
        tmp.replace(self.path)
        self._mtime = self.path.stat().st_mtime


def _keep_owner(fd: int, path: Path) -> None:
    """The new file keeps the owner of the one it replaces (or of its directory): root running
    ``homenet key new`` must not lock the node's own user (a systemd DynamicUser) out."""
    if os.geteuid() != 0:
        return
    try:
        st = path.stat() if path.exists() else path.parent.stat()
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fchown(fd, st.st_uid, st.st_gid)


def load_keys(path: Path) -> dict[str, Key]:
    """Parse a keys file; raises :class:`KeyFileError` naming the file and the bad entry."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise KeyFileError(f"cannot read keys file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"keys file {path} is not valid TOML: {exc}") from None
    table = data.get("keys", {})
    if not isinstance(table, dict):
        raise KeyFileError(f"keys file {path}: [keys.ID] tables expected")
    out: dict[str, Key] = {}
    for kid, entry in table.items():
        if not KEY_ID.fullmatch(kid) or not isinstance(entry, dict):
            raise KeyFileError(f"keys file {path}: bad key {kid!r}")
        secret, roles = entry.get("secret"), entry.get("roles", [])
        if not isinstance(secret, str) or not _SECRET.fullmatch(secret):
            raise KeyFileError(f"keys file {path}: key {kid} needs a secret of >= 22 base64url characters")
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise KeyFileError(f"keys file {path}: key {kid} roles must be among {', '.join(ROLES)}")
        created = entry.get("created", 0)
        out[kid] = Key(kid, Secret(secret), frozenset(roles), float(created) if isinstance(created, int | float) else 0)
    return out


def client_key(
    key: str | None = None, key_file: str | None = None, env: dict[str, str] | None = None,
    local_keys: Path | None = None,
) -> tuple[str, Secret] | None:  # fmt: skip
    """The key a client uses, first found: ``key`` (ID:SECRET), ``key_file``, ``HOMENET_KEY``,
    ``HOMENET_KEY_FILE``, then the admin key of a local node's keys file (``local_keys``) when
    this user can read it. Raises :class:`KeyFileError` for a bad explicit key."""
    env = client_settings().key_env if env is None else env  # settings owns every environment read
    if key:
        return parse_key_ref(key)
    if key_file:
        return key_from_file(Path(key_file))
    if env.get("HOMENET_KEY"):
        return parse_key_ref(env["HOMENET_KEY"])
    if env.get("HOMENET_KEY_FILE"):
        return key_from_file(Path(env["HOMENET_KEY_FILE"]))
    if local_keys is not None and local_keys.is_file():
        try:
            keys = load_keys(local_keys)
        except KeyFileError:
            return None
        admins = [k for k in keys.values() if "admin" in k.roles]
        if admins:
            return admins[0].id, admins[0].secret
    return None


def key_from_file(path: Path) -> tuple[str, Secret]:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if "\n" not in text and ":" in text and "=" not in text:
        return parse_key_ref(text)
    keys = load_keys(path)
    if len(keys) != 1:
        raise KeyFileError(f"key file {path} holds {len(keys)} keys: give one ID:SECRET instead")
    k = next(iter(keys.values()))
    return k.id, k.secret


def first_key_notice(key: Key, path: Path | None) -> list[str]:
    """What a node says when it made its first key: where it is, never the secret (the
    node's output goes to logs and journals that others may read)."""
    return [
        f"no keys yet: created key '{key.id}' (all roles) in {path}",
        f"hnctl on this machine finds it there; to print it for a client elsewhere: "
        f"homenet key --keys-file {path} show {key.id}",
    ]


def ensure_first_key(store: KeyStore) -> Key | None:
    """Zero configuration, still closed: with no keys file yet, create an ``admin`` key
    (all roles). Returns it when created (the caller shows it once), else None."""
    if store.path is None or store.path.exists():
        return None
    key = Key("admin", new_secret(), frozenset(ROLES), time.time())
    store.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # O_EXCL: of nodes starting together on one state dir, one creates the key
        fd = os.open(store.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    os.close(fd)
    store._keys = {key.id: key}
    store.save()
    return key
