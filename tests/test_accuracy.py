"""The report against a pipeline with known stage costs (benchmarks/bench_accuracy.py, small N).

The truth is what the pipeline measured inside each stage; tolerances are the
issue's: p50/p95 within 5% (or 0.2 ms), share of tail within 3 points, the verdict
names the heavy stage, an uninstrumented stage's work shows up as ``unattributed``.
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.bench_accuracy import SHAPES, UNATTRIBUTED, evaluate, plan, run_shape

SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}


def test_plan_is_seeded_and_has_its_heavy_tail():
    shape = SHAPES_BY_NAME["compute-bound"]
    assert plan(shape, 50, seed=3) == plan(shape, 50, seed=3)
    forward = sorted(r["model_forward"] for r in plan(shape, 400, seed=3))
    assert forward[-1] > 3 * forward[len(forward) // 2]  # the spikes are there


@pytest.mark.parametrize(
    "name",
    [
        "compute-bound",
        "gap (postprocess uninstrumented)",
        "N+1 (6 feature lookups, 20 per-item serialisations)",
    ],
)
def test_report_matches_the_measured_truth(name):
    shape = SHAPES_BY_NAME[name]
    run = run_shape(shape, n=80, seed=21)
    evaluation = evaluate(run)
    assert evaluation.failures() == []
    assert run.report.verdict.stage == shape.expected
    if shape.uninstrumented:
        assert shape.uninstrumented not in {row.stage for row in run.report.rows}
        assert run.report.row(UNATTRIBUTED).p50 >= evaluation.gap_work_p50 * 0.95


def test_the_comparison_can_fail():
    """A wrong expectation and a shifted truth are both caught."""
    run = run_shape(SHAPES_BY_NAME["compute-bound"], n=40, seed=5)
    wrong_verdict = dataclasses.replace(run, shape=SHAPES_BY_NAME["queue-bound"])
    assert not evaluate(wrong_verdict).verdict_ok
    inflated = [{k: v * 2 for k, v in t.items()} for t in run.truths]
    failures = evaluate(dataclasses.replace(run, truths=inflated)).failures()
    assert any(f.startswith("model_forward p50") for f in failures)
