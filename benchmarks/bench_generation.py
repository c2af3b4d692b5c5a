"""Overhead of generation instrumentation: transformers ``generate()`` of a tiny GPT-2.

Run: ``.venv/bin/python -m benchmarks.bench_generation`` (about a minute; ``--quick``
for a smoke run that writes nothing). One ``generate()`` of 64 new tokens (greedy,
prompt of 16 tokens) on a 2-layer GPT-2 built from a config (random weights, CPU),
per operation, torch on one thread; all cases in the same process, interleaved round by round; CPU time
of the calling thread (the span exporter's thread is not counted, as in
``bench_torch``):

* ``bare``: no instrumentation;
* ``generate unsampled`` / ``generate sampled``: the torch instrumentor with its
  generation support (default): one ``generate`` / ``prefill`` / ``decode`` and the
  GenAI metrics per call; the 64 forwards are counted, not recorded;
* ``per-forward unsampled`` / ``per-forward sampled``: ``generate=False``, i.e. what
  the torch instrumentor did before: a ``model_forward`` stage (span when sampled)
  for every one of the 64 forwards.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import bench_torch as torch_bench
from benchmarks.harness import Benchmark, BenchmarkResult

NEW_TOKENS = 64


class Cases(torch_bench.Cases):
    """bench_torch's providers and modes, plus a tiny GPT-2 and its generate()."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=64,
            vocab_size=512,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=511,
            pad_token_id=0,
        )
        self.model = GPT2LMHeadModel(config).eval()
        self.prompt = torch.randint(1, 511, (1, 16), generator=torch.Generator().manual_seed(1))

    def generate(self) -> None:
        with torch.inference_mode():
            self.model.generate(
                self.prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )


# case name -> (bench_torch mode, generate option)
MODES = {
    "bare": ("bare", True),
    "generate unsampled": ("unsampled", True),
    "generate sampled": ("sampled", True),
    "per-forward unsampled": ("unsampled", False),
    "per-forward sampled": ("sampled", False),
}


def bench_generate(cases: Cases, ops: int, rounds: int) -> BenchmarkResult:
    bench = Benchmark(
        f"generation: one generate() of {NEW_TOKENS} tokens (tiny GPT-2, CPU)", baseline="bare"
    )
    for name, (mode, generate) in MODES.items():
        bench.case(name, cases.case(mode, cases.generate, generate=generate))
    result = bench.run(ops, rounds, warmup_ops=1, self_timed=True)
    result.notes += [
        "CPU time of the calling thread per generate() call (median of rounds), torch on one "
        "thread; `unsampled` inside an unsampled parent span, `sampled` inside a sampled one",
        "`generate`: one generate/prefill/decode record per call (the default); "
        "`per-forward`: OTEL_INFERENCE_TORCH_GENERATE=false, a model_forward per token",
        "a whole generate() costs milliseconds per token in transformers' own Python: the "
        "instrumentation's microseconds are below this table's noise (see the IQR); the "
        "component costs are in the section generation: added cost per decode step and per generation",
    ]
    return result


def bench_components(cases: Cases, ops: int, rounds: int) -> BenchmarkResult:
    """The two costs generation instrumentation adds: per decode step (the torch
    wrapper's step path) and per generation (the stages and metrics, recorded once)."""
    from otel_inference import generation, get_recorder
    from otel_inference.genai import GenerationScope
    from otel_inference.instrumentation.torch import _wrappers
    from otel_inference.instrumentation.torch._generate import GenerateRun
    from otel_inference.stages import StageRecorder

    # generation() records through the default recorder: bind it to the bench's providers.
    get_recorder().configure(cases.tracer_provider, cases.meter_provider, budgets={})
    module = torch.nn.Identity()
    x = torch.zeros(1)
    state = _wrappers._state

    def steps(n: int) -> None:
        # What generate() sets up, around n forwards of a module whose forward is ~free.
        scope = GenerationScope(StageRecorder(budgets={}))
        state.generation, state.depth = GenerateRun(scope, 16), _wrappers._GENERATING
        try:
            for _ in range(n):
                module(x)
        finally:
            state.generation, state.depth = None, 0

    def bare_steps(n: int) -> None:
        for _ in range(n):
            module(x)

    def generations(n: int) -> None:
        for _ in range(n):
            with generation(prompt_tokens=16) as g:
                g.first_token()
                for _ in range(NEW_TOKENS - 1):
                    g.tokens(1)

    bench = Benchmark("generation: added cost per decode step and per generation")
    bench.case("bare module call", cases.case("bare", lambda: bare_steps(1)))
    bench.case("step inside generate()", cases.case("unsampled", lambda: steps(1)))
    bench.case("bare module call x64", cases.case("bare", lambda: bare_steps(NEW_TOKENS)))
    bench.case("steps x64", cases.case("unsampled", lambda: steps(NEW_TOKENS)))
    for mode in ("unsampled", "sampled"):
        bench.case(f"generation() of 64 tokens, {mode}", cases.case(mode, lambda: generations(1)))
    result = bench.run(ops, rounds, warmup_ops=max(1, ops // 5), self_timed=True)
    per_step = (
        result.added_us("steps x64", "bare module call x64")
        - result.added_us("step inside generate()", "bare module call")
    ) / (NEW_TOKENS - 1)
    result.notes += [
        f"per decode step: {per_step:+.3f} us (the torch wrapper counting a forward of "
        "generate(): (added on 64 steps - added on 1) / 63)",
        "per generation (generate, prefill, decode, ttft, tpot records and the four GenAI "
        "histograms, once): "
        + ", ".join(
            f"{mode} {result.cases[f'generation() of 64 tokens, {mode}'].median_us:.1f} us"
            for mode in ("unsampled", "sampled")
        ),
        "CPU time of the calling thread per operation (median of rounds); `sampled` inside a "
        "sampled parent span (three spans per generation)",
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; do not write")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the calling thread's CPU time is then the whole cost
    cases = Cases()
    try:
        results = [
            bench_components(
                cases, ops=200 if args.quick else 2000, rounds=3 if args.quick else 15
            ),
            bench_generate(cases, ops=1 if args.quick else 2, rounds=3 if args.quick else 7),
        ]
    finally:
        cases.close()
    for result in results:
        print(result.markdown())
        if not args.quick:
            result.write()


if __name__ == "__main__":
    main()
