"""Overhead of the instrumented batcher and of queue_wait on stdlib queues.

Run: ``.venv/bin/python -m benchmarks.bench_batching`` (under 2 minutes). Writes
three sections of benchmarks/results.md.

* Batcher: per request, the same ``ThreadBatcher``/``AsyncBatcher`` with
  ``instrument=False`` vs instrumented, members in an unsampled request (the
  common path: histograms only) and in a sampled one (spans too). The batch
  function does no work (identity), so the figures are pure overhead; requests
  arrive in bursts of 64 (batches of up to 32).
* Queues: one ``put`` + one ``get`` per operation on an uncontended queue, before
  ``instrument()`` vs instrumented: an opted-out queue, an item put outside any
  request (not recorded by default), and items put in an unsampled / sampled request.

Spans are built but not exported (no span processor) and metrics are aggregated
in memory, so exporter cost is not in the figures, the SDK's recording cost is.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

from benchmarks.harness import Benchmark
from otel_inference.batching import AsyncBatcher, ThreadBatcher
from otel_inference.instrumentation.queues import QueueInstrumentor, exclude_queue
from otel_inference.stages import StageRecorder

BURST = 64
MAX_BATCH = 32


class Pipeline:
    """A tracer and meter provider pair, and a recorder bound to them."""

    def __init__(self, sampler: Sampler) -> None:
        self.tracer_provider = TracerProvider(sampler=sampler)  # no processor: no export
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.recorder = StageRecorder(self.tracer_provider, self.meter_provider, budgets={})
        self.tracer = self.tracer_provider.get_tracer("bench")

    @contextmanager
    def request(self) -> Iterator[None]:
        """A request context for the producer (a server span, sampled or not)."""
        with self.tracer.start_as_current_span("request"):
            yield


UNSAMPLED = Pipeline(ALWAYS_OFF)
SAMPLED = Pipeline(ALWAYS_ON)


def identity(items: list[int]) -> list[int]:
    return items


async def async_identity(items: list[int]) -> list[int]:
    return items


class HistogramReference:
    """``records`` bare SDK ``histogram.record`` calls per operation: what the
    histograms alone cost, the floor under any per-request metric."""

    def __init__(self, pipeline: Pipeline, records: int, then: Callable[[int], object]) -> None:
        meter = pipeline.meter_provider.get_meter("bench-reference")
        self.histogram = meter.create_histogram("bench.reference", unit="s")
        self.records = records
        self.then = then

    def run(self, n: int) -> None:
        record, attributes = self.histogram.record, {"inference.stage": "queue_wait"}
        for _ in range(n * self.records):
            record(0.001, attributes)
        self.then(n)


class ThreadBatcherCase:
    """Requests in bursts of ``BURST`` through a ``ThreadBatcher``; ``run(n)`` serves n."""

    def __init__(self, pipeline: Pipeline, instrument: bool) -> None:
        self.pipeline = pipeline
        self.batcher = ThreadBatcher(
            identity,
            max_batch_size=MAX_BATCH,
            max_wait_ms=0,
            instrument=instrument,
            recorder=pipeline.recorder,
        )

    def run(self, n: int) -> None:
        submit = self.batcher.submit
        with self.pipeline.request():
            for start in range(0, n, BURST):
                futures = [submit(i) for i in range(start, min(n, start + BURST))]
                for future in futures:
                    future.result()

    def close(self) -> None:
        self.batcher.close()


class AsyncBatcherCase:
    """The same through an ``AsyncBatcher`` (an async batch function: no executor hop)."""

    def __init__(self, pipeline: Pipeline, instrument: bool) -> None:
        self.pipeline = pipeline
        self.loop = asyncio.new_event_loop()
        self.batcher = AsyncBatcher(
            async_identity,
            max_batch_size=MAX_BATCH,
            max_wait_ms=0,
            instrument=instrument,
            recorder=pipeline.recorder,
        )

    async def _serve(self, n: int) -> None:
        batcher = self.batcher
        with self.pipeline.request():
            for start in range(0, n, BURST):
                await asyncio.gather(*(batcher(i) for i in range(start, min(n, start + BURST))))

    def run(self, n: int) -> None:
        self.loop.run_until_complete(self._serve(n))

    def close(self) -> None:
        self.loop.run_until_complete(self.batcher.aclose())
        self.loop.close()


def batcher_benchmarks() -> None:
    makers: tuple[tuple[str, type[ThreadBatcherCase | AsyncBatcherCase]], ...] = (
        ("Batcher overhead per request (ThreadBatcher)", ThreadBatcherCase),
        ("Batcher overhead per request (AsyncBatcher)", AsyncBatcherCase),
    )
    for title, make in makers:
        bench = Benchmark(title, baseline="instrument=False")
        cases = {
            "instrument=False": make(UNSAMPLED, False),
            "instrumented, unsampled request": make(UNSAMPLED, True),
            "instrumented, sampled request": make(SAMPLED, True),
        }
        for name, case in cases.items():
            bench.case(name, case.run)
        reference = "instrument=False + 3 bare histogram.record"
        bench.case(reference, HistogramReference(UNSAMPLED, 3, cases["instrument=False"].run).run)
        result = bench.run(ops=4096, rounds=9)
        for case in cases.values():
            case.close()
        own = result.added_us("instrumented, unsampled request", reference)
        result.notes.append(
            f"Unsampled: {result.added_us('instrumented, unsampled request'):.1f} us per "
            f"request, of which the SDK's three histogram records are "
            f"{result.added_us(reference):.1f} us; the instrumentation's own work: {own:.1f} us."
        )
        result.notes.append(
            f"Identity batch function, bursts of {BURST} requests, max_batch_size={MAX_BATCH}, "
            "max_wait_ms=0: the added time is per request, mostly three histogram records "
            "(queue_wait, the batch stage, its cost share) plus one context capture; the "
            "sampled case adds one queue_wait span per request and one batch span per batch."
        )
        result.write()
        print(result.markdown())


def queue_case(
    pipeline: Pipeline | None,
    make_queue: Callable[[], queue.Queue[int]] = queue.Queue,
    in_request: bool = True,
) -> Callable[[int], object]:
    def loop(q: queue.Queue[int], n: int) -> None:
        put, get = q.put, q.get
        for i in range(n):
            put(i)
            get()

    def run(n: int) -> None:
        if pipeline is None:
            loop(make_queue(), n)
            return
        instrumentor = QueueInstrumentor()
        instrumentor.instrument(
            tracer_provider=pipeline.tracer_provider, meter_provider=pipeline.meter_provider
        )
        try:
            q = make_queue()
            if in_request:
                with pipeline.request():
                    loop(q, n)
            else:
                loop(q, n)
        finally:
            instrumentor.uninstrument()

    return run


def async_queue_case(pipeline: Pipeline | None) -> Callable[[int], object]:
    async def loop(n: int) -> None:
        q: asyncio.Queue[int] = asyncio.Queue()
        put, get = q.put_nowait, q.get_nowait
        for i in range(n):
            put(i)
            get()

    def run(n: int) -> None:
        if pipeline is None:
            asyncio.run(loop(n))
            return
        instrumentor = QueueInstrumentor()
        instrumentor.instrument(
            tracer_provider=pipeline.tracer_provider, meter_provider=pipeline.meter_provider
        )
        try:
            with pipeline.request():
                asyncio.run(loop(n))
        finally:
            instrumentor.uninstrument()

    return run


def queue_benchmark() -> None:
    bench = Benchmark("queue_wait overhead per item (put + get)", baseline="queue.Queue, bare")
    bench.case("queue.Queue, bare", queue_case(None))
    bench.case(
        "queue.Queue, opted out", queue_case(UNSAMPLED, lambda: exclude_queue(queue.Queue()))
    )
    bench.case("queue.Queue, put outside a request", queue_case(UNSAMPLED, in_request=False))
    bench.case("queue.Queue, unsampled request", queue_case(UNSAMPLED))
    bench.case(
        "queue.Queue, bare + 1 bare histogram.record",
        HistogramReference(UNSAMPLED, 1, queue_case(None)).run,
    )
    bench.case("queue.Queue, sampled request", queue_case(SAMPLED))
    bench.case("asyncio.Queue (nowait), bare", async_queue_case(None))
    bench.case("asyncio.Queue (nowait), unsampled request", async_queue_case(UNSAMPLED))
    result = bench.run(ops=10_000, rounds=9)
    reference = result.added_us("queue.Queue, bare + 1 bare histogram.record")
    result.notes.append(
        f"Unsampled request: {result.added_us('queue.Queue, unsampled request'):.1f} us per "
        f"item, of which the SDK's histogram record is {reference:.1f} us."
    )
    result.notes.append(
        "Uncontended put then get in one thread. Items outside a request and opted-out "
        "queues pay only the wrappers' checks; recorded items pay a context capture at put "
        "and one queue_wait histogram record at get (plus a span when sampled). The asyncio "
        "rows compare with the asyncio bare row."
    )
    result.write()
    print(result.markdown())


def main() -> None:
    batcher_benchmarks()
    queue_benchmark()


if __name__ == "__main__":
    main()
