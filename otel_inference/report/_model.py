"""The report's data model: normalised spans in, per-stage rows and a verdict out.

Every input (an OTLP JSON Lines file, the Jaeger query API) is turned into
:class:`SpanRecord` objects; :func:`otel_inference.report.build_report` turns
those into a :class:`Report`, which every renderer (table, JSON, HTML) reads.

Usage::

    from otel_inference.report import build_report, load_spans_file

    report = build_report(load_spans_file("build/demo/spans.jsonl"), cost_per_hour=2.5)
    for row in report.rows:
        print(row.stage, row.p95)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_inference.report.generation import GenerationSummary

SpanKey = tuple[str, str]
"""``(trace id, span id)``, lowercase hex as the source wrote them."""


class ReportError(Exception):
    """Bad input (a missing or empty file, spans without our attributes, an
    unreachable Jaeger or Prometheus, a malformed option): the message says which."""


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, whatever the source.

    Times are wall-clock nanoseconds since the epoch (Jaeger's microseconds are
    scaled); ``kind`` is lowercase (``server``, ``internal``, ``client``...).
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict)
    links: tuple[SpanKey, ...] = ()
    service: str | None = None

    @property
    def key(self) -> SpanKey:
        return (self.trace_id, self.span_id)

    @property
    def parent_key(self) -> SpanKey | None:
        return None if self.parent_id is None else (self.trace_id, self.parent_id)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


@dataclass
class StageRow:
    """One row of the report. Durations are seconds (``None`` when unknown).

    ``kind`` is ``stage`` (a top-level stage), ``nested`` (a stage inside
    ``parent``), ``unattributed`` or ``request`` (end to end).
    ``tail_share``: among requests at or above the end-to-end p95, the mean
    fraction of their time spent in this stage (top-level stages and
    ``unattributed`` only). ``cost_per_request``: dollars, batch-shared work
    divided among its members. ``status``: ``ok`` or ``over`` (p95 against the
    budget), ``None`` without a budget.
    """

    stage: str
    kind: str
    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    parent: str | None = None
    mean: float | None = None
    tail_share: float | None = None
    budget: float | None = None
    status: str | None = None
    cost_per_request: float | None = None

    @property
    def label(self) -> str:
        return self.stage if self.parent is None else f"{self.stage} (in {self.parent})"


@dataclass
class Verdict:
    """Where the tail's time goes and what to change first.

    ``category`` is one of ``configuration`` (queue-bound), ``runtime``, ``cache``,
    ``model``, ``host``, ``downstream``, ``instrumentation``, ``prefill``
    (prefill-bound), ``decode`` (decode-bound), ``custom`` or ``none``.
    """

    stage: str | None
    category: str
    share: float | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Report:
    """The whole report: rows in serving-path order, then ``unattributed`` and
    ``request``; figures that need traces are ``None`` for Prometheus input."""

    source: str
    requests: int
    rows: list[StageRow]
    verdict: Verdict
    percentile_method: str
    tail_threshold: float | None = None
    tail_requests: int = 0
    cost_per_hour: float | None = None
    cost_per_request: float | None = None
    cache_hit_ratio: float | None = None
    cache_lookups: int = 0
    notes: list[str] = field(default_factory=list)
    # TTFT / TPOT / tokens per second when requests generated (report.generation)
    generation: GenerationSummary | None = None

    def row(self, stage: str, parent: str | None = None) -> StageRow:
        """The row of ``stage`` (nested rows: give ``parent``); ``KeyError`` if absent."""
        for row in self.rows:
            if row.stage == stage and row.parent == parent:
                return row
        raise KeyError(stage if parent is None else f"{parent}/{stage}")
