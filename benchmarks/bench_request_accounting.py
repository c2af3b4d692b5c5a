"""Per-request stage accounting: what a repeated call costs, compressed spans, a whole request.

Targets (issue "A stage is what the request spent in it"), same-run figures against a bare
``perf_counter_ns`` pair, CPU time of the calling thread (``thread_time_ns``: a shared
machine's scheduling noise left out):

* a repeated call of a stage already seen in the request: <= 1.5 us unsampled, <= 3 us
  sampled once compressed;
* 500 small ``orjson.dumps`` in a sampled request: <= 1.5 ms added and <= 8 spans.

An unsampled request with 6 distinct stages, and the SDK's share of what it adds (the SDK
path against no metrics at all, same run), is ``benchmarks/bench_fastpath.py``'s.

    python -m benchmarks.bench_request_accounting
"""

from __future__ import annotations

from time import thread_time_ns

import orjson
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from benchmarks.harness import FULL_SPEED_PAIR_US, Benchmark, at_quiet_speed, pairs
from otel_inference import StageRecorder, configure, get_recorder, request
from otel_inference.instrumentation.serializers import SerializersInstrumentor
from otel_inference.stages import python_core_stage_scope


def _recorder(sampler) -> tuple[StageRecorder, TracerProvider, MeterProvider]:
    tracer_provider = TracerProvider(sampler=sampler)
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    recorder = StageRecorder(tracer_provider, meter_provider, budgets={})
    return recorder, tracer_provider, meter_provider


def _repeated_in_one_request(recorder: StageRecorder, python_core: bool = False):
    stage_ = recorder.stage
    if python_core:  # the same call shape, on the pure-Python core
        scope_type = python_core_stage_scope()

        def stage_(name: str, **attributes):
            return scope_type(recorder, name, attributes)

    def run(n: int) -> int:
        with recorder.request():
            with stage_("feature_hydration"):  # the first call: the stage is seen
                pass
            start = thread_time_ns()
            for _ in range(n):
                with stage_("feature_hydration"):
                    pass
            return thread_time_ns() - start

    return run


def _verdict(
    fast_rounds: int,
    rounds: int,
    figures: list[tuple[str, float | None, float, float, float, str]],
) -> str:
    """The targets judged on the rounds that ran at full speed; without enough of them
    (3), the run's figures scaled by its bare pair, an estimate, and no verdict."""
    if fast_rounds >= 3:
        judged = ", ".join(
            f"{what} {fast:.2f} {unit} (target <= {target:g} {unit}: "
            f"{'MET' if fast <= target else 'MISSED'})"
            for what, fast, _, _, target, unit in figures
        )
        return f"In the {fast_rounds} of {rounds} rounds at full speed: {judged}."
    scaled = ", ".join(
        f"{what} ~{at_quiet_speed(measured, pair_us):.2f} {unit} (target <= {target:g} {unit})"
        for what, _, measured, pair_us, target, unit in figures
    )
    return (
        f"Only {fast_rounds} of {rounds} rounds ran at full speed (a bare pair <= "
        f"{FULL_SPEED_PAIR_US} us): not judged; scaled to full speed by the bare pair, "
        f"an estimate: {scaled}."
    )


def repeated_calls() -> list[str]:
    unsampled, _, _ = _recorder(ALWAYS_OFF)
    sampled, sampled_tracer, _ = _recorder(ALWAYS_ON)
    spans = InMemorySpanExporter()
    sampled_tracer.add_span_processor(SimpleSpanProcessor(spans))
    bench = Benchmark("request accounting: a repeated call", baseline="perf_counter_ns pair")

    def bare(n: int) -> int:
        start = thread_time_ns()
        pairs(n)
        return thread_time_ns() - start

    bench.case("perf_counter_ns pair", bare)
    bench.case("stage() repeated, unsampled request", _repeated_in_one_request(unsampled))
    bench.case("stage() repeated, sampled request", _repeated_in_one_request(sampled))
    bench.case(
        "Python core: repeated, unsampled", _repeated_in_one_request(unsampled, python_core=True)
    )
    bench.case(
        "Python core: repeated, sampled", _repeated_in_one_request(sampled, python_core=True)
    )
    result = bench.run(ops=20_000, rounds=15, self_timed=True, clock=thread_time_ns)
    pair_us = result.cases["perf_counter_ns pair"].median_us
    measured_unsampled = result.added_us("stage() repeated, unsampled request")
    measured_sampled = result.added_us("stage() repeated, sampled request")
    compressed = max(
        span.attributes.get("inference.stage.calls", 1) for span in spans.get_finished_spans()
    )
    fast_unsampled, fast_rounds = result.full_speed(
        "stage() repeated, unsampled request", "perf_counter_ns pair", "perf_counter_ns pair"
    )
    fast_sampled, _ = result.full_speed(
        "stage() repeated, sampled request", "perf_counter_ns pair", "perf_counter_ns pair"
    )
    result.notes.append(
        f"A repeated call adds {measured_unsampled:.2f} us unsampled and "
        f"{measured_sampled:.2f} us sampled (all rounds; a bare pair took {pair_us:.3f} us). "
        + _verdict(
            fast_rounds,
            result.rounds,
            [
                ("unsampled", fast_unsampled, measured_unsampled, pair_us, 1.5, "us"),
                ("sampled, compressed", fast_sampled, measured_sampled, pair_us, 3.0, "us"),
            ],
        )
        + f" One span stood for {compressed} calls. The pure-Python core "
        f"(OTEL_INFERENCE_SPEEDUPS=false), same run: "
        f"{result.added_us('Python core: repeated, unsampled'):.2f} us unsampled, "
        f"{result.added_us('Python core: repeated, sampled'):.2f} us sampled."
    )
    result.write()
    return [result.markdown()]


def orjson_loop() -> str:
    """500 small dumps in one sampled request, instrumented or not, same run."""
    items = [{"id": i, "score": i / 7, "tags": ["a", "b"]} for i in range(500)]
    tracer_provider = TracerProvider(sampler=ALWAYS_ON)
    spans = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    configure(tracer_provider, meter_provider, budgets={})
    instrumentor = SerializersInstrumentor()

    def requests(n: int) -> int:
        start = thread_time_ns()
        for _ in range(n):
            with request():
                for item in items:
                    orjson.dumps(item)
        return thread_time_ns() - start

    def instrumented(n: int) -> int:
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        try:
            return requests(n)
        finally:
            instrumentor.uninstrument()

    def bare_pairs(n: int) -> int:  # the machine's speed in this run: 500 pairs an op
        start = thread_time_ns()
        pairs(n * len(items))
        return thread_time_ns() - start

    bench = Benchmark("request accounting: 500 orjson.dumps in a sampled request", "plain")
    bench.case("plain", requests)
    bench.case("instrumented", instrumented)
    bench.case("500 perf_counter_ns pairs", bare_pairs)
    spans.clear()
    result = bench.run(ops=20, rounds=11, self_timed=True, clock=thread_time_ns)
    pair_us = result.cases["500 perf_counter_ns pairs"].median_us / len(items)
    measured_ms = result.added_us("instrumented") / 1000
    fast_us, fast_rounds = result.full_speed(
        "instrumented", "plain", "500 perf_counter_ns pairs", len(items)
    )
    fast_ms = None if fast_us is None else fast_us / 1000
    spans.clear()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        with request():
            for item in items:
                orjson.dumps(item)
    finally:
        instrumentor.uninstrument()
    serialize_spans = [s for s in spans.get_finished_spans() if s.name == "serialize"]
    get_recorder().configure(budgets={})
    result.notes.append(
        f"500 small orjson.dumps in a sampled request add {measured_ms:.3f} ms (all rounds; "
        f"a bare pair took {pair_us:.3f} us). "
        + _verdict(
            fast_rounds,
            result.rounds,
            [("added", fast_ms, measured_ms, pair_us, 1.5, "ms")],
        )
        + f" They make {len(serialize_spans)} serialize span(s) (target <= 8: "
        f"{'MET' if len(serialize_spans) <= 8 else 'MISSED'}; before per-request accounting: "
        "500)."
    )
    result.write()
    return result.markdown()


def main() -> None:
    sections = [*repeated_calls(), orjson_loop()]
    for section in sections:
        print(section)


if __name__ == "__main__":
    main()
