"""Remote listen for programs: :func:`remote_listen` registers on a relay and forwards every
client of the granted ``hn://`` URL to one target, for as long as a ``async with`` block runs.

It is ``homenet rl`` as a library: the same :class:`~homenet.control.rl.RLClient` (one
registration, kept alive with reconnects and backoff) serving a
:class:`~homenet.node.remote.FixedTarget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc

from homenet.client.options import Key, credentials
from homenet.control.errors import CODE_OF_STATUS, code_of
from homenet.control.rl import Refused, RLClient, RLOptions
from homenet.node.address import parse_endpoint, parse_url
from homenet.node.errors import Code, HomeNetError
from homenet.node.remote import FixedTarget


class ListenTimeout(HomeNetError):
    """No listenId was granted in time (the relay is unreachable or keeps failing the stream)."""

    default_code = Code.GATEWAY_TIMEOUT


def _failure(exc: BaseException) -> BaseException:
    """What the registration task ended with, with the relay's own code when it sent one
    (``Refused`` carries 403 whatever the refusal was: 409 for a listenId in use, ...)."""
    cause = exc.__context__
    if isinstance(exc, Refused) and isinstance(cause, grpc.aio.AioRpcError):
        code = code_of(cause) or CODE_OF_STATUS.get(cause.code())
        return Refused(str(exc), code)
    return exc


async def _stop(task: asyncio.Task[None], timeout: float) -> BaseException | None:
    """Cancel the registration (its stream ends, the relay marks the listener offline) and
    return what it failed with before that, if it did."""
    task.cancel()
    await asyncio.wait({task}, timeout=timeout)
    if task.done() and not task.cancelled() and task.exception() is not None:
        return _failure(task.exception() or AssertionError())
    return None


@contextlib.asynccontextmanager
async def remote_listen(
    relay: str,
    *,
    to: str,
    listen_id: str | None = None,
    key: Key = None,
    timeout: float = 10.0,
    pool_size: int = 4,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    state_dir: str | None = None,
) -> AsyncIterator[str]:
    """Remote-listen on ``relay`` (``hn[s]://RELAY[:PORT][/HOP...]``) and forward every client
    to ``to`` (``HOST:PORT``); yields the granted URL (``hn://RELAY:PORT/LISTENID``).

    ``listen_id`` claims an id (a ``listen`` key may claim its own id, or ``ID-anything``);
    by default the relay picks one (``KEYID-random`` with a listen key). The registration is
    kept alive (reconnects with backoff) until the block exits; then the stream ends and the
    relay holds the id for its owner a while (clients get ``503 offline``). ``state_dir``
    keeps the listenId and its resumption secret across runs (by default a private
    temporary directory: the same id for the block's life, a new one next time).

    Raises :class:`~homenet.control.rl.Refused` (``.code``: 401, 403, 409, ...) when the
    relay refuses the registration, :class:`ListenTimeout` (504) when none is granted within
    ``timeout``; a refusal while the block runs is raised when it exits.
    """
    route = parse_url(relay)
    target = parse_endpoint(to)
    creds = credentials(key)
    granted: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def announce(_line: str) -> None:  # each (re)registration: the first one is the grant
        if not granted.done():
            granted.set_result(client.url)

    with contextlib.ExitStack() as stack:
        directory = state_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="homenet-rl-"))
        opts = RLOptions(
            route=route, listen_id=listen_id or "", pool_size=pool_size, node_id=secrets.token_hex(8),
            state_dir=directory, dial_timeout=timeout, creds=creds, tls_ca=tls_ca, tls_cert=tls_cert,
            tls_key=tls_key, role=f"rl -> {target}",
        )  # fmt: skip
        fixed = FixedTarget(target.host, target.port, timeout)
        client = RLClient(opts, fixed.serve, announce)
        try:
            client.acquire()  # another process with this identity: IdentityBusy now, not later
        except BaseException:
            fixed.close()
            raise
        task = asyncio.create_task(client.run())
        try:
            first: set[asyncio.Future[Any]] = {task, granted}
            await asyncio.wait(first, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not granted.done():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise _failure(task.exception() or AssertionError())
                raise ListenTimeout(f"relay {route} granted no listenId within {timeout:g}s; is it running?")
            yield granted.result()
        finally:
            try:
                failure = await _stop(task, timeout)
            finally:
                fixed.close()
        if failure is not None:
            raise failure
