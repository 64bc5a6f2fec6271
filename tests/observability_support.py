"""deploy/prometheus and deploy/grafana as the tests read them: every PromQL expression they hold
(alert and recording rules, dashboard targets, template variables), parsed by promql-parser, and
the metric names and label matchers each one selects."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser as pq

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "homenet-alerts.yaml"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape-homenet.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "homenet-dashboard.json"
#: What Grafana puts in place of its variables when it queries (values a real query could get).
GRAFANA_VALUES = {"__rate_interval": "2m", "__interval": "30s", "__range": "6h", "job": "homenet", "instance": ".*"}
#: Labels Prometheus itself puts on every series it scrapes (the target's), whatever the exporter.
TARGET_LABELS = frozenset({"job", "instance"})
#: Series Prometheus makes itself for each target (not the node's).
PROMETHEUS_SERIES = frozenset({"up"})

Doc = dict[str, Any]


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it is written."""

    where: str
    expr: str

    @property
    def parsed(self) -> pq.Expr:
        return parse(self.expr)


@dataclass(frozen=True)
class Selector:
    """One vector selector: the metric name and its label matchers."""

    name: str | None
    matchers: tuple[pq.Matcher, ...]

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(m.name for m in self.matchers)


def grafana_expanded(expr: str, values: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's ``$name`` and ``${name}`` replaced as Grafana would."""
    table = GRAFANA_VALUES if values is None else values

    def sub(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name not in table:
            raise KeyError(f"unknown Grafana variable ${name}")
        return table[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def parse(expr: str) -> pq.Expr:
    """``expr`` parsed (Grafana's variables replaced first); ValueError if it is not PromQL."""
    return pq.parse(grafana_expanded(expr))


def selectors(expr: pq.Expr) -> list[Selector]:
    """Every vector selector in ``expr`` (those inside range selectors too)."""
    out: list[Selector] = []

    def visit(node: pq.Expr) -> None:
        if isinstance(node, pq.VectorSelector):
            out.append(Selector(node.name, tuple(node.matchers.matchers)))

    pq.walk(expr, visit)
    return out


def load_yaml(path: Path) -> Doc:
    """One YAML document (PyYAML comes with the dev extras and ships no types: used as Any)."""
    doc: Doc = importlib.import_module("yaml").safe_load(path.read_text())
    return doc


def rule_file() -> Doc:
    return load_yaml(RULES)


def rules() -> Iterator[tuple[str, Doc]]:
    """(group name, rule) for every rule of the rule file."""
    for group in rule_file()["groups"]:
        for rule in group["rules"]:
            yield group["name"], rule


def recorded() -> set[str]:
    """The series the recording rules make."""
    return {r["record"] for _, r in rules() if "record" in r}


def dashboard() -> Doc:
    doc: Doc = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: Doc) -> Iterator[Doc]:
    """Every panel, those inside collapsed rows too."""
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def label_values_query(text: str) -> str:
    """The series selector of a template variable's ``label_values(SELECTOR, LABEL)``."""
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
    assert m is not None, f"expected label_values(SELECTOR, LABEL), got {text!r}"
    return m[1]


def queries() -> list[Query]:
    """Every PromQL expression of the rule file and the dashboard."""
    out = [Query(f"{RULES.name}: {r.get('alert') or r['record']}", r["expr"]) for _, r in rules()]
    doc = dashboard()
    for panel in panels(doc):
        for target in panel.get("targets", []):
            out.append(Query(f"{DASHBOARD.name}: panel {panel['id']} {panel['title']!r} {target['refId']}",
                             target["expr"]))  # fmt: skip
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append(Query(f"{DASHBOARD.name}: variable {var['name']}", label_values_query(text)))
    return out
