"""deploy/prometheus (alert and recording rules, a scrape job) and deploy/grafana (a dashboard)
checked offline: every expression is PromQL (parsed by promql-parser, which knows Prometheus's
functions and their argument types), the rule file has the shape Prometheus loads and says what
each alert means and what to do, annotations name only labels their alert keeps, and every
dashboard query asks the dashboard's data source for the chosen job and nodes.

That every metric name is one a node really exports: tests/integration/test_observability.py
(it scrapes a running node).
"""

from __future__ import annotations

import itertools
import re

import promql_parser as pq
import pytest

from tests.observability_support import (
    DASHBOARD,
    GRAFANA_VALUES,
    PROMETHEUS_SERIES,
    SCRAPE,
    Doc,
    Query,
    dashboard,
    grafana_expanded,
    load_yaml,
    panels,
    parse,
    queries,
    recorded,
    rule_file,
    rules,
    selectors,
)

SEVERITIES = ("critical", "warning")
ALERT_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
RECORD_KEYS = {"record", "expr", "labels"}
GROUP_KEYS = {"name", "interval", "limit", "rules"}
#: Prometheus's naming of recorded series: level:metric:operations.
RECORD_NAME = re.compile(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+")
#: The template functions of Prometheus's alert templates that these annotations may use.
TEMPLATE_FUNCS = {"humanize", "humanize1024", "humanizeDuration", "humanizePercentage", "humanizeTimestamp"}
#: The reference to the dashboard's data-source variable each panel and query carries.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Aggregations that keep their input's series (and labels) rather than summing them away.
SELECTING = {"topk", "bottomk", "limitk", "limit_ratio"}


# -- the expressions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["no_such_function(up)", "rate(up)", "sum(up", "up and", 'up{job="x"', "sum by (job) up"],
)
def test_the_parser_refuses_what_prometheus_refuses(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - promql-parser raises ValueError, its message varies
        pq.parse(bad)


def test_grafana_variables_are_expanded_or_refused() -> None:
    assert grafana_expanded('rate(x{job="$job"}[$__rate_interval])') == 'rate(x{job="homenet"}[2m])'
    assert grafana_expanded('x{instance=~"${instance}"}') == 'x{instance=~".*"}'
    with pytest.raises(KeyError, match="nosuch"):
        grafana_expanded('x{a="$nosuch"}')


def test_there_are_rules_and_panels_to_check() -> None:
    found = queries()
    assert sum(q.where.startswith(DASHBOARD.name) for q in found) > 20
    assert len(list(rules())) > 10


@pytest.mark.parametrize("query", queries(), ids=lambda q: q.where)
def test_every_expression_is_promql_selecting_by_name(query: Query) -> None:
    try:
        expr = query.parsed
    except ValueError as exc:
        pytest.fail(f"{query.where}: {exc}\n  {query.expr}", pytrace=False)
    found = selectors(expr)
    assert found, f"{query.where}: selects nothing"
    for sel in found:
        # a name matched by regex ({__name__=~...}) escapes the checks that names are real
        assert sel.name, f"{query.where}: a selector without a metric name"
        assert "__name__" not in sel.labels, f"{query.where}: {sel.name} also matches __name__"


def test_recorded_series_are_recorded_here_with_the_labels_asked_for() -> None:
    made = recorded()
    kept = {r["record"]: output_labels(parse(r["expr"])) for _, r in rules() if "record" in r}
    for query in queries():
        for sel in selectors(query.parsed):
            assert sel.name is not None
            if ":" in sel.name:
                assert sel.name in made, f"{query.where}: {sel.name} is no recording rule of this file"
                assert sel.labels <= (kept[sel.name] or set()), f"{query.where}: {sel.name} keeps {kept[sel.name]}"


# -- the rule file ----------------------------------------------------------------------------------


def test_the_rule_file_has_prometheus_shape() -> None:
    doc = rule_file()
    assert set(doc) == {"groups"}, "a plain rule file: `groups:` only (not a PrometheusRule object)"
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), f"group names repeat: {names}"
    for group in doc["groups"]:
        assert set(group) <= GROUP_KEYS, f"group {group['name']}: unknown keys {set(group) - GROUP_KEYS}"
        assert group["rules"], f"group {group['name']} is empty"
        if "interval" in group:
            assert pq.parse_duration(group["interval"]).total_seconds() > 0
    alerts = [r["alert"] for _, r in rules() if "alert" in r]
    records = [r["record"] for _, r in rules() if "record" in r]
    assert len(alerts) + len(records) == len(list(rules())), "each rule is an alert or a record, not both"
    assert len(alerts) == len(set(alerts)), "alert names are unique"
    assert len(records) == len(set(records)), "recorded series are recorded once"
    assert all(a.startswith("HomeNet") for a in alerts), "alerts say whose they are"


@pytest.mark.parametrize("rule", [r for _, r in rules() if "record" in r], ids=lambda r: r["record"])
def test_a_recording_rule(rule: Doc) -> None:
    assert set(rule) <= RECORD_KEYS, f"unknown keys {set(rule) - RECORD_KEYS}"
    assert RECORD_NAME.fullmatch(rule["record"]), "level:metric:operations"
    kept = output_labels(parse(rule["expr"]))
    assert kept is not None, "a recorded series aggregates: it says which labels it keeps"
    assert kept <= {"job", "instance", "plane", "code", "direction", "peer", "relay", "outcome"}, kept


@pytest.mark.parametrize("rule", [r for _, r in rules() if "alert" in r], ids=lambda r: r["alert"])
def test_an_alert_says_how_bad_what_and_what_to_do(rule: Doc) -> None:
    assert set(rule) <= ALERT_KEYS, f"unknown keys {set(rule) - ALERT_KEYS}"
    assert pq.parse_duration(rule["for"]).total_seconds() >= 60, "`for:` a minute at least: no flapping pages"
    assert rule["labels"].get("severity") in SEVERITIES
    notes = rule["annotations"]
    assert set(notes) >= {"summary", "description"}
    assert "\n" not in notes["summary"].strip(), "a summary is one line"
    assert len(notes["description"]) > 100, "the description says what happened and what to do"


@pytest.mark.parametrize("rule", [r for _, r in rules() if "alert" in r], ids=lambda r: r["alert"])
def test_annotations_name_only_labels_the_alert_keeps(rule: Doc) -> None:
    kept = output_labels(parse(rule["expr"]))
    texts = [*rule["annotations"].values(), *rule["labels"].values()]
    for text in texts:
        assert text.count("{{") == text.count("}}"), f"unbalanced template: {text}"
        for action in re.findall(r"\{\{(.*?)\}\}", text):
            words = action.replace("|", " ").split()
            for word in words:
                if word.startswith("$labels."):
                    label = word.removeprefix("$labels.")
                    assert kept is None or label in kept, f"{label}: the expression keeps only {sorted(kept or ())}"
                else:
                    assert word == "$value" or word in TEMPLATE_FUNCS, f"{word!r} in {{{{{action}}}}}"


def output_labels(expr: pq.Expr) -> frozenset[str] | None:
    """The labels every series of ``expr``'s result carries, where the expression fixes them;
    None where they are its input series' own (a bare selector: whatever the target has)."""
    if isinstance(expr, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return output_labels(expr.expr)
    if isinstance(expr, pq.NumberLiteral | pq.StringLiteral):
        return frozenset()
    if isinstance(expr, pq.VectorSelector | pq.MatrixSelector):
        return None
    if isinstance(expr, pq.AggregateExpr):
        inner = output_labels(expr.expr)
        mod = expr.modifier
        if str(expr.op) in SELECTING:
            return inner
        if mod is None:
            return frozenset()
        if mod.type == pq.AggModifierType.By:
            return frozenset(mod.labels)
        return None if inner is None else inner - set(mod.labels)
    if isinstance(expr, pq.BinaryExpr):
        return _binary_labels(expr)
    if isinstance(expr, pq.Call):
        return _call_labels(expr)
    raise AssertionError(f"unexpected node {type(expr).__name__}")


def _binary_labels(expr: pq.BinaryExpr) -> frozenset[str] | None:
    lhs, rhs = output_labels(expr.lhs), output_labels(expr.rhs)
    op = str(expr.op)
    if isinstance(expr.lhs, pq.NumberLiteral):
        return rhs
    if isinstance(expr.rhs, pq.NumberLiteral) or op in ("and", "unless"):
        return lhs
    if op == "or":  # either side's series: a label is certain only if both keep it
        return None if lhs is None or rhs is None else lhs & rhs
    mod = expr.modifier
    matching = mod.matching if mod is not None else None
    if (
        mod is not None
        and matching is not None
        and matching.type == pq.LabelModifierType.Include
        and mod.card == pq.VectorMatchCardinality.OneToOne
    ):  # arithmetic or comparison on (...): the result has those labels only
        return frozenset(matching.labels)
    return lhs


def _call_labels(expr: pq.Call) -> frozenset[str] | None:
    name = expr.func.name
    args = [a for a in expr.args if isinstance(a, pq.Expr)]
    if name in ("vector", "time", "scalar", "pi"):
        return frozenset()
    if name == "absent":  # one series, with the equality matchers' labels
        sel = selectors(args[0])
        return frozenset(m.name for s in sel for m in s.matchers if m.op == pq.MatchOp.Equal)
    if name == "histogram_quantile":
        inner = output_labels(args[1])
        return None if inner is None else inner - {"le"}
    vectors = [a for a in args if not isinstance(a, pq.NumberLiteral | pq.StringLiteral)]
    if name.startswith("label_") or not vectors:
        return None
    return output_labels(vectors[0])


@pytest.mark.parametrize(
    ("expr", "labels"),
    [
        ("up", None),
        ("sum(up)", set()),
        ("sum by (job, instance) (rate(x_total[5m])) > 1", {"job", "instance"}),
        ("count by (peer) (x == 0)", {"peer"}),
        ("histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket[5m])))", {"instance"}),
        ("sum by (a, b) (x) / on (a) sum by (a) (y)", {"a"}),
        ("sum by (a, b) (x) / ignoring (b) group_left sum by (a) (y)", {"a", "b"}),
        ("(sum by (a) (x) > 1) and sum by (a, b) (y) > 2", {"a"}),
        ('absent(up{job="homenet", instance=~"x"})', {"job"}),
        ("topk(3, x)", None),
        ("sum without (b) (sum by (a, b) (x))", {"a"}),
    ],
)
def test_output_labels(expr: str, labels: set[str] | None) -> None:
    assert output_labels(pq.parse(expr)) == (None if labels is None else frozenset(labels))


def test_the_alerts_and_the_scrape_job_name_the_same_job() -> None:
    jobs = {job["job_name"] for job in load_yaml(SCRAPE)["scrape_configs"]}
    assert jobs == {"homenet"}
    named = set()
    for _, rule in rules():
        for sel in selectors(parse(rule["expr"])):
            named |= {m.value for m in sel.matchers if m.name == "job"}
            if sel.name in PROMETHEUS_SERIES or (sel.name or "").startswith("process_"):
                # series any target has: the job tells HomeNet's apart
                assert "job" in sel.labels, f"{rule.get('alert') or rule['record']}: {sel.name} without job="
    assert named == jobs
    job_var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "job")
    assert job_var["current"]["value"] in jobs, "the dashboard opens on the scrape job"


# -- the dashboard ------------------------------------------------------------------------------------


def test_the_dashboard_has_grafana_shape() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 38
    assert doc["title"]
    assert re.fullmatch(r"[a-z0-9-]{1,40}", doc["uid"]), "a stable uid: links survive a re-import"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus"), "the data source is the operator's choice"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE, f"variable {name} asks the chosen data source"
    assert variables["instance"]["multi"]
    assert variables["instance"]["includeAll"]
    assert variables["instance"]["allValue"] == GRAFANA_VALUES["instance"]


def test_panel_ids_are_unique_and_the_grid_holds_them() -> None:
    every = list(panels(dashboard()))
    ids = [p["id"] for p in every]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids are unique"
    boxes = []
    for p in dashboard()["panels"]:  # the top-level grid (rows' own panels are laid out when opened)
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys(), f"panel {p['id']}: gridPos h, w, x, y"
        assert min(g["h"], g["w"]) > 0
        assert min(g["x"], g["y"]) >= 0
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} {p['title']!r}: past the 24 columns"
        boxes.append((p["id"], range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])))
    for (a, ax, ay), (b, bx, by) in itertools.combinations(boxes, 2):
        overlap = set(ax) & set(bx) and set(ay) & set(by)
        assert not overlap, f"panels {a} and {b} overlap"


@pytest.mark.parametrize(
    "panel", [p for p in panels(dashboard()) if p["type"] != "row"], ids=lambda p: f"{p['id']}-{p['title']}"
)
def test_a_panel_queries_the_chosen_source_job_and_nodes(panel: Doc) -> None:
    assert panel["datasource"] == DATASOURCE
    assert panel.get("description"), "a panel says what it shows"
    targets = panel["targets"]
    assert targets
    assert len({t["refId"] for t in targets}) == len(targets)
    for target in targets:
        assert target["datasource"] == DATASOURCE, f"{target['refId']}: the dashboard's data source variable"
        assert isinstance(target.get("expr"), str)
        assert target["expr"].strip()
        for sel in selectors(parse(target["expr"])):
            values = {m.name: m.value for m in sel.matchers}
            # the variables, expanded: the chosen job, the chosen nodes
            assert values.get("job") == GRAFANA_VALUES["job"], f'{target["refId"]}: {sel.name} without job="$job"'
            assert values.get("instance") == GRAFANA_VALUES["instance"], f'{sel.name} without instance=~"$instance"'
