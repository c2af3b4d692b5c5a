"""The report's generation figures (TTFT, TPOT, tokens/s) and the prefill-bound /
decode-bound verdicts, from real spans of request() + generation() with known sleeps."""

from __future__ import annotations

import json
import time
from time import perf_counter_ns

import pytest
from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_inference import generation, request, stage
from otel_inference.report import (
    build_report,
    load_spans_file,
    render_html,
    render_json,
    render_table,
)
from otel_inference.report._stats import nearest_rank

REQUESTS = 10


def run(telemetry, tmp_path, *, queue_s: float, prefill_s: float, step_s: float, steps: int):
    """REQUESTS generations; returns the report and the test's own TTFT and TPOT figures."""
    path = tmp_path / "spans.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    ttfts, tpots = [], []
    for _ in range(REQUESTS):
        with request():
            start = perf_counter_ns()
            with stage("queue_wait"):
                time.sleep(queue_s)
            with generation(prompt_tokens=16, model="tiny") as g:
                time.sleep(prefill_s)
                g.first_token()
                first = perf_counter_ns()
                for _ in range(steps):
                    time.sleep(step_s)
                    g.tokens(1)
                last = perf_counter_ns()
        ttfts.append((first - start) / 1e9)
        tpots.append((last - first) / 1e9 / steps)
    telemetry.tracer_provider.force_flush()
    return build_report(load_spans_file(path), budgets={"ttft": 0.01}), ttfts, tpots


def test_prefill_bound(telemetry, tmp_path):
    report, ttfts, tpots = run(
        telemetry, tmp_path, queue_s=0.001, prefill_s=0.04, step_s=0.001, steps=4
    )
    summary = report.generation
    assert summary is not None and summary.requests == REQUESTS
    assert summary.ttft.count == REQUESTS
    assert summary.ttft.p50 == pytest.approx(nearest_rank(ttfts, 0.5), rel=0.05)
    assert summary.ttft.p95 == pytest.approx(nearest_rank(ttfts, 0.95), rel=0.05)
    assert summary.tpot.p50 == pytest.approx(nearest_rank(tpots, 0.5), rel=0.05)
    assert summary.ttft.budget == 0.01 and summary.ttft.status == "over"
    assert summary.tokens_per_second.p50 > 0
    assert (report.verdict.stage, report.verdict.category) == ("prefill", "prefill")
    assert "Prefill-bound" in report.verdict.text
    table = render_table(report)
    assert "TTFT" in table and "TPOT" in table and "tokens/s" in table
    assert "<h2>Generation</h2>" in render_html(report)
    data = json.loads(render_json(report))
    assert data["generation"]["ttft"]["p50"] == summary.ttft.p50
    assert report.row("prefill", parent="generate").count == REQUESTS
    assert report.row("decode", parent="generate").count == REQUESTS


def test_decode_bound(telemetry, tmp_path):
    report, _, tpots = run(
        telemetry, tmp_path, queue_s=0.001, prefill_s=0.002, step_s=0.002, steps=30
    )
    assert report.generation.tpot.p95 == pytest.approx(nearest_rank(tpots, 0.95), rel=0.05)
    assert (report.verdict.stage, report.verdict.category) == ("decode", "decode")
    assert "Decode-bound" in report.verdict.text


def test_queue_bound_beside_generation(telemetry, tmp_path):
    report, ttfts, _ = run(
        telemetry, tmp_path, queue_s=0.05, prefill_s=0.005, step_s=0.001, steps=5
    )
    assert (report.verdict.stage, report.verdict.category) == ("queue_wait", "configuration")
    # TTFT counts from the request's start: the queue is in it
    assert report.generation.ttft.p50 == pytest.approx(nearest_rank(ttfts, 0.5), rel=0.05)
    assert report.generation.ttft.p50 >= 0.055


def test_no_generation_no_block(telemetry, tmp_path):
    path = tmp_path / "spans.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    with request(), stage("tokenize"):
        time.sleep(0.001)
    telemetry.tracer_provider.force_flush()
    report = build_report(load_spans_file(path))
    assert report.generation is None
    assert "TTFT" not in render_table(report)


def test_prometheus_rows_become_the_generation_block():
    from otel_inference.report._model import StageRow
    from otel_inference.report.generation import from_rows

    rows = [
        StageRow("generate", "stage", 40, 0.5, 0.9, 1.0),
        StageRow("prefill", "nested", 40, 0.1, 0.3, 0.4, parent="generate"),
        StageRow("ttft", "nested", 40, 0.12, 0.35, 0.5, parent="generate", budget=0.3),
        StageRow("tpot", "nested", 38, 0.02, 0.03, 0.04, parent="generate"),
        StageRow("request", "request", 40, 0.6, 1.0, 1.2),
    ]
    rows[2].status = "over"
    kept, summary = from_rows(rows)
    assert [r.stage for r in kept] == ["generate", "prefill", "request"]
    assert summary.requests == 40
    assert (summary.ttft.p95, summary.ttft.budget, summary.ttft.status) == (0.35, 0.3, "over")
    assert summary.tpot.count == 38 and summary.tokens_per_second is None
