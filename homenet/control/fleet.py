"""The fleet over gRPC: this relay's directory served to its peers (FleetService), and one
watch per peer keeping :class:`FleetDirectory` true.

Peers are the ``--peers`` addresses and, with ``--peers-dns``, the addresses a DNS name
resolves to (a Kubernetes headless Service), re-resolved every few seconds. Each watch is a
:class:`Reconnecting` stream; when one dies the directory drops that peer's entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from homenet.control.auth import call_metadata
from homenet.control.client import open_channel
from homenet.control.discovery import FORWARDED_KEY, answer_from_pb, query_to_pb
from homenet.control.errors import code_of
from homenet.control.stream import Disconnected, Reconnecting
from homenet.control.v1 import discovery_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from homenet.node.address import DEFAULT_PORT, Endpoint, parse_endpoint
from homenet.node.dialer import system_resolve
from homenet.node.errors import Code
from homenet.node.fleet import Entry, Fleet, FleetDirectory, FleetKey, Owner
from homenet.node.log import fields
from homenet.node.query import Query, QueryAnswer, QueryError
from homenet.node.relay import Relay
from homenet.node.settings import Settings

log = logging.getLogger("homenet.fleet")

#: Seconds between heartbeats on a watch; a watch silent for 3 of them is dead.
HEARTBEAT = 2.0
#: Seconds between re-resolutions of --peers-dns.
RESOLVE_EVERY = 5.0
#: Deadline of a Lookup asked of every peer on a directory miss.
LOOKUP_DEADLINE = 0.5
_SERVICE = "/homenet.v1.FleetService/"


def to_entry_pb(e: Entry) -> fleet_pb2.DirectoryEntry:
    return fleet_pb2.DirectoryEntry(listen_id=e.listen_id, registered_at=e.registered_at, online=e.online)


def from_entry_pb(m: fleet_pb2.DirectoryEntry) -> Entry:
    return Entry(m.listen_id[:64], m.registered_at, m.online)


class Identity:
    """Who this relay is to its peers."""

    def __init__(self, relay_id: str, name: str, address: Callable[[], str]) -> None:
        self.relay_id = relay_id
        self.epoch = time.time_ns()
        self.name = name
        self._address = address

    def pb(self) -> fleet_pb2.RelayIdentity:
        return fleet_pb2.RelayIdentity(
            relay_id=self.relay_id, epoch=self.epoch, address=self._address(), name=self.name
        )


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    """FleetService: the directory of this relay, for its peers (calls need the fleet key).

    A relay without a fleet key serves it too, as a fleet of one: ``Peers`` lists no peer (the
    interceptor refuses every peer call, as there is no key to check them with).
    """

    def __init__(self, fleet: Fleet | None, relay: Relay, identity: Identity) -> None:
        self.fleet = fleet
        self.relay = relay
        self.identity = identity

    async def Watch(
        self, request: fleet_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb2.DirectoryEvent]:
        me = self.identity.pb()
        assert self.fleet is not None  # the interceptor lets no watch in without a fleet key
        if request.relay_id == self.identity.relay_id:  # our own name in DNS: say who we are, end
            yield fleet_pb2.DirectoryEvent(relay=me, heartbeat=fleet_pb2.Heartbeat(seq=0))
            return
        sub = self.fleet.feed.subscribe()
        seq = 0
        try:
            yield fleet_pb2.DirectoryEvent(
                relay=me, snapshot=fleet_pb2.Snapshot(entries=[to_entry_pb(e) for e in sub.snapshot])
            )
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT):
                        change = await sub.changes.get()
                except TimeoutError:
                    seq += 1
                    yield fleet_pb2.DirectoryEvent(relay=me, heartbeat=fleet_pb2.Heartbeat(seq=seq))
                    continue
                if change is None:  # the watcher fell behind: it starts over from a snapshot
                    return
                upserted, removed = change
                yield fleet_pb2.DirectoryEvent(
                    relay=me, delta=fleet_pb2.Delta(upserted=[to_entry_pb(e) for e in upserted], removed=removed)
                )
        finally:
            self.fleet.feed.unsubscribe(sub)

    async def Lookup(
        self, request: fleet_pb2.LookupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.LookupResponse:
        assert self.fleet is not None
        e = self.fleet.feed.entries.get(request.listen_id)
        resp = fleet_pb2.LookupResponse(relay=self.identity.pb(), found=e is not None)
        if e is not None:
            resp.entry.CopyFrom(to_entry_pb(e))
        return resp

    async def Peers(
        self, request: fleet_pb2.PeersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.PeersResponse:
        return self.peers(request.with_entries)

    def peers(self, with_entries: bool = False) -> fleet_pb2.PeersResponse:
        """This relay and its peers as it sees them."""
        if self.fleet is None:
            return fleet_pb2.PeersResponse(self=self.identity.pb())
        d = self.fleet.directory
        now = d.clock()
        peers = []
        for v in sorted(d.peers.values(), key=lambda v: str(v.target)):
            peer = fleet_pb2.Peer(
                target=str(v.target), relay_id=v.relay_id, epoch=v.epoch, state=v.state, name=v.name, address=v.address,
                listeners=len(v.entries), last_seen_seconds=round(now - v.last_seen, 3) if v.last_seen else 0.0,
                forwarded=v.forwarded, error=v.error,
            )  # fmt: skip
            if with_entries:
                peer.entries.extend(to_entry_pb(e) for e in sorted(v.entries.values(), key=lambda e: e.listen_id))
            peers.append(peer)
        return fleet_pb2.PeersResponse(self=self.identity.pb(), peers=peers, moving=d.moving_count())

    async def Kick(
        self, request: fleet_pb2.FleetKickRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.FleetKickResponse:
        kicked = self.relay.kick(request.listen_id)
        return fleet_pb2.FleetKickResponse(kicked=kicked, relay_id=self.identity.relay_id if kicked else "")


class PeerLinks:
    """One watch per peer; the directory follows them. Also asks peers on a miss."""

    def __init__(
        self, settings: Settings, key: FleetKey, relay_id: str, directory: FleetDirectory, plain: bool = False
    ) -> None:
        self.settings = settings
        #: Peers speak plaintext (a worker's siblings, on loopback), whatever the port speaks.
        self.plain = plain
        self.key = key
        self.relay_id = relay_id
        self.directory = directory
        self._links: dict[Endpoint, tuple[asyncio.Task[None], grpc.aio.Channel]] = {}
        self._resolver: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[Any]] = set()

    def _channel(self, target: Endpoint) -> grpc.aio.Channel:
        s = self.settings
        tls = bool(s.tls_cert) and not self.plain  # a fleet speaks one way: TLS when this relay serves TLS
        options: list[tuple[str, Any]] = list(_OPTIONS)
        if tls and s.peer_tls_name:  # one certificate for every relay: verify peers by its name
            options.append(("grpc.ssl_target_name_override", s.peer_tls_name))
        return open_channel(str(target), tls, s.tls_ca, cert=s.tls_cert, key=s.tls_key, options=options)

    def _meta(self, method: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.key.creds, _SERVICE + method)

    # -- targets -----------------------------------------------------------------------------------
    def start(self) -> None:
        port = self.settings.port or DEFAULT_PORT
        self._set_targets({parse_endpoint(p, port) for p in self.settings.peers}, keep_static=False)
        if self.settings.peers_dns:
            self._resolver = asyncio.ensure_future(self._resolve_forever())

    async def _resolve_forever(self) -> None:
        assert self.settings.peers_dns is not None
        ep = parse_endpoint(self.settings.peers_dns, self.settings.port or DEFAULT_PORT)
        while True:
            try:
                async with asyncio.timeout(RESOLVE_EVERY):
                    addrs = await system_resolve(ep.host, ep.port)
                self._set_targets({Endpoint(str(a), ep.port) for a in addrs}, keep_static=True)
            except (OSError, TimeoutError) as exc:  # keep the peers we have: DNS may come back
                log.warning("fleet.resolve_failed", extra=fields(name=ep.host, error=str(exc)))
            await asyncio.sleep(RESOLVE_EVERY)

    def _set_targets(self, targets: set[Endpoint], keep_static: bool) -> None:
        port = self.settings.port or DEFAULT_PORT
        static = {parse_endpoint(p, port) for p in self.settings.peers} if keep_static else set()
        wanted = targets | static
        for target in list(self._links):
            if target not in wanted:
                task, channel = self._links.pop(target)
                task.cancel()
                self._spawn(channel.close(None))
                self.directory.forget_target(target)
        for target in wanted - set(self._links):
            channel = self._channel(target)
            self.directory.target(target)
            watch = functools.partial(self._watch, target, channel)
            stream = Reconnecting(str(target), watch, 2.0, log, "fleet.reconnecting", first_wait=0.2)
            self._links[target] = (asyncio.ensure_future(stream.run()), channel)

    # -- one watch -----------------------------------------------------------------------------------
    async def _watch(self, target: Endpoint, channel: grpc.aio.Channel) -> None:
        view = self.directory.target(target)
        if view.state == "self":  # DNS names us too: look again now and then (ids change on restart)
            await asyncio.sleep(30)
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        call = stub.Watch(fleet_pb2.WatchRequest(relay_id=self.relay_id), metadata=self._meta("Watch"))
        try:
            while True:
                async with asyncio.timeout(3 * HEARTBEAT):
                    event = await call.read()
                if not isinstance(event, fleet_pb2.DirectoryEvent):
                    raise Disconnected("peer ended the watch")
                self._apply(target, event)
                if self.directory.target(target).state == "self":
                    return
        except TimeoutError:
            self.directory.down(target, f"silent for {3 * HEARTBEAT:g}s")
            raise Disconnected("peer silent") from None
        except grpc.aio.AioRpcError as exc:
            self.directory.down(target, f"{exc.code().name.lower()}: {exc.details()}")
            raise Disconnected(exc.details() or exc.code().name) from None
        except Disconnected as exc:
            self.directory.down(target, str(exc))
            raise
        finally:
            call.cancel()

    def _apply(self, target: Endpoint, event: fleet_pb2.DirectoryEvent) -> None:
        d = self.directory
        r = event.relay
        if not d.up(target, r.relay_id, r.epoch, r.name[:64], r.address[:300]):
            return
        kind = event.WhichOneof("event")
        if kind == "snapshot":
            d.snapshot(target, [from_entry_pb(e) for e in event.snapshot.entries])
            log.info(
                "fleet.peer_up",
                extra=fields(peer=str(target), relay=r.relay_id[:12], listeners=len(event.snapshot.entries)),
            )
        elif kind == "delta":
            d.delta(target, [from_entry_pb(e) for e in event.delta.upserted], list(event.delta.removed))
        else:
            d.heard(target)

    # -- asking peers ------------------------------------------------------------------------------
    async def ask(self, listen_id: str) -> Owner | None:
        """Every peer that is up, at once: who owns ``listen_id``? (a directory miss)"""
        asks = {
            asyncio.ensure_future(self._lookup(target, channel, listen_id)): target
            for target, (_, channel) in self._links.items()
            if self.directory.target(target).state == "up"
        }
        try:
            for done in asyncio.as_completed(list(asks), timeout=LOOKUP_DEADLINE):
                with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                    owner = await done
                    if owner is not None:
                        return owner
        except TimeoutError:
            pass
        finally:
            for task in asks:
                task.cancel()
        return None

    async def _lookup(self, target: Endpoint, channel: grpc.aio.Channel, listen_id: str) -> Owner | None:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        resp = await stub.Lookup(
            fleet_pb2.LookupRequest(listen_id=listen_id), timeout=LOOKUP_DEADLINE, metadata=self._meta("Lookup")
        )
        if not resp.found:
            return None
        return Owner(resp.relay.relay_id, target, from_entry_pb(resp.entry))

    async def kick(self, listen_id: str) -> bool:
        """Kick ``listen_id`` at whichever peer owns it."""
        owner = self.directory.lookup(listen_id)
        link = self._links.get(owner.target) if owner is not None else None
        if link is None:
            return False
        stub = fleet_pb2_grpc.FleetServiceStub(link[1])
        resp = await stub.Kick(
            fleet_pb2.FleetKickRequest(listen_id=listen_id), timeout=5.0, metadata=self._meta("Kick")
        )
        return bool(resp.kicked)

    async def query(self, q: Query) -> QueryAnswer:
        """Ask the relay that owns ``q.path[0]`` (marked forwarded: it never asks further)."""
        owner = self.directory.lookup(q.path[0]) or await self.ask(q.path[0])
        link = self._links.get(owner.target) if owner is not None else None
        if owner is None or link is None:
            if self.directory.moving(q.path[0]):
                raise QueryError("unavailable", f"listener {q.path[0]} is moving to another relay; retry in a moment")
            raise QueryError("not_found", f"no listener {q.path[0]} in this fleet")
        stub = discovery_pb2_grpc.DiscoveryServiceStub(link[1])
        try:
            resp = await stub.Query(query_to_pb(q), timeout=q.timeout, metadata=((FORWARDED_KEY, self.relay_id),))
        except grpc.aio.AioRpcError as exc:
            code = code_of(exc)
            raise QueryError.from_code(code or Code.BAD_GATEWAY, exc.details() or "relay of the fleet failed") from None
        return answer_from_pb(resp)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for task, _ in self._links.values():
            task.cancel()
        for task, channel in self._links.values():
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._links.clear()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)


_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
]
