"""Prometheus metrics of one node, read from the node's own counters when scraped.

The core keeps plain counters where the events happen (:mod:`homenet.node.stats`); this
collector turns them into metric families at scrape time, so counting costs the data plane no
lock and no library call, and every figure has one source (the same one ``hnctl status``
reads). Names follow the Prometheus conventions: a ``homenet_`` prefix, ``_total`` counters,
``_seconds`` histograms, base units. No label carries a listenId or a client address
(cardinality): per-listener detail stays in ``hnctl``. Fleet peers and Remote Listen relays
are labelled by their configured address: a handful per node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from homenet import __version__
from homenet.node.discovery import Discovery
from homenet.node.fleet import FleetDirectory
from homenet.node.limits import SourceLimiter
from homenet.node.relay import Relay
from homenet.node.server import Node
from homenet.node.stats import Histogram

#: The text format's content type (what Prometheus asks for).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class RLView:
    """What the exporter reads of one Remote Listen stream."""

    relay: str
    connected: Callable[[], bool]
    reconnects: Callable[[], int]


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [(("+Inf" if bound == float("inf") else repr(bound)), n) for bound, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class NodeCollector(Collector):
    """Every ``homenet_*`` family of one node process."""

    def __init__(
        self,
        name: str,
        node: Node,
        relay: Relay,
        limiter: SourceLimiter,
        discovery: Discovery | None = None,
        fleet: FleetDirectory | None = None,
        rl: Iterable[RLView] = (),
    ) -> None:
        self.name = name
        self.node = node
        self.relay = relay
        self.limiter = limiter
        self.discovery = discovery
        self.fleet = fleet
        self.rl = list(rl)

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("homenet_build", "HomeNet version and node name")
        info.add_metric([], {"version": __version__, "name": self.name})
        yield info
        yield from self._sessions()
        yield from self._relay()
        yield from self._auth()
        if self.discovery is not None:
            yield GaugeMetricFamily(
                "homenet_mdns_services", "LAN services discovered over mDNS", value=len(self.discovery.query())
            )
        yield from self._rl()
        if self.fleet is not None:
            yield from self._fleet(self.fleet)

    def _sessions(self) -> Iterator[Metric]:
        node = self.node
        opened = GaugeMetricFamily("homenet_sessions_open", "Sessions open now, by plane", labels=["plane"])
        opened.add_metric(["data"], len(node.sessions))
        opened.add_metric(["grpc"], node.grpc.open_count)
        opened.add_metric(["http"], node.http.open_count)
        yield opened
        answered = CounterMetricFamily(
            "homenet_http_responses", "HTTP gateway responses, by status (the target's, or the gateway's own refusal)",
            labels=["code"],
        )  # fmt: skip
        for code, n in sorted(node.http.responses.items()):
            answered.add_metric([code], n)
        yield answered
        total = CounterMetricFamily(
            "homenet_sessions",
            "Connections that ended their handshake, by plane and outcome (a reply code; tls, io, closed)",
            labels=["plane", "code"],
        )
        refusals: dict[str, int] = {}
        for (plane, code), n in sorted(node.outcomes.items()):
            total.add_metric([plane, code], n)
            if code != "200":
                refusals[code] = refusals.get(code, 0) + n
        yield total
        refused = CounterMetricFamily("homenet_refusals", "Connections refused, by code", labels=["code"])
        for code, n in sorted(refusals.items()):
            refused.add_metric([code], n)
        yield refused
        t = node.sessions.totals
        moved = CounterMetricFamily(
            "homenet_bytes", "Bytes spliced: up = client to target, down = target to client", labels=["direction"]
        )
        moved.add_metric(["up"], t.bytes_up)
        moved.add_metric(["down"], t.bytes_down)
        yield moved
        yield _histogram(
            "homenet_handshake_seconds", "Accept to the end of the preamble (plane known, request read)",
            node.handshake_seconds,
        )  # fmt: skip
        yield _histogram(
            "homenet_setup_seconds", "Accept to a CONNECT spliced to its target (dial or dial-back included)",
            node.setup_seconds,
        )  # fmt: skip

    def _relay(self) -> Iterator[Metric]:
        relay = self.relay
        listeners = relay.registry.all()
        yield GaugeMetricFamily(
            "homenet_listeners_online", "Listeners registered here with a live stream",
            value=sum(1 for lst in listeners if lst.online),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "homenet_pool_connections",
            "Warm connections parked by listeners",
            value=sum(len(x.pool) for x in listeners),
        )
        yield CounterMetricFamily("homenet_pool_hits", "Clients served by a parked connection", value=relay.pool.hits)
        yield CounterMetricFamily(
            "homenet_pool_misses", "Clients that found no parked connection (a dial-back instead)",
            value=relay.pool.misses,
        )  # fmt: skip
        dialbacks = CounterMetricFamily(
            "homenet_dialbacks", "Dial-backs asked of listeners, by outcome", labels=["outcome"]
        )
        for outcome in ("ok", "failed", "timeout"):
            dialbacks.add_metric([outcome], relay.dialbacks.outcomes.get(outcome, 0))
        yield dialbacks

    def _auth(self) -> Iterator[Metric]:
        lim = self.limiter
        yield CounterMetricFamily("homenet_auth_failures", "Failed logins (bad, expired or replayed credentials)",
                                  value=lim.failures_total)  # fmt: skip
        yield CounterMetricFamily("homenet_auth_penalties", "Sources blocked after repeated failed logins",
                                  value=lim.penalties_total)  # fmt: skip
        yield GaugeMetricFamily("homenet_sources_blocked", "Sources blocked now", value=lim.blocked_count())
        yield GaugeMetricFamily("homenet_handshakes", "Connections in handshake now", value=lim.total)
        s = self.node.settings
        yield GaugeMetricFamily("homenet_handshakes_max", "The cap on connections in handshake", value=lim.max_total)
        yield GaugeMetricFamily("homenet_sessions_max", "The cap on sessions open at once", value=s.max_sessions)
        yield GaugeMetricFamily(
            "homenet_listener_sessions_max", "The cap on one listener's sessions", value=s.max_listener_sessions
        )

    def _rl(self) -> Iterator[Metric]:
        if not self.rl:
            return
        up = GaugeMetricFamily(
            "homenet_rl_connected", "1 when the Remote Listen stream is registered", labels=["relay"]
        )
        again = CounterMetricFamily(
            "homenet_rl_reconnects", "Remote Listen streams lost and opened again", labels=["relay"]
        )
        for v in self.rl:
            up.add_metric([v.relay], 1 if v.connected() else 0)
            again.add_metric([v.relay], v.reconnects())
        yield up
        yield again

    def _fleet(self, fleet: FleetDirectory) -> Iterator[Metric]:
        state = GaugeMetricFamily("homenet_fleet_peer_up", "1 when the peer's directory watch is live", labels=["peer"])
        size = GaugeMetricFamily(
            "homenet_fleet_peer_listeners", "Listeners in the peer's directory as this relay sees it", labels=["peer"]
        )
        forwards = CounterMetricFamily(
            "homenet_fleet_forwards", "Hops forwarded to the peer (clients of its listeners)", labels=["peer"]
        )
        for target, view in sorted(fleet.peers.items(), key=lambda kv: str(kv[0])):
            if view.state == "self":
                continue
            peer = str(target)
            state.add_metric([peer], 1 if view.state == "up" else 0)
            size.add_metric([peer], len(view.entries) if view.state == "up" else 0)
            forwards.add_metric([peer], view.forwarded)
        yield state
        yield size
        yield forwards


def registry_for(collector: NodeCollector) -> CollectorRegistry:
    """A registry with the node's families and the process's (CPU, memory, descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


#: Families that describe one process, not the node: labelled by worker instead of summed.
_PER_PROCESS = ("process_", "python_")


def merge_workers(parts: list[tuple[int, str]]) -> bytes:
    """One node's metrics from its workers' ``(index, text)``: the ``homenet_*`` samples summed
    (counters, gauges, histogram buckets; a node's total), ``process_*`` labelled by
    ``worker`` (one process each), build info once."""
    out: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in sorted(parts):
        for fam in text_string_to_metric_families(text):
            per_process = fam.name.startswith(_PER_PROCESS)
            if fam.name not in out:
                out[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                sums[fam.name] = {}
            elif fam.name in ("homenet_build", "homenet_build_info"):
                continue  # the same for every worker
            acc = sums[fam.name]
            for s in fam.samples:
                named = {**s.labels, "worker": str(worker)} if per_process else dict(s.labels)
                key = (s.name, tuple(sorted(named.items())))
                acc[key] = acc.get(key, 0.0) + s.value
    for name, fam in out.items():
        for (sample, pairs), value in sums[name].items():
            fam.add_sample(sample, dict(pairs), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(out.values())))
    return generate_latest(registry)
