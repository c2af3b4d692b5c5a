"""Wrapper factories for (de)serialisation calls: a ``serialize`` or ``parse`` stage
for top-level calls inside a request, nothing otherwise.

``json.dumps`` and friends are called everywhere: by libraries, loggers, and
OpenTelemetry's own exporters. A call becomes a stage only when ALL hold:

* instrumentation is not suppressed (the SDK's span/metric/log processors
  suppress it around ``export()``, so exporters never produce stages);
* it is not nested in another stage (``current_stage() is None``): a Redis
  client's ``json.dumps`` is feature hydration, ``orjson.dumps`` inside
  ``ORJSONResponse.render`` is that render's stage;
* it runs inside a request: a ``request()`` or a valid, not yet ended current
  span (a web framework's SERVER span). Outside one it is not a response, and a
  root span per ``json.dumps`` would flood the trace backend;
* it is not made while this module records a stage: a custom span processor
  that exports synchronously without suppressing instrumentation would
  otherwise recurse (span end -> export -> json.dumps -> stage -> span end).

On an unsampled request the recorder opens no span: the call costs the
histogram record only, whatever the payload size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import Histogram, Meter

from otel_inference import semconv
from otel_inference.stages import (
    StageContext,
    StageRecorder,
    StageScope,
    current_frame,
    current_request,
    log_once,
)

# Payload sizes: powers of 4 from 64 B to 64 MiB.
SIZE_BOUNDARIES: tuple[float, ...] = tuple(float(64 * 4**k) for k in range(11))

# True while this module records a stage (its span's end may run an exporter).
_RECORDING: ContextVar[bool] = ContextVar("otel_inference_serializers_recording", default=False)


@dataclass(frozen=True)
class SerializeInstruments:
    size: Histogram


def create_instruments(meter: Meter) -> SerializeInstruments:
    return SerializeInstruments(
        size=meter.create_histogram(
            semconv.SERIALIZE_SIZE,
            unit="By",
            description="Bytes a request serialised (one response; several calls summed)",
            explicit_bucket_boundaries_advisory=SIZE_BOUNDARIES,
        )
    )


def payload_size(value: Any) -> int | None:
    """Bytes of a payload: ``len`` of bytes, UTF-8 length of a str (its length
    when ASCII, the common case: ``isascii()`` is O(1))."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, memoryview):
        return value.nbytes
    return None


def first_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _in_request() -> bool:
    if current_request() is not None:
        return True
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return False
    # A span that stopped recording without being unsampled has ENDED: we are in
    # its end processing (an exporter run by a span processor), not in a request.
    return span.is_recording() or isinstance(span, trace.NonRecordingSpan)


@dataclass(frozen=True)
class Target:
    """What a wrapped callable is: the stage it records and how to label it."""

    stage: str  # semconv.SERIALIZE or semconv.PARSE
    format: str  # json | msgpack
    library: str  # orjson, json, msgpack, starlette, fastapi...

    @functools.cached_property
    def is_serialize(self) -> bool:
        return self.stage == semconv.SERIALIZE

    @functools.cached_property
    def size_attributes(self) -> dict[str, Any]:
        """``inference.serialize.size``'s attributes (made once: a record per call)."""
        return {semconv.INFERENCE_SERIALIZE_FORMAT: self.format}

    def span_attributes(self, size: int | None) -> dict[str, Any]:
        if self.is_serialize:
            keys = (
                semconv.INFERENCE_SERIALIZE_FORMAT,
                semconv.INFERENCE_SERIALIZE_LIBRARY,
                semconv.INFERENCE_SERIALIZE_BYTES,
            )
        else:
            keys = (
                semconv.INFERENCE_PARSE_FORMAT,
                semconv.INFERENCE_PARSE_LIBRARY,
                semconv.INFERENCE_PARSE_BYTES,
            )
        attributes: dict[str, Any] = {keys[0]: self.format, keys[1]: self.library}
        if size is not None:
            attributes[keys[2]] = size
        return attributes


# ``is_instrumentation_enabled()`` for the last OpenTelemetry context it was asked
# about. Suppression is set by attaching a new context, so one context object always
# gets the same answer; a per-item loop asks hundreds of times in one context, and the
# check costs as much as a small dumps. One tuple: read and replaced atomically.
_ENABLED_IN: tuple[object, bool] = (None, True)


def _instrumentation_enabled() -> bool:
    return _enabled_in(otel_context.get_current())


def _enabled_in(current: otel_context.Context) -> bool:
    """Whether instrumentation is enabled in ``current``, the current context."""
    global _ENABLED_IN
    cached = _ENABLED_IN
    if cached[0] is current:
        return cached[1]
    enabled = is_instrumentation_enabled()
    _ENABLED_IN = (current, enabled)
    return enabled


def _should_record() -> bool:
    """At the top level of a request (not inside another stage, nor our own recording)."""
    if _RECORDING.get() or not _instrumentation_enabled():
        return False
    frame = current_frame()
    if frame is None:
        return _in_request()
    account, enclosing = frame
    return enclosing is None and (account is not None or _in_request())


def _record_size(recorder: StageRecorder, target: Target, size: int | None) -> None:
    """``inference.serialize.size``: bytes out of serialize stages, per request (one
    record for a request's 500 small dumps, as its stage is one record), or per call
    outside a request."""
    if size is not None and target.is_serialize:
        recorder.record_per_request(
            recorder.instruments(create_instruments).size, size, target.size_attributes
        )


def _finish(
    recorder: StageRecorder,
    target: Target,
    scope: StageScope,
    end_ns: int,
    exc: BaseException | None,
    payload: Any,
) -> None:
    """Close the stage as ended at ``end_ns``; ``payload`` is the bytes out (serialize)
    or in (parse). Sizing it is our work, not the stage's."""
    try:
        size = None if exc is not None else payload_size(payload)
        if scope.is_recording:
            for key, value in target.span_attributes(size).items():
                scope.set_attribute(key, value)
        # Spans it ends are ended with instrumentation suppressed (stages._end_span):
        # an exporter's own serialising is not recorded as a stage.
        scope.finish(end_ns, exc)
        _record_size(recorder, target, size)
    except Exception:
        _failed(target)


def _failed(target: Target) -> None:
    log_once(
        "serializers-record",
        "otel-inference: failed to record a %s stage",
        target.stage,
        level=logging.ERROR,
    )


# Unbound: calling them makes no bound-method object per call.
_enter_in = StageScope.enter_in
_finish_at = StageScope.finish


def stage_wrapper(recorder: StageRecorder, target: Target) -> Callable[..., Any]:
    """A ``wrapt`` wrapper for a synchronous (de)serialiser."""
    stage_name, is_serialize = target.stage, target.is_serialize
    size_sum = recorder.request_sum(create_instruments, "size", target.size_attributes)

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        # _should_record(), inlined: this runs for every small dumps of a per-item loop.
        current = otel_context.get_current()
        if _RECORDING.get() or not _enabled_in(current):
            return wrapped(*args, **kwargs)
        frame = current_frame()
        if frame is None or frame[0] is None:
            if (frame is not None and frame[1] is not None) or not _in_request():
                return wrapped(*args, **kwargs)
        elif frame[1] is not None:
            return wrapped(*args, **kwargs)
        scope = StageScope(recorder, stage_name, None)
        _enter_in(scope, current)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _finish(recorder, target, scope, perf_counter_ns(), exc, None)
            raise
        end_ns = perf_counter_ns()
        # _finish, inlined: this runs for every small dumps of a per-item loop.
        try:
            # The bytes out (serialize) or in (parse): sized after the stage's end.
            payload = result if is_serialize else first_argument(args, kwargs)
            size = len(payload) if type(payload) is bytes else payload_size(payload)
            if scope.is_recording:
                for key, value in target.span_attributes(size).items():
                    scope.set_attribute(key, value)
            _finish_at(scope, end_ns, None)
            if size is not None and is_serialize:
                size_sum.add(size)
        except Exception:
            _failed(target)
        return result

    return wrapper


# --- FastAPI: one serialize stage for "to plain data" + "render" --------------------
#
# FastAPI serialises a non-Response result in two steps: ``serialize_response``
# turns it into plain data (jsonable_encoder, or the response model's dump), then
# ``actual_response_class(content)`` renders that to bytes in ``Response.__init__``.
# Only with a response model and the default class does ``serialize_response``
# return the JSON bytes itself (pydantic's ``dump_json``). Recording each step
# would count two serialize stages per request and halve what each reports, so
# the first step is remembered here and the response's ``__init__``, right after
# it in the same task, records one stage over both. Nothing stays open in
# between: a first step no response claims (a class whose ``__init__`` skips
# ``Response.__init__``) is recorded alone when the next one starts, or not at all.


@dataclass(frozen=True)
class _FirstStep:
    recorder: StageRecorder
    target: Target
    context: StageContext
    start_ns: int
    end_ns: int
    span: trace.Span  # current when it ran: the response that follows has the same


_FIRST_STEP: ContextVar[_FirstStep | None] = ContextVar(
    "otel_inference_serializers_first_step", default=None
)


def _record_serialize(
    step: _FirstStep, end_ns: int, exc: BaseException | None, payload: Any
) -> None:
    flag = _RECORDING.set(True)
    try:
        size = None if exc is not None else payload_size(payload)
        step.recorder.record_interval(
            step.target.stage,
            step.start_ns,
            end_ns,
            context=step.context,
            attributes=step.target.span_attributes(size),
            exc=exc,
        )
        _record_size(step.recorder, step.target, size)
    except Exception:
        log_once("serializers-fastapi", "otel-inference: failed to record a serialize stage")
    finally:
        _RECORDING.reset(flag)


def fastapi_serialize_response_wrapper(
    recorder: StageRecorder, target: Target
) -> Callable[..., Any]:
    """A ``wrapt`` wrapper for ``fastapi.routing.serialize_response``: a whole
    stage when it returns bytes, otherwise the first step of one (see above)."""

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not _should_record():
            return await wrapped(*args, **kwargs)
        unclaimed = _FIRST_STEP.get()
        if unclaimed is not None:
            _FIRST_STEP.set(None)
            _record_serialize(unclaimed, unclaimed.end_ns, None, None)
        step_context = recorder.capture()
        start_ns = perf_counter_ns()
        # As inside any serialize stage, nested (de)serialiser calls are not stages.
        flag = _RECORDING.set(True)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _RECORDING.reset(flag)
            step = _FirstStep(recorder, target, step_context, start_ns, 0, trace.INVALID_SPAN)
            _record_serialize(step, perf_counter_ns(), exc, None)
            raise
        end_ns = perf_counter_ns()
        _RECORDING.reset(flag)
        step = _FirstStep(
            recorder, target, step_context, start_ns, end_ns, trace.get_current_span()
        )
        if payload_size(result) is not None:  # JSON bytes already: the whole stage
            _record_serialize(step, end_ns, None, result)
        else:
            _FIRST_STEP.set(step)
        return result

    return wrapper


def response_init_wrapper(recorder: StageRecorder, target: Target) -> Callable[..., Any]:
    """A ``wrapt`` wrapper for ``starlette.responses.Response.__init__``. It records
    the serialize stage FastAPI's ``serialize_response`` began, over the render,
    with that step's recorder and target (the arguments keep the factory shape)."""
    return _response_init


def _response_init(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    step = _FIRST_STEP.get()
    if step is None:
        return wrapped(*args, **kwargs)
    _FIRST_STEP.set(None)
    if step.span is not trace.get_current_span():  # not that request's response
        _record_serialize(step, step.end_ns, None, None)
        return wrapped(*args, **kwargs)
    # The render belongs to this stage: the render wrappers skip while we record.
    flag = _RECORDING.set(True)
    try:
        wrapped(*args, **kwargs)
    except BaseException as exc:
        _RECORDING.reset(flag)
        _record_serialize(step, perf_counter_ns(), exc, None)
        raise
    end_ns = perf_counter_ns()
    _RECORDING.reset(flag)
    _record_serialize(step, end_ns, None, getattr(instance, "body", None))
