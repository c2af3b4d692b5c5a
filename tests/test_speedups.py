"""The compiled hot path (``otel_inference/_speedups.c``) against the Python it mirrors.

The compiled stage core and interval arithmetic must behave exactly as the Python
reference: same tallies, same telemetry, no leaked references, failures logged and
never raised into the application. The whole accounting suite also runs on the
Python core (``OTEL_INFERENCE_SPEEDUPS=false``) so that the fallback stays right.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from time import perf_counter_ns, time_ns

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from otel_inference import StageRecorder, _logging, accounting
from otel_inference import stages as stages_module
from otel_inference.runtime import COLD_START
from tests.servers import missing

ROOT = Path(__file__).resolve().parent.parent


def compiled():
    """The built ``_speedups`` module; under CI its absence fails (bootstrap builds it)."""
    try:
        from otel_inference import _speedups
    except ImportError:
        missing("gcc")
    return _speedups


def test_stages_run_on_the_compiled_core_when_it_is_built():
    compiled()
    assert stages_module.STAGE_CORE == "compiled"
    assert issubclass(stages_module.StageScope, compiled().StageCore)


def test_its_clock_is_perf_counter_ns():
    speedups = compiled()
    for _ in range(1000):
        before = perf_counter_ns()
        reading = speedups.now_ns()
        assert before <= reading <= perf_counter_ns()


def _random_intervals(rng: random.Random, count: int) -> list[tuple[int, int]]:
    intervals = []
    for _ in range(count):
        start = rng.randrange(-1_000, 1_000_000)
        # empty, reversed, touching, overlapping and nested intervals all occur
        intervals.append((start, start + rng.randrange(-50, 5_000)))
    if rng.random() < 0.5:
        intervals.sort()
    return intervals


@pytest.mark.parametrize("seed", range(40))
def test_interval_arithmetic_equals_the_python_reference(seed):
    speedups = compiled()
    rng = random.Random(seed)
    intervals = _random_intervals(rng, rng.choice([0, 1, 2, 7, 300, 5000]))
    assert speedups.merge_intervals(intervals) == accounting._merge_intervals(intervals)
    start, end = sorted((rng.randrange(-10, 1_000_000), rng.randrange(0, 1_200_000)))
    assert speedups.union_ns(intervals, start, end) == accounting._union_ns(intervals, start, end)
    floor = rng.choice([-1, 0, rng.randrange(0, 1_000_000)])
    keep = rng.choice([0, 1, 64, 10_000])
    assert speedups.settle_intervals(intervals, floor, keep) == accounting._settle_intervals(
        intervals, floor, keep
    )


def test_interval_arithmetic_rejects_what_is_not_a_pair():
    speedups = compiled()
    with pytest.raises(ValueError, match="pair"):
        speedups.merge_intervals([(1, 2, 3)])
    with pytest.raises(TypeError):
        speedups.union_ns([("a", 2)], 0, 10)


def _run_workload(recorder: StageRecorder, scope_type: type) -> None:
    """Nested, repeated, failing, threaded and late stage calls inside requests."""

    def stage(name: str):
        return scope_type(recorder, name, None)

    for request_number in range(3):
        with recorder.request():
            for _ in range(5):
                with stage("feature_hydration"):
                    pass
            with stage("model_forward"):
                with stage("h2d_transfer"):
                    pass
                with stage("h2d_transfer"):
                    pass
            with pytest.raises(KeyError):
                with stage("postprocess"):
                    raise KeyError("boom")
            threads = [
                threading.Thread(target=contextvars.copy_context().run, args=(_one, stage))
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            late, elsewhere = stage("serialize"), contextvars.copy_context()
            elsewhere.run(late.__enter__)  # e.g. a task that outlives its request
        elsewhere.run(late.__exit__, None, None, None)  # the request has ended: a single call
        with stage("outside"):
            pass
        assert request_number >= 0


def _one(stage) -> None:
    with stage("tokenize"):
        pass


def _telemetry(sampler, scope_type: type) -> tuple[dict, list]:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    recorder = StageRecorder(
        tracer_provider, MeterProvider(metric_readers=[reader]), budgets={"tokenize": 10.0}
    )
    COLD_START.reset(2)  # each core's run starts equally cold
    _run_workload(recorder, scope_type)
    points = {}
    for resource_metrics in reader.get_metrics_data().resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted(point.attributes.items())))
                    # durations differ run to run; counts and what was recorded must not
                    points[key] = getattr(point, "count", None) or point.value
    names = sorted(
        (
            span.name,
            tuple(sorted((k, v) for k, v in span.attributes.items() if "duration" not in k)),
        )
        for span in spans.get_finished_spans()
    )
    return points, names


@pytest.mark.parametrize("sampler", [ALWAYS_OFF, ALWAYS_ON], ids=["unsampled", "sampled"])
def test_compiled_core_records_what_the_python_core_records(sampler):
    compiled()
    compiled_points, compiled_spans = _telemetry(sampler, stages_module.StageScope)
    python_points, python_spans = _telemetry(sampler, stages_module.python_core_stage_scope())
    assert compiled_points == python_points
    assert compiled_spans == python_spans
    calls = {k: v for k, v in compiled_points.items() if k[0] == "inference.stage.calls"}
    # one record per request of feature_hydration (5 calls), and of tokenize from 2 threads
    hydration = [v for k, v in calls.items() if "feature_hydration" in str(k)]
    assert sum(hydration) == 3  # one record per request, its 5 calls in it
    recorded = {(name, dict(attributes)["inference.stage"]) for name, attributes in compiled_points}
    # the late call, recorded alone after its request ended, and the one outside requests
    assert ("inference.stage.duration", "serialize") in recorded
    assert ("inference.stage.duration", "outside") in recorded
    if sampler is ALWAYS_ON:
        assert len(compiled_spans) > 10


def test_the_hot_path_leaks_no_reference():
    compiled()
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), MeterProvider(metric_readers=[]), budgets={}
    )
    name = "refcounted_stage_name"
    with recorder.request() as request_scope:
        with recorder.stage(name):
            pass
        account = request_scope.account
        tally = account.tallies[(name, None)]
        watched = (account, tally, tally.union, tally.union.intervals, recorder, name)
        before = [sys.getrefcount(obj) for obj in watched]
        for _ in range(2_000):
            with recorder.stage(name):
                pass
        try:
            with recorder.stage(name):
                raise ValueError("slow path")
        except ValueError:
            pass
        with recorder.stage(name):
            with recorder.stage("nested"):
                pass
        after = [sys.getrefcount(obj) for obj in watched]
    # the nested tally holds the name as its parent: one reference more, nothing else
    assert after[:5] == before[:5]
    assert after[5] - before[5] <= 2
    assert tally.union.count == 2_003


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_failure_on_the_hot_path_is_logged_once_never_raised(core, caplog, monkeypatch):
    scope_type = (
        stages_module.StageScope if core == "compiled" else stages_module.python_core_stage_scope()
    )
    if core == "compiled":
        compiled()
    monkeypatch.setattr(_logging, "_logged_once", set())
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), MeterProvider(metric_readers=[]), budgets={}
    )
    with recorder.request():
        scope = scope_type(recorder, "tokenize", None)
        # Entered in one context, exited in another: resetting the frame fails.
        contextvars.copy_context().run(scope.__enter__)
        with caplog.at_level(logging.ERROR, logger="otel_inference.stages"):
            assert scope.__exit__(None, None, None) is False
            other = scope_type(recorder, "tokenize", None)
            contextvars.copy_context().run(other.__enter__)
            other.__exit__(None, None, None)
    failures = [r for r in caplog.records if "failed to close stage" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is ValueError


def test_the_accounting_suite_passes_on_the_python_core(tmp_path):
    """The fallback (no compiler at install, or OTEL_INFERENCE_SPEEDUPS=false) stays right."""
    check = "import otel_inference.stages as s; assert s.STAGE_CORE == 'python', s.STAGE_CORE"
    env = {**os.environ, "OTEL_INFERENCE_SPEEDUPS": "false"}
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=ROOT, timeout=60)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'pytest'}",
            "tests/test_request_accounting.py",
            "tests/test_stages.py",
            "tests/test_stages_interval.py",
            "tests/test_concurrency.py",
            "tests/test_fastpath.py",
            "tests/test_outputs_identical.py",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout


def test_held_span_joins_as_the_python_one():
    speedups = compiled()
    rng = random.Random(7)
    python = accounting._HeldSpan("span", 1_000, 1_500, 9_000, True, "ctx", 4, 50_000_000)
    native = speedups.HeldSpan("span", 1_000, 1_500, 9_000, True, "ctx", 4, 50_000_000)
    for _ in range(200):
        start = rng.randrange(0, 100_000)
        end = start + rng.randrange(0, 3_000)
        python.join(start, end)
        native.join(start, end)
    fields = ("calls", "busy_ns", "start_ns", "end_ns", "end_wall_ns", "seq", "compressible")
    fields += ("limit_ns",)
    assert {f: getattr(native, f) for f in fields} == {f: getattr(python, f) for f in fields}
    assert (native.span, native.context) == ("span", "ctx")


def test_a_first_call_makes_the_tally_the_python_core_makes():
    compiled()
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), MeterProvider(metric_readers=[]), budgets={}
    )
    with recorder.request() as request_scope:
        with recorder.stage("tokenize"):
            pass
        made = request_scope.account.tallies[("tokenize", None)]
        reference = stages_module.python_core_stage_scope()(recorder, "tokenize", None)
        reference._parent, reference._cold = None, False
        expected = reference._new_tally(stages_module.RequestAccount("other", 0))
    assert type(made) is accounting.StageTally
    assert type(made.union) is accounting.IntervalUnion
    for field in ("name", "parent", "cold", "context", "error_type", "held"):
        assert getattr(made, field) == getattr(expected, field), field
    assert made.union.settled is None and len(made.union.intervals) == 1


def test_an_account_of_another_class_is_read_through_its_attributes():
    """The compiled core reads the package's own classes at their slots; any other
    object (here a subclass of the account) goes through getattr, with the same result."""
    compiled()

    class Account(stages_module.RequestAccount):
        __slots__ = ("note",)

    reader = InMemoryMetricReader()
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), MeterProvider(metric_readers=[reader]), budgets={}
    )
    account = Account("custom", perf_counter_ns())
    token = stages_module._FRAME.set((account, None))
    try:
        for _ in range(3):
            with recorder.stage("tokenize"):
                pass
    finally:
        stages_module._FRAME.reset(token)
    tally = account.tallies[("tokenize", None)]
    assert tally.calls == 3 and account.instrumentation_ns() > 0


def _request_end_tallies(contexts: list[object], held_spans: list[object]) -> list:
    """Tallies of every shape a request's end meets (made afresh per call)."""
    tallies = []

    def tally(name, parent=None, cold=False, intervals=(), error=None, held=None, context=None):
        made = accounting.StageTally(name, parent, cold, context)
        for start, end in intervals:
            made.add(start, end, error)
        made.held = held
        tallies.append(made)
        return made

    tally("tokenize", intervals=[(1_000, 2_500)], context=contexts[0])  # one call
    tally("model_forward", intervals=[(0, 30_000_000)], held=held_spans[0])  # over its budget
    tally("feature_hydration", intervals=[(0, 10), (5, 20), (40, 50), (45, 45)])
    tally("postprocess", "model_forward", intervals=[(1, 2)], error="KeyError")
    tally("serialize", cold=True, intervals=[(0, 3)], context=contexts[1], held=held_spans[1])
    tally("never_finished")  # opened, no call finished: no records
    tally("brand_new_stage", intervals=[(10, 5)])  # a clock step back: as Python divides it
    many = tally("repeated")
    for start in range(0, 10 * (accounting.MAX_UNSETTLED_INTERVALS + 50), 10):
        many.add(start, start + 7, None)  # past the limit: settled into a total
    assert many.union.settled is not None
    return tallies


def test_request_end_rows_equal_the_python_reference():
    speedups = compiled()
    contexts = [object(), object()]
    held_spans = [accounting.HeldSpan("a", 0, 1, 1, True, None, 1), object()]
    results = []
    for tally_rows in (speedups.tally_rows, stages_module._tally_rows):
        recorder = StageRecorder(
            TracerProvider(sampler=ALWAYS_OFF),
            MeterProvider(metric_readers=[]),
            budgets={"model_forward": 0.02, "tokenize": 1.0, "repeated": 1e-9},
        )
        binding = recorder._bind()
        tallies = _request_end_tallies(contexts, held_spans)
        ended: list[tuple] = []
        rows, breaches = tally_rows(
            tallies, binding, lambda *args, ended=ended: ended.append(args), "error.type"
        )
        assert all(tally.held is None for tally in tallies)
        typed = [(type(s), s, type(c), c, a, id(x)) for s, c, a, x in rows]
        results.append((typed, breaches, ended))
    assert results[0] == results[1]
    rows, breaches, ended = results[0]
    assert len(rows) == 7  # never_finished has none
    assert [name for name, _, _ in breaches] == ["model_forward", "repeated"]
    assert [(held, budget, exceeded) for held, budget, exceeded in ended] == [
        (held_spans[0], 0.02, True),
        (held_spans[1], None, False),
    ]


def test_fast_histogram_rows_equal_the_python_reference():
    """The compiled loop of FastHistogram.record_pairs updates the series as the Python
    one does: buckets, sums (ints stay ints), min, max, exemplars; NaN and huge ints
    too, and negative values dropped the same way."""
    from opentelemetry import trace
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from otel_inference import fastpath

    speedups = compiled()

    def context(trace_id: int, sampled: bool):
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else 0)
        return trace.set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, trace_id + 1, False, flags))
        )

    sampled, unsampled = context(21, True), context(22, False)
    a, b = {"inference.stage": "tokenize"}, {"inference.stage": "model_forward"}
    rows = [
        (0.002, 1, a, sampled),
        (0.3, 4, b, sampled),
        (0.001, 2, a, unsampled),
        (-1.0, 3, b, None),
        (float("nan"), 1, a, sampled),
        (float("inf"), 2**70, b, None),
        (5, 7, a, sampled),  # an int time: its sum stays an int until a float joins
        (0.0, -2, b, unsampled),
        (1.0, 5, a, sampled),  # on a boundary: bisect_left's bucket
    ]

    def snapshot(histogram, start_ns: int, end_ns: int) -> list:
        figures = []
        for key, series in sorted(histogram._series.items(), key=lambda item: str(item[0])):
            exemplars = {}
            for index, (amount, when, span, attributes) in series.exemplars.items():
                assert start_ns <= when <= end_ns
                exemplars[index] = (repr(amount), span.get_span_context().trace_id, attributes)
            counts, sums = (
                list(series.counts),
                (repr(series.sum), repr(series.min), repr(series.max)),
            )
            figures.append((key, counts, *sums, series.count, exemplars))
        return figures

    results = []
    for record_rows in (speedups.record_rows, fastpath._record_rows):
        scope = InstrumentationScope("t")
        seconds = fastpath.FastHistogram("s", "s", "", scope, (0.01, 0.1, 1.0), "trace_based")
        calls = fastpath.FastHistogram("c", "1", "", scope, (1, 2, 5), "trace_based")
        dropped: list[str] = []
        start_ns = time_ns()
        for _ in range(2):  # the second time through, the pairs are found by identity
            record_rows(
                seconds,
                calls,
                rows,
                True,
                seconds._pair_locked,
                lambda i, dropped=dropped: dropped.append(i.name),
            )
        end_ns = time_ns()
        results.append(
            (snapshot(seconds, start_ns, end_ns), snapshot(calls, start_ns, end_ns), dropped)
        )
    assert results[0] == results[1]
    assert results[0][2] == ["s", "c"] * 2


def test_recorder_stage_makes_its_scope_in_c_as_the_python_method_does():
    speedups = compiled()
    assert StageRecorder.__dict__["stage"] is speedups.stage_method
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), MeterProvider(metric_readers=[]), budgets={}
    )
    plain, with_attributes = recorder.stage("tokenize"), recorder.stage("tokenize", model="m")
    assert type(plain) is stages_module.StageScope
    assert (plain._recorder, plain._name, plain._attributes) == (recorder, "tokenize", None)
    assert with_attributes._attributes == {"model": "m"}
    with pytest.raises(TypeError, match="stage name"):
        recorder.stage()
    with pytest.raises(TypeError, match="stage name"):
        recorder.stage("a", "b")


def test_the_request_end_leaks_no_reference(monkeypatch):
    """tally_rows and record_rows (and a first call's tally) hold nothing past a request:
    the stage name, its cached attribute set, its series and a context keep their counts."""
    compiled()
    monkeypatch.setattr(COLD_START, "remaining", 0)  # warm requests: one attribute set
    monkeypatch.setattr(COLD_START, "active", False)
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        MetricExporter,
        MetricExportResult,
    )
    from opentelemetry.sdk.resources import Resource

    from otel_inference import fastpath

    class Dropping(MetricExporter):
        def export(self, metrics_data, timeout_millis=10_000, **kwargs):
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis=10_000):
            return True

        def shutdown(self, timeout_millis=30_000, **kwargs):
            pass

    cumulative = AggregationTemporality.CUMULATIVE
    reader = fastpath.FastPeriodicExportingMetricReader(
        Dropping(), export_interval_millis=3_600_000
    )
    provider = fastpath.new_provider(Resource.create({}), [(reader, cumulative, cumulative)])
    recorder = StageRecorder(TracerProvider(sampler=ALWAYS_OFF), provider, budgets={"leaky": 1e-9})
    name = "leak_checked_stage"

    def requests(count: int) -> None:
        for _ in range(count):
            with recorder.request():
                with recorder.stage(name):
                    pass
                with recorder.stage(name):  # two calls: the union merged in C
                    pass
                with recorder.stage("leaky"):  # over budget: a breach row
                    pass

    requests(10)  # attribute sets and series made
    binding = recorder._binding
    attributes = binding._attribute_sets[(name, None, False)]
    series = binding.duration._pairs[id(attributes)]
    watched = (name, attributes, *series[2:], binding.budgets)
    before = [sys.getrefcount(obj) for obj in watched]
    requests(2_000)
    assert [sys.getrefcount(obj) for obj in watched] == before
    provider.shutdown()
