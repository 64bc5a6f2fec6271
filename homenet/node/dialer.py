"""Resolve a target once, check every address against the policy, dial only what passed.

The resolver and the connect step are injectable so tests can control time and failure.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from homenet.node.address import Endpoint
from homenet.node.errors import Code, HomeNetError
from homenet.node.policy import IPAddress, PolicyError, TargetPolicy, normalise

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class DialError(HomeNetError):
    """A hop could not be reached; ``code`` is the reply code for the client."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason, code)


@dataclass(frozen=True, slots=True)
class Dialed:
    """A connected, non-blocking socket and the address it reached."""

    sock: socket.socket
    addr: IPAddress
    port: int

    def __str__(self) -> str:
        host = host_of(self.addr)
        return f"[{host}]:{self.port}" if self.addr.version == 6 else f"{host}:{self.port}"


#: ``str(addr)`` by family and by the address as an int (hashing an address object costs
#: about as much as formatting it; an int costs nothing).
_HOSTS: tuple[dict[int, str], dict[int, str]] = ({}, {})


def host_of(addr: IPAddress) -> str:
    """``str(addr)``, from a bounded cache: targets repeat, and formatting an address costs
    more than a connection's whole dial decision."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:  # the zone is not in the int
            return str(addr)
        hosts = _HOSTS[1]
    else:
        hosts = _HOSTS[0]
    key = int(addr)
    host = hosts.get(key)
    if host is None:
        if len(hosts) >= 4096:
            hosts.clear()
        host = hosts[key] = str(addr)
    return host


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """Resolve with the system resolver (getaddrinfo in the loop's executor)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if addr not in out:
            out.append(addr)
    return out


async def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (dual-stack when bound to ``::``)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    lsock = socket.socket(family, socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.bind(sockaddr)
        lsock.listen(backlog)
        lsock.setblocking(False)
    except OSError:
        lsock.close()
        raise
    return lsock


#: Seconds a literal target's verdict is reused (the host's own addresses may change).
_VERDICT_TTL = 5.0
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


#: TCP keepalive of every connection the node holds: a peer gone without a FIN (a NAT that
#: forgot the flow, a host powered off) is found after about 2 minutes of silence.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4


def keepalive(sock: socket.socket) -> None:
    """Turn TCP keepalive on (on a listening socket, its accepted sockets inherit it: no
    syscall per connection)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def tune(sock: socket.socket) -> None:
    """Per-socket options of every spliced connection: non-blocking, no Nagle delay."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(addr: IPAddress, port: int, timeout: float) -> socket.socket:
    """Open a TCP connection to ``addr:port`` within ``timeout`` seconds."""
    sock = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, _STREAM_NONBLOCK)
    try:
        if _STREAM_NONBLOCK == socket.SOCK_STREAM:  # no SOCK_NONBLOCK here: the socket blocks
            sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # what tune() does
        # keepalive on, with the system's timing: one syscall per dial (the client's side, on
        # the listening socket, has the short timing for free); an idle session's timeout
        # covers a target that vanished
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # A plain non-blocking connect: loop.sock_connect() would resolve the literal address
        # again (uvloop sends that through its thread pool), once per session.
        err = sock.connect_ex((host_of(addr), port))
        if err:
            if err not in (errno.EINPROGRESS, errno.EAGAIN):
                raise OSError(err, os.strerror(err))
            # on loopback it often is connected already: no loop round trip, and no SO_ERROR to
            # read (a connected socket has none)
            if not _connected(sock):
                async with asyncio.timeout(timeout):
                    await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def wait_writable(sock: socket.socket) -> None:
    """Until ``sock`` is writable (a connect finished); callers bound it with a timeout."""
    await _wait(sock, writable=True)


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` is readable; callers bound it with a timeout."""
    await _wait(sock, writable=False)


async def _wait(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """``loop.sock_sendall`` that first tries a plain send (a short reply always fits)."""
    n = send_now(sock, data)
    if n < len(data):
        await send_rest(sock, data, n)


def send_now(sock: socket.socket, data: bytes) -> int:
    """What one plain send of ``data`` took (0 when the socket is full); with
    :func:`send_rest` for the rest, :func:`send_all` without a coroutine in the common case."""
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


async def send_rest(sock: socket.socket, data: bytes, sent: int) -> None:
    """Send ``data`` from ``sent`` on, waiting for room as needed."""
    await asyncio.get_running_loop().sock_sendall(sock, memoryview(data)[sent:])


async def recv_some(sock: socket.socket, n: int) -> bytes:
    """``loop.sock_recv`` that first tries a plain recv (the bytes usually came with the
    connection): no reader registration and no loop iteration in the common case."""
    try:
        return sock.recv(n)
    except (BlockingIOError, InterruptedError):
        return await asyncio.get_running_loop().sock_recv(sock, n)


@dataclass
class Dialer:
    """Dials direct targets under a :class:`TargetPolicy`."""

    policy: TargetPolicy
    timeout: float = 10.0
    resolve: Resolver = system_resolve

    def __post_init__(self) -> None:
        #: target -> (the address to dial, until when the verdict holds)
        self._verdicts: dict[Endpoint, tuple[IPAddress, float]] = {}
        self._verdicts_for: TargetPolicy | None = None

    def _literal(self, target: Endpoint) -> IPAddress | None:
        """An IP-literal target the policy allows, from a bounded cache of verdicts (raises
        DialError when refused); None for a host name."""
        if self._verdicts_for is not self.policy:  # the policy was replaced: forget
            self._verdicts, self._verdicts_for = {}, self.policy
        now = time.monotonic()
        known = self._verdicts.get(target)
        if known is not None and known[1] > now:
            return known[0]
        try:
            addr = ipaddress.ip_address(target.host)
        except ValueError:
            return None
        try:
            self.policy.check(addr, target.port)
        except PolicyError as exc:
            raise DialError(Code.FORBIDDEN, str(exc)) from None
        if len(self._verdicts) >= 4096:
            self._verdicts.clear()
        addr = normalise(addr)  # the address checked is the one dialed (not a NAT64 or compat form)
        self._verdicts[target] = (addr, now + _VERDICT_TTL)  # the host's own addresses may change
        return addr

    async def dial(self, target: Endpoint) -> Dialed:
        """Resolve ``target`` once, drop refused addresses, connect to the first that answers."""
        literal = self._literal(target)
        if literal is not None:  # the common case, one coroutine less than the general path
            try:
                return Dialed(await connect(literal, target.port, self.timeout), literal, target.port)
            except (OSError, TimeoutError) as exc:
                raise self._failed(target, exc) from None
        if not self.policy.allow:  # nothing could pass: refuse without asking DNS
            raise DialError(Code.FORBIDDEN, f"{target} is not allowed here (the node allows no targets)")
        try:
            async with asyncio.timeout(self.timeout):
                addrs = await self.resolve(target.host, target.port)
        except (OSError, TimeoutError) as exc:
            raise DialError(Code.UNRESOLVABLE, f"cannot resolve {target.host}: {describe_os_error(exc)}") from None
        if not addrs:
            raise DialError(Code.UNRESOLVABLE, f"cannot resolve {target.host}: no address")
        allowed: list[IPAddress] = []
        refusal = ""
        for addr in addrs:
            try:
                self.policy.check(addr, target.port)
                allowed.append(normalise(addr))  # dial what was checked
            except PolicyError as exc:
                refusal = str(exc)
        if not allowed:
            raise DialError(Code.FORBIDDEN, refusal or f"{target} resolved to no address")
        return await self._connect(allowed, target)

    async def _connect(self, allowed: list[IPAddress], target: Endpoint) -> Dialed:
        try:
            sock, addr = await connect_first(allowed, target.port, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise self._failed(target, exc) from None
        return Dialed(sock, addr, target.port)

    def _failed(self, target: Endpoint, exc: OSError | TimeoutError) -> DialError:
        if isinstance(exc, TimeoutError):
            return DialError(Code.GATEWAY_TIMEOUT, f"{target} did not answer within {self.timeout:g}s")
        return DialError(Code.BAD_GATEWAY, f"{target}: {describe_os_error(exc)}")


async def connect_first(addrs: Sequence[IPAddress], port: int, timeout: float) -> tuple[socket.socket, IPAddress]:
    """Connect to the first of ``addrs`` that answers (each within ``timeout``); raises the
    last failure (TimeoutError or OSError)."""
    last: BaseException = OSError("no address to connect to")
    for addr in addrs:
        try:
            return await connect(addr, port, timeout), addr
        except (OSError, TimeoutError) as exc:
            last = exc
    raise last


def describe_os_error(exc: BaseException | None) -> str:
    """A short lower-case reason for a failed connect ("connection refused")."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
