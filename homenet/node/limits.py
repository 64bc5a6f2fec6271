"""Per-source admission: caps on connections in handshake, and penalties for failed auth.

Sources are IPv4 addresses, or IPv6 /64 networks (one subscriber usually holds a whole /64).
After ``threshold`` failed authentications within ``window`` seconds a source is blocked for
``penalty`` seconds, doubling on each repeat up to ``max_penalty`` (like OpenSSH's
PerSourcePenalties); a blocked source's connections are closed at accept, others are not
affected. Tables are bounded; the clock is injectable.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 65536


@functools.lru_cache(maxsize=8192)
def source_of(host: str) -> str:
    """The admission unit of a peer address (``host`` or ``host:port``): the IPv4 address or
    the IPv6 /64 (cached: the same clients come back, and parsing costs more than a connection's
    whole admission)."""
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))
    return str(addr)


def client_source(peer: str) -> str:
    """The admission unit of a connection's client: its address, also for a connection a relay
    activated (``"203.0.113.9:5555 via hn://relay"``)."""
    return source_of(peer.split(" ", 1)[0])


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n <= 0:
        counts.pop(key, None)
    else:
        counts[key] = n


@dataclass(slots=True)
class _Record:
    failures: int = 0
    first_failure: float = 0.0
    blocked_until: float = 0.0
    strikes: int = 0


#: A source's handshake cap is raised by the connections it was asked for, to this many times the cap.
_RAISE_MAX = 4


class SourceLimiter:
    """Admission decisions by source; one per node."""

    def __init__(
        self,
        max_total: int = 256,
        max_per_source: int = 64,
        threshold: int = 5,
        window: float = 60.0,
        penalty: float = 30.0,
        max_penalty: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.threshold = threshold
        self.window = window
        self.penalty = penalty
        self.max_penalty = max_penalty
        self.clock = clock
        self.pending: dict[str, int] = {}
        #: Connections this node asked a source to make (a listener's dial-backs and pool):
        #: they raise that source's cap, so a burst of waiting clients is not refused.
        self.expected: dict[str, int] = {}
        #: Accepted connections waiting for a handshake slot (count against their source's cap).
        self.queued: dict[str, int] = {}
        self.total = 0
        self._records: OrderedDict[str, _Record] = OrderedDict()
        #: Failed logins, and the blocks they caused, since start (for metrics).
        self.failures_total = 0
        self.penalties_total = 0

    def admit(self, source: str) -> str | None:
        """Start a handshake for ``source``; returns why not, or None (then call :meth:`release`)."""
        why = self.refusal(source)
        if why is None and self.full:
            why = "too many connections in handshake"
        if why is None:
            self.pending[source] = self.pending.get(source, 0) + 1
            self.total += 1
        return why

    def refusal(self, source: str) -> str | None:
        """Why ``source`` itself may not start a handshake now (blocked, or at its own cap)."""
        rec = self._records.get(source)
        if rec is not None and rec.blocked_until > self.clock():
            return "source blocked after repeated failed authentication"
        held = self.pending.get(source, 0) + self.queued.get(source, 0)
        # connections we asked the source for raise its cap, up to a bound: grants a listener
        # leaves unused must not lift it for ever
        raised = min(self.expected.get(source, 0), _RAISE_MAX * self.max_per_source)
        if held >= self.max_per_source + raised:
            return "too many connections in handshake from this source"
        return None

    def queue(self, source: str) -> None:
        """A connection of ``source`` waits for a slot (see :meth:`unqueue`)."""
        self.queued[source] = self.queued.get(source, 0) + 1

    def unqueue(self, source: str) -> None:
        _decrement(self.queued, source)

    @property
    def full(self) -> bool:
        """The global cap is reached: a new handshake needs an old one dropped first."""
        return self.total >= self.max_total

    def expect(self, source: str) -> None:
        self.expected[source] = self.expected.get(source, 0) + 1

    def unexpect(self, source: str) -> None:
        _decrement(self.expected, source)

    def release(self, source: str) -> None:
        _decrement(self.pending, source)
        self.total = max(0, self.total - 1)

    def blocked(self, source: str) -> bool:
        rec = self._records.get(source)
        return rec is not None and rec.blocked_until > self.clock()

    def failed(self, source: str) -> bool:
        """Record a failed authentication; True if the source is now blocked."""
        now = self.clock()
        self.failures_total += 1
        rec = self._records.get(source)
        if rec is None:
            rec = self._records[source] = _Record()
            while len(self._records) > MAX_TRACKED:
                self._records.popitem(last=False)
        self._records.move_to_end(source)
        if now - rec.first_failure > self.window:
            rec.failures, rec.first_failure = 0, now
        rec.failures += 1
        if rec.failures >= self.threshold:
            rec.strikes += 1
            rec.blocked_until = now + min(self.max_penalty, self.penalty * 2 ** (rec.strikes - 1))
            rec.failures = 0
            self.penalties_total += 1
            return True
        return False

    def blocked_count(self) -> int:
        """Sources blocked now."""
        now = self.clock()
        return sum(1 for rec in self._records.values() if rec.blocked_until > now)


class Descriptors:
    """Headroom under the open-files limit: new data-plane work stops first, gRPC (the
    operators' and listeners' control plane) later, and accepting last, so a flood of
    connections cannot take the descriptors a status call or a listener's stream needs.

    A new socket's number is the lowest free one, so ``fd >= N`` means at least N are open:
    a cheap lower bound of the use, asked per connection with no syscall.
    """

    def __init__(self, limit: int | None = None, reserve: int | None = None) -> None:
        self.limit = limit if limit is not None else _nofile()
        #: Descriptors kept for the control plane (a sixteenth of the limit, 16 at least).
        self.reserve = reserve if reserve is not None else max(16, self.limit // 16)

    def data_full(self, fd: int) -> bool:
        """No new data-plane session (each needs a second descriptor for its target)."""
        return fd >= self.limit - 2 * self.reserve

    def grpc_full(self, fd: int) -> bool:
        return fd >= self.limit - self.reserve

    def accept_full(self, fd: int) -> bool:
        """Close at once what was accepted this close to the limit."""
        return fd >= self.limit - self.reserve // 2


def _nofile() -> int:
    """This process's open-files limit (a large number when unlimited or unknown)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft > 0 and soft != resource.RLIM_INFINITY else 1 << 20
    except (ImportError, ValueError, OSError):
        return 1 << 20
