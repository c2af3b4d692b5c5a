"""Per-call overhead of the Redis feature-hydration instrumentor vs contrib's RedisInstrumentor.

Run: ``.venv/bin/python -m benchmarks.bench_redis`` (about a minute). Starts its own
redis-server on a free 127.0.0.1 port; all cases run in the same process,
interleaved round by round, against the same server and client:

* ``bare``: no instrumentation.
* ``contrib``: opentelemetry-instrumentation-redis, sampled (one CLIENT span per call).
* ``ours``: RedisFeatureInstrumentor, sampled (stage span, hit/miss attributes,
  stage histogram, lookups counter).
* ``ours unsampled``: the request is not sampled: histogram and counters only.
* ``contrib+ours``: both, sampled.

CPU time of the calling thread per call. Both instrumentations export through the same SDK pipeline (BatchSpanProcessor to
an exporter that drops spans; an in-memory metric reader). Target: our added
time per call <= 0.6x contrib's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from opentelemetry import trace
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from benchmarks.harness import Benchmark, BenchmarkResult
from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from otel_inference.stages import StageRecorder
from tests.servers import RedisServer

MGET_KEYS = 32
TARGET_RATIO = 0.6


class _DropExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS


def _providers() -> tuple[TracerProvider, MeterProvider]:
    tracer_provider = TracerProvider()  # ParentBased(ALWAYS_ON): follows the parent
    tracer_provider.add_span_processor(BatchSpanProcessor(_DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


_UNSAMPLED_PARENT = NonRecordingSpan(
    SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
)


class Cases:
    """Switches instrumentation on for the duration of one case's round."""

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer = tracer_provider.get_tracer("bench")

    @contextmanager
    def setup(self, contrib: bool, ours: bool, sampled: bool) -> Iterator[None]:
        if contrib:
            RedisInstrumentor().instrument(tracer_provider=self.tracer_provider)
        if ours:
            RedisFeatureInstrumentor().instrument(
                tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
            )
        try:
            if sampled:
                with self.tracer.start_as_current_span("request"):
                    yield
            else:
                with trace.use_span(_UNSAMPLED_PARENT):
                    yield
        finally:
            if ours:
                RedisFeatureInstrumentor().uninstrument()
            if contrib:
                RedisInstrumentor().uninstrument()

    def stage_only(self, op: Callable[[], object]) -> Callable[[int], None]:
        recorder = StageRecorder(self.tracer_provider, self.meter_provider, budgets={})

        def run(n: int) -> None:
            with self.setup(False, False, True):
                for _ in range(n):
                    with recorder.stage("feature_hydration"):
                        op()

        return run

    def case(
        self,
        op: Callable[[], object],
        contrib: bool = False,
        ours: bool = False,
        sampled: bool = True,
    ) -> Callable[[int], None]:
        def run(n: int) -> None:
            with self.setup(contrib, ours, sampled):
                for _ in range(n):
                    op()

        return run


def _bench(
    title: str, cases: Cases, op: Callable[[], object], ops: int, rounds: int
) -> BenchmarkResult:
    bench = Benchmark(title, baseline="bare")
    bench.case("bare", cases.case(op))
    bench.case("contrib", cases.case(op, contrib=True))
    bench.case("stage() only", cases.stage_only(op))
    bench.case("ours", cases.case(op, ours=True))
    bench.case("ours unsampled", cases.case(op, ours=True, sampled=False))
    bench.case("contrib+ours", cases.case(op, contrib=True, ours=True))
    result = bench.run(ops, rounds, clock=time.thread_time_ns)  # CPU of the calling thread
    contrib_added = result.added_us("contrib")
    for name in ("ours", "ours unsampled"):
        ratio = result.added_us(name) / contrib_added
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        result.notes.append(
            f"`{name}` adds {result.added_us(name):.1f} us per call = {ratio:.2f}x contrib's "
            f"{contrib_added:.1f} us ({verdict} the <= {TARGET_RATIO}x target)"
        )
    result.notes.append(
        f"`stage() only` (the core recorder's sampled stage around the bare call, no Redis "
        f"attributes or counting) adds {result.added_us('stage() only'):.1f} us: the floor of "
        "any sampled stage"
    )
    result.notes.append(
        "figures are CPU time of the calling thread per call (median of rounds); overhead = "
        "case - `bare`, same process, same server, interleaved rounds; sampled cases run inside "
        "a sampled parent span, `ours unsampled` inside an unsampled one"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print, do not write results.md")
    args = parser.parse_args()

    tracer_provider, meter_provider = _providers()
    cases = Cases(tracer_provider, meter_provider)
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir)).start()
        try:
            client = redis.Redis(host=server.host, port=server.port)
            keys = [f"feat:{i}" for i in range(MGET_KEYS)]
            # Half the keys exist: both hits and misses are counted.
            client.mset({key: b"x" * 64 for key in keys[::2]})
            results = [
                _bench(
                    "Redis GET: feature_hydration vs contrib RedisInstrumentor",
                    cases,
                    lambda: client.get(keys[0]),
                    args.ops,
                    args.rounds,
                ),
                _bench(
                    f"Redis MGET of {MGET_KEYS} keys: feature_hydration vs contrib RedisInstrumentor",
                    cases,
                    lambda: client.mget(keys),
                    args.ops,
                    args.rounds,
                ),
            ]
            client.close()
        finally:
            server.stop()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    for result in results:
        print(result.markdown())
        if not args.no_write:
            result.write()


if __name__ == "__main__":
    main()
