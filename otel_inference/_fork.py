"""Fork safety for pre-fork servers (gunicorn, ``--preload``, ``multiprocessing`` fork).

A forked child keeps the parent's memory but only the thread that called
``fork()``. Whatever otel-inference started in the parent is made whole again
in the child, by hooks registered here (:func:`after_fork_in_child`):

* threads are restarted (lazily, at the next use) instead of being waited on
  forever: the CUDA event resolver, the dynamic batchers' workers, the
  Prometheus endpoint (on a port of its own);
* locks are replaced: one held at fork time by a thread that does not exist in
  the child would never be released;
* what the parent already measured is dropped in the child (the SDK's metric
  aggregations, GC pauses not yet recorded, counter totals), so nothing is
  exported twice: the parent exports its own measurements, each child only
  what it measured itself.
* the OTLP/gRPC exporters get a channel of the child's own
  (:func:`renew_grpc_channels`).

The SDK restarts its own export threads after a fork and gives the child a new
``service.instance.id``; :func:`reset_meter_provider` adds the missing piece,
the aggregations. Usage (inside the package)::

    from otel_inference._fork import after_fork_in_child

    after_fork_in_child(self._after_fork_in_child)  # bound methods are held weakly
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

_logger = logging.getLogger(__name__)

_hooks: list[Callable[[], Callable[[], None] | None]] = []
_hooks_lock = threading.Lock()


def after_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback()`` in every child forked from now on. A bound method is
    held weakly (its object may go away); errors are logged, never raised."""
    if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
        ref: Callable[[], Callable[[], None] | None] = weakref.WeakMethod(callback)  # type: ignore[arg-type]
    else:

        def ref() -> Callable[[], None]:
            return callback

    with _hooks_lock:
        _hooks.append(ref)


def _run_hooks() -> None:
    global _hooks_lock
    # Only this thread exists now: the lock may have been held by another at fork.
    _hooks_lock = threading.Lock()
    live = []
    for ref in _hooks:
        callback = ref()
        if callback is None:
            continue
        live.append(ref)
        try:
            callback()
        except Exception:  # never break the child over our bookkeeping
            _logger.exception("otel-inference: a fork handler failed in the child")
    _hooks[:] = live


def reset_meter_provider(meter_provider: Any) -> bool:
    """Drop the measurements an SDK ``MeterProvider`` aggregated before the fork.

    The child inherits the parent's aggregations; exporting them again (as the
    child's cumulative series) would count the parent's measurements twice. The
    instruments and views stay; only the aggregated values and the locks
    guarding them are replaced. Returns False for a provider that is not the
    SDK's (nothing to reset)."""
    consumer = getattr(meter_provider, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if storages is None:
        return False
    if hasattr(consumer, "_lock"):
        consumer._lock = threading.Lock()
    # Locks the SDK's own fork handlers leave as they were: the periodic reader's
    # export lock (held for a whole export: a fork during one froze the child's
    # metrics for good) and each meter's instrument registration lock.
    for reader in list(storages):
        if hasattr(reader, "_export_lock"):
            reader._export_lock = threading.Lock()
    for meter in list(getattr(meter_provider, "_meters", {}).values()):
        if hasattr(meter, "_instrument_registration_lock"):
            meter._instrument_registration_lock = threading.Lock()
    for storage in storages.values():
        if hasattr(storage, "_lock"):
            storage._lock = threading.RLock()
        for matches in list(getattr(storage, "_instrument_view_instrument_matches", {}).values()):
            for match in matches:
                match._attributes_aggregation = {}
                match._lock = threading.Lock()
                if hasattr(match, "_previous_collection_start_nanos"):
                    match._previous_collection_start_nanos = None
    return True


def _reset_global_meter_provider() -> None:
    from opentelemetry import metrics

    reset_meter_provider(metrics.get_meter_provider())


# gRPC channels the child abandoned: never closed here (closing tears down state
# that is the parent's), never collected (collection would close them).
_abandoned_channels: list[Any] = []


def _exporters() -> list[Any]:
    """The exporters of the global SDK providers (span processors, metric readers)."""
    from opentelemetry import metrics, trace

    found = []
    multi = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    for processor in getattr(multi, "_span_processors", ()):
        found.append(getattr(processor, "span_exporter", None))
    for reader in getattr(metrics.get_meter_provider(), "_metric_readers", ()):
        found.append(getattr(reader, "_exporter", None))
    return [exporter for exporter in found if exporter is not None]


def renew_grpc_channels() -> int:
    """Give the OTLP/gRPC exporters of the global providers a channel of the child's own.

    A channel made in the parent, perhaps mid-export at fork time, is the parent's:
    gRPC supports using it in a child only in limited ways. Returns how many were
    renewed."""
    renewed = 0
    for exporter in _exporters():
        channel = getattr(exporter, "_channel", None)
        renew = getattr(exporter, "_initialize_channel_and_stub", None)
        if channel is None or renew is None:
            continue
        _abandoned_channels.append(channel)
        renew()
        renewed += 1
    return renewed


after_fork_in_child(_reset_global_meter_provider)
after_fork_in_child(renew_grpc_channels)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_hooks)
