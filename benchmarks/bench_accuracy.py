"""Accuracy: does ``otel-inference report`` tell the truth about a pipeline whose costs we know?

A synthetic serving pipeline (queue_wait, feature_hydration, tokenize, h2d_transfer,
model_forward, d2h_transfer, postprocess, serialize) does controlled work in each
stage: seeded log-normal durations, plus a heavy tail (a rare large spike) in one
stage per shape. Each stage is wrapped in the real ``StageRecorder.stage()`` inside
``StageRecorder.request()``, and the pipeline measures, with ``perf_counter_ns``
INSIDE each stage, how long that stage's work really took: that is the truth. The
spans go through the real ``FileSpanExporter`` (OTLP JSON Lines) and back through
``load_spans_file`` and ``build_report``, and the report is compared with the truth:

* per-stage p50/p95 within 5% of the truth (or 0.2 ms, whichever is larger);
* share of tail within 3 points of the truth (tail: requests at or above the
  end-to-end p95 of the truly measured request durations);
* the verdict names the stage that was made heavy;
* in the ``gap`` shape, ``postprocess`` runs outside any stage: the report must show
  its time as ``unattributed`` (figures and share within the same tolerances) and
  the verdict must say so;
* in the ``N+1`` shape, a request hydrates features in 6 calls and serialises in 20:
  the truth is each request's summed work in the stage (its calls are sequential),
  which is what the report must show (a stage is what the request spent in it).

Percentiles are nearest rank on both sides, as the report computes them.

    .venv/bin/python -m benchmarks.bench_accuracy          # < 2 minutes; rewrites its section
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns

from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks.harness import RESULTS_PATH, BenchmarkResult, environment_line
from otel_inference import StageRecorder
from otel_inference.report import Report, build_report, load_spans_file

MS = 1_000_000  # ns
REL_TOLERANCE = 0.05
ABS_TOLERANCE_S = 0.0002
SHARE_TOLERANCE = 0.03
UNATTRIBUTED = "unattributed"
REQUEST = "request"
TITLE = "Accuracy: report vs a pipeline with known stage costs"

# Median work per stage (ms) in serving order; each shape overrides some.
BASE_MS: dict[str, float] = {
    "queue_wait": 0.6,
    "feature_hydration": 0.8,
    "tokenize": 0.6,
    "h2d_transfer": 0.3,
    "model_forward": 3.0,
    "d2h_transfer": 0.3,
    "postprocess": 0.4,
    "serialize": 0.4,
}


@dataclass(frozen=True)
class Shape:
    """A pipeline: per-stage median work, and a heavy tail in ``tail_stage``."""

    name: str
    expected: str  # the stage the verdict must name
    tail_stage: str
    overrides: dict[str, float] = field(default_factory=dict)
    tail_prob: float = 0.08
    tail_ms: tuple[float, float] = (12.0, 30.0)
    sigma: float = 0.25  # log-normal spread of the ordinary work
    uninstrumented: str | None = None  # a stage whose work runs outside any stage()
    # Stages whose work a request does in several calls (N+1 lookups, per-item
    # serialisation): the truth is the calls' summed work, as a request spends it.
    calls: dict[str, int] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        return {**BASE_MS, **self.overrides}


SHAPES: tuple[Shape, ...] = (
    Shape("queue-bound", "queue_wait", "queue_wait", {"queue_wait": 2.0}),
    Shape("feature-bound", "feature_hydration", "feature_hydration", {"feature_hydration": 2.0}),
    Shape("compute-bound", "model_forward", "model_forward", {"model_forward": 6.0}),
    Shape(
        "transfer-bound",
        "h2d_transfer",
        "h2d_transfer",
        {"h2d_transfer": 1.5, "d2h_transfer": 1.0},
        tail_ms=(8.0, 20.0),
    ),
    Shape(
        "gap (postprocess uninstrumented)",
        UNATTRIBUTED,
        "postprocess",
        {"postprocess": 1.0},
        uninstrumented="postprocess",
    ),
    Shape(
        "N+1 (6 feature lookups, 20 per-item serialisations)",
        "feature_hydration",
        "feature_hydration",
        {"feature_hydration": 2.0, "serialize": 1.0},
        calls={"feature_hydration": 6, "serialize": 20},
    ),
)


def work(ns: int) -> None:
    """Hold the thread ``ns`` nanoseconds: sleep most of it, spin the rest (precise end)."""
    end = perf_counter_ns() + ns
    if ns > 700_000:
        time.sleep((ns - 500_000) / 1e9)
    while perf_counter_ns() < end:
        pass


@dataclass
class Run:
    """One shape's run: what the pipeline measured, and what the report said."""

    shape: Shape
    truths: list[dict[str, int]]  # per request: stage -> ns of work, plus REQUEST
    report: Report
    exposition: str = ""  # the run's metrics as Prometheus scrapes them (text format)


def plan(shape: Shape, n: int, seed: int) -> list[dict[str, int]]:
    """Seeded per-request work (ns) per stage."""
    rng = random.Random(seed)
    medians = shape.medians()
    requests = []
    for _ in range(n):
        durations = {}
        for name, median in medians.items():
            ms = median * math.exp(rng.gauss(0.0, shape.sigma))
            if name == shape.tail_stage and rng.random() < shape.tail_prob:
                ms += rng.uniform(*shape.tail_ms)
            durations[name] = round(ms * MS)
        requests.append(durations)
    return requests


def run_shape(
    shape: Shape,
    n: int = 400,
    seed: int = 9,
    spans_dir: Path | None = None,
    budgets: Mapping[str, object] | str | None = None,
) -> Run:
    """Run ``n`` requests of ``shape`` under the real recorder, then report them.

    ``budgets`` go to the recorder as a user would give them (none by default).
    The run's metrics are kept as the Prometheus exporter serves them to a scrape.
    """
    resource = Resource.create({"service.name": "accuracy"})
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    # A registry of its own: the default one is process-global and would mix runs.
    registry = CollectorRegistry()
    meter_provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)], resource=resource
    )
    recorder = StageRecorder(provider, meter_provider, budgets={} if budgets is None else budgets)
    # One warm-up request (imports, first-call paths, the process's cold-start mark).
    with recorder.request():
        with recorder.stage("warmup"):
            work(100_000)
    memory.clear()

    truths: list[dict[str, int]] = []
    for durations in plan(shape, n, seed):
        truth: dict[str, int] = {}
        with recorder.request():
            request_start = perf_counter_ns()
            for name, ns in durations.items():
                if name == shape.uninstrumented:
                    t0 = perf_counter_ns()
                    work(ns)
                    truth[name] = perf_counter_ns() - t0
                    continue
                calls = shape.calls.get(name, 1)
                truth[name] = 0
                for _ in range(calls):  # the request's time in the stage: all its calls
                    with recorder.stage(name):
                        t0 = perf_counter_ns()
                        work(ns // calls)
                        truth[name] += perf_counter_ns() - t0
            truth[REQUEST] = perf_counter_ns() - request_start
        truths.append(truth)
    provider.force_flush()
    spans = memory.get_finished_spans()
    provider.shutdown()
    exposition = generate_latest(registry).decode()
    meter_provider.shutdown()

    # Through the real file format and loader, as `otel-inference report --spans` reads it.
    with tempfile.TemporaryDirectory(dir=spans_dir) as tmp:
        path = Path(tmp) / "spans.jsonl"
        exporter = FileSpanExporter(path)
        exporter.export(spans)
        exporter.shutdown()
        report = build_report(load_spans_file(path))
    return Run(shape, truths, report, exposition)


def nearest_rank(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@dataclass
class Check:
    stage: str
    truth_p50: float | None
    reported_p50: float | None
    truth_p95: float | None
    reported_p95: float | None
    truth_share: float | None
    reported_share: float | None

    @staticmethod
    def _close(truth: float | None, reported: float | None) -> bool:
        if truth is None:
            return True
        if reported is None:
            return False
        return abs(reported - truth) <= max(REL_TOLERANCE * truth, ABS_TOLERANCE_S)

    @property
    def p50_ok(self) -> bool:
        return self._close(self.truth_p50, self.reported_p50)

    @property
    def p95_ok(self) -> bool:
        return self._close(self.truth_p95, self.reported_p95)

    @property
    def share_ok(self) -> bool:
        if self.truth_share is None:
            return True
        return (
            self.reported_share is not None
            and abs(self.reported_share - self.truth_share) <= SHARE_TOLERANCE
        )

    @property
    def ok(self) -> bool:
        return self.p50_ok and self.p95_ok and self.share_ok


@dataclass
class Evaluation:
    run: Run
    checks: list[Check]
    tail_requests: int
    gap_work_p50: float = 0.0  # the uninstrumented stage's own work (s)
    overhead_p50: float = 0.0  # uncovered time that is no stage's work: instrumentation (s)
    overhead_tail_share: float = 0.0

    @property
    def gap_reported(self) -> bool:
        """With a stage left uninstrumented, its work shows up as ``unattributed``."""
        if self.run.shape.uninstrumented is None:
            return True
        row = self.run.report.row(UNATTRIBUTED)
        return row.p50 is not None and row.p50 >= self.gap_work_p50 * (1 - REL_TOLERANCE)

    @property
    def verdict_ok(self) -> bool:
        return self.run.report.verdict.stage == self.run.shape.expected

    @property
    def ok(self) -> bool:
        return self.verdict_ok and self.gap_reported and all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        out = []
        for c in self.checks:
            for what, ok, truth, rep in (
                ("p50", c.p50_ok, c.truth_p50, c.reported_p50),
                ("p95", c.p95_ok, c.truth_p95, c.reported_p95),
                ("tail share", c.share_ok, c.truth_share, c.reported_share),
            ):
                if not ok:
                    out.append(f"{c.stage} {what}: truth {truth}, reported {rep}")
        if not self.gap_reported:
            out.append(f"uninstrumented work (p50 {self.gap_work_p50}) not in unattributed")
        if not self.verdict_ok:
            out.append(
                f"verdict: expected {self.run.shape.expected}, "
                f"reported {self.run.report.verdict.stage}"
            )
        return out


def evaluate(run: Run) -> Evaluation:
    """Compare the report with the truth the pipeline measured."""
    shape, truths, report = run.shape, run.truths, run.report
    seconds = [{k: v / 1e9 for k, v in t.items()} for t in truths]
    ends = [t[REQUEST] for t in seconds]
    threshold = nearest_rank(ends, 0.95)
    tail = [t for t in seconds if t[REQUEST] >= threshold]

    def share(name: str) -> float:
        return sum(t.get(name, 0.0) / t[REQUEST] for t in tail) / len(tail)

    def row(name: str):
        try:
            return report.row(name)
        except KeyError:
            return None

    checks = []
    for name in shape.medians():
        if name == shape.uninstrumented:
            continue
        values = [t[name] for t in seconds]
        r = row(name)
        checks.append(
            Check(
                name,
                nearest_rank(values, 0.5),
                r.p50 if r else None,
                nearest_rank(values, 0.95),
                r.p95 if r else None,
                share(name),
                r.tail_share if r else None,
            )
        )
    # unattributed: the application's own time that no stage covers: the uninstrumented
    # stage's work (none in the other shapes; the loop's glue is microseconds). The
    # instrumentation's own time between stages is reported apart
    # (inference.instrumentation.duration), never as the application's.
    for t in seconds:
        t[UNATTRIBUTED] = t[shape.uninstrumented] if shape.uninstrumented else 0.0
    gaps = [t[UNATTRIBUTED] for t in seconds]
    r = row(UNATTRIBUTED)
    checks.append(
        Check(
            UNATTRIBUTED,
            nearest_rank(gaps, 0.5),
            r.p50 if r else None,
            nearest_rank(gaps, 0.95),
            r.p95 if r else None,
            share(UNATTRIBUTED),
            r.tail_share if r else None,
        )
    )
    r = row(REQUEST)
    checks.append(
        Check(
            REQUEST,
            nearest_rank(ends, 0.5),
            r.p50 if r else None,
            nearest_rank(ends, 0.95),
            r.p95 if r else None,
            None,
            None,
        )
    )
    gap = shape.uninstrumented
    return Evaluation(
        run,
        checks,
        len(tail),
        gap_work_p50=nearest_rank([t[gap] for t in seconds], 0.5) if gap else 0.0,
        overhead_p50=nearest_rank(
            [t[UNATTRIBUTED] - (t[gap] if gap else 0.0) for t in seconds], 0.5
        ),
        overhead_tail_share=share(UNATTRIBUTED) - (share(gap) if gap else 0.0),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def markdown(evaluations: Sequence[Evaluation], n: int, elapsed_s: float) -> str:
    lines = [
        f"## {TITLE}",
        "",
        f"{n} requests per shape, seeded, one process, {elapsed_s:.0f} s in all; "
        f"{environment_line()}",
        "",
        "Truth: each stage's work timed with perf_counter_ns inside the stage by the "
        "pipeline itself; reported: `build_report` over the spans written by FileSpanExporter "
        "and read back by `load_spans_file`. Criteria: p50/p95 within 5% (or 0.2 ms), share "
        "of tail within 3 points, verdict names the heavy stage. Times in ms.",
    ]
    for ev in evaluations:
        shape, report = ev.run.shape, ev.run.report
        lines += [
            "",
            f"### {shape.name}: {_mark(ev.ok)}",
            "",
            f"Heavy tail in `{shape.tail_stage}` (+{shape.tail_ms[0]:g}..{shape.tail_ms[1]:g} ms "
            f"in {shape.tail_prob:.0%} of requests)"
            + (f"; `{shape.uninstrumented}` runs outside any stage" if shape.uninstrumented else "")
            + f". Tail: {ev.tail_requests} requests (truth), {report.tail_requests} (report).",
            "",
            "| stage | p50 truth | p50 reported | p50 | p95 truth | p95 reported | p95 "
            "| tail share truth | reported | share |",
            "|---|---:|---:|---|---:|---:|---|---:|---:|---|",
        ]
        for c in ev.checks:
            share_mark = "n/a" if c.truth_share is None else _mark(c.share_ok)
            lines.append(
                f"| {c.stage} | {_ms(c.truth_p50)} | {_ms(c.reported_p50)} | {_mark(c.p50_ok)} "
                f"| {_ms(c.truth_p95)} | {_ms(c.reported_p95)} | {_mark(c.p95_ok)} "
                f"| {_pct(c.truth_share)} | {_pct(c.reported_share)} | {share_mark} |"
            )
        lines += [
            "",
            f"- Verdict: expected `{shape.expected}`, reported `{report.verdict.stage}` "
            f"({report.verdict.category}): {_mark(ev.verdict_ok)}. "
            f'"{report.verdict.lines[0]}"',
            f"- Unattributed truth = request time minus every instrumented stage's measured work: "
            f"the instrumentation's own time between stages is {ev.overhead_p50 * 1000:.3f} ms "
            f"per request at p50 ({ev.overhead_tail_share * 100:.1f} points of the tail)"
            + (
                f"; the uninstrumented `{shape.uninstrumented}` work (p50 "
                f"{ev.gap_work_p50 * 1000:.3f} ms) is reported as unattributed: "
                f"{_mark(ev.gap_reported)}."
                if shape.uninstrumented
                else "."
            ),
        ]
    passed = sum(ev.ok for ev in evaluations)
    lines += ["", f"Overall: {passed}/{len(evaluations)} shapes pass every criterion."]
    return "\n".join(lines) + "\n"


@dataclass
class _Section(BenchmarkResult):
    """A results.md section with free-form markdown (reuses the harness's in-place rewrite)."""

    body: str = ""

    def markdown(self) -> str:
        return self.body


def main(n: int = 400) -> list[Evaluation]:
    start = time.perf_counter()
    evaluations = []
    for index, shape in enumerate(SHAPES):
        run = run_shape(shape, n=n, seed=9 + index)
        ev = evaluate(run)
        evaluations.append(ev)
        print(f"{shape.name}: {'PASS' if ev.ok else 'FAIL'} {ev.failures()}", flush=True)
    body = markdown(evaluations, n, time.perf_counter() - start)
    _Section(TITLE, None, n, 1, {}, body=body).write(RESULTS_PATH)
    print(body)
    return evaluations


if __name__ == "__main__":
    main()
