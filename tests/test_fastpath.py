"""The recording fast path exports what the SDK path exports (issue 20).

One recorded workload (requests sampled or not, repeated, nested, failing and
over-budget stages, stages outside requests, a batch, per-request counters, more
stage names than the metric cap) runs twice on a deterministic clock: through
today's SDK path and through the fast path, each with a Prometheus reader, a
delta and a cumulative periodic reader. The Prometheus scrapes and the OTLP
encodings of every collection must be equal: names, units, descriptions,
boundaries, counts, sums, min/max, attributes, temporality, exemplars (trace and
span ids; timestamps aside).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry, generate_latest

import otel_inference.stages as stages_module
from otel_inference import StageRecorder, _logging, fastpath
from otel_inference.distro import fast_path_meter_provider, metric_exporter_names
from otel_inference.fastpath import FastCounter, FastHistogram, FastPeriodicExportingMetricReader
from otel_inference.runtime import COLD_START

DELTA = AggregationTemporality.DELTA
CUMULATIVE = AggregationTemporality.CUMULATIVE
BUDGETS = {"feature_hydration": 0.004, "model_forward": 0.02, "request": 0.05}
RESOURCE = Resource.create({"service.name": "fast-path-equivalence"})


@pytest.fixture(autouse=True)
def _log_once_restored():
    """What these tests log once (the `_other` cap, the fallback) stays loggable after."""
    saved = set(_logging._logged_once)
    yield
    _logging._logged_once.clear()
    _logging._logged_once.update(saved)


class SeededIds(IdGenerator):
    """The same trace and span ids on both runs, spread so ratio sampling picks some."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64)

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128)


class Capture(MetricExporter):
    def __init__(self, temporality: AggregationTemporality) -> None:
        super().__init__(preferred_temporality={Counter: temporality, Histogram: temporality})
        self.exports: list[MetricsData] = []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


class FastPrometheusMetricReader(fastpath.fast_reader_class(PrometheusMetricReader)):  # type: ignore[misc]
    pass


def _tokens(meter):
    return meter.create_counter("inference.tokens", unit="{token}", description="tokens")


def _sizes(meter):
    return meter.create_histogram(
        "inference.serialize.size",
        unit="By",
        description="bytes",
        explicit_bucket_boundaries_advisory=(64, 256, 1024, 4096),
    )


def _unadvised(meter):  # no bucket advice: stays the SDK's on both paths
    return meter.create_histogram("test.unadvised", unit="s")


def workload(recorder: StageRecorder, part: int) -> None:
    stage = recorder.stage
    for index in range(12):
        with recorder.request():
            for _ in range(3):
                with stage("feature_hydration"):
                    pass
            with stage("preprocess"), stage("tokenize"):
                pass
            try:
                with stage("postprocess"):
                    raise ValueError("no payload")
            except ValueError:
                pass
            now = stages_module.perf_counter_ns()
            # over budget (20 ms) every third request
            recorder.record_interval("model_forward", now, now + (30 if index % 3 else 5) * 10**6)
            recorder.record_per_request(recorder.instruments(_tokens), 7 + index, {"kind": "real"})
            recorder.instruments(_sizes).record(100 * index, {"format": "json"})
            recorder.instruments(_unadvised).record(0.5, {"x": part})
            members = [recorder.capture()]
        batch = recorder.start_batch("batch_forward", members)
        batch.end()
    for index in range(5 if part == 0 else 230):  # past MAX_STAGE_NAMES: `_other`
        now = stages_module.perf_counter_ns()
        recorder.record_interval(f"custom_{index}", now, now + 1000 * index)


def run(fast: bool, monkeypatch) -> tuple[list[str], list[bytes], list[bytes]]:
    clock = itertools.count(10**12, 731_000)
    monkeypatch.setattr(stages_module, "perf_counter_ns", lambda: next(clock))
    COLD_START.reset(3)
    registry = CollectorRegistry()
    delta, cumulative = Capture(DELTA), Capture(CUMULATIVE)
    never = 3_600_000
    if fast:
        readers = [
            (FastPrometheusMetricReader(registry=registry), CUMULATIVE, CUMULATIVE),
            (FastPeriodicExportingMetricReader(delta, export_interval_millis=never), DELTA, DELTA),
            (
                FastPeriodicExportingMetricReader(cumulative, export_interval_millis=never),
                CUMULATIVE,
                CUMULATIVE,
            ),
        ]
        meter_provider = fastpath.new_provider(RESOURCE, readers)
        periodic = [readers[1][0], readers[2][0]]
    else:
        periodic = [
            PeriodicExportingMetricReader(delta, export_interval_millis=never),
            PeriodicExportingMetricReader(cumulative, export_interval_millis=never),
        ]
        meter_provider = MeterProvider(
            resource=RESOURCE,
            metric_readers=[PrometheusMetricReader(registry=registry), *periodic],
        )
    tracer_provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=SeededIds(7)
    )
    recorder = StageRecorder(tracer_provider, meter_provider, budgets=BUDGETS)
    scrapes = []
    for part in range(2):
        workload(recorder, part)
        scrapes.append(generate_latest(registry).decode())
        for reader in periodic:
            reader.collect()
    meter_provider.shutdown()
    otlp = [comparable(data) for data in delta.exports]
    otlp_cumulative = [comparable(data) for data in cumulative.exports]
    # Not vacuous: sampled requests left exemplars to compare.
    assert sum(1 for data in delta.exports for _ in _all_exemplars(data)) > 10
    return scrapes, otlp, otlp_cumulative


def _exemplar(exemplar, metric):
    if isinstance(metric.data, Sum):
        # A counter's exemplar is reservoir-sampled (at random) on both paths: there,
        # compare that one exists and points to a sampled span, not which one.
        return replace(exemplar, time_unix_nano=0, value=0, span_id=1, trace_id=1)
    return replace(exemplar, time_unix_nano=0)


def comparable(data: MetricsData) -> bytes:
    """The OTLP encoding, timestamps zeroed, metrics and points in a stable order
    (the fast path appends its metrics after the SDK's in the scope)."""
    assert all(e.trace_id for e in _all_exemplars(data))
    resource_metrics = []
    for resource in data.resource_metrics:
        scopes = []
        for scope in sorted(resource.scope_metrics, key=lambda s: s.scope.name):
            metrics = []
            for metric in sorted(scope.metrics, key=lambda m: m.name):
                points = sorted(
                    (
                        replace(
                            point,
                            start_time_unix_nano=0,
                            time_unix_nano=0,
                            exemplars=[_exemplar(e, metric) for e in (point.exemplars or [])],
                        )
                        for point in metric.data.data_points
                    ),
                    key=lambda p: sorted(p.attributes.items()),
                )
                metrics.append(
                    Metric(
                        name=metric.name,
                        description=metric.description,
                        unit=metric.unit,
                        data=replace(metric.data, data_points=points),
                    )
                )
            scopes.append(ScopeMetrics(scope.scope, metrics, scope.schema_url))
        resource_metrics.append(ResourceMetrics(resource.resource, scopes, resource.schema_url))
    encoded = encode_metrics(MetricsData(resource_metrics=resource_metrics))
    return encoded.SerializeToString(deterministic=True)


def _all_exemplars(data: MetricsData):
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    yield from point.exemplars or ()


def _sorted_lines(scrape: str) -> list[str]:
    return sorted(line for line in scrape.splitlines() if line)


def test_fast_path_exports_what_the_sdk_path_exports(monkeypatch):
    sdk_scrapes, sdk_delta, sdk_cumulative = run(False, monkeypatch)
    fast_scrapes, fast_delta, fast_cumulative = run(True, monkeypatch)
    # The workload did produce what we compare: stages, breaches, exemplars, overflow.
    assert "inference_stage_duration_seconds_bucket" in sdk_scrapes[1]
    assert "inference_stage_budget_breaches_total" in sdk_scrapes[1]
    assert "inference_stage_calls_bucket" in sdk_scrapes[1]
    assert "inference_stage_cost_seconds_bucket" in sdk_scrapes[1]
    assert 'inference_stage="_other"' in sdk_scrapes[1]
    assert 'error_type="ValueError"' in sdk_scrapes[1]
    assert b"inference.stage.duration" in sdk_delta[0] and len(sdk_delta) == 3  # + shutdown
    for sdk, fast in zip(sdk_scrapes, fast_scrapes, strict=True):
        assert _sorted_lines(fast) == _sorted_lines(sdk)
    assert fast_delta == sdk_delta
    assert fast_cumulative == sdk_cumulative
    assert fast_delta[1] != fast_cumulative[1]  # temporality did matter


def test_exemplars_point_to_sampled_stages(monkeypatch):
    """Sampled requests leave one trace-id exemplar per bucket; unsampled ones none."""
    run(True, monkeypatch)  # warms the same code; the equality test covers the ids
    delta = Capture(DELTA)
    reader = FastPeriodicExportingMetricReader(delta, export_interval_millis=3_600_000)
    provider = fastpath.new_provider(RESOURCE, [(reader, DELTA, DELTA)])
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    for sampler, expected in ((ALWAYS_ON, True), (ALWAYS_OFF, False)):
        recorder = StageRecorder(TracerProvider(sampler=sampler), provider, budgets={})
        with recorder.request(), recorder.stage("tokenize"):
            pass
        reader.collect()
        (metric,) = [
            m
            for scope in delta.exports[-1].resource_metrics[0].scope_metrics
            for m in scope.metrics
            if m.name == "inference.stage.duration"
        ]
        (point,) = [
            p for p in metric.data.data_points if p.attributes["inference.stage"] == "tokenize"
        ]
        assert bool(point.exemplars) is expected
        if expected:
            assert all(e.trace_id and e.span_id for e in point.exemplars)
    provider.shutdown()


def test_record_pairs_records_what_two_records_do():
    """A request's end records time and calls of every stage in one batch: the same
    points, sums, min/max and exemplars as recording each value on its own."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    def context(trace_id: int, sampled: bool):
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else 0)
        span = NonRecordingSpan(SpanContext(trace_id, trace_id + 1, False, flags))
        return trace.set_span_in_context(span)

    sampled, unsampled = context(11, True), context(12, False)
    shared = {"inference.stage": "tokenize"}
    rows = [
        (0.002, 1, shared, sampled),
        (0.3, 4, {"inference.stage": "model_forward", "error.type": "E"}, sampled),
        (0.001, 2, shared, unsampled),
        (-1.0, 3, {"inference.stage": "odd"}, None),  # a negative time is dropped, its calls not
        (0.05, 1, shared, None),
        (7.0, 1000, {"inference.stage": "slow"}, sampled),
    ]
    exported = []
    for batched in (False, True):
        capture = Capture(CUMULATIVE)
        reader = FastPeriodicExportingMetricReader(capture, export_interval_millis=3_600_000)
        provider = fastpath.new_provider(RESOURCE, [(reader, CUMULATIVE, CUMULATIVE)])
        meter = fastpath.fast_meter(provider.get_meter("t"), provider)
        seconds = meter.create_histogram("t.s", explicit_bucket_boundaries_advisory=(0.01, 0.1, 1))
        calls = meter.create_histogram("t.calls", explicit_bucket_boundaries_advisory=(1, 2, 5))
        for _ in range(2):
            if batched:
                seconds.record_pairs(calls, rows)
            else:
                for amount, count, attributes, row_context in rows:
                    seconds.record(amount, attributes, context=row_context)
                    calls.record(count, attributes, context=row_context)
            reader.collect()
        provider.shutdown()
        exported.append([comparable(data) for data in capture.exports])
        # per collection: 3 sampled rows x 2 instruments (none at shutdown: nothing new)
        assert [sum(1 for _ in _all_exemplars(data)) for data in capture.exports] == [6, 6, 0]
    assert exported[0] == exported[1]


def test_other_providers_take_the_sdk_path(caplog):
    """A provider this package did not build (InMemoryMetricReader, programmatic
    setups) gets the SDK's instruments, said in one log line."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with caplog.at_level("INFO", logger="otel_inference.stages"):
        _logging._logged_once.discard("fast-path-off")
        recorder = StageRecorder(TracerProvider(), provider, budgets={})
        with recorder.request(), recorder.stage("tokenize"):
            pass
        with StageRecorder(TracerProvider(), MeterProvider(), budgets={}).stage("x"):
            pass
    binding = recorder._bind()
    assert not isinstance(binding.duration, FastHistogram)
    assert not isinstance(binding.breaches, FastCounter)
    said = [r for r in caplog.records if "recorded through the SDK" in r.getMessage()]
    assert len(said) == 1
    names = {
        m.name
        for s in reader.get_metrics_data().resource_metrics[0].scope_metrics
        for m in s.metrics
    }
    assert "inference.stage.duration" in names


def test_fast_instruments_on_our_provider():
    reader = FastPeriodicExportingMetricReader(
        Capture(CUMULATIVE), export_interval_millis=3_600_000
    )
    provider = fastpath.new_provider(RESOURCE, [(reader, CUMULATIVE, CUMULATIVE)])
    binding = StageRecorder(TracerProvider(), provider, budgets={})._bind()
    assert isinstance(binding.duration, FastHistogram)
    assert isinstance(binding.calls, FastHistogram)
    assert isinstance(binding.breaches, FastCounter)
    provider.shutdown()


def test_cardinality_limit_overflows_like_the_sdk():
    capture = Capture(CUMULATIVE)
    reader = FastPeriodicExportingMetricReader(capture, export_interval_millis=3_600_000)
    provider = fastpath.new_provider(RESOURCE, [(reader, CUMULATIVE, CUMULATIVE)])
    meter = fastpath.fast_meter(provider.get_meter("t"), provider)
    counter = meter.create_counter("t.count")
    for index in range(fastpath.CARDINALITY_LIMIT + 10):
        counter.add(1, {"i": index})
    reader.collect()
    (metric,) = [
        m
        for s in capture.exports[-1].resource_metrics[0].scope_metrics
        for m in s.metrics
        if m.name == "t.count"
    ]
    points = metric.data.data_points
    assert len(points) == fastpath.CARDINALITY_LIMIT + 1
    (overflow,) = [p for p in points if p.attributes == {"otel.metric.overflow": True}]
    assert overflow.value == 10
    provider.shutdown()


def test_fork_child_starts_empty():
    """A pre-fork server's worker must not export the parent's figures again."""
    code = """
import os, sys
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.metrics.export import AggregationTemporality as T
from otel_inference import fastpath
from tests.test_fastpath import Capture
capture = Capture(T.CUMULATIVE)
reader = fastpath.FastPeriodicExportingMetricReader(capture, export_interval_millis=3_600_000)
provider = fastpath.new_provider(Resource.create({}), [(reader, T.CUMULATIVE, T.CUMULATIVE)])
counter = fastpath.fast_meter(provider.get_meter("t"), provider).create_counter("t.count")
counter.add(5, {"a": 1})
pid = os.fork()
if pid == 0:
    counter.add(1, {"a": 1})
    reader.collect()
    values = [p.value for s in capture.exports[-1].resource_metrics[0].scope_metrics
              for m in s.metrics if m.name == "t.count" for p in m.data.data_points]
    os._exit(0 if values == [1] else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"OTEL_METRICS_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp,prometheus",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            ["otlp_proto_http", "prometheus"],
        ),
        ({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, None),
        ({"OTEL_METRICS_EXPORTER": "none"}, None),
    ],
)
def test_exporter_names_resolve_as_the_sdk_does(environ, expected):
    assert metric_exporter_names(environ) == expected


def test_configurator_falls_back_for_unknown_exporters(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp_json_file")
    assert fast_path_meter_provider() is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        "base2_exponential_bucket_histogram",
    )
    assert fast_path_meter_provider() is None  # the SDK path makes exponential histograms
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_INFERENCE_METRICS_FAST_PATH", "false")
    assert fast_path_meter_provider() is None
    monkeypatch.setenv("OTEL_INFERENCE_METRICS_FAST_PATH", "true")
    provider = fast_path_meter_provider()
    assert provider is not None
    provider.shutdown()


APP = """
import json, sys
from opentelemetry import metrics
from otel_inference import get_recorder, request, stage

for _ in range(40):
    with request():
        with stage("tokenize"):
            pass
binding = get_recorder()._bind()
print(json.dumps({"duration": type(binding.duration).__name__}), flush=True)
metrics.get_meter_provider().force_flush()
"""


@pytest.mark.e2e
@pytest.mark.parametrize(("enabled", "fast"), [("true", True), ("false", False)])
def test_under_opentelemetry_instrument_over_otlp(otlp_receiver, tmp_path, enabled, fast):
    """The configurator builds the readers (fast path) unless told not to; either way
    the same histogram crosses the wire, and the SDK's configurator says nothing odd."""
    import json

    from tests import instrumented
    from tests.otlp_receiver import attributes_of
    from tests.servers import wait_until

    app = tmp_path / "app.py"
    app.write_text(APP)
    env = instrumented.otlp_env(
        otlp_receiver.endpoint,
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_INFERENCE_COLD_START_REQUESTS="0",
        OTEL_INFERENCE_METRICS_FAST_PATH=enabled,
    )
    process = instrumented.start(app, env)
    kind = json.loads(process.stdout.readline())["duration"]
    assert (kind == "FastHistogram") is fast, kind
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    stderr = process.stderr.read()
    assert "Overriding of current MeterProvider" not in stderr, stderr

    def tokenize_points():
        return [
            point
            for metric in otlp_receiver.metrics("inference.stage.duration")
            for point in metric.histogram.data_points
            if attributes_of(point.attributes).get("inference.stage") == "tokenize"
        ]

    wait_until(lambda: any(p.count == 40 for p in tokenize_points()), 20, "tokenize over OTLP")
    (metric, *_) = otlp_receiver.metrics("inference.stage.duration")
    assert metric.unit == "s"
    assert not otlp_receiver.metrics("otel_inference.fastpath.carrier")
