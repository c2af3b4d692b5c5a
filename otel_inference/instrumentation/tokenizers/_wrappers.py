"""Wrapper factories for tokenizer calls: one ``tokenize`` stage per outermost call.

A transformers fast tokenizer calls the Rust ``tokenizers.Tokenizer`` inside, and
a transformers ``__call__`` may call ``pad``: only the outermost instrumented call
counts (a context flag marks it), so one call is ONE stage and its tokens are
counted once. A user's own ``stage("tokenize")`` around the call is not doubled
either: the call then counts its tokens without opening a second stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import Counter, Meter

from otel_inference import semconv
from otel_inference.instrumentation.tokenizers._counts import TokenCounts
from otel_inference.stages import (
    StageRecorder,
    StageScope,
    current_request,
    current_stage,
    log_once,
)

# Counts of a call's result: (result, tokenizer instance) -> counts or None.
CountFn = Callable[[Any, Any], "TokenCounts | None"]
# Truncated sequences of a call's result, or None when unknown.
TruncatedFn = Callable[[Any], "int | None"]

# True inside an instrumented tokenizer call (nested calls pass straight through).
_IN_TOKENIZE: ContextVar[bool] = ContextVar("otel_inference_in_tokenize", default=False)

_REAL = {semconv.INFERENCE_TOKEN_KIND: semconv.TOKEN_KIND_REAL}
_PADDING = {semconv.INFERENCE_TOKEN_KIND: semconv.TOKEN_KIND_PADDING}


@dataclass(frozen=True)
class TokenInstruments:
    tokens: Counter


def create_instruments(meter: Meter) -> TokenInstruments:
    return TokenInstruments(
        tokens=meter.create_counter(
            semconv.TOKENS,
            unit="{token}",
            description="Token positions produced by tokenizers, by kind: real or padding",
        )
    )


class _Call:
    """One outermost tokenizer call: flag set, stage opened (unless the caller's own
    tokenize stage is open), clock started."""

    __slots__ = ("_flag", "_recorder", "_scope", "_start_ns")

    def __init__(self, recorder: StageRecorder) -> None:
        self._recorder = recorder
        self._scope: StageScope | None = None
        if current_stage() != semconv.TOKENIZE:
            self._scope = recorder.start(semconv.TOKENIZE)
        self._flag: Token[bool] = _IN_TOKENIZE.set(True)
        self._start_ns = perf_counter_ns()

    def failed(self, exc: BaseException) -> None:
        duration_ns = perf_counter_ns() - self._start_ns
        try:
            _IN_TOKENIZE.reset(self._flag)
            scope = self._scope
            if scope is not None:
                scope.exit_context()
                scope.record(duration_ns, exc)
        except Exception:
            log_once(
                "tokenizers-end", "otel-inference: failed to close tokenize", level=logging.ERROR
            )

    def succeeded(self, result: Any, instance: Any, count: CountFn, truncated: TruncatedFn) -> None:
        # The stage's duration is the library call's: counting comes after the clock.
        duration_ns = perf_counter_ns() - self._start_ns
        scope = self._scope
        attributes: dict[str, Any] = {}
        try:
            _IN_TOKENIZE.reset(self._flag)
            if scope is not None:
                scope.exit_context()
            counts = count(result, instance)
            if counts is not None:
                tokens = self._recorder.instruments(create_instruments).tokens
                tokens.add(counts.real, _REAL)
                if counts.padding:  # adding 0 changes nothing and costs a record
                    tokens.add(counts.padding, _PADDING)
                figures = counts.attributes()
                account = current_request()
                if account is not None:
                    # For the same request's model_forward (latest tokenize call wins).
                    account.attributes.update(figures)
                if scope is not None and scope.is_recording:
                    attributes = figures
                    cut = truncated(result)
                    if cut is not None:
                        attributes[semconv.INFERENCE_TOKENIZE_TRUNCATED] = cut
        except Exception:
            log_once(
                "tokenizers-count",
                "otel-inference: could not count tokens of a tokenizer call",
                level=logging.ERROR,
            )
        if scope is not None:
            scope.record(duration_ns, **attributes)


def _begin(recorder: StageRecorder) -> _Call | None:
    try:
        return _Call(recorder)
    except Exception:
        log_once("tokenizers-begin", "otel-inference: failed to open tokenize", level=logging.ERROR)
        return None


def tokenize_wrapper(
    recorder: StageRecorder, count: CountFn, truncated: TruncatedFn
) -> Callable[..., Any]:
    """A ``wrapt`` wrapper for a synchronous tokenizer method."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled() or _IN_TOKENIZE.get():
            return wrapped(*args, **kwargs)
        call = _begin(recorder)
        if call is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            call.failed(exc)
            raise
        call.succeeded(result, instance, count, truncated)
        return result

    return wrapper


def async_tokenize_wrapper(
    recorder: StageRecorder, count: CountFn, truncated: TruncatedFn
) -> Callable[..., Any]:
    """A ``wrapt`` wrapper for a tokenizer method that returns an awaitable
    (``Tokenizer.async_encode*``): the stage spans until the result is ready."""

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled() or _IN_TOKENIZE.get():
            return await wrapped(*args, **kwargs)
        call = _begin(recorder)
        if call is None:
            return await wrapped(*args, **kwargs)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            call.failed(exc)
            raise
        call.succeeded(result, instance, count, truncated)
        return result

    return wrapper
