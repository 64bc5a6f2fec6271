"""The fleet: many relays behind one address act as one relay (the core; gRPC lives in
``homenet.control.fleet``).

Each relay is the only source of truth for its own listeners (:class:`LocalFeed`); its peers
watch that feed and keep a copy (:class:`FleetDirectory`), dropping it when the watch dies.
A client at relay X for a listener owned by relay Y is forwarded over one internal data-plane
hop, signed with the fleet key and marked ``fwd``: a forwarded request is served from the
owner's own listeners or refused, never forwarded again, so no route can loop.

A listener's resumption secret is derived from the fleet key and its listenId, so any relay of
the fleet can verify a listener that moves to it; registrations carry the time they were made
and the newest one wins.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from homenet.node.address import Endpoint, ListenId
from homenet.node.auth import Credentials, Verifier
from homenet.node.client import next_reply
from homenet.node.connection import Handshake
from homenet.node.dialer import connect_first, describe_os_error, system_resolve
from homenet.node.errors import Code, RouteError
from homenet.node.handoff import HandedOff, Handoff, HandoffError
from homenet.node.keys import Key, Secret, key_from_file
from homenet.node.preamble import ProtocolError, ReplyParser, Verb, encode_request
from homenet.node.replay import ReplayTable
from homenet.node.sessions import Target
from homenet.node.splice import Splices
from homenet.node.tls import TLSError, connect_tls

#: The request field that marks a hop forwarded by a peer (its value: the forwarder's id).
FWD = "fwd"
#: The role of the fleet key (it is not a key of the node's keys file).
FLEET_ROLE = "fleet"


class FleetKey:
    """The key every relay of one fleet shares: it signs peer calls and forwarded hops, and
    derives listeners' resumption secrets."""

    def __init__(self, key_id: str, secret: Secret) -> None:
        self.id = key_id
        self.secret = secret
        self._key = Key(key_id, secret, frozenset({FLEET_ROLE}))

    @classmethod
    def load(cls, path: str) -> FleetKey:
        """Read ``ID:SECRET`` from a file; raises KeyFileError."""
        return cls(*key_from_file(Path(path)))

    @property
    def creds(self) -> Credentials:
        return Credentials(self.id, self.secret)

    def get(self, key_id: str) -> Key | None:
        """The fleet key if ``key_id`` names it (a verifier's key lookup)."""
        return self._key if hmac.compare_digest(key_id, self.id) else None

    def resume_secret(self, listen_id: str) -> str:
        """The resumption secret of ``listen_id`` in this fleet (the same on every relay)."""
        mac = hmac.new(self.secret.reveal().encode(), f"homenet resume\n{listen_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:24]).decode()


@dataclass(frozen=True, slots=True)
class Entry:
    """A listener in a relay's directory."""

    listen_id: str
    #: When its owner registered it (ns since the Unix epoch, by the owner's clock).
    registered_at: int
    online: bool


@dataclass(frozen=True, slots=True)
class Owner:
    """The peer that owns a listener, and how to reach it."""

    relay_id: str
    target: Endpoint
    entry: Entry


# -- this relay's own directory, as its peers see it ---------------------------------------------
class Subscription:
    """One watcher of a :class:`LocalFeed`: the snapshot it started from, then changes."""

    def __init__(self, snapshot: list[Entry], limit: int) -> None:
        self.snapshot = snapshot
        #: (upserted, removed) batches; None: the watcher fell behind and must start over.
        self.changes: asyncio.Queue[tuple[list[Entry], list[str]] | None] = asyncio.Queue()
        self._limit = limit
        self.cut = False

    def push(self, upserted: list[Entry], removed: list[str]) -> None:
        if self.cut:
            return
        if self.changes.qsize() >= self._limit:  # bounded: a slow watcher resyncs from a snapshot
            self.cut = True
            self.changes.put_nowait(None)
            return
        self.changes.put_nowait((upserted, removed))


class LocalFeed:
    """The listeners registered on this relay, and everyone watching them."""

    def __init__(self, queue_limit: int = 10_000) -> None:
        self.entries: dict[str, Entry] = {}
        self._subs: set[Subscription] = set()
        self._limit = queue_limit

    def upsert(self, entry: Entry) -> None:
        self.entries[entry.listen_id] = entry
        for sub in self._subs:
            sub.push([entry], [])

    def remove(self, listen_id: str) -> None:
        if self.entries.pop(listen_id, None) is not None:
            for sub in self._subs:
                sub.push([], [listen_id])

    def subscribe(self) -> Subscription:
        sub = Subscription(list(self.entries.values()), self._limit)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)


# -- what this relay knows of its peers ----------------------------------------------------------
@dataclass(slots=True)
class PeerView:
    """One peer as this relay sees it through its watch."""

    target: Endpoint
    relay_id: str = ""
    epoch: int = 0
    name: str = ""
    #: The data-plane address it says it has (informational: hops go to ``target``).
    address: str = ""
    #: connecting, up, self, down
    state: str = "connecting"
    entries: dict[str, Entry] = field(default_factory=dict)
    last_seen: float = 0.0
    forwarded: int = 0
    error: str = ""


#: Told of every entry a peer announces (the relay closes a local registration it makes stale).
OnUpsert = Callable[[Entry, str], None]


class FleetDirectory:
    """The peers' listeners, as their watches report them; bounded by what the peers hold.

    When a peer's watch dies its entries are dropped at once; their listenIds answer
    ``432 moving`` for ``moving_hold`` seconds (the listeners are reconnecting to another
    relay), then are forgotten.
    """

    def __init__(self, self_id: str, moving_hold: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.self_id = self_id
        self.moving_hold = moving_hold
        self.clock = clock
        self._upsert_watchers: list[OnUpsert] = []
        self.peers: dict[Endpoint, PeerView] = {}
        self._moving: dict[str, float] = {}

    # -- the watches' side ---------------------------------------------------------------------
    def target(self, target: Endpoint) -> PeerView:
        view = self.peers.get(target)
        if view is None:
            view = self.peers[target] = PeerView(target)
        return view

    def forget_target(self, target: Endpoint) -> None:
        """``target`` is no longer a peer (DNS stopped naming it)."""
        if target in self.peers:
            self.down(target, "no longer a peer")
            del self.peers[target]

    def up(self, target: Endpoint, relay_id: str, epoch: int, name: str, address: str = "") -> bool:
        """The watch of ``target`` says who it is; False when it is this relay itself."""
        view = self.target(target)
        if relay_id == self.self_id:
            view.state, view.relay_id = "self", relay_id
            return False
        if view.epoch and epoch != view.epoch:  # it restarted: what it had is gone
            view.entries.clear()
        view.relay_id, view.epoch, view.name, view.state, view.error = relay_id, epoch, name, "up", ""
        view.address = address
        view.last_seen = self.clock()
        return True

    def snapshot(self, target: Endpoint, entries: list[Entry]) -> None:
        view = self.target(target)
        view.entries = {e.listen_id: e for e in entries}
        view.last_seen = self.clock()
        for e in entries:
            self._seen(e, view.relay_id)

    def delta(self, target: Endpoint, upserted: list[Entry], removed: list[str]) -> None:
        view = self.target(target)
        for e in upserted:
            view.entries[e.listen_id] = e
            self._seen(e, view.relay_id)
        for lid in removed:
            view.entries.pop(lid, None)
        view.last_seen = self.clock()

    def heard(self, target: Endpoint) -> None:
        self.target(target).last_seen = self.clock()

    def down(self, target: Endpoint, error: str) -> None:
        """The watch of ``target`` died: its listeners are moving for a while."""
        view = self.peers.get(target)
        if view is None or view.state == "self":
            return
        until = self.clock() + self.moving_hold
        for lid in view.entries:  # online or held for a reconnecting listener: either way it moves
            self._moving[lid] = until
        view.entries.clear()
        view.state, view.error = "down", error[:200]

    def on_upsert(self, watcher: OnUpsert) -> None:
        """Tell ``watcher`` of every entry a peer announces from now on."""
        self._upsert_watchers.append(watcher)

    def _seen(self, e: Entry, relay_id: str) -> None:
        self._moving.pop(e.listen_id, None)
        for watcher in self._upsert_watchers:
            watcher(e, relay_id)

    # -- the router's side ---------------------------------------------------------------------
    def lookup(self, listen_id: str) -> Owner | None:
        """The peer holding the newest registration of ``listen_id`` (online ones first)."""
        best: Owner | None = None
        for view in self.peers.values():
            e = view.entries.get(listen_id) if view.state == "up" else None
            if e is None:
                continue
            if best is None or (e.online, e.registered_at) > (best.entry.online, best.entry.registered_at):
                best = Owner(view.relay_id, view.target, e)
        return best

    def moving(self, listen_id: str) -> bool:
        until = self._moving.get(listen_id)
        if until is None:
            return False
        if until < self.clock():
            del self._moving[listen_id]
            return False
        return True

    def known(self, listen_id: str) -> bool:
        """Some peer holds ``listen_id``, or held it moments ago."""
        return self.lookup(listen_id) is not None or self.moving(listen_id)

    def by_relay(self, relay_id: str) -> PeerView | None:
        return next((v for v in self.peers.values() if v.relay_id == relay_id and v.state == "up"), None)

    def counts(self) -> tuple[int, int, int]:
        """(peers up, peers, listeners the peers hold) for operators."""
        views = [v for v in self.peers.values() if v.state != "self"]
        up = [v for v in views if v.state == "up"]
        return len(up), len(views), sum(len(v.entries) for v in up)

    def moving_count(self) -> int:
        now = self.clock()
        return sum(1 for until in self._moving.values() if until >= now)


#: Seconds a listenId no peer had is not asked about again (a registration reaches the
#: directories within a heartbeat anyway), and how many such misses are remembered.
MISS_TTL = 1.0
MAX_MISSES = 10_000
#: Asks every peer at once who owns a listenId (a directory miss); None if nobody does.
AskPeers = Callable[[str], Awaitable[Owner | None]]


class Fleet:
    """This relay's place in its fleet: where listeners are, and the hops to their owners."""

    def __init__(
        self,
        key: FleetKey,
        relay_id: str,
        directory: FleetDirectory,
        feed: LocalFeed,
        dial_timeout: float = 5.0,
        ask: AskPeers | None = None,
        tls: ssl.SSLContext | None = None,
        tls_name: str | None = None,
        handoff: Handoff | None = None,
        replay: ReplayTable | None = None,
    ) -> None:
        self.key = key
        self.relay_id = relay_id
        #: Every ticket this relay issues starts with it, so a peer knows where a dial-back goes.
        self.ticket_prefix = relay_id[:12]
        self.directory = directory
        self.feed = feed
        self.dial_timeout = dial_timeout
        self.ask = ask
        self.verifier = Verifier(key, shared=replay)
        self.splices = Splices()
        #: listenIds no peer had, until when (bounded); asks in flight, shared by their askers.
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._asking: dict[str, asyncio.Future[Owner | None]] = {}
        #: Peers speak TLS when this relay does (one fleet, one way); verified as ``tls_name``.
        self.tls = tls
        self.tls_name = tls_name
        #: Sibling workers of this node: their connections are handed over, not relayed.
        self.handoff = handoff

    # -- forwarded requests: the owner's side ---------------------------------------------------
    @staticmethod
    def forwarded(hs: Handshake) -> bool:
        return hs.request is not None and FWD in hs.request.fields

    def verify(self, hs: Handshake) -> None:
        """A forwarded request must carry a token of the fleet key; raises AuthError."""
        assert hs.request is not None
        self.verifier.verify(_context(hs.request_line, hs.request.fields[FWD]), hs.request.fields, FLEET_ROLE)

    # -- the forwarder's side -------------------------------------------------------------------------
    async def locate(self, hop: ListenId) -> Owner | None:
        """The owner of ``hop`` in the fleet: the directory, else every peer asked at once."""
        owner = self.directory.lookup(hop.value)
        if owner is None and self.directory.moving(hop.value):
            raise RouteError(
                Code.MOVING, f"listener {hop} is moving to another relay (its relay went away); retry in a moment"
            )
        if owner is None and self.ask is not None:
            owner = await self._ask(hop.value)
        return owner

    async def _ask(self, listen_id: str) -> Owner | None:
        """Ask the peers, at most once per listenId at a time and once per ``MISS_TTL`` for one
        nobody had: a flood of made-up listenIds must not fan out to every peer each time."""
        assert self.ask is not None
        now = self.directory.clock()
        if self._misses.get(listen_id, 0.0) > now:
            return None
        pending = self._asking.get(listen_id)
        if pending is None:
            pending = self._asking[listen_id] = asyncio.ensure_future(self.ask(listen_id))
            pending.add_done_callback(lambda _: self._asking.pop(listen_id, None))
        owner = await asyncio.shield(pending)
        if owner is None:
            self._misses[listen_id] = now + MISS_TTL
            self._misses.move_to_end(listen_id)
            while len(self._misses) > MAX_MISSES:
                self._misses.popitem(last=False)
        return owner

    def _line(self, line: bytes) -> bytes:
        """``line`` (one request, without its newline) signed as a forwarded hop."""
        text = line.decode("ascii").rstrip("\n")
        verb, arg = text.split(" ")[1:3]
        token = self.key.creds.token(_context(f"HN/1 {verb} {arg}", self.relay_id))
        return encode_request(Verb(verb), arg, {FWD: self.relay_id, **token})

    async def forward(self, hs: Handshake, owner: Owner) -> Target:
        """Open the hop to ``owner`` for ``hs``'s request and read the owner's reply (or hand
        the connection to ``owner`` when it is a sibling worker: raises HandedOff)."""
        assert hs.request is not None
        if self.handoff is not None and not hs.gateway and self.handoff.serves(owner.target):
            await self._hand_over(hs, owner.target, owner.relay_id)
        try:
            sock = await self._connect(owner.target)
            async with asyncio.timeout(self.dial_timeout + 5.0):  # the owner may wait for a dial-back
                try:
                    await asyncio.get_running_loop().sock_sendall(sock, self._line(hs.request.encode()))
                    parser = ReplyParser()
                    reply = await next_reply(sock, parser)
                except BaseException:
                    sock.close()
                    raise
        except (RouteError, OSError, ProtocolError):  # its relay died (its watch has not told us yet)
            self.directory.down(owner.target, "does not answer forwarded hops")
            raise RouteError(
                Code.MOVING, f"listener {hs.request.arg}'s relay does not answer: it is moving; retry in a moment"
            ) from None
        except TimeoutError:
            raise RouteError(
                Code.GATEWAY_TIMEOUT, f"relay {owner.relay_id[:12]} of the fleet did not answer in time"
            ) from None
        if not reply.ok:
            sock.close()
            raise RouteError(reply.code, reply.reason)
        view = self.directory.by_relay(owner.relay_id)
        if view is not None:
            view.forwarded += 1
        return Target(sock, f"listener {hs.request.arg} on relay {owner.relay_id[:12]}", to_client=parser.trailing())

    async def forward_verb(self, hs: Handshake, prefix: str) -> bool:
        """A listener's TICKET/POOL for a peer's ticket (it dialed back through the shared
        address and reached us): pass the connection on to the relay that issued it."""
        assert hs.request is not None
        view = next(
            (v for v in self.directory.peers.values() if v.state == "up" and v.relay_id.startswith(prefix)), None
        )
        if view is None:
            raise RouteError(Code.UNAUTHORIZED, "unknown ticket (its relay is not in this fleet now)")
        if self.handoff is not None and self.handoff.serves(view.target):
            with contextlib.suppress(HandedOff):
                await self._hand_over(hs, view.target, view.relay_id)
            return True
        sock = await self._connect(view.target)
        view.forwarded += 1
        await self.splices.start(hs.sock, sock, to_b=self._line(hs.request.encode()) + hs.trailing)
        return True

    async def _hand_over(self, hs: Handshake, target: Endpoint, relay_id: str) -> NoReturn:
        """Give ``hs`` to the sibling worker at ``target``, as a forwarded hop (it checks the
        fleet token and never passes it on); raises HandedOff, or RouteError if it cannot."""
        assert self.handoff is not None
        assert hs.request is not None
        try:
            await self.handoff.send(target, hs.sock, hs.peer, self._line(hs.request.encode()) + hs.trailing, hs.depth)
        except HandoffError:  # it died or restarts: its watch tells the directory soon
            raise RouteError(Code.MOVING, f"{hs.request.arg}: its worker is restarting; retry in a moment") from None
        view = self.directory.by_relay(relay_id)
        if view is not None:
            view.forwarded += 1
        raise HandedOff

    async def _connect(self, target: Endpoint) -> socket.socket:
        """A connection to a peer's data plane (peers are trusted: no target policy)."""
        try:
            try:
                addrs = [ipaddress.ip_address(target.host)]
            except ValueError:
                async with asyncio.timeout(self.dial_timeout):
                    addrs = await system_resolve(target.host, target.port)
            sock, _ = await connect_first(addrs, target.port, self.dial_timeout)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else describe_os_error(exc)
            raise RouteError(Code.BAD_GATEWAY, f"cannot reach the fleet peer {target}: {reason}") from None
        if self.tls is None:
            return sock
        try:
            return await connect_tls(sock, self.tls, self.tls_name or target.host, self.dial_timeout)
        except TLSError as exc:
            raise RouteError(Code.BAD_GATEWAY, f"fleet peer {target}: {exc}") from None

    def close(self) -> None:
        self.splices.abort_all("relay closing")
        self.splices.pool.close()


def _context(request_line: str, forwarder: str) -> str:
    """What a forwarded hop's token signs: the request line and who forwards it."""
    return f"{request_line} {FWD}={forwarder}"


__all__ = ["FWD", "Entry", "Fleet", "FleetDirectory", "FleetKey", "LocalFeed", "Owner", "PeerView", "Subscription"]
