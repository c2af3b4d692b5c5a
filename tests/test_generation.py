"""Generation: transformers generate() under the torch instrumentor, and the
generation() API, against ground truth.

Ground truth: a tiny GPT-2 (built from a config, random weights) whose forward
sleeps a known time for the prefill and for each decode step, and the test's
own clock at the moments a first token really exists (a streamer's second put).
"""

from __future__ import annotations

import threading
import time
from time import perf_counter_ns

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

from otel_inference import generation, get_recorder, request, semconv  # noqa: E402
from otel_inference.instrumentation.torch import TorchInstrumentor  # noqa: E402
from otel_inference.runtime import COLD_START  # noqa: E402
from tests.telemetry import Telemetry  # noqa: E402

VOCAB = 64
PREFILL_S = 0.20
STEP_S = 0.03
ORIGINAL_GENERATE = vars(GenerationMixin)["generate"]
ORIGINAL_PREFILL = vars(GenerationMixin).get("_prefill")
GENAI_TTFT = semconv.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
GENAI_TPOT = semconv.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN


def tiny_config(**overrides) -> GPT2Config:
    settings = dict(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=640,
        bos_token_id=0,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


class SleepyGPT2(GPT2LMHeadModel):
    """GPT-2 whose prefill and decode steps take known times; it can fail on a
    chosen forward call, and it notes when each forward starts."""

    fail_at: int | None = None

    def forward(self, input_ids=None, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        self.starts = [*getattr(self, "starts", []), perf_counter_ns()]
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("decode step failed")
        time.sleep(PREFILL_S if input_ids is not None and input_ids.shape[-1] > 1 else STEP_S)
        return super().forward(input_ids=input_ids, **kwargs)


class StampStreamer(BaseStreamer):
    """Records when each put arrives and what it holds (the test's ground truth)."""

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.values: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.stamps.append(perf_counter_ns())
        self.values.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.fixture
def instrumented():
    instrumentor = TorchInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config()).eval()


@pytest.fixture
def sleepy():
    torch.manual_seed(0)
    return SleepyGPT2(tiny_config()).eval()


def prompt(length: int = 12, rows: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB - 1, (rows, length), generator=generator)


def only_point(telemetry, name, **attributes):
    points = [
        p
        for p in telemetry.metric_points(name)
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(points) == 1, (name, [dict(p.attributes) for p in telemetry.metric_points(name)])
    return points[0]


def within(measured: float, truth: float, tolerance: float = 0.05) -> bool:
    return abs(measured - truth) <= tolerance * truth


# --- ground truth -----------------------------------------------------------------------


def test_streamer_ttft_and_tpot_match_ground_truth(telemetry, instrumented, sleepy):
    streamer = StampStreamer()
    new_tokens = 12
    with request():
        start_ns = perf_counter_ns()
        sleepy.generate(
            prompt(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
        )
        end_ns = perf_counter_ns()
    # The test's clock: the first generated token reached the streamer at its 2nd put.
    true_ttft = (streamer.stamps[1] - start_ns) / 1e9
    true_tpot = (end_ns - streamer.stamps[1]) / 1e9 / (new_tokens - 1)
    ttft = only_point(telemetry, GENAI_TTFT)
    tpot = only_point(telemetry, GENAI_TPOT)
    assert ttft.count == tpot.count == 1
    assert within(ttft.sum, true_ttft), (ttft.sum, true_ttft)
    assert within(tpot.sum, true_tpot), (tpot.sum, true_tpot)
    # and the designed delays are there (the model cannot be faster than its sleeps)
    assert ttft.sum >= PREFILL_S and tpot.sum >= STEP_S
    generate = telemetry.spans("generate")[0]
    assert generate.attributes[semconv.INFERENCE_GENERATION_STREAMER] is True
    assert generate.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == new_tokens
    assert streamer.ended and len(streamer.values) == new_tokens + 1


def test_without_streamer_ttft_is_when_the_first_token_is_fed_back(telemetry, instrumented, sleepy):
    new_tokens = 10
    with request():
        start_ns = perf_counter_ns()
        sleepy.generate(prompt(), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        end_ns = perf_counter_ns()
    # The model's own clock: the first decode forward starts once the first token exists.
    true_ttft = (sleepy.starts[1] - start_ns) / 1e9
    true_tpot = (end_ns - sleepy.starts[1]) / 1e9 / (new_tokens - 1)
    assert within(only_point(telemetry, GENAI_TTFT).sum, true_ttft)
    assert within(only_point(telemetry, GENAI_TPOT).sum, true_tpot)
    points = telemetry.stage_points()
    assert within(points["generate/prefill"].sum, true_ttft)
    assert points["generate/decode"].count == 1
    assert within(points["generate/decode"].sum, (end_ns - sleepy.starts[1]) / 1e9)
    decode = telemetry.spans("decode")[0]
    assert decode.attributes[semconv.INFERENCE_GENERATION_DECODE_STEPS] == new_tokens - 1


def test_ttft_counts_from_the_request_start_queue_included(telemetry, instrumented, sleepy):
    with request():
        time.sleep(0.1)  # queued before the model
        sleepy.generate(prompt(), max_new_tokens=3, min_new_tokens=3)
    ttft = only_point(telemetry, GENAI_TTFT).sum
    prefill = telemetry.stage_points()["generate/prefill"].sum
    assert ttft >= prefill + 0.1
    request_duration = only_point(telemetry, semconv.GEN_AI_SERVER_REQUEST_DURATION).sum
    assert request_duration >= telemetry.stage_points()["generate"].sum + 0.1


# --- one record per phase ---------------------------------------------------------------


def test_500_new_tokens_make_a_bounded_number_of_spans(telemetry, instrumented, gpt2):
    with request():
        out = gpt2.generate(prompt(8), max_new_tokens=500, min_new_tokens=500, do_sample=False)
    assert out.shape[-1] == 508
    names = sorted(span.name for span in telemetry.spans())
    assert names == ["decode", "generate", "inference.request", "prefill"]
    points = telemetry.stage_points()
    assert semconv.MODEL_FORWARD not in points
    assert not any(key.endswith("_transfer") for key in points)
    assert points["generate/decode"].count == 1
    decode = telemetry.spans("decode")[0]
    assert decode.attributes[semconv.INFERENCE_GENERATION_DECODE_STEPS] == 499
    assert decode.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == 500
    usage = {
        p.attributes[semconv.GEN_AI_TOKEN_TYPE]: p.sum
        for p in telemetry.metric_points(semconv.GEN_AI_CLIENT_TOKEN_USAGE)
    }
    assert usage == {"input": 8, "output": 500}


def test_forwards_outside_generate_are_still_model_forward(telemetry, instrumented, gpt2):
    with request(), torch.inference_mode():
        gpt2(prompt(8))
        gpt2.generate(prompt(8), max_new_tokens=4, min_new_tokens=4)
        gpt2(prompt(8))
    # one model_forward value for the request (issue 15's accounting), two calls in it
    assert telemetry.stage_points()[semconv.MODEL_FORWARD].count == 1
    calls = {
        p.attributes[semconv.INFERENCE_STAGE]: p.sum
        for p in telemetry.metric_points(semconv.STAGE_CALLS)
    }
    assert calls[semconv.MODEL_FORWARD] == 2 and calls["generate"] == 1
    assert len(telemetry.spans("generate")) == 1


def test_generate_inside_a_forward_nests_in_model_forward(telemetry, instrumented, gpt2):
    class Pipeline(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm.generate(ids, max_new_tokens=4, min_new_tokens=4)

    with request():
        Pipeline(gpt2)(prompt(8))
    points = telemetry.stage_points()
    assert points[semconv.MODEL_FORWARD].count == 1
    assert points["model_forward/generate"].count == 1
    assert points["generate/decode"].count == 1
    assert telemetry.spans("decode")[0].attributes[semconv.INFERENCE_GENERATION_DECODE_STEPS] == 3


def test_beam_search_and_batches_count_tokens_per_sequence(telemetry, instrumented, gpt2):
    with request():
        out = gpt2.generate(
            prompt(6, rows=2), max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False
        )
    assert out.shape == (2, 11)
    generate = telemetry.spans("generate")[0]
    assert generate.attributes[semconv.INFERENCE_GENERATION_STRATEGY] == "beam"
    assert generate.attributes[semconv.GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert generate.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == 10
    # per sequence: (decode time) / (5 - 1)
    decode_s = telemetry.stage_points()["generate/decode"].sum
    assert only_point(telemetry, GENAI_TPOT).sum == pytest.approx(decode_s / 4, rel=0.05)


def test_unsampled_requests_record_metrics_and_no_span(unsampled_telemetry, instrumented, gpt2):
    with request():
        gpt2.generate(prompt(8), max_new_tokens=6, min_new_tokens=6)
    assert unsampled_telemetry.spans() == []
    points = unsampled_telemetry.stage_points()
    assert {"generate", "generate/prefill", "generate/decode"} <= set(points)
    assert only_point(unsampled_telemetry, GENAI_TTFT).count == 1


# --- never change the app ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 10},
        {"num_beams": 3, "do_sample": False},
    ],
    ids=["greedy", "sample", "beam"],
)
def test_outputs_identical_with_and_without_instrumentation(telemetry, gpt2, options):
    def run(streamer=None):
        torch.manual_seed(123)
        kwargs = {} if streamer is None else {"streamer": streamer}
        return gpt2.generate(prompt(10), max_new_tokens=24, **options, **kwargs)

    plain = run()
    plain_stream = StampStreamer() if options.get("num_beams", 1) == 1 else None
    if plain_stream is not None:
        assert torch.equal(run(plain_stream), plain)
    instrumentor = TorchInstrumentor()
    instrumentor.instrument()
    try:
        with request():
            assert torch.equal(run(), plain)
        if plain_stream is not None:
            stream = StampStreamer()
            with request():
                assert torch.equal(run(stream), plain)
            assert stream.values == plain_stream.values and stream.ended
    finally:
        instrumentor.uninstrument()
    assert vars(GenerationMixin)["generate"] is ORIGINAL_GENERATE
    assert vars(GenerationMixin).get("_prefill") is ORIGINAL_PREFILL
    assert len(telemetry.spans("generate")) == (2 if plain_stream is not None else 1)


def test_a_failure_mid_decode_surfaces_unchanged_with_error_type(telemetry, instrumented, sleepy):
    sleepy.fail_at = 4  # prefill, two decode steps, then the third fails
    with pytest.raises(RuntimeError, match="decode step failed") as raised:
        with request():
            sleepy.generate(prompt(), max_new_tokens=10, min_new_tokens=10)
    assert raised.value.__traceback__ is not None
    points = telemetry.stage_points()
    assert "generate!RuntimeError" in points
    assert "generate/decode!RuntimeError" in points
    assert "generate/prefill" in points  # the prefill had succeeded
    decode = telemetry.spans("decode")[0]
    assert decode.attributes[semconv.ERROR_TYPE] == "RuntimeError"
    generate = telemetry.spans("generate")[0]
    assert generate.attributes[semconv.ERROR_TYPE] == "RuntimeError"
    # TTFT and TPOT are for successful responses only; the duration carries error.type
    assert telemetry.metric_points(GENAI_TTFT) == []
    assert telemetry.metric_points(GENAI_TPOT) == []
    failed = only_point(telemetry, semconv.GEN_AI_SERVER_REQUEST_DURATION)
    assert failed.attributes[semconv.ERROR_TYPE] == "RuntimeError"


def test_a_failure_in_prefill_marks_prefill(telemetry, instrumented, sleepy):
    sleepy.fail_at = 1
    with pytest.raises(RuntimeError), request():
        sleepy.generate(prompt(), max_new_tokens=3)
    points = telemetry.stage_points()
    assert "generate/prefill!RuntimeError" in points
    assert not any(key.startswith("generate/decode") for key in points)


def test_no_prompt_or_generated_text_in_telemetry(telemetry, instrumented, gpt2):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

    words = [f"secretword{i}" for i in range(VOCAB - 2)]
    vocab = {"[PAD]": 0, **{w: i + 1 for i, w in enumerate(words)}, "[EOS]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]")
    text = " ".join(words[:12])
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    streamer = TextIteratorStreamer(tokenizer)
    with request():
        worker = threading.Thread(
            target=gpt2.generate,
            kwargs={"inputs": ids, "max_new_tokens": 16, "streamer": streamer},
        )
        worker.start()
        generated = "".join(streamer)
        worker.join()
    assert "secretword" in generated  # the app saw text...
    dump = repr(
        [
            (dict(s.attributes), [dict(e.attributes) for e in s.events], s.name)
            for s in telemetry.spans()
        ]
    )
    data = telemetry.metric_reader.get_metrics_data()
    dump += repr(data.to_json()) if data is not None else ""
    assert "secretword" not in dump  # ...telemetry did not
    assert repr(ids.reshape(-1).tolist())[1:-1] not in dump


def test_uninstrument_restores_generate(gpt2):
    instrumentor = TorchInstrumentor()
    instrumentor.instrument()
    assert vars(GenerationMixin)["generate"] is not ORIGINAL_GENERATE
    instrumentor.uninstrument()
    assert vars(GenerationMixin)["generate"] is ORIGINAL_GENERATE


def test_generate_off_records_each_forward_as_model_forward(telemetry, gpt2):
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(generate=False)
    try:
        with request():
            gpt2.generate(prompt(8), max_new_tokens=5, min_new_tokens=5)
    finally:
        instrumentor.uninstrument()
    # every forward is a model_forward call: one value for the request, five calls in it
    (calls,) = [
        p
        for p in telemetry.metric_points(semconv.STAGE_CALLS)
        if p.attributes[semconv.INFERENCE_STAGE] == semconv.MODEL_FORWARD
    ]
    assert calls.sum == 5
    assert telemetry.spans("generate") == []


# --- budgets ---------------------------------------------------------------------------


@pytest.fixture
def budgeted():
    """Sampled telemetry with ttft, tpot and prefill budgets."""
    telemetry = Telemetry()
    COLD_START.reset(0)
    get_recorder().configure(
        telemetry.tracer_provider, telemetry.meter_provider, "ttft=50ms,tpot=500ms,prefill=40ms"
    )
    yield telemetry
    get_recorder().configure(budgets={})
    telemetry.shutdown()


def test_ttft_and_tpot_budgets_feed_the_breach_counter_and_gauge(budgeted, instrumented, sleepy):
    telemetry = budgeted
    with request():
        sleepy.generate(prompt(), max_new_tokens=3, min_new_tokens=3)
    breaches = {
        p.attributes[semconv.INFERENCE_STAGE]: p.value
        for p in telemetry.metric_points(semconv.STAGE_BUDGET_BREACHES)
    }
    assert breaches == {"ttft": 1, "prefill": 1}  # 200 ms prefill; tpot within 500 ms
    gauge = {
        p.attributes[semconv.INFERENCE_STAGE]: p.value
        for p in telemetry.metric_points(semconv.STAGE_BUDGET)
    }
    assert gauge == {"ttft": 0.05, "tpot": 0.5, "prefill": 0.04}
    ttft = only_point(telemetry, GENAI_TTFT)
    assert 0.05 in ttft.explicit_bounds  # the budget is an exact boundary
    assert telemetry.spans("prefill")[0].attributes[semconv.INFERENCE_BUDGET_EXCEEDED]


# --- the generation() API --------------------------------------------------------------


def test_generation_api_records_one_decode_for_many_steps(telemetry):
    steps = 40
    with request():
        start_ns = perf_counter_ns()
        with generation(prompt_tokens=7, model="my-llm", provider="llama.cpp") as g:
            time.sleep(PREFILL_S)
            g.first_token()
            first_ns = perf_counter_ns()
            for _ in range(steps):
                time.sleep(0.005)
                g.tokens(1)
        end_ns = perf_counter_ns()
    names = sorted(span.name for span in telemetry.spans())
    assert names == ["decode", "generate", "inference.request", "prefill"]
    decode = telemetry.spans("decode")[0]
    assert decode.attributes[semconv.INFERENCE_GENERATION_DECODE_STEPS] == steps
    assert decode.attributes[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == steps + 1
    ttft = only_point(telemetry, GENAI_TTFT, **{semconv.GEN_AI_REQUEST_MODEL: "my-llm"})
    assert ttft.attributes[semconv.GEN_AI_PROVIDER_NAME] == "llama.cpp"
    assert within(ttft.sum, (first_ns - start_ns) / 1e9)
    assert within(only_point(telemetry, GENAI_TPOT).sum, (end_ns - first_ns) / 1e9 / steps)


def test_generation_api_exception_propagates_unchanged(telemetry):
    error = ValueError("sampler broke")
    with pytest.raises(ValueError) as raised, generation(prompt_tokens=3) as g:
        g.first_token()
        g.tokens(2)
        raise error
    assert raised.value is error
    assert "generate/decode!ValueError" in telemetry.stage_points()


def test_generation_api_model_names_are_bounded(telemetry, monkeypatch):
    from otel_inference import genai
    from otel_inference.genai import MAX_MODEL_NAMES, OTHER_MODEL

    module = genai

    monkeypatch.setattr(module, "_MODEL_NAMES", module._ModelNames(MAX_MODEL_NAMES))

    for i in range(MAX_MODEL_NAMES + 5):
        with generation(prompt_tokens=1, model=f"bounded-model-{i}") as g:
            g.first_token()
    models = {
        p.attributes.get(semconv.GEN_AI_REQUEST_MODEL)
        for p in telemetry.metric_points(semconv.GEN_AI_SERVER_REQUEST_DURATION)
    }
    assert OTHER_MODEL in models
    assert len(models) <= MAX_MODEL_NAMES + 1
