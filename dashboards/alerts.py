"""Budget alerts, defined once, rendered as a Prometheus rule file and as
Grafana-managed alert provisioning.

Budgets live only in the app's config (``OTEL_INFERENCE_BUDGETS``): the app exports
each as the ``inference_stage_budget_seconds`` gauge, and the rules join on it, so
no threshold in seconds appears here. A stage without a budget never alerts.

* ``InferenceStageP95OverBudget``: a stage's p95 (histogram_quantile over 5 m of
  bucket rates) above its budget. Exact, not an interpolation artefact: every budget
  is a bucket boundary (``otel_inference.metrics``), so with all values at or under
  the budget the quantile is interpolated inside a bucket whose upper bound is the
  budget, and ``lo + (budget - lo)`` is exactly the budget (Sterbenz: boundaries step
  by at most 1.5x).
* ``InferenceStageBudgetBreachRatioHigh``: the counted breaches / executions above
  5%: no buckets at all, so it also holds when a user View changes the boundaries.
* ``InferenceRequestOverBudget``: the end-to-end budget (stage ``request``), paged.

All of them judge steady state: executions labelled ``inference_cold_start="true"``
(the first requests after a start, warm-up) are left out, as the dashboard's
default "Requests" filter does. A slow first batch after every deploy is expected,
not a budget breach; a service that stays cold is still caught once it is warm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashboards import promql

WINDOW = "5m"
FOR = "5m"
PROMETHEUS_DATASOURCE_UID = "prometheus"
GRAFANA_FOLDER = "Inference"

BY = f"{promql.SERVICE}_{promql.STAGE}"  # recording-rule level: job_inference_stage
NOT_REQUEST = f'{promql.STAGE}!="{promql.REQUEST}"'
IS_REQUEST = f'{promql.STAGE}="{promql.REQUEST}"'
# Steady state: series without the label (warm) match too.
STEADY = f'{promql.COLD_START}!="true"'


def quantile_record(q: float) -> str:
    return f"{BY}:{promql.DURATION}:p{round(q * 100)}_{WINDOW}"


BREACH_RATIO_RECORD = f"{BY}:{promql.metric('inference.stage.budget.breaches')}:ratio_{WINDOW}"


def recording_rules() -> list[dict[str, str]]:
    by = f"{promql.SERVICE}, {promql.STAGE}"
    rules = [
        {
            "record": quantile_record(q),
            "expr": promql.quantile(q, promql.DURATION, by, (STEADY,), WINDOW),
        }
        for q in (0.5, 0.95, 0.99)
    ]
    rules.append({"record": BREACH_RATIO_RECORD, "expr": promql.breach_ratio((STEADY,), WINDOW)})
    return rules


@dataclass(frozen=True)
class Alert:
    name: str
    uid: str  # Grafana rule uid (at most 40 characters)
    severity: str
    summary: str  # Prometheus template; {value} is where the value goes
    value_format: str  # humanize function for the value
    threshold: float
    # The value compared to the threshold: over recording rules for Prometheus, raw
    # (self-contained) for Grafana, which may query a Prometheus without our rules.
    prometheus_value: str
    grafana_value: str

    def prometheus_rule(self) -> dict[str, Any]:
        value = f"{{{{ $value | {self.value_format} }}}}"
        return {
            "alert": self.name,
            "expr": f"(\n{self.prometheus_value}\n) > {self.threshold:g}",
            "for": FOR,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary.replace("{value}", value)},
        }

    def grafana_rule(self) -> dict[str, Any]:
        value = f"{{{{ {self.value_format} $values.A.Value }}}}"
        return {
            "uid": self.uid,
            "title": self.name,
            "condition": "C",
            "data": [
                {
                    "refId": "A",
                    "relativeTimeRange": {"from": 600, "to": 0},
                    "datasourceUid": PROMETHEUS_DATASOURCE_UID,
                    "model": {
                        "refId": "A",
                        "expr": self.grafana_value,
                        "instant": True,
                        "range": False,
                    },
                },
                {
                    "refId": "C",
                    "datasourceUid": "__expr__",
                    "model": {
                        "refId": "C",
                        "type": "threshold",
                        "expression": "A",
                        "conditions": [{"evaluator": {"type": "gt", "params": [self.threshold]}}],
                    },
                },
            ],
            "noDataState": "OK",  # no budget or no traffic: nothing to judge
            "execErrState": "Error",
            "for": FOR,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary.replace("{value}", value)},
        }


def alerts() -> list[Alert]:
    stage_p95 = f"{quantile_record(0.95)}{promql.selector(NOT_REQUEST)}"
    request_p95 = f"{quantile_record(0.95)}{promql.selector(IS_REQUEST)}"
    return [
        Alert(
            name="InferenceStageP95OverBudget",
            uid="inference-stage-p95-over-budget",
            severity="warning",
            summary="{{ $labels.job }}: stage {{ $labels.inference_stage }} p95 is {value} of its budget",
            value_format="humanizePercentage",
            threshold=1,
            prometheus_value=promql.stage_p95_over_budget((NOT_REQUEST,), WINDOW, p95=stage_p95),
            grafana_value=promql.stage_p95_over_budget((NOT_REQUEST, STEADY), WINDOW),
        ),
        Alert(
            name="InferenceStageBudgetBreachRatioHigh",
            uid="inference-stage-breach-ratio-high",
            severity="warning",
            summary="{{ $labels.job }}: {value} of requests over their stage {{ $labels.inference_stage }} budget",
            value_format="humanizePercentage",
            threshold=promql.BREACH_RATIO_THRESHOLD,
            prometheus_value=f"{BREACH_RATIO_RECORD}{promql.selector(NOT_REQUEST)}",
            grafana_value=promql.breach_ratio((NOT_REQUEST, STEADY), WINDOW),
        ),
        Alert(
            name="InferenceRequestOverBudget",
            uid="inference-request-over-budget",
            severity="critical",
            summary="{{ $labels.job }}: request p95 is {value} of the end-to-end budget",
            value_format="humanizePercentage",
            threshold=1,
            prometheus_value=promql.stage_p95_over_budget((IS_REQUEST,), WINDOW, p95=request_p95),
            grafana_value=promql.stage_p95_over_budget((IS_REQUEST, STEADY), WINDOW),
        ),
    ]


def prometheus_rules() -> dict[str, Any]:
    return {
        "groups": [
            {"name": "inference-stage-recording", "rules": recording_rules()},
            {"name": "inference-budgets", "rules": [a.prometheus_rule() for a in alerts()]},
        ]
    }


def grafana_alerting() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "inference-budgets",
                "folder": GRAFANA_FOLDER,
                "interval": "1m",
                "rules": [a.grafana_rule() for a in alerts()],
            }
        ],
    }
