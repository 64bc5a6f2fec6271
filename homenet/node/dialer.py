"""Resolve a target once, check every address against the policy, dial only what passed.

The resolver and the connect step are injectable so tests can control time and failure.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from homenet.node.address import Endpoint
from homenet.node.errors import Code, HomeNetError
from homenet.node.policy import IPAddress, PolicyError, TargetPolicy

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
        return f"[{self.addr}]:{self.port}" if self.addr.version == 6 else f"{self.addr}:{self.port}"


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


def tune(sock: socket.socket) -> None:
    """Per-socket options of every spliced connection: non-blocking, no Nagle delay."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(addr: IPAddress, port: int, timeout: float) -> socket.socket:
    """Open a TCP connection to ``addr:port`` within ``timeout`` seconds."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0))
    try:
        tune(sock)
        # A plain non-blocking connect: loop.sock_connect() would resolve the literal address
        # again (uvloop sends that through its thread pool), once per session.
        err = sock.connect_ex((str(addr), port))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(err, os.strerror(err))
        if err:
            if not _connected(sock):  # on loopback it often is already: no loop round trip
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
    try:
        n = sock.send(data)
    except (BlockingIOError, InterruptedError):
        n = 0
    if n < len(data):
        await asyncio.get_running_loop().sock_sendall(sock, memoryview(data)[n:])


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
        self._verdicts: dict[Endpoint, IPAddress] = {}
        self._verdicts_for: TargetPolicy | None = None

    def _literal(self, target: Endpoint) -> IPAddress | None:
        """An IP-literal target the policy allows, from a bounded cache of verdicts (raises
        DialError when refused); None for a host name."""
        if self._verdicts_for is not self.policy:  # the policy was replaced: forget
            self._verdicts, self._verdicts_for = {}, self.policy
        addr = self._verdicts.get(target)
        if addr is not None:
            return addr
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
        self._verdicts[target] = addr
        return addr

    async def dial(self, target: Endpoint) -> Dialed:
        """Resolve ``target`` once, drop refused addresses, connect to the first that answers."""
        literal = self._literal(target)
        if literal is not None:
            return await self._connect([literal], target)
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
                allowed.append(addr)
            except PolicyError as exc:
                refusal = str(exc)
        if not allowed:
            raise DialError(Code.FORBIDDEN, refusal or f"{target} resolved to no address")
        return await self._connect(allowed, target)

    async def _connect(self, allowed: list[IPAddress], target: Endpoint) -> Dialed:
        try:
            sock, addr = await connect_first(allowed, target.port, self.timeout)
        except TimeoutError:
            raise DialError(Code.GATEWAY_TIMEOUT, f"{target} did not answer within {self.timeout:g}s") from None
        except OSError as exc:
            raise DialError(Code.BAD_GATEWAY, f"{target}: {describe_os_error(exc)}") from None
        return Dialed(sock, addr, target.port)


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
