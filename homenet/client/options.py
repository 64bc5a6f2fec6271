"""What every call of the client library takes: a key, TLS for hns:// routes, a retry policy."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from homenet.node.address import Route
from homenet.node.auth import Credentials
from homenet.node.errors import UsageError
from homenet.node.keys import parse_key_ref
from homenet.node.log import fields
from homenet.node.tls import client_context

if TYPE_CHECKING:
    from tenacity import RetryCallState

T = TypeVar("T")

log = logging.getLogger("homenet.client")

#: A key to sign requests with: ``"ID:SECRET"`` (what ``homenet key new`` printed), a
#: :class:`~homenet.node.auth.Credentials`, or None (unsigned).
Key = str | Credentials | None

#: Backoff between attempts: exponential with full jitter, from ``FIRST_WAIT`` seconds up to
#: ``MAX_WAIT`` seconds (tenacity's ``wait_random_exponential``).
FIRST_WAIT = 0.1
MAX_WAIT = 2.0


def credentials(key: Key) -> Credentials | None:
    """``key`` as credentials; a malformed ``ID:SECRET`` raises a usage error (code 400)."""
    if key is None or isinstance(key, Credentials):
        return key
    return Credentials(*parse_key_ref(key))


def tls_context(
    route: Route, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """The TLS context of an ``hns://`` route (``ca``, else the system store; ``cert`` and
    ``key`` for nodes that require client certificates); None for ``hn://``."""
    return client_context(ca, cert, key) if route.tls else None


def check_retries(retries: int) -> int:
    """``retries`` if it is a valid count of extra attempts (a usage error otherwise)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise UsageError(f"retries is a count of extra attempts (0 or more), not {retries!r}")
    return retries


def _retrying(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.debug("client.retrying", extra=fields(attempt=state.attempt_number, error=str(exc)))


async def attempts(retries: int, retryable: Callable[[BaseException], bool], call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, made again up to ``retries`` times while it fails with an error that
    ``retryable`` accepts (exponential backoff with jitter between attempts); any other
    error, or the last one, is raised as it is."""
    if check_retries(retries) == 0:  # one attempt: no need to load tenacity (start-up time of the CLI)
        return await call()
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    retrying = AsyncRetrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_random_exponential(multiplier=FIRST_WAIT, max=MAX_WAIT),
        retry=retry_if_exception(retryable),
        before_sleep=_retrying,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity returns or raises")
