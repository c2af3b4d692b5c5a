"""Downstream calls as a ``downstream`` stage, from the contrib client instrumentations.

HTTP and gRPC client calls made inside a request (a feature service, a
reranker, a vector store over HTTP) are latency the model is not to blame for.
The standard contrib instrumentations (requests, httpx, aiohttp-client, urllib,
urllib3, grpc) already make a CLIENT span per call; we do not instrument those
libraries again. Instead the tracers they obtain from the tracer provider are
wrapped, once, at ``get_tracer`` time (tracers of other scopes are untouched),
so that every CLIENT span they start, sampled or not, also records a
``downstream`` stage: the ``inference.stage.duration`` histogram for 100% of
calls (nested under the enclosing stage, covering request time like any
top-level stage), and ``inference.stage=downstream`` on the contrib span when
it is recorded. No second span is created.

Under ``opentelemetry-instrument`` this is installed by the
``opentelemetry_pre_instrument`` entry point, after the SDK is configured and
before any instrumentor asks for a tracer. Turn it off with
``OTEL_INFERENCE_DOWNSTREAM=false``.

Usage (manual setup)::

    from otel_inference.downstream import enable_downstream

    enable_downstream(tracer_provider)        # before instrumenting requests/httpx
    RequestsInstrumentor().instrument(tracer_provider=tracer_provider)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Tracer, TracerProvider

from otel_inference import semconv
from otel_inference.config import parse_bool
from otel_inference.environment_variables import OTEL_INFERENCE_DOWNSTREAM
from otel_inference.stages import StageContext, StageRecorder, get_recorder, log_once

DOWNSTREAM = "downstream"
DOWNSTREAM_SCOPES = (
    "opentelemetry.instrumentation.requests",
    "opentelemetry.instrumentation.httpx",
    "opentelemetry.instrumentation.aiohttp_client",
    "opentelemetry.instrumentation.urllib",
    "opentelemetry.instrumentation.urllib3",
    "opentelemetry.instrumentation.grpc",
)
_WRAPPED_MARK = "_otel_inference_downstream"


def is_downstream_scope(name: str | None) -> bool:
    return bool(name) and any(
        name == scope or name.startswith(scope + ".") for scope in DOWNSTREAM_SCOPES
    )


class _DownstreamSpan(Span):
    """The contrib CLIENT span, unchanged, plus a ``downstream`` stage recorded on end."""

    def __init__(
        self, span: Span, recorder: StageRecorder, where: StageContext, start_ns: int
    ) -> None:
        self._span = span
        self._recorder = recorder
        self._where = where
        self._start_ns = start_ns
        self._ended = False

    def end(self, end_time: int | None = None) -> None:
        self._span.end(end_time)
        if self._ended:
            return
        self._ended = True
        self._recorder.record_interval(
            DOWNSTREAM, self._start_ns, perf_counter_ns(), context=self._where, span=False
        )

    def get_span_context(self) -> trace.SpanContext:
        return self._span.get_span_context()

    def set_attributes(self, attributes: Any) -> None:
        self._span.set_attributes(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self._span.add_event(name, attributes, timestamp)

    def add_link(self, context: trace.SpanContext, attributes: Any = None) -> None:
        self._span.add_link(context, attributes)

    def update_name(self, name: str) -> None:
        self._span.update_name(name)

    def is_recording(self) -> bool:
        return self._span.is_recording()

    def set_status(self, status: Any, description: str | None = None) -> None:
        self._span.set_status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self._span.record_exception(exception, attributes, timestamp, escaped)

    def __getattr__(self, name: str) -> Any:
        # SDK-specific attributes (name, attributes, kind...) of the real span.
        return getattr(self._span, name)


class _DownstreamTracer(Tracer):
    """Delegates to the real tracer; CLIENT spans come back as downstream stages."""

    def __init__(self, tracer: Tracer, recorder: StageRecorder | None) -> None:
        self._tracer = tracer
        self._recorder = recorder

    def start_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        span = self._tracer.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        if kind is not SpanKind.CLIENT:
            return span
        try:
            recorder = self._recorder or get_recorder()
            where = recorder.capture()
            if span.is_recording():
                span.set_attribute(semconv.INFERENCE_STAGE, DOWNSTREAM)
                if where.parent is not None:
                    span.set_attribute(semconv.INFERENCE_STAGE_PARENT, where.parent)
            return _DownstreamSpan(span, recorder, where, perf_counter_ns())
        except Exception:
            log_once("downstream-start", "otel-inference: failed to open downstream stage")
            return span

    @contextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


def enable_downstream(
    tracer_provider: TracerProvider | None = None, recorder: StageRecorder | None = None
) -> bool:
    """Wrap ``tracer_provider.get_tracer`` (default: the global provider) so the
    contrib HTTP/gRPC client instrumentations' tracers record ``downstream``
    stages. Idempotent. Returns False when the provider cannot be wrapped."""
    provider = tracer_provider or trace.get_tracer_provider()
    if getattr(provider, _WRAPPED_MARK, False):
        return True
    original_get_tracer = provider.get_tracer

    def get_tracer(instrumenting_module_name: str, *args: Any, **kwargs: Any) -> Tracer:
        tracer = original_get_tracer(instrumenting_module_name, *args, **kwargs)
        if is_downstream_scope(instrumenting_module_name):
            return _DownstreamTracer(tracer, recorder)
        return tracer

    try:
        provider.get_tracer = get_tracer  # type: ignore[method-assign]
        setattr(provider, _WRAPPED_MARK, True)
    except (AttributeError, TypeError):
        log_once(
            "downstream-wrap", "otel-inference: cannot wrap %r for downstream stages", provider
        )
        return False
    return True


def pre_instrument() -> None:
    """``opentelemetry_pre_instrument`` hook: runs after the SDK is configured and
    before any instrumentor asks for its tracer."""
    try:
        if parse_bool(OTEL_INFERENCE_DOWNSTREAM, default=True):
            enable_downstream()
    except Exception as exc:  # never stop auto-instrumentation
        logging.getLogger(__name__).error("otel-inference: downstream stages off: %s", exc)
