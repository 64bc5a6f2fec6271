"""The one table from HomeNet's error types to gRPC status codes."""

from __future__ import annotations

import grpc

from homenet.node.listeners import (
    BadListenId,
    ListenerConflict,
    ListenerError,
    ListenerLoop,
    ListenerNotFound,
    ListenerOffline,
)

STATUS: dict[type[Exception], grpc.StatusCode] = {
    ListenerConflict: grpc.StatusCode.ALREADY_EXISTS,
    BadListenId: grpc.StatusCode.INVALID_ARGUMENT,
    ListenerLoop: grpc.StatusCode.FAILED_PRECONDITION,
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
