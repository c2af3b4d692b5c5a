"""Serialize-stage overhead per call: orjson, json and msgpack, tiny and response-sized payloads.

Each payload runs four interleaved cases: uninstrumented; instrumented but
outside any request (what every other ``json.dumps`` in the process pays: the
gate that decides "not a stage"); instrumented in an unsampled request
(histogram + size metric, no span); instrumented in a sampled request (span).

    python -m benchmarks.bench_serializers
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
from opentelemetry import context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from benchmarks.harness import Benchmark
from otel_inference.instrumentation.serializers import SerializersInstrumentor

TINY = {"ok": True}
rng = random.Random(5)
# An embedding service's response: 8 vectors of 384 floats.
RESPONSE = {
    "model": "all-MiniLM-L6-v2",
    "data": [{"index": i, "embedding": [rng.uniform(-1, 1) for _ in range(384)]} for i in range(8)],
}


def main() -> None:
    tracer_provider = TracerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    tracer = tracer_provider.get_tracer("bench")
    unsampled = NonRecordingSpan(
        SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(0))
    )
    instrumentor = SerializersInstrumentor()

    def case(parent: str, call: Callable[[], Any]) -> Callable[[int], None]:
        def run(n: int) -> None:
            span = {
                "none": None,
                "unsampled": unsampled,
                "sampled": tracer.start_span("request") if parent == "sampled" else None,
            }[parent]
            token = context.attach(trace.set_span_in_context(span)) if span else None
            try:
                for _ in range(n):
                    call()
            finally:
                if token is not None:
                    context.detach(token)
                if parent == "sampled":
                    span.end()

        return run

    # Looked up at call time, so the instrumented cases see the wrappers.
    # The baselines call the original functions, taken before instrumenting (no
    # toggling inside the timed rounds: instrument() reads package metadata).
    bare_orjson, bare_json, bare_packb = orjson.dumps, json.dumps, msgpack.packb
    instrumentor.instrument(**providers)
    payloads: list[tuple[str, Callable[[], Any], Callable[[], Any], int]] = [
        (
            "orjson.dumps, tiny dict",
            lambda: orjson.dumps(TINY),
            lambda: bare_orjson(TINY),
            20_000,
        ),
        (
            "orjson.dumps, 8 x 384-float embedding response",
            lambda: orjson.dumps(RESPONSE),
            lambda: bare_orjson(RESPONSE),
            1_000,
        ),
        (
            "json.dumps, 8 x 384-float embedding response",
            lambda: json.dumps(RESPONSE),
            lambda: bare_json(RESPONSE),
            200,
        ),
        (
            "msgpack.packb, 8 x 384-float embedding response",
            lambda: msgpack.packb(RESPONSE),
            lambda: bare_packb(RESPONSE),
            1_000,
        ),
    ]
    for label, call, bare, ops in payloads:
        size = len(call())
        bench = Benchmark(f"serialize overhead: {label}", baseline="uninstrumented")
        bench.case("uninstrumented", case("none", bare))
        bench.case("instrumented, outside a request", case("none", call))
        bench.case("instrumented, unsampled request", case("unsampled", call))
        bench.case("instrumented, sampled request", case("sampled", call))
        result = bench.run(ops=ops, rounds=15)
        result.notes.append(f"Payload: {size} bytes out.")
        for name in list(result.cases)[1:]:
            result.notes.append(f"{name}: {result.added_us(name):+.2f} us per call")
        result.write()
        print(result.markdown())
    instrumentor.uninstrument()


if __name__ == "__main__":
    main()
