"""The base every otel-inference instrumentor derives from.

``opentelemetry-instrument`` checks the distribution's ``instruments-any`` extra
(satisfied when ANY instrumented library is present; it also lists
opentelemetry-instrumentation, which stands for the standard library, so the
queue, json and gc instrumentors load in a service with none of the others) and
then calls
``instrument(skip_dep_check=True)``. So each instrumentor must check its OWN
library: :meth:`InferenceInstrumentor._instrument` raises
``DependencyConflictError`` (or ``ModuleNotFoundError``) when it is missing or out
of range, which the loader logs and skips without touching other instrumentors.

Usage (a subclass)::

    class RedisFeatureInstrumentor(InferenceInstrumentor):
        def instrumentation_dependencies(self):
            return ("redis >= 4.2",)

        def _instrument_library(self, recorder, **kwargs):
            ...  # wrap, recording through ``recorder``

        def _uninstrument(self, **kwargs):
            ...  # unwrap
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

from opentelemetry.instrumentation.dependencies import (
    DependencyConflictError,
    get_dependency_conflicts,
)
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from otel_inference.config import ConfigurationError
from otel_inference.stages import StageRecorder, get_recorder

_logger = logging.getLogger(__name__)


class InferenceInstrumentor(BaseInstrumentor):
    """``BaseInstrumentor`` that checks its own dependencies and hands the
    subclass a :class:`StageRecorder` (the shared one, or one bound to the
    ``tracer_provider``/``meter_provider`` passed to ``instrument()``).

    Bad configuration raises :class:`ConfigurationError` from a programmatic
    ``instrument()``. Under ``opentelemetry-instrument`` it is logged at ERROR
    and this instrumentor is skipped: the loader re-raises anything but import
    errors, which would stop every instrumentor after this one from loading.
    """

    def instrument(self, **kwargs: Any) -> Any:
        # Only the auto-instrumentation loader passes skip_dep_check (it has
        # checked the distribution already).
        auto_instrumentation = bool(kwargs.get("skip_dep_check"))
        try:
            return super().instrument(**kwargs)
        except ConfigurationError as exc:
            if not auto_instrumentation:
                raise
            _logger.error("otel-inference: %s not enabled: %s", type(self).__name__, exc)
            return None

    def _instrument(self, **kwargs: Any) -> None:
        conflict = get_dependency_conflicts(self.instrumentation_dependencies())
        if conflict is not None:
            raise DependencyConflictError(conflict)
        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        if tracer_provider is None and meter_provider is None:
            recorder = get_recorder()
        else:
            recorder = StageRecorder(tracer_provider, meter_provider)
        self._instrument_library(recorder, **kwargs)

    @abstractmethod
    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        """Install the wrappers; record every stage through ``recorder``."""
