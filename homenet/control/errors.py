"""The one table from HomeNet's error types to gRPC status codes."""

from __future__ import annotations

import grpc

from homenet.node.listeners import (
    BadListenId,
    ListenerConflict,
    ListenerError,
    ListenerForbidden,
    ListenerLoop,
    ListenerNotFound,
    ListenerOffline,
    TakeoverWar,
)

STATUS: dict[type[Exception], grpc.StatusCode] = {
    # ABORTED tells the listener to give up for good (not retry): its identity is in use
    TakeoverWar: grpc.StatusCode.ABORTED,
    ListenerConflict: grpc.StatusCode.ALREADY_EXISTS,
    BadListenId: grpc.StatusCode.INVALID_ARGUMENT,
    ListenerLoop: grpc.StatusCode.FAILED_PRECONDITION,
    ListenerForbidden: grpc.StatusCode.PERMISSION_DENIED,
    ListenerNotFound: grpc.StatusCode.NOT_FOUND,
    ListenerOffline: grpc.StatusCode.UNAVAILABLE,
    ListenerError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: Exception) -> grpc.StatusCode:
    """The status code for ``exc`` (most specific type wins); INTERNAL when unmapped."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


#: Discovery query failures (``QueryError.kind``) as gRPC status codes, and back.
QUERY_STATUS: dict[str, grpc.StatusCode] = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "failed": grpc.StatusCode.INTERNAL,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}
QUERY_KIND: dict[int, str] = {code.value[0]: kind for kind, code in QUERY_STATUS.items()}
