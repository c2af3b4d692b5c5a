"""The report's numbers on spans with known durations (real SDK, OTLP JSON Lines file).

Each shape has 20 requests unless said otherwise, so with nearest-rank
percentiles p50 is the 10th smallest value, p95 the 19th and p99 the 20th, and
the tail (requests at or above the end-to-end p95) is the two slowest requests.
Every expected figure below is worked out by hand from the layout.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from otel_inference import request, stage
from otel_inference.batching import ThreadBatcher
from otel_inference.report import (
    ReportError,
    build_report,
    load_spans_file,
    render_json,
    render_table,
)
from otel_inference.report._stats import nearest_rank, union_length
from tests.apps.report_spans import GAP, MS, SpanWriter, Step

EXACT = {"rel": 1e-12, "abs": 1e-15}
DOLLARS_PER_SECOND = 0.001  # --cost-per-hour 3.6


def ms(value: float) -> float:
    return value / 1000


@pytest.fixture
def writer(tmp_path: Path) -> SpanWriter:
    return SpanWriter(tmp_path / "spans.jsonl")


def report_of(writer: SpanWriter, **options):
    return build_report(load_spans_file(writer.close()), **options)


def test_nearest_rank_and_union():
    values = list(range(1, 21))
    assert nearest_rank(values, 0.50) == 10
    assert nearest_rank(values, 0.95) == 19
    assert nearest_rank(values, 0.99) == 20
    assert nearest_rank(list(range(1, 101)), 0.95) == 95
    assert nearest_rank([7], 0.99) == 7
    assert union_length([(0, 10), (5, 20), (30, 31), (40, 40)]) == 21


def test_queue_bound(writer):
    waits = [*range(1, 19), 40, 60]  # ms; the two slowest requests wait 40 and 60 ms
    for wait in waits:
        writer.request(
            [
                ("queue_wait", wait),
                ("tokenize", 2),
                ("model_forward", 10),
                (GAP, 1),
                ("serialize", 1),
            ]
        )
    report = report_of(
        writer, budgets={"queue_wait": 0.020, "model_forward": 0.014}, cost_per_hour=3.6
    )

    assert report.requests == 20
    assert [r.label for r in report.rows] == [
        "queue_wait",
        "tokenize",
        "model_forward",
        "serialize",
        "unattributed",
        "request",
    ]
    queue = report.row("queue_wait")
    assert (queue.count, queue.p50, queue.p95, queue.p99) == (20, ms(10), ms(40), ms(60))
    end_to_end = report.row("request")
    assert (end_to_end.p50, end_to_end.p95, end_to_end.p99) == (ms(24), ms(54), ms(74))
    assert report.tail_threshold == ms(54) and report.tail_requests == 2

    # Tail: the 54 ms and 74 ms requests.
    assert queue.tail_share == pytest.approx((40 / 54 + 60 / 74) / 2, **EXACT)
    assert report.row("model_forward").tail_share == pytest.approx((10 / 54 + 10 / 74) / 2, **EXACT)
    assert report.row("unattributed").tail_share == pytest.approx((1 / 54 + 1 / 74) / 2, **EXACT)
    shares = [r.tail_share for r in report.rows if r.kind in ("stage", "unattributed")]
    assert sum(shares) == pytest.approx(1.0, **EXACT)  # sequential stages: the tail adds up

    # Budgets: p95 against the budget.
    assert (queue.budget, queue.status) == (0.020, "over")
    assert report.row("model_forward").status == "ok"
    assert report.row("tokenize").status is None

    # Cost: time x $/hour / 3600, mean per request.
    assert queue.cost_per_request == pytest.approx(
        (sum(range(1, 19)) + 100) / 20 / 1000 * DOLLARS_PER_SECOND, **EXACT
    )
    assert report.row("unattributed").cost_per_request == pytest.approx(
        ms(1) * DOLLARS_PER_SECOND, **EXACT
    )
    mean_request = sum(w + 14 for w in waits) / 20 / 1000
    assert report.cost_per_request == pytest.approx(mean_request * DOLLARS_PER_SECOND, **EXACT)

    assert (report.verdict.stage, report.verdict.category) == ("queue_wait", "configuration")
    assert "batch window" in report.verdict.text and "78%" in report.verdict.lines[0]


def test_feature_bound_with_cache_hit_ratio(writer):
    lookups = {"inference.cache.hits": 7, "inference.cache.misses": 3}
    for fetch in [2] * 18 + [30, 45]:
        writer.request(
            [
                ("parse", 1),
                Step("feature_hydration", fetch, lookups),
                ("tokenize", 2),
                ("model_forward", 8),
                ("serialize", 1),
            ],
            declare_unattributed=False,  # a web framework's SERVER span: computed
        )
    report = report_of(writer)

    features = report.row("feature_hydration")
    assert (features.p50, features.p95, features.p99) == (ms(2), ms(30), ms(45))
    assert features.tail_share == pytest.approx((30 / 42 + 45 / 57) / 2, **EXACT)
    gap = report.row("unattributed")
    assert (gap.count, gap.p99, gap.tail_share) == (20, 0.0, 0.0)
    assert report.cache_hit_ratio == pytest.approx(0.7) and report.cache_lookups == 200
    assert (report.verdict.stage, report.verdict.category) == ("feature_hydration", "cache")
    assert "hit ratio is 70% over 200 lookups" in report.verdict.text
    assert report.row("parse").count == 20


def test_compute_bound_with_nested_stage(writer):
    for forward in [10] * 18 + [40, 50]:
        writer.request(
            [
                ("queue_wait", 1),
                ("tokenize", 2),
                Step("model_forward", forward, nested=[("attention", 1, 5)]),
                ("serialize", 1),
            ]
        )
    report = report_of(writer, cost_per_hour=3.6)

    nested = report.row("attention", parent="model_forward")
    assert (nested.kind, nested.count, nested.p95, nested.tail_share) == ("nested", 20, ms(5), None)
    # Nested time is inside model_forward's: it takes no share of its own.
    forward = report.row("model_forward")
    assert forward.tail_share == pytest.approx((40 / 44 + 50 / 54) / 2, **EXACT)
    shares = [r.tail_share for r in report.rows if r.kind in ("stage", "unattributed")]
    assert sum(shares) == pytest.approx(1.0, **EXACT)
    # The request's cost counts top-level stages once; nested rows are informational.
    assert report.cost_per_request == pytest.approx(
        sum(r.cost_per_request for r in report.rows if r.kind in ("stage", "unattributed")),
        **EXACT,
    )
    assert nested.cost_per_request == pytest.approx(ms(5) * DOLLARS_PER_SECOND, **EXACT)
    assert (report.verdict.stage, report.verdict.category) == ("model_forward", "model")
    assert report.verdict.lines[1].startswith("Only now the model")


def test_transfer_bound_counts_both_directions(writer):
    for h2d, d2h in [(2, 2)] * 18 + [(14, 12), (16, 14)]:
        writer.request(
            [
                ("tokenize", 1),
                ("h2d_transfer", h2d),
                ("model_forward", 15),
                ("d2h_transfer", d2h),
                ("serialize", 1),
            ]
        )
    report = report_of(writer)

    h2d = report.row("h2d_transfer").tail_share
    d2h = report.row("d2h_transfer").tail_share
    forward = report.row("model_forward").tail_share
    assert h2d == pytest.approx((14 / 43 + 16 / 47) / 2, **EXACT)
    assert forward == pytest.approx((15 / 43 + 15 / 47) / 2, **EXACT)
    # The forward alone outweighs each copy, but the copies together outweigh it.
    assert forward > h2d > d2h and h2d + d2h > forward
    assert (report.verdict.stage, report.verdict.category) == ("h2d_transfer", "runtime")
    assert "with d2h_transfer" in report.verdict.lines[0]
    assert "pin host memory" in report.verdict.text


def test_big_unattributed_gap_is_computed_without_the_attribute(writer):
    for gap in [1] * 18 + [50, 80]:
        writer.request(
            [("tokenize", 2), (GAP, gap), ("model_forward", 5), ("serialize", 1)],
            declare_unattributed=False,
        )
    report = report_of(writer)

    row = report.row("unattributed")
    assert (row.p50, row.p95, row.p99) == (ms(1), ms(50), ms(80))
    assert row.tail_share == pytest.approx((50 / 58 + 80 / 88) / 2, **EXACT)
    assert (report.verdict.stage, report.verdict.category) == ("unattributed", "instrumentation")
    assert "Instrument the gap" in report.verdict.text


def test_declared_unattributed_is_used_when_present(writer):
    # The request() span's own figure wins over the span arithmetic.
    for _ in range(4):
        root = writer.open_request(writer.clock, attributes={})
        start = writer.clock
        writer.stage(root, "tokenize", start, start + 2 * MS)
        root.set_attribute("inference.unattributed.duration", 0.003)
        root.end(end_time=start + 10 * MS)
        writer.clock += 1000 * MS
    report = report_of(writer)
    assert report.row("unattributed").p50 == 0.003


def test_batch_shared_by_members_costs_each_its_share(writer):
    writer.batch([30, 10, 5, 1], forward_ms=20, after_ms=1)
    writer.batch([30, 10, 5, 1], forward_ms=20, after_ms=1)
    writer.batch([4, 3, 2, 1], forward_ms=20, after_ms=1, size=5)  # one member unsampled
    report = report_of(writer, cost_per_hour=3.6)

    assert report.requests == 12
    forward = report.row("batch")
    # Every member experienced the whole batch, though only one trace holds its span.
    assert (forward.count, forward.p50, forward.p99) == (12, ms(20), ms(20))
    # Cost: 20 ms / 4 for the members of full batches, 20 ms / 5 in the third.
    assert forward.cost_per_request == pytest.approx(
        (8 * 20 / 4 + 4 * 20 / 5) / 12 / 1000 * DOLLARS_PER_SECOND, **EXACT
    )
    queue = report.row("queue_wait")
    assert queue.cost_per_request == pytest.approx(
        (2 * 46 + 10) / 12 / 1000 * DOLLARS_PER_SECOND, **EXACT
    )
    # Tail: p95 of 12 is the 12th value, 51 ms; both 51 ms requests are in it.
    assert report.tail_threshold == ms(51) and report.tail_requests == 2
    assert queue.tail_share == pytest.approx(30 / 51, **EXACT)
    assert forward.tail_share == pytest.approx(20 / 51, **EXACT)
    assert (report.verdict.stage, report.verdict.category) == ("queue_wait", "configuration")


def test_batch_found_through_member_links_only(writer):
    # No links on the batch span: the members' queue_wait spans (share 1/4) lead to it.
    writer.batch([8, 6, 4, 2], forward_ms=12, link_members=False)
    report = report_of(writer, cost_per_hour=3.6)
    forward = report.row("batch")
    assert forward.count == 4
    assert forward.cost_per_request == pytest.approx(12 / 4 / 1000 * DOLLARS_PER_SECOND, **EXACT)


def test_server_span_around_request_is_one_request(writer):
    # A web framework's SERVER span holding a request() span: the outer one is the
    # request (end to end), counted once; its uncovered time is computed.
    tracer = writer.tracer
    for _ in range(3):
        start = writer.clock
        server = tracer.start_span("POST /embed", kind=SpanKind.SERVER, start_time=start)
        inner = tracer.start_span(
            "inference.request",
            context=trace.set_span_in_context(server),
            start_time=start + 1 * MS,
            attributes={"inference.unattributed.duration": 0.0},
        )
        writer.stage(inner, "model_forward", start + 1 * MS, start + 9 * MS)
        inner.end(end_time=start + 9 * MS)
        server.end(end_time=start + 12 * MS)
        writer.clock += 1000 * MS
    writer.plain("GET /healthz", 1)  # a SERVER span with no stage: not a request
    report = report_of(writer)
    assert report.requests == 3
    assert report.row("request").p50 == ms(12)
    assert report.row("unattributed").p50 == ms(4)


def test_cold_start_requests_can_be_excluded(writer):
    writer.request([("model_forward", 500)], attributes={"inference.cold_start": True})
    # Zero-code: the web framework's SERVER span is not ours; its stages carry the flag.
    writer.request(
        [Step("model_forward", 300, {"inference.cold_start": True})], declare_unattributed=False
    )
    for _ in range(5):
        writer.request([("model_forward", 10)])
    path = writer.close()
    assert build_report(load_spans_file(path)).row("model_forward").p99 == ms(500)
    warm = build_report(load_spans_file(path), exclude_cold_start=True)
    assert warm.requests == 5 and warm.row("model_forward").p99 == ms(10)
    assert "2 cold-start request(s) excluded" in warm.notes


def test_stage_spans_outside_requests_are_left_out_and_said(writer):
    writer.request([("tokenize", 2)])
    start = writer.clock
    writer.tracer.start_span(
        "model_forward", start_time=start, attributes={"inference.stage": "model_forward"}
    ).end(end_time=start + 5 * MS)  # warm-up: a root stage span
    report = report_of(writer)
    assert [r.stage for r in report.rows] == ["tokenize", "unattributed", "request"]
    assert any("1 stage span(s) outside any request" in note for note in report.notes)


def test_spans_without_our_attributes_are_rejected(writer):
    writer.plain("GET /", 3)
    with pytest.raises(ReportError, match=r"carries 'inference\.stage'"):
        report_of(writer)


def test_stage_spans_without_any_request_are_rejected(writer):
    start = writer.clock
    writer.tracer.start_span(
        "tokenize", start_time=start, attributes={"inference.stage": "tokenize"}
    ).end(end_time=start + MS)
    with pytest.raises(ReportError, match="no request span"):
        report_of(writer)


def test_span_file_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_spans_file(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ReportError, match="is empty"):
        load_spans_file(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\nnot json\n{"resourceSpans": []}\n')
    with pytest.raises(ReportError, match="line 2 is not an OTLP JSON trace export"):
        load_spans_file(bad)


def test_partial_last_line_is_skipped(writer):
    for _ in range(3):
        writer.request([("tokenize", 2)])
    path = writer.close()
    with path.open("a") as out:
        out.write('{"resourceSpans": [{"scopeSp')  # the exporter is mid-write
    assert build_report(load_spans_file(path)).requests == 3


def test_table_and_json_renderings(writer):
    for wait in [*range(1, 19), 40, 60]:
        writer.request([("queue_wait", wait), ("model_forward", 10)])
    report = report_of(writer, budgets={"queue_wait": 0.020}, cost_per_hour=3.6)

    table = render_table(report)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    assert header.split() == [
        "stage", "count", "p50", "ms", "p95", "ms", "p99", "ms", "tail", "share",
        "budget", "ms", "status", "$/1M", "req",
    ]  # fmt: skip
    queue = next(line for line in lines if line.startswith("queue_wait"))
    assert queue.split()[:8] == [
        "queue_wait",
        "20",
        "10.0",
        "40.0",
        "60.0",
        "82.9%",
        "20.0",
        "over",
    ]
    # Aligned: every row as wide as its header, right-aligned numbers end together.
    rows = [line for line in lines if line.split() and line.split()[0] in ("queue_wait", "request")]
    assert {len(line) for line in rows} == {len(header)}
    assert table.isascii()
    assert "Verdict: queue_wait dominates the tail" in table

    data = json.loads(render_json(report))
    assert data["schema"] == "otel-inference-report/2"
    assert data["verdict"]["stage"] == "queue_wait"
    by_label = {row["label"]: row for row in data["rows"]}
    assert by_label["queue_wait"]["p95"] == 0.040 and by_label["queue_wait"]["status"] == "over"
    assert by_label["request"]["count"] == 20


def test_real_batcher_spans(telemetry, tmp_path):
    """The spans our own request(), stage() and ThreadBatcher write are read as designed:
    the batch span once per member, its nested stage once per batch, cost split by size."""
    path = tmp_path / "real.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))

    def forward(items):
        with stage("tokenize"):
            time.sleep(0.001)
        time.sleep(0.005)
        return items

    batcher = ThreadBatcher(forward, max_batch_size=4, max_wait_ms=5, name="encoder")

    def one(item: int) -> None:
        with request():
            with stage("preprocess"):
                time.sleep(0.001)
            batcher(item)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    telemetry.tracer_provider.force_flush()

    report = build_report(load_spans_file(path), cost_per_hour=3.6)
    batches = [s for s in telemetry.spans("batch") if s.links]
    assert report.requests == 8
    assert report.row("batch").count == 8
    assert report.row("queue_wait").count == 8
    assert report.row("tokenize", parent="batch").count == len(batches)
    assert sum(s.attributes["inference.batch.size"] for s in batches) == 8
    batch_ns = sum(s.end_time - s.start_time for s in batches)  # each batch counted once
    assert report.row("batch").cost_per_request == pytest.approx(
        batch_ns / 1e9 / 8 * DOLLARS_PER_SECOND, **EXACT
    )
    declared = sorted(
        round(s.attributes["inference.unattributed.duration"] * 1e9)
        for s in telemetry.spans("inference.request")
    )
    assert report.row("unattributed").p99 == declared[-1] / 1e9


def test_gc_pauses_in_the_tail_become_a_sentence(telemetry, tmp_path):
    """Issue 11's GC totals reach the report: tail requests paused by full
    collections are named, with the remedy."""
    import gc

    from otel_inference.instrumentation.runtime import RuntimeInstrumentor

    path = tmp_path / "gc.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    heap = [[index] for index in range(300_000)]  # a full collection walks all of it
    RuntimeInstrumentor().instrument(cold_start_requests=0)
    try:
        for index in range(40):
            with request(), stage("model_forward"):
                time.sleep(0.002)
                if index % 20 == 19:  # two requests hit a full collection
                    gc.collect()
    finally:
        RuntimeInstrumentor().uninstrument()
        del heap
    telemetry.tracer_provider.force_flush()

    report = build_report(load_spans_file(path))
    (note,) = [n for n in report.notes if n.startswith("GC:")]
    assert "paused by garbage collection" in note and "gc.freeze()" in note
    assert report.tail_requests >= 2


def test_a_stage_is_what_each_request_spent_in_it(writer):
    # Three 2 ms lookups per request (plain spans) in half the requests, one
    # compressed span standing for three 2 ms calls over 10 ms in the other half.
    for i in range(20):
        if i % 2:
            steps = [("feature_hydration", 2), (GAP, 1)] * 3
        else:
            compressed = {"inference.stage.calls": 3, "inference.stage.calls.duration": 0.006}
            steps = [Step("feature_hydration", 10, compressed)]
        writer.request([*steps, ("model_forward", 4)])
    report = report_of(writer, budgets={"feature_hydration": 0.005})
    row = next(r for r in report.rows if r.label == "feature_hydration")
    assert row.count == 20  # requests, not calls
    assert row.p50 == pytest.approx(ms(6), **EXACT)
    assert row.p95 == pytest.approx(ms(6), **EXACT)
    assert row.status == "over"  # 6 ms per request against a 5 ms budget
