"""``otel-inference report``: where did the time go, per stage, and what to fix first.

Reads spans (an OTLP JSON Lines file, or the Jaeger query API) or histograms
(Prometheus, percentiles only) and computes, per stage: count, p50/p95/p99,
share of tail latency, budget and status, cost per request; an
``unattributed`` row; and a verdict. Renders a terminal table, JSON or a
self-contained HTML page. The method is documented in ``docs/report.md``.

Usage::

    from otel_inference.report import build_report, load_spans_file, render_table

    report = build_report(
        load_spans_file("build/demo/spans.jsonl"),
        budgets={"tokenize": 0.005},
        cost_per_hour=2.5,
    )
    print(render_table(report))
    assert report.row("model_forward").p95 is not None
    print(report.verdict.stage, report.verdict.category)
    print(report.padding, report.timeline, report.slowest[:1])  # issue 19's additions

From the command line::

    otel-inference report --spans build/demo/spans.jsonl --cost-per-hour 2.5
"""

from otel_inference.report._model import (
    Padding,
    Report,
    ReportError,
    RequestWaterfall,
    SpanEvent,
    SpanRecord,
    StageRow,
    Timeline,
    Verdict,
    WaterfallBar,
)
from otel_inference.report.analysis import build_report
from otel_inference.report.html import render_html
from otel_inference.report.jaeger import load_jaeger, parse_jaeger
from otel_inference.report.otlp_json import load_spans_file
from otel_inference.report.prometheus import prometheus_report
from otel_inference.report.render import render_json, render_table, report_dict

RENDERERS = {"table": render_table, "json": render_json, "html": render_html}
"""``--format`` name -> renderer."""

__all__ = [
    "RENDERERS",
    "Padding",
    "Report",
    "ReportError",
    "RequestWaterfall",
    "SpanEvent",
    "SpanRecord",
    "StageRow",
    "Timeline",
    "Verdict",
    "WaterfallBar",
    "build_report",
    "load_jaeger",
    "load_spans_file",
    "parse_jaeger",
    "prometheus_report",
    "render_html",
    "render_json",
    "render_table",
    "report_dict",
]
