"""Live: TTFT and TPOT budgets feed the same budget gauge, breach counter and alert
rules as any stage. A real app generating under opentelemetry-instrument
(tests/apps/generation_app.py: TTFT ~30 ms against a 10 ms ``ttft`` budget, TPOT
~2 ms against 1 s), scraped by a real Prometheus evaluating the generated rules
(``for:`` shortened to 1 s, as in test_dashboards_live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dashboards.generate import PROMETHEUS_RULES
from tests.instrumented import scraped
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "generation_app.py"
SERVICE = "generation-app"


@pytest.fixture
def rules(prometheus_server, tmp_path):
    loaded = yaml.safe_load(PROMETHEUS_RULES.read_text())
    for group in loaded["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = tmp_path / "inference-rules.yaml"
    path.write_text(yaml.safe_dump(loaded))
    prometheus_server.rule_files = [path]
    prometheus_server.reload()
    yield prometheus_server
    prometheus_server.rule_files = []
    prometheus_server.reload()


def firing(prometheus) -> set[tuple[str, str]]:
    return {
        (a["labels"]["alertname"], a["labels"].get("inference_stage", ""))
        for a in prometheus.api("alerts")["alerts"]
        if a["labels"].get("job") == SERVICE and a["state"] == "firing"
    }


def test_ttft_budget_breach_fires_the_stage_alerts(rules):
    with scraped(
        rules,
        APP,
        {"job": SERVICE},
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_INFERENCE_BUDGETS="ttft=10ms,tpot=1s,request=5s",
    ) as first:
        assert first == {"ready": True}
        gauge = f'inference_stage_budget_seconds{{job="{SERVICE}"}}'
        wait_until(lambda: rules.query(gauge), 30, "the budget gauge", interval=0.5)
        budgets = {r["metric"]["inference_stage"]: float(r["value"][1]) for r in rules.query(gauge)}
        assert budgets == {"ttft": 0.01, "tpot": 1.0, "request": 5.0}
        expected = {
            ("InferenceStageP95OverBudget", "ttft"),
            ("InferenceStageBudgetBreachRatioHigh", "ttft"),
        }
        wait_until(lambda: firing(rules) >= expected, 60, "the ttft alerts", interval=0.5)
        assert firing(rules) == expected  # tpot and the request stay under their budgets
        # The GenAI histogram has the budget as an exact bucket boundary.
        buckets = rules.query(
            f'gen_ai_server_time_to_first_token_seconds_bucket{{job="{SERVICE}", le="0.01"}}'
        )
        assert buckets, "the 10 ms ttft budget is a bucket boundary"
