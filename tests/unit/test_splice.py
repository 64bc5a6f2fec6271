"""Splice between local socket pairs: exact bytes, half-close, backpressure, timeouts, abort.

Every wait is on a future or event under ``asyncio.timeout``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from homenet.node import splice as splice_mod
from homenet.node.splice import CHUNK, HAVE_SPLICE, CarrierPool, Splice, Splices, is_disconnect

MiB = 1 << 20
BIG = 8 * MiB
DEADLINE = 30.0

SocketPair = Callable[[], tuple[socket.socket, socket.socket]]


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        c = socket.create_connection(lsock.getsockname()[:2])
        s, _ = lsock.accept()
    return c, s


class CountingPool(CarrierPool):
    """A CarrierPool that counts the carriers out on loan (the bound the splice must keep)."""

    def __init__(self, max_free: int, use_splice: bool) -> None:
        super().__init__(max_free=max_free, use_splice=use_splice)
        self.out = 0
        self.max_out = 0
        self.made = 0

    def get(self) -> splice_mod._Pipe | bytearray:
        if not self._free:
            self.made += 1
        self.out += 1
        self.max_out = max(self.max_out, self.out)
        return super().get()

    def put(self, carrier: splice_mod._Pipe | bytearray) -> None:
        self.out -= 1
        super().put(carrier)

    @property
    def free(self) -> int:
        return len(self._free)


MODES = [
    pytest.param(True, id="pipe", marks=pytest.mark.skipif(not HAVE_SPLICE, reason="no os.splice here")),
    pytest.param(False, id="buffer"),
]


@pytest.fixture(params=MODES)
def pool(request: pytest.FixtureRequest) -> Iterator[CountingPool]:
    p = CountingPool(max_free=4, use_splice=bool(request.param))
    yield p
    p.close()


@dataclass
class Rig:
    """client <-> a =splice= b <-> server, all non-blocking."""

    client: socket.socket
    server: socket.socket
    splice: Splice
    closes: list[BaseException | None] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []
    loop = asyncio.get_running_loop()

    def make(pool: CarrierPool, pair: SocketPair = unix_pair, idle_timeout: float | None = None) -> Rig:
        client, a = pair()
        b, server = pair()
        for s in (client, a, b, server):
            s.setblocking(False)  # what dialer.tune() does for real connections
        closes: list[BaseException | None] = []
        closed_at: list[float] = []

        def on_close(sp: Splice, exc: BaseException | None) -> None:
            closes.append(exc)
            closed_at.append(loop.time())

        sp = Splice(a, b, pool, idle_timeout=idle_timeout, on_close=on_close)
        rig = Rig(client, server, sp, closes, closed_at)
        rigs.append(rig)
        sp.start()
        return rig

    yield make
    for rig in rigs:
        rig.splice.abort("test over")
        rig.client.close()
        rig.server.close()


async def send_all(sock: socket.socket, data: bytes, sizes: list[int], shutdown: bool = True) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        await loop.sock_sendall(sock, view[pos : pos + n])
        pos += n
        i += 1
    if shutdown:
        sock.shutdown(socket.SHUT_WR)


async def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 18):
        out += chunk
    return bytes(out)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, min(1 << 18, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def eof_or_reset(sock: socket.socket) -> bool:
    """True when the peer is gone: EOF or a reset, and no stray bytes."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.sock_recv(sock, 1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def same(got: bytes, want: bytes) -> None:
    """Byte-exact comparison that reports where it broke instead of dumping megabytes."""
    if got != want:
        at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))
        raise AssertionError(f"got {len(got)} bytes, want {len(want)}; first difference at offset {at}")


def noise(n: int, seed: int) -> bytes:
    """Non-periodic bytes, so lost or reordered blocks cannot hide."""
    return random.Random(seed).randbytes(n)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


SMALL = [1, 7, 100, 1000, 1500, 4096, 333, 16384]
BIG_WRITES = [MiB, 3 * MiB]


# -- byte-exact transfer -----------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [SMALL, BIG_WRITES], ids=["small-writes", "big-writes"])
async def test_8mib_both_ways(pool: CountingPool, make_rig: Callable[..., Rig], sizes: list[int]) -> None:
    rig = make_rig(pool)
    up, down = noise(BIG, 1), noise(BIG, 2)
    async with asyncio.timeout(DEADLINE):
        _, _, got_up, got_down = await asyncio.gather(
            send_all(rig.client, up, sizes),
            send_all(rig.server, down, sizes[::-1]),
            recv_all(rig.server),
            recv_all(rig.client),
        )
        result = await rig.splice.closed
    same(got_up, up)
    same(got_down, down)
    assert result is None
    assert rig.closes == [None]
    assert (rig.splice.bytes_up, rig.splice.bytes_down) == (BIG, BIG)
    assert rig.splice.a.fileno() == -1
    assert rig.splice.b.fileno() == -1
    # one carrier per direction at most, all back in the pool at the end
    assert pool.max_out <= 2
    assert pool.out == 0
    assert pool.made <= 2


async def test_8mib_over_tcp_loopback(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool, tcp_pair)
    up, down = noise(BIG, 3), noise(BIG, 4)
    async with asyncio.timeout(DEADLINE):
        _, _, got_up, got_down = await asyncio.gather(
            send_all(rig.client, up, SMALL + BIG_WRITES),
            send_all(rig.server, down, BIG_WRITES + SMALL),
            recv_all(rig.server),
            recv_all(rig.client),
        )
        assert await rig.splice.closed is None
    same(got_up, up)
    same(got_down, down)
    assert (rig.splice.bytes_up, rig.splice.bytes_down) == (BIG, BIG)
    assert rig.closes == [None]
    assert pool.max_out <= 2


async def test_carriers_are_shared_by_splices(make_rig: Callable[..., Rig]) -> None:
    pool = CountingPool(max_free=1, use_splice=False)
    try:
        rigs = [make_rig(pool) for _ in range(3)]
        async with asyncio.timeout(DEADLINE):
            for i, rig in enumerate(rigs):
                msg = noise(1000 + i, i)
                await send_all(rig.client, msg, [len(msg)])
                await send_all(rig.server, b"", [1])
                same(await recv_all(rig.server), msg)
                assert await recv_all(rig.client) == b""
                assert await rig.splice.closed is None
        # sequential sessions reuse one buffer; the free list keeps at most max_free
        assert pool.made == 1
        assert pool.free <= 1
        assert pool.out == 0
    finally:
        pool.close()


def test_pool_caps_free_pipes() -> None:
    if not HAVE_SPLICE:
        pytest.skip("no os.splice here")
    before = fd_count()
    pool = CarrierPool(max_free=2, use_splice=True)
    pipes = [pool.get() for _ in range(5)]
    assert fd_count() == before + 10
    for p in pipes:
        pool.put(p)
    assert fd_count() == before + 4  # the extra three were closed, not hoarded
    pool.close()
    assert fd_count() == before


# -- half-close --------------------------------------------------------------------------------


async def test_half_close_each_way(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(DEADLINE):
        await loop.sock_sendall(rig.client, b"request")
        rig.client.shutdown(socket.SHUT_WR)
        assert await recv_all(rig.server) == b"request"  # the EOF arrived, after the bytes
        assert not rig.splice.closed.done()
        assert rig.splice.up.done
        assert not rig.splice.down.done
        # the other direction still works, for several exchanges
        for i in range(3):
            msg = f"response {i} ".encode() * 1000
            await loop.sock_sendall(rig.server, msg)
            assert await recv_exactly(rig.client, len(msg)) == msg
        assert not rig.splice.closed.done()
        rig.server.shutdown(socket.SHUT_WR)
        assert await recv_all(rig.client) == b""
        assert await rig.splice.closed is None
    assert rig.closes == [None]
    assert rig.splice.bytes_up == len(b"request")
    assert rig.splice.bytes_down == sum(len(f"response {i} ".encode() * 1000) for i in range(3))


async def test_half_close_from_the_target_side(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(DEADLINE):
        await loop.sock_sendall(rig.server, b"banner\n")
        rig.server.shutdown(socket.SHUT_WR)
        assert await recv_all(rig.client) == b"banner\n"
        data = noise(MiB, 5)
        await asyncio.gather(send_all(rig.client, data, SMALL), _check_recv(rig.server, data))
        assert await rig.splice.closed is None
    assert rig.closes == [None]


async def _check_recv(sock: socket.socket, want: bytes) -> None:
    same(await recv_all(sock), want)


async def test_empty_session(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool)
    rig.client.shutdown(socket.SHUT_WR)
    rig.server.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(DEADLINE):
        assert await rig.splice.closed is None
        assert await recv_all(rig.client) == b""
        assert await recv_all(rig.server) == b""
    assert (rig.splice.bytes_up, rig.splice.bytes_down) == (0, 0)
    assert rig.closes == [None]


# -- backpressure ------------------------------------------------------------------------------


async def test_backpressure(pool: CountingPool, make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    stalled = asyncio.Event()
    real_wait = splice_mod._Direction.wait_writable

    def spy(self: splice_mod._Direction) -> None:
        real_wait(self)
        stalled.set()

    monkeypatch.setattr(splice_mod._Direction, "wait_writable", spy)
    rig = make_rig(pool)
    sp = rig.splice
    data = noise(BIG, 6)
    loop = asyncio.get_running_loop()
    sender = loop.create_task(send_all(rig.client, data, [64 * 1024]))
    try:
        async with asyncio.timeout(DEADLINE):
            await stalled.wait()  # the server end reads nothing: its buffers fill up
        # the stalled direction stopped reading its source and holds one carrier
        assert sp.up.writing
        assert not sp.up.reading
        assert sp.up.carrier is not None
        assert 0 < sp.up.pending <= CHUNK
        # the idle direction holds nothing
        assert sp.down.carrier is None
        assert sp.down.reading
        assert pool.out == 1
        held = (sp.bytes_up, sp.up.pending)
        for _ in range(200):  # let the loop spin: nothing more is read while the target is full
            await asyncio.sleep(0)
        assert (sp.bytes_up, sp.up.pending) == held
        assert sp.up.writing
        assert not sp.up.reading
        assert not sender.done()  # TCP-style backpressure reached the sender
        assert sp.bytes_up + sp.up.pending < len(data)
        assert not sp.closed.done()
        # the target drains: everything arrives, in order, and the splice reads again
        async with asyncio.timeout(DEADLINE):
            got, _ = await asyncio.gather(recv_all(rig.server), sender)
            rig.server.shutdown(socket.SHUT_WR)
            assert await sp.closed is None
    finally:
        sender.cancel()
    same(got, data)
    assert sp.bytes_up == len(data)
    assert pool.max_out <= 2
    assert pool.out == 0


async def test_abort_while_stalled_frees_everything(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled = asyncio.Event()
    real_wait = splice_mod._Direction.wait_writable

    def spy(self: splice_mod._Direction) -> None:
        real_wait(self)
        stalled.set()

    monkeypatch.setattr(splice_mod._Direction, "wait_writable", spy)
    for use_splice in [True, False] if HAVE_SPLICE else [False]:
        before = fd_count()
        stalled.clear()
        pool = CountingPool(max_free=4, use_splice=use_splice)
        rig = make_rig(pool)
        loop = asyncio.get_running_loop()
        sender = loop.create_task(send_all(rig.client, noise(4 * MiB, 7), [MiB]))
        try:
            async with asyncio.timeout(DEADLINE):
                await stalled.wait()
            carrier = rig.splice.up.carrier
            assert carrier is not None
            assert rig.splice.up.pending > 0
            rig.splice.abort("shutdown")
            assert rig.splice.closed.done()
            if use_splice:
                assert carrier not in pool._free  # stale bytes: the pipe is closed, never reused
            else:
                assert carrier in pool._free  # a buffer is just overwritten next time
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)  # it fails: its peer is gone
        rig.client.close()
        rig.server.close()
        pool.close()
        assert fd_count() == before, f"descriptors leaked (use_splice={use_splice})"


# -- idle timeout, abort, errors ---------------------------------------------------------------


async def test_idle_timeout_closes_both(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool, idle_timeout=0.1)
    async with asyncio.timeout(DEADLINE):
        result = await rig.splice.closed
        assert await eof_or_reset(rig.client)
        assert await eof_or_reset(rig.server)
    assert isinstance(result, TimeoutError)
    assert "idle for 0.1s" in str(result)
    assert rig.closes == [result]
    assert rig.splice.a.fileno() == -1
    assert rig.splice.b.fileno() == -1


async def test_activity_defers_the_idle_timeout(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    loop = asyncio.get_running_loop()
    idle = 0.2
    rig = make_rig(pool, idle_timeout=idle)
    start = loop.time()
    async with asyncio.timeout(DEADLINE):
        await asyncio.sleep(0.15)  # pacing: the byte below comes late in the first idle period
        await loop.sock_sendall(rig.client, b"x")
        assert await recv_exactly(rig.server, 1) == b"x"
        touched = rig.splice.last_active
        result = await rig.splice.closed
    assert isinstance(result, TimeoutError)
    assert touched >= start + 0.15
    assert rig.closed_at[0] >= touched + idle - 0.01  # not at start + idle: the byte reset the clock
    assert rig.closes == [result]


async def test_abort_closes_both_once(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(DEADLINE):
        await loop.sock_sendall(rig.client, b"hello")
        assert await recv_exactly(rig.server, 5) == b"hello"
    rig.splice.abort("node shutting down")
    assert rig.splice.closed.done()  # at once, not on a later loop iteration
    result = rig.splice.closed.result()
    assert isinstance(result, ConnectionAbortedError)
    assert str(result) == "node shutting down"
    rig.splice.abort("again")
    rig.splice.fail(OSError(errno.EPIPE, "late"))
    assert rig.closes == [result]
    assert rig.splice.a.fileno() == -1
    assert rig.splice.b.fileno() == -1
    async with asyncio.timeout(DEADLINE):
        assert await eof_or_reset(rig.client)
        assert await eof_or_reset(rig.server)
    assert rig.splice.bytes_up == 5
    assert pool.out == 0


async def test_peer_gone_ends_with_a_disconnect_error(pool: CountingPool, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pool)
    loop = asyncio.get_running_loop()
    rig.server.close()
    async with asyncio.timeout(DEADLINE):
        assert await eof_or_reset(rig.client)  # the target's EOF is forwarded first
        assert not rig.splice.closed.done()  # half-closed: the client may still talk
        # bytes towards the vanished target: the splice cannot deliver them
        await loop.sock_sendall(rig.client, b"x" * 65536)
        result = await rig.splice.closed
    assert isinstance(result, OSError)
    assert is_disconnect(result)
    assert rig.closes == [result]


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (BrokenPipeError(errno.EPIPE, "pipe"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (OSError(errno.ENOTCONN, "not connected"), True),
        (OSError(errno.EHOSTUNREACH, "unreachable"), True),
        (OSError(errno.EBADF, "bad fd"), False),
        (OSError(errno.ENOMEM, "no memory"), False),
        (TimeoutError("idle"), False),
        (ConnectionAbortedError("aborted"), False),
        (ValueError("x"), False),
        (None, False),
    ],
)
def test_is_disconnect(exc: BaseException | None, want: bool) -> None:
    assert is_disconnect(exc) is want


# -- Splices: an owner's set -----------------------------------------------------------------------
def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    async with asyncio.timeout(5):
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            assert chunk, "closed early"
            out += chunk
    return out


async def test_splices_send_what_is_in_hand_first_then_splice() -> None:
    owner = Splices()
    client, a = _pair()
    b, target = _pair()
    ended = asyncio.Event()
    await owner.start(a, b, to_a=b"early-for-client", to_b=b"early-for-target", on_close=lambda s, e: ended.set())
    assert len(owner) == 1
    assert await _read_exactly(client, 16) == b"early-for-client"
    assert await _read_exactly(target, 16) == b"early-for-target"
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, b"up")
    assert await _read_exactly(target, 2) == b"up"
    owner.abort_all("test over")
    async with asyncio.timeout(5):
        await ended.wait()
    assert len(owner) == 0
    for s in (client, target):
        s.close()
    owner.pool.close()


async def test_splices_close_both_when_the_first_bytes_cannot_go() -> None:
    owner = Splices()
    a, gone = _pair()
    gone.close()
    b, target = _pair()
    with pytest.raises(BrokenPipeError):
        await owner.start(a, b, to_a=b"x" * 4_000_000)
    assert a.fileno() == -1
    assert b.fileno() == -1
    assert len(owner) == 0
    target.close()
    owner.pool.close()
