"""Check the torch instrumentor's CUDA paths on a real GPU; write what was seen to results.md.

Run on a machine with CUDA: ``.venv/bin/python -m benchmarks.cuda_check`` (about a
minute). Without CUDA it prints that it skipped and exits 0. Exit status 1 when a
check fails. What it checks (issue 3, "Verification"):

1. ``events`` mode adds no synchronisation: the instrumented forwards (and a
   pinned non_blocking h2d copy) run under ``torch.cuda.set_sync_debug_mode("error")``.
2. ``events``-mode forward durations match ground truth (CUDA events recorded
   by hand around the uninstrumented forward) within 2% (median), and ``sync``-mode
   durations within 10% (sync adds host work to what it measures).
3. The host launch time (``inference.host.duration``) is kept, the span ends at or
   after start + device time and no later than when the host saw the work finish.
4. ``h2d_transfer`` / ``d2h_transfer``: bytes, pinned, non_blocking, and the
   ``inference.transfer.size`` histogram by direction.
5. The resolver thread had no CUDA errors and nothing fell back to host time.
6. The sampled kernel profile reports kernel time on the GPU.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.md")
TITLE = "torch: CUDA check (benchmarks/cuda_check.py)"
EVENTS_TOLERANCE = 0.02
SYNC_TOLERANCE = 0.10


class Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.rows)


def write_section(body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {TITLE}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(TITLE)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("cuda_check: skipped (torch is not installed)")
        return 0
    if not torch.cuda.is_available():
        print("cuda_check: skipped (no CUDA device on this machine)")
        return 0
    check = Check()
    facts = run_checks(torch, check, args.reps)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S')} on {facts['gpu']}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *[f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |" for name, ok, detail in check.rows],
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("\n".join(lines))
    return 0 if check.passed else 1


def _providers() -> tuple[Any, Any, Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return tracer_provider, MeterProvider(metric_readers=[reader]), exporter, reader


def _points(reader: Any, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    points: list[Any] = []
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def _ground_truth(torch: Any, forward: Callable[[], Any], reps: int) -> list[float]:
    """Device ms of each uninstrumented forward, by hand-recorded CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _instrumented(torch: Any, mode: str, forward: Callable[[], Any], reps: int, **kwargs: Any):
    """Run ``forward`` ``reps`` times under a fresh instrumentor in ``mode``; returns
    (spans, durations in ms, timer stats, error or None from sync debug mode)."""
    from otel_inference.instrumentation.torch import TorchInstrumentor

    tracer_provider, meter_provider, exporter, _reader = _providers()
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, cuda_timing=mode, **kwargs
    )
    tracker = instrumentor.tracker
    tracer = tracer_provider.get_tracer("cuda_check")
    error = None
    walls_after: list[int] = []
    try:
        for _ in range(reps):
            torch.cuda.synchronize()
            with tracer.start_as_current_span("request"):
                if mode == "events":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    forward()
                except RuntimeError as exc:  # a synchronising call under debug mode
                    error = exc
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            walls_after.append(time.time_ns())
        tracker.timer.flush(timeout=30)
        stats = tracker.timer.stats
        stats = {
            "resolved": stats.resolved,
            "fallbacks": stats.fallbacks,
            "errors": stats.errors,
            "queue_full": stats.queue_full,
        }
    finally:
        instrumentor.uninstrument()
    spans = [span for span in exporter.get_finished_spans() if span.name == "model_forward"]
    spans.sort(key=lambda span: span.start_time)
    return spans, walls_after, stats, error


def run_checks(torch: Any, check: Check, reps: int) -> dict[str, Any]:
    from torch import nn

    device = torch.device("cuda", torch.cuda.current_device())
    facts: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device)}
    torch.manual_seed(0)
    # GPU-bound: ~ms of kernels for ~100 us of launches.
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4096, 4096), nn.GELU()) for _ in range(8)])
    model = model.to(device).eval().half()
    x = torch.randn(512, 4096, device=device, dtype=torch.half)

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    for _ in range(5):
        forward()
    torch.cuda.synchronize()
    truth = statistics.median(_ground_truth(torch, forward, reps))

    spans, walls_after, stats, error = _instrumented(torch, "events", forward, reps)
    check(
        "events: no synchronisation under set_sync_debug_mode('error')",
        error is None,
        "none raised" if error is None else f"{type(error).__name__}: {error}",
    )
    durations = [span.attributes["inference.timing.source"] == "cuda_events" for span in spans]
    check(
        "events: every forward device-timed",
        len(spans) == reps and all(durations),
        f"{sum(durations)}/{reps} spans with inference.timing.source=cuda_events; stats {stats}",
    )
    check("events: resolver had no CUDA error", stats["errors"] == 0, f"errors={stats['errors']}")
    # Span length: from the host call to the device's end.
    span_ms = [(span.end_time - span.start_time) / 1e6 for span in spans]
    events_hist_ms = statistics.median(_events_histogram_ms(torch, forward, reps))
    deviation = abs(events_hist_ms - truth) / truth
    check(
        f"events: forward duration within {EVENTS_TOLERANCE:.0%} of ground truth",
        deviation <= EVENTS_TOLERANCE,
        f"median {events_hist_ms:.3f} ms vs ground truth {truth:.3f} ms ({deviation:+.2%})",
    )
    host_ms = statistics.median(span.attributes["inference.host.duration"] * 1e3 for span in spans)
    check(
        "events: host launch time kept, and smaller than device time (async)",
        host_ms < events_hist_ms,
        f"median inference.host.duration {host_ms:.3f} ms",
    )
    ends_ok = all(
        (span.end_time - span.start_time) / 1e6 >= events_hist_ms * (1 - EVENTS_TOLERANCE)
        # The anchor's calibration error is tens of us: allow 1 ms past the host's
        # own observation that the work had finished.
        and span.end_time <= wall + 1_000_000
        for span, wall in zip(spans, walls_after, strict=False)
    )
    check(
        "events: span ends at the device's end",
        ends_ok,
        f"median span length {statistics.median(span_ms):.3f} ms; every end <= host wall time "
        "after synchronize (+1 ms)",
    )

    sync_spans, _, _, _ = _instrumented(torch, "sync", forward, reps)
    sync_ms = statistics.median((s.end_time - s.start_time) / 1e6 for s in sync_spans)
    deviation = abs(sync_ms - events_hist_ms) / events_hist_ms
    check(
        f"sync: durations within {SYNC_TOLERANCE:.0%} of events mode",
        deviation <= SYNC_TOLERANCE,
        f"sync median {sync_ms:.3f} ms vs events {events_hist_ms:.3f} ms ({deviation:+.2%})",
    )
    off_spans, _, _, _ = _instrumented(torch, "off", forward, reps)
    off_ms = statistics.median((s.end_time - s.start_time) / 1e6 for s in off_spans)
    check(
        "off: host time only (launches), flagged",
        all(s.attributes["inference.timing.source"] == "host_unsynced" for s in off_spans),
        f"median {off_ms:.3f} ms (launches) vs device {events_hist_ms:.3f} ms",
    )

    _check_transfers(torch, check, device)
    _check_profile(torch, check, forward)
    return facts


def _events_histogram_ms(torch: Any, forward: Callable[[], Any], reps: int) -> list[float]:
    """Durations the histogram got in events mode (one record per forward)."""
    from otel_inference.instrumentation.torch import TorchInstrumentor

    tracer_provider, meter_provider, _exporter, reader = _providers()
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, cuda_timing="events"
    )
    sums = []
    try:
        previous = 0.0
        for _ in range(reps):
            torch.cuda.synchronize()
            forward()
            torch.cuda.synchronize()
            instrumentor.tracker.timer.flush(timeout=30)
            (point,) = [
                p
                for p in _points(reader, "inference.stage.duration")
                if p.attributes.get("inference.stage") == "model_forward"
            ]
            sums.append((point.sum - previous) * 1e3)
            previous = point.sum
    finally:
        instrumentor.uninstrument()
    return sums


def _check_transfers(torch: Any, check: Check, device: Any) -> None:
    from otel_inference.instrumentation.torch import TorchInstrumentor

    tracer_provider, meter_provider, exporter, reader = _providers()
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    tracer = tracer_provider.get_tracer("cuda_check")
    host = torch.randn(1024, 1024).pin_memory()
    error = None
    try:
        with tracer.start_as_current_span("request"):
            torch.cuda.set_sync_debug_mode("error")
            try:
                on_device = host.cuda(non_blocking=True)
            except RuntimeError as exc:
                error = exc
            finally:
                torch.cuda.set_sync_debug_mode(0)
            back = on_device.cpu()
        instrumentor.tracker.timer.flush(timeout=30)
    finally:
        instrumentor.uninstrument()
    check(
        "h2d: pinned non_blocking copy adds no synchronisation",
        error is None,
        "none raised" if error is None else str(error),
    )
    spans = {span.name: span for span in exporter.get_finished_spans()}
    h2d, d2h = spans.get("h2d_transfer"), spans.get("d2h_transfer")
    expected = 1024 * 1024 * 4
    check(
        "h2d: bytes, pinned, non_blocking, device-timed",
        h2d is not None
        and h2d.attributes["inference.transfer.bytes"] == expected
        and h2d.attributes["inference.transfer.pinned"] is True
        and h2d.attributes["inference.transfer.non_blocking"] is True
        and h2d.attributes["inference.timing.source"] == "cuda_events",
        "" if h2d is None else str(dict(h2d.attributes)),
    )
    check(
        "d2h: bytes and device",
        d2h is not None
        and d2h.attributes["inference.transfer.bytes"] == expected
        and d2h.attributes["inference.transfer.source_device"] == str(device),
        "" if d2h is None else str(dict(d2h.attributes)),
    )
    sizes = {
        p.attributes["inference.transfer.direction"]: p.sum
        for p in _points(reader, "inference.transfer.size")
    }
    check(
        "inference.transfer.size by direction",
        sizes == {"h2d": expected, "d2h": expected},
        str(sizes),
    )
    assert torch.equal(back, host)


def _check_profile(torch: Any, check: Check, forward: Callable[[], Any]) -> None:
    from otel_inference.instrumentation.torch import TorchInstrumentor

    tracer_provider, meter_provider, exporter, _reader = _providers()
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, profile_every=1
    )
    try:
        with tracer_provider.get_tracer("cuda_check").start_as_current_span("request"):
            forward()
        torch.cuda.synchronize()
        instrumentor.tracker.timer.flush(timeout=30)
    finally:
        instrumentor.uninstrument()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "model_forward"]
    attributes = dict(span.attributes)
    check(
        "profile: kernel time, idle gap, memcpy time, top kernels",
        attributes.get("inference.profile.kernel_time", 0) > 0
        and "inference.profile.idle_time" in attributes
        and "inference.profile.memcpy_time" in attributes
        and bool(attributes.get("inference.profile.top_ops")),
        str({k: v for k, v in attributes.items() if k.startswith("inference.profile")}),
    )


if __name__ == "__main__":
    sys.exit(main())
