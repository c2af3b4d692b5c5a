"""Live: a real instrumented app (tests/apps/shipping_app.py, every stage) under
opentelemetry-instrument, scraped by a real Prometheus that evaluates our rules.

* Every query of every panel of the committed dashboard JSON, with its variables
  substituted, returns data (finite values) from the real scrape; so do the variable
  queries. A wrong metric or label name, a broken join, a missing metric all fail here.
* The budget alerts fire for exactly the breaching stage (postprocess), and the
  Grafana-managed rules' queries judge the same way.

The rules are the generated file with every ``for: 5m`` shortened to 1 s (a test copy):
the delay itself is tested with simulated time by promtool (test_alerts_promtool.py);
here it would only make the test wait five minutes. Rate windows stay as shipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import alerts
from dashboards.generate import DASHBOARD_JSON, GRAFANA_ALERTS, PROMETHEUS_RULES
from tests import instrumented
from tests.instrumented import prometheus_env
from tests.servers import LOCALHOST, free_port, wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "shipping_app.py"
SERVICE = "shipping-app"  # the `job` label, as the Collector's exporter would set it
BREACHING = "postprocess"
# Non-breaching stages get a wide margin: their sleeps overshoot on a loaded machine.
BUDGETS = "postprocess=1ms,model_forward=60ms,request=2s,ttft=2s,tpot=1s"
VARIABLES = {
    "service": SERVICE,
    "stage": ".*",  # All
    "cost_per_hour": "2.5",
    "cold_start": "true",  # steady state (the default)
    "__rate_interval": "1m",
}


def substitute(expr: str) -> str:
    """Replace ``$var`` and ``${var}`` as Grafana does; fail on any variable left over."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"undefined variable ${name} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(r["value"][1]) for r in result]
    return [v for v in values if math.isfinite(v)]


@pytest.fixture(scope="module")
def shipping(prometheus_server, redis_server, tmp_path_factory):
    rules = yaml.safe_load(PROMETHEUS_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    rule_file = tmp_path_factory.mktemp("rules") / "inference-rules.yaml"
    rule_file.write_text(yaml.safe_dump(rules))

    port = free_port()
    env = prometheus_env(
        port,
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_INFERENCE_BUDGETS=BUDGETS,
        SHIPPING_REDIS_URL=redis_server.url,
    )
    process = instrumented.start(APP, env)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        prometheus_server.rule_files = [rule_file]
        prometheus_server.reload()
        # job as the Collector's prometheus exporter sets it (service.name).
        prometheus_server.set_targets([f"{LOCALHOST}:{port}"], {"job": SERVICE})

        def scraped() -> bool:
            # Two scrapes with traffic in between: rates exist.
            result = prometheus_server.query(
                f'rate(inference_stage_duration_seconds_count{{job="{SERVICE}", '
                f'inference_stage="request"}}[1m]) > 0'
            )
            return bool(result)

        wait_until(scraped, 60, "prometheus to scrape the shipping app", interval=0.5)
        yield prometheus_server
    finally:
        prometheus_server.set_targets([])
        prometheus_server.rule_files = []
        prometheus_server.reload()
        if process.stdin:
            process.stdin.close()
        process.wait(timeout=30)
        assert process.returncode == 0, process.stderr.read()


def panel_queries() -> list[tuple[str, str, str]]:
    board = json.loads(DASHBOARD_JSON.read_text())
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_has_the_issue_panels():
    titles = " | ".join(t for t, _, _ in panel_queries()).lower()
    for wanted in (
        "p50",
        "p95",
        "p99",
        "share of request time",
        "requests / s",
        "error",
        "cache hit ratio",
        "padding waste",
        "transfer bytes",
        "batch size",
        "queue wait",
        "budget",
        "cost per 1k requests by stage",
        "time to first token",
        "time per output token",
        "output tokens / s",
    ):
        assert wanted in titles, wanted


@pytest.mark.parametrize(
    ("title", "ref", "expr"), panel_queries(), ids=[f"{t} {r}" for t, r, _ in panel_queries()]
)
def test_every_panel_query_returns_data(shipping, title, ref, expr):
    query = substitute(expr)

    def has_data() -> list[float]:
        return finite(shipping.query(query))

    # Rates need two scrapes of the series involved: poll a little, then judge.
    values = wait_until(has_data, 20, f"data for {title} {ref}: {query}", interval=0.5)
    assert values


def test_variable_queries_list_the_service_and_every_stage(shipping):
    services = shipping.api(
        "label/job/values", **{"match[]": "inference_stage_duration_seconds_count"}
    )
    assert SERVICE in services
    stages = shipping.api(
        "label/inference_stage/values",
        **{"match[]": f'inference_stage_duration_seconds_count{{job="{SERVICE}"}}'},
    )
    assert set(stages) >= {
        "queue_wait",
        "feature_hydration",
        "preprocess",
        "tokenize",
        "h2d_transfer",
        "model_forward",
        "batch",
        "d2h_transfer",
        "postprocess",
        "serialize",
        "parse",
        "request",
        "unattributed",
    }


def test_stage_share_sums_to_one_and_cost_uses_batch_share(shipping):
    board = {p["title"]: p for p in json.loads(DASHBOARD_JSON.read_text())["panels"]}
    share = shipping.query(
        substitute(board["Share of request time by stage (top-level stages)"]["targets"][0]["expr"])
    )
    by_stage = {r["metric"]["inference_stage"]: float(r["value"][1]) for r in share}
    assert "h2d_transfer" not in by_stage  # nested: counted inside the batch
    assert sum(by_stage.values()) == pytest.approx(1.0)
    cost = shipping.query(substitute(board["Cost per 1k requests by stage"]["targets"][0]["expr"]))
    stages = {r["metric"]["inference_stage"] for r in cost}
    assert "batch" in stages and not {"request", "queue_wait"} & stages


def firing(prometheus) -> set[tuple[str, str]]:
    return {
        (a["labels"]["alertname"], a["labels"].get("inference_stage", ""))
        for a in prometheus.api("alerts")["alerts"]
        if a["labels"].get("job") == SERVICE and a["state"] == "firing"
    }


def test_alert_fires_for_exactly_the_breaching_stage(shipping):
    expected = {
        ("InferenceStageP95OverBudget", BREACHING),
        ("InferenceStageBudgetBreachRatioHigh", BREACHING),
    }
    wait_until(lambda: firing(shipping) >= expected, 60, "the budget alerts to fire", interval=0.5)
    assert firing(shipping) == expected
    # Nothing else is even pending for this service: model_forward sits under its budget.
    active = {
        (a["labels"]["alertname"], a["labels"].get("inference_stage"))
        for a in shipping.api("alerts")["alerts"]
        if a["labels"].get("job") == SERVICE
    }
    assert active == expected


def test_grafana_rules_judge_like_the_prometheus_rules(shipping):
    provisioned = yaml.safe_load(GRAFANA_ALERTS.read_text())
    (group,) = provisioned["groups"]
    over: dict[str, set[str]] = {}
    for rule in group["rules"]:
        query = next(d for d in rule["data"] if d["refId"] == "A")["model"]["expr"]
        (condition,) = next(d for d in rule["data"] if d["refId"] == "C")["model"]["conditions"]
        assert condition["evaluator"]["type"] == "gt"
        (threshold,) = condition["evaluator"]["params"]
        result = [r for r in shipping.query(query) if r["metric"].get("job") == SERVICE]
        assert result, rule["title"]  # judged on data, not on its absence
        over[rule["title"]] = {
            r["metric"]["inference_stage"] for r in result if float(r["value"][1]) > threshold
        }
    assert over == {
        "InferenceStageP95OverBudget": {BREACHING},
        "InferenceStageBudgetBreachRatioHigh": {BREACHING},
        "InferenceRequestOverBudget": set(),
    }
    assert {r["title"] for r in group["rules"]} == {a.name for a in alerts.alerts()}


def test_cold_start_filter_separates_steady_state(shipping, prometheus_server):
    # The app's first requests are cold (OTEL_INFERENCE_COLD_START_REQUESTS default 10).
    steady = f'{{job="{SERVICE}", inference_cold_start!~"true"}}'
    everything = f'{{job="{SERVICE}", inference_cold_start!~"__none__"}}'

    def count(selector: str) -> float:
        result = prometheus_server.query(
            f'sum(inference_stage_duration_seconds_count{selector[:-1]}, inference_stage="request"}})'
        )
        return float(result[0]["value"][1]) if result else 0.0

    all_requests, steady_requests = count(everything), count(steady)
    assert all_requests - steady_requests == 10
