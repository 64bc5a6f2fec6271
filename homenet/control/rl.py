"""The listener's end of the Remote Listen stream: register, answer events, reconnect.

One :class:`RLClient` per ``--rl`` URL. It keeps a gRPC stream to the relay (through the
relay's route when it has hops: the stream then rides a HomeNet route; through a WebSocket
tunnel for a ``ws://`` or ``wss://`` relay), reconnects with
tenacity (exponential backoff with jitter, capped, forever) and takes its listenId back with
the resumption secret it keeps in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from homenet import __version__
from homenet.control.auth import call_metadata
from homenet.control.client import open_channel
from homenet.control.discovery import answer_to_pb, query_from_pb
from homenet.control.errors import status_value
from homenet.control.stream import Disconnected, Reconnecting
from homenet.control.v1 import relay_pb2, relay_pb2_grpc
from homenet.node.address import Route
from homenet.node.auth import Credentials
from homenet.node.client import Dialing
from homenet.node.errors import Code, HomeNetError
from homenet.node.forward import Forwarder
from homenet.node.log import fields
from homenet.node.query import Query, QueryAnswer, QueryError
from homenet.node.remote import RemoteListen, Serve
from homenet.node.tls import client_context

log = logging.getLogger("homenet.rl")

REGISTER_TIMEOUT = 5.0
_FATAL = {
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


class Refused(HomeNetError):
    """The relay refused the registration itself (id taken, bad id, loop): one-line message."""

    default_code = Code.FORBIDDEN


class IdentityBusy(HomeNetError):
    """Another process uses the same listener identity (state file): one-line message."""

    default_code = Code.LOCKED
    usage = True


@dataclass(frozen=True)
class RLOptions:
    """How to remote-listen on one relay."""

    route: Route
    listen_id: str = ""
    pool_size: int = 4
    name: str = ""
    node_id: str = ""
    state_dir: str = ""
    backoff_max: float = 1.5
    dial_timeout: float = 5.0
    creds: Credentials | None = None
    tls_ca: str | None = None
    #: This node's certificate, for relays that require client certificates (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: What this process is to the relay: ``node`` (a home node), or ``rl -> HOST:PORT`` (a
    #: one-service forwarder). One identity (listenId + resumption secret) per role and relay.
    role: str = "node"


class StateFile:
    """The listenId and resumption secret of one identity, kept across restarts (mode 0600).

    An identity is a relay route plus the role of the process that listens on it (plus the
    listenId, when one is asked for explicitly). A process holds an exclusive lock on the
    identities it uses, so two processes never share one (they would take the listenId from
    each other forever).
    """

    def __init__(self, state_dir: str, url: str, role: str = "node", listen_id: str = "") -> None:
        self.url, self.role = url, role
        self.identity = f"{url} ({role}{', ' + listen_id if listen_id else ''})"
        # a home node keeps the file of the versions that keyed identities by the URL alone
        key = url if role == "node" else f"{url}\n{role}\n{listen_id}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = Path(state_dir) / "rl" / f"{digest}.json" if state_dir else None
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Lock this identity for this process; :class:`IdentityBusy` if another holds it."""
        if self.path is None or self._lock_fd is not None:
            return
        lock = self.path.with_suffix(".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only state dir: no identity to keep, nothing to share
            log.warning("rl.state_not_locked", extra=fields(path=str(lock), error=exc.strerror or str(exc)))
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise IdentityBusy(
                f"the listener identity for {self.identity} in {self.path.parent.parent} is in use by process "
                f"{holder}: stop it, or run this one with its own --state-dir"
                + ("" if self.role == "node" else " or --listen-id")
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock; the file stays for the next owner
            self._lock_fd = None

    def load(self) -> tuple[str, str]:
        if self.path is None:
            return "", ""
        try:
            data = json.loads(self.path.read_text())
            return str(data.get("listen_id", "")), str(data.get("resume_secret", ""))
        except (OSError, ValueError):
            return "", ""

    def save(self, listen_id: str, secret: str) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"url": self.url, "listen_id": listen_id, "resume_secret": secret}, fh)
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("rl.state_not_saved", extra=fields(path=str(self.path), error=str(exc)))


_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
]


class _Stream:
    """A Listen call and its one writer at a time (events are answered concurrently)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._lock = asyncio.Lock()

    async def send(self, msg: relay_pb2.ListenerMessage) -> None:
        async with self._lock, asyncio.timeout(REGISTER_TIMEOUT):
            await self.call.write(msg)


class RLClient:
    """Keeps one registration alive on one relay."""

    def __init__(
        self,
        opts: RLOptions,
        serve: Serve,
        announce: Callable[[str], None],
        answer: Callable[[Query, str], Awaitable[QueryAnswer]] | None = None,
    ) -> None:
        self.opts = opts
        self.serve = serve
        self.announce = announce
        self.answer = answer
        self.state = StateFile(opts.state_dir, str(opts.route), opts.role, opts.listen_id)
        self.listen_id = ""
        self._forwarder: Forwarder | None = None
        self._target_ep = ""
        self._ever_registered = False
        self._fresh = ""
        #: Registered on a live stream now (for metrics).
        self.connected = False
        self._stream = Reconnecting(str(opts.route), self._session, opts.backoff_max, log, "rl.reconnecting")

    @property
    def url(self) -> str:
        return f"{self.opts.route}/{self.listen_id}"

    @property
    def reconnects(self) -> int:
        """Streams lost and opened again."""
        return self._stream.reconnects

    async def _target(self) -> str:
        """Where the gRPC channel connects: the relay itself, or a local forwarder whose every
        connection goes through the relay's route (hops) or its WebSocket transport."""
        route = self.opts.route
        if not route.hops and not route.ws:
            return str(route.entry)
        if self._forwarder is None:  # the stream rides a route or a tunnel: forward a local port to it
            self._forwarder = Forwarder(route, "127.0.0.1", 0, self._dialing())
            ep = await self._forwarder.start()
            self._target_ep = str(ep)
        return self._target_ep

    def _fresh_id(self) -> str:
        """The id a new identity asks for: empty (the relay picks: a random id, or the key's own
        id for a home node) or, for a one-service forwarder with a listen key, a random id in
        that key's namespace (``KEY-xxxx``), so it never competes with the key's home node."""
        creds = self.opts.creds
        if self.opts.role != "node" and creds is not None and not self._fresh:
            room = 64 - len(creds.key_id) - 1
            if room >= 8:
                self._fresh = f"{creds.key_id}-{secrets.token_urlsafe(12)[:room]}"
        return self._fresh

    def _dialing(self) -> Dialing:
        return Dialing(self.opts.dial_timeout, self.opts.creds, self._tls())

    def _tls(self) -> ssl.SSLContext | None:
        """TLS for the data connections (and tunnels) of an hns:// or wss:// relay route (with
        our certificate, if any)."""
        if not self.opts.route.tls:
            return None
        return client_context(self.opts.tls_ca, self.opts.tls_cert, self.opts.tls_key)

    def acquire(self) -> None:
        """Lock this client's identity now (before the process says it is ready)."""
        self.state.acquire()

    async def run(self) -> None:
        """Register and serve forever; raises :class:`Refused` if the first registration is refused."""
        self.state.acquire()
        try:
            await self._stream.run()
        finally:
            self.state.release()
            if self._forwarder is not None:
                await self._forwarder.close()

    async def _session(self) -> None:
        """One stream's life; returns when it ends cleanly, raises Disconnected otherwise."""
        target = await self._target()
        saved_id, secret = self.state.load()
        listen_id = self.opts.listen_id or saved_id or self._fresh_id()
        if listen_id != saved_id:
            secret = ""
        route = self.opts.route
        channel = open_channel(  # TLS directly only to an hns:// relay: a tunnel has its own
            target, route.tls and not route.hops and not route.ws, self.opts.tls_ca,
            cert=self.opts.tls_cert, key=self.opts.tls_key, options=_CHANNEL_OPTIONS,
        )  # fmt: skip
        metadata = call_metadata(self.opts.creds, "/homenet.v1.RelayService/Listen")
        stream = _Stream(relay_pb2_grpc.RelayServiceStub(channel).Listen(metadata=metadata))  # type: ignore[call-arg]
        registered = False  # a refusal after a good registration is not a refusal of it
        try:
            reg = await self._register(stream, listen_id, secret)
            registered = self.connected = True
            await self._serve_events(stream, reg)
        except grpc.aio.AioRpcError as exc:
            raise self._refusal(exc, listen_id, registered) from None
        except TimeoutError:
            raise Disconnected("relay did not answer the registration in time") from None
        except OSError as exc:
            raise Disconnected(str(exc)) from None
        finally:
            self.connected = False
            stream.call.cancel()
            with contextlib.suppress(Exception):
                await channel.close(None)

    async def _register(self, stream: _Stream, listen_id: str, secret: str) -> relay_pb2.Registered:
        register = relay_pb2.Register(
            listen_id=listen_id, resume_secret=secret, name=self.opts.name, version=__version__,
            pool_size=self.opts.pool_size, node_id=self.opts.node_id,
        )  # fmt: skip
        async with asyncio.timeout(REGISTER_TIMEOUT):
            await stream.call.write(relay_pb2.ListenerMessage(register=register))
            first = await stream.call.read()
        if not isinstance(first, relay_pb2.RelayMessage) or first.WhichOneof("msg") != "registered":
            raise Disconnected("relay closed the stream before registering us")
        reg = first.registered
        self.listen_id = reg.listen_id
        self.state.save(reg.listen_id, reg.resume_secret)
        self._ever_registered = True
        log.info("rl.registered", extra=fields(url=self.url, pool=reg.pool_size))
        self.announce(f"LISTENING {self.url}")
        return reg

    async def _serve_events(self, stream: _Stream, reg: relay_pb2.Registered) -> None:
        """Answer the relay's events until the stream ends or goes silent."""

        async def report(ticket: str, reason: str) -> None:
            await stream.send(relay_pb2.ListenerMessage(dial_failed=relay_pb2.DialFailed(ticket=ticket, reason=reason)))

        remote = RemoteListen(self.opts.route, self.serve, report, self._dialing(), reg.pool_size)
        silence = 3 * (reg.ping_interval or 2.0)
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        msg = await stream.call.read()
                except TimeoutError:
                    raise Disconnected(f"relay silent for {silence:g}s") from None
                if not isinstance(msg, relay_pb2.RelayMessage):
                    raise Disconnected("relay ended the stream")
                kind = msg.WhichOneof("msg")
                if kind == "incoming":
                    remote.incoming(msg.incoming.ticket, msg.incoming.client, msg.incoming.endpoint)
                elif kind == "pool_grant":
                    remote.pool_grant(msg.pool_grant.ticket, msg.pool_grant.endpoint)
                elif kind == "ping":
                    await stream.send(relay_pb2.ListenerMessage(pong=relay_pb2.Pong(seq=msg.ping.seq)))
                elif kind == "query":
                    remote.spawn(self._answer(msg.query, stream.send))
        finally:
            await remote.close()

    def _refusal(self, exc: grpc.aio.AioRpcError, listen_id: str, registered: bool) -> HomeNetError:
        """What a failed call means: give up (:class:`Refused`) or retry (:class:`Disconnected`)."""
        if exc.code() is grpc.StatusCode.ABORTED:  # another process uses our identity: give up
            return Refused(f"relay {self.opts.route} refused {listen_id}: {exc.details()}")
        if exc.code() in _FATAL and not registered:
            if not self._ever_registered:
                return Refused(f"relay {self.opts.route} refused {listen_id or 'registration'}: {exc.details()}")
            log.error("rl.refused", extra=fields(relay=str(self.opts.route), error=exc.details()))
        return Disconnected(f"{exc.code().name.lower()}: {exc.details()}")

    async def _answer(
        self, fq: relay_pb2.ForwardedQuery, send: Callable[[relay_pb2.ListenerMessage], Awaitable[None]]
    ) -> None:
        """Answer a forwarded discovery query (from our table, or further down our listeners)."""
        query = query_from_pb(fq.request, max(0.1, fq.timeout))
        result = relay_pb2.QueryResult(id=fq.id)
        try:
            if self.answer is None:
                raise QueryError("not_found", "this listener is a one-service forwarder, not a node")
            result.response.CopyFrom(answer_to_pb(await self.answer(query, self.listen_id)))
        except QueryError as exc:
            result.error_code = status_value(exc.code)
            result.error = exc.message
        with contextlib.suppress(Exception):
            await send(relay_pb2.ListenerMessage(query_result=result))
