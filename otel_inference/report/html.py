"""Render a :class:`~otel_inference.report.Report` as one self-contained HTML page.

Inline CSS and SVG only: no script, font, image or stylesheet is fetched, so
the file can be mailed, attached to a CI run or opened offline. Two charts:
the tail's time per stage (a stacked bar of the share of tail latency; from
Prometheus alone, where there is no share, this chart is left out) and the
per-stage p50/p95/p99 bars with each budget marked.

Usage::

    from otel_inference.report import build_report, render_html

    Path("report.html").write_text(render_html(build_report(spans)), encoding="utf-8")
"""

from __future__ import annotations

from html import escape

from otel_inference.report._model import Report, StageRow
from otel_inference.report.generation import generation_html
from otel_inference.report.render import (
    COST_HEADER,
    fmt_dollars,
    fmt_ms,
    fmt_per_million,
    fmt_share,
)

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#86bcb6",
)
UNATTRIBUTED_COLOUR = "#bab0ac"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#555}.verdict{border-left:4px solid #e15759;background:#fdf3f3;padding:10px 14px;margin:16px 0}
.verdict p{margin:2px 0}table{border-collapse:collapse;margin-top:8px}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
tr.nested td:first-child{padding-left:28px;color:#555}tr.request td{font-weight:600;border-top:2px solid #999}
.over{color:#b00020;font-weight:600}.ok{color:#2e7d32}.swatch{display:inline-block;width:10px;height:10px;margin-right:6px}
.notes{color:#555;font-size:13px}svg text{font:12px system-ui,sans-serif;fill:#222}
"""


def _colours(report: Report) -> dict[str, str]:
    colours: dict[str, str] = {}
    for row in report.rows:
        if row.kind == "stage":
            colours[row.stage] = PALETTE[len(colours) % len(PALETTE)]
    colours["unattributed"] = UNATTRIBUTED_COLOUR
    return colours


def _tail_chart(report: Report, colours: dict[str, str]) -> str:
    parts = [
        r for r in report.rows if r.kind in ("stage", "unattributed") and (r.tail_share or 0) > 0
    ]
    if not parts:
        return ""
    width, height, left = 960, 40, 0.0
    total = max(1.0, sum(r.tail_share or 0 for r in parts))
    rects, legend = [], []
    for row in parts:
        w = (row.tail_share or 0) / total * width
        title = escape(f"{row.stage}: {fmt_share(row.tail_share)} of the tail")
        rects.append(
            f'<rect x="{left:.1f}" y="0" width="{w:.1f}" height="{height}" '
            f'fill="{colours[row.stage]}"><title>{title}</title></rect>'
        )
        if w > 60:
            rects.append(
                f'<text x="{left + 6:.1f}" y="25" style="fill:#fff;font-weight:600">'
                f"{escape(fmt_share(row.tail_share))}</text>"
            )
        left += w
        legend.append(
            f'<span><i class="swatch" style="background:{colours[row.stage]}"></i>'
            f"{escape(row.stage)} {escape(fmt_share(row.tail_share))}</span>"
        )
    return (
        "<h2>Where the tail's time goes</h2>"
        f'<p class="meta">Mean share of each stage in the {report.tail_requests} request(s) at '
        f"or above the end-to-end p95 ({escape(fmt_ms(report.tail_threshold))} ms).</p>"
        f'<svg role="img" aria-label="share of tail latency by stage" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(rects)}</svg>'
        f'<p class="legend">{" &nbsp; ".join(legend)}</p>'
    )


def _percentile_chart(report: Report, colours: dict[str, str]) -> str:
    rows = [r for r in report.rows if r.kind != "nested" and r.p99 is not None]
    if not rows:
        return ""
    label_w, bar_w, row_h = 170, 700, 46
    top = max(max(r.p99 or 0, r.budget or 0) for r in rows) or 1.0
    height = row_h * len(rows) + 30
    items = []
    for i, row in enumerate(rows):
        y = 10 + i * row_h
        colour = colours.get(row.stage, "#555")
        items.append(f'<text x="0" y="{y + 22}">{escape(row.stage)}</text>')
        for j, (name, value, opacity) in enumerate(
            (("p50", row.p50, 1.0), ("p95", row.p95, 0.7), ("p99", row.p99, 0.45))
        ):
            w = max(1.0, (value or 0) / top * bar_w)
            items.append(
                f'<rect x="{label_w}" y="{y + j * 12}" width="{w:.1f}" height="11" '
                f'fill="{colour}" fill-opacity="{opacity}"><title>'
                f"{escape(row.stage)} {name}: {escape(fmt_ms(value))} ms</title></rect>"
            )
        items.append(
            f'<text x="{label_w + bar_w + 10}" y="{y + 22}">p95 {escape(fmt_ms(row.p95))} ms</text>'
        )
        if row.budget is not None:
            x = label_w + row.budget / top * bar_w
            items.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 3}" y2="{y + 39}" stroke="#b00020" '
                f'stroke-width="2" stroke-dasharray="4 2"><title>budget '
                f"{escape(fmt_ms(row.budget))} ms</title></line>"
            )
    axis_y = height - 12
    items.append(
        f'<text x="{label_w}" y="{axis_y}">0</text>'
        f'<text x="{label_w + bar_w}" y="{axis_y}" text-anchor="end">'
        f"{escape(fmt_ms(top))} ms</text>"
    )
    return (
        "<h2>Per-stage latency</h2>"
        '<p class="meta">Bars: p50 (solid), p95, p99 (lighter); dashed red line: the budget.</p>'
        f'<svg role="img" aria-label="per-stage p50, p95 and p99" width="{label_w + bar_w + 130}" '
        f'height="{height}" viewBox="0 0 {label_w + bar_w + 130} {height}">{"".join(items)}</svg>'
    )


def _table(report: Report) -> str:
    with_cost = report.cost_per_hour is not None
    head = ["stage", "count", "p50 ms", "p95 ms", "p99 ms", "tail share", "budget ms", "status"]
    if with_cost:
        head.append(COST_HEADER)
    lines = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in report.rows:
        lines.append(_table_row(row, with_cost))
    lines.append("</tbody></table>")
    return "".join(lines)


def _table_row(row: StageRow, with_cost: bool) -> str:
    status = row.status or "-"
    cells = [
        escape(row.label),
        str(row.count),
        fmt_ms(row.p50),
        fmt_ms(row.p95),
        fmt_ms(row.p99),
        fmt_share(row.tail_share),
        fmt_ms(row.budget),
        f'<span class="{escape(status)}">{escape(status)}</span>',
    ]
    if with_cost:
        cells.append(escape(fmt_per_million(row.cost_per_request)))
    return f'<tr class="{row.kind}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def render_html(report: Report) -> str:
    """The report as a standalone HTML document (UTF-8)."""
    colours = _colours(report)
    meta = f"{report.requests} requests from {report.source}"
    if report.cost_per_hour is not None:
        meta += f"; cost at ${report.cost_per_hour:g}/hour"
        if report.cost_per_request is not None:
            meta += f", {fmt_dollars(report.cost_per_request)} per request"
    verdict = "".join(f"<p>{escape(line)}</p>" for line in report.verdict.lines)
    notes = [*report.notes, f"Percentiles: {report.percentile_method}."]
    if report.cache_hit_ratio is not None:
        notes.insert(
            0,
            f"Cache: {fmt_share(report.cache_hit_ratio)} hits over {report.cache_lookups} lookups.",
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>otel-inference report</title><style>{_CSS}</style></head><body>"
        f'<h1>otel-inference report</h1><p class="meta">{escape(meta)}</p>'
        f'<div class="verdict"><strong>Verdict</strong>{verdict}</div>'
        f"{_tail_chart(report, colours)}{_percentile_chart(report, colours)}"
        f"<h2>Stages</h2>{_table(report)}"
        f"{generation_html(report)}"
        f'<div class="notes">{"".join(f"<p>{escape(n)}</p>" for n in notes)}</div>'
        "</body></html>\n"
    )
