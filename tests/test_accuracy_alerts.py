"""Budget alerts on the accuracy pipelines (benchmarks/bench_alerts.py, small N).

The run's metrics, scraped through the Prometheus exporter, are replayed into
``promtool test rules`` against the shipped rules: the breaching stage's two alerts fire
and nothing else does (a stage shape and the gap shape, where the breach is
``unattributed``); with generous budgets nothing fires; a wrong expectation fails.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_accuracy import SHAPES, UNATTRIBUTED, Run, plan, run_shape
from benchmarks.bench_alerts import (
    DURATION,
    JOB,
    P95_ALERT,
    RATIO_ALERT,
    Sample,
    breaching_stage,
    check_alerts,
    design_budgets,
    expected_alerts,
    histogram_quantile,
    scrape,
)
from otel_inference.budgets import coerce_budgets
from tests.servers import require_binary

SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}
COMPUTE = SHAPES_BY_NAME["compute-bound"]
GAP = SHAPES_BY_NAME["gap (postprocess uninstrumented)"]
N_PLUS_1 = next(shape for shape in SHAPES if shape.calls)
# Seed 10 plans 9 (compute-bound) and 8 (gap) spikes in 80 requests: over 5%, not on it.
N, SEED = 80, 10


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="module")
def compute_run() -> Run:
    return run_shape(COMPUTE, n=N, seed=SEED, budgets=design_budgets(COMPUTE))


@pytest.mark.parametrize("shape", [COMPUTE, GAP], ids=lambda s: s.name)
def test_the_seeded_plan_breaches_more_than_five_percent(shape):
    budget = coerce_budgets(design_budgets(shape))[breaching_stage(shape)]
    spiked = [r[shape.tail_stage] / 1e9 > budget for r in plan(shape, N, SEED)]
    assert sum(spiked) / N >= 0.1
    # ... and the generous budgets cover every planned request.
    generous = coerce_budgets(design_budgets(shape, breach=False))
    assert all(
        r[name] / 1e9 < generous[UNATTRIBUTED if name == shape.uninstrumented else name]
        for r in plan(shape, N, SEED)
        for name in shape.medians()
    )


def test_the_scrape_carries_prometheus_names(compute_run):
    samples = scrape(compute_run.exposition)
    names = {s.name for s in samples}
    assert {
        f"{DURATION}_bucket",
        f"{DURATION}_count",
        "inference_stage_budget_breaches_total",
        "inference_stage_budget_seconds",
    } <= names
    assert all(s.labels["job"] == JOB for s in samples)
    forward = [s for s in samples if s.labels.get("inference_stage") == "model_forward"]
    assert {s.labels["le"] for s in forward if "le" in s.labels} >= {"0.012"}  # the budget


def test_histogram_quantile_mirrors_prometheus():
    # The hand-written rule test's model_forward: all of 100 values in (10 ms, 14 ms].
    buckets = {"0.01": 0.0, "0.014": 100.0, "0.015": 100.0, "+Inf": 100.0}
    samples = [
        Sample(f"{DURATION}_bucket", {"inference_stage": "s", "le": le}, value, True)
        for le, value in buckets.items()
    ]
    assert histogram_quantile(0.95, samples, "s") == pytest.approx(0.0138)


def test_the_heavy_stage_alone_fires(compute_run, promtool):
    check = check_alerts(compute_run, expected_alerts(COMPUTE), promtool)
    assert check.expected == {(P95_ALERT, "model_forward"), (RATIO_ALERT, "model_forward")}
    assert check.ok, check.output


def test_uninstrumented_heavy_work_fires_for_unattributed(promtool):
    run = run_shape(GAP, n=N, seed=SEED, budgets=design_budgets(GAP))
    check = check_alerts(run, expected_alerts(GAP), promtool)
    assert check.expected == {(P95_ALERT, UNATTRIBUTED), (RATIO_ALERT, UNATTRIBUTED)}
    assert check.ok, check.output


def test_a_stage_over_budget_across_its_calls_fires(promtool):
    """Feature hydration in 6 calls: every single call stays under the 12 ms budget,
    the spiked requests' total does not. A budget is per request, so it fires."""
    budget = coerce_budgets(design_budgets(N_PLUS_1))["feature_hydration"]
    planned = plan(N_PLUS_1, N, SEED)
    calls = N_PLUS_1.calls["feature_hydration"]
    assert all(r["feature_hydration"] / calls / 1e9 < budget for r in planned)
    assert sum(r["feature_hydration"] / 1e9 > budget for r in planned) / N >= 0.1
    run = run_shape(N_PLUS_1, n=N, seed=SEED, budgets=design_budgets(N_PLUS_1))
    check = check_alerts(run, expected_alerts(N_PLUS_1), promtool)
    assert check.expected == {(P95_ALERT, "feature_hydration"), (RATIO_ALERT, "feature_hydration")}
    assert check.ok, check.output


def test_generous_budgets_fire_nothing(promtool):
    run = run_shape(COMPUTE, n=N, seed=SEED, budgets=design_budgets(COMPUTE, breach=False))
    check = check_alerts(run, expected_alerts(COMPUTE, breach=False), promtool)
    assert check.expected == frozenset()
    assert check.ok, check.output


@pytest.mark.parametrize(
    "expected",
    [
        {(P95_ALERT, "queue_wait"), (RATIO_ALERT, "queue_wait")},  # the wrong stage
        {(P95_ALERT, "model_forward")},  # one alert short: the breach ratio one is extra
        set(),  # nothing expected
    ],
    ids=["wrong stage", "missing alert", "none"],
)
def test_the_comparison_can_fail(compute_run, promtool, expected):
    check = check_alerts(compute_run, expected, promtool)
    assert not check.ok
    assert "FAILED" in check.output
