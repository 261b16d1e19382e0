"""The Grafana dashboard: well-formed, every query parses as PromQL, and it charts fmgate's real metrics.

Queries are parsed with promql-parser (Rust bindings of a PromQL parser); metric and label names are
checked against the collectors that gateway/metrics.py defines, so a renamed metric breaks this test.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.ops._support import DASHBOARD, need_module

# Labels Prometheus adds at scrape time (kubernetes_sd / ServiceMonitor relabelling), not fmgate's own.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "container", "service", "endpoint"}
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in all_panels(dash) for t in p.get("targets", [])]


def fmgate_series() -> dict[str, set[str] | None]:
    """Series name -> its label names (None: any, for Info metrics whose keys are chosen at run time)."""
    metrics = need_module("gateway.metrics", "the project itself (pip install -e .)")
    prom = need_module("prometheus_client", "prometheus-client")
    out: dict[str, set[str] | None] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, prom.metrics.MetricWrapperBase):
            continue
        name, labels, kind = obj._name, set(obj._labelnames), obj._type
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "gauge":
            out[name] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        elif kind == "info":
            out[f"{name}_info"] = None
        else:
            raise AssertionError(f"add a case for {kind} metrics")
    assert out, "gateway/metrics.py defines no collectors?"
    return out


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] == "fmgate-overview" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[0] == "datasource" and {"namespace", "job", "model"} <= set(names)
    for p in all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p.get("targets"), p["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels(dashboard):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def _parse(expr: str):
    promql = need_module("promql_parser", "promql-parser")
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$__" not in expr, f"unknown Grafana macro in {expr}"
    return promql, promql.parse(expr)


def _walk(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(selected series with the labels their matchers name, labels named in by/without clauses)."""
    promql, tree = _parse(expr)
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            selectors.append((node.name, {m.name for m in node.matchers.matchers}))
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql.walk(tree, visit)
    return selectors, grouping


def test_every_query_parses_and_uses_real_metrics_and_labels(dashboard):
    series = fmgate_series()
    for title, t in targets(dashboard):
        selectors, grouping = _walk(t["expr"])
        allowed = set(TARGET_LABELS)
        for name, matcher_labels in selectors:
            if name == "up":
                continue
            assert name in series, f"{title}: {name} is not a series gateway/metrics.py exports"
            if series[name] is None:
                continue
            allowed |= series[name]
            assert matcher_labels <= series[name] | TARGET_LABELS, (
                f"{title}: {name} has no {matcher_labels - series[name]}"
            )
        assert grouping <= allowed, f"{title}: grouping by {grouping - allowed}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        assert legend <= grouping | allowed, f"{title}: legend uses {legend - grouping}"


def test_variables_query_real_metrics(dashboard):
    series = fmgate_series()
    for var in dashboard["templating"]["list"][1:]:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["name"]
        selectors, _ = _walk(m.group(1))
        for name, _labels in selectors:
            assert name in series
        label = m.group(2)
        assert label in TARGET_LABELS or label in (series[selectors[0][0]] or set())


def test_every_fmgate_metric_is_charted(dashboard):
    used = {name for _, t in targets(dashboard) for name, _ in _walk(t["expr"])[0]}
    families = {re.sub(r"_(bucket|sum|count)$", "", s) for s in fmgate_series()}
    charted = {re.sub(r"_(bucket|sum|count)$", "", s) for s in used}
    assert families <= charted, f"metrics without a panel: {sorted(families - charted)}"


def test_the_chart_ships_this_dashboard():
    from tests.ops._support import render_docs

    docs = render_docs({"grafanaDashboard": {"enabled": True}})
    (cm,) = [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(cm["data"]["fmgate.json"]) == json.loads(DASHBOARD.read_text())
