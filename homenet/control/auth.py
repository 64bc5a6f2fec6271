"""One server interceptor checks every call's credentials (gRPC metadata) against its role.

Metadata: ``x-homenet-key``, ``x-homenet-ts``, ``x-homenet-nonce``, ``x-homenet-mac``: the
token of :mod:`homenet.node.auth` over the full method name. The verified key (or None for an
anonymous call where the method allows it) is available to servicers as :data:`CURRENT_KEY`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from homenet.control.errors import abort
from homenet.node.auth import AuthError, Credentials
from homenet.node.keys import Key
from homenet.node.limits import source_of
from homenet.node.log import fields
from homenet.node.server import Node

log = logging.getLogger("homenet.control.auth")

CURRENT_KEY: contextvars.ContextVar[Key | None] = contextvars.ContextVar("homenet_key", default=None)
_META = ("key", "ts", "nonce", "mac")


def call_metadata(creds: Credentials | None, method: str) -> tuple[tuple[str, str], ...]:
    """Metadata proving ``creds`` for one call of ``method`` (empty without credentials)."""
    if creds is None:
        return ()
    return tuple((f"x-homenet-{k}", v) for k, v in creds.token(method).items())


Required = Callable[[Any], bool]


def method_roles(node: Node) -> dict[str, tuple[str, Required]]:
    """method -> (role, is it required for this request). Methods not listed (health,
    reflection, GetStatus) are open.

    A Query with a path is forwarded: the node at the end of the path answers, and checks
    the query key the client put in the request (metadata does not travel down a chain).
    """
    s = node.settings
    always: Required = lambda _: True  # noqa: E731
    return {
        "/homenet.v1.RelayService/Listen": ("listen", lambda _: s.rl_auth == "required"),
        "/homenet.v1.RelayService/ListListeners": ("admin", always),
        "/homenet.v1.RelayService/Kick": ("admin", always),
        "/homenet.v1.NodeService/ListSessions": ("admin", always),
        "/homenet.v1.DiscoveryService/Query": ("query", lambda r: s.query_auth == "required" and not r.path),
    }


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authorizes each call on the method it routes to; failed logins count against the source."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.roles = method_roles(node)

    async def _check(self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> Key | None:
        role, is_required = self.roles[method]
        required = is_required(request)
        meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        token = {k: meta.get(f"x-homenet-{k}", "") for k in _META}
        if not token["key"] and not required:
            return None
        try:
            return self.node.verifier.verify(method, token, role)
        except AuthError as exc:
            peer = real_peer(self.node, context.peer())
            if not exc.forbidden:
                src = source_of(peer)
                if self.node.limiter.failed(src):
                    log.warning("auth.source_blocked", extra=fields(source=src))
            log.info("auth.refused", extra=fields(method=method, peer=peer, reason=exc.reason))
            await abort(context, exc)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method = details.method
        if handler is None or method not in self.roles:
            return handler
        check = self._check
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary  # the stubs type handlers as sync

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                CURRENT_KEY.set(await check(method, context, request))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )  # fmt: skip
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def streams(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                CURRENT_KEY.set(await check(method, context, None))
                async for response in inner_ss(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                streams, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )  # fmt: skip
        return handler


def real_peer(node: Node, peer: str) -> str:
    """The client address behind a gRPC peer string (calls reach the control server through
    the node's one port, from a loopback port the node remembers)."""
    try:
        return node.control_peer(int(peer.rsplit(":", 1)[1])) or peer
    except (IndexError, ValueError):
        return peer
