"""gc.freeze() after model load: sampled stage cost in a process holding a large heap.

A loaded model leaves hundreds of thousands of tracked objects (measured on
all-MiniLM-L6-v2: ~430k); every full collection rescans them. Spans allocate,
so collections run during requests. Same-run A/B: rounds alternate between the
default collector and after ``gc.freeze()`` (which is what
OTEL_INFERENCE_GC_FREEZE=true does once the process is warm).

    python -m benchmarks.bench_gc
"""

from __future__ import annotations

import gc

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from benchmarks.harness import Benchmark
from otel_inference import StageRecorder
from otel_inference.runtime import gc_monitor

HEAP_OBJECTS = 430_000


def main() -> None:
    # A model-sized heap of long-lived tracked objects.
    heap = [{"weight": [index]} for index in range(HEAP_OBJECTS // 3)]
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = StageRecorder(
        tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()]), budgets={}
    )
    pauses = gc_monitor()
    pauses.start()

    def requests(n: int) -> None:
        # Finished spans stay referenced for the whole round, as they do in a
        # batch span processor's queue (up to 2048 by default): survivors are
        # what eventually triggers full collections.
        exporter.clear()
        for _ in range(n):
            with recorder.request("embed"):
                with recorder.stage("tokenize"):
                    pass
                with recorder.stage("model_forward"):
                    pass

    def default_gc(n: int) -> None:
        gc.unfreeze()
        requests(n)

    def frozen(n: int) -> None:
        gc.freeze()
        try:
            requests(n)
        finally:
            gc.unfreeze()

    bench = Benchmark(
        "gc.freeze() with a model-sized heap (sampled request, 2 stages)", baseline="default gc"
    )
    bench.case("default gc", default_gc)
    bench.case("after gc.freeze()", frozen)
    result = bench.run(ops=2_000, rounds=11)
    saved = -result.added_us("after gc.freeze()")
    result.notes.append(
        f"{len(gc.get_objects()):,} tracked objects in the process. gc.freeze() saves {saved:.1f} us "
        f"per request ({(1 - result.ratio('after gc.freeze()')) * 100:.1f}%): full collections no "
        "longer rescan the long-lived heap. Offered as OTEL_INFERENCE_GC_FREEZE=true (applied once "
        "the process is warm)."
    )
    result.write()
    print(result.markdown())
    pauses.stop()
    del heap


if __name__ == "__main__":
    main()
