"""The relay role: listeners register over the control plane, clients reach them by listenId.

A client's ``CONNECT <listenId>`` is served from the listener's warm pool of parked
connections when one is there, else by asking the listener (an :class:`Incoming` event with
a one-time ticket) to dial back with ``TICKET <ticket>``. Either way the relay activates the
listener's connection with ``HN/1 200 ok hop=N`` (N = hops the connection has gone
through), then the node splices it to the client like any target.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from homenet.node.address import MAX_HOPS, ListenId
from homenet.node.connection import Handshake
from homenet.node.dialback import DialBacks, DialWaiter, TicketOwner, split_ticket
from homenet.node.errors import Code, RouteError
from homenet.node.fleet import Entry, Fleet
from homenet.node.keys import Key, KeyStore
from homenet.node.limits import SourceLimiter, source_of
from homenet.node.listeners import (
    Listener,
    ListenerConflict,
    ListenerError,
    ListenerForbidden,
    ListenerLoop,
    ListenerRegistry,
    ListenerSession,
    Ping,
)
from homenet.node.log import fields
from homenet.node.pool import ParkedPool
from homenet.node.preamble import Verb, encode_reply
from homenet.node.query import ListenerQueries
from homenet.node.sessions import SessionInfo, Target
from homenet.node.tickets import TicketBook

log = logging.getLogger("homenet.relay")

#: Serves a data-plane request with another verb than CONNECT; True when it took the socket.
VerbHandler = Callable[[Handshake], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Knobs of the relay role (defaults suit a public relay)."""

    #: Seconds a dial-back ticket is valid and a client waits for its listener.
    dialback_timeout: float = 5.0
    #: Seconds a pool grant is valid.
    pool_ticket_ttl: float = 30.0
    #: Most parked connections one listener may keep.
    max_pool: int = 16
    #: Listeners one source may hold anonymously (rl_auth open), and one key (admin: any).
    max_listeners_per_source: int = 64
    max_listeners_per_key: int = 64
    #: Seconds between pings on a listener stream (3 missed = dead).
    ping_interval: float = 2.0
    #: Seconds an offline listenId stays reserved for its owner.
    offline_hold: float = 60.0
    #: Seconds a parked connection may wait before the relay recycles it.
    pool_max_age: float = 300.0
    #: ``required``: a listen key claims its own id; ``open``: anonymous ids too.
    rl_auth: str = "required"
    #: Sessions one listener may have at once.
    max_listener_sessions: int = 1000
    #: Where listeners dial back and park (``host:port`` of this very relay, e.g. its pod
    #: address behind a load balancer); empty: the address they reached the relay at.
    advertise: str = ""


@dataclass(frozen=True, slots=True)
class Registration:
    """What a listener asks for when it registers."""

    listen_id: str
    resume_secret: str
    name: str
    version: str
    pool_size: int
    node_id: str


def printable(text: str) -> str:
    """What a peer sent, for logs and operators' screens: control characters replaced."""
    return "".join(c if c.isprintable() else "?" for c in text)


class Relay:
    """Relay role of one node: registration, the listener directory, dial-back, the warm pool,
    query forwarding, and the housekeeping (pings, expiry) that keeps them true."""

    def __init__(
        self,
        limiter: SourceLimiter,
        keys: KeyStore,
        node_id: str,
        settings: RelaySettings | None = None,
        fleet: Fleet | None = None,
        services: Callable[[str], bool] | None = None,
    ) -> None:
        self.limiter = limiter
        #: Whether a listenId names a service this node discovered: no registration may take it.
        self.services = services
        self.keys = keys
        #: The id of this node process: a registration from it is a loop.
        self.node_id = node_id
        self.settings = s = settings or RelaySettings()
        self.fleet = fleet
        if fleet is not None:
            fleet.directory.on_upsert(self.superseded)
        self.registry = ListenerRegistry(
            s.offline_hold,
            secret_for=fleet.key.resume_secret if fleet is not None else None,
            on_forget=fleet.feed.remove if fleet is not None else None,
        )
        tickets: TicketBook[TicketOwner] = TicketBook()
        self.tickets = tickets
        prefix = fleet.ticket_prefix if fleet is not None else ""
        self.dialbacks = DialBacks(tickets, limiter, s.dialback_timeout, s.advertise, prefix)
        self.pool = ParkedPool(tickets, limiter, s.pool_ticket_ttl, s.pool_max_age, s.advertise, prefix)
        self.queries = ListenerQueries(self.registry)
        self._seq = 0
        self._ticker: asyncio.Task[None] | None = None

    @property
    def verbs(self) -> Mapping[Verb, VerbHandler]:
        """The data-plane verbs of this role: listeners dialing back and parking."""
        return {Verb.TICKET: self._dial_back, Verb.POOL: self._park}

    async def _dial_back(self, hs: Handshake) -> bool:
        return await self._ticketed(hs) or self.dialbacks.redeem(hs)

    async def _park(self, hs: Handshake) -> bool:
        return await self._ticketed(hs) or self.pool.park(hs)

    async def _ticketed(self, hs: Handshake) -> bool:
        """A ticket another relay of the fleet issued (the listener's dial-back reached us
        through the shared address) goes on to that relay; True when it went."""
        if self.fleet is None:
            return False
        assert hs.request is not None
        if self.fleet.forwarded(hs):
            self.fleet.verify(hs)  # a peer passed it on: ours or nobody's, never forwarded again
            return False
        prefix, _ = split_ticket(hs.request.arg)
        if not prefix or prefix == self.fleet.ticket_prefix:
            return False
        return await self.fleet.forward_verb(hs, prefix)

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self, spread: float = 0.0) -> None:
        """End every listener's stream (they reconnect, to another relay of a fleet); with
        ``spread`` the ends are jittered over that many seconds so they do not all come back
        at once."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        listeners = self.registry.all()
        random.shuffle(listeners)
        step = spread / len(listeners) if listeners and spread > 0 else 0.0
        for lst in listeners:
            if lst.session is not None:
                lst.session.close("relay shutting down: reconnect elsewhere")
            self.pool.drop(lst)
            if step:
                await asyncio.sleep(step)

    # -- registration (called by the control plane) ------------------------------------------
    def register(self, reg: Registration, peer: str, key: Key | None = None) -> tuple[Listener, ListenerSession, str]:
        """Admit a listener; returns its record, its session and the secret to hand back.

        ``key`` is the verified key of the caller (None: anonymous). With a key, the caller
        claims the listenId equal to the key id, or one in its namespace (``KEYID-suffix``,
        unless that is another key's id); an admin key may claim any. Anonymous callers
        (``rl_auth=open`` only) get a random id or claim one no key reserves.
        """
        if reg.node_id and reg.node_id == self.node_id:
            raise ListenerLoop("this relay is the registering node itself: the --rl route loops back")
        claim = self._claimable(reg.listen_id, key)
        self._check_share(claim, peer, key)
        self._check_fleet(claim, reg.resume_secret)
        lst, secret, replaced = self.registry.claim(claim, reg.resume_secret)
        if replaced is not None and replaced.session is not None:
            replaced.session.close("replaced by a newer registration of the same owner")
            self._offline(replaced)
        session = ListenerSession(peer)
        lst.session = session
        lst.name, lst.version, lst.peer = printable(reg.name), printable(reg.version), peer
        lst.key_id = key.id if key is not None else ""
        lst.pool_size = min(max(reg.pool_size, 0), self.settings.max_pool)
        log.info(
            "listener.registered",
            extra=fields(
                listen_id=lst.listen_id, peer=peer, name=reg.name, pool=lst.pool_size, takeover=bool(replaced)
            ),
        )
        self.pool.refill(lst)
        self._announce(lst)
        return lst, session, secret

    def _check_share(self, claim: str, peer: str, key: Key | None) -> None:
        """One source (anonymous) or one key (not admin) holds a bounded number of listenIds;
        a reconnecting owner taking its own id back is not a new one."""
        if key is not None and "admin" in key.roles:
            return
        s = self.settings
        if key is None:
            source = source_of(peer)
            held = [x for x in self.registry.all() if not x.key_id and source_of(x.peer) == source]
            cap, who = s.max_listeners_per_source, "this source"
        else:
            held = [x for x in self.registry.all() if x.key_id == key.id]
            cap, who = s.max_listeners_per_key, f"key {key.id}"
        if len([x for x in held if x.listen_id != claim]) >= cap:
            raise ListenerForbidden(f"{who} holds {cap} listeners already (the relay's limit)")

    def _check_fleet(self, claim: str, resume_secret: str) -> None:
        """A listenId another relay of the fleet holds (or held moments ago) is its owner's:
        only the owner's resumption secret moves it here."""
        fleet = self.fleet
        if fleet is None or not claim or self.registry.lookup(claim) is not None:
            return
        if fleet.directory.known(claim) and not hmac.compare_digest(resume_secret, fleet.key.resume_secret(claim)):
            raise ListenerConflict(f"listenId {claim} is held by a live node on another relay of the fleet")

    def _announce(self, lst: Listener) -> None:
        """Tell the fleet (our feed) what this relay now holds for ``lst``."""
        if self.fleet is not None and self.registry.lookup(lst.listen_id) is lst:
            self.fleet.feed.upsert(Entry(lst.listen_id, lst.registered_at, lst.online))

    def superseded(self, entry: Entry, relay_id: str) -> None:
        """A peer holds a newer registration of ``entry.listen_id``: ours is stale, close it
        (the listener reconnected to that relay; two owners must never stay)."""
        lst = self.registry.lookup(entry.listen_id)
        if lst is None or not entry.online or entry.registered_at <= lst.registered_at:
            return
        if lst.session is not None:
            lst.session.close(f"replaced by a newer registration on relay {relay_id[:12]}")
        self._offline(lst)
        self.registry.remove(lst.listen_id)
        log.info("listener.moved", extra=fields(listen_id=lst.listen_id, relay=relay_id[:12]))

    def _claimable(self, claim: str, key: Key | None) -> str:
        """The listenId the caller may claim for ``claim``; raises ListenerForbidden."""
        if key is not None:
            claim = claim or key.id
            own = claim == key.id or (claim.startswith(f"{key.id}-") and claim not in self.keys.reserved_listen_ids())
            if not own and "admin" not in key.roles:
                raise ListenerForbidden(
                    f"key {key.id} may claim only the listenId {key.id} or {key.id}-SUFFIX, not {claim[:64]}"
                )
        elif self.settings.rl_auth != "open":
            raise ListenerForbidden("this relay needs a listen key (set HOMENET_KEY=ID:SECRET)")
        elif claim and claim in self.keys.reserved_listen_ids():
            raise ListenerForbidden(f"listenId {claim} is reserved for key {claim}")
        admin = key is not None and "admin" in key.roles
        if claim and not admin and self.services is not None and self.services(claim):
            raise ListenerForbidden(f"listenId {claim} names a service this node found on its LAN")
        return claim

    def unregister(self, lst: Listener, session: ListenerSession, reason: str) -> None:
        """The stream of ``session`` ended: the listener goes offline (if still current)."""
        session.close(reason)
        if lst.session is session:
            self._offline(lst)
            self.registry.went_offline(lst)
            self._announce(lst)
            log.info("listener.offline", extra=fields(listen_id=lst.listen_id, reason=reason))

    def kick(self, listen_id: str) -> bool:
        """End a listener's stream and forget its id; False if there is no such listener."""
        lst = self.registry.remove(listen_id)
        if lst is None:
            return False
        if lst.session is not None:
            lst.session.close("kicked by the operator")
        self._offline(lst)
        log.info("listener.kicked", extra=fields(listen_id=listen_id))
        return True

    def _offline(self, lst: Listener) -> None:
        session = lst.session
        if session is not None:
            self.tickets.revoke(
                lambda owner: owner is lst or (isinstance(owner, DialWaiter) and owner.session is session),
                on_revoke=self._ticket_died,
            )
            self.queries.fail(session)
            session.close(session.close_reason or "offline")
        self.pool.drop(lst)
        lst.session = None

    def _ticket_died(self, owner: TicketOwner) -> None:
        if isinstance(owner, DialWaiter):
            self.dialbacks.died(owner)
        else:
            self.pool.grant_died(owner)

    # -- data plane (the router's Listeners) -----------------------------------------------------
    def lookup(self, hop: ListenId) -> Listener | None:
        """The online listener ``hop``, None if unknown; raises ListenerOffline (503)."""
        try:
            return self.registry.get(hop.value)
        except ListenerError as exc:
            if exc.code is Code.NOT_FOUND:
                return None
            raise

    async def connect(self, hs: Handshake, lst: Listener) -> Target:
        """Reach ``lst`` for a client: from its pool, else by dial-back."""
        depth = hs.depth + 1
        if depth > MAX_HOPS:
            raise RouteError(Code.HOP_LIMIT, f"route longer than {MAX_HOPS} hops")
        if lst.active >= self.settings.max_listener_sessions:
            raise RouteError(Code.TOO_MANY, f"listener {lst.listen_id} at its limit of {lst.active} sessions")
        session = lst.session
        assert session is not None
        sock = self.pool.take(lst)
        if sock is None:
            sock = await self.dialbacks.wait(lst, session, hs.peer)
        lst.active += 1
        lst.total += 1

        def done(info: SessionInfo) -> None:
            lst.active -= 1
            lst.bytes_up += info.bytes_up
            lst.bytes_down += info.bytes_down

        # the activation line goes out with the client's first bytes, in one send
        # the client's address goes along: the listener's node penalises failed logins by it
        greeting = encode_reply(Code.OK, fields={"hop": str(depth), "client": hs.peer.split(" ", 1)[0]})
        return Target(sock, f"listener {lst.listen_id}", done, greeting=greeting)

    # -- housekeeping ------------------------------------------------------------------------
    async def _tick(self) -> None:
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self._housekeeping()
            except Exception:  # never let housekeeping die silently
                log.exception("relay.housekeeping_failed")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.tickets.sweep()
        self.registry.expire()
        self._seq += 1
        dead_after = 3 * self.settings.ping_interval
        for lst in self.registry.all():
            session = lst.session
            if session is None:
                continue
            if now - session.last_heard > dead_after:
                self.unregister(lst, session, f"no pong for {dead_after:g}s")
                continue
            session.send(Ping(self._seq))
            self.pool.recycle(lst, now)


__all__ = ["ListenerError", "Registration", "Relay", "RelaySettings"]
