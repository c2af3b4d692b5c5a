"""Plain os.fork() with everything otel-inference starts running, and each of its
locks held by another thread at fork time (the worst moment). Prints one JSON
line per process: what the child measured and exported, then the parent's.

Run as ``python fork_app.py SPANS_FILE`` (no opentelemetry-instrument: the SDK is
set up here, with in-memory metrics and the span file of OTEL_INFERENCE_SPANS_FILE).
"""

import faulthandler
import gc
import json
import os
import sys
import threading
from pathlib import Path

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider

from otel_inference import get_recorder, stage
from otel_inference.batching import ThreadBatcher
from otel_inference.distro import add_spans_file_processor
from otel_inference.runtime import gc_monitor
from otel_inference.timing import CudaTimer
from tests.fake_cuda import FakeBackend, FakeClock

spans_file = Path(sys.argv[1])
os.environ["OTEL_INFERENCE_SPANS_FILE"] = str(spans_file)


class CountingExporter(MetricExporter):
    """Counts exports: the periodic reader holds its export lock around each one."""

    def __init__(self) -> None:
        super().__init__()
        self.exports = 0

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


reader = InMemoryMetricReader()
exporter = CountingExporter()
periodic = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
meter_provider = MeterProvider(metric_readers=[reader, periodic])
tracer_provider = TracerProvider()
metrics.set_meter_provider(meter_provider)
trace.set_tracer_provider(tracer_provider)
assert add_spans_file_processor(tracer_provider) == spans_file
get_recorder().configure(tracer_provider, meter_provider)
gc_monitor().start()


def stage_counts() -> dict[str, int]:
    """``inference.stage.duration`` count per stage, as this process exports it."""
    data = reader.get_metrics_data()
    return {
        point.attributes["inference.stage"]: point.count
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "inference.stage.duration"
        for point in metric.data.data_points
    }


# The parent at work: a stage, a batch (worker thread started), a CUDA timing
# pending on the resolver thread, a GC pause not yet recorded.
with stage("warmup"):
    pass
batcher = ThreadBatcher(lambda items: [i * 2 for i in items], name="fork", stage="model_forward")
assert batcher(1) == 2
fake = FakeBackend(FakeClock())
timer = CudaTimer("events", backend=fake, monotonic=fake.clock, wall=fake.clock)
timer.end(timer.begin(0), lambda *args: None)
gc.collect()
assert timer.pending == 1 and gc_monitor().pending

# Another thread holds every lock a child could need, as if mid-write at fork time;
# the span file's stream holds a parent line written but not yet flushed.
file_exporter = next(
    p.span_exporter
    for p in tracer_provider._active_span_processor._span_processors
    if hasattr(p, "span_exporter")
)._exporter
held = threading.Event()
release = threading.Event()


def hold_locks() -> None:
    with gc_monitor()._lock, batcher._cond, file_exporter._lock, periodic._export_lock:
        file_exporter._stream.write(json.dumps({"parent_pending": os.getpid()}) + "\n")
        held.set()
        release.wait()
        file_exporter._stream.flush()


holder = threading.Thread(target=hold_locks)
holder.start()
held.wait()

pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(30, exit=True)  # a deadlock fails loudly
    result = {
        "gc_pending_after_fork": len(gc_monitor().pending),
        "timer_pending_after_fork": timer.pending,
    }
    gc_monitor().stop()  # takes the monitor's lock
    gc_monitor().start()
    outputs = [batcher(i) for i in range(3)]  # restarts the batcher's worker thread
    timing = timer.begin(0)
    fake.device(0).current.launch(1_000_000)
    resolved = []
    timer.end(timing, lambda duration, end, t: resolved.append(duration))
    fake.device(0).current.run()
    with stage("child_stage"):
        pass
    result.update(
        role="child",
        outputs=outputs,
        timer_flushed=timer.flush(10),
        timer_resolved=resolved,
    )
    tracer_provider.force_flush()
    result["points"] = stage_counts()
    result["periodic_flushed"] = periodic.force_flush(10_000) and exporter.exports == 1
    print(json.dumps(result), flush=True)
    os._exit(0)

release.set()
holder.join()
_, status = os.waitpid(pid, 0)
tracer_provider.force_flush()
print(json.dumps({"role": "parent", "child_status": status, "points": stage_counts()}), flush=True)
