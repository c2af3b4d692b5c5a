"""Ray Serve: ``@serve.batch`` as stages, and a request boundary in each replica.

Ray Serve batches inside the replica: ``@serve.batch`` queues each call and runs
the decorated function once per batch. Instrumented (no change to the
deployment's code):

* each call's wait in the Serve batch queue, from the call to its batch's start
  (including the wait for a free ``max_concurrent_batches`` slot), as stage
  ``queue_wait`` of that request;
* the batch's work as ONE stage (default name ``batch``): one span linked to
  every member's, each member's ``inference.stage.duration`` gets the whole
  duration and ``inference.stage.cost`` its share (duration / batch size), plus
  ``inference.batch.size``, ``inference.batch.fill_ratio`` (size /
  ``max_batch_size``) and ``inference.batch.formation.duration``, exactly as
  :mod:`otel_inference.batching` records its own batches (attribute
  ``inference.batcher.name`` = the batch function's name). Stages inside the
  batch function (``tokenize``, ``model_forward``...) are its children,
  labelled ``inference.stage.parent=batch``;
* every request a replica handles as a ``request()``: ``request`` and
  ``unattributed`` for 100% of requests. When Ray Serve's tracing is on, it is
  a child of Serve's ``replica_handle_request`` span, which Serve joins to the
  caller's trace through the HTTP proxy (W3C ``traceparent``); otherwise it is
  the root of the replica's trace.

Serve's own queues (the batch queue, the ASGI message queues) are
``asyncio.Queue`` objects made in ``ray`` modules, which the queue instrumentor leaves
out by default: the batch wait is recorded here once.

Usage
-----

Replicas are Ray actor processes, which ``opentelemetry-instrument`` does not
reach: start the instrumentation in the deployment's constructor, with the
``OTEL_*`` variables set in the driver before ``ray.init`` (Ray's processes
inherit them) or in the deployment's ``runtime_env``:

.. code-block:: python

    import otel_inference.auto
    from ray import serve

    @serve.deployment
    class Embedder:
        def __init__(self):
            otel_inference.auto.start()        # loads this instrumentor too
            ...

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def embed(self, texts: list[str]) -> list[list[float]]:
            ...

Or, alone: ``RayServeInstrumentor().instrument(stage="batch")``. Under
``opentelemetry-instrument`` or :func:`otel_inference.auto.start` it loads
through the ``inference_ray_serve`` entry point. See docs/ray-serve.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Collection, Iterator
from time import perf_counter_ns
from types import ModuleType
from typing import Any

from opentelemetry import context as otel_context

from otel_inference import semconv
from otel_inference.batching import _Member, _Telemetry
from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation._patch import Patches
from otel_inference.instrumentation.ray_serve.package import _instruments
from otel_inference.stages import StageRecorder, log_once

__all__ = ["BATCH_STAGE", "RayServeInstrumentor", "span_processors"]

BATCH_STAGE = semconv.BATCH  # the batch as each member experienced it, named apart from its inside
_MEMBER = "_otel_inference_member"
_TELEMETRY = "_otel_inference_telemetry"


class RayServeInstrumentor(InferenceInstrumentor):
    """``@serve.batch`` queue wait and batch stages, and a request per replica call.

    ``instrument()`` options: ``stage`` (the batch stage's name, default
    ``batch``), ``requests`` (``False``: no ``request()`` around replica calls),
    ``tracer_provider``, ``meter_provider``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._patches = Patches("ray-serve")

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        stage = kwargs.get("stage") or BATCH_STAGE
        patches = self._patches

        def batching(module: ModuleType) -> None:
            queue = module._BatchQueue
            patches.wrap(queue, "__init__", _init_wrapper(recorder, stage))
            patches.wrap(queue, "put", _put_wrapper)
            patches.wrap(queue, "_process_batch_inner", _process_wrapper)

        patches.when_imported("ray.serve.batching", batching)
        if kwargs.get("requests", True):
            patches.when_imported(
                "ray.serve._private.replica",
                lambda module: patches.wrap(
                    module.Replica, "_wrap_request", _request_wrapper(recorder)
                ),
            )

    def _uninstrument(self, **kwargs: Any) -> None:
        self._patches.unwrap_all()


def _init_wrapper(recorder: StageRecorder, stage: str) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            name = getattr(instance, "_function_name", None) or "serve.batch"
            setattr(
                instance,
                _TELEMETRY,
                _Telemetry(recorder, name, stage, instance.max_batch_size, True),
            )
        except Exception:
            log_once("ray-serve-init", "otel-inference: cannot instrument a Serve batch queue")
        return result

    return wrapper


def _put_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    telemetry: _Telemetry | None = getattr(instance, _TELEMETRY, None)
    if telemetry is not None:
        try:
            request = args[0] if args else kwargs["request"]
            # The caller's request, current span and enclosing stage, captured now.
            setattr(request, _MEMBER, _Member(None, request.future, telemetry.capture()))
        except Exception:
            log_once("ray-serve-put", "otel-inference: cannot capture a Serve batch request")
    return wrapped(*args, **kwargs)


def _in_context(func: Callable[..., Any], context: otel_context.Context) -> Callable[..., Any]:
    """``func`` (the batch function) running with the batch span current: Serve
    attaches the first request's trace context around the call, which would make
    the stages inside children of that request instead of the batch."""
    if inspect.isasyncgenfunction(func):

        async def generator(*args: Any, **kwargs: Any) -> Any:
            token = otel_context.attach(context)
            try:
                async for item in func(*args, **kwargs):
                    yield item
            finally:
                otel_context.detach(token)

        return generator

    async def call(*args: Any, **kwargs: Any) -> Any:
        token = otel_context.attach(context)
        try:
            return await func(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return call


async def _process_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    telemetry: _Telemetry | None = getattr(instance, _TELEMETRY, None)
    scope = None
    members: list[_Member] = []
    try:
        func, batch = args[0], args[1]
        if telemetry is not None:
            members = [
                member
                for member in (getattr(r, _MEMBER, None) for r in batch if not r.future.cancelled())
                if member is not None
            ]
        if members:
            telemetry.max_batch_size = instance.max_batch_size  # may be changed at run time
            # Serve does not expose when its batch window opened: its first member's call.
            formation_start_ns = min(member.submit_ns for member in members)
            dispatch_ns = perf_counter_ns()
            scope = telemetry.open(members, formation_start_ns, dispatch_ns)
        if scope is not None:
            args = (_in_context(func, otel_context.get_current()), batch, *args[2:])
    except Exception:
        log_once("ray-serve-open", "otel-inference: cannot open a Serve batch stage")
    if scope is None:
        return await wrapped(*args, **kwargs)
    error: BaseException | None = None
    try:
        return await wrapped(*args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        end_ns = perf_counter_ns()
        if error is None:  # Serve delivers the function's exception to the callers
            error = _first_error(members)
        telemetry.cover(scope, members, end_ns)
        telemetry.record(scope, members, formation_start_ns, dispatch_ns, end_ns, error)


def _first_error(members: list[_Member]) -> BaseException | None:
    for member in members:
        future: asyncio.Future[Any] = member.future
        if future.done() and not future.cancelled() and future.exception() is not None:
            return future.exception()
    return None


def _request_wrapper(recorder: StageRecorder) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return _request(wrapped(*args, **kwargs), recorder)

    return wrapper


@contextlib.contextmanager
def _request(serve_scope: Any, recorder: StageRecorder) -> Iterator[Any]:
    # Inside Serve's scope, so that its replica_handle_request span is the parent.
    with serve_scope as value, recorder.request():
        yield value


def span_processors() -> list[Any]:
    """Span processors for Ray Serve's own tracing, from the ``OTEL_*`` variables:
    set ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=otel_inference.instrumentation.ray_serve:span_processors``
    and Serve's proxy and replicas export their spans where ours go (one
    ``BatchSpanProcessor`` per ``OTEL_TRACES_EXPORTER`` exporter, plus the
    ``OTEL_INFERENCE_SPANS_FILE`` file). Serve then sets the tracer provider
    (sampler ``ParentBasedTraceIdRatio(RAY_SERVE_TRACING_SAMPLING_RATIO)``);
    :func:`otel_inference.auto.start` keeps it and adds the meter provider."""
    from otel_inference.auto import exporter_span_processors

    return exporter_span_processors()
