"""A stage is what the request spent in it: per-request accounting, compressed and capped spans."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import orjson
import pytest

from otel_inference import ConfigurationError, configure, get_recorder, request, stage
from otel_inference.instrumentation.serializers import SerializersInstrumentor


def _points(telemetry, name="inference.stage.duration"):
    return {
        (
            p.attributes["inference.stage"],
            p.attributes.get("inference.stage.parent"),
            p.attributes.get("error.type"),
        ): p
        for p in telemetry.metric_points(name)
    }


def _breaches(telemetry):
    return {
        p.attributes["inference.stage"]: p.value
        for p in telemetry.metric_points("inference.stage.budget.breaches")
    }


def test_three_calls_under_budget_each_breach_once_per_request(telemetry):
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets="feature_hydration=5ms")
    for _ in range(4):
        with request():
            for _ in range(3):
                with stage("feature_hydration"):
                    time.sleep(0.002)
    point = _points(telemetry)[("feature_hydration", None, None)]
    assert point.count == 4  # one value per request, not one per call
    assert point.sum / 4 >= 0.006  # each request spent >= 6 ms in the stage
    assert _breaches(telemetry) == {"feature_hydration": 4}
    calls = _points(telemetry, "inference.stage.calls")[("feature_hydration", None, None)]
    assert (calls.count, calls.sum, calls.min, calls.max) == (4, 12, 3, 3)
    # Spans: each request's calls are compressed (2 ms < 50 ms, each under budget;
    # a call slowed past 5 ms by a busy machine gets its own span), and the stage's
    # last span in each request carries the request's verdict.
    by_trace: dict[int, list] = {}
    for span in telemetry.spans("feature_hydration"):
        by_trace.setdefault(span.context.trace_id, []).append(span)
    assert len(by_trace) == 4
    for spans in by_trace.values():
        assert sum(s.attributes.get("inference.stage.calls", 1) for s in spans) == 3
        *earlier, last = sorted(spans, key=lambda s: s.end_time)
        assert last.attributes["inference.budget.exceeded"] is True
        assert all("inference.budget.exceeded" not in s.attributes for s in earlier)
    compressed = [
        s for s in telemetry.spans("feature_hydration") if "inference.stage.calls" in s.attributes
    ]
    for span in compressed:
        calls = span.attributes["inference.stage.calls"]
        assert span.attributes["inference.stage.calls.duration"] >= 0.002 * calls
    requests = telemetry.spans("inference.request")
    assert all(
        tuple(r.attributes["inference.budget.exceeded.stages"]) == ("feature_hydration",)
        for r in requests
    )


def test_stage_within_budget_per_request_is_not_a_breach(telemetry):
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets="feature_hydration=50ms")
    with request():
        for _ in range(3):
            with stage("feature_hydration"):
                time.sleep(0.001)
    assert _breaches(telemetry) == {}
    (span,) = telemetry.spans("feature_hydration")
    assert span.attributes["inference.budget.exceeded"] is False


def test_concurrent_calls_count_their_union_not_their_sum(telemetry):
    from otel_inference.report._stats import union_length

    intervals = []

    async def handler():
        async def call():
            async with stage("feature_hydration"):
                start = time.perf_counter_ns()
                await asyncio.sleep(0.010)
                intervals.append((start, time.perf_counter_ns()))

        with request():
            await asyncio.gather(call(), call())

    asyncio.run(handler())
    point = _points(telemetry)[("feature_hydration", None, None)]
    assert point.count == 1
    union, total = union_length(intervals) / 1e9, sum(e - s for s, e in intervals) / 1e9
    assert union <= point.sum <= union + 0.002  # ~10 ms, not 20
    assert point.sum < total
    calls = _points(telemetry, "inference.stage.calls")[("feature_hydration", None, None)]
    assert calls.sum == 2


def test_threads_in_one_request_are_unioned(telemetry):
    import contextvars

    from otel_inference.report._stats import union_length

    intervals = []
    with request():

        def work():
            with stage("preprocess"):
                start = time.perf_counter_ns()
                time.sleep(0.010)
                intervals.append((start, time.perf_counter_ns()))

        # Each thread runs in a copy of the request's context, as executors are given it.
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(work,)) for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    point = _points(telemetry)[("preprocess", None, None)]
    assert point.count == 1
    union, total = union_length(intervals) / 1e9, sum(e - s for s, e in intervals) / 1e9
    # The union of the three calls (each stage call encloses its measured interval),
    # not their sum: a few hundred microseconds of enter/exit at most on top.
    assert union <= point.sum <= union + 0.002
    assert point.sum < total


def test_failing_call_gets_its_own_span_while_neighbours_stay_compressed(telemetry):
    with request():
        for i in range(10):
            try:
                with stage("serialize"):
                    if i == 4:
                        raise KeyError("user:42")
            except KeyError:
                pass
    spans = sorted(telemetry.spans("serialize"), key=lambda s: s.start_time)
    failed = [s for s in spans if s.attributes.get("error.type") == "KeyError"]
    assert len(failed) == 1
    assert "inference.stage.calls" not in failed[0].attributes
    compressed = [s.attributes.get("inference.stage.calls", 1) for s in spans if s not in failed]
    assert sum(compressed) == 9  # every other call is in a compressed span
    assert len(spans) <= 3  # before, the failure, after
    # Metrics: one record for the request, labelled with the failure.
    points = _points(telemetry)
    assert ("serialize", None, "KeyError") in points
    assert points[("serialize", None, "KeyError")].count == 1


def test_slow_or_over_budget_calls_are_not_compressed(telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD", "5ms")
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets="tokenize=1s")
    with request():
        with stage("tokenize"):
            pass
        with stage("tokenize"):
            time.sleep(0.008)  # over the compression threshold
        with stage("tokenize"):
            pass
    spans = telemetry.spans("tokenize")
    assert len(spans) == 3
    assert all("inference.stage.calls" not in s.attributes for s in spans)


def test_span_cap_counts_calls_without_spanning_them(telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_MAX_SPANS_PER_REQUEST", "5")
    monkeypatch.setenv("OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD", "0ms")  # no compression
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets={})
    with request():
        for _ in range(12):
            with stage("feature_hydration"):
                pass
    assert len(telemetry.spans("feature_hydration")) == 5
    (request_span,) = telemetry.spans("inference.request")
    assert request_span.attributes["inference.spans.dropped"] == 7
    calls = _points(telemetry, "inference.stage.calls")[("feature_hydration", None, None)]
    assert calls.sum == 12  # counts and time are never lost, only per-call detail


def test_bad_request_settings_are_rejected_at_configuration(telemetry, monkeypatch):
    for name, value in (
        ("OTEL_INFERENCE_MAX_SPANS_PER_REQUEST", "lots"),
        ("OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD", "50"),
        ("OTEL_INFERENCE_STAGE_CALL_DURATION", "maybe"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigurationError, match=name):
            configure(telemetry.tracer_provider, telemetry.meter_provider, budgets={})
        monkeypatch.delenv(name)


def test_outside_a_request_every_call_is_recorded(telemetry):
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets="tokenize=30ms")
    for sleep in (0, 0.040, 0):
        with stage("tokenize"):
            time.sleep(sleep)
    point = _points(telemetry)[("tokenize", None, None)]
    assert point.count == 3
    assert _breaches(telemetry) == {"tokenize": 1}
    spans = telemetry.spans("tokenize")
    assert len(spans) == 3
    assert sorted(s.attributes["inference.budget.exceeded"] for s in spans) == [False, False, True]
    assert telemetry.metric_points("inference.stage.calls") == []


def test_nested_stages_are_tallied_under_their_parent(telemetry):
    with request():
        for _ in range(2):
            with stage("preprocess"):
                for _ in range(3):
                    with stage("tokenize"):
                        pass
    points = _points(telemetry)
    assert points[("preprocess", None, None)].count == 1
    assert points[("tokenize", "preprocess", None)].count == 1
    calls = _points(telemetry, "inference.stage.calls")
    assert calls[("tokenize", "preprocess", None)].sum == 6


def test_per_call_histogram_is_opt_in(telemetry, monkeypatch):
    with request():
        for _ in range(3):
            with stage("feature_hydration"):
                pass
    assert telemetry.metric_points("inference.stage.call.duration") == []
    monkeypatch.setenv("OTEL_INFERENCE_STAGE_CALL_DURATION", "true")
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets={})
    with request():
        for _ in range(3):
            with stage("feature_hydration"):
                pass
    (point,) = telemetry.metric_points("inference.stage.call.duration")
    assert point.count == 3


def test_late_record_after_the_request_ended_is_a_single_call(telemetry):
    # A CUDA-timed stage is recorded when its events resolve, maybe after the request.
    recorder = get_recorder()
    with request():
        scope = recorder.start("model_forward")
        scope.exit_context()
    scope.record(3_000_000)
    point = _points(telemetry)[("model_forward", None, None)]
    assert point.count == 1
    assert point.sum == pytest.approx(0.003)
    assert len(telemetry.spans("model_forward")) == 1


def test_record_interval_joins_the_request_tally(telemetry):
    recorder = get_recorder()
    with request():
        context = recorder.capture()
        now = time.perf_counter_ns()
        recorder.record_interval("queue_wait", now - 4_000_000, now - 2_000_000, context=context)
        recorder.record_interval("queue_wait", now - 3_000_000, now - 1_000_000, context=context)
    point = _points(telemetry)[("queue_wait", None, None)]
    assert point.count == 1
    assert point.sum == pytest.approx(0.003)  # union of [-4, -2] and [-3, -1] ms
    assert len(telemetry.spans("queue_wait")) == 2


def test_500_small_serialisations_make_a_handful_of_spans(telemetry):
    instrumentor = SerializersInstrumentor()
    instrumentor.instrument(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )
    try:
        items = [{"id": i, "score": i / 7} for i in range(500)]
        with request():
            bodies = [orjson.dumps(item) for item in items]
    finally:
        instrumentor.uninstrument()
    assert bodies == [orjson.dumps(item) for item in items]  # results untouched
    spans = telemetry.spans("serialize")
    assert 1 <= len(spans) <= 8
    assert sum(s.attributes.get("inference.stage.calls", 1) for s in spans) == 500
    calls = _points(telemetry, "inference.stage.calls")[("serialize", None, None)]
    assert calls.sum == 500


def test_interval_union_stays_bounded_and_exact_for_ordered_calls():
    from otel_inference.accounting import IntervalUnion

    union = IntervalUnion()
    for i in range(20_000):  # sequential 1 us calls, 1 us apart, with one overlap each
        union.add(i * 2_000, i * 2_000 + 1_000)
        union.add(i * 2_000 + 500, i * 2_000 + 1_000)
    assert len(union.intervals) <= 4097
    assert union.total_ns() == 20_000 * 1_000


def test_union_length_is_the_number_of_covered_points():
    """``union_ns`` (a request's covered time) and ``IntervalUnion`` (a stage's time and
    calls), settled or not, against counting the covered points one by one."""
    from otel_inference.accounting import MAX_UNSETTLED_INTERVALS, IntervalUnion, union_ns

    rng = random.Random(20)
    for _ in range(500):
        starts = [rng.randrange(0, 60) for _ in range(rng.randrange(0, 9))]
        intervals = [(lo, lo + rng.randrange(-3, 15)) for lo in starts]  # some empty, reversed
        start_ns, end_ns = sorted(rng.randrange(-5, 80) for _ in range(2))
        points = {p for lo, hi in intervals for p in range(lo, hi)}
        assert union_ns(intervals, start_ns, end_ns) == sum(start_ns <= p < end_ns for p in points)
        union = IntervalUnion()
        for lo, hi in intervals:
            union.add(lo, max(lo, hi))  # calls never end before they start
        assert (union.total_ns(), union.count) == (len(points), len(intervals))
    union = IntervalUnion()
    calls = 3 * MAX_UNSETTLED_INTERVALS + 5
    for i in range(calls):  # ordered calls with gaps: settling keeps time and count exact
        union.add(i * 10, i * 10 + 7)
    assert union.settled is not None and len(union.intervals) <= MAX_UNSETTLED_INTERVALS
    assert (union.total_ns(), union.count) == (calls * 7, calls)


def test_metrics_spans_and_report_agree_on_per_request_time(tmp_path):
    from opentelemetry.exporter.otlp.json.file import FileSpanExporter
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from otel_inference.report import build_report, load_spans_file
    from tests.telemetry import Telemetry

    telemetry = Telemetry()
    path = tmp_path / "spans.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    recorder = get_recorder()
    recorder.configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets="feature_hydration=5ms"
    )
    try:
        for _ in range(20):
            with request():
                for _ in range(3):
                    with stage("feature_hydration"):
                        time.sleep(0.002)
        telemetry.tracer_provider.shutdown()
        point = _points(telemetry)[("feature_hydration", None, None)]
        report = build_report(load_spans_file(path), budgets={"feature_hydration": 0.005})
    finally:
        recorder.configure(budgets={})
        telemetry.meter_provider.shutdown()
    row = next(r for r in report.rows if r.label == "feature_hydration")
    assert (row.count, point.count) == (20, 20)
    assert _breaches(telemetry) == {"feature_hydration": 20}
    assert row.status == "over"
    # The report's per-request mean equals the histogram's (same calls, same clock).
    assert row.mean == pytest.approx(point.sum / point.count, rel=0.02)


def test_zero_code_asgi_requests_are_accounted_per_request(telemetry):
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from starlette.testclient import TestClient

    from otel_inference.instrumentation.runtime import RuntimeInstrumentor

    app = FastAPI()

    @app.get("/items")
    async def items() -> dict:
        for _ in range(4):
            with stage("feature_hydration"):
                time.sleep(0.001)
        return {"n": 4}

    runtime = RuntimeInstrumentor()
    runtime.instrument()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.tracer_provider)
    try:
        with TestClient(app) as client:
            for _ in range(5):
                assert client.get("/items").json() == {"n": 4}
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
        runtime.uninstrument()
    point = _points(telemetry)[("feature_hydration", None, None)]
    assert point.count == 5  # one per HTTP request, not one per call
    assert point.sum >= 5 * 0.004
    calls = _points(telemetry, "inference.stage.calls")[("feature_hydration", None, None)]
    assert (calls.count, calls.sum) == (5, 20)
    # Each request's calls share one span under its SERVER span.
    spans = telemetry.spans("feature_hydration")
    assert len(spans) == 5
    servers = {s.context.span_id: s for s in telemetry.spans() if s.kind.name == "SERVER"}
    assert all(span.parent.span_id in servers for span in spans)
    assert all(span.attributes["inference.stage.calls"] == 4 for span in spans)
