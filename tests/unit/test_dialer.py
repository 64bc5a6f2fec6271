"""Dialer: resolve once, check every address, dial only what the policy allows.

Only 127.0.0.0/8 and ::1 are ever dialed here; refused addresses are never dialed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from homenet.node import dialer as dialer_mod
from homenet.node.address import Endpoint
from homenet.node.dialer import Dialed, Dialer, DialError, connect, system_resolve
from homenet.node.errors import Code
from homenet.node.policy import IPAddress, TargetPolicy


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def policy(*specs: str) -> TargetPolicy:
    return TargetPolicy.from_specs(specs, lan=list)


class Resolver:
    """A resolver that returns fixed addresses (or raises) and records its calls."""

    def __init__(self, *answer: str, error: BaseException | None = None) -> None:
        self.answer = [ip(a) for a in answer]
        self.error = error
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append((host, port))
        if self.error is not None:
            raise self.error
        return list(self.answer)


async def never_resolves(host: str, port: int) -> list[IPAddress]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def must_not_resolve(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"an IP literal was sent to the resolver: {host}")


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[IPAddress, int]]:
    """Every connect the dialer attempts (the real connect still runs)."""
    calls: list[tuple[IPAddress, int]] = []

    async def spy(addr: IPAddress, port: int, timeout: float) -> socket.socket:
        calls.append((addr, port))
        return await connect(addr, port, timeout)

    monkeypatch.setattr(dialer_mod, "connect", spy)
    return calls


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A port on ``host`` that refuses connections: bound but not listening, so none can take it."""
    with socket.socket() as s:
        s.bind((host, port))
        yield int(s.getsockname()[1])


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def listening(host: str, port: int = 0, backlog: int = 16) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
        yield s
    finally:
        s.close()


def pending(lsock: socket.socket) -> int:
    """How many connections wait in ``lsock``'s accept queue (accepting and closing them)."""
    n = 0
    while True:
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


@contextlib.contextmanager
def same_port_on(*hosts: str) -> Iterator[tuple[int, list[socket.socket]]]:
    """Listeners on one port number on each of ``hosts`` (all in 127.0.0.0/8)."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(listening(hosts[0]))
            port = int(first.getsockname()[1])
            socks = [first]
            try:
                socks += [stack.enter_context(listening(h, port)) for h in hosts[1:]]
            except OSError:
                continue
            yield port, socks
            return
    raise RuntimeError("no common free port")


# -- refused before any connect ---------------------------------------------------------------


async def test_ip_literal_refused_is_never_dialed(connects: list[tuple[IPAddress, int]]) -> None:
    with listening("127.0.0.1") as lsock:
        port = int(lsock.getsockname()[1])
        d = Dialer(TargetPolicy(), timeout=2, resolve=must_not_resolve)
        with pytest.raises(DialError) as info:
            await d.dial(Endpoint("127.0.0.1", port))
        assert pending(lsock) == 0
    assert info.value.code is Code.FORBIDDEN
    assert "loopback" in info.value.reason
    assert connects == []


async def test_hostname_resolving_to_refused_address(connects: list[tuple[IPAddress, int]]) -> None:
    resolver = Resolver("127.0.0.1")
    with listening("127.0.0.1") as lsock:
        port = int(lsock.getsockname()[1])
        d = Dialer(policy("0.0.0.0/0", "::/0"), timeout=2, resolve=resolver)
        with pytest.raises(DialError) as info:
            await d.dial(Endpoint("sneaky.example", port))
        assert pending(lsock) == 0
    assert info.value.code is Code.FORBIDDEN
    assert info.value.reason.startswith(f"127.0.0.1:{port} is loopback")
    assert resolver.calls == [("sneaky.example", port)]
    assert connects == []


async def test_all_resolved_addresses_refused(connects: list[tuple[IPAddress, int]]) -> None:
    resolver = Resolver("127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1")
    d = Dialer(policy("10.0.0.0/8"), timeout=2, resolve=resolver)
    with closed_port() as port, pytest.raises(DialError) as info:
        await d.dial(Endpoint("multi.example", port))
    assert info.value.code is Code.FORBIDDEN
    assert connects == []


async def test_mapped_literal_is_judged_as_ipv4(connects: list[tuple[IPAddress, int]]) -> None:
    d = Dialer(policy("::/0"), timeout=2, resolve=must_not_resolve)
    with closed_port() as port, pytest.raises(DialError) as info:
        await d.dial(Endpoint("::ffff:127.0.0.1", port))
    assert info.value.code is Code.FORBIDDEN
    assert connects == []


async def test_own_listener_is_refused(connects: list[tuple[IPAddress, int]]) -> None:
    port = 6969
    d = Dialer(policy("127.0.0.0/8").with_own(ip("0.0.0.0"), port), timeout=2, resolve=Resolver("127.0.0.1"))
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("me.example", port))
    assert info.value.code is Code.FORBIDDEN
    assert "own listener" in info.value.reason
    assert connects == []


# -- mixed answers ----------------------------------------------------------------------------


async def test_mixed_answer_dials_only_allowed_addresses(connects: list[tuple[IPAddress, int]]) -> None:
    with same_port_on("127.0.0.1", "127.0.0.2") as (port, (refused_l, allowed_l)):
        # the refused address comes first and has a listener: dialing it would succeed
        resolver = Resolver("127.0.0.1", "::1", "127.0.0.2")
        d = Dialer(policy("127.0.0.2/32"), timeout=2, resolve=resolver)
        dialed = await d.dial(Endpoint("mixed.example", port))
        try:
            assert dialed.addr == ip("127.0.0.2")
            assert dialed.port == port
            assert str(dialed) == f"127.0.0.2:{port}"
            assert dialed.sock.getpeername() == ("127.0.0.2", port)
        finally:
            dialed.sock.close()
        assert pending(refused_l) == 0
        assert pending(allowed_l) == 1
    assert connects == [(ip("127.0.0.2"), port)]
    assert resolver.calls == [("mixed.example", port)]


async def test_falls_back_to_the_next_allowed_address(connects: list[tuple[IPAddress, int]]) -> None:
    with listening("127.0.0.2") as lsock:
        port = int(lsock.getsockname()[1])
        with closed_port("127.0.0.1", port):
            d = Dialer(policy("127.0.0.0/8"), timeout=2, resolve=Resolver("127.0.0.1", "127.0.0.2"))
            dialed = await d.dial(Endpoint("two.example", port))
        dialed.sock.close()
        assert dialed.addr == ip("127.0.0.2")
        assert pending(lsock) == 1
    assert connects == [(ip("127.0.0.1"), port), (ip("127.0.0.2"), port)]


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), OSError("resolver exploded")],
)
async def test_resolver_failure_is_unresolvable(exc: OSError, connects: list[tuple[IPAddress, int]]) -> None:
    d = Dialer(policy("0.0.0.0/0"), timeout=2, resolve=Resolver(error=exc))
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("nowhere.invalid", 22))
    assert info.value.code is Code.UNRESOLVABLE
    assert info.value.reason.startswith("cannot resolve nowhere.invalid: ")
    assert connects == []


async def test_gaierror_reason_is_its_text() -> None:
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    d = Dialer(policy("0.0.0.0/0"), timeout=2, resolve=Resolver(error=exc))
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("nowhere.invalid", 22))
    assert info.value.reason == "cannot resolve nowhere.invalid: name or service not known"


async def test_resolver_timeout_is_unresolvable(connects: list[tuple[IPAddress, int]]) -> None:
    d = Dialer(policy("0.0.0.0/0"), timeout=0.05, resolve=never_resolves)
    async with asyncio.timeout(5):
        with pytest.raises(DialError) as info:
            await d.dial(Endpoint("slow.example", 22))
    assert info.value.code is Code.UNRESOLVABLE
    assert connects == []


async def test_empty_answer_is_unresolvable(connects: list[tuple[IPAddress, int]]) -> None:
    d = Dialer(policy("0.0.0.0/0"), timeout=2, resolve=Resolver())
    with pytest.raises(DialError) as info:
        await d.dial(Endpoint("empty.example", 22))
    assert info.value.code is Code.UNRESOLVABLE
    assert info.value.reason == "cannot resolve empty.example: no address"
    assert connects == []


async def test_closed_port_is_bad_gateway(connects: list[tuple[IPAddress, int]]) -> None:
    d = Dialer(policy("127.0.0.1/32"), timeout=2, resolve=must_not_resolve)
    with closed_port() as port, pytest.raises(DialError) as info:
        await d.dial(Endpoint("127.0.0.1", port))
    assert info.value.code is Code.BAD_GATEWAY
    assert info.value.reason == f"127.0.0.1:{port}: connection refused"
    assert connects == [(ip("127.0.0.1"), port)]


async def test_connect_timeout_is_gateway_timeout() -> None:
    # a listener whose accept queue is full drops SYNs: the connect hangs, locally
    with listening("127.0.0.1", backlog=0) as lsock:
        port = int(lsock.getsockname()[1])
        filler = await connect(ip("127.0.0.1"), port, 2)
        try:
            d = Dialer(policy("127.0.0.1/32"), timeout=0.2, resolve=must_not_resolve)
            async with asyncio.timeout(5):
                with pytest.raises(DialError) as info:
                    await d.dial(Endpoint("127.0.0.1", port))
        finally:
            filler.close()
    assert info.value.code is Code.GATEWAY_TIMEOUT
    assert info.value.reason == f"127.0.0.1:{port} did not answer within 0.2s"


# -- success ----------------------------------------------------------------------------------


async def test_dial_ip_literal() -> None:
    with listening("127.0.0.1") as lsock:
        port = int(lsock.getsockname()[1])
        d = Dialer(policy("127.0.0.1/32"), timeout=2, resolve=must_not_resolve)
        dialed = await d.dial(Endpoint("127.0.0.1", port))
        try:
            assert isinstance(dialed, Dialed)
            assert (dialed.addr, dialed.port) == (ip("127.0.0.1"), port)
            assert dialed.sock.getblocking() is False
            assert dialed.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert pending(lsock) == 1
        finally:
            dialed.sock.close()


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_dial_ipv6_loopback() -> None:
    with listening("::1") as lsock:
        port = int(lsock.getsockname()[1])
        d = Dialer(policy("::1/128"), timeout=2, resolve=Resolver("::1"))
        dialed = await d.dial(Endpoint("v6.example", port))
        try:
            assert str(dialed) == f"[::1]:{port}"
            assert dialed.sock.family == socket.AF_INET6
            assert pending(lsock) == 1
        finally:
            dialed.sock.close()


async def test_system_resolve_numeric_host() -> None:
    # a numeric host never leaves the process: getaddrinfo parses it
    assert await system_resolve("127.0.0.1", 22) == [ip("127.0.0.1")]


def test_dial_error_carries_code_and_reason() -> None:
    err = DialError(Code.BAD_GATEWAY, "why")
    assert (err.code, err.reason, str(err)) == (Code.BAD_GATEWAY, "why", "why")


@pytest.mark.parametrize("spelling", ["::127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::127.0.0.1"])
async def test_an_ipv4_in_ipv6_spelling_is_dialed_as_the_ipv4_it_names(
    spelling: str, connects: list[tuple[IPAddress, int]]
) -> None:
    """The address checked is the address dialed: an IPv4-compatible or NAT64 form passing an
    IPv4 rule must not reach some other IPv6 destination."""
    with listening("127.0.0.1") as lsock:
        port = int(lsock.getsockname()[1])
        for resolve in (must_not_resolve, Resolver(spelling)):
            d = Dialer(policy("127.0.0.1/32"), timeout=2, resolve=resolve)
            target = Endpoint(spelling if resolve is must_not_resolve else "spelled.example", port)
            dialed = await d.dial(target)
            dialed.sock.close()
            assert dialed.addr == ip("127.0.0.1")
        assert pending(lsock) == 2
    assert connects == [(ip("127.0.0.1"), port)] * 2
