"""LitServe: its own batching (``max_batch_size`` / ``batch_timeout``) as stages,
in every inference worker.

LitServe's HTTP servers put each request, with the time it arrived, on a queue
that its inference workers (spawned processes, ``workers_per_device``) drain in
batches. Instrumented in each worker (no change to the ``LitAPI``'s code):

* each request's ``queue_wait``: from its arrival at the HTTP server to the
  start of its batch in the worker, taken from the arrival time LitServe puts on
  the queue (``time.monotonic``: one clock for every process of the machine);
* the batch's work, from the batch's formation to the last member's response
  (``decode_request``, ``batch``, ``predict``, ``unbatch``, ``encode_response``),
  as ONE stage (default name ``batch``), recorded as
  :mod:`otel_inference.batching` records its own batches: one span linked to
  every member, the whole duration and the per-member cost (duration / batch
  size) for every member, ``inference.batch.size``,
  ``inference.batch.fill_ratio`` and ``inference.batch.formation.duration``
  (``inference.batcher.name`` = the API path). Stages inside (``tokenize``,
  ``model_forward``...) are its children, labelled ``inference.stage.parent=batch``;
* each request in the worker as a span ``inference.request`` (a root: LitServe
  carries no trace context from its HTTP process to the worker), from arrival to
  its response, holding its ``queue_wait`` (linked to its batch).

Covered: the batched loop (``max_batch_size > 1``, not streaming). Requests
LitServe times out in the queue are not members of a batch and are not recorded.

Usage
-----

The workers are spawned processes: start the instrumentation in ``setup``,
which LitServe runs in each of them:

.. code-block:: python

    import litserve as ls
    import otel_inference.auto

    class Embedder(ls.LitAPI):
        def setup(self, device):
            otel_inference.auto.start()        # loads this instrumentor too
            ...

    ls.LitServer(Embedder(max_batch_size=8, batch_timeout=0.01), workers_per_device=2)

Under ``opentelemetry-instrument`` the spawned workers are instrumented already
(they inherit its ``PYTHONPATH``) and ``start()`` says so in one line. Alone:
``LitServeInstrumentor().instrument()``. See docs/litserve.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from time import perf_counter_ns, time_ns
from types import ModuleType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_inference import semconv
from otel_inference.batching import _Member, _Telemetry
from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation._patch import Patches
from otel_inference.instrumentation.litserve.package import _instruments
from otel_inference.stages import INSTRUMENTATION_SCOPE, StageRecorder, log_once
from otel_inference.version import __version__

__all__ = ["BATCH_STAGE", "LitServeInstrumentor"]

BATCH_STAGE = semconv.BATCH  # the batch as each member experienced it, named apart from its inside
_BATCH = "_otel_inference_batch"
_REQUEST_SPAN = "inference.request"
_START = "START"  # LitAPIStatus.START: LitServe's "picked up" notice, not a response


class LitServeInstrumentor(InferenceInstrumentor):
    """``queue_wait`` and batch stages from LitServe's batched inference loop.

    ``instrument()`` options: ``stage`` (the batch stage's name, default
    ``batch``), ``tracer_provider``, ``meter_provider``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._patches = Patches("litserve")

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        stage = kwargs.get("stage") or BATCH_STAGE
        tracer = trace.get_tracer(
            INSTRUMENTATION_SCOPE, __version__, tracer_provider=kwargs.get("tracer_provider")
        )
        patches = self._patches

        def loops(module: ModuleType) -> None:
            loop = module.DefaultLoop
            patches.wrap(loop, "get_batch_requests", _get_batch_wrapper(recorder, tracer, stage))
            patches.wrap(loop, "put_response", _put_response_wrapper)

        patches.when_imported("litserve.loops.base", loops)

    def _uninstrument(self, **kwargs: Any) -> None:
        self._patches.unwrap_all()


class _ArrivalQueue:
    """The worker's view of LitServe's request queue, noting each request's
    arrival time as it is taken (items pass through unchanged)."""

    __slots__ = ("arrivals", "queue")

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.arrivals: dict[Any, float] = {}

    def _note(self, item: Any) -> Any:
        if isinstance(item, tuple) and len(item) == 4:
            self.arrivals[item[1]] = item[2]  # (response_queue_id, uid, monotonic, payload)
        return item

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._note(self.queue.get(*args, **kwargs))

    def get_nowait(self) -> Any:
        return self._note(self.queue.get_nowait())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


class _Batch:
    """A batch in flight in one worker loop."""

    __slots__ = ("dispatch_ns", "formation_start_ns", "members", "pending", "scope", "spans")

    def __init__(self) -> None:
        self.members: list[_Member] = []
        self.spans: dict[Any, Any] = {}  # uid -> its worker-side request span
        self.pending: set[Any] = set()
        self.scope: Any = None
        self.formation_start_ns = 0
        self.dispatch_ns = 0


def _get_batch_wrapper(recorder: StageRecorder, tracer: Any, stage: str) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        _close(instance)  # a batch still open (a member never answered) ends here
        try:
            lit_api, request_queue, transport = _arguments(args, kwargs)
            arrivals = _ArrivalQueue(request_queue)
        except Exception:
            log_once("litserve-arguments", "otel-inference: unexpected LitServe loop arguments")
            return wrapped(*args, **kwargs)
        result = wrapped(lit_api, arrivals, transport)
        try:
            payloads = result[0]
            if payloads:
                _open(instance, recorder, tracer, stage, lit_api, payloads, arrivals.arrivals)
        except Exception:
            log_once("litserve-open", "otel-inference: cannot open a LitServe batch stage")
        return result

    return wrapper


def _arguments(args: Any, kwargs: Any) -> tuple[Any, Any, Any]:
    names = ("lit_api", "request_queue", "transport")
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    return values["lit_api"], values["request_queue"], values["transport"]


def _open(
    loop: Any,
    recorder: StageRecorder,
    tracer: Any,
    stage: str,
    lit_api: Any,
    payloads: Any,
    arrivals: dict[Any, float],
) -> None:
    dispatch_ns = perf_counter_ns()
    wall_offset_ns = time_ns() - dispatch_ns
    clock_offset_ns = dispatch_ns - time.monotonic_ns()  # monotonic -> perf_counter
    name = str(getattr(lit_api, "api_path", "") or "litserve")
    max_batch_size = int(getattr(lit_api, "max_batch_size", 0) or len(payloads))
    telemetry = _Telemetry(recorder, name, stage, max_batch_size, True)
    batch = _Batch()
    for _response_queue_id, uid, _payload in payloads:
        arrived = arrivals.get(uid)
        submit_ns = dispatch_ns if arrived is None else int(arrived * 1e9) + clock_offset_ns
        span = tracer.start_span(
            _REQUEST_SPAN,
            context=otel_context.Context(),  # a root: no trace context reaches the worker
            kind=SpanKind.SERVER,
            attributes={semconv.INFERENCE_BATCHER_NAME: name},
            start_time=submit_ns + wall_offset_ns,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            member = _Member(None, None, telemetry.capture())
        finally:
            otel_context.detach(token)
        member.submit_ns = min(submit_ns, dispatch_ns)
        batch.members.append(member)
        batch.spans[uid] = span
        batch.pending.add(uid)
    batch.formation_start_ns = min(member.submit_ns for member in batch.members)
    batch.dispatch_ns = dispatch_ns
    batch.scope = telemetry.open(batch.members, batch.formation_start_ns, dispatch_ns)
    setattr(loop, _BATCH, (batch, telemetry))


def _close(loop: Any) -> None:
    state = getattr(loop, _BATCH, None)
    if state is None:
        return
    setattr(loop, _BATCH, None)
    batch, telemetry = state
    try:
        end_ns = perf_counter_ns()
        if batch.scope is not None:
            telemetry.cover(batch.scope, batch.members, end_ns)
            telemetry.record(
                batch.scope,
                batch.members,
                batch.formation_start_ns,
                batch.dispatch_ns,
                end_ns,
                None,
            )
        for uid in batch.pending:  # members not answered yet
            batch.spans[uid].end()
    except Exception:
        log_once(
            "litserve-close", "otel-inference: cannot record a LitServe batch", level=logging.ERROR
        )


def _put_response_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    state = getattr(instance, _BATCH, None)
    if state is not None:
        try:
            uid = args[2] if len(args) > 2 else kwargs.get("uid")
            status = args[4] if len(args) > 4 else kwargs.get("status")
            batch = state[0]
            if uid in batch.pending and getattr(status, "name", status) != _START:
                batch.pending.discard(uid)
                batch.spans[uid].end()
                if not batch.pending:
                    _close(instance)
        except Exception:
            log_once("litserve-response", "otel-inference: cannot follow a LitServe response")
    return result
