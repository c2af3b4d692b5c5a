"""
Attribute tail latency that is not a stage: garbage-collection pauses and cold start.

``RuntimeInstrumentor`` (entry point ``inference_runtime``) starts the GC monitor
of :mod:`otel_inference.runtime`: every collection is timed through
``gc.callbacks`` into the ``inference.runtime.gc.pause`` histogram, and every
``request()`` in flight gets the pause in its totals
(``inference.gc.pause.duration``, ``inference.gc.pause.count``) and, for
generation-2 or long pauses, a ``gc.pause`` span event. It also (re)reads the
cold-start window: the first ``OTEL_INFERENCE_COLD_START_REQUESTS`` requests are
flagged ``inference.cold_start=true``. With ``OTEL_INFERENCE_GC_FREEZE=true``,
``gc.freeze()`` runs once the process is warm, so full collections stop
rescanning a loaded model's objects. It also makes each request of an ASGI
service (contrib's ASGI middleware: FastAPI, Starlette) a request for stage
accounting (:mod:`otel_inference.server_requests`): its stages are recorded once
per request, with their call counts.

Usage
-----

.. code:: python

    from otel_inference.instrumentation.runtime import RuntimeInstrumentor
    from otel_inference.runtime import mark_warm

    RuntimeInstrumentor().instrument()
    model = load_model()
    warm_up(model)
    mark_warm()          # optional: the steady state (and gc.freeze, if enabled) starts now

API
---
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from otel_inference.config import parse_bool
from otel_inference.environment_variables import OTEL_INFERENCE_GC_FREEZE
from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation.runtime.package import _instruments
from otel_inference.runtime import (
    COLD_START,
    cold_start_requests,
    gc_event_threshold,
    gc_monitor,
    set_freeze_when_warm,
)
from otel_inference.server_requests import adopt_server_requests, release_server_requests
from otel_inference.stages import StageRecorder


class RuntimeInstrumentor(InferenceInstrumentor):
    """GC pause attribution and cold-start flagging."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        # Validate everything before changing anything (ConfigurationError names the variable).
        threshold = kwargs.get("gc_event_threshold")
        threshold = gc_event_threshold() if threshold is None else float(threshold)
        cold_requests = kwargs.get("cold_start_requests")
        cold_requests = cold_start_requests() if cold_requests is None else int(cold_requests)
        freeze = kwargs.get("gc_freeze")
        freeze = parse_bool(OTEL_INFERENCE_GC_FREEZE) if freeze is None else bool(freeze)
        COLD_START.reset(cold_requests)
        set_freeze_when_warm(freeze)
        gc_monitor().start(threshold)
        adopt_server_requests(recorder)

    def _uninstrument(self, **kwargs: Any) -> None:
        release_server_requests()
        gc_monitor().stop()
        set_freeze_when_warm(False)
