"""Generation figures of the report: time to first token, time per output token, tokens/s.

From spans, per request holding a ``generate`` stage (see ``docs/generation.md``):

* **TTFT** = the end of its first ``prefill`` span (the first token) minus the
  start of the request span: what the server saw, queue and everything before
  the model included. A client sees this plus the network and its own reading.
* **TPOT** = the ``decode`` time over the tokens after the first, per sequence
  (the ``generate`` span's ``inference.generation.time_per_output_token``).
* **tokens/s** = the output tokens of the request over its ``generate`` time.

From Prometheus, TTFT and TPOT come from the ``ttft`` and ``tpot`` pseudo-stages
of the stage histogram (the request's TTFT as the instrumentation measured it);
tokens/s needs spans.

Usage::

    from otel_inference.report.generation import generation_lines

    for line in generation_lines(report):
        print(line)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from otel_inference import semconv
from otel_inference.report._model import Report, SpanKey, SpanRecord, StageRow
from otel_inference.report._stats import nearest_rank


@dataclass
class Distribution:
    """Nearest-rank percentiles of one figure (seconds, or tokens/s)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    budget: float | None = None
    status: str | None = None


@dataclass
class GenerationSummary:
    """TTFT and TPOT (seconds) and output tokens per second, over the requests that
    generated; ``tokens_per_second`` is ``None`` from Prometheus."""

    requests: int
    ttft: Distribution | None
    tpot: Distribution | None
    tokens_per_second: Distribution | None = None


def _distribution(values: list[float], budget: float | None = None) -> Distribution | None:
    if not values:
        return None
    made = Distribution(
        count=len(values),
        p50=nearest_rank(values, 0.50),
        p95=nearest_rank(values, 0.95),
        p99=nearest_rank(values, 0.99),
        budget=budget,
    )
    if budget is not None and made.p95 is not None:
        made.status = "over" if made.p95 > budget else "ok"
    return made


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def summarise_spans(
    requests: Mapping[SpanKey, SpanRecord],
    stage_spans: Iterable[tuple[SpanKey, str, SpanRecord]],
    budgets: Mapping[str, float],
) -> GenerationSummary | None:
    """``stage_spans``: (request key, stage, span) of every stage span a request holds."""
    generates: dict[SpanKey, list[SpanRecord]] = defaultdict(list)
    first_token: dict[SpanKey, int] = {}
    for request, stage, span in stage_spans:
        if stage == semconv.GENERATE:
            generates[request].append(span)
        elif stage == semconv.PREFILL and span.end_ns < first_token.get(request, span.end_ns + 1):
            first_token[request] = span.end_ns
    if not generates:
        return None
    ttft: list[float] = []
    tpot: list[float] = []
    rates: list[float] = []
    for key, spans in generates.items():
        request = requests[key]
        failed = any(semconv.ERROR_TYPE in span.attributes for span in spans)
        if key in first_token and not failed:
            ttft.append(max(0, first_token[key] - request.start_ns) / 1e9)
        per_token = [_number(s.attributes.get(semconv.INFERENCE_GENERATION_TPOT)) for s in spans]
        tpot += [value for value in per_token if value is not None]
        tokens = sum(
            _number(s.attributes.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS)) or 0 for s in spans
        )
        busy = sum(span.duration_ns for span in spans) / 1e9
        if tokens and busy > 0 and not failed:
            rates.append(tokens / busy)
    return GenerationSummary(
        requests=len(generates),
        ttft=_distribution(ttft, budgets.get(semconv.TTFT)),
        tpot=_distribution(tpot, budgets.get(semconv.TPOT)),
        tokens_per_second=_distribution(rates),
    )


def from_rows(rows: list[StageRow]) -> tuple[list[StageRow], GenerationSummary | None]:
    """Prometheus rows: take the ``ttft``/``tpot`` pseudo-stage rows out of the
    stage table and into a summary."""
    pseudo = {semconv.TTFT, semconv.TPOT}
    taken = {row.stage: row for row in rows if row.stage in pseudo}
    if not taken:
        return rows, None

    def distribution(row: StageRow | None) -> Distribution | None:
        if row is None:
            return None
        return Distribution(row.count, row.p50, row.p95, row.p99, row.budget, row.status)

    generate = next((r for r in rows if r.stage == semconv.GENERATE), None)
    summary = GenerationSummary(
        requests=generate.count if generate is not None else 0,
        ttft=distribution(taken.get(semconv.TTFT)),
        tpot=distribution(taken.get(semconv.TPOT)),
    )
    return [row for row in rows if row.stage not in pseudo], summary


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _line(name: str, figure: Distribution | None, unit: str) -> str | None:
    if figure is None:
        return None
    fmt = _ms if unit == "ms" else (lambda v: "-" if v is None else f"{v:.1f}")
    text = (
        f"  {name:<13} p50 {fmt(figure.p50)}  p95 {fmt(figure.p95)}  p99 {fmt(figure.p99)} {unit}"
        f"  ({figure.count})"
    )
    if figure.budget is not None:
        text += f"  budget {_ms(figure.budget)} ms: {figure.status or '-'}"
    return text


def generation_lines(report: Report) -> list[str]:
    """The table's generation block (empty without generation)."""
    summary = getattr(report, "generation", None)
    if summary is None:
        return []
    lines = [
        f"Generation ({summary.requests} requests): time to first token from the request's "
        "start, time per output token after the first, output tokens per second of generate:"
    ]
    for name, figure, unit in (
        ("TTFT", summary.ttft, "ms"),
        ("TPOT", summary.tpot, "ms"),
        ("tokens/s", summary.tokens_per_second, "tok/s"),
    ):
        line = _line(name, figure, unit)
        if line is not None:
            lines.append(line)
    return lines


def generation_html(report: Report) -> str:
    """The HTML page's generation block (empty without generation)."""
    from html import escape

    lines = generation_lines(report)
    if not lines:
        return ""
    items = "".join(f"<li>{escape(line.strip())}</li>" for line in lines[1:])
    return f"<h2>Generation</h2><p>{escape(lines[0])}</p><ul>{items}</ul>"
