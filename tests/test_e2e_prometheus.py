"""End to end: an app under opentelemetry-instrument, scraped by a real Prometheus.

``histogram_quantile(0.95, ...)`` per stage must land in the bucket of the true
p95, and a stage whose values all sit under its budget must not read as a
breach (every budget is a bucket boundary).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from otel_inference.metrics import duration_boundaries
from tests.instrumented import bucket_of, scraped
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "staged_app.py"
BUDGET = 0.014


def true_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(q * len(ordered)) - 1)]


@pytest.fixture
def instrumented_app(prometheus_server):
    with scraped(
        prometheus_server,
        APP,
        {"service": "e2e"},
        OTEL_SERVICE_NAME="e2e-staged-app",
        OTEL_INFERENCE_BUDGETS=f"model_forward={BUDGET * 1000:g}ms",
    ) as observed:
        yield observed


def test_prometheus_quantiles_match_truth(prometheus_server, instrumented_app):
    observed = instrumented_app
    selector = '{service="e2e"}'

    def scraped_everything():
        # Summed: the first requests carry inference_cold_start="true" (their own series).
        result = prometheus_server.query(
            f"sum by (inference_stage) (inference_stage_duration_seconds_count{selector})"
        )
        counts = {r["metric"]["inference_stage"]: float(r["value"][1]) for r in result}
        return (
            counts if counts.get("tokenize") == 100 and counts.get("model_forward") == 100 else None
        )

    counts = wait_until(scraped_everything, 60, "prometheus to scrape the app", interval=0.5)
    assert counts["request"] == 100 and counts["unattributed"] == 100

    bounds = duration_boundaries([BUDGET])
    p95 = {
        r["metric"]["inference_stage"]: float(r["value"][1])
        for r in prometheus_server.query(
            "histogram_quantile(0.95, sum by (le, inference_stage) "
            f"(inference_stage_duration_seconds_bucket{selector}))"
        )
    }
    for stage_name in ("tokenize", "model_forward"):
        truth = true_quantile(observed[stage_name], 0.95)
        # Within one bucket of the truth (the instrument's clock starts a hair later).
        assert abs(bucket_of(p95[stage_name], bounds) - bucket_of(truth, bounds)) <= 1, (
            stage_name,
            p95[stage_name],
            truth,
        )
    # tokenize's p95 lies in the slow tail, not among the fast calls.
    assert p95["tokenize"] > 0.015

    # The budget is a bucket boundary, so ~10 ms values never read as a breach
    # (with 10/15 ms buckets, interpolation could have reported up to 14.75 ms).
    if max(observed["model_forward"]) <= BUDGET:
        assert p95["model_forward"] <= BUDGET
    budget = prometheus_server.query(f"inference_stage_budget_seconds{selector}")
    assert {r["metric"]["inference_stage"]: float(r["value"][1]) for r in budget} == {
        "model_forward": BUDGET
    }
    le_labels = prometheus_server.query(
        'inference_stage_duration_seconds_bucket{service="e2e",inference_stage="model_forward",le="0.014"}'
    )
    assert le_labels  # the budget is a bucket boundary of every series of the stage
