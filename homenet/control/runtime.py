"""The composition root: a whole node process (core on the one port, control server, Remote
Listen clients, LAN discovery), and the one-service ``rl`` mode; start, serve, drain, stop,
with one signal path for every long-running command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from homenet.control.admin import AdminServer
from homenet.control.auth import AuthInterceptor
from homenet.control.discovery import DiscoveryServicer
from homenet.control.fleet import FleetServicer, Identity, PeerLinks
from homenet.control.relay import RelayServicer
from homenet.control.rl import IdentityBusy, Refused, RLClient, RLOptions
from homenet.control.server import ControlServer, NodeServicer
from homenet.control.siblings import Siblings
from homenet.control.v1 import discovery_pb2_grpc, fleet_pb2_grpc, relay_pb2_grpc
from homenet.control.workers import Supervisor, WorkerSpec, public_socket
from homenet.node.address import Endpoint, parse_url
from homenet.node.assembly import Core, assemble
from homenet.node.auth import Authorizer, Credentials
from homenet.node.discovery import DEFAULT_TYPES, HOMENET_TYPE, Advertiser, Discovery, node_txt
from homenet.node.errors import Code, HomeNetError
from homenet.node.fleet import Fleet, FleetDirectory, FleetKey, LocalFeed
from homenet.node.handoff import Handoff
from homenet.node.keys import ensure_first_key, first_key_notice, parse_key_ref
from homenet.node.log import fields
from homenet.node.remote import FixedTarget
from homenet.node.replay import ReplayTable, replay_path
from homenet.node.settings import Settings
from homenet.node.tls import client_context

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("homenet.app")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Announce = Callable[[str], None]


class Fatal(HomeNetError):
    """The node cannot go on (e.g. a relay refused its listenId); one-line message."""

    default_code = Code.UNAVAILABLE


@contextlib.asynccontextmanager
async def signals(stop: asyncio.Event) -> AsyncIterator[Callable[[Callable[[], None]], None]]:
    """SIGTERM/SIGINT set ``stop``; yields ``then(fn)``: from then on a signal runs ``fn``
    instead (a second signal cuts a drain short). Handlers are removed on exit."""
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)

    def then(fn: Callable[[], None]) -> None:
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, fn)

    try:
        yield then
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


def rl_options(settings: Settings, url: str, node_id: str, role: str = "node") -> RLOptions:
    """How to remote-listen on ``url``, from the settings."""
    return RLOptions(
        creds=Credentials(*parse_key_ref(settings.key)) if settings.key else None,
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


class Listeners:
    """The RL clients of one process: identities locked up front, tasks owned, the first
    refusal (or crash) reported as the process's failure."""

    def __init__(self, clients: list[RLClient]) -> None:
        self.clients = clients
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def acquire(self) -> None:
        """Lock every client's identity, or none (:class:`IdentityBusy` names the holder)."""
        try:
            for client in self.clients:
                client.acquire()
        except IdentityBusy:
            for client in self.clients:
                client.state.release()
            raise

    def start(self) -> None:
        for client in self.clients:
            task = asyncio.ensure_future(client.run())
            task.add_done_callback(self._done)
            self._tasks.append(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, Refused):
                log.error("rl.crashed", exc_info=exc)
            self.failure = self.failure or exc
            self.failed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()


async def until(stop: asyncio.Event, failed: asyncio.Event) -> None:
    """Until ``stop`` or ``failed`` is set."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(failed.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class NodeRuntime:
    """One ``homenet node`` process, built from its settings."""

    def __init__(
        self, settings: Settings, announce: Announce, notice: Announce | None = None, spec: WorkerSpec | None = None
    ) -> None:
        self.settings = settings
        self.announce = announce
        self.notice = notice
        #: A worker of ``homenet node --workers N`` (None: the node is this one process).
        self.spec = spec
        discovery = (
            Discovery(settings.mdns_interface, settings.mdns_types or DEFAULT_TYPES, settings.state_dir, settings.name)
            if settings.mdns
            else None
        )
        node_id = secrets.token_hex(8)
        #: Nonces accepted by any worker of this node (a token is good once per node, not per worker).
        self.replay = ReplayTable(spec.replay_file) if spec is not None else _replay_table(settings)
        self.handoff = (
            Handoff(spec.handoffs[spec.index], spec.sibling_handoffs(), self._handed) if spec is not None else None
        )
        self.fleet, self.links = _fleet(settings, node_id, self.handoff, self.replay)
        self.core: Core = assemble(
            settings, discovery, node_id=node_id, fleet=self.fleet,
            fleet_queries=self.links.query if self.links is not None else None, replay=self.replay,
        )  # fmt: skip
        core = self.core
        fleet_auth = Authorizer(self.fleet.verifier, core.limiter) if self.fleet is not None else None
        self.siblings = (
            Siblings(spec.index, [s for i, s in enumerate(spec.siblings) if i != spec.index], self.fleet.key.creds)
            if spec is not None and self.fleet is not None
            else None
        )
        sibling_key = self.fleet.key.id if self.fleet is not None and self.siblings is not None else ""
        self.control = ControlServer(
            [AuthInterceptor(settings, core.authorizer, core.node.grpc, fleet_auth, sibling_key)]
        )
        fleet_counts = self.fleet.directory.counts if self.fleet is not None and spec is None else None
        node_servicer = self.control.add_node(
            core.node, core.relay.registry.online_count, fleet_counts, self.siblings,
            metrics=self._exposition,
        )  # fmt: skip
        relay_pb2_grpc.add_RelayServiceServicer_to_server(
            RelayServicer(
                core.relay, core.node.grpc, settings.name, self.links.kick if self.links else None, self.siblings
            ),
            self.control.server,
        )
        discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(DiscoveryServicer(core.queries), self.control.server)
        name = f"{settings.name} (worker {spec.index})" if spec is not None else settings.name
        identity = Identity(node_id, name, lambda: str(core.node.private_address or core.node.address))
        fleet_servicer = FleetServicer(self.fleet, core.relay, identity)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(fleet_servicer, self.control.server)
        self.listeners = Listeners(
            [RLClient(rl_options(settings, u, core.node_id), self._serve, self._listening, core.queries.query)
             for u in settings.rl]
        )  # fmt: skip
        #: This process's metrics, made on first use (a node nobody scrapes loads no metrics library).
        self._registry: CollectorRegistry | None = None
        self.admin = self._admin(node_servicer, fleet_servicer) if settings.metrics_bind else None
        self.advertiser: Advertiser | None = None
        self._background: set[asyncio.Task[None]] = set()

    def _exposition(self) -> bytes:
        """This process's metrics in the text format (a worker's siblings are the node, not its
        fleet)."""
        from homenet.control.metrics import NodeCollector, RLView, exposition, registry_for

        if self._registry is None:
            core = self.core
            views = [
                RLView(str(c.opts.route), lambda c=c: c.connected, lambda c=c: c.reconnects)  # type: ignore[misc]
                for c in self.listeners.clients
            ]
            fleet = self.fleet.directory if self.fleet is not None and self.spec is None else None
            self._registry = registry_for(
                NodeCollector(self.settings.name, core.node, core.relay, core.limiter, core.discovery, fleet, views)
            )
        return exposition(self._registry)

    async def _metrics(self) -> bytes:
        """The node's metrics: this process's, or every worker's merged."""
        from homenet.control.metrics import merge_workers

        own = self._exposition()
        if self.siblings is None:
            return own
        others = await self.siblings.metrics()
        return merge_workers([(self.siblings.index, own.decode()), *((m.worker, m.text) for m in others)])

    def _admin(self, node: NodeServicer, fleet: FleetServicer) -> AdminServer:
        """The metrics and dashboard server (started with the node)."""
        from homenet.control.console import pages

        core, s = self.core, self.settings
        loopback = s.metrics_loopback
        return AdminServer(
            pages(self._metrics, node, core.relay, fleet),
            core.keys, core.limiter, open_access=loopback,
            open_paths=("/metrics",) if s.metrics_auth == "none" else (), tls=None if loopback else core.node.tls,
            keys_need_tls=not loopback,
        )  # fmt: skip

    def _own(self, host: str, port: int) -> None:
        with contextlib.suppress(ValueError):  # a host name: the dialer resolves and checks it then
            self.core.node.add_own(Endpoint(host, port))

    async def _serve(self, sock: socket.socket, desc: str, early: bytes, depth: int) -> None:
        self.core.node.serve_accepted(sock, desc, early, depth)

    def _handed(self, sock: socket.socket, peer: str, data: bytes, depth: int) -> None:
        """A sibling worker handed us a connection (a forwarded hop for one of ours)."""
        self.core.node.serve_accepted(sock, peer, data, depth)

    def _listening(self, line: str) -> None:
        """A relay granted a listenId: say so, and keep our mDNS record's RL URLs current."""
        self.announce(line)
        adv = self.advertiser
        if adv is not None and adv.infos:
            urls = [c.url for c in self.listeners.clients if c.listen_id]
            task = asyncio.ensure_future(adv.update_txt(adv.infos[0], node_txt(urls)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _first_key(self) -> None:
        """Zero configuration, still closed: a node with no keys file makes an admin key."""
        keys = self.core.keys
        try:
            first = ensure_first_key(keys)
        except OSError as exc:  # a read-only state dir (a pod): run without, say how to add keys
            log.warning(
                "keys.first_key_not_written",
                extra=fields(path=str(keys.path), error=exc.strerror or str(exc)),
            )
            return
        if first is not None and self.notice is not None:
            for line in first_key_notice(first, keys.path):
                self.notice(line)

    async def start(self) -> None:
        """Lock identities, start the control server, the port, discovery, the relay role."""
        core, spec = self.core, self.spec
        if spec is None:  # a supervisor did it for its workers
            self._first_key()
        self.listeners.acquire()  # before anything listens: a second process with our identity stops here
        core.node.grpc.endpoint = await self.control.start()
        # the node's other listeners are never data-plane targets, whatever --allow says
        self._own(*core.node.grpc.endpoint)
        try:
            if self.settings.health_port:
                self._own(self.settings.health_bind, await self.control.serve_health(
                    self.settings.health_bind, self.settings.health_port
                ))  # fmt: skip
            if spec is not None:
                await core.node.start(public_socket(spec), socket.socket(fileno=spec.private_fd))
                for sibling in spec.sibling_handoffs():  # dialing a sibling is dialing ourselves
                    core.node.add_own(sibling)
                assert self.handoff is not None
                self.handoff.start()
            else:
                await core.node.start()
            if self.admin is not None:
                host, port = self.settings.metrics_endpoint() or ("127.0.0.1", 0)
                bound = await self.admin.start(host, port)
                self._own(*bound)
                where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                scheme = "https" if self.admin.tls is not None else "http"
                log.info("admin.listening", extra=fields(url=f"{scheme}://{where}:{bound[1]}/"))
            if core.discovery is not None:
                await core.discovery.start()
                if spec is None or spec.index == 0:  # one record per node
                    self.advertiser = Advertiser(self.settings.mdns_interface)
                    await self.advertiser.start(core.discovery.azc)
                    port = core.node.address.port
                    await self.advertiser.publish(self.settings.name, HOMENET_TYPE, port, node_txt([]))
        except BaseException:
            await self.close()
            raise
        core.relay.start()
        if self.links is not None:
            self.links.start()
        self.announce(f"READY {core.node.url}")
        self.listeners.start()

    async def drain(self, then: Callable[[Callable[[], None]], None]) -> None:
        """Shut down in order: health NOT_SERVING, stop accepting, listeners told to move,
        sessions drained up to the grace period, then :meth:`close`."""
        node, grace = self.core.node, self.settings.drain_grace
        log.info("node.stopping", extra=fields(sessions=len(node.sessions), grace=grace))
        then(node.abort_sessions)  # a second signal cuts the drain short
        await self.control.not_serving()
        node.stop_accepting()
        await self.listeners.close()
        # listeners hear it now (jittered) and go to another relay
        await self.core.relay.close(spread=min(1.0, grace / 4) if self.fleet is not None else 0.0)
        if self.links is not None:
            await self.links.close()
        # unary calls in flight get a short grace; long streams (health watches) must not hold
        # an idle node for the whole drain period
        await asyncio.gather(node.drain(grace), self.control.stop(min(1.0, grace)))

    async def close(self) -> None:
        """Close everything now."""
        core = self.core
        await self.listeners.close()
        if self.links is not None:
            await self.links.close()
        if self.fleet is not None:
            self.fleet.close()
        if self.advertiser is not None:
            await self.advertiser.close()
        if core.discovery is not None:
            await core.discovery.close()
        if self.handoff is not None:
            self.handoff.close()
        if self.siblings is not None:
            await self.siblings.close()
        if self.admin is not None:
            await self.admin.close()
        await core.relay.close()
        await core.node.close()
        await self.control.stop(0)
        await self.control.stop_health()
        if self.replay is not None:
            self.replay.close()


def _replay_table(settings: Settings) -> ReplayTable | None:
    """This node's replay table in its state directory (None, and a warning, when the state
    directory cannot hold it: nonces are then remembered in memory only)."""
    try:
        return ReplayTable.at(replay_path(settings))
    except (OSError, ValueError) as exc:
        log.warning("replay.in_memory_only", extra=fields(state_dir=settings.state_dir, error=str(exc)))
        return None


def _fleet(
    settings: Settings, node_id: str, handoff: Handoff | None, replay: ReplayTable | None
) -> tuple[Fleet | None, PeerLinks | None]:
    """This relay's fleet parts, if it has a fleet key (no key: it peers with nobody). A
    worker's fleet is its siblings: plaintext on their private loopback ports, connections
    handed over instead of relayed."""
    if not settings.fleet_key_file:
        return None, None
    key = FleetKey.load(settings.fleet_key_file)
    directory = FleetDirectory(node_id, settings.moving_hold)
    links = PeerLinks(settings, key, node_id, directory, plain=handoff is not None)
    tls = None
    if settings.tls_cert and handoff is None:
        tls = client_context(settings.tls_ca, settings.tls_cert, settings.tls_key)
    fleet = Fleet(
        key, node_id, directory, LocalFeed(), settings.dial_timeout, links.ask, tls, settings.peer_tls_name, handoff,
        replay,
    )  # fmt: skip
    return fleet, links


async def run_node(
    settings: Settings,
    announce: Announce,
    stop: asyncio.Event | None = None,
    notice: Announce | None = None,
    spec: WorkerSpec | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and stop. Raises :class:`Fatal` if
    a relay refused the node's first registration, :class:`IdentityBusy` if another process
    uses one of its listener identities. ``spec``: run as one worker of a supervisor."""
    stop = stop or asyncio.Event()
    runtime = NodeRuntime(settings, announce, notice, spec)
    async with signals(stop) as then:
        await runtime.start()
        try:
            await until(stop, runtime.listeners.failed)
            await runtime.drain(then)
        finally:
            await runtime.close()
    log.info("node.stopped", extra=fields(sessions=runtime.core.node.sessions.totals.sessions))
    if runtime.listeners.failure is not None:
        raise Fatal(str(runtime.listeners.failure))


async def supervise(settings: Settings, argv: list[str], announce: Announce, notice: Announce | None) -> int:
    """``homenet node --workers N``: start N workers with ``argv`` (the node's command line),
    keep them running until SIGTERM/SIGINT, drain them; returns the exit status."""
    stop = asyncio.Event()
    supervisor = Supervisor(settings, argv, announce, notice)
    async with signals(stop) as then:
        return await supervisor.run(stop, then)


async def run_rl(
    settings: Settings, url: str, to: Endpoint, announce: Announce, stop: asyncio.Event | None = None
) -> None:
    """``homenet rl``: remote-listen on one relay and forward every client to ``to``."""
    stop = stop or asyncio.Event()
    target = FixedTarget(to.host, to.port, settings.dial_timeout, settings.idle_timeout or None)
    opts = rl_options(settings, url, secrets.token_hex(8), f"rl -> {to}")
    listeners = Listeners([RLClient(opts, target.serve, announce)])
    async with signals(stop):
        listeners.acquire()
        listeners.start()
        try:
            await until(stop, listeners.failed)
        finally:
            await listeners.close()
            target.close()
    if listeners.failure is not None:
        raise Fatal(str(listeners.failure))
