"""Distro and configurator for ``opentelemetry-instrument``.

With otel-inference installed, ``opentelemetry-instrument python app.py`` sets up
the SDK (tracer and meter providers, exporters from ``OTEL_*_EXPORTER``) and
loads every otel-inference instrumentor whose library is present. Defaults:
traces and metrics over OTLP (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_METRICS_EXPORTER=otlp``); ``OTEL_METRICS_EXPORTER=prometheus`` serves a
scrape endpoint instead (extra ``otel-inference[prometheus]``).

Our variables are validated here, at startup: a malformed budget is logged at
ERROR naming the bad entry and the application starts without budgets.

If another distro (e.g. ``opentelemetry-distro``) is installed too, select ours
with ``OTEL_PYTHON_DISTRO=otel_inference`` and
``OTEL_PYTHON_CONFIGURATOR=otel_inference``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry.environment_variables import (
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.sdk._configuration import _OTelSDKConfigurator

from otel_inference.budgets import budgets_from_env
from otel_inference.config import (
    ConfigurationError,
    exception_messages_enabled,
    root_stage_policy,
)
from otel_inference.stages import log_once


def validate_environment() -> list[str]:
    """Check the core ``OTEL_INFERENCE_*`` variables; log each problem at ERROR once.

    Each instrumentor checks its own variables when it loads (and a bad one
    disables only that instrumentor, logged once), the downstream hook its own:
    one message per bad variable, from the component it disables.

    Returns the messages (empty when all is well). Never raises: under
    ``opentelemetry-instrument`` the application must still start.
    """
    problems = []
    checks = (
        ("budgets-env", budgets_from_env),
        ("root-stages-env", root_stage_policy),
        ("exception-messages-env", exception_messages_enabled),
    )
    for key, check in checks:
        try:
            check()
        except ConfigurationError as exc:
            problems.append(str(exc))
            log_once(
                key,
                "otel-inference: %s; continuing without it",
                exc,
                level=logging.ERROR,
                exc_info=False,
            )
    return problems


class OtelInferenceDistro(BaseDistro):
    """Defaults for ``opentelemetry-instrument``: OTLP traces and metrics."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault(OTEL_TRACES_EXPORTER, "otlp")
        os.environ.setdefault(OTEL_METRICS_EXPORTER, "otlp")
        validate_environment()


class OtelInferenceConfigurator(_OTelSDKConfigurator):
    """The SDK's own configurator: providers and exporters from ``OTEL_*`` variables."""
