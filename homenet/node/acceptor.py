"""The node's listening socket and its admission rules: who may start a handshake now.

At most ``max_total`` connections are in handshake at once (and ``max_per_source`` per
source: see :class:`SourceLimiter`). The acceptor never stops accepting because of the cap:
when it is full, a newcomer takes the place of a slow handshake (OpenSSH MaxStartups-style
early drop, see :meth:`Acceptor._make_room`) or waits for a free slot, oldest first, within
its handshake deadline. Only running out of descriptors pauses accepting, briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable

from homenet.node.address import Endpoint
from homenet.node.connection import Handshake
from homenet.node.dialer import keepalive, listen_socket, tune
from homenet.node.errors import Code
from homenet.node.limits import Descriptors, SourceLimiter, source_of
from homenet.node.log import fields
from homenet.node.preamble import encode_reply

log = logging.getLogger("homenet.node")

_ACCEPT_BURST = 128
#: Seconds to stop accepting after the process ran out of descriptors (or memory).
_ACCEPT_PAUSE = 0.5
#: A handshake still without its preamble after this long may be dropped for any newcomer.
_DROP_AGE = 1.0
#: Accepted connections that may wait for a handshake slot (what the listen backlog held).
_WAITING_MAX = 4096
_BACKLOG = 4096

#: Starts serving an admitted connection: (socket, peer, source, accepted at, plain) -> its
#: handshake; ``plain``: it came on a listening socket that speaks no TLS (a worker's private one).
Serve = Callable[[socket.socket, str, str, float, bool], Handshake]


def peer_str(addr: tuple[object, ...] | str) -> str:
    """``host:port`` (``[v6]:port``) of a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) or "local"


class Acceptor:
    """Accepts on its listening sockets (the port; a worker's private port too) and admits
    connections by source."""

    def __init__(
        self,
        limiter: SourceLimiter,
        handshake_timeout: float,
        serve: Serve,
        on_refused: Callable[[Code], None],
        explain_drops: bool = True,
        descriptors: Descriptors | None = None,
    ) -> None:
        self.limiter = limiter
        self.descriptors = descriptors or Descriptors()
        self.handshake_timeout = handshake_timeout
        self.serve = serve
        self.on_refused = on_refused
        #: Send a dropped handshake its 429 line (not over TLS: it would be garbage there).
        self.explain_drops = explain_drops
        self.dropped = 0
        #: Listening sockets -> whether they speak plaintext even when the node speaks TLS.
        self._lsocks: dict[socket.socket, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False
        #: Admitted handshakes still reading their preamble, by source, oldest first: the
        #: ones that may be dropped when the cap is full.
        self._droppable: dict[str, dict[Handshake, None]] = {}
        #: Accepted connections waiting for a slot: (socket, peer, source, accepted at, plain).
        self._waiting: deque[tuple[socket.socket, str, str, float, bool]] = deque()

    async def listen(self, bind: str, port: int) -> Endpoint:
        """Bind and start accepting; returns where."""
        return self.adopt(await listen_socket(bind, port, _BACKLOG))

    def adopt(self, lsock: socket.socket, plain: bool = False) -> Endpoint:
        """Accept on a listening socket made elsewhere (a worker's, from its supervisor);
        ``plain``: its connections speak no TLS. Returns where it listens."""
        self._loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        if lsock.family in (socket.AF_INET, socket.AF_INET6):
            keepalive(lsock)  # inherited by every accepted connection
        self._lsocks[lsock] = plain
        if not self._paused:
            self._loop.add_reader(lsock.fileno(), self._on_accept, lsock)
        host, bound = lsock.getsockname()[:2]
        return Endpoint(str(host), int(bound))

    def close(self) -> None:
        """Stop accepting; connections still waiting for a slot are told to go elsewhere."""
        for lsock in list(self._lsocks):
            if not self._paused and self._loop is not None:
                self._loop.remove_reader(lsock.fileno())
            lsock.close()
        self._lsocks.clear()
        while self._waiting:
            sock, _, source, _, _ = self._waiting.popleft()
            self.limiter.unqueue(source)
            self._refuse(sock, Code.UNAVAILABLE, "node is shutting down; retry on another node")

    # -- the handshakes' side ------------------------------------------------------------------
    def track(self, hs: Handshake) -> None:
        """``hs`` holds a slot and reads its preamble: it may be dropped to make room."""
        if hs.source is not None:
            self._droppable.setdefault(hs.source, {})[hs] = None

    def settle(self, hs: Handshake) -> None:
        """``hs`` is past its preamble (or gone): it may no longer be dropped."""
        if hs.source is None:
            return
        bucket = self._droppable.get(hs.source)
        if bucket is not None:
            bucket.pop(hs, None)
            if not bucket:
                del self._droppable[hs.source]

    def release(self, hs: Handshake) -> None:
        """``hs`` gives its slot back: its handshake ended, or it proved to be a listener's own
        connection (a good ticket: a burst of dial-backs is not an attack)."""
        if hs.source is not None:
            self.settle(hs)
            self.limiter.release(hs.source)
            hs.source = None
            self._slot_freed()

    # -- accept ----------------------------------------------------------------------------------
    def _on_accept(self, lsock: socket.socket) -> None:
        plain = self._lsocks.get(lsock)
        if plain is None:  # closed since the loop saw it readable
            return
        for _ in range(_ACCEPT_BURST):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause instead of spinning on a readable socket
                log.warning("node.accept_paused", extra=fields(error=str(exc), seconds=_ACCEPT_PAUSE))
                self._pause(_ACCEPT_PAUSE)
                return
            if self.descriptors.accept_full(sock.fileno()):
                self._refuse(sock, Code.TOO_MANY, "node near its descriptor limit; retry later")
                continue
            self._admit(sock, peer_str(addr), source_of(str(addr[0])), plain)

    def _admit(self, sock: socket.socket, peer: str, source: str, plain: bool = False) -> None:
        assert self._loop is not None
        why = self.limiter.refusal(source)
        if why is None and self.limiter.full and not self._make_room(source):
            if len(self._waiting) < _WAITING_MAX:
                tune(sock)
                self.limiter.queue(source)
                self._waiting.append((sock, peer, source, self._loop.time(), plain))
                return
            why = "too many connections in handshake"
        if why is None:
            why = self.limiter.admit(source)
        if why is not None:
            self._refuse(sock, Code.TOO_MANY, why)
            return
        tune(sock)
        self.track(self.serve(sock, peer, source, self._loop.time(), plain))

    def _refuse(self, sock: socket.socket, code: Code, why: str) -> None:
        self.on_refused(code)
        with contextlib.suppress(OSError):
            sock.send(encode_reply(code, why))
        sock.close()

    def _slot_freed(self) -> None:
        """A slot is free: give it to the longest-waiting connection still in time."""
        if self._loop is None:
            return
        while self._waiting and not self.limiter.full:
            sock, peer, source, since, plain = self._waiting.popleft()
            self.limiter.unqueue(source)
            if self._loop.time() - since >= self.handshake_timeout:
                self._refuse(sock, Code.TIMEOUT, "waited too long for a handshake slot")
                continue
            why = self.limiter.admit(source)
            if why is not None:
                self._refuse(sock, Code.TOO_MANY, why)
                continue
            self.track(self.serve(sock, peer, source, since, plain))

    def _make_room(self, newcomer: str) -> bool:
        """The cap is full: drop one handshake still in its preamble, so a client is not
        stalled behind slow sockets.

        The victim is the oldest handshake of the source that holds the most of them, if
        that source holds at least two more than the newcomer's (a flood from many sources
        pays for itself; a client with one connection gets in at once). Otherwise, among
        handshakes older than ``_DROP_AGE`` (a burst of real clients sends its preambles
        within that), the oldest of the busiest source. False when there is no such victim:
        the newcomer then waits for a slot.
        """
        assert self._loop is not None
        if not self._droppable:
            return False
        src = max(self._droppable, key=lambda s: len(self._droppable[s]))
        if len(self._droppable[src]) <= len(self._droppable.get(newcomer, ())) + 1:
            old_enough = self._loop.time() - _DROP_AGE
            stale = [s for s, b in self._droppable.items() if next(iter(b)).since <= old_enough]
            if not stale:
                return False
            src = max(stale, key=lambda s: len(self._droppable[s]))
        victim = next(iter(self._droppable[src]))
        self.settle(victim)
        assert victim.source is not None
        self.limiter.release(victim.source)
        victim.source = None
        self.dropped += 1
        self.on_refused(Code.TOO_MANY)
        if self.explain_drops:  # best effort, never waits
            with contextlib.suppress(OSError):
                victim.sock.send(encode_reply(Code.TOO_MANY, "dropped to make room: node at its handshake cap"))
        if victim.task is not None:
            victim.task.cancel()  # its end closes the socket
        return True

    def _pause(self, seconds: float) -> None:
        """Stop watching the listening sockets for ``seconds`` (out of descriptors)."""
        if not self._lsocks or self._loop is None or self._paused:
            return
        self._paused = True
        for lsock in self._lsocks:
            self._loop.remove_reader(lsock.fileno())
        self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        if self._paused and self._loop is not None:
            self._paused = False
            for lsock in self._lsocks:
                self._loop.add_reader(lsock.fileno(), self._on_accept, lsock)
