"""Splice two connected sockets both ways, on the event loop, without copying where possible.

Each direction waits for its source to be readable, moves what is there into a *carrier*
and from the carrier into the destination:

* on Linux the carrier is a pipe and both moves are ``os.splice`` (the bytes never enter
  Python: zero-copy, no per-chunk allocation);
* elsewhere it is a fixed ``bytearray`` filled with ``recv_into`` and sent from a memoryview.

A carrier is held only while bytes are in flight and goes back to a bounded pool after, so an
idle connection holds no pipe and no buffer. When the destination is full the direction stops
reading its source (backpressure reaches the sender through TCP) and waits for the
destination to become writable. EOF from one side is forwarded as a write shutdown to the
other (half-close); the splice ends when both directions have finished, on an error (both
sockets are closed at once), on idle timeout, or on :meth:`Splice.abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")

#: Bytes one direction moves per carrier fill; also the pipe size asked of the kernel.
CHUNK = 1 << 20 if HAVE_SPLICE else 1 << 18
#: Fills per readable event before yielding to other connections (fairness).
_BURST = 8
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0


class _Pipe:
    """A kernel pipe used as a splice carrier."""

    __slots__ = ("r", "size", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, _F_SETPIPE_SZ, CHUNK)
        except OSError:  # over the per-user pipe budget: the default size still works
            self.size = 65536

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class CarrierPool:
    """Free pipes (or buffers) shared by all splices of a loop; keeps at most ``max_free``."""

    def __init__(self, max_free: int = 64, use_splice: bool = HAVE_SPLICE) -> None:
        self.use_splice = use_splice
        self._free: list[_Pipe | bytearray] = []
        self._max_free = max_free

    def get(self) -> _Pipe | bytearray:
        if self._free:
            return self._free.pop()
        return _Pipe() if self.use_splice else bytearray(CHUNK)

    def put(self, carrier: _Pipe | bytearray) -> None:
        if len(self._free) < self._max_free:
            self._free.append(carrier)
        elif isinstance(carrier, _Pipe):
            carrier.close()

    def close(self) -> None:
        for c in self._free:
            if isinstance(c, _Pipe):
                c.close()
        self._free.clear()


_LINGER_RESET = struct.pack("ii", 1, 0)
_ABORT_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH}


class _Direction:
    """Moves bytes from ``src`` to ``dst`` until EOF or error."""

    __slots__ = (
        "bytes",
        "carrier",
        "dfd",
        "done",
        "dst",
        "eof",
        "loop",
        "offset",
        "pending",
        "reading",
        "sfd",
        "splice",
        "src",
        "writing",
    )  # fmt: skip

    def __init__(self, sp: Splice, src: socket.socket, dst: socket.socket) -> None:
        self.splice = sp
        self.loop = sp.loop
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.carrier: _Pipe | bytearray | None = None
        self.pending = 0  # bytes in the carrier not yet written to dst
        self.offset = 0  # buffer mode: where the pending bytes start
        self.bytes = 0
        self.done = False
        self.eof = False
        self.reading = False
        self.writing = False

    # -- event wiring -------------------------------------------------------------------
    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.sfd, self.on_readable)

    def stop_io(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sfd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dfd)
        if self.carrier is not None:
            carrier, self.carrier = self.carrier, None
            if self.pending and isinstance(carrier, _Pipe):
                carrier.close()  # holds stale bytes: never reuse it
            else:
                self.splice.pool.put(carrier)
            self.pending = 0

    # -- moving bytes ---------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            for _ in range(_BURST):
                n = self.fill()
                if not n:
                    break
                if not self.flush():
                    self.wait_writable()
                    return
                if n < self.capacity:  # drained the socket: don't pay a syscall to hear EAGAIN
                    break
            self.release()
        except OSError as exc:
            self.splice.fail(exc)

    def on_writable(self) -> None:
        try:
            if not self.flush():
                return
            self.writing = False
            self.loop.remove_writer(self.dfd)
            self.release()
            self.reading = True
            self.loop.add_reader(self.sfd, self.on_readable)
        except OSError as exc:
            self.splice.fail(exc)

    @property
    def capacity(self) -> int:
        c = self.carrier
        return c.size if isinstance(c, _Pipe) else CHUNK

    def fill(self) -> int:
        """Move what the source has into the carrier; the byte count (0: nothing more now)."""
        if self.carrier is None:
            self.carrier = self.splice.pool.get()
        c = self.carrier
        try:
            if isinstance(c, _Pipe):
                n = os.splice(self.sfd, c.w, c.size, flags=_SPLICE_FLAGS)
            else:
                n = self.src.recv_into(c)
                self.offset = 0
        except (BlockingIOError, InterruptedError):
            return 0
        if n == 0:
            self.eof = True
            self.reading = False
            self.loop.remove_reader(self.sfd)
            self.finish()
            return 0
        self.pending = n
        self.splice.last_active = self.loop.time()
        return n

    def flush(self) -> bool:
        """Write the carrier's bytes to the destination; False if it would block first."""
        c = self.carrier
        while self.pending:
            try:
                if isinstance(c, _Pipe):
                    m = os.splice(c.r, self.dfd, self.pending, flags=_SPLICE_FLAGS)
                else:
                    assert c is not None
                    m = self.dst.send(memoryview(c)[self.offset : self.offset + self.pending])
                    self.offset += m
            except (BlockingIOError, InterruptedError):
                return False
            self.pending -= m
            self.bytes += m
            self.splice.last_active = self.loop.time()  # a slow reader draining is not idle
        return True

    def wait_writable(self) -> None:
        self.reading = False
        self.loop.remove_reader(self.sfd)
        self.writing = True
        self.loop.add_writer(self.dfd, self.on_writable)

    def release(self) -> None:
        if self.carrier is not None and not self.pending:
            self.splice.pool.put(self.carrier)
            self.carrier = None

    def finish(self) -> None:
        """Source hit EOF and everything was delivered: half-close the destination."""
        if self.pending or self.done:
            return
        self.done = True
        self.release()
        sp = self.splice
        if not (sp.up.done and sp.down.done):  # else both sockets close next, and close() sends the FIN
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        sp.direction_done()


class Splice:
    """Both directions between ``a`` (the client side) and ``b`` (the target side).

    ``bytes_up`` counts a->b, ``bytes_down`` b->a. ``on_close`` runs once, after both sockets
    are closed, with the error that ended the splice (``None`` for a clean finish).
    """

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        pool: CarrierPool,
        *,
        idle_timeout: float | None = None,
        on_close: Callable[[Splice, BaseException | None], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.pool = pool
        # both sockets must be non-blocking already (tune() does it): a blocking one would
        # stall the whole loop, and setting it here again costs two syscalls per session
        assert a.gettimeout() == 0.0, "splice needs non-blocking sockets"
        assert b.gettimeout() == 0.0, "splice needs non-blocking sockets"
        self.a, self.b = a, b
        self.up = _Direction(self, a, b)
        self.down = _Direction(self, b, a)
        self.idle_timeout = idle_timeout
        self.last_active = self.loop.time()
        self.closed = self.loop.create_future()
        self._on_close = on_close
        self._timer: asyncio.TimerHandle | None = None

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    def start(self) -> None:
        """Begin moving bytes; returns at once (await :attr:`closed` to wait for the end)."""
        self.up.start()
        self.down.start()
        if self.idle_timeout:
            self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)

    def touch(self) -> None:
        self.last_active = self.loop.time()

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        left = self.last_active + self.idle_timeout - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_idle)
        else:
            self._close(TimeoutError(f"idle for {self.idle_timeout:g}s"))

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._close(None)

    def fail(self, exc: OSError) -> None:
        self._close(exc)

    def abort(self, reason: str = "aborted") -> None:
        """Close both sides now (used on shutdown after the drain grace period)."""
        self._close(ConnectionAbortedError(reason))

    def _close(self, exc: BaseException | None) -> None:
        if self.closed.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self.up.stop_io()
        self.down.stop_io()
        if exc is not None:
            for s in (self.a, self.b):  # an error on one side: reset, don't linger
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.a.close()
        self.b.close()
        self.closed.set_result(exc)
        if self._on_close is not None:
            self._on_close(self, exc)


def is_disconnect(exc: BaseException | None) -> bool:
    """True for the ordinary ways a peer goes away (not worth a warning in the log)."""
    return isinstance(exc, OSError) and exc.errno in _ABORT_ERRNOS


class Splices:
    """The splices one owner starts, sharing a carrier pool; all can be aborted at once."""

    def __init__(self, pool: CarrierPool | None = None, idle_timeout: float | None = None) -> None:
        self.pool = pool or CarrierPool()
        self.idle_timeout = idle_timeout
        self._live: set[Splice] = set()

    def __len__(self) -> int:
        return len(self._live)

    async def start(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        to_a: bytes = b"",
        to_b: bytes = b"",
        on_close: Callable[[Splice, BaseException | None], None] | None = None,
    ) -> Splice:
        """Send the bytes already in hand (``to_a``, ``to_b``), then splice ``a`` <-> ``b``.
        If sending fails both sockets are closed and the error raised."""
        loop = asyncio.get_running_loop()
        try:
            if to_a:
                await loop.sock_sendall(a, to_a)
            if to_b:
                await loop.sock_sendall(b, to_b)
        except BaseException:
            a.close()
            b.close()
            raise

        def closed(sp: Splice, exc: BaseException | None) -> None:
            self._live.discard(sp)
            if on_close is not None:
                on_close(sp, exc)

        sp = Splice(a, b, self.pool, idle_timeout=self.idle_timeout, on_close=closed)
        self._live.add(sp)
        sp.start()
        return sp

    def abort_all(self, reason: str) -> None:
        for sp in list(self._live):
            sp.abort(reason)
