"""Generation (LLM decoding): ``generate`` / ``prefill`` / ``decode`` stages, TTFT, TPOT.

One generation request is one ``generate`` stage holding two nested stages:
``prefill`` (from the start to the first output token: the prompt's forward
pass and the first sampling step) and ``decode`` (from the first token to the
last). Each is recorded ONCE per generation, whatever the number of steps: a
500-token answer is three stage records and at most three spans, the step count
an attribute of the ``decode`` span.

Beside the stage histogram it records the OpenTelemetry GenAI server metrics
(``docs/gen-ai/gen-ai-metrics.md`` of the GenAI semantic conventions), with
their units and explicit bucket boundaries (plus any ``ttft`` / ``tpot``
budget, so that p95-vs-budget is exact):

* ``gen_ai.server.time_to_first_token`` (s): from the start of the request to
  the first output token, successful generations only. Inside a ``request()``
  the request's start (so time queued before the model counts, as the
  conventions say); otherwise the start of the generation.
* ``gen_ai.server.time_per_output_token`` (s): the decode time divided by the
  tokens after the first, successful generations with at least two tokens.
* ``gen_ai.server.request.duration`` (s): the request's start to the last
  token, with ``error.type`` on failures.
* ``gen_ai.client.token.usage`` ({token}, ``gen_ai.token.type`` = ``input`` |
  ``output``): the conventions' token-count histogram (they define no server
  variant), recorded for successful generations.

Attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name`` and
``gen_ai.request.model`` (at most :data:`MAX_MODEL_NAMES` distinct names; later
ones are ``_other``). Budgets: ``OTEL_INFERENCE_BUDGETS="ttft=300ms,tpot=50ms"``
judges TTFT and TPOT as the pseudo-stages ``ttft`` and ``tpot`` (histogram
``inference.stage.duration`` with ``inference.stage.parent=generate``, no span),
so the breach counter, the budget gauge and the alert rules apply unchanged;
``prefill=...`` and ``decode=...`` budget those stages like any other.

No text and no token ids are recorded: counts and durations only.

Usage, for a decoding loop that is not transformers' ``generate()`` (which the
torch instrumentor records with no code)::

    from otel_inference import generation

    with generation(prompt_tokens=len(ids), model="my-llm") as g:
        logits, cache = model.prefill(ids)
        token = sample(logits)
        g.first_token()                       # TTFT ends here
        while token != eos and g.output_tokens < max_new_tokens:
            logits, cache = model.step(token, cache)
            token = sample(logits)
            g.tokens(1)                       # one decode step, one token
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from opentelemetry.metrics import Histogram, Meter

from otel_inference import semconv
from otel_inference.stages import (
    StageContext,
    StageRecorder,
    StageScope,
    current_request,
    get_recorder,
    log_once,
)

__all__ = [
    "MAX_MODEL_NAMES",
    "GenerationScope",
    "generation",
]

# Explicit bucket boundaries of the GenAI semantic conventions.
TTFT_BOUNDARIES = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BOUNDARIES = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BOUNDARIES = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_USAGE_BOUNDARIES = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

MAX_MODEL_NAMES = 20
"""Distinct ``gen_ai.request.model`` values on metrics; later ones are ``_other``."""
OTHER_MODEL = "_other"


@dataclass(frozen=True)
class GenAiInstruments:
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    request_duration: Histogram
    token_usage: Histogram


def _with_budget(boundaries: tuple[float, ...], budget: float | None) -> tuple[float, ...]:
    if budget is None:
        return boundaries
    return tuple(sorted({*boundaries, budget}))


def genai_instruments(recorder: StageRecorder) -> GenAiInstruments:
    """The GenAI server histograms of ``recorder``'s configuration (created once per
    configuration; a ``ttft``/``tpot`` budget is an extra bucket boundary)."""
    budgets = recorder.budgets
    ttft_budget = budgets.get(semconv.TTFT)
    tpot_budget = budgets.get(semconv.TPOT)
    return recorder.instruments(_factories(ttft_budget, tpot_budget))


_factory_cache: dict[tuple[float | None, float | None], Any] = {}
_factory_lock = threading.Lock()


def _factories(ttft_budget: float | None, tpot_budget: float | None) -> Any:
    # recorder.instruments() caches per factory object: one factory per budget pair.
    key = (ttft_budget, tpot_budget)
    factory = _factory_cache.get(key)
    if factory is not None:
        return factory

    def create(meter: Meter) -> GenAiInstruments:
        return GenAiInstruments(
            time_to_first_token=meter.create_histogram(
                semconv.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
                unit="s",
                description="Time to generate first token for successful responses.",
                explicit_bucket_boundaries_advisory=_with_budget(TTFT_BOUNDARIES, ttft_budget),
            ),
            time_per_output_token=meter.create_histogram(
                semconv.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
                unit="s",
                description=(
                    "Time per output token generated after the first token for successful "
                    "responses."
                ),
                explicit_bucket_boundaries_advisory=_with_budget(TPOT_BOUNDARIES, tpot_budget),
            ),
            request_duration=meter.create_histogram(
                semconv.GEN_AI_SERVER_REQUEST_DURATION,
                unit="s",
                description=(
                    "Generative AI server request duration such as time-to-last byte or last "
                    "output token."
                ),
                explicit_bucket_boundaries_advisory=REQUEST_DURATION_BOUNDARIES,
            ),
            token_usage=meter.create_histogram(
                semconv.GEN_AI_CLIENT_TOKEN_USAGE,
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=TOKEN_USAGE_BOUNDARIES,
            ),
        )

    with _factory_lock:
        return _factory_cache.setdefault(key, create)


class _ModelNames:
    """Bounded ``gen_ai.request.model`` values (a path or per-user name must not
    explode the metric series)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def bounded(self, name: str) -> str:
        if name in self._names:
            return name
        with self._lock:
            if len(self._names) < self._limit:
                self._names.add(name)
                return name
        log_once(
            "genai-model-names",
            "otel-inference: more than %d distinct gen_ai.request.model values: later ones "
            "are labelled %r in metrics",
            self._limit,
            OTHER_MODEL,
        )
        return OTHER_MODEL


_MODEL_NAMES = _ModelNames(MAX_MODEL_NAMES)


class GenerationScope:
    """One generation: the ``generate`` stage, with ``prefill`` and ``decode`` in it.

    Use :func:`generation` (or :meth:`open` from an instrumentor). Mark the first
    output token with :meth:`first_token` and later ones with :meth:`tokens`;
    each phase is recorded once, when the scope closes. Thread-compatible (one
    generation per scope), never raises from its own bookkeeping.
    """

    __slots__ = (
        "_attributes",
        "_closed",
        "_first_ns",
        "_inner",
        "_input_tokens",
        "_metric_attributes",
        "_output_tokens",
        "_recorder",
        "_request_start_ns",
        "_scope",
        "_sequences",
        "_start_ns",
        "_steps",
    )

    def __init__(
        self,
        recorder: StageRecorder,
        *,
        prompt_tokens: int | None = None,
        model: str | None = None,
        provider: str = "custom",
        operation: str = "text_completion",
        start_ns: int | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self._recorder = recorder
        self._input_tokens = prompt_tokens
        self._output_tokens = 0
        self._steps = 0
        self._sequences = 1
        self._first_ns: int | None = None
        self._request_start_ns = start_ns
        self._scope: StageScope | None = None
        self._inner: StageContext | None = None
        self._closed = False
        self._start_ns = 0
        metric_attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: operation,
            semconv.GEN_AI_PROVIDER_NAME: provider,
        }
        if model:
            metric_attributes[semconv.GEN_AI_REQUEST_MODEL] = _MODEL_NAMES.bounded(str(model))
        self._metric_attributes = metric_attributes
        span_attributes = dict(metric_attributes)
        if model:
            span_attributes[semconv.GEN_AI_REQUEST_MODEL] = str(model)
        if attributes:
            span_attributes.update(attributes)
        self._attributes = span_attributes

    # opening -------------------------------------------------------------------------

    def __enter__(self) -> GenerationScope:
        self._scope = self._recorder.start(semconv.GENERATE, self._attributes)
        self._start_ns = perf_counter_ns()
        try:
            # Where prefill and decode belong: inside generate.
            self._inner = self._recorder.capture()
            if self._request_start_ns is None:
                account = current_request()
                self._request_start_ns = account.start_ns if account is not None else self._start_ns
        except Exception:
            log_once("generation-enter", "otel-inference: failed to open a generation")
            self._request_start_ns = self._start_ns
        return self

    async def __aenter__(self) -> GenerationScope:
        return self.__enter__()

    # marking -------------------------------------------------------------------------

    def first_token(self, count: int = 1) -> None:
        """The first output token(s) exist now (handed to the caller or a streamer):
        ends ``prefill`` and time to first token; counts ``count`` output tokens.
        Later calls count tokens only."""
        if self._first_ns is None:
            self._first_ns = perf_counter_ns()
            self._output_tokens += count
        else:
            self.tokens(count)

    def tokens(self, count: int = 1) -> None:
        """``count`` more output tokens from one decode step (the first call before
        :meth:`first_token` is the first token)."""
        if self._first_ns is None:
            self.first_token(count)
            return
        self._output_tokens += count
        self._steps += 1

    @property
    def output_tokens(self) -> int:
        """Output tokens so far (settable, for callers that count at the end)."""
        return self._output_tokens

    @output_tokens.setter
    def output_tokens(self, value: int) -> None:
        self._output_tokens = int(value)

    @property
    def steps(self) -> int:
        """Decode steps after the first token (settable)."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)

    @property
    def sequences(self) -> int:
        """Sequences generated together (settable; default 1): ``output_tokens`` counts
        all of them, time per output token is per sequence."""
        return self._sequences

    @sequences.setter
    def sequences(self, value: int) -> None:
        self._sequences = max(1, int(value))

    @property
    def prompt_tokens(self) -> int | None:
        return self._input_tokens

    @prompt_tokens.setter
    def prompt_tokens(self, value: int | None) -> None:
        self._input_tokens = value

    @property
    def first_token_ns(self) -> int | None:
        """``perf_counter_ns`` of the first token, or ``None`` before it."""
        return self._first_ns

    # closing -------------------------------------------------------------------------

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self.close(exc)
        return False

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def close(self, exc: BaseException | None = None) -> None:
        """Record everything once (``__exit__`` calls it)."""
        end_ns = perf_counter_ns()
        if self._closed:
            return
        self._closed = True
        scope = self._scope
        if scope is None:
            return
        scope.exit_context()
        try:
            self._record(scope, end_ns, exc)
            # Our recording after the last token is not the application's time.
            account = current_request()
            if account is not None:
                account.add_instrumentation(perf_counter_ns() - end_ns)
        except Exception:
            log_once(
                "generation-record",
                "otel-inference: failed to record a generation",
                level=logging.ERROR,
            )

    def _record(self, scope: StageScope, end_ns: int, exc: BaseException | None) -> None:
        recorder = self._recorder
        inner = self._inner
        start_ns = self._start_ns
        first_ns = self._first_ns
        output = self._output_tokens
        request_start_ns = self._request_start_ns or start_ns
        prefill_end = end_ns if first_ns is None else first_ns
        # The phase that was running when an exception came out carries it.
        recorder.record_interval(
            semconv.PREFILL,
            start_ns,
            prefill_end,
            context=inner,
            exc=exc if first_ns is None else None,
            attributes=None
            if self._input_tokens is None
            else {semconv.GEN_AI_USAGE_INPUT_TOKENS: self._input_tokens},
            cover=False,
        )
        tpot = None
        if first_ns is not None and (end_ns > first_ns or exc is not None):
            decode_attributes: dict[str, Any] = {
                semconv.INFERENCE_GENERATION_DECODE_STEPS: self._steps,
                semconv.GEN_AI_USAGE_OUTPUT_TOKENS: output,
            }
            recorder.record_interval(
                semconv.DECODE,
                first_ns,
                end_ns,
                context=inner,
                exc=exc,
                attributes=decode_attributes,
                cover=False,
            )
        ttft = (prefill_end - request_start_ns) / 1e9
        per_sequence = output / self._sequences
        if per_sequence > 1:
            tpot = (end_ns - prefill_end) / 1e9 / (per_sequence - 1)
        span_attributes: dict[str, Any] = {semconv.GEN_AI_USAGE_OUTPUT_TOKENS: output}
        if self._input_tokens is not None:
            span_attributes[semconv.GEN_AI_USAGE_INPUT_TOKENS] = self._input_tokens
        if exc is None and first_ns is not None:
            span_attributes[semconv.INFERENCE_GENERATION_TTFT] = ttft
            if tpot is not None:
                span_attributes[semconv.INFERENCE_GENERATION_TPOT] = tpot
        scope.record(end_ns - start_ns, exc, **span_attributes)

        instruments = genai_instruments(recorder)
        attributes = self._metric_attributes
        if exc is not None:
            attributes = {**attributes, semconv.ERROR_TYPE: type(exc).__qualname__}
            instruments.request_duration.record((end_ns - request_start_ns) / 1e9, attributes)
            return
        instruments.request_duration.record((end_ns - request_start_ns) / 1e9, attributes)
        if self._input_tokens is not None:
            instruments.token_usage.record(
                self._input_tokens, {**attributes, semconv.GEN_AI_TOKEN_TYPE: "input"}
            )
        instruments.token_usage.record(output, {**attributes, semconv.GEN_AI_TOKEN_TYPE: "output"})
        if first_ns is None:
            return  # no token: no TTFT to report
        instruments.time_to_first_token.record(ttft, attributes)
        # Budgets and alert rules work on inference.stage.duration: ttft and tpot are
        # pseudo-stages there (no span; they cover nothing of the request).
        recorder.record_interval(
            semconv.TTFT, request_start_ns, prefill_end, context=inner, span=False, cover=False
        )
        if tpot is not None:
            instruments.time_per_output_token.record(tpot, attributes)
            recorder.record_interval(
                semconv.TPOT, 0, round(tpot * 1e9), context=inner, span=False, cover=False
            )


def generation(
    *,
    prompt_tokens: int | None = None,
    model: str | None = None,
    provider: str = "custom",
    operation: str = "text_completion",
    start_ns: int | None = None,
    **attributes: Any,
) -> GenerationScope:
    """Record one generation (a decode loop of your own) as ``generate`` with
    ``prefill`` and ``decode`` in it, plus the GenAI server metrics.

    ``prompt_tokens``: input tokens (``gen_ai.client.token.usage``, type input).
    ``model`` (``gen_ai.request.model``), ``provider`` (``gen_ai.provider.name``)
    and ``operation`` (``gen_ai.operation.name``) label the metrics. ``start_ns``
    (a ``time.perf_counter_ns()`` value): when the request arrived, if TTFT
    should count from earlier than this call and no ``request()`` encloses it.
    ``attributes`` go on the ``generate`` span only. See the module docstring.
    """
    return GenerationScope(
        get_recorder(),
        prompt_tokens=prompt_tokens,
        model=model,
        provider=provider,
        operation=operation,
        start_ns=start_ns,
        attributes=attributes,
    )
