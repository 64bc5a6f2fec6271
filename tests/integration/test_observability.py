"""The alert rules (deploy/prometheus) and the dashboard (deploy/grafana) ask for what a node
really exports: a real ``homenet node`` with every optional part on (a fleet peer, a Remote Listen
stream, mDNS on loopback) and one refused request is scraped, and every metric name, label and
label value the expressions select must be in that scrape. Every homenet_* family is on the
dashboard. No name is written down here: the scrape is the list.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartNode
from tests.helpers import NodeProc
from tests.integration.support import closed_port, dial
from tests.observability_support import DASHBOARD, PROMETHEUS_SERIES, TARGET_LABELS, parse, queries, rules, selectors

pytestmark = pytest.mark.timeout(90)

#: The series names a family of each type has in the text format (the family's name + suffix).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


@dataclass
class Exported:
    """What one scrape shows: series name -> its family, and -> label -> the values seen."""

    family: dict[str, str] = field(default_factory=dict)
    labels: dict[str, dict[str, set[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(set)))


def parse_scrape(text: str) -> Exported:
    out = Exported()
    for fam in text_string_to_metric_families(text):
        for suffix in SUFFIXES[fam.type]:
            out.family[fam.name + suffix] = fam.name
        for sample in fam.samples:
            out.family[sample.name] = fam.name
            for label, value in sample.labels.items():
                out.labels[sample.name][label].add(value)
    return out


async def scrape(node: NodeProc) -> str:
    """The node's /metrics, at the admin address it logged (``--metrics-bind ...:0``)."""
    async with asyncio.timeout(10.0):
        while not (m := re.search(r"admin\.listening url=(\S+)", node.stderr_path.read_text())):
            await asyncio.sleep(0.05)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

    def get() -> str:
        with opener.open(m[1] + "metrics", timeout=5.0) as resp:
            body: bytes = resp.read()
        return body.decode()

    return await asyncio.to_thread(get)


async def a_node_with_everything(start_node: StartNode, tmp_path: Path, nowhere: int) -> NodeProc:
    """A node that is a fleet relay (its one peer unreachable), remote-listens (on a closed port:
    the stream retries) and browses mDNS on loopback, with a refused request behind it."""
    key = tmp_path / "fleet.key"
    key.write_text(f"fleet:{secrets.token_urlsafe(24)}\n")
    key.chmod(0o600)
    node = await start_node(
        args=[
            "node", "--bind", "127.0.0.1", "--port", "0", "--mdns-interface", "127.0.0.1",
            "--metrics-bind", "127.0.0.1:0", "--rl", f"hn://127.0.0.1:{nowhere}",
            "--peers", f"127.0.0.1:{nowhere}", "--fleet-key-file", str(key),
        ]
    )  # fmt: skip
    conn = await dial(node.host, node.port)
    try:
        await conn.send(b"HN/1 BOGUS\n")
        await conn.shutdown_write()
        assert (await conn.until_eof()).startswith(b"HN/1 400 ")
    finally:
        await conn.close()
    return node


async def test_the_rules_and_the_dashboard_select_what_a_node_exports(start_node: StartNode, tmp_path: Path) -> None:
    with closed_port() as nowhere:
        node = await a_node_with_everything(start_node, tmp_path, nowhere)
        exported = parse_scrape(await scrape(node))
    homenet = sorted({f for f in exported.family.values() if f.startswith("homenet_")})
    assert len(homenet) > 10, homenet
    on_dashboard: set[str] = set()
    # a recorded series carries the labels (and values) of the series it is made from
    made_from = {r["record"]: selectors(parse(r["expr"])) for _, r in rules() if "record" in r}
    for query in queries():
        for sel in selectors(query.parsed):
            name = sel.name
            assert name is not None
            if name in PROMETHEUS_SERIES:
                assert sel.labels <= TARGET_LABELS, f"{query.where}: {name} has only {sorted(TARGET_LABELS)}"
                continue
            sources = [s.name for s in made_from.get(name, [sel]) if s.name is not None]
            for source in sources:
                assert source in exported.family, f"{query.where}: the node exports no {source} (it exports {homenet})"
                if query.where.startswith(DASHBOARD.name):
                    on_dashboard.add(exported.family[source])
            seen: dict[str, set[str]] = defaultdict(set)
            for source in sources:
                for label, values in exported.labels[source].items():
                    seen[label] |= values
            for m in sel.matchers:
                if m.name in TARGET_LABELS:
                    continue
                assert m.name in seen, f"{query.where}: {name} has no label {m.name} (it has {sorted(seen)})"
                if m.op == pq.MatchOp.Equal:
                    assert m.value in seen[m.name], f"{query.where}: {name}{{{m.name}}} is one of {seen[m.name]}"
    missing = sorted(set(homenet) - on_dashboard)
    assert not missing, f"families the dashboard does not show: {missing}"
