"""Per-queue bookkeeping and the wrappers that maintain it.

Matching an item's ``get`` to its ``put`` without touching the item
-----------------------------------------------------------------
Items are never wrapped, hashed or weak-referenced (they may be unhashable,
non-weakref-able, compared by a subclass, or read directly from ``q.queue``).
Instead each queue carries, as an instance attribute, a FIFO of records that
mirrors its last items: one record (enqueue time, captured producer context,
depth) or a ``None`` placeholder per item. The records are appended and popped
by wrappers of the queue's internal ``_put``/``_get`` hooks, which
``queue.Queue`` calls under its own mutex: so records stay in exactly the
items' order whatever the number of producers and consumers (wrapping the
public ``put``/``get`` would do the bookkeeping outside the mutex, where two
producers can race). Non-FIFO subclasses (``LifoQueue``, ``PriorityQueue``,
``urllib3``'s pool) override those hooks and are left alone, which is right:
positional matching only holds for FIFO order.

The records are aligned on the queue's TAIL: on each ``_get`` the queue's size
says how many items remain, so records beyond it (items removed behind our back,
``q.queue.clear()``) are dropped from the head, and an item older than every
record (put before ``instrument()``) simply has none. Bounded: the records live
and die with the queue, hold at most one pointer per queued item, and at most
``_MAX_TRACKED`` captured contexts (beyond that, placeholders).

Recording happens after the queue's lock is released: ``_get`` leaves the record
in a thread-local slot and the public ``get`` (``queue.Queue``; ``get_nowait``
goes through it) or ``get_nowait`` (``asyncio.Queue``; ``get`` goes through it)
records it on return.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from time import perf_counter_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanContext

from otel_inference import semconv
from otel_inference.stages import StageContext, StageRecorder, current_request, log_once

_STATE_ATTR = "_otel_inference_queue"
_MAX_TRACKED = 10_000
DEFAULT_EXCLUDED_MODULES = (
    "opentelemetry",
    "otel_inference",
    "logging",
    "concurrent",
    "multiprocessing",
    "asyncio",
    "grpc",
    "urllib3",
    "ray",  # Serve's own plumbing; its @serve.batch wait is the ray_serve instrumentor's
)
# Frames skipped when looking for the module that constructs a queue.
_PLUMBING_MODULES = frozenset({"queue", "asyncio.queues", __name__})

# (enqueue perf_counter_ns, producer context, depth at enqueue); None = untracked item
_Record = tuple[int, StageContext, int]


class QueueState:
    """Bookkeeping of one queue, stored on the queue itself."""

    __slots__ = ("config", "excluded", "kind", "name", "records")

    def __init__(self, kind: str, name: str | None = None, excluded: bool = False) -> None:
        self.kind = kind
        self.name = name
        self.excluded = excluded
        self.records: deque[_Record | None] = deque()
        self.config: QueueConfig | None = None  # the instrumentation that filled records


class QueueConfig:
    """One ``instrument()``'s settings; a new one invalidates older records."""

    __slots__ = ("excluded_modules", "recorder", "requests_only")

    def __init__(
        self, recorder: StageRecorder, requests_only: bool, excluded_modules: Iterable[str]
    ) -> None:
        self.recorder = recorder
        self.requests_only = requests_only
        self.excluded_modules = tuple(excluded_modules)

    def is_excluded(self, module: str) -> bool:
        return any(
            module == prefix or module.startswith(prefix + ".") for prefix in self.excluded_modules
        )


class _Pending(threading.local):
    value: tuple[QueueState, _Record, int] | None = None


_pending = _Pending()
_last_dequeued: ContextVar[SpanContext | None] = ContextVar(
    "otel_inference_last_dequeued", default=None
)


def last_dequeued() -> SpanContext | None:
    """Span context of the ``queue_wait`` span of the item this thread/task got last."""
    return _last_dequeued.get()


def queue_kind(queue: Any) -> str:
    cls = type(queue)
    if cls.__module__ in ("queue", "asyncio.queues"):
        return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def state_of(queue: Any, create: bool = True) -> QueueState | None:
    state = queue.__dict__.get(_STATE_ATTR)
    if state is None and create:
        state = queue.__dict__[_STATE_ATTR] = QueueState(queue_kind(queue))
    return state


def _creator_module() -> str:
    """Module of the code constructing the queue (skipping queue/wrapt plumbing)."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        if module not in _PLUMBING_MODULES and not module.startswith("wrapt"):
            return module
        frame = frame.f_back
    return ""


Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


def init_wrapper(config: QueueConfig) -> Wrapper:
    """Name the queue after its creating module; exclude OTel's, logging's, ours."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        result = wrapped(*args, **kwargs)
        try:
            if _STATE_ATTR not in instance.__dict__:
                module = _creator_module()
                instance.__dict__[_STATE_ATTR] = QueueState(
                    queue_kind(instance), module or None, config.is_excluded(module)
                )
        except Exception:
            log_once("queues-init", "otel-inference: failed to set up a queue", level=logging.ERROR)
        return result

    return wrapper


def put_wrapper(config: QueueConfig, size: Callable[[Any], int]) -> Wrapper:
    """Wraps ``_put`` (under ``queue.Queue``'s mutex): append the item's record."""
    recorder = config.recorder
    requests_only = config.requests_only

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled():
            result = wrapped(*args, **kwargs)
            state = instance.__dict__.get(_STATE_ATTR)
            if state is not None and state.records:
                state.records.append(None)  # keep the records aligned
            return result
        context: StageContext | None = None
        depth = 0
        try:
            state = instance.__dict__.get(_STATE_ATTR) or state_of(instance)
            if state.excluded:
                state = None
            elif (
                not requests_only
                or current_request() is not None
                or trace.get_current_span().get_span_context().is_valid
            ):
                context = recorder.capture()
                depth = size(instance)
        except Exception:
            state = None
            log_once(
                "queues-put", "otel-inference: failed to track a queue item", level=logging.ERROR
            )
        result = wrapped(*args, **kwargs)
        if state is not None:
            try:
                records = state.records
                if state.config is not config:
                    records.clear()
                    state.config = config
                if context is not None and len(records) < _MAX_TRACKED:
                    records.append((perf_counter_ns(), context, depth))
                elif records:
                    records.append(None)
            except Exception:
                log_once(
                    "queues-put",
                    "otel-inference: failed to track a queue item",
                    level=logging.ERROR,
                )
        return result

    return wrapper


def internal_get_wrapper(config: QueueConfig, size: Callable[[Any], int]) -> Wrapper:
    """Wraps ``_get`` (under ``queue.Queue``'s mutex): pop the item's record."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        # Alignment is kept even when instrumentation is suppressed, so the
        # suppression check comes only when there is something to record.
        item = wrapped(*args, **kwargs)
        state = instance.__dict__.get(_STATE_ATTR)
        if state is None or not state.records:
            return item
        try:
            records = state.records
            if state.config is not config:
                records.clear()
                return item
            # The records mirror the queue's last items: the item just removed
            # was the head of ``remaining + 1``.
            expected = size(instance) + 1
            while len(records) > expected:
                records.popleft()
            if len(records) == expected:
                record = records.popleft()
                if record is not None and is_instrumentation_enabled():
                    _pending.value = (state, record, perf_counter_ns())
        except Exception:
            log_once(
                "queues-get", "otel-inference: failed to match a queue item", level=logging.ERROR
            )
        return item

    return wrapper


def get_wrapper(config: QueueConfig) -> Wrapper:
    """Wraps the public get: records what ``_get`` matched, outside the queue's lock."""
    recorder = config.recorder

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        # No suppression check of its own: ``_get`` leaves a record only when
        # instrumentation is enabled, in this same thread and context.
        pending = _pending
        if pending.value is not None:
            pending.value = None  # stale: a _get outside get (e.g. shutdown draining)
        item = wrapped(*args, **kwargs)
        matched = pending.value
        if matched is not None:
            pending.value = None
            _record(recorder, *matched)
        return item

    return wrapper


def _record(recorder: StageRecorder, state: QueueState, record: _Record, dequeue_ns: int) -> None:
    enqueue_ns, context, depth = record
    try:
        attributes = None
        if context.recording:
            attributes = {
                semconv.INFERENCE_QUEUE_KIND: state.kind,
                semconv.INFERENCE_QUEUE_DEPTH: depth,
            }
            if state.name:
                attributes[semconv.INFERENCE_QUEUE_NAME] = state.name
        span_context = recorder.record_interval(
            semconv.QUEUE_WAIT, enqueue_ns, dequeue_ns, context=context, attributes=attributes
        )
        if span_context is not None:
            # The consumer side links to the producer's queue_wait span.
            consumer = trace.get_current_span()
            if consumer.is_recording():
                consumer.add_link(span_context)
            _last_dequeued.set(span_context)
        elif _last_dequeued.get() is not None:
            _last_dequeued.set(None)
    except Exception:
        log_once(
            "queues-record", "otel-inference: failed to record queue_wait", level=logging.ERROR
        )


def exclude_handler_queue(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    """Wraps ``QueueHandler``/``QueueListener.__init__``: log records are not requests."""
    result = wrapped(*args, **kwargs)
    try:
        queue = getattr(instance, "queue", None)
        if queue is not None and hasattr(queue, "__dict__"):
            state = state_of(queue)
            if state is not None:
                state.excluded = True
                state.records.clear()
    except Exception:
        log_once("queues-logging", "otel-inference: failed to exclude a logging queue")
    return result
