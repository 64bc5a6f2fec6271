"""The relay's directory of listeners: who holds which listenId, and their live sessions.

A registration is *online* while its stream is up. When the stream is lost it goes
*offline* for ``offline_hold`` seconds: clients get "listener offline" at once, and only the
owner (who proves it with the resumption secret) can take the id back. After the hold, or
on kick, the id is free again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from homenet.node.errors import Code, HomeNetError

LISTEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Events a slow listener may leave unread before its session is dropped.
OUTBOX_LIMIT = 1024
#: Takeovers of a live registration within WAR_WINDOW seconds that mean two processes share
#: one identity (a reconnecting owner takes over a dead stream once, not again and again);
#: then takeovers of that listenId are refused for WAR_HOLD seconds and the holder keeps it.
WAR_TAKEOVERS = 3
WAR_WINDOW = 10.0
WAR_HOLD = 60.0


class ListenerError(HomeNetError):
    """A registration the relay refuses; the message is safe to show the caller."""

    default_code = Code.BAD_REQUEST


class ListenerConflict(ListenerError):
    """The listenId is held by another owner."""

    default_code = Code.CONFLICT


class TakeoverWar(ListenerConflict):
    """Two live processes share one identity and keep taking the listenId from each other."""

    default_code = Code.LOCKED


class BadListenId(ListenerError):
    """The listenId does not match ``[A-Za-z0-9_-]{1,64}``."""


class ListenerLoop(ListenerError):
    """The registration comes from this very node (its stream loops back)."""

    default_code = Code.LOOP


class ListenerForbidden(ListenerError):
    """The caller's key (or lack of one) may not claim this listenId."""

    default_code = Code.FORBIDDEN


class ListenerNotFound(ListenerError):
    """No such listenId."""

    default_code = Code.NOT_FOUND


class ListenerOffline(ListenerError):
    """The listenId is known but its owner is away."""

    default_code = Code.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Incoming:
    """Event: a client waits; dial back with the ticket."""

    ticket: str
    client: str
    expires_in: float
    #: Where to dial back (``host:port``; empty: the relay's address the listener knows).
    endpoint: str = ""


@dataclass(frozen=True, slots=True)
class PoolGrant:
    """Event: permission to park one warm connection."""

    ticket: str
    expires_in: float
    #: Where to park it (as :attr:`Incoming.endpoint`).
    endpoint: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Event: liveness probe; the listener answers with a pong."""

    seq: int


@dataclass(frozen=True, slots=True)
class QueryEvent:
    """Event: answer a discovery query (``query`` is a :class:`homenet.node.query.Query`)."""

    id: int
    query: object


Event = Incoming | PoolGrant | Ping | QueryEvent


class ListenerSession:
    """The relay's handle on one live Listen stream; the control layer drains its events."""

    def __init__(self, peer: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = peer
        self._clock = clock
        self.last_heard = clock()
        self._events: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.close_reason = ""

    def send(self, event: Event) -> None:
        """Queue an event; a listener that lets OUTBOX_LIMIT pile up is dropped."""
        if self.closed:
            return
        if len(self._events) >= OUTBOX_LIMIT:
            self.close("listener is not reading its events")
            return
        self._events.append(event)
        self._wakeup.set()

    async def next_event(self) -> Event | None:
        """The next event to deliver, or None once the session is closed."""
        while not self._events:
            if self.closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return None if self.closed else self._events.popleft()

    def heard(self) -> None:
        self.last_heard = self._clock()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._events.clear()
            self._wakeup.set()


@dataclass(eq=False)
class Listener:
    """One listenId's registration and its counters."""

    listen_id: str
    secret_digest: bytes
    name: str = ""
    version: str = ""
    peer: str = ""
    #: The key it registered with ("" for an anonymous registration).
    key_id: str = ""
    since: float = field(default_factory=time.time)
    session: ListenerSession | None = None
    offline_since: float | None = None
    pool_size: int = 0
    pool: deque[socket.socket] = field(default_factory=deque)
    grants_out: int = 0
    active: int = 0
    total: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    #: When live registrations of this listenId were taken over (newest last, bounded).
    takeovers: deque[float] = field(default_factory=lambda: deque(maxlen=WAR_TAKEOVERS))
    #: Until when takeovers are refused (a takeover war was seen).
    war_until: float = 0.0
    #: When this registration was made (ns since the Unix epoch): in a fleet the newest wins.
    registered_at: int = field(default_factory=time.time_ns)

    @property
    def online(self) -> bool:
        return self.session is not None and not self.session.closed


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


class ListenerRegistry:
    """listenId -> :class:`Listener`; the one owner of registration rules."""

    def __init__(
        self,
        offline_hold: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        secret_for: Callable[[str], str] | None = None,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        self.offline_hold = offline_hold
        self._clock = clock
        #: The resumption secret of a listenId when it is derived (a fleet), else random.
        self.secret_for = secret_for
        #: Told of every listenId the registry forgets (expired, kicked, moved away).
        self.on_forget = on_forget
        self._by_id: dict[str, Listener] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Listener]:
        return sorted(self._by_id.values(), key=lambda lst: lst.listen_id)

    def online_count(self) -> int:
        return sum(1 for lst in self._by_id.values() if lst.online)

    def claim(self, listen_id: str, resume_secret: str) -> tuple[Listener, str, Listener | None]:
        """Grant ``listen_id`` (or a random one if empty).

        Returns the listener record, the secret the caller must keep, and the stale live
        record of the same owner that this claim replaces (the caller closes its session).
        Raises :class:`ListenerConflict` if another owner holds the id, :class:`BadListenId`.
        """
        self.expire()
        if not listen_id:
            listen_id = self._random_id()
            resume_secret = ""
        elif not LISTEN_ID.fullmatch(listen_id):
            raise BadListenId(f"bad listenId {listen_id[:80]!r}: expected [A-Za-z0-9_-]{{1,64}}")
        existing = self._by_id.get(listen_id)
        replaced: Listener | None = None
        if existing is not None:
            if not resume_secret or not hmac.compare_digest(_digest(resume_secret), existing.secret_digest):
                state = "a live node" if existing.online else "its owner (offline, may come back)"
                raise ListenerConflict(f"listenId {listen_id} is held by {state}")
            if existing.online:
                self._check_war(existing)
                replaced = existing
        secret = (
            self.secret_for(listen_id) if self.secret_for is not None else resume_secret or secrets.token_urlsafe(24)
        )
        record = Listener(listen_id, _digest(secret))
        if existing is not None:  # keep the counters and the takeover history across reconnects
            record.total, record.bytes_up, record.bytes_down = existing.total, existing.bytes_up, existing.bytes_down
            record.active = existing.active
            record.takeovers, record.war_until = existing.takeovers, existing.war_until
            if replaced is not None:
                record.takeovers.append(self._clock())
        self._by_id[listen_id] = record
        return record, secret, replaced

    def _check_war(self, live: Listener) -> None:
        """Refuse a takeover of ``live`` if its id is being taken back and forth."""
        now = self._clock()
        recent = sum(1 for t in live.takeovers if now - t < WAR_WINDOW)
        if live.war_until <= now and recent < WAR_TAKEOVERS - 1:
            return
        if live.war_until <= now:
            live.war_until = now + WAR_HOLD
        raise TakeoverWar(
            f"listenId {live.listen_id} is claimed by two live processes with one identity (taken over "
            f"{recent + 1} times in {WAR_WINDOW:g}s): this one gives up; give each process its own "
            "--state-dir (or --listen-id)"
        )

    def _random_id(self) -> str:
        while True:
            candidate = secrets.token_urlsafe(12)  # 96 bits
            if candidate not in self._by_id:
                return candidate

    def get(self, listen_id: str) -> Listener:
        """The online listener for ``listen_id``; raises NotFound or Offline."""
        lst = self._by_id.get(listen_id)
        if lst is None:
            raise ListenerNotFound(f"no listener {listen_id} on this relay")
        if not lst.online:
            if lst.offline_since is not None and self._clock() - lst.offline_since > self.offline_hold:
                self._forget(listen_id)
                raise ListenerNotFound(f"no listener {listen_id} on this relay")
            raise ListenerOffline(f"listener {listen_id} is offline (its node is reconnecting or gone)")
        return lst

    def lookup(self, listen_id: str) -> Listener | None:
        """The record for ``listen_id`` whatever its state."""
        return self._by_id.get(listen_id)

    def went_offline(self, lst: Listener) -> None:
        """Its stream ended: keep the record for the hold period."""
        if self._by_id.get(lst.listen_id) is lst:
            lst.offline_since = self._clock()

    def remove(self, listen_id: str) -> Listener | None:
        lst = self._by_id.get(listen_id)
        if lst is not None:
            self._forget(listen_id)
        return lst

    def _forget(self, listen_id: str) -> None:
        del self._by_id[listen_id]
        if self.on_forget is not None:
            self.on_forget(listen_id)

    def expire(self) -> None:
        """Forget offline records older than the hold."""
        now = self._clock()
        for lid in [
            lid
            for lid, lst in self._by_id.items()
            if not lst.online and lst.offline_since is not None and now - lst.offline_since > self.offline_hold
        ]:
            self._forget(lid)
