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
from time import perf_counter_ns

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
