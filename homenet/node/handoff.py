"""Connections handed between the worker processes of one node, by file descriptor.

A connection that reaches the wrong worker (its listener's stream lives in a sibling, or it
dials back for a sibling's ticket) is not relayed through a second TCP hop: the worker sends
the socket itself, with the bytes it already read, over a ``SOCK_SEQPACKET`` Unix socket
(``SCM_RIGHTS``), and the sibling serves it as if it had accepted it. One message per
connection, no copy of the stream afterwards: the sibling splices the client directly.

The Unix sockets live in the supervisor's private directory (mode 0700): only this node's
processes can reach them. What is handed over is a forwarded hop signed with the fleet key
(see :mod:`homenet.node.fleet`), checked and never passed on again by the sibling.

Message: ``depth (2 bytes) | peer length (2) | peer | data``, with the socket as ancillary
data; ``data`` is what the sibling reads first (the request line, then what followed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

from homenet.node.address import Endpoint
from homenet.node.log import fields

log = logging.getLogger("homenet.handoff")

#: Largest message (request line + what came with it); the rest stays in the socket.
MAX_MESSAGE = 256 * 1024
_HEAD = struct.Struct("!HH")
#: Seconds a send may wait for a sibling's queue to drain.
SEND_TIMEOUT = 2.0

#: Serves a connection handed over: (socket, peer, data already read, depth).
Receive = Callable[[socket.socket, str, bytes, int], None]


class HandedOff(Exception):
    """The connection went to a sibling worker: this process has nothing more to do with it."""


class HandoffError(OSError):
    """The sibling could not take the connection (gone, restarting, or its queue is full)."""


def encode(peer: str, data: bytes, depth: int) -> bytes:
    raw = peer.encode("utf-8", "replace")[:512]
    if len(data) > MAX_MESSAGE - _HEAD.size - len(raw):
        raise HandoffError(f"{len(data)} bytes read ahead: too many to hand over")
    return _HEAD.pack(min(depth, 0xFFFF), len(raw)) + raw + data


def decode(msg: bytes) -> tuple[str, bytes, int]:
    """(peer, data, depth) of one message; ValueError when it is malformed."""
    if len(msg) < _HEAD.size:
        raise ValueError("short handoff message")
    depth, n = _HEAD.unpack_from(msg)
    if len(msg) < _HEAD.size + n:
        raise ValueError("truncated handoff message")
    return msg[_HEAD.size : _HEAD.size + n].decode("utf-8", "replace"), msg[_HEAD.size + n :], depth


class Handoff:
    """This worker's end: a Unix socket its siblings hand connections to, and one connection
    to each sibling's (made on first use, made again after a sibling restarted)."""

    def __init__(self, path: str, siblings: Mapping[Endpoint, str], receive: Receive) -> None:
        self.path = path
        #: A sibling's private port (how the fleet names it) -> its Unix socket.
        self.siblings = dict(siblings)
        self.receive = receive
        self.handed = 0
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._out: dict[str, socket.socket] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            lsock.bind(self.path)
            os.chmod(self.path, 0o600)
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        self._lsock = lsock
        self._loop.add_reader(lsock.fileno(), self._on_accept)

    def serves(self, target: Endpoint) -> bool:
        """Whether ``target`` (a fleet owner's address) is a sibling worker."""
        return target in self.siblings

    # -- sending -----------------------------------------------------------------------------------
    async def send(self, target: Endpoint, sock: socket.socket, peer: str, data: bytes, depth: int) -> None:
        """Hand ``sock`` to the sibling at ``target`` and close our copy; raises HandoffError."""
        path = self.siblings[target]
        msg = encode(peer, data, depth)
        for attempt in (1, 2):  # a sibling that restarted: its old connection is dead, make a new one
            out = self._out.get(path)
            try:
                if out is None:
                    out = self._out[path] = self._connect(path)
                await self._sendmsg(out, msg, sock.fileno())
                break
            except (OSError, TimeoutError) as exc:
                self._drop(path)
                if attempt == 2 or isinstance(exc, TimeoutError):
                    raise HandoffError(f"worker at {target} cannot take the connection: {exc}") from None
        self.handed += 1
        sock.close()

    @staticmethod
    def _connect(path: str) -> socket.socket:
        out = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            out.setblocking(False)
            out.connect(path)
        except OSError:
            out.close()
            raise
        return out

    async def _sendmsg(self, out: socket.socket, msg: bytes, fd: int) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        async with asyncio.timeout(SEND_TIMEOUT):
            while True:
                try:
                    out.sendmsg([msg], anc)
                    return
                except (BlockingIOError, InterruptedError):
                    await self._writable(out)

    async def _writable(self, out: socket.socket) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(out.fileno(), ready)
        try:
            await fut
        finally:
            self._loop.remove_writer(out.fileno())

    def _drop(self, path: str) -> None:
        out = self._out.pop(path, None)
        if out is not None:
            out.close()

    # -- receiving ---------------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._lsock is not None
        assert self._loop is not None
        while True:
            try:
                conn, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff.accept_failed", extra=fields(error=str(exc)))
                return
            conn.setblocking(False)
            self._conns.add(conn)
            self._loop.add_reader(conn.fileno(), self._on_message, conn)

    def _on_message(self, conn: socket.socket) -> None:
        for _ in range(64):
            try:
                msg, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_conn(conn)
                return
            if not msg and not fds:  # the sibling closed (it is restarting)
                self._close_conn(conn)
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            if len(socks) != 1 or flags & socket.MSG_CTRUNC:
                for s in socks:
                    s.close()
                log.warning("handoff.bad_message", extra=fields(fds=len(socks)))
                continue
            try:
                peer, data, depth = decode(msg)
            except ValueError as exc:
                socks[0].close()
                log.warning("handoff.bad_message", extra=fields(error=str(exc)))
                continue
            self.received += 1
            socks[0].setblocking(False)
            self.receive(socks[0], peer, data, depth)

    def _close_conn(self, conn: socket.socket) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(conn.fileno())
        self._conns.discard(conn)
        conn.close()

    def close(self) -> None:
        if self._lsock is not None and self._loop is not None:
            self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for conn in list(self._conns):
            self._close_conn(conn)
        for path in list(self._out):
            self._drop(path)
