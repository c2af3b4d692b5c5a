"""Render a :class:`~otel_inference.report.Report` as one self-contained HTML page.

Inline CSS and SVG only: no script, font, image or stylesheet is fetched, so
the file can be mailed, attached to a CI run or opened offline. Charts: the
tail's time per stage (a stacked bar of the share of tail latency; from
Prometheus alone, where there is no share, this chart is left out), the
per-stage p50/p95/p99 bars with each budget marked, then (from spans) the
padding waste, per-stage p95 over time (a burst shows as a step) and
waterfalls of the slowest requests (nested stages indented, batch membership,
GC pauses as red bands, a held event loop as purple ones).

Usage::

    from otel_inference.report import build_report, render_html

    Path("report.html").write_text(render_html(build_report(spans)), encoding="utf-8")
"""

from __future__ import annotations

from collections import Counter
from html import escape

from otel_inference.report._model import Report, StageRow
from otel_inference.report.generation import generation_html
from otel_inference.report.render import (
    COST_HEADER,
    fmt_dollars,
    fmt_ms,
    fmt_per_million,
    fmt_share,
    padding_lines,
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
    colours["event_loop"] = HELD_COLOURS["event_loop.blocked"]
    return colours


def _tail_chart(report: Report, colours: dict[str, str]) -> str:
    parts = [
        r
        for r in report.rows
        if r.kind in ("stage", "unattributed", "event_loop") and (r.tail_share or 0) > 0
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
        _budget_cell(row),
        f'<span class="{escape(status)}">{escape(status)}</span>',
    ]
    if with_cost:
        cells.append(escape(fmt_per_million(row.cost_per_request)))
    return f'<tr class="{row.kind}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


_SOURCES = {
    "explicit": "given (--budgets)",
    "telemetry": "from the telemetry",
    "environment": "from OTEL_INFERENCE_BUDGETS",
}


def _budget_cell(row: StageRow) -> str:
    """The budget, with where it came from (``--budgets``, the telemetry, the environment)."""
    if row.budget_source is None:
        return escape(fmt_ms(row.budget))
    return f'<span title="budget: {escape(_SOURCES.get(row.budget_source, row.budget_source))}">{escape(fmt_ms(row.budget))}</span>'


def render_html(report: Report) -> str:
    """The report as a standalone HTML document (UTF-8)."""
    colours = _colours(report)
    all_colours = _all_colours(report)
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
        f"{_padding_section(report)}{_timeline_chart(report, all_colours)}"
        f"{_waterfalls(report, all_colours)}"
        f"{generation_html(report)}"
        f'<div class="notes">{"".join(f"<p>{escape(n)}</p>" for n in notes)}</div>'
        "</body></html>\n"
    )


# --- issue 19: padding, p95 over time, waterfalls of the slowest requests -----------------

TIMELINE_BACKGROUND = "#fbfbf4"
WATERFALL_BACKGROUND = "#f6f8fc"
HELD_COLOURS = {"gc.pause": "#d62728", "event_loop.blocked": "#7b1fa2"}
"""Time the process held the request, on the waterfalls: GC pauses, a held event loop."""
HELD_NAMES = {"gc.pause": "GC pause", "event_loop.blocked": "event-loop hold"}
REQUEST_LINE = "#333333"


def _all_colours(report: Report) -> dict[str, str]:
    """The charts' colours, extended to stages seen only nested (a batch's model_forward)."""
    colours = _colours(report)
    for row in report.rows:
        if row.stage not in colours and row.kind == "nested":
            colours[row.stage] = PALETTE[len(colours) % len(PALETTE)]
    for waterfall in report.slowest:
        for bar in waterfall.bars:
            colours.setdefault(bar.stage, PALETTE[len(colours) % len(PALETTE)])
    return colours


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3g} s"
    return f"{fmt_ms(value)} ms"


def _padding_section(report: Report) -> str:
    padding = report.padding
    if padding is None or padding.waste is None:
        return ""
    width, height = 960, 28
    real_w = padding.real_tokens / padding.padded_tokens * width
    lines = [line.strip() for line in padding_lines(padding)]
    return (
        "<h2>Padding waste</h2>"
        + "".join(f'<p class="meta">{escape(line)}</p>' for line in lines)
        + f'<svg role="img" aria-label="real vs padding token positions" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect x="0" y="0" width="{real_w:.1f}" height="{height}" fill="#59a14f">'
        f"<title>real tokens: {padding.real_tokens:,}</title></rect>"
        f'<rect x="{real_w:.1f}" y="0" width="{width - real_w:.1f}" height="{height}" '
        f'fill="#bab0ac"><title>padding: {padding.padded_tokens - padding.real_tokens:,}'
        "</title></rect>"
        f'<text x="6" y="19" style="fill:#fff;font-weight:600">real</text>'
        f'<text x="{width - 6}" y="19" text-anchor="end" style="font-weight:600">'
        f"padding {escape(fmt_share(padding.waste))}</text></svg>"
    )


def _timeline_chart(report: Report, colours: dict[str, str]) -> str:
    timeline = report.timeline
    if timeline is None or not timeline.requests:
        return ""
    stages = [r.stage for r in report.rows if r.kind == "stage" and r.stage in timeline.p95]
    series = [*stages, "request"] if "request" in timeline.p95 else stages
    top = max((v for s in series for v in timeline.p95[s] if v is not None), default=0.0) or 1.0
    left, plot_w, plot_h, pad_top = 70, 840, 240, 12
    bins = len(timeline.requests)
    step = plot_w / bins
    items = [
        f'<rect x="0" y="0" width="{left + plot_w + 20}" height="{plot_h + pad_top + 40}" '
        f'fill="{TIMELINE_BACKGROUND}"/>'
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = pad_top + plot_h * (1 - fraction)
        items.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt_ms(top * fraction) if fraction else '0')} ms</text>"
        )
    for stage in series:
        colour = REQUEST_LINE if stage == "request" else colours.get(stage, "#555")
        dash = ' stroke-dasharray="6 3"' if stage == "request" else ""
        path: list[str] = []
        for i, value in enumerate(timeline.p95[stage]):
            if value is None:
                continue
            y = pad_top + plot_h * (1 - value / top)
            x0, x1 = left + i * step, left + (i + 1) * step
            joined = i > 0 and timeline.p95[stage][i - 1] is not None
            path.append(f"{'L' if joined else 'M'}{x0:.1f},{y:.1f} L{x1:.1f},{y:.1f}")
        items.append(
            f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2.5"{dash}>'
            f"<title>{escape(stage)} p95</title></path>"
        )
    axis_y = pad_top + plot_h + 18
    total = timeline.bin_seconds * bins
    items.append(
        f'<text x="{left}" y="{axis_y}">0 s</text>'
        f'<text x="{left + plot_w / 2:.1f}" y="{axis_y}" text-anchor="middle">'
        f"{escape(_seconds(total / 2))}</text>"
        f'<text x="{left + plot_w}" y="{axis_y}" text-anchor="end">{escape(_seconds(total))}</text>'
    )
    legend = [
        f'<span><i class="swatch" style="background:'
        f'{REQUEST_LINE if s == "request" else colours.get(s, "#555")}"></i>'
        f"{escape(s if s != 'request' else 'request (end to end, dashed)')}</span>"
        for s in series
    ]
    width, height = left + plot_w + 20, plot_h + pad_top + 40
    return (
        "<h2>p95 over time</h2>"
        f'<p class="meta">Per-stage p95 of the requests that started in each '
        f"{escape(_seconds(timeline.bin_seconds))} bin (nearest rank); a burst shows as a step.</p>"
        f'<svg role="img" aria-label="per-stage p95 over time" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{"".join(items)}</svg>'
        f'<p class="legend">{" &nbsp; ".join(legend)}</p>'
    )


def _waterfalls(report: Report, colours: dict[str, str]) -> str:
    if not report.slowest:
        return ""
    label_w, plot_w, row_h = 260, 640, 18
    scale = max(w.duration for w in report.slowest) or 1.0
    batches = {}
    for waterfall in report.slowest:
        for bar in waterfall.bars:
            if bar.batch_id is not None and bar.batch_id not in batches:
                batches[bar.batch_id] = f"#{len(batches) + 1}"
    blocks = []
    for number, waterfall in enumerate(report.slowest, 1):
        height = row_h * (len(waterfall.bars) + 1) + 8
        width = label_w + plot_w + 150
        items = [
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="{WATERFALL_BACKGROUND}"/>',
            f'<rect x="{label_w}" y="2" width="{waterfall.duration / scale * plot_w:.1f}" '
            f'height="{row_h - 6}" fill="#999" fill-opacity="0.35"><title>request '
            f"{escape(_seconds(waterfall.duration))}</title></rect>",
            f'<text x="4" y="{row_h - 5}" style="font-weight:600">request</text>',
            f'<text x="{label_w + waterfall.duration / scale * plot_w + 6:.1f}" y="{row_h - 5}">'
            f"{escape(_seconds(waterfall.duration))}</text>",
        ]
        for i, bar in enumerate(waterfall.bars, 1):
            y = i * row_h + 2
            x = label_w + max(0.0, bar.start) / scale * plot_w
            w = max(1.5, bar.duration / scale * plot_w)
            label = bar.stage
            if bar.batch_id is not None:
                label += f" {batches[bar.batch_id]} of {bar.batch_size}"
                if bar.batcher:
                    label += f" ({bar.batcher})"
            info = _seconds(bar.duration)
            if bar.calls is not None and bar.busy is not None:
                info = f"{_seconds(bar.busy)} in {bar.calls} calls over {info}"
            opacity = 0.7 if bar.depth else 1.0
            items.append(
                f'<text x="{4 + 16 * (bar.depth + 1)}" y="{y + row_h - 7}">{escape(label)}</text>'
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 6}" '
                f'fill="{colours.get(bar.stage, "#555")}" fill-opacity="{opacity}">'
                f"<title>{escape(label)}: {escape(info)}, from "
                f"{escape(_seconds(bar.start))}</title></rect>"
                f'<text x="{x + w + 4:.1f}" y="{y + row_h - 7}">{escape(info)}</text>'
            )
        for name, start, duration in waterfall.held:
            x = label_w + max(0.0, start) / scale * plot_w
            w = max(2.0, duration / scale * plot_w)
            items.append(
                f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" '
                f'fill="{HELD_COLOURS.get(name, "#d62728")}" fill-opacity="0.55">'
                f"<title>{escape(HELD_NAMES.get(name, name))}: {escape(_seconds(duration))}"
                "</title></rect>"
            )
        held = sum(d for _, _, d in waterfall.held)
        at = ""
        if report.timeline is not None:
            at = f" at {_seconds((waterfall.start_ns - report.timeline.start_ns) / 1e9)}"
        caption = f"{number}. {_seconds(waterfall.duration)}{at} (trace {waterfall.trace_id[:12]}…)"
        if held:
            counts = Counter(name for name, _, _ in waterfall.held)
            what = ", ".join(
                f"{count} {HELD_NAMES.get(name, name)}{'' if count == 1 else 's'}"
                for name, count in sorted(counts.items())
            )
            caption += f"; held {_seconds(held)} by {what}"
        blocks.append(
            f'<p class="meta">{escape(caption)}</p>'
            f'<svg role="img" aria-label="waterfall of request {number}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{"".join(items)}</svg>'
        )
    return (
        "<h2>The slowest requests</h2>"
        '<p class="meta">Each request\'s stages on its time axis (one scale for all), nested '
        "stages indented; batch #n of N: the batch the request shared with N requests (the same "
        "#n is the same batch); red bands: GC pauses, purple bands: the event loop held, while "
        "the request was in flight. Times after the first request's start, as on the chart "
        "above.</p>" + "".join(blocks)
    )
