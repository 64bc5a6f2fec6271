"""HomeNet's one error taxonomy: every error the product raises on purpose is a
:class:`HomeNetError` carrying a :class:`Code`.

The code is the contract: the data plane sends it in its reply line, the control plane maps
it to a gRPC status with one table (``homenet.control.errors``), and the CLI turns any
HomeNetError into one line on stderr and an exit status (``usage`` errors exit 2, the rest 1).
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Stable reply codes; the number is the contract, the name its spelling on the wire."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    TIMEOUT = 408
    CONFLICT = 409
    TOO_LARGE = 413
    LOCKED = 423
    TOO_MANY = 429
    HOP_LIMIT = 430
    LOOP = 431
    #: The listener's relay went away and it is reconnecting to another relay of the fleet.
    MOVING = 432
    INTERNAL = 500
    BAD_GATEWAY = 502
    UNAVAILABLE = 503
    GATEWAY_TIMEOUT = 504
    VERSION_NOT_SUPPORTED = 505
    UNRESOLVABLE = 506

    @property
    def slug(self) -> str:
        """The code's wire name: ``FORBIDDEN`` -> ``forbidden``."""
        return self.name.lower().replace("_", "-")


class HomeNetError(Exception):
    """An error HomeNet reports on purpose: ``code`` says what kind, the message is one line
    that a user can act on (safe to show, never a secret)."""

    #: The code of every error of this class unless one is given.
    default_code: Code = Code.INTERNAL
    #: A usage error: the user's arguments or configuration are wrong (CLI exit status 2).
    usage: bool = False

    def __init__(self, reason: str = "", code: Code | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = self.default_code if code is None else code


class UsageError(HomeNetError):
    """Bad arguments or configuration."""

    default_code = Code.BAD_REQUEST
    usage = True


class RouteError(HomeNetError):
    """A request the node answers with an error reply (``code``, one-line ``reason``)."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason, code)
