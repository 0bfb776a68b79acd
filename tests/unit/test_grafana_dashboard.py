"""The Grafana dashboard in deploy/grafana charts only metrics the code exposes, under their exposed names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

import sd_operator.controllers.generationbatch
import sd_operator.controllers.lorajob
import sd_operator.controllers.sdinstance  # noqa: F401  (registers each controller's label values)
from sd_operator import metrics as operator_metrics
from sd_operator.gateway import metrics as gateway_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sd-operator-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Sample names prometheus_client writes for a family of each type: Counter("x") is scraped as x_total.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}


def collectors() -> list[MetricWrapperBase]:
    return [
        c for m in (operator_metrics, gateway_metrics) for c in vars(m).values() if isinstance(c, MetricWrapperBase)
    ]


def exposed() -> dict[str, set[str]]:
    """Family name -> sample names, read from the collectors so that renaming a metric fails these tests."""
    families: dict[str, set[str]] = {}
    for collector in collectors():
        for family in [*collector.describe(), *collector.collect()]:
            names = families.setdefault(family.name, set())
            names.update(family.name + s for s in SUFFIXES[family.type])
            names.update(s.name for s in family.samples)
    return families


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: what is left once strings, matchers, ranges and label lists go."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr)
    return {m[1] for m in found if not m[2] and m[1] not in PROMQL_WORDS}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    # label_values(selector, label): the label is not a metric name.
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", d) for d in variables]


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "sd-operator"
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["definition"] == "label_values(sd_gateway_queue_depth, model)"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in all_panels(dashboard))


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    # A fixed datasource uid would only exist in the Grafana the dashboard was exported from.
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    assert all(v["datasource"] == DATASOURCE for v in dashboard["templating"]["list"] if v["type"] == "query")


def test_queries_use_only_exposed_metric_names(dashboard: dict[str, Any]) -> None:
    names = set().union(*exposed().values())
    for expr in queries(dashboard):
        used = metric_names(expr)
        assert used, f"no metric found in {expr!r}"
        assert used <= names, f"{sorted(used - names)} in {expr!r} is not exposed by the code"


def test_every_exposed_metric_is_charted(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for e in queries(dashboard)))
    for family, samples in exposed().items():
        assert used & samples, f"{family} has no panel"


def test_controller_filter_matches_the_controllers(dashboard: dict[str, Any]) -> None:
    # controller_runtime_* names are shared with every other operator; the filter keeps only ours.
    filters = {f for e in queries(dashboard) for f in re.findall(r'controller=~"([^"]*)"', e)}
    (pattern,) = filters
    controllers = {s.labels["controller"] for f in operator_metrics.reconcile_total.collect() for s in f.samples}
    assert controllers == {f"{plural}.sd-operator.dev" for plural in ("sdinstances", "lorajobs", "generationbatches")}
    assert all(re.fullmatch(pattern, c) for c in controllers)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x=~"y|z"}[5m])) / on (x) b_total', {"a_bucket", "b_total"}),
        ("histogram_quantile(0.95, c) > 1e-9 and d offset 5m", {"c", "d"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
