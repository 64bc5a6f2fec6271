"""The session table: every spliced data-plane session of a node, and the counters.

It is the one owner of session counts and byte totals (what operators see, what metrics will
export: the ``on_close`` hook), and the one place a session's splice is started and ended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from homenet.node.dialer import send_now, send_rest
from homenet.node.errors import Code
from homenet.node.limits import client_source
from homenet.node.log import fields
from homenet.node.preamble import encode_reply
from homenet.node.splice import CarrierPool, Splice, is_disconnect

log = logging.getLogger("homenet.node")

_OK = encode_reply(Code.OK)


@dataclass(slots=True)
class Target:
    """A connected target for a session, its name for operators, and a hook run at its end."""

    sock: socket.socket
    dialed: str
    on_close: Callable[[SessionInfo], None] | None = None
    #: Bytes for the target before the client's (a listener's activation line): one send.
    greeting: bytes = b""
    #: Bytes the target already sent, for the client after its OK (a forwarded hop's early bytes).
    to_client: bytes = b""

    def ended(self, info: SessionInfo) -> None:
        """The session on this target is over: its owner's hook runs, once (a listener's session
        count goes back down, with the bytes)."""
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook(info)

    def abandon(self, info: SessionInfo) -> None:
        """Close the target, unspliced (the client went, a later hop refused): :meth:`ended`."""
        self.sock.close()
        self.ended(info)


@dataclass(slots=True)
class SessionInfo:
    """A spliced data-plane session, as the operator sees it."""

    id: int
    client: str
    target: str
    dialed: str
    since: float
    splice: Splice | None = field(default=None, repr=False)
    #: The client's admission unit (counted against its per-source cap while the session lives).
    source: str = ""
    #: Bytes counted by an owner that moves them itself (the HTTP gateway), when no splice does.
    moved_up: int = 0
    moved_down: int = 0

    @property
    def bytes_up(self) -> int:
        return self.splice.bytes_up if self.splice else self.moved_up

    @property
    def bytes_down(self) -> int:
        return self.splice.bytes_down if self.splice else self.moved_down


@dataclass(slots=True)
class Counters:
    """Totals of sessions that already ended, plus refusals."""

    sessions: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


#: Told of every session that ended, with the error that ended it (None: a clean finish).
SessionHook = Callable[[SessionInfo, BaseException | None], None]


class SessionTable:
    """Live sessions by id, and the counters of the ended ones."""

    def __init__(
        self, pool: CarrierPool, idle_timeout: float | None = None, on_close: SessionHook | None = None
    ) -> None:
        self.pool = pool
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.live: dict[int, SessionInfo] = {}
        #: Live sessions by source (an IPv4 address, an IPv6 /64): one source's cap.
        self.by_source: dict[str, int] = {}
        self.counters = Counters()
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self.live)

    @property
    def totals(self) -> Counters:
        """Counters including the sessions still open."""
        live = list(self.live.values())
        c = self.counters
        return Counters(
            sessions=c.sessions + len(live),
            refused=c.refused,
            bytes_up=c.bytes_up + sum(s.bytes_up for s in live),
            bytes_down=c.bytes_down + sum(s.bytes_down for s in live),
        )

    def refused(self) -> None:
        self.counters.refused += 1

    def count_for(self, source: str) -> int:
        """Sessions ``source`` holds now."""
        return self.by_source.get(source, 0)

    async def splice(
        self,
        client: socket.socket,
        peer: str,
        early: bytes,
        target: Target,
        name: str,
        counted: int | None = None,
        source: str | None = None,
    ) -> None:
        """Reply OK, hand ``early`` (the client's pipelined bytes) over, splice client <-> target;
        ``counted``: how many of those bytes the client sent (the node may have stamped a line)."""
        # the source as admitted (host only: cached); a peer string with its port never repeats
        info = SessionInfo(
            next(self._ids), peer, name, target.dialed, time.time(), source=source or client_source(peer)
        )
        try:
            # plain sends first: a reply line and a first payload nearly always fit at once
            reply = _OK + target.to_client if target.to_client else _OK
            sent = send_now(client, reply)
            if sent < len(reply):
                await send_rest(client, reply, sent)
            if target.greeting or early:
                first = target.greeting + early
                sent = send_now(target.sock, first)
                if sent < len(first):
                    await send_rest(target.sock, first, sent)
        except BaseException:
            target.abandon(info)
            raise

        def closed(_: Splice, exc: BaseException | None) -> None:
            self._closed(info, exc)
            target.ended(info)

        if self._loop is None:  # asked once: get_running_loop() costs a getpid() syscall
            self._loop = asyncio.get_running_loop()
        sp = Splice(client, target.sock, self.pool, idle_timeout=self.idle_timeout, on_close=closed, loop=self._loop)
        sp.up.bytes = len(early) if counted is None else counted  # pipelined payload already delivered above
        info.splice = sp
        if not self.live:
            self._idle.clear()
        self.live[info.id] = info
        self.by_source[info.source] = self.by_source.get(info.source, 0) + 1
        sp.start()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session.open", extra=fields(id=info.id, client=peer, target=name, dialed=target.dialed))

    def _closed(self, info: SessionInfo, exc: BaseException | None) -> None:
        if self.live.pop(info.id, None) is not None:
            n = self.by_source.get(info.source, 0) - 1
            if n > 0:
                self.by_source[info.source] = n
            else:
                self.by_source.pop(info.source, None)
        c = self.counters
        c.sessions += 1
        c.bytes_up += info.bytes_up
        c.bytes_down += info.bytes_down
        if not self.live:
            self._idle.set()
        if self.on_close is not None:
            self.on_close(info, exc)
        level = logging.DEBUG if exc is None or is_disconnect(exc) else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "session.close",
                extra=fields(
                    id=info.id, target=info.target, up=info.bytes_up, down=info.bytes_down,
                    seconds=round(time.time() - info.since, 3), error=str(exc) if exc else None,
                ),
            )  # fmt: skip

    async def wait_idle(self) -> None:
        """Until no session is open."""
        await self._idle.wait()

    def abort_all(self, reason: str) -> None:
        """Close every session now."""
        for info in list(self.live.values()):
            if info.splice is not None:
                info.splice.abort(reason)
