"""Run a whole node: the core on the one port, the control server behind it, Remote Listen
clients, signals; and the one-service ``rl`` mode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
from collections.abc import Callable

from homenet.control.auth import AuthInterceptor
from homenet.control.discovery import DiscoveryServicer
from homenet.control.relay import RelayServicer
from homenet.control.rl import IdentityBusy, Refused, RLClient, RLOptions
from homenet.control.server import ControlServer
from homenet.control.v1 import discovery_pb2_grpc, relay_pb2_grpc
from homenet.node.address import Endpoint, ListenId, parse_url
from homenet.node.auth import Credentials
from homenet.node.dialer import DialError
from homenet.node.discovery import DEFAULT_TYPES, HOMENET_TYPE, Advertiser, Discovery, dial_service, node_txt
from homenet.node.errors import Code, HomeNetError
from homenet.node.keys import ensure_first_key, parse_key_ref
from homenet.node.log import fields
from homenet.node.query import QueryRouter
from homenet.node.relay import Relay, RelaySettings
from homenet.node.remote import FixedTarget
from homenet.node.server import Handshake, ListenerRoute, Node, RouteError, Target
from homenet.node.settings import Settings

log = logging.getLogger("homenet.app")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Fatal(HomeNetError):
    """The node cannot go on (e.g. a relay refused its listenId); one-line message."""

    default_code = Code.UNAVAILABLE


def _rl_options(settings: Settings, url: str, node_id: str, role: str = "node") -> RLOptions:
    creds = Credentials(*parse_key_ref(settings.key)) if settings.key else None
    return RLOptions(
        creds=creds,
        tls_ca=settings.tls_ca,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        route=parse_url(url),
        listen_id=settings.listen_id or "",
        pool_size=settings.pool_size,
        name=settings.name,
        node_id=node_id,
        state_dir=settings.state_dir,
        backoff_max=settings.rl_backoff_max,
        dial_timeout=settings.dial_timeout,
        role=role,
    )


async def run_node(
    settings: Settings,
    announce: Callable[[str], None],
    stop: asyncio.Event | None = None,
    notice: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down in order.

    Order: health NOT_SERVING, stop accepting, drain sessions up to the grace period while
    the gRPC server finishes its calls, close what is left. Raises :class:`Fatal` if a relay
    refused the node's first registration.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    node = Node(settings)
    first = ensure_first_key(node.keys)
    if first is not None and notice is not None:
        notice(f"no keys yet: created key '{first.id}' (all roles) in {node.keys.path}")
        notice(f"clients use it with: export HOMENET_KEY={first.id}:{first.secret.reveal()}")
    control = ControlServer([AuthInterceptor(node)])
    relay = Relay(
        node,
        RelaySettings(
            ping_interval=settings.ping_interval,
            offline_hold=settings.offline_hold,
            rl_auth=settings.rl_auth,
            max_listener_sessions=settings.max_listener_sessions,
        ),
    )
    discovery = (
        Discovery(settings.mdns_interface, settings.mdns_types or DEFAULT_TYPES, settings.state_dir, settings.name)
        if settings.mdns
        else None
    )
    router = QueryRouter(settings.name, relay, discovery, node.verifier if settings.query_auth == "required" else None)
    node.listener_route = _listener_route(node, relay, discovery)
    control.add_node(node)
    relay_pb2_grpc.add_RelayServiceServicer_to_server(RelayServicer(relay), control.server)
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(DiscoveryServicer(router), control.server)

    async def serve(sock: socket.socket, desc: str, early: bytes, depth: int) -> None:
        node.serve_accepted(sock, desc, early, depth)

    clients = [RLClient(_rl_options(settings, u, node.node_id), serve, announce, router.query) for u in settings.rl]
    _acquire(clients)  # before anything listens: a second process with our identity stops here
    node.control_endpoint = await control.start()
    advertiser: Advertiser | None = None
    try:
        await node.start()
        if discovery is not None:
            await discovery.start()
            advertiser = Advertiser(settings.mdns_interface)
            await advertiser.start(discovery.azc)
            await advertiser.publish(settings.name, HOMENET_TYPE, node.address.port, node_txt([]))
    except BaseException:
        if discovery is not None:
            await discovery.close()
        await node.close()
        await control.stop(0)
        raise
    relay.start()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    announce(f"READY {node.url}")
    background: set[asyncio.Task[None]] = set()
    if advertiser is not None:
        adv = advertiser

        def on_listening(line: str) -> None:  # keep our mDNS record's RL URLs current
            announce(line)
            urls = [c.url for c in clients if c.listen_id]
            task = loop.create_task(adv.update_txt(adv.infos[0], node_txt(urls)))
            background.add(task)
            task.add_done_callback(background.discard)

        for c in clients:
            c.announce = on_listening

    failures: list[BaseException] = []
    tasks = _run_clients(clients, stop, failures)
    try:
        await stop.wait()
        log.info("node.stopping", extra=fields(sessions=len(node.sessions), grace=settings.drain_grace))
        for sig in _SIGNALS:  # a second signal cuts the drain short
            loop.add_signal_handler(sig, node.abort_sessions)
        await control.not_serving()
        node.stop_accepting()
        await _cancel(tasks)
        await relay.close()  # listeners hear it now and go to another relay
        # unary calls in flight get a short grace; long streams (health watches) must not hold
        # an idle node for the whole drain period
        await asyncio.gather(node.drain(settings.drain_grace), control.stop(min(1.0, settings.drain_grace)))
    finally:
        await _cancel(tasks)
        if advertiser is not None:
            await advertiser.close()
        if discovery is not None:
            await discovery.close()
        await relay.close()
        await node.close()
        await control.stop(0)
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("node.stopped", extra=fields(sessions=node.totals.sessions))
    if failures:
        raise Fatal(str(failures[0]))


def _listener_route(node: Node, relay: Relay, discovery: Discovery | None) -> ListenerRoute:
    """listenId hops: listeners registered here first, then services discovered on the LAN."""

    async def route(hs: Handshake, hop: ListenId) -> Target:
        try:
            return await relay.route_listener(hs, hop)
        except RouteError as exc:
            svc = discovery.by_listen_id(hop.value) if discovery is not None else None
            if exc.code is not Code.NOT_FOUND or svc is None:
                if exc.code is Code.NOT_FOUND:
                    raise RouteError(Code.NOT_FOUND, f"no listener or service {hop} on this node") from None
                raise
        mode = node.settings.connect_auth
        if mode == "all" or (mode == "direct" and not svc.public):
            node.authorize(hs, "connect")
        try:
            dialed = await dial_service(svc, node.policy, node.settings.dial_timeout)
        except DialError as err:
            raise RouteError(err.code, f"service {hop}: {err.reason}") from None
        return Target(dialed.sock, f"service {hop} ({dialed})")

    return route


def _acquire(clients: list[RLClient]) -> None:
    """Lock every client's identity, or none (:class:`IdentityBusy` names the holder)."""
    try:
        for client in clients:
            client.acquire()
    except IdentityBusy:
        for client in clients:
            client.state.release()
        raise


def _run_clients(
    clients: list[RLClient], stop: asyncio.Event, failures: list[BaseException]
) -> list[asyncio.Task[None]]:
    """Start RL clients; a refusal of the first registration stops the node."""

    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, Refused):
                log.error("rl.crashed", exc_info=exc)
            failures.append(exc)
            stop.set()

    tasks = []
    for client in clients:
        task = asyncio.ensure_future(client.run())
        task.add_done_callback(done)
        tasks.append(task)
    return tasks


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def run_rl(
    settings: Settings, url: str, to: Endpoint, announce: Callable[[str], None], stop: asyncio.Event | None = None
) -> None:
    """``homenet rl``: remote-listen on one relay and forward every client to ``to``."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    target = FixedTarget(to.host, to.port, settings.dial_timeout, settings.idle_timeout or None)
    failures: list[BaseException] = []
    client = RLClient(_rl_options(settings, url, secrets.token_hex(8), f"rl -> {to}"), target.serve, announce)
    _acquire([client])
    tasks = _run_clients([client], stop, failures)
    try:
        await stop.wait()
    finally:
        await _cancel(tasks)
        target.close()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    if failures:
        raise Fatal(str(failures[0]))
