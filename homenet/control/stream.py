"""Keep one long-lived stream up: the reconnect loop of every stream HomeNet holds open
(a listener's Listen stream to its relay today, fleet peers' watch streams next).

One *session* opens the stream, serves it and returns (or raises :class:`Disconnected`) when
it ends; the loop runs sessions forever with exponential backoff and full jitter (tenacity),
capped at ``backoff_max`` seconds. Any other exception ends the loop: it is the caller's
verdict that retrying cannot help (a refusal, a bug).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from homenet.node.errors import Code, HomeNetError
from homenet.node.log import fields


class Disconnected(HomeNetError):
    """The stream could not be opened or was lost; retried with backoff."""

    default_code = Code.UNAVAILABLE


class Reconnecting:
    """Runs ``session`` again each time it ends, with backoff, until cancelled."""

    def __init__(
        self,
        name: str,
        session: Callable[[], Awaitable[None]],
        backoff_max: float,
        log: logging.Logger,
        event: str,
        first_wait: float = 0.1,
    ) -> None:
        self.name = name
        self.event = event
        self.session = session
        self.backoff_max = backoff_max
        self.log = log
        self.first_wait = first_wait
        #: Sessions that ended and were retried (for operators and metrics).
        self.reconnects = 0

    async def run(self) -> None:
        """Forever (cancel to stop); raises what a session raised if it is not Disconnected."""
        while True:
            retrying = AsyncRetrying(
                wait=wait_random_exponential(multiplier=self.first_wait, max=self.backoff_max),
                retry=retry_if_exception_type(Disconnected),
                before_sleep=self._retrying,
            )
            async for attempt in retrying:
                with attempt:
                    await self.session()

    def _retrying(self, state: RetryCallState) -> None:
        self.reconnects += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        self.log.info(self.event, extra=fields(stream=self.name, error=str(exc)))
