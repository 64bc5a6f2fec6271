"""One server interceptor checks every call's credentials (gRPC metadata) against its role.

Metadata: ``x-homenet-key``, ``x-homenet-ts``, ``x-homenet-nonce``, ``x-homenet-mac``: the
token of :mod:`homenet.node.auth` over the full method name. The verified key (or None for an
anonymous call where the method allows it) is available to servicers as :data:`CURRENT_KEY`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from homenet.control.errors import abort
from homenet.node.auth import AuthError, Authorizer, Credentials
from homenet.node.fleet import FLEET_ROLE
from homenet.node.keys import Key
from homenet.node.limits import source_of
from homenet.node.log import fields
from homenet.node.server import GrpcPlane
from homenet.node.settings import Settings

log = logging.getLogger("homenet.control.auth")

CURRENT_KEY: contextvars.ContextVar[Key | None] = contextvars.ContextVar("homenet_key", default=None)
_META = ("key", "ts", "nonce", "mac")


def call_metadata(creds: Credentials | None, method: str) -> tuple[tuple[str, str], ...]:
    """Metadata proving ``creds`` for one call of ``method`` (empty without credentials)."""
    if creds is None:
        return ()
    return tuple((f"x-homenet-{k}", v) for k, v in creds.token(method).items())


#: Whether a call must carry a key ("required"), may ("optional": a key present is checked and
#: used), or is none of this node's business ("skip": another node checks it).
Required = Callable[[Any], str]


def method_roles(s: Settings) -> dict[str, tuple[str, Required]]:
    """method -> (role, what this request needs of a key). Methods not listed (health,
    reflection, GetStatus) are open.

    A Query with a path is forwarded: the node at the end of the path answers, and checks
    the query key the client put in the request (metadata does not travel down a chain);
    this node does not check a key it may not know.
    """
    always: Required = lambda _: "required"  # noqa: E731
    listen = "required" if s.rl_auth == "required" else "optional"  # open: a key still claims its own id
    query = "required" if s.query_auth == "required" else "skip"
    return {
        "/homenet.v1.RelayService/Listen": ("listen", lambda _: listen),
        "/homenet.v1.RelayService/ListListeners": ("admin", always),
        "/homenet.v1.RelayService/Kick": ("admin", always),
        "/homenet.v1.NodeService/ListSessions": ("admin", always),
        "/homenet.v1.NodeService/GetMetrics": ("admin", always),
        "/homenet.v1.DiscoveryService/Query": ("query", lambda r: "skip" if r.path else query),
        "/homenet.v1.FleetService/Watch": (FLEET_ROLE, always),
        "/homenet.v1.FleetService/Lookup": (FLEET_ROLE, always),
        "/homenet.v1.FleetService/Kick": (FLEET_ROLE, always),
        "/homenet.v1.FleetService/Peers": ("admin", always),
    }


#: Admin reads a fleet peer (a sibling worker) may make with the fleet key.
PEER_READABLE = frozenset(
    {
        "/homenet.v1.NodeService/ListSessions",
        "/homenet.v1.RelayService/ListListeners",
        "/homenet.v1.NodeService/GetMetrics",
    }
)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authorizes each call on the method it routes to; failed logins count against the source."""

    def __init__(
        self,
        settings: Settings,
        authorizer: Authorizer,
        grpc_plane: GrpcPlane,
        fleet_authorizer: Authorizer | None = None,
        fleet_key_id: str = "",
    ) -> None:
        self.authorizer = authorizer
        self.grpc_plane = grpc_plane
        #: Checks the fleet key (peer calls); None: this relay peers with nobody.
        self.fleet_authorizer = fleet_authorizer
        #: The fleet key's id: a call it signs may also read what an admin reads (a worker
        #: answering for its whole node asks its siblings so).
        self.fleet_key_id = fleet_key_id
        self.roles = method_roles(settings)

    async def _check(self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> Key | None:
        peer = self.grpc_plane.peer_of(_local_port(context.peer()))
        if peer is None:  # not through the node's port: a local process on the private one
            await abort(context, AuthError("call the node on its port, not its private control address"))
        if self.authorizer.limiter.blocked(source_of(peer)):  # its HTTP/2 connection outlived the block
            await abort(context, AuthError("source blocked after repeated failed authentication", forbidden=True))
        if self.grpc_plane.is_private(_local_port(context.peer())):
            return await self._sibling(method, context, peer)
        if method not in self.roles:  # open: health, reflection, GetStatus
            return None
        role, needs = self.roles[method]
        need = needs(request)
        if need == "skip":
            return None
        meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        token = {k: meta.get(f"x-homenet-{k}", "") for k in _META}
        if not token["key"] and need != "required":
            return None
        if method in PEER_READABLE and self.fleet_key_id and token["key"] == self.fleet_key_id:
            role = FLEET_ROLE
        authorizer = self.fleet_authorizer if role == FLEET_ROLE else self.authorizer
        if authorizer is None:
            await abort(context, AuthError("this relay has no fleet key: it peers with nobody", forbidden=True))
        try:
            return authorizer.authorize(method, token, role, source_of(peer))
        except AuthError as exc:
            log.info("auth.refused", extra=fields(method=method, peer=peer, reason=exc.reason))
            await abort(context, exc)

    async def _sibling(self, method: str, context: grpc.aio.ServicerContext[Any, Any], peer: str) -> Key | None:
        """A call on a worker's private port: only a sibling's, signed with the node's fleet key."""
        meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        token = {k: meta.get(f"x-homenet-{k}", "") for k in _META}
        if self.fleet_authorizer is None or token["key"] != self.fleet_key_id:
            await abort(context, AuthError("this is a worker's private port: call the node's port", forbidden=True))
        try:
            return self.fleet_authorizer.authorize(method, token, FLEET_ROLE, source_of(peer))
        except AuthError as exc:
            await abort(context, exc)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Every call is checked (where it came from, then the key its method needs), whatever
        its kind: unary or streaming, listed or open."""
        handler = await continuation(details)
        if handler is None:
            return handler
        method, check = details.method, self._check
        ser = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            uu: Any = handler.unary_unary  # the stubs type handlers as sync

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                CURRENT_KEY.set(await check(method, context, request))
                return await uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, method, check, True), **ser)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, method, check, False), **ser)
        if handler.stream_unary is not None:
            su: Any = handler.stream_unary

            async def in_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                CURRENT_KEY.set(await check(method, context, None))
                return await su(requests, context)

            return grpc.stream_unary_rpc_method_handler(in_stream, **ser)
        return handler


Check = Callable[[str, "grpc.aio.ServicerContext[Any, Any]", Any], Awaitable[Key | None]]


def _streaming(inner: Any, method: str, check: Check, unary_in: bool) -> Any:
    """A streaming handler that checks the call first. The inner handler either yields its
    answers (an async generator) or writes them with ``context.write`` (a coroutine, like the
    health service's Watch): the wrapper must be of the same kind."""
    if inspect.isasyncgenfunction(inner):

        async def gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            CURRENT_KEY.set(await check(method, context, request if unary_in else None))
            async for response in inner(request, context):
                yield response

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        CURRENT_KEY.set(await check(method, context, request if unary_in else None))
        return await inner(request, context)

    return coro


def _local_port(peer: str) -> int:
    """The port of a gRPC peer string (``ipv4:127.0.0.1:PORT``), or -1."""
    try:
        return int(peer.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1


def real_peer(grpc_plane: GrpcPlane, peer: str) -> str:
    """The client address behind a gRPC peer string (calls reach the control server through
    the node's one port, from a loopback port the node remembers)."""
    try:
        return grpc_plane.peer_of(int(peer.rsplit(":", 1)[1])) or peer
    except (IndexError, ValueError):
        return peer
