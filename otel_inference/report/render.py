"""Render a :class:`~otel_inference.report.Report` as a terminal table or JSON.

The table uses plain ASCII and aligned columns (readable without colour, in a
log file or a CI job); JSON holds the same figures in seconds and dollars.
HTML is :mod:`otel_inference.report.html`.

Usage::

    from otel_inference.report import build_report, render_json, render_table

    report = build_report(spans)
    print(render_table(report))
    json_text = render_json(report)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from otel_inference.report._model import Padding, Report, StageRow
from otel_inference.report.generation import generation_lines

SCHEMA = "otel-inference-report/2"
"""2: rows gain ``budget_source``; the report gains ``padding``, ``timeline`` and
``slowest`` (see docs/report.md)."""


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with about three significant figures; ``-`` when unknown."""
    if seconds is None:
        return "-"
    ms = seconds * 1000
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def fmt_dollars(value: float | None) -> str:
    """Dollars with three significant figures in fixed notation (``$0.0000167``)."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    text = f"{value:.3g}"
    if "e" in text:
        exponent = int(text.split("e")[1])
        text = f"{value:.{min(12, 2 - exponent)}f}"
    return f"${text}"


PER_MILLION = 1_000_000
COST_HEADER = "$/1M req"
"""The tables show cost per million requests (per-request dollars are tiny);
JSON keeps ``cost_per_request`` in dollars per request."""


def fmt_per_million(value: float | None) -> str:
    """Dollars per request as dollars per million requests, three significant figures."""
    if value is None:
        return "-"
    amount = value * PER_MILLION
    if amount >= 100:
        return f"{amount:,.0f}"
    return f"{amount:.3g}" if amount >= 0.001 or amount == 0 else f"{amount:.1e}"


def _cells(row: StageRow, with_cost: bool, with_cpu: bool = False) -> list[str]:
    label = row.stage if row.parent is None else f"  {row.stage} (in {row.parent})"
    cells = [
        label,
        str(row.count),
        fmt_ms(row.p50),
        fmt_ms(row.p95),
        fmt_ms(row.p99),
        fmt_share(row.tail_share),
        fmt_ms(row.budget),
        row.status or "-",
    ]
    if with_cost:
        cells.append(fmt_per_million(row.cost_per_request))
    if with_cpu:
        cells.append(fmt_share(row.cpu_share))
    return cells


def render_table(report: Report) -> str:
    """The report as aligned text columns, the verdict and notes under them."""
    with_cost = report.cost_per_hour is not None
    header = ["stage", "count", "p50 ms", "p95 ms", "p99 ms", "tail share", "budget ms", "status"]
    if with_cost:
        header.append(COST_HEADER)
    with_cpu = any(row.cpu_share is not None for row in report.rows)
    if with_cpu:
        header.append(CPU_HEADER)
    body = [_cells(row, with_cost, with_cpu) for row in report.rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    out = [_heading(report), "", line(header), rule]
    for row, cells in zip(report.rows, body, strict=True):
        if row.kind == "request":
            out.append(rule)
        out.append(line(cells))
    if report.generation is not None:
        out += ["", *generation_lines(report)]
    out += ["", "Verdict: " + report.verdict.lines[0]]
    out += ["         " + text for text in report.verdict.lines[1:]]
    out += _event_loop_lines(report)
    if report.cache_hit_ratio is not None:
        out.append(
            f"Cache: {fmt_share(report.cache_hit_ratio)} hits over {report.cache_lookups} lookups."
        )
    out += padding_lines(report.padding)
    out.append("")
    out += [f"Note: {note}" for note in report.notes]
    out.append(f"Percentiles: {report.percentile_method}.")
    return "\n".join(out).rstrip() + "\n"


def padding_lines(padding: Padding | None) -> list[str]:
    """The padding line under the table (and its advice when the waste is large)."""
    if padding is None:
        return []
    line = (
        f"Padding: {padding.real_tokens:,} real of {padding.padded_tokens:,} token positions "
        f"({padding.tokenize_calls} tokenize call(s)): {fmt_share(padding.waste)} padding"
    )
    if padding.forward_share is not None and padding.seconds_per_request is not None:
        line += (
            f"; about {fmt_share(padding.forward_share)} of the time of the model_forward "
            f"calls they fed, {fmt_ms(padding.seconds_per_request)} ms per request"
        )
        if padding.cost_per_request is not None:
            line += f", {fmt_dollars(padding.cost_per_request * PER_MILLION)} per 1M requests"
    elif padding.forward_seconds is None:
        line += "; no time share: it needs model_forward spans beside the tokenize spans"
    lines = [line + "."]
    if padding.advice:
        lines.append("         " + padding.advice)
    return lines


CPU_HEADER = "on-CPU"
"""Synchronous stages' thread CPU time over wall time (contention shows far below 100%)."""


def _event_loop_lines(report: Report) -> list[str]:
    """What held the event loop, when the ``event_loop`` row is there."""
    if not report.event_loop_culprits:
        return []
    lines = ["Event loop held by:"]
    for culprit in report.event_loop_culprits:
        lines.append(
            f"  {fmt_share(culprit.share):>6}  {culprit.kind:<8} {culprit.culprit} "
            f"({fmt_ms(culprit.seconds)} ms over the requests)"
        )
    return lines


def _heading(report: Report) -> str:
    lines = [f"otel-inference report: {report.requests} requests from {report.source}"]
    if report.tail_threshold is not None:
        lines.append(
            f"Tail: the {report.tail_requests} request(s) at or above the end-to-end p95 "
            f"({fmt_ms(report.tail_threshold)} ms)."
        )
    if report.cost_per_hour is not None:
        cost = f"Cost: ${report.cost_per_hour:g}/hour"
        if report.cost_per_request is not None:
            cost += f" = {fmt_dollars(report.cost_per_request)} per request"
        lines.append(cost + ".")
    return "\n".join(lines)


def report_dict(report: Report) -> dict[str, Any]:
    """The report as plain data (seconds, fractions, dollars)."""
    data = asdict(report)
    data["verdict"] = {
        "stage": report.verdict.stage,
        "category": report.verdict.category,
        "share": report.verdict.share,
        "text": report.verdict.text,
    }
    for row, raw in zip(report.rows, data["rows"], strict=True):
        raw["label"] = row.label
    return {"schema": SCHEMA, **data}


def render_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2) + "\n"
