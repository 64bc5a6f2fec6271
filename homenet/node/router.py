"""The one place a hop becomes a destination, and the one place its auth is decided.

A ``CONNECT`` hop names one of:

* a **listener** registered on this node (its relay role): reached through its pool or a
  dial-back; needs a connect key only with ``connect_auth=all``;
* a **service** this node discovered on its LAN (mDNS), by its listenId: dialed at an address
  in the node's ``--allow`` rules or the host's own subnets; needs a connect key unless the
  operator named it with ``--public-service`` (with ``connect_auth=direct``), always with
  ``all``, never with ``none``;
* a **direct target** ``ip:port`` / ``host:port``: dialed under the node's policy; needs a
  connect key unless ``connect_auth=none``.

A listenId is looked up as a listener first, then as a service.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from homenet.node.address import Endpoint, ListenId
from homenet.node.auth import Authorizer
from homenet.node.connection import Handshake
from homenet.node.dialer import Dialed, Dialer, DialError
from homenet.node.discovery import PublicServices, Service, dial_service
from homenet.node.errors import Code, RouteError
from homenet.node.fleet import Fleet, Owner
from homenet.node.keys import Key
from homenet.node.limits import client_source
from homenet.node.listeners import Listener
from homenet.node.sessions import Target


class Listeners(Protocol):
    """Listeners registered on this node (the relay role)."""

    def lookup(self, hop: ListenId) -> Listener | None:
        """The online listener ``hop`` (None: no such listener); raises ListenerOffline."""
        ...

    async def connect(self, hs: Handshake, listener: Listener) -> Target:
        """A connection to ``listener`` for ``hs`` (from its pool, or dialed back)."""
        ...


class Services(Protocol):
    """Services discovered on this node's LAN."""

    def by_listen_id(self, listen_id: str) -> Service | None: ...


def penalty_source(peer: str) -> str:
    """Whom a failed login counts against: the client's address, also for a connection a relay
    activated (``"203.0.113.9:5555 via hn://relay"``); "" when no client address is known
    (an old relay's pool connection): then nobody, rather than every client of that relay."""
    source = client_source(peer)
    try:
        ipaddress.ip_network(source, strict=False)
    except ValueError:
        return ""
    return source


class Router:
    """Turns a request's hop into a connected :class:`Target` for one node."""

    def __init__(
        self,
        dialer: Dialer,
        authorizer: Authorizer,
        connect_auth: str = "direct",
        listeners: Listeners | None = None,
        services: Services | None = None,
        fleet: Fleet | None = None,
        public: PublicServices | None = None,
    ) -> None:
        self.dialer = dialer
        #: Services the operator opened to clients without a key (``--public-service``).
        self.public = public or PublicServices()
        self.authorizer = authorizer
        self.connect_auth = connect_auth
        self.listeners = listeners
        self.services = services
        self.fleet = fleet

    def authorize(self, hs: Handshake, role: str) -> Key:
        """The key that signed ``hs``'s request, if it holds ``role``; else an AuthError
        (a failed login counts against the client's source)."""
        assert hs.request is not None
        return self.authorizer.authorize(hs.request_line, hs.request.fields, role, hs.source or penalty_source(hs.peer))

    async def route(self, hs: Handshake, hop: Endpoint | ListenId) -> Target:
        """Connect ``hs`` to ``hop``, checking the auth the hop needs first."""
        forwarded = self.fleet is not None and self.fleet.forwarded(hs)
        if forwarded:
            assert self.fleet is not None
            self.fleet.verify(hs)  # a peer vouches for the client: no key asked again, no hop further
            if isinstance(hop, Endpoint):
                raise RouteError(Code.BAD_REQUEST, "a forwarded hop names a listener, not a target")
        if isinstance(hop, Endpoint):
            if self.connect_auth != "none":
                self.authorize(hs, "connect")
            d: Dialed = await self.dialer.dial(hop)
            return Target(d.sock, str(d))
        listener = self.listeners.lookup(hop) if self.listeners is not None else None
        if listener is not None:
            assert self.listeners is not None
            if self.connect_auth == "all" and not forwarded:
                self.authorize(hs, "connect")
            return await self.listeners.connect(hs, listener)
        svc = self.services.by_listen_id(hop.value) if self.services is not None and not forwarded else None
        if svc is None:
            if self.fleet is not None and not forwarded:
                owner = await self.fleet.locate(hop)
                if owner is not None:
                    return await self._to_owner(hs, hop, owner)
            what = "listener or service" if self.listeners is not None else "listener"
            raise RouteError(Code.NOT_FOUND, f"no {what} {hop} on this node")
        if self.connect_auth == "all" or (self.connect_auth == "direct" and svc not in self.public):
            self.authorize(hs, "connect")
        try:
            dialed = await dial_service(svc, self.dialer.policy, self.dialer.timeout)
        except DialError as err:
            raise RouteError(err.code, f"service {hop}: {err.reason}") from None
        return Target(dialed.sock, f"service {hop} ({dialed})")

    async def _to_owner(self, hs: Handshake, hop: ListenId, owner: Owner) -> Target:
        """``hop`` is a listener of another relay of the fleet: one hop to it."""
        assert self.fleet is not None
        if not owner.entry.online:
            raise RouteError(Code.UNAVAILABLE, f"listener {hop} is offline (its node is reconnecting or gone)")
        if self.connect_auth == "all":
            self.authorize(hs, "connect")
        return await self.fleet.forward(hs, owner)
