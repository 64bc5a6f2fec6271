"""Local ends of a route: a TCP port forwarding every connection (``homenet listen``), and
standard input/output (``homenet connect``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from typing import BinaryIO

from homenet.node.address import Endpoint, Route
from homenet.node.client import Dialing, Opened, RouteFailed
from homenet.node.dialer import listen_socket, tune
from homenet.node.log import fields
from homenet.node.splice import Splices

log = logging.getLogger("homenet.forward")

#: Seconds the stdin thread waits for room at a time (it waits again after each).
_STDIN_WAIT = 30.0


class Forwarder:
    """Listens on a local TCP port and splices each connection through ``route``.

    A route without hops forwards to its first node itself, over the route's transport (the
    RL client's gRPC channel to a ``ws://`` relay: each connection is one tunnel)."""

    def __init__(self, route: Route, bind: str = "127.0.0.1", port: int = 0, dialing: Dialing | None = None) -> None:
        self.route = route
        self.bind = bind
        self.port = port
        self.dialing = dialing or Dialing()
        self.splices = Splices()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None

    async def start(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        lsock = await listen_socket(self.bind, self.port, 1024)
        self._lsock = lsock
        self._accept_task = loop.create_task(self._accept_loop(lsock))
        host, port = lsock.getsockname()[:2]
        return Endpoint(str(host), int(port))

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                log.warning("listen.accept_failed", extra=fields(error=str(exc)))
                await asyncio.sleep(0.1)  # EMFILE: back off instead of spinning
                continue
            tune(sock)
            task = loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            if self.route.hops:
                opened = await self.dialing.open(self.route)
            else:
                opened = Opened(await self.dialing.connect(self.route), b"")
        except RouteFailed as exc:
            log.warning("listen.route_failed", extra=fields(route=str(self.route), error=str(exc)))
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        with contextlib.suppress(OSError):  # the client left already: both are closed
            await self.splices.start(sock, opened.sock, to_a=opened.early)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._lsock is not None:
            self._lsock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.splices.abort_all("forwarder closed")
        self.splices.pool.close()


async def stdio_session(route: Route, data: bytes | None, dialing: Dialing, out: BinaryIO | None = None) -> None:
    """netcat over a route: ``data`` (or stdin) to the target, the target to stdout.

    Returns when the target closes its side; raises :class:`RouteFailed` if the route fails
    and ``ConnectionError`` if it breaks midway.
    """
    loop = asyncio.get_running_loop()
    out = out or sys.stdout.buffer
    opened = await dialing.open(route, first=data or b"")
    sock = opened.sock
    try:
        if opened.early:
            out.write(opened.early)
            out.flush()
        if data is not None:
            sock.shutdown(socket.SHUT_WR)
        else:
            threading.Thread(target=_pump_stdin, args=(sock.dup(),), daemon=True).start()
        while chunk := await loop.sock_recv(sock, 1 << 16):
            out.write(chunk)
            out.flush()
    finally:
        sock.close()


def _pump_stdin(sock: socket.socket) -> None:
    """Copy stdin to the socket (in a thread), then half-close it.

    ``sock`` is a dup of the event loop's socket and shares its file status flags: making it
    blocking would make the loop's reads block too, and stall the loop when it also runs the
    route's TLS or WebSocket pump (the bytes the read waits for). A timeout keeps the socket
    non-blocking and makes Python wait for room with poll, here in the thread.
    """
    sock.settimeout(_STDIN_WAIT)
    try:
        while chunk := os.read(0, 1 << 16):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[sock.send(view) :]
                except TimeoutError:  # the route is slow to take more: keep waiting
                    continue
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
