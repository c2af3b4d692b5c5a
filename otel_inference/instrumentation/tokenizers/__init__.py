"""Instrument Hugging Face ``tokenizers`` and ``transformers`` tokenizers: a ``tokenize``
stage per call, with padding waste.

Each call records the ``inference.stage.duration`` histogram (stage ``tokenize``)
and the ``inference.tokens`` counter (``inference.token.kind`` = ``real`` |
``padding``) for every call; a sampled request's stage span also carries the
batch size, padded length, real and padded token counts, the padding ratio and
the number of truncated sequences. No text and no token ids are recorded.

Instrumented:

* ``tokenizers.Tokenizer``: ``encode``, ``encode_batch``, ``encode_batch_fast``
  and their ``async_`` forms (``tokenizers.implementations`` classes call these).
* ``transformers.PreTrainedTokenizerBase`` (fast and slow tokenizers): ``__call__``,
  ``encode``, ``pad`` and, on transformers 4, ``encode_plus`` /
  ``batch_encode_plus``. Wrapped when transformers is imported, so instrumenting
  never imports it. A transformers call that runs the Rust tokenizer inside is
  ONE stage.

The figures of the latest tokenize call are also left in the request bag
(``current_request().attributes``) under the span attribute names, for the same
request's ``model_forward``.

Usage
-----

.. code-block:: python

    from otel_inference.instrumentation.tokenizers import TokenizersInstrumentor
    from transformers import AutoTokenizer

    TokenizersInstrumentor().instrument()

    tokenizer = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # one tokenize stage

Under ``opentelemetry-instrument`` it loads through the ``inference_tokenizers``
entry point.
"""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation._patch import Patches
from otel_inference.instrumentation.tokenizers import _counts
from otel_inference.instrumentation.tokenizers._wrappers import (
    async_tokenize_wrapper,
    tokenize_wrapper,
)
from otel_inference.instrumentation.tokenizers.package import _instruments, _transformers
from otel_inference.stages import StageRecorder, log_once

__all__ = ["TokenizersInstrumentor"]

_RUST_SINGLE = ("encode",)
_RUST_BATCH = ("encode_batch", "encode_batch_fast")
_RUST_ASYNC_SINGLE = ("async_encode",)
_RUST_ASYNC_BATCH = ("async_encode_batch", "async_encode_batch_fast")
# Methods returning a BatchEncoding (encode_plus/batch_encode_plus: transformers 4 only).
_TRANSFORMERS_BATCH_ENCODING = ("__call__", "pad", "encode_plus", "batch_encode_plus")


def _rust_single(result: Any, instance: Any) -> _counts.TokenCounts:
    return _counts.count_encodings((result,), instance.padding is not None)


def _rust_batch(result: Any, instance: Any) -> _counts.TokenCounts:
    return _counts.count_encodings(result, instance.padding is not None)


def _rust_single_truncated(result: Any) -> int:
    return _counts.truncated_encodings((result,))


def _batch_encoding(result: Any, _instance: Any) -> _counts.TokenCounts | None:
    return _counts.count_batch_encoding(result)


def _encode_ids(result: Any, instance: Any) -> _counts.TokenCounts | None:
    return _counts.count_ids(result, getattr(instance, "pad_token_id", None))


def _unknown_truncation(_result: Any) -> None:
    return None


class TokenizersInstrumentor(InferenceInstrumentor):
    """A ``tokenize`` stage for HF ``tokenizers`` and ``transformers`` tokenizer calls."""

    # One per class, not per instance call: BaseInstrumentor is a singleton whose
    # __init__ runs on every ``TokenizersInstrumentor()``.
    _patches = Patches("tokenizers")

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        patches = self._patches

        def instrument_tokenizers(module: ModuleType) -> None:
            tokenizer = module.Tokenizer
            for name in _RUST_SINGLE:
                patches.wrap(
                    tokenizer,
                    name,
                    tokenize_wrapper(recorder, _rust_single, _rust_single_truncated),
                )
            for name in _RUST_BATCH:
                patches.wrap(
                    tokenizer,
                    name,
                    tokenize_wrapper(recorder, _rust_batch, _counts.truncated_encodings),
                )
            for name in _RUST_ASYNC_SINGLE:
                patches.wrap(
                    tokenizer,
                    name,
                    async_tokenize_wrapper(recorder, _rust_single, _rust_single_truncated),
                )
            for name in _RUST_ASYNC_BATCH:
                patches.wrap(
                    tokenizer,
                    name,
                    async_tokenize_wrapper(recorder, _rust_batch, _counts.truncated_encodings),
                )

        def instrument_transformers(module: ModuleType) -> None:
            conflict = get_dependency_conflicts((_transformers,))
            if conflict is not None:
                log_once("tokenizers-transformers-version", "otel-inference: %s", conflict)
                return
            base = module.PreTrainedTokenizerBase
            for name in _TRANSFORMERS_BATCH_ENCODING:
                patches.wrap(
                    base, name, tokenize_wrapper(recorder, _batch_encoding, _counts.truncated_in)
                )
            patches.wrap(
                base, "encode", tokenize_wrapper(recorder, _encode_ids, _unknown_truncation)
            )

        patches.when_imported("tokenizers", instrument_tokenizers)
        patches.when_imported("transformers.tokenization_utils_base", instrument_transformers)

    def _uninstrument(self, **kwargs: Any) -> None:
        self._patches.unwrap_all()
