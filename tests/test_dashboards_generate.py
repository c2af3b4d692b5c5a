"""The committed dashboard, provisioning and rule files are exactly the generator's
output (no hand-edited drift), and hang together: variables, datasource uids, ids."""

from __future__ import annotations

import json
import re

import yaml

from dashboards import alerts, dashboard, generate, promql
from otel_inference import semconv


def test_committed_files_match_the_generator():
    assert generate.drift() == [], "run: python -m dashboards.generate"
    assert generate.main(["--check"]) == 0


def test_check_mode_reports_drift(tmp_path, monkeypatch):
    stale = tmp_path / "inference-stages.json"
    stale.write_text("{}\n")
    outputs = {stale: lambda: generate.to_json(dashboard.dashboard())}
    monkeypatch.setattr(generate, "outputs", lambda: outputs)
    assert generate.drift() == [stale]
    monkeypatch.setattr(generate, "ROOT", tmp_path.parent)
    assert generate.main(["--check"]) == 1


def test_names_follow_semconv():
    assert promql.DURATION == "inference_stage_duration_seconds"
    assert promql.BREACHES == "inference_stage_budget_breaches_total"
    assert promql.BUDGET == "inference_stage_budget_seconds"
    assert semconv.INFERENCE_STAGE.replace(".", "_") == promql.STAGE
    assert promql.PARENT == "inference_stage_parent"


def _board():
    return json.loads(generate.DASHBOARD_JSON.read_text())


def test_variables_are_defined_and_used():
    board = _board()
    defined = {v["name"] for v in board["templating"]["list"]}
    assert defined == {"datasource", "service", "stage", "cold_start", "cost_per_hour"}
    used: set[str] = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert 'job=~"$service"' in target["expr"], (panel["title"], target["expr"])
    assert used - {"__rate_interval"} == {"service", "stage", "cold_start", "cost_per_hour"}


def test_panels_use_the_provisioned_prometheus():
    board = _board()
    provisioned = yaml.safe_load(generate.DATASOURCES.read_text())["datasources"]
    uids = {d["uid"]: d for d in provisioned}
    (datasource_var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert uids[datasource_var["current"]["value"]]["type"] == datasource_var["query"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_exemplars_link_to_jaeger():
    datasources = yaml.safe_load(generate.DATASOURCES.read_text())["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    (link,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == "trace_id"
    assert any(d["uid"] == link["datasourceUid"] and d["type"] == "jaeger" for d in datasources)
    latency_targets = [
        t
        for p in _board()["panels"]
        for t in p.get("targets", [])
        # Plain latency quantiles (a ratio to the budget has no exemplars to show).
        if t["expr"].startswith("histogram_quantile")
        and promql.DURATION in t["expr"]
        and "group_left" not in t["expr"]
    ]
    assert latency_targets and all(t["exemplar"] for t in latency_targets)


def test_layout_ids_and_grid():
    panels = _board()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_share_counts_top_level_stages_only():
    (share,) = [p for p in _board()["panels"] if p["title"].startswith("Share of request time")]
    expr = share["targets"][0]["expr"]
    assert expr.count('inference_stage_parent=""') == 2
    assert expr.count('inference_stage!="request"') == 2


def test_provider_and_alerting_provisioning():
    provider = yaml.safe_load(generate.DASHBOARD_PROVIDER.read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == generate.GRAFANA_DASHBOARDS_DIR
    alerting = yaml.safe_load(generate.GRAFANA_ALERTS.read_text())
    datasource_uids = {
        d["uid"] for d in yaml.safe_load(generate.DATASOURCES.read_text())["datasources"]
    }
    for rule in alerting["groups"][0]["rules"]:
        assert len(rule["uid"]) <= 40
        query = next(d for d in rule["data"] if d["refId"] == rule["condition"])
        assert query["model"]["expression"] == "A"
        source = next(d for d in rule["data"] if d["refId"] == "A")
        assert source["datasourceUid"] in datasource_uids


def test_prometheus_and_grafana_alerts_match():
    rules = yaml.safe_load(generate.PROMETHEUS_RULES.read_text())
    prom = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    grafana = {
        r["title"]: r
        for r in yaml.safe_load(generate.GRAFANA_ALERTS.read_text())["groups"][0]["rules"]
    }
    assert set(prom) == set(grafana) == {a.name for a in alerts.alerts()}
    for name, rule in prom.items():
        assert rule["for"] == grafana[name]["for"] == alerts.FOR
        assert rule["labels"] == grafana[name]["labels"]
        # Budgets come only from the app: no seconds in any rule, only the gauge join
        # (the breach ratio needs neither).
        assert "inference_stage_budget_seconds" in rule["expr"] or "breaches" in rule["expr"]
