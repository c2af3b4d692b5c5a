"""From spans to a :class:`~otel_inference.report.Report`: requests, stages, tail, cost.

Usage::

    from otel_inference.report import build_report, load_spans_file

    report = build_report(
        load_spans_file("spans.jsonl"),
        budgets={"tokenize": 0.005},
        cost_per_hour=2.5,
    )
    print(report.verdict.text)

How spans are read (see ``docs/report.md`` for the whole story):

* **Stages** are spans carrying ``inference.stage``. **Requests** are our
  ``request()`` spans (they carry ``inference.unattributed.duration``) and SERVER
  spans with a stage below them (in the same service); when candidates nest, the
  outermost is the request, so nothing is counted twice.
* A stage belongs to the request it sits under. A **batch span** (a stage span
  linked to its members' spans, ``otel_inference.batching``) also belongs to every
  member request it links to, and to every request whose span carrying
  ``inference.batch.share`` links to it: each member experienced the whole batch,
  and is charged ``1 / inference.batch.size`` of it (the number of links when the
  size is absent).
* A stage is **top level** in its request when no other stage encloses it (and it
  carries no ``inference.stage.parent``); only top-level stages take a share of
  the request's time, so nested time is never counted twice.
* **Event loop.** Time the event loop was held (``inference.event_loop.blocked.duration``
  on the spans it overlapped, from the runtime instrumentor) is the request's,
  not the stage's: the ``event_loop`` row holds it (a ``request()`` span's own
  total, else the sum over its top-level stages), and it is taken out of the
  stages' and ``unattributed``'s tail shares. Synchronous stages carrying
  ``inference.stage.cpu.duration`` get an on-CPU share.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from otel_inference import semconv
from otel_inference.report._budgets import choose_budgets, learnt_budgets
from otel_inference.report._model import (
    LoopCulprit,
    Report,
    ReportError,
    SpanKey,
    SpanRecord,
    StageRow,
)
from otel_inference.report._stats import (
    PERCENTILE_METHOD,
    clip,
    nearest_rank,
    union_length,
)
from otel_inference.report.generation import summarise_spans
from otel_inference.report.padding import padding_summary
from otel_inference.report.timeline import slowest_requests, stage_timeline
from otel_inference.report.verdict import decide

ORDER = (
    semconv.PARSE,
    semconv.QUEUE_WAIT,
    semconv.FEATURE_HYDRATION,
    semconv.PREPROCESS,
    semconv.TOKENIZE,
    semconv.BATCH,
    semconv.H2D_TRANSFER,
    semconv.MODEL_FORWARD,
    semconv.D2H_TRANSFER,
    semconv.POSTPROCESS,
    semconv.SERIALIZE,
    "downstream",
)
"""Serving-path order of the rows; custom stages follow, by name."""

_SECONDS_PER_HOUR = 3600


def _stage_of(span: SpanRecord) -> str | None:
    value = span.attributes.get(semconv.INFERENCE_STAGE)
    return value if isinstance(value, str) and value else None


def _declared_parent(span: SpanRecord) -> str | None:
    value = span.attributes.get(semconv.INFERENCE_STAGE_PARENT)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Observation:
    """One stage span as seen by one request."""

    request: SpanKey
    span: SpanRecord
    stage: str
    parent: str | None  # enclosing stage, None at top level
    weight: float  # the request's share of the span's work (1 / batch size when shared)


class _Index:
    """Spans by key, their children, their owning request."""

    def __init__(self, spans: Iterable[SpanRecord]) -> None:
        self.spans: dict[SpanKey, SpanRecord] = {}
        for span in spans:
            self.spans[span.key] = span
        self.requests: dict[SpanKey, SpanRecord] = {}
        self._owner: dict[SpanKey, SpanKey | None] = {}

    def parent(self, span: SpanRecord) -> SpanRecord | None:
        """The parent span when it is in the input and in the same service."""
        key = span.parent_key
        parent = None if key is None else self.spans.get(key)
        if parent is None or parent.service != span.service:
            return None
        return parent

    def ancestors(self, span: SpanRecord) -> Iterable[SpanRecord]:
        seen = {span.key}
        parent = self.parent(span)
        while parent is not None and parent.key not in seen:
            seen.add(parent.key)
            yield parent
            parent = self.parent(parent)

    def find_requests(self) -> None:
        candidates = {
            key
            for key, span in self.spans.items()
            if semconv.INFERENCE_UNATTRIBUTED in span.attributes and _stage_of(span) is None
        }
        for span in self.spans.values():
            if _stage_of(span) is None:
                continue
            for ancestor in self.ancestors(span):
                if ancestor.kind == "server" and _stage_of(ancestor) is None:
                    candidates.add(ancestor.key)
        for key in candidates:
            span = self.spans[key]
            if not any(a.key in candidates for a in self.ancestors(span)):
                self.requests[key] = span

    def owner(self, span: SpanRecord) -> SpanKey | None:
        """The request ``span`` belongs to (itself if it is one), or ``None``."""
        if span.key in self._owner:
            return self._owner[span.key]
        found: SpanKey | None = None
        path = [span]
        if span.key not in self.requests:
            for ancestor in self.ancestors(span):
                if ancestor.key in self._owner:
                    found = self._owner[ancestor.key]
                    break
                if ancestor.key in self.requests:
                    found = ancestor.key
                    break
                path.append(ancestor)
        else:
            found = span.key
        for visited in path:
            self._owner[visited.key] = found
        return found

    def enclosing_stage(self, span: SpanRecord, request: SpanKey, *, inclusive: bool) -> str | None:
        """The nearest stage on the way from ``span`` (itself if ``inclusive``) up
        to ``request``, as declared by ``inference.stage.parent`` or found."""
        if inclusive and _stage_of(span) is not None:
            return _stage_of(span)
        declared = _declared_parent(span)
        if declared is not None:
            return declared
        for ancestor in self.ancestors(span):
            if ancestor.key == request:
                return None
            stage = _stage_of(ancestor)
            if stage is not None:
                return stage
        return None


def batch_size(span: SpanRecord) -> int | None:
    """Members sharing ``span``: a stage span linked to its members (not a member's
    own span, which carries ``inference.batch.share``); ``None`` when not shared."""
    if not span.links or semconv.INFERENCE_BATCH_SHARE in span.attributes:
        return None
    size = span.attributes.get(semconv.INFERENCE_BATCH_SIZE)
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size >= 1:
        return int(size)
    return len(span.links)


def _member_share(span: SpanRecord) -> float | None:
    """``inference.batch.share`` of a member's span that links to its batch."""
    share = span.attributes.get(semconv.INFERENCE_BATCH_SHARE)
    if not span.links or isinstance(share, bool) or not isinstance(share, (int, float)):
        return None
    return float(share) if 0 < share <= 1 else None


def observations(index: _Index) -> list[Observation]:
    """Every (request, stage span) pair, batch spans once per member request."""
    # A request's share of each shared span: 1 / size from the batch span's own
    # links, else the share its members' spans declare when they link to it.
    weights: dict[SpanKey, float] = {}
    for span in index.spans.values():
        share = _member_share(span)
        for link in span.links if share is not None else ():
            weights.setdefault(link, share)  # type: ignore[arg-type]
    for span in index.spans.values():
        size = batch_size(span) if _stage_of(span) is not None else None
        if size is not None:
            weights[span.key] = 1.0 / size

    found: dict[tuple[SpanKey, SpanKey], Observation] = {}

    def add(request: SpanKey, span: SpanRecord, parent: str | None) -> None:
        stage = _stage_of(span)
        if stage is not None and (request, span.key) not in found:
            weight = weights.get(span.key, 1.0)
            found[(request, span.key)] = Observation(request, span, stage, parent, weight)

    for span in index.spans.values():
        if _stage_of(span) is not None:
            request = index.owner(span)
            if request is not None and request != span.key:
                add(request, span, index.enclosing_stage(span, request, inclusive=False))
            if batch_size(span) is not None:
                for link in span.links:  # a batch span: its members
                    member = index.spans.get(link)
                    request = None if member is None else index.owner(member)
                    if member is not None and request is not None:
                        add(request, span, index.enclosing_stage(member, request, inclusive=True))
        if _member_share(span) is not None:
            request = index.owner(span)  # a member's span, linked to its batch
            for link in span.links:
                batch = index.spans.get(link)
                if request is not None and batch is not None:
                    add(request, batch, index.enclosing_stage(span, request, inclusive=False))
    return list(found.values())


def _compressed_ns(span: SpanRecord) -> int | None:
    """The calls' time of a compressed span (``inference.stage.calls`` > 1), else None."""
    calls = span.attributes.get(semconv.STAGE_CALLS)
    busy = span.attributes.get(semconv.INFERENCE_STAGE_CALLS_DURATION)
    if isinstance(calls, int) and calls > 1 and isinstance(busy, (int, float)):
        return max(0, min(round(busy * 1e9), span.duration_ns))
    return None


def spent_ns(spans: Iterable[SpanRecord], request: SpanRecord) -> int:
    """What ``request`` spent in a stage, given its spans of the stage: the union of
    the plain spans (clipped to the request) plus the compressed spans' calls' time,
    as :func:`_summarise` counts a row's per-request value."""
    plain, busy = [], 0
    for span in spans:
        compressed = _compressed_ns(span)
        if compressed is None:
            plain.append(clip((span.start_ns, span.end_ns), (request.start_ns, request.end_ns)))
        else:
            busy += compressed
    return union_length(plain) + busy


def order_key(stage: str) -> tuple[int, str]:
    return (ORDER.index(stage), "") if stage in ORDER else (len(ORDER), stage)


def _row(
    stage: str,
    kind: str,
    values_ns: list[int],
    *,
    parent: str | None = None,
    budgets: Mapping[str, float],
) -> StageRow:
    row = StageRow(
        stage=stage,
        kind=kind,
        parent=parent,
        count=len(values_ns),
        p50=nearest_rank(values_ns, 0.50) / 1e9 if values_ns else None,
        p95=nearest_rank(values_ns, 0.95) / 1e9 if values_ns else None,
        p99=nearest_rank(values_ns, 0.99) / 1e9 if values_ns else None,
        mean=sum(values_ns) / len(values_ns) / 1e9 if values_ns else None,
    )
    row.budget = budgets.get(stage)
    if row.budget is not None and row.p95 is not None:
        row.status = "over" if row.p95 > row.budget else "ok"
    return row


def _is_true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def build_report(
    spans: Iterable[SpanRecord],
    *,
    budgets: Mapping[str, float] | None = None,
    cost_per_hour: float | None = None,
    exclude_cold_start: bool = False,
    source: str = "spans",
    default_budgets: Mapping[str, float] | None = None,
) -> Report:
    """The per-stage report of ``spans`` (see the module docstring for the rules).

    Budgets (stage -> seconds): ``budgets`` (explicit, ``--budgets``) override
    those the spans carry (``inference.budget``), which override
    ``default_budgets`` (the report's own environment). ``cost_per_hour``: dollars per hour of the
    serving machine; a request's cost in a stage is its time there (its share,
    for batch-shared work) x ``cost_per_hour`` / 3600. Raises
    :class:`ReportError` when no span is a stage, or no request holds one.
    """
    index = _Index(spans)
    stage_spans = [span for span in index.spans.values() if _stage_of(span) is not None]
    if not stage_spans:
        services = sorted({span.service or "?" for span in index.spans.values()})
        raise ReportError(
            f"none of the {len(index.spans)} spans (services: {', '.join(services)}) carries "
            f"{semconv.INFERENCE_STAGE!r}: they were not recorded by otel-inference "
            "(run the service under opentelemetry-instrument with otel-inference installed)"
        )
    index.find_requests()
    notes: list[str] = []
    if not index.requests:
        raise ReportError(
            f"{len(stage_spans)} stage spans but no request span: expected a request() span "
            f"(it carries {semconv.INFERENCE_UNATTRIBUTED!r}) or a SERVER span with stages "
            "under it"
        )
    budget_notes: list[str] = []
    chosen = choose_budgets(
        explicit=budgets,
        telemetry=_span_budgets(index, budget_notes, {*(budgets or {}), *(default_budgets or {})}),
        environment=default_budgets,
        notes=budget_notes,
    )
    notes.extend(budget_notes)
    obs = observations(index)
    owned = {o.span.key for o in obs}
    outside = sum(1 for span in stage_spans if span.key not in owned)
    if outside:
        notes.append(
            f"{outside} stage span(s) outside any request (warm-up, background work, or "
            "a request span missing from the input) are left out"
        )
    if exclude_cold_start:
        # request() flags its span; under a web framework's span, the stages carry the flag.
        cold = {
            key
            for key, span in index.requests.items()
            if _is_true(span.attributes.get(semconv.INFERENCE_COLD_START))
        }
        cold.update(
            o.request for o in obs if _is_true(o.span.attributes.get(semconv.INFERENCE_COLD_START))
        )
        for key in cold:
            del index.requests[key]
        obs = [o for o in obs if o.request not in cold]
        notes.append(f"{len(cold)} cold-start request(s) excluded")
        if not index.requests:
            raise ReportError(
                f"all {len(cold)} requests are cold starts: nothing is left without them"
            )
    report = _summarise(
        index,
        obs,
        {stage: value for stage, (value, _) in chosen.items()},
        cost_per_hour,
        source,
        notes,
    )
    _add_views(report, index, obs, chosen)
    return report


def _span_budgets(index: _Index, notes: list[str], given: set[str]) -> dict[str, float]:
    """The budgets the spans carry (``inference.budget``, seconds): stage spans,
    and ``request()`` spans for ``request``; notes on disagreement, and on spans
    judged against a budget (``inference.budget.exceeded``) that do not say it."""
    values: dict[str, list[float]] = defaultdict(list)
    unsaid: set[str] = set()
    for span in index.spans.values():
        stage = _stage_of(span)
        if stage is None and semconv.INFERENCE_UNATTRIBUTED in span.attributes:
            stage = semconv.REQUEST
        if stage is None:
            continue
        value = span.attributes.get(semconv.INFERENCE_BUDGET)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            values[stage].append(float(value))
        elif semconv.INFERENCE_BUDGET_EXCEEDED in span.attributes:
            unsaid.add(stage)
    learnt, disagreements = learnt_budgets(values, what="span")
    notes.extend(disagreements)
    unsaid -= {*learnt, *given}
    if unsaid:
        notes.append(
            f"spans of {', '.join(sorted(unsaid))} were judged against a budget "
            f"({semconv.INFERENCE_BUDGET_EXCEEDED}) without carrying it "
            f"({semconv.INFERENCE_BUDGET}): pass --budgets to see it"
        )
    return learnt


def _add_views(
    report: Report,
    index: _Index,
    obs: list[Observation],
    budgets: Mapping[str, tuple[float, str]],
) -> None:
    """What the rows do not hold: where each budget came from, padding waste, the
    timeline and the slowest requests' waterfalls."""
    for row in report.rows:
        if row.budget is not None and row.stage in budgets:
            row.budget_source = budgets[row.stage][1]
    rate = None if report.cost_per_hour is None else report.cost_per_hour / _SECONDS_PER_HOUR
    unique = {o.span.key: o.span for o in obs}
    report.padding = padding_summary(unique.values(), requests=report.requests, rate=rate)
    report.timeline = stage_timeline(index.requests, obs)
    report.slowest = slowest_requests(index, obs)


def _summarise(
    index: _Index,
    obs: list[Observation],
    budgets: Mapping[str, float],
    cost_per_hour: float | None,
    source: str,
    notes: list[str],
) -> Report:
    requests = index.requests
    durations = {key: span.duration_ns for key, span in requests.items()}
    top_intervals: dict[SpanKey, dict[str, list[tuple[int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    # Per stage and request: its spans of the stage (batch spans once per member).
    spans_of: dict[tuple[str, str | None], dict[SpanKey, list[SpanRecord]]] = defaultdict(
        lambda: defaultdict(list)
    )
    work: dict[tuple[str, str | None], float] = defaultdict(float)  # weighted ns
    hits = misses = 0
    for o in obs:
        span = o.span
        key = (o.stage, o.parent)
        spans_of[key][o.request].append(span)
        busy = _compressed_ns(span)
        if busy is None:
            request = requests[o.request]
            interval = clip((span.start_ns, span.end_ns), (request.start_ns, request.end_ns))
            work[key] += span.duration_ns * o.weight
        else:
            # For the tail's union: the calls' time, placed at the end of the span.
            interval = (max(span.start_ns, span.end_ns - busy), span.end_ns)
            work[key] += busy * o.weight
        if o.parent is None:
            top_intervals[o.request][o.stage].append(interval)
        h = span.attributes.get(semconv.CACHE_HITS)
        m = span.attributes.get(semconv.CACHE_MISSES)
        if isinstance(h, int) and isinstance(m, int):
            hits, misses = hits + h, misses + m

    # A stage is what the request spent in it: one value per request (the union of
    # its calls), as inference.stage.duration records it.
    values: dict[tuple[str, str | None], list[int]] = {
        key: [spent_ns(spans, requests[request]) for request, spans in by_request.items()]
        for key, by_request in spans_of.items()
    }

    loop = _event_loop(requests, obs, durations)
    unattributed: dict[SpanKey, int] = {}
    for key, request in requests.items():
        declared = request.attributes.get(semconv.INFERENCE_UNATTRIBUTED)
        if isinstance(declared, (int, float)) and not isinstance(declared, bool):
            unattributed[key] = max(0, round(declared * 1e9))
        else:
            covered = union_length(i for ivs in top_intervals[key].values() for i in ivs)
            unattributed[key] = max(0, durations[key] - covered)
        if loop is not None:
            unattributed[key] = max(0, unattributed[key] - loop.gap.get(key, 0))

    threshold = nearest_rank(list(durations.values()), 0.95)
    tail = [key for key, d in durations.items() if d >= threshold and d > 0]

    def tail_share(time_of: Mapping[SpanKey, int]) -> float | None:
        if not tail:
            return None
        return sum(time_of.get(key, 0) / durations[key] for key in tail) / len(tail)

    rate = None if cost_per_hour is None else cost_per_hour / _SECONDS_PER_HOUR
    n = len(requests)
    rows: list[StageRow] = []
    top = sorted({s for s, p in values if p is None}, key=order_key)
    nested = sorted({(s, p) for s, p in values if p is not None}, key=lambda k: order_key(k[0]))
    for stage in top:
        row = _row(stage, "stage", values[(stage, None)], budgets=budgets)
        row.tail_share = tail_share(
            {
                key: union_length(ivs[stage])
                - (0 if loop is None else loop.held(key, stage, union_length(ivs[stage])))
                for key, ivs in top_intervals.items()
                if stage in ivs
            }
        )
        if rate is not None:
            row.cost_per_request = work[(stage, None)] / 1e9 * rate / n
        rows.append(row)
        for child, parent in [k for k in nested if k[1] == stage]:
            rows.append(_nested_row(child, parent, values, work, rate, n, budgets))
    for child, parent in [k for k in nested if k[1] not in top]:
        rows.append(_nested_row(child, parent, values, work, rate, n, budgets))

    if loop is not None:
        held = _row(semconv.EVENT_LOOP, "event_loop", list(loop.requests.values()), budgets=budgets)
        held.tail_share = tail_share(loop.requests)
        rows.append(held)
    _cpu_shares(rows, obs)
    gap = _row(semconv.UNATTRIBUTED, "unattributed", list(unattributed.values()), budgets=budgets)
    gap.tail_share = tail_share(unattributed)
    if rate is not None:
        gap.cost_per_request = sum(unattributed.values()) / 1e9 * rate / n
    rows.append(gap)
    end_to_end = _row(semconv.REQUEST, "request", list(durations.values()), budgets=budgets)
    total_cost = None
    if rate is not None:
        total_cost = sum(r.cost_per_request or 0.0 for r in rows if r.kind != "nested")
        end_to_end.cost_per_request = total_cost
    rows.append(end_to_end)
    hit_ratio = hits / (hits + misses) if hits + misses else None
    gc_note = _gc_note(requests, durations, tail)
    if gc_note is not None:
        notes.append(gc_note)
    return Report(
        source=source,
        requests=n,
        rows=rows,
        verdict=decide(
            rows,
            hit_ratio=hit_ratio,
            lookups=hits + misses,
            tail_threshold=threshold / 1e9,
            loop_culprits=[] if loop is None else loop.culprits,
        ),
        percentile_method=PERCENTILE_METHOD,
        tail_threshold=threshold / 1e9,
        tail_requests=len(tail),
        cost_per_hour=cost_per_hour,
        cost_per_request=total_cost,
        cache_hit_ratio=hit_ratio,
        cache_lookups=hits + misses,
        notes=notes,
        event_loop_culprits=[] if loop is None else loop.culprits,
        generation=summarise_spans(requests, ((o.request, o.stage, o.span) for o in obs), budgets),
    )


def _number_attribute(span: SpanRecord, name: str) -> float | None:
    value = span.attributes.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


@dataclass
class _LoopFigures:
    """Time the event loop was held, per request and per (request, top-level stage)."""

    requests: dict[SpanKey, int]
    stages: dict[tuple[SpanKey, str], int]
    gap: dict[SpanKey, int]  # held while no top-level stage was open (unattributed)
    culprits: list[LoopCulprit]

    def held(self, request: SpanKey, stage: str, stage_ns: int) -> int:
        return min(stage_ns, self.stages.get((request, stage), 0))


_MAX_CULPRITS = 5


def _event_loop(
    requests: Mapping[SpanKey, SpanRecord], obs: list[Observation], durations: Mapping[SpanKey, int]
) -> _LoopFigures | None:
    """The event loop's figures, or ``None`` when no span carries any (monitor off)."""
    found = False
    stages: dict[tuple[SpanKey, str], int] = defaultdict(int)
    staged: dict[SpanKey, int] = defaultdict(int)
    by_culprit: dict[tuple[str, str], int] = defaultdict(int)

    def blame(span: SpanRecord, held_ns: int) -> None:
        kind = span.attributes.get(semconv.INFERENCE_EVENT_LOOP_BLOCKED_KIND)
        culprit = span.attributes.get(semconv.INFERENCE_EVENT_LOOP_BLOCKED_CULPRIT)
        by_culprit[(str(kind or "unknown"), str(culprit or "unknown"))] += held_ns

    for o in obs:
        seconds = _number_attribute(o.span, semconv.INFERENCE_EVENT_LOOP_BLOCKED)
        if seconds is None or o.parent is not None:
            continue
        found = True
        held_ns = min(o.span.duration_ns, round(seconds * 1e9))
        stages[(o.request, o.stage)] += held_ns
        staged[o.request] += held_ns
        blame(o.span, held_ns)
    totals: dict[SpanKey, int] = {}
    gap: dict[SpanKey, int] = {}
    for key, request in requests.items():
        declared = _number_attribute(request, semconv.INFERENCE_EVENT_LOOP_BLOCKED)
        if declared is None:
            totals[key] = min(durations[key], staged.get(key, 0))
            continue
        found = True
        totals[key] = min(durations[key], round(declared * 1e9))
        gap[key] = max(0, totals[key] - staged.get(key, 0))
        if gap[key]:
            blame(request, gap[key])
    if not found:
        return None
    all_held = sum(by_culprit.values())
    culprits = [
        LoopCulprit(kind, culprit, held_ns / 1e9, held_ns / all_held)
        for (kind, culprit), held_ns in sorted(by_culprit.items(), key=lambda item: -item[1])
        if held_ns > 0
    ][:_MAX_CULPRITS]
    return _LoopFigures(totals, dict(stages), gap, culprits)


def _cpu_shares(rows: list[StageRow], obs: list[Observation]) -> None:
    """On-CPU share of the rows whose spans carry their thread CPU time."""
    cpu: dict[tuple[str, str | None], float] = defaultdict(float)
    wall: dict[tuple[str, str | None], int] = defaultdict(int)
    seen: set[SpanKey] = set()
    for o in obs:
        seconds = _number_attribute(o.span, semconv.INFERENCE_STAGE_CPU)
        if seconds is None or o.span.key in seen or _compressed_ns(o.span) is not None:
            continue  # (a compressed span's CPU time is its first call's only)
        seen.add(o.span.key)
        cpu[(o.stage, o.parent)] += seconds * 1e9
        wall[(o.stage, o.parent)] += o.span.duration_ns
    for row in rows:
        key = (row.stage, row.parent)
        if wall.get(key):
            row.cpu_share = min(1.0, cpu[key] / wall[key])


_GC_NOTE_SHARE = 0.05  # GC pauses worth a sentence: 5% of the tail requests' time


def _gc_note(
    requests: Mapping[SpanKey, SpanRecord], durations: Mapping[SpanKey, int], tail: list[SpanKey]
) -> str | None:
    """ "p99 spikes coincide with GC pauses" as a sentence, from the request spans'
    ``inference.gc.pause.duration`` (the runtime instrumentor's per-request total)."""
    pauses = {}
    for key, request in requests.items():
        value = request.attributes.get(semconv.INFERENCE_GC_PAUSE_DURATION)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            pauses[key] = float(value)
    if not pauses or not tail:
        return None
    tail_keys = set(tail)
    tail_pause = sum(pauses.get(key, 0.0) for key in tail) / len(tail)
    tail_share = sum(pauses.get(key, 0.0) / (durations[key] / 1e9) for key in tail) / len(tail)
    if tail_share < _GC_NOTE_SHARE:
        return None
    rest = [key for key in durations if key not in tail_keys]
    rest_pause = sum(pauses.get(key, 0.0) for key in rest) / len(rest) if rest else 0.0
    return (
        f"GC: requests at or above p95 spent {tail_pause * 1000:.1f} ms on average "
        f"({tail_share:.0%} of their time) paused by garbage collection, vs "
        f"{rest_pause * 1000:.1f} ms for the others; consider gc.freeze() after model load "
        "(OTEL_INFERENCE_GC_FREEZE=true)."
    )


def _nested_row(
    stage: str,
    parent: str,
    values: Mapping[tuple[str, str | None], list[int]],
    work: Mapping[tuple[str, str | None], float],
    rate: float | None,
    n: int,
    budgets: Mapping[str, float],
) -> StageRow:
    row = _row(stage, "nested", values[(stage, parent)], parent=parent, budgets=budgets)
    if rate is not None:
        row.cost_per_request = work[(stage, parent)] / 1e9 * rate / n
    return row
