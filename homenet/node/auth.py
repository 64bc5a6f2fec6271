"""Proof of a key without sending it: timestamped, single-use HMAC tokens.

A client proves it holds key ``ID`` by sending ``key=ID ts=UNIX nonce=N mac=M`` where
``M = HMAC-SHA256(secret, context | ID | ts | nonce)`` and ``context`` is the very thing it
asks for (``HN/1 CONNECT 10.0.0.5:22`` on the data plane, the method name on gRPC). The
verifier checks the clock-skew window (``SKEW`` seconds either way), refuses a nonce it has
already seen within the window (replay), and compares MACs in constant time. Tokens need no
round trip, so a client can still pipeline a whole chain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from homenet.node.errors import Code, HomeNetError
from homenet.node.keys import Key, Secret
from homenet.node.limits import SourceLimiter
from homenet.node.log import fields
from homenet.node.replay import ReplayTable, ReplayTableFull

log = logging.getLogger("homenet.auth")

#: Seconds a token's timestamp may differ from the verifier's clock, either way.
SKEW = 60.0
#: Nonces remembered per key at most. A key that logs in faster than this per window is told
#: to slow down; a nonce is never forgotten before its token expires (that would allow a replay).
REPLAY_CACHE = 50_000


class AuthError(HomeNetError):
    """Authentication failed; ``reason`` is safe to send to the peer."""

    def __init__(self, reason: str, *, forbidden: bool = False) -> None:
        super().__init__(reason, Code.FORBIDDEN if forbidden else Code.UNAUTHORIZED)
        #: True: the key is valid but lacks the role (not a failed login).
        self.forbidden = forbidden


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def mac(secret: Secret, context: str, key_id: str, ts: str, nonce: str) -> str:
    msg = "\n".join((context, key_id, ts, nonce)).encode("utf-8")
    return _b64(hmac.new(secret.reveal().encode("ascii"), msg, hashlib.sha256).digest())


@dataclass(frozen=True)
class Credentials:
    """A client's key: makes tokens."""

    key_id: str
    secret: Secret

    def token(self, context: str, now: float | None = None) -> dict[str, str]:
        ts = str(int(time.time() if now is None else now))
        nonce = _b64(secrets.token_bytes(12))
        return {"key": self.key_id, "ts": ts, "nonce": nonce, "mac": mac(self.secret, context, self.key_id, ts, nonce)}


class KeyLookup(Protocol):
    """Where a verifier finds keys (a node's :class:`KeyStore`, or the one fleet key)."""

    def get(self, key_id: str) -> Key | None: ...


class Verifier:
    """Checks tokens against a :class:`KeyStore`; owns the replay cache (and checks the one the
    processes of a multi-worker node share, ``shared``, after its own)."""

    def __init__(
        self,
        keys: KeyLookup,
        clock: Callable[[], float] = time.time,
        skew: float = SKEW,
        shared: ReplayTable | None = None,
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.skew = skew
        self.shared = shared
        self._seen: dict[str, OrderedDict[str, float]] = {}  # key id -> nonce -> forget after

    def verify(self, context: str, token: dict[str, str], role: str) -> Key:
        """The key that signed ``context``, if it holds ``role``; raises :class:`AuthError`."""
        kid, ts, nonce, got = (token.get(k, "") for k in ("key", "ts", "nonce", "mac"))
        if not kid:
            raise AuthError(f"this needs a key with the {role} role (set HOMENET_KEY=ID:SECRET)")
        if not (ts.isascii() and ts.isdigit() and len(ts) <= 12) or not (8 <= len(nonce) <= 64) or not got:
            raise AuthError("malformed credentials")
        now = self.clock()
        if abs(now - int(ts)) > self.skew:
            raise AuthError(f"credentials expired or clock skew over {self.skew:g}s (check the client's clock)")
        key = self.keys.get(kid)
        expected = mac(key.secret if key else Secret("x" * 32), context, kid, ts, nonce)
        if not hmac.compare_digest(expected.encode("ascii"), got.encode("ascii", "replace")) or key is None:
            raise AuthError("bad credentials")
        seen = self._seen.setdefault(kid, OrderedDict())
        while seen and next(iter(seen.values())) <= now:
            seen.popitem(last=False)
        if nonce in seen:
            raise AuthError("replayed credentials")
        if len(seen) >= REPLAY_CACHE:
            raise AuthError(f"key {kid} logs in too often; retry in a minute", forbidden=True)
        until = now + 2 * self.skew
        if self.shared is not None:
            try:
                if not self.shared.claim(kid, nonce, now, until):
                    raise AuthError("replayed credentials")
            except ReplayTableFull:
                busy = "this node took too many logins in the last 2 minutes; retry in a minute"
                raise AuthError(busy, forbidden=True) from None
        seen[nonce] = until
        if not key.allows(role):
            raise AuthError(f"key {kid} lacks the {role} role", forbidden=True)
        return key


class Authorizer:
    """Checks a request's token for a role; a failed login counts against its source (see
    :class:`SourceLimiter`: enough of them block the source for a while)."""

    def __init__(self, verifier: Verifier, limiter: SourceLimiter) -> None:
        self.verifier = verifier
        self.limiter = limiter

    def authorize(self, context: str, token: dict[str, str], role: str, source: str) -> Key:
        """The key that signed ``context`` if it holds ``role``; raises :class:`AuthError`."""
        if source and self.limiter.blocked(source):  # it came through a relay: no accept to close it at
            raise AuthError("source blocked after repeated failed authentication", forbidden=True)
        try:
            return self.verifier.verify(context, token, role)
        except AuthError as exc:
            if not exc.forbidden and source and self.limiter.failed(source):
                log.warning("auth.source_blocked", extra=fields(source=source))
            raise
