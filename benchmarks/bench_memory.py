"""Memory over 100k instrumented requests stays flat (issue 9).

100,000 requests, each a ``request()`` with four stages (one nested), a queue
put/get (queue_wait), a json round trip (serialize and parse) and a custom
stage per request, with the queue, serializers and runtime instrumentors on,
10% of requests traced through a BatchSpanProcessor into an exporter that drops
spans. Python heap (tracemalloc) and RSS are sampled every 10k requests after a
10k warm-up; the bound stated is on growth after the warm-up.

    python -m benchmarks.bench_memory
"""

from __future__ import annotations

import gc
import json
import queue
import resource
import time
import tracemalloc

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from benchmarks.harness import environment_line, write_section
from otel_inference import configure, request, stage
from otel_inference.instrumentation.queues import QueueInstrumentor
from otel_inference.instrumentation.runtime import RuntimeInstrumentor
from otel_inference.instrumentation.serializers import SerializersInstrumentor

REQUESTS = 100_000
WARMUP = 10_000
SAMPLE_EVERY = 10_000
BOUND_KIB = 1024  # stated bound on Python-heap growth after the warm-up
TITLE = "Memory over 100k instrumented requests"


class DroppingExporter(SpanExporter):
    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    exporter = DroppingExporter()
    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    configure(tracer_provider, MeterProvider(metric_readers=[reader]), budgets="tokenize=1ms")
    instrumentors = (QueueInstrumentor(), SerializersInstrumentor(), RuntimeInstrumentor())
    for instrumentor in instrumentors:
        instrumentor.instrument()
    work: queue.Queue = queue.Queue()
    samples: list[tuple[int, float, int]] = []
    tracemalloc.start()
    start = time.perf_counter()
    for index in range(1, REQUESTS + 1):
        with request("embed"):
            with stage("preprocess"), stage("tokenize"):
                work.put({"n": index})
            item = work.get()
            with stage("model_forward"):
                body = json.dumps({"value": item["n"] * 2})
            json.loads(body)
            with stage(f"user_stage_{index % 7}"):
                pass
        if index % SAMPLE_EVERY == 0:
            gc.collect()
            heap, _ = tracemalloc.get_traced_memory()
            samples.append((index, heap / 1024, rss_kib()))
    elapsed = time.perf_counter() - start
    tracemalloc.stop()
    tracer_provider.force_flush()
    for instrumentor in instrumentors:
        instrumentor.uninstrument()

    after_warmup = [s for s in samples if s[0] >= WARMUP]
    heap_growth = after_warmup[-1][1] - after_warmup[0][1]
    rss_growth = after_warmup[-1][2] - after_warmup[0][2]
    lines = [
        f"## {TITLE}",
        "",
        f"{REQUESTS:,} requests (request + 4 stages (one nested) + queue_wait + serialize/parse each, 10% traced, "
        f"spans exported to a dropping exporter) in {elapsed:.1f} s under tracemalloc; "
        f"{environment_line()}",
        "",
        "| after requests | Python heap (KiB) | max RSS (KiB) |",
        "|---:|---:|---:|",
        *(f"| {n:,} | {heap:,.0f} | {rss:,} |" for n, heap, rss in samples),
        "",
        f"- Growth from {WARMUP:,} to {REQUESTS:,} requests: Python heap {heap_growth:+,.0f} KiB, "
        f"max RSS {rss_growth:+,} KiB; stated bound {BOUND_KIB:,} KiB of heap: "
        f"{'MET' if heap_growth <= BOUND_KIB else 'MISSED'}. {exporter.exported:,} spans exported.",
    ]
    section = "\n".join(lines) + "\n"
    write_section(TITLE, section)
    print(section)


if __name__ == "__main__":
    main()
