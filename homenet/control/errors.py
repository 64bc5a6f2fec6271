"""The one table from HomeNet's codes to gRPC status codes, and back.

Servicers raise or catch :class:`HomeNetError` and call :func:`abort`: the status comes from
the error's code through :data:`STATUS`, and the code itself travels in the trailing
metadata (``x-homenet-code``), so a client tells "the node said offline" from "the channel
is down" by the code, never by the text.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from homenet.node.errors import Code, HomeNetError

CODE_KEY = "x-homenet-code"

STATUS: dict[Code, grpc.StatusCode] = {
    Code.OK: grpc.StatusCode.OK,
    Code.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    Code.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Code.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # the listener must give up, not retry: its identity is in use by another process
    Code.LOCKED: grpc.StatusCode.ABORTED,
    Code.TOO_MANY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.HOP_LIMIT: grpc.StatusCode.FAILED_PRECONDITION,
    Code.LOOP: grpc.StatusCode.FAILED_PRECONDITION,
    Code.MOVING: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.BAD_GATEWAY: grpc.StatusCode.UNAVAILABLE,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.GATEWAY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.VERSION_NOT_SUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    Code.UNRESOLVABLE: grpc.StatusCode.NOT_FOUND,
}
#: The code a bare status stands for (a peer that sent no ``x-homenet-code``).
CODE_OF_STATUS: dict[grpc.StatusCode, Code] = {
    grpc.StatusCode.INVALID_ARGUMENT: Code.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: Code.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: Code.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: Code.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: Code.CONFLICT,
    grpc.StatusCode.ABORTED: Code.LOCKED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.TOO_MANY,
    grpc.StatusCode.FAILED_PRECONDITION: Code.LOOP,
    grpc.StatusCode.UNAVAILABLE: Code.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Code.GATEWAY_TIMEOUT,
    grpc.StatusCode.UNIMPLEMENTED: Code.VERSION_NOT_SUPPORTED,
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status for ``exc``: from its code if it is a HomeNetError, INTERNAL otherwise."""
    return STATUS.get(exc.code, grpc.StatusCode.INTERNAL) if isinstance(exc, HomeNetError) else grpc.StatusCode.INTERNAL


def status_value(code: Code) -> int:
    """The numeric gRPC status of ``code`` (what messages carry, e.g. a query result)."""
    value: int = STATUS[code].value[0]
    return value


def code_of_status_value(value: int) -> Code:
    """Inverse of :func:`status_value` (INTERNAL for a status no code maps to)."""
    for status, code in CODE_OF_STATUS.items():
        if status.value[0] == value:
            return code
    return Code.INTERNAL


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: HomeNetError) -> NoReturn:
    """End the call with ``exc``: its status, its one-line reason, its code in the trailers."""
    await context.abort(status_of(exc), exc.reason, trailing_metadata=((CODE_KEY, str(int(exc.code))),))
    raise AssertionError("unreachable")  # abort raises


def code_of(err: grpc.aio.AioRpcError) -> Code | None:
    """The HomeNet code a node attached to a failed call (None: not sent by a node, e.g. the
    channel could not connect)."""
    trailers: Any = err.trailing_metadata() or ()  # the stubs type items as opaque
    for key, value in trailers:
        if key == CODE_KEY and isinstance(value, str) and value.isdigit():
            try:
                return Code(int(value))
            except ValueError:
                return None
    return None
