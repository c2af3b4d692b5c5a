"""stage() overhead against hand-written OpenTelemetry code doing the same work.

Targets (ISSUE: foundation): an unsampled stage adds <= 8 us and creates no span
object; a sampled stage costs <= 1.1x a bare SDK span + histogram record.

    python -m benchmarks.bench_stages
"""

from __future__ import annotations

from time import perf_counter_ns

from opentelemetry import context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from benchmarks.harness import Benchmark
from otel_inference import StageRecorder
from otel_inference.metrics import duration_boundaries


class _CountingTracer:
    """Wraps the recorder's tracer to count every span object it creates."""

    def __init__(self, tracer) -> None:
        self._tracer = tracer
        self.started = 0

    def start_span(self, *args, **kwargs):
        self.started += 1
        return self._tracer.start_span(*args, **kwargs)


def build(sampler):
    tracer_provider = TracerProvider(sampler=sampler)
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    recorder = StageRecorder(tracer_provider, meter_provider, budgets={"tokenize": 0.005})
    binding = recorder._bind()
    counter = binding.tracer = _CountingTracer(binding.tracer)
    tracer = tracer_provider.get_tracer("bench")
    meter = meter_provider.get_meter("bench")
    histogram = meter.create_histogram(
        "bare.stage.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=duration_boundaries([0.005]),
    )
    return recorder, tracer, histogram, counter


def in_parent(tracer, run):
    """Run ``run(n)`` inside one parent span (sampled or not, per the tracer's sampler)."""

    def case(n: int) -> None:
        parent = tracer.start_span("request")
        token = context.attach(trace.set_span_in_context(parent))
        try:
            run(n)
        finally:
            context.detach(token)
            parent.end()

    return case


def main() -> None:
    attributes = {"inference.stage": "tokenize"}

    def nothing(n: int) -> None:
        for _ in range(n):
            pass

    def make_stage_loop(recorder):
        stage = recorder.stage

        def loop(n: int) -> None:
            for _ in range(n):
                with stage("tokenize"):
                    pass

        return loop

    def make_bare_loop(tracer, histogram):
        def loop(n: int) -> None:
            for _ in range(n):
                start = perf_counter_ns()
                with tracer.start_as_current_span("tokenize", attributes=attributes):
                    pass
                histogram.record((perf_counter_ns() - start) / 1e9, attributes)

        return loop

    def make_histogram_only_loop(histogram):
        def loop(n: int) -> None:
            for _ in range(n):
                start = perf_counter_ns()
                histogram.record((perf_counter_ns() - start) / 1e9, attributes)

        return loop

    # Unsampled request: stage() vs the histogram alone vs nothing.
    recorder, tracer, histogram, counter = build(ALWAYS_OFF)
    unsampled = Benchmark("stage() on an unsampled request", baseline="empty loop")
    unsampled.case("empty loop", in_parent(tracer, nothing))
    unsampled.case("bare histogram.record", in_parent(tracer, make_histogram_only_loop(histogram)))
    unsampled.case("stage()", in_parent(tracer, make_stage_loop(recorder)))
    result = unsampled.run(ops=20_000, rounds=15)
    no_span_objects = counter.started == 0
    added = result.added_us("stage()")
    own = result.added_us("stage()", "bare histogram.record")
    result.notes.append(
        f"stage() adds {added:.2f} us per call on an unsampled request (target <= 8 us): "
        f"{'MET' if added <= 8 else 'MISSED'}. Of that, the SDK's own histogram.record "
        f"(the one thing the cheap path must do) is {result.added_us('bare histogram.record'):.2f} us; "
        f"otel-inference's own logic adds {own:+.2f} us on top of it."
    )
    result.notes.append(
        "No span object is created for unsampled stages: "
        f"{'confirmed' if no_span_objects else 'NOT confirmed'} "
        f"(the recorder's tracer created {counter.started} spans over all rounds)."
    )
    result.write()
    print(result.markdown())

    # Sampled request: stage() vs a hand-written span + histogram record.
    recorder, tracer, histogram, _ = build(ALWAYS_ON)
    sampled = Benchmark("stage() on a sampled request", baseline="bare SDK span + histogram")
    sampled.case("bare SDK span + histogram", in_parent(tracer, make_bare_loop(tracer, histogram)))
    sampled.case("stage()", in_parent(tracer, make_stage_loop(recorder)))
    result = sampled.run(ops=5_000, rounds=15)
    ratio = result.ratio("stage()")
    result.notes.append(
        f"stage() costs {ratio:.3f}x the hand-written equivalent (target <= 1.1x): "
        f"{'MET' if ratio <= 1.1 else 'MISSED'}. Same SDK, no exporter: this is the "
        "instrumentation's own cost."
    )
    result.write()
    print(result.markdown())


if __name__ == "__main__":
    main()
