"""
Queue wait for ``queue.Queue`` and ``asyncio.Queue``: the time each item spends
between ``put`` and ``get``, recorded as stage ``queue_wait`` of the PRODUCER's
request (histogram for every item; a span, backdated to the enqueue, when the
producer's span is sampled). The consumer's current span, when recording, gets a
link to that span; :func:`producer_link` gives it to consumers that start their
span after ``get``.

Usage
-----

.. code-block:: python

    import queue

    from otel_inference.instrumentation.queues import QueueInstrumentor, configure_queue

    QueueInstrumentor().instrument()      # or: opentelemetry-instrument (entry point inference_queues)

    requests = configure_queue(queue.Queue(maxsize=256), name="requests")
    scratch = configure_queue(queue.Queue(), enabled=False)   # opt-out: never recorded

    # producer, inside a request:            consumer thread:
    requests.put(job)                        job = requests.get()   # queue_wait recorded here

Span attributes: ``inference.queue.kind`` (``queue.Queue``, ``asyncio.Queue`` or the
subclass), ``inference.queue.name`` (given, else the module that created the queue),
``inference.queue.depth`` (items ahead at enqueue).

What is recorded, and what it costs
-----------------------------------
* Only items put inside a request (``request()`` or any valid span) by default: a
  ``queue_wait`` needs a request to belong to. ``OTEL_INFERENCE_QUEUES_SCOPE=all``
  records every item.
* Never recorded: queues created by OpenTelemetry, otel-inference, ``logging``,
  ``concurrent.futures``, ``multiprocessing``, ``asyncio``, grpc, urllib3, ray (judged by
  the constructing module; extend with ``OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES``),
  queues given to ``logging.handlers.QueueHandler``/``QueueListener``, queues opted
  out with :func:`configure_queue`, and non-FIFO queues (``LifoQueue``,
  ``PriorityQueue``), whose ``put``/``get`` order a per-item wait cannot follow.
  Such a queue pays only the wrappers' checks (see docs/batching-and-queues.md).
* The bookkeeping matches gets to puts by position, under the queue's own lock,
  without touching the items (see ``_tracking``): semantics (FIFO, blocking,
  timeouts, ``Full``/``Empty``, ``task_done``/``join``) are unchanged, and the
  memory is bounded and lives on the queue.
* ``otel_inference.batching`` records its own, richer queue wait; it does not use
  these queues.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import queue
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Link
from wrapt import wrap_function_wrapper

from otel_inference.config import ConfigurationError
from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation.queues import _tracking
from otel_inference.instrumentation.queues.environment_variables import (
    OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES,
    OTEL_INFERENCE_QUEUES_SCOPE,
)
from otel_inference.instrumentation.queues.package import _instruments
from otel_inference.stages import StageRecorder, log_once

__all__ = [
    "DEFAULT_EXCLUDED_MODULES",
    "QueueInstrumentor",
    "configure_queue",
    "exclude_queue",
    "producer_link",
]

DEFAULT_EXCLUDED_MODULES = _tracking.DEFAULT_EXCLUDED_MODULES
SCOPES = ("requests", "all")

Q = TypeVar("Q")


def _queue_size(instance: queue.Queue[Any]) -> int:
    return instance._qsize()  # type: ignore[attr-defined]  # qsize() would re-take the mutex


def _async_queue_size(instance: asyncio.Queue[Any]) -> int:
    return instance.qsize()


class QueueInstrumentor(InferenceInstrumentor):
    """Records ``queue_wait`` for ``queue.Queue`` and ``asyncio.Queue`` items.

    ``instrument()`` options (override the environment): ``scope`` (``"requests"``
    or ``"all"``, see ``OTEL_INFERENCE_QUEUES_SCOPE``), ``excluded_modules`` (module
    names added to :data:`DEFAULT_EXCLUDED_MODULES`), ``tracer_provider``,
    ``meter_provider``.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        # Standard library only: nothing to check, so it always loads.
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        scope = kwargs.get("scope")
        if scope is None:
            scope = _scope_from_env()
        elif scope not in SCOPES:
            raise ConfigurationError(f"scope={scope!r} is not one of: {', '.join(SCOPES)}")
        excluded: Iterable[str] | None = kwargs.get("excluded_modules")
        if excluded is None:
            excluded = _split(os.environ.get(OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES, ""))
        config = _tracking.QueueConfig(
            recorder, scope == "requests", (*DEFAULT_EXCLUDED_MODULES, *excluded)
        )
        for module, size, public_get in (
            (queue, _queue_size, "get"),
            (asyncio.queues, _async_queue_size, "get_nowait"),
        ):
            wrap_function_wrapper(module, "Queue.__init__", _tracking.init_wrapper(config))
            wrap_function_wrapper(module, "Queue._put", _tracking.put_wrapper(config, size))
            wrap_function_wrapper(
                module, "Queue._get", _tracking.internal_get_wrapper(config, size)
            )
            wrap_function_wrapper(module, f"Queue.{public_get}", _tracking.get_wrapper(config))
        for handler in ("QueueHandler", "QueueListener"):
            wrap_function_wrapper(
                logging.handlers, f"{handler}.__init__", _tracking.exclude_handler_queue
            )

    def _uninstrument(self, **kwargs: Any) -> None:
        for cls, public_get in ((queue.Queue, "get"), (asyncio.Queue, "get_nowait")):
            for method in ("__init__", "_put", "_get", public_get):
                unwrap(cls, method)
        unwrap(logging.handlers.QueueHandler, "__init__")
        unwrap(logging.handlers.QueueListener, "__init__")


def configure_queue(q: Q, *, name: str | None = None, enabled: bool = True) -> Q:
    """Name a queue (``inference.queue.name``) and/or opt it out (``enabled=False``)
    or back in (``enabled=True`` also re-includes a queue excluded by default).
    Works before or after ``instrument()``; returns the queue."""
    try:
        state = _tracking.state_of(q)
        if state is not None:
            if name is not None:
                state.name = name
            state.excluded = not enabled
            if not enabled:
                state.records.clear()
    except Exception:
        log_once("queues-configure", "otel-inference: cannot configure %r", type(q))
    return q


def exclude_queue(q: Q) -> Q:
    """Opt a queue out: its items are never recorded. Returns the queue."""
    return configure_queue(q, enabled=False)


def producer_link() -> Link | None:
    """A link to the producer's ``queue_wait`` span of the item this thread (or
    asyncio task) dequeued last, when that producer was sampled; for consumers
    that start their own span after ``get``::

        job = jobs.get()
        link = producer_link()
        with tracer.start_as_current_span("handle", links=[link] if link else None):
            ...
    """
    span_context = _tracking.last_dequeued()
    return None if span_context is None else Link(span_context)


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _scope_from_env() -> str:
    raw = os.environ.get(OTEL_INFERENCE_QUEUES_SCOPE, "").strip().lower()
    if not raw:
        return "requests"
    if raw not in SCOPES:
        log_once(
            "queues-scope-env",
            "otel-inference: %s=%r is not one of: %s; using 'requests'",
            OTEL_INFERENCE_QUEUES_SCOPE,
            raw,
            ", ".join(SCOPES),
        )
        return "requests"
    return raw
