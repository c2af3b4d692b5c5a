"""Issue 19's report additions on spans with known layouts: budgets learnt from the
telemetry, the padding line, per-stage p95 over time and the waterfalls of the
slowest requests (span file and Jaeger alike). Every expected figure is worked
out by hand from the layout (``tests/apps/report_spans.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from otel_inference.report import build_report, html, load_jaeger, load_spans_file, render_table
from otel_inference.report.render import render_json
from tests.apps.report_spans import GAP, MS, SERVICE, SpanWriter, Step, jaeger_payload
from tests.servers import require_binary
from tests.test_report_cli import chromium_screenshot, png_pixels, run
from tests.test_report_jaeger import FakeJaeger

EXACT = {"rel": 1e-12, "abs": 1e-15}
DOLLARS_PER_SECOND = 0.001  # --cost-per-hour 3.6


@pytest.fixture
def writer(tmp_path: Path) -> SpanWriter:
    return SpanWriter(tmp_path / "spans.jsonl")


def report_of(writer: SpanWriter, **options):
    return build_report(load_spans_file(writer.close()), **options)


# --- budgets from the telemetry ---------------------------------------------------------


def budgeted(wait: float, budget: float = 0.020) -> Step:
    # As the recorder writes it: the budget, and the verdict on this span.
    return Step(
        "queue_wait",
        wait,
        {"inference.budget": budget, "inference.budget.exceeded": wait / 1000 > budget},
    )


def test_budgets_come_from_the_spans(writer):
    for wait in [*range(1, 19), 40, 60]:
        writer.request(
            [budgeted(wait), Step("model_forward", 10, {"inference.budget": 0.014})],
            attributes={"inference.budget": 0.100},  # request(): the request budget
        )
    path = writer.close()
    report = build_report(load_spans_file(path))
    queue, forward = report.row("queue_wait"), report.row("model_forward")
    # p95 of the waits is the 19th smallest, 40 ms: over the 20 ms the spans carry.
    assert (queue.budget, queue.status, queue.budget_source) == (0.020, "over", "telemetry")
    assert (forward.budget, forward.status, forward.budget_source) == (0.014, "ok", "telemetry")
    assert (report.row("request").budget, report.row("request").status) == (0.100, "ok")
    assert report.row("unattributed").budget is None
    assert not [n for n in report.notes if "budget" in n]
    assert '<span title="budget: from the telemetry">20.0</span>' in html.render_html(report)

    # Explicit budgets override the telemetry's (and say so); the environment's only
    # fill in stages the telemetry has no budget for.
    report = build_report(
        load_spans_file(path),
        budgets={"queue_wait": 0.050},
        default_budgets={"model_forward": 0.005, "serialize": 0.001, "unattributed": 0.002},
    )
    queue, forward = report.row("queue_wait"), report.row("model_forward")
    assert (queue.budget, queue.status, queue.budget_source) == (0.050, "ok", "explicit")
    assert (forward.budget, forward.budget_source) == (0.014, "telemetry")
    gap = report.row("unattributed")
    assert (gap.budget, gap.status, gap.budget_source) == (0.002, "ok", "environment")
    assert "queue_wait: budget 50 ms as given, overriding the telemetry's 20 ms" in report.notes
    assert (
        "model_forward: budget 14 ms from the telemetry, not the environment's 5 ms" in report.notes
    )


def test_disagreeing_budgets_are_reported(writer):
    # Two replicas ran with other budgets: 18 spans say 20 ms, 2 say 30 ms.
    for index, wait in enumerate([*range(1, 19), 40, 60]):
        writer.request([budgeted(wait, 0.030 if index < 2 else 0.020), ("model_forward", 10)])
    report = report_of(writer)
    assert report.row("queue_wait").budget == 0.020  # the most frequent
    (note,) = [n for n in report.notes if "disagree" in n]
    assert note == (
        "budgets disagree for queue_wait in the telemetry: 20 ms (18 spans), 30 ms (2 spans); "
        "using 20 ms, the most frequent (--budgets chooses)"
    )
    assert "Note: budgets disagree for queue_wait" in render_table(report)


def test_breach_flags_without_the_budget_value_are_said(writer):
    # Spans of an otel-inference that flags breaches but does not record the value.
    for wait in (5, 30):
        writer.request([Step("queue_wait", wait, {"inference.budget.exceeded": wait > 20})])
    path = writer.close()
    report = build_report(load_spans_file(path))
    assert report.row("queue_wait").budget is None
    assert any(
        n.startswith("spans of queue_wait were judged against a budget") for n in report.notes
    )
    # Given a budget, nothing is missing.
    report = build_report(load_spans_file(path), budgets={"queue_wait": 0.020})
    assert not any("judged against a budget" in n for n in report.notes)


# --- padding ------------------------------------------------------------------------------


def tokens(real: int, padded: int) -> dict[str, int]:
    return {"inference.tokens.real": real, "inference.tokens.padded": padded}


def test_padding_in_batches(writer):
    # The demo's layout: tokenize and the module's model_forward nested in each batch.
    writer.batch(
        [4, 3, 2, 1],
        forward_ms=20,
        nested=[("tokenize", 0, 2, tokens(454, 2208)), ("model_forward", 3, 12, {})],
    )
    writer.batch(
        [4, 3, 2, 1],
        forward_ms=10,
        nested=[("tokenize", 0, 1, tokens(100, 100)), ("model_forward", 1, 8, {})],
    )
    report = report_of(writer, cost_per_hour=3.6)
    padding = report.padding
    assert (padding.real_tokens, padding.padded_tokens, padding.tokenize_calls) == (554, 2308, 2)
    assert padding.waste == pytest.approx(1754 / 2308, **EXACT)
    # 12 ms of forward on 2208 positions of which 1754 are padding; 8 ms on none.
    wasted = 0.012 * 1754 / 2208
    assert padding.forward_seconds == pytest.approx(0.020, **EXACT)
    assert padding.padding_seconds == pytest.approx(wasted, **EXACT)
    assert padding.forward_share == pytest.approx(wasted / 0.020, **EXACT)
    assert padding.seconds_per_request == pytest.approx(wasted / 8, **EXACT)
    assert padding.cost_per_request == pytest.approx(wasted / 8 * DOLLARS_PER_SECOND, **EXACT)
    assert "length bucketing" in padding.advice and padding.advice.startswith("76% ")

    table = render_table(report)
    assert (
        "Padding: 554 real of 2,308 token positions (2 tokenize call(s)): 76.0% padding; "
        "about 47.7% of the time of the model_forward calls they fed, 1.19 ms per request, "
        "$1.19 per 1M requests."
    ) in table
    assert "         76% of the token positions the model computes are padding" in table
    # The nested rows are named for what they are: no "model_forward (in model_forward)".
    assert [r.label for r in report.rows if r.kind == "nested"] == [
        "tokenize (in batch)",
        "model_forward (in batch)",
    ]
    data = json.loads(render_json(report))
    assert data["padding"]["real_tokens"] == 554
    assert data["padding"]["forward_share"] == pytest.approx(wasted / 0.020)


def test_little_padding_gives_no_advice_and_no_tokens_no_line(writer, tmp_path):
    for _ in range(4):
        writer.request(
            [Step("tokenize", 2, tokens(30, 32)), ("model_forward", 10), (GAP, 1)],
        )
    report = report_of(writer)
    padding = report.padding
    assert padding.waste == pytest.approx(2 / 32, **EXACT)
    assert padding.forward_share == pytest.approx(2 / 32, **EXACT)  # paired in each request
    assert padding.seconds_per_request == pytest.approx(0.010 * 2 / 32, **EXACT)
    assert padding.advice is None and padding.cost_per_request is None

    plain = SpanWriter(tmp_path / "plain.jsonl")
    plain.request([("tokenize", 2), ("model_forward", 10)])
    report = report_of(plain)
    assert report.padding is None and "Padding:" not in render_table(report)


def test_padding_without_a_forward_beside_it(writer):
    # Tokenised in the request, run in a batch: the tokens feed no forward we can pair.
    for _ in range(2):
        writer.request([Step("tokenize", 1, tokens(10, 40)), ("batch", 5)])
    report = report_of(writer)
    assert report.padding.waste == 0.75 and report.padding.forward_seconds is None
    assert "no time share: it needs model_forward spans beside the tokenize spans" in render_table(
        report
    )


# --- p95 over time and the slowest requests ---------------------------------------------


def steady_then_burst(writer: SpanWriter) -> None:
    """10 steady requests (queue 2 ms), then 10 in a burst (queue 100 ms). Requests
    start 1 s after the previous one ended: steady request k at k x 1.012 s, burst
    request j at 10.12 + j x 1.11 s."""
    for _ in range(10):
        writer.request([("queue_wait", 2), ("model_forward", 10)])
    for _ in range(10):
        writer.request([("queue_wait", 100), ("model_forward", 10)])


def test_p95_over_time_shows_the_burst_as_a_step(writer):
    steady_then_burst(writer)
    timeline = report_of(writer).timeline
    # The last start is 20.11 s after the first: 1 s bins (0.5 s would need 41).
    assert timeline.bin_seconds == 1.0 and len(timeline.requests) == 21
    # Steady k in bin k; burst j at 10.12 + 1.11 j s: bins 10..17, 19, 20 (18 is empty).
    assert timeline.requests == [1] * 18 + [0, 1, 1]
    assert timeline.p95["queue_wait"] == [0.002] * 10 + [0.100] * 8 + [None, 0.100, 0.100]
    assert timeline.p95["model_forward"] == [0.010] * 18 + [None, 0.010, 0.010]
    assert timeline.p95["request"] == [0.012] * 10 + [0.110] * 8 + [None, 0.110, 0.110]


def waterfall_spans(writer: SpanWriter) -> None:
    writer.batch(
        [30, 10, 5, 1],
        forward_ms=20,
        after_ms=1,
        nested=[("tokenize", 0, 2, tokens(40, 64)), ("model_forward", 3, 15, {})],
    )
    # The slowest: 81 ms, held 12 ms by a GC pause that ended 50 ms in.
    writer.request([("queue_wait", 1), ("model_forward", 80)], gc_pauses=[(50, 12)])
    for _ in range(3):
        writer.request([("queue_wait", 1), ("model_forward", 5)])


def test_slowest_requests_as_waterfalls(writer):
    waterfall_spans(writer)
    slowest = report_of(writer).slowest
    assert [round(w.duration * 1000, 6) for w in slowest] == [81, 51, 31, 26, 22]
    first = slowest[0]
    assert [(b.stage, b.start, b.duration, b.depth) for b in first.bars] == [
        ("queue_wait", 0.0, 0.001, 0),
        ("model_forward", 0.001, 0.080, 0),
    ]
    assert first.held == [("gc.pause", pytest.approx(0.038, **EXACT), 0.012)]
    # The batch's first member (waited 30 ms): the batch and its nested stages.
    member = slowest[1]
    bars = [(b.stage, round(b.start * 1000, 6), round(b.duration * 1000, 6), b.depth, b.parent)
            for b in member.bars]  # fmt: skip
    assert bars == [
        ("queue_wait", 0, 30, 0, None),
        ("batch", 30, 20, 0, None),
        ("tokenize", 30, 2, 1, "batch"),
        ("model_forward", 33, 15, 1, "batch"),
        ("serialize", 50, 1, 0, None),
    ]
    batch = member.bars[1]
    assert (batch.batch_size, batch.batcher) == (4, "encoder") and batch.batch_id
    # Another member shows the same batch, with its nested stages, on its own axis.
    other = slowest[2]  # waited 10 ms
    assert [(b.stage, round(b.start * 1000, 6), b.depth) for b in other.bars[1:4]] == [
        ("batch", 10, 0),
        ("tokenize", 10, 1),
        ("model_forward", 13, 1),
    ]
    assert other.bars[1].batch_id == batch.batch_id
    assert member.held == []


def test_jaeger_gives_the_same_views(writer):
    for wait in (2, 3, 100):
        writer.request([("queue_wait", wait), ("model_forward", 10)])
    waterfall_spans(writer)
    from_file = report_of(writer)
    with FakeJaeger(jaeger_payload(writer.spans())) as jaeger:
        from_jaeger = build_report(load_jaeger(jaeger.url, service=SERVICE))
    assert from_jaeger.timeline == from_file.timeline
    assert from_jaeger.slowest == from_file.slowest
    assert [w.duration for w in from_jaeger.slowest] == [0.110, 0.081, 0.051, 0.031, 0.026]
    assert from_jaeger.slowest[1].held == [("gc.pause", pytest.approx(0.038, **EXACT), 0.012)]
    assert from_jaeger.padding == from_file.padding


# --- the HTML page, rendered by headless Chromium ---------------------------------------


def screenshot(spans: Path, tmp_path: Path, name: str) -> np.ndarray:
    chromium = require_binary("chromium")
    page = tmp_path / f"{name}.html"
    made = run("report", "--spans", str(spans), "--format", "html", "--output", str(page))
    assert made.returncode == 0, made.stderr
    text = page.read_text(encoding="utf-8")
    for fetch in ("<script", "<link", "<img", "src=", "url(", "@import", "http://", "https://"):
        assert fetch not in text, fetch  # self-contained: inline SVG only
    shot = chromium_screenshot(chromium, page, tmp_path / f"{name}.png", (1200, 2600))
    width, height, rows = png_pixels(shot)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(height, width, 3)


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def find(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 3):
    """(x, y) of every pixel within ``tolerance`` of ``colour``."""
    near = np.all(np.abs(pixels.astype(np.int16) - colour) <= tolerance, axis=2)
    return [(int(x), int(y)) for y, x in np.argwhere(near)]


def box(points):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def test_html_timeline_and_waterfalls_in_headless_chromium(tmp_path):
    # p95 over time: the burst is a step of the queue_wait line (the first stage's colour).
    burst = SpanWriter(tmp_path / "burst.jsonl")
    steady_then_burst(burst)
    rows = screenshot(burst.close(), tmp_path, "burst")
    x0, y0, x1, y1 = box(find(rows, hex_rgb(html.TIMELINE_BACKGROUND), 0))
    assert x1 - x0 > 800 and y1 - y0 > 250  # the chart's panel
    line = [
        (x, y) for x, y in find(rows, hex_rgb(html.PALETTE[0])) if x0 <= x <= x1 and y0 <= y <= y1
    ]
    steady = [y for x, y in line if x < x0 + 0.4 * (x1 - x0)]
    bursting = [y for x, y in line if x > x0 + 0.6 * (x1 - x0)]
    assert steady and bursting
    # 2 ms against 100 ms on a 110 ms scale: the burst's line is far higher up.
    assert sum(steady) / len(steady) - sum(bursting) / len(bursting) > 0.5 * (y1 - y0)

    # Waterfalls: the GC pause is a red band; the batch's bars are drawn.
    slow = SpanWriter(tmp_path / "slow.jsonl")
    waterfall_spans(slow)
    rows = screenshot(slow.close(), tmp_path, "slow")
    panels = find(rows, hex_rgb(html.WATERFALL_BACKGROUND), 0)
    assert panels
    px0, py0, px1, py1 = box(panels)
    band = [  # the GC pause colour at 55% over the panel's background
        round(0.55 * h + 0.45 * b)
        for h, b in zip(
            hex_rgb(html.HELD_COLOURS["gc.pause"]), hex_rgb(html.WATERFALL_BACKGROUND), strict=True
        )
    ]
    held = [(x, y) for x, y in find(rows, tuple(band)) if px0 <= x <= px1 and py0 <= y <= py1]
    # 12 ms of 81 ms on a 640 px axis (~95 px wide), over the first request's panel.
    hx0, _, hx1, _ = box(held)
    assert 80 <= hx1 - hx0 + 1 <= 100, (hx0, hx1)
    batch_colour = hex_rgb(html.PALETTE[1])  # the second top-level stage: batch
    assert [r.stage for r in build_report(load_spans_file(slow.path)).rows][:2] == [
        "queue_wait",
        "batch",
    ]
    bars = [(x, y) for x, y in find(rows, batch_colour) if px0 <= x <= px1 and py0 <= y <= py1]
    # The batch's 20 ms (~158 px at 81 ms = 640 px) in each of its 4 members' panels.
    assert len({y // 60 for _, y in bars}) >= 4 and len(bars) > 4 * 150 * 8


def test_budgets_the_recorder_writes_are_read_back(telemetry, tmp_path):
    from opentelemetry.exporter.otlp.json.file import FileSpanExporter
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from otel_inference import get_recorder, request, stage

    path = tmp_path / "real.jsonl"
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    get_recorder().configure(
        telemetry.tracer_provider,
        telemetry.meter_provider,
        budgets="tokenize=5ms,model_forward=14ms,request=2s",
    )
    for _ in range(3):
        with request(), stage("tokenize"):
            pass
    telemetry.tracer_provider.force_flush()
    report = build_report(load_spans_file(path))
    assert (report.row("tokenize").budget, report.row("tokenize").budget_source) == (
        0.005,
        "telemetry",
    )
    assert report.row("request").budget == 2.0


def test_views_count_what_each_request_spent(writer):
    # Per-request accounting (issue 15): two 2 ms lookups are one 4 ms value; a
    # compressed span of 3 calls stands for 6 ms over its 10 ms extent.
    compressed = {"inference.stage.calls": 3, "inference.stage.calls.duration": 0.006}
    for _ in range(3):
        writer.request(
            [
                ("feature_hydration", 2),
                (GAP, 1),
                ("feature_hydration", 2),
                Step("tokenize", 1, tokens(30, 40)),
                Step("model_forward", 10, compressed),
            ]
        )
    report = report_of(writer)
    assert report.row("feature_hydration").p95 == 0.004
    timeline = report.timeline
    # Starts 0, 1.016 and 2.032 s apart: 0.1 s bins (0.05 s would need 41), in bins 0, 10, 20.
    assert timeline.bin_seconds == 0.1 and len(timeline.requests) == 21
    assert [i for i, n in enumerate(timeline.requests) if n] == [0, 10, 20]
    assert timeline.p95["feature_hydration"][::10] == [0.004, 0.004, 0.004]
    assert timeline.p95["model_forward"][::10] == [0.006, 0.006, 0.006]
    bar = report.slowest[0].bars[-1]
    assert (bar.stage, bar.duration, bar.calls, bar.busy) == ("model_forward", 0.010, 3, 0.006)
    # The forward's time is its calls' time: 3 x 6 ms, a quarter of it on padding.
    assert report.padding.forward_seconds == pytest.approx(0.018, **EXACT)
    assert report.padding.padding_seconds == pytest.approx(0.018 * 10 / 40, **EXACT)


def test_cli_reads_budgets_from_the_spans_and_budgets_override(writer):
    for wait in [*range(1, 19), 40, 60]:
        writer.request([budgeted(wait), ("model_forward", 10)])
    path = str(writer.close())
    env = {"OTEL_INFERENCE_BUDGETS": "queue_wait=1ms,model_forward=50ms"}
    learnt = run("report", "--spans", path, "--format", "json", env=env)
    assert learnt.returncode == 0, learnt.stderr
    rows = {row["label"]: row for row in json.loads(learnt.stdout)["rows"]}
    assert (rows["queue_wait"]["budget"], rows["queue_wait"]["budget_source"]) == (
        0.020,
        "telemetry",
    )
    assert (rows["model_forward"]["budget"], rows["model_forward"]["budget_source"]) == (
        0.050,
        "environment",
    )
    given = run("report", "--spans", path, "--budgets", "queue_wait=45ms", env=env)
    assert given.returncode == 0, given.stderr
    assert "Note: queue_wait: budget 45 ms as given, overriding the telemetry's 20 ms" in (
        given.stdout
    )
    (line,) = [line for line in given.stdout.splitlines() if line.startswith("queue_wait")]
    assert line.split()[6:8] == ["45.0", "ok"]  # budget ms, status: the table as before


def test_a_held_event_loop_marks_the_waterfall_once(writer):
    """The monitor puts an ``event_loop.blocked`` event (stamped at the hold's start) on
    every stage span the hold overlapped: the waterfall shows the hold once."""
    from opentelemetry import trace

    start = writer._advance(40 * MS)
    root = writer.open_request(start, attributes={"inference.unattributed.duration": 0.0})
    held_from = start + 5 * MS
    for name, lo, hi in (("feature_hydration", 0, 20), ("queue_wait", 20, 40)):
        span = writer.tracer.start_span(
            name,
            context=trace.set_span_in_context(root),
            start_time=start + lo * MS,
            attributes={"inference.stage": name},
        )
        span.add_event(
            "event_loop.blocked",
            {"inference.event_loop.blocked.duration": 0.025},
            timestamp=held_from,
        )
        span.end(end_time=start + hi * MS)
    root.end(end_time=start + 40 * MS)
    report = report_of(writer)
    (waterfall,) = report.slowest
    assert waterfall.held == [("event_loop.blocked", 0.005, 0.025)]
    assert "by 1 event-loop hold" in html.render_html(report)
