"""Build a node's core from its settings: every part constructed once, each given what it uses.

The dependencies point one way: the keys, the source limiter and the dialer first; the relay
role and the discovery table use them; the router uses those; the node (the one port) uses
the router and the relay's verbs. Nothing is wired after construction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from homenet.node.auth import Authorizer, Verifier
from homenet.node.dialer import Dialer
from homenet.node.discovery import Discovery, PublicServices
from homenet.node.fleet import Fleet
from homenet.node.keys import KeyStore
from homenet.node.limits import SourceLimiter
from homenet.node.policy import TargetPolicy
from homenet.node.query import FleetQueries, QueryRouter
from homenet.node.relay import Relay, RelaySettings
from homenet.node.replay import ReplayTable
from homenet.node.router import Router
from homenet.node.server import Node
from homenet.node.settings import Settings


@dataclass(frozen=True)
class Core:
    """The parts of one node process."""

    settings: Settings
    keys: KeyStore
    verifier: Verifier
    limiter: SourceLimiter
    authorizer: Authorizer
    relay: Relay
    router: Router
    queries: QueryRouter
    node: Node
    discovery: Discovery | None
    #: Random id of this node process; relays refuse a registration from themselves.
    node_id: str


def relay_settings(settings: Settings) -> RelaySettings:
    """The relay role's knobs, from the node's settings."""
    return RelaySettings(
        ping_interval=settings.ping_interval,
        offline_hold=settings.offline_hold,
        rl_auth=settings.rl_auth,
        max_listener_sessions=settings.max_listener_sessions,
        max_listeners_per_source=settings.max_listeners_per_source,
        max_listeners_per_key=settings.max_listeners_per_key,
        advertise=settings.advertise,
    )


def assemble(
    settings: Settings,
    discovery: Discovery | None = None,
    dialer: Dialer | None = None,
    *,
    node_id: str | None = None,
    fleet: Fleet | None = None,
    fleet_queries: FleetQueries | None = None,
    replay: ReplayTable | None = None,
) -> Core:
    """Every part of a node for ``settings`` (nothing started yet); ``fleet`` (built by the
    composition root, which owns the peer links) makes the relay role one of a fleet; ``replay``
    is the replay table the workers of one node share."""
    keys = KeyStore(settings.keys_path)
    verifier = Verifier(keys, shared=replay)
    limiter = SourceLimiter(
        max_total=settings.max_handshakes,
        max_per_source=settings.max_per_source,
        threshold=settings.penalty_threshold,
        penalty=settings.penalty_seconds,
    )
    authorizer = Authorizer(verifier, limiter)
    node_id = node_id or secrets.token_hex(8)
    services = (lambda lid: discovery.by_listen_id(lid) is not None) if discovery is not None else None
    relay = Relay(limiter, keys, node_id, relay_settings(settings), fleet, services)
    dialer = dialer or Dialer(TargetPolicy.from_specs(settings.allow), timeout=settings.dial_timeout)
    router = Router(
        dialer, authorizer, settings.connect_auth, listeners=relay, services=discovery, fleet=fleet,
        public=PublicServices(settings.public_services),
    )  # fmt: skip
    queries = QueryRouter(
        settings.name, relay.queries, discovery, verifier if settings.query_auth == "required" else None, fleet_queries
    )
    node = Node(settings, limiter, router, verbs=relay.verbs)
    return Core(settings, keys, verifier, limiter, authorizer, relay, router, queries, node, discovery, node_id)
