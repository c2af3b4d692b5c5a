"""Tail culprits outside the stages: garbage-collection pauses and cold start.

A p99 far above p50 with healthy stage times is often not a stage at all. This
module attributes two such culprits to the requests they hit:

* **GC pauses.** A ``gc.callbacks`` hook times every collection. Each pause goes
  into the ``inference.runtime.gc.pause`` histogram (attribute
  ``cpython.gc.generation``), and every ``request()`` in flight during it gets
  the pause added to its total (span attribute ``inference.gc.pause.duration``,
  ``inference.gc.pause.count``) and, for generation-2 pauses or pauses over
  :envvar:`OTEL_INFERENCE_GC_EVENT_THRESHOLD`, a ``gc.pause`` span event.
* **Cold start.** The first :envvar:`OTEL_INFERENCE_COLD_START_REQUESTS` requests
  after process start, and every stage before the process is warm (model load,
  warm-up, the first torch.compile), carry ``inference.cold_start=true`` on their
  spans and as a histogram label, so dashboards and the report can keep them out
  of steady-state percentiles. :func:`mark_warm` ends the window early.

The GC callback can run inside ANY allocation, including while the OpenTelemetry
SDK holds one of its own (non-reentrant) locks, so it never calls the SDK: it
only times the pause and appends to lock-free structures. Histogram records and
span events happen later, at the next stage or request boundary.

Usage::

    from otel_inference.runtime import gc_monitor, mark_warm

    gc_monitor().start()        # done by the ``inference_runtime`` instrumentor
    load_model(); warm_up()
    mark_warm()                 # optional: steady state starts now
"""

from __future__ import annotations

import gc
import os
import threading
from collections import deque
from collections.abc import Mapping
from time import perf_counter_ns, time_ns
from typing import Any

from otel_inference.config import ConfigurationError, parse_count
from otel_inference.environment_variables import (
    OTEL_INFERENCE_COLD_START_REQUESTS,
    OTEL_INFERENCE_GC_EVENT_THRESHOLD,
)

GC_PAUSE = "inference.runtime.gc.pause"
GC_GENERATION = "cpython.gc.generation"  # semconv (incubating) attribute name
DEFAULT_COLD_START_REQUESTS = 10
DEFAULT_GC_EVENT_THRESHOLD_S = 0.001
_MAX_PENDING_PAUSES = 4096
_MAX_EVENTS_PER_REQUEST = 32


def cold_start_requests(environ: Mapping[str, str] | None = None) -> int:
    """:envvar:`OTEL_INFERENCE_COLD_START_REQUESTS` (default 10; 0 turns flagging off)."""
    return parse_count(
        OTEL_INFERENCE_COLD_START_REQUESTS, "requests", DEFAULT_COLD_START_REQUESTS, environ
    )


def gc_event_threshold(environ: Mapping[str, str] | None = None) -> float:
    """:envvar:`OTEL_INFERENCE_GC_EVENT_THRESHOLD` in seconds (default 1 ms)."""
    from otel_inference.budgets import parse_duration

    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_INFERENCE_GC_EVENT_THRESHOLD, "").strip()
    if not raw:
        return DEFAULT_GC_EVENT_THRESHOLD_S
    return parse_duration(raw, entry=raw, source=OTEL_INFERENCE_GC_EVENT_THRESHOLD)


class ColdStart:
    """The process is cold until ``limit`` requests have started (or :meth:`mark_warm`).

    Requests are counted by ``request()``, and for zero-code services (a web
    framework's SERVER span, no ``request()``) by the first top-level stage of
    each new trace. Racing threads may count a request twice: the window then
    closes a little early, never late.
    """

    __slots__ = ("_last_trace_id", "active", "remaining")

    def __init__(self, limit: int) -> None:
        self.reset(limit)

    def take_request(self) -> bool:
        """Count a ``request()``; True if it is one of the cold ones."""
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        if self.remaining == 0:
            self._warm()
        return True

    def take_trace(self, trace_id: int) -> bool:
        """For stages outside ``request()``: count each new trace once; every stage
        of a cold trace is cold, also after the count ran out within it."""
        if trace_id == self._last_trace_id:
            return True
        if self.remaining <= 0:
            self._warm()
            return False
        self._last_trace_id = trace_id
        self.remaining -= 1
        return True

    def _warm(self) -> None:
        if self.active:
            self.active = False
            _became_warm()

    def reset(self, limit: int) -> None:
        self.remaining = limit
        # Stages outside request() are cold while active (a cheap check per stage).
        self.active = limit > 0
        self._last_trace_id = 0


def _initial_cold_start() -> ColdStart:
    try:
        return ColdStart(cold_start_requests())
    except ConfigurationError:
        # Reported at startup by the distro; never fail an import over it.
        return ColdStart(DEFAULT_COLD_START_REQUESTS)


COLD_START = _initial_cold_start()


_freeze_when_warm = False


def set_freeze_when_warm(enabled: bool) -> None:
    """Call ``gc.freeze()`` when the process becomes warm (:envvar:`OTEL_INFERENCE_GC_FREEZE`)."""
    global _freeze_when_warm
    _freeze_when_warm = enabled


def _became_warm() -> None:
    if _freeze_when_warm:
        # Everything allocated so far (the loaded model above all) moves to the
        # permanent generation: full collections stop rescanning it.
        gc.freeze()


def mark_warm() -> None:
    """End the cold-start window now (e.g. after model load and warm-up)."""
    COLD_START.remaining = 0
    COLD_START._warm()


class GcPause:
    __slots__ = ("collected", "duration_ns", "end_wall_ns", "generation")

    def __init__(self, generation: int, duration_ns: int, collected: int, end_wall_ns: int) -> None:
        self.generation = generation
        self.duration_ns = duration_ns
        self.collected = collected
        self.end_wall_ns = end_wall_ns


class GcMonitor:
    """Times every collection through ``gc.callbacks`` and hands each pause to
    the requests in flight. Start/stop are idempotent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._start_ns = 0
        self.pending: deque[GcPause] = deque(maxlen=_MAX_PENDING_PAUSES)
        self.event_threshold_ns = int(DEFAULT_GC_EVENT_THRESHOLD_S * 1e9)
        # id(account) -> account, maintained by request(); read here without locks.
        self.in_flight: dict[int, Any] = {}

    @property
    def started(self) -> bool:
        return self._started

    def start(self, event_threshold_s: float | None = None) -> None:
        if event_threshold_s is not None:
            self.event_threshold_ns = int(event_threshold_s * 1e9)
        with self._lock:
            if not self._started:
                gc.callbacks.append(self._callback)
                self._started = True

    def stop(self) -> None:
        with self._lock:
            if self._started:
                gc.callbacks.remove(self._callback)
                self._started = False
        self.pending.clear()

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Runs inside an allocation anywhere in the process: no locks, no SDK
        # calls, no exceptions escaping (the interpreter would print them).
        try:
            if phase == "start":
                self._start_ns = perf_counter_ns()
                return
            duration_ns = perf_counter_ns() - self._start_ns
            generation = info.get("generation", 0)
            pause = GcPause(generation, duration_ns, info.get("collected", 0), time_ns())
            self.pending.append(pause)
            notable = generation == 2 or duration_ns >= self.event_threshold_ns
            for account in tuple(self.in_flight.values()):
                account.gc_pause_ns += duration_ns
                account.gc_pause_count += 1
                if notable and len(account.gc_pauses) < _MAX_EVENTS_PER_REQUEST:
                    account.gc_pauses.append(pause)
        except Exception:  # pragma: no cover - never raise from a gc callback
            pass


_monitor = GcMonitor()


def gc_monitor() -> GcMonitor:
    """The process-wide GC monitor (started by the ``inference_runtime`` instrumentor)."""
    return _monitor
