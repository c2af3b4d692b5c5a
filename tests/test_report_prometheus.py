"""Prometheus input: an app under opentelemetry-instrument, scraped by a real Prometheus,
then ``otel-inference report --prometheus``.

The app (``tests/apps/staged_app.py``) prints the durations it observed; the
report's per-stage p50/p95/p99 must lie within one histogram bucket of the
exact nearest-rank percentiles of those durations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from otel_inference.metrics import duration_boundaries
from otel_inference.report._stats import nearest_rank
from tests.instrumented import bucket_of, prometheus_env, scraped, start
from tests.servers import LOCALHOST, free_port, wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "staged_app.py"
CLI = str(Path(sys.executable).parent / "otel-inference")
BUDGET = 0.014
LABEL = "report-e2e"


@pytest.fixture
def scraped_app(prometheus_server):
    with scraped(
        prometheus_server,
        APP,
        {"service": LABEL},
        OTEL_SERVICE_NAME="report-staged-app",
        OTEL_INFERENCE_BUDGETS=f"model_forward={BUDGET * 1000:g}ms",
    ) as observed:

        def scraped_everything() -> bool:
            result = prometheus_server.query(
                "sum by (inference_stage) "
                f'(inference_stage_duration_seconds_count{{service="{LABEL}"}})'
            )
            counts = {r["metric"]["inference_stage"]: float(r["value"][1]) for r in result}
            return all(counts.get(s) == 100 for s in ("tokenize", "model_forward", "request"))

        wait_until(scraped_everything, 60, "prometheus to scrape the app", interval=0.5)
        yield observed


def report(prometheus_server, *options: str) -> dict:
    result = subprocess.run(
        [CLI, "report", "--prometheus", prometheus_server.url, "--service", LABEL, *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_prometheus_percentiles_within_one_bucket(prometheus_server, scraped_app):
    observed = scraped_app
    data = report(prometheus_server, "--format", "json")
    rows = {row["label"]: row for row in data["rows"]}
    assert [label for label in rows] == ["tokenize", "model_forward", "unattributed", "request"]
    assert {label: row["count"] for label, row in rows.items()} == dict.fromkeys(rows, 100)
    assert data["requests"] == 100

    bounds = duration_boundaries([BUDGET])
    for stage in ("tokenize", "model_forward"):
        for key, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            truth = nearest_rank(observed[stage], q)
            got = rows[stage][key]
            assert abs(bucket_of(got, bounds) - bucket_of(truth, bounds)) <= 1, (stage, key, got)
    assert rows["tokenize"]["p50"] < 0.005 < 0.015 < rows["tokenize"]["p95"]

    # The budget comes from the service's gauge; every budget is a bucket boundary.
    forward = rows["model_forward"]
    assert forward["budget"] == BUDGET
    if max(observed["model_forward"]) <= BUDGET:
        assert forward["status"] == "ok"
    # Figures that need traces stay empty; the verdict weighs p95s.
    assert forward["tail_share"] is None and forward["cost_per_request"] is None
    assert data["verdict"]["stage"] == "tokenize" and data["verdict"]["category"] == "host"
    # The load ended before the first scrape: nothing new in the window.
    assert any("totals since each process started" in note for note in data["notes"])

    # --budgets overrides the gauge; cold-start requests (the first 10) can be left out.
    data = report(prometheus_server, "--format", "json", "--budgets", "model_forward=5ms")
    assert {r["label"]: r["status"] for r in data["rows"]}["model_forward"] == "over"
    data = report(prometheus_server, "--format", "json", "--exclude-cold-start")
    assert {r["label"]: r["count"] for r in data["rows"]}["request"] == 90

    table = subprocess.run(
        [CLI, "report", "--prometheus", prometheus_server.url, "--service", LABEL],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "tokenize" in table and "Verdict: tokenize dominates the tail" in table


def test_prometheus_without_our_series(prometheus_server):
    result = subprocess.run(
        [CLI, "report", "--prometheus", prometheus_server.url, "--service", "no-such-service"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "has no inference_stage_duration_seconds series" in result.stderr
    assert "Traceback" not in result.stderr


def test_disagreeing_budget_gauges_are_reported(prometheus_server):
    """Two replicas of one service run with other model_forward budgets: the report
    uses the most frequent (a tie: the smaller) and says they disagree."""
    label = "report-budgets"
    processes, targets = [], []
    try:
        for budget in ("14ms", "20ms"):
            port = free_port()
            processes.append(
                start(
                    APP,
                    prometheus_env(
                        port,
                        OTEL_SERVICE_NAME="report-staged-app",
                        OTEL_INFERENCE_BUDGETS=f"model_forward={budget}",
                        STAGED_APP_TOKENIZER="1",
                    ),
                )
            )
            targets.append(f"{LOCALHOST}:{port}")
        for process in processes:
            json.loads(process.stdout.readline())  # its load is done
        prometheus_server.set_targets(targets, {"service": label})

        def both_scraped() -> bool:
            result = prometheus_server.query(f'inference_stage_budget_seconds{{service="{label}"}}')
            return len(result) == 2

        wait_until(both_scraped, 60, "prometheus to scrape both replicas", interval=0.5)
        result = subprocess.run(
            [
                *(CLI, "report", "--prometheus", prometheus_server.url),
                *("--service", label, "--format", "json"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
    finally:
        prometheus_server.set_targets([])
        for process in processes:
            process.stdin.close()
            process.wait(timeout=30)
    forward = {row["label"]: row for row in data["rows"]}["model_forward"]
    assert (forward["budget"], forward["budget_source"]) == (0.014, "telemetry")
    assert (
        "budgets disagree for model_forward in the telemetry: 14 ms (1 series), 20 ms (1 series); "
        "using 14 ms, the most frequent (a tie: the smallest) (--budgets chooses)"
    ) in data["notes"]
    # Padding from the inference.tokens counter: 6 real of 8 positions per request.
    padding = data["padding"]
    assert (padding["real_tokens"], padding["padded_tokens"]) == (2 * 100 * 6, 2 * 100 * 8)
    assert padding["waste"] == 0.25 and "length bucketing" in padding["advice"]
    assert padding["forward_share"] is None  # needs spans
