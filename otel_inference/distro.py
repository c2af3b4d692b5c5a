"""Distro and configurator for ``opentelemetry-instrument``.

With otel-inference installed, ``opentelemetry-instrument python app.py`` sets up
the SDK (tracer and meter providers, exporters from ``OTEL_*_EXPORTER``) and
loads every otel-inference instrumentor whose library is present. Defaults:
traces and metrics over OTLP (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_METRICS_EXPORTER=otlp``); ``OTEL_METRICS_EXPORTER=prometheus`` serves a
scrape endpoint instead (extra ``otel-inference[prometheus]``), served by
:class:`otel_inference.prometheus.PrometheusEndpointReader`: a port in use is
one logged line (the process keeps its other signals), and
``OTEL_INFERENCE_PROMETHEUS_PORTS`` gives each worker of a multi-process server
a port of its own (docs/workers.md).

Our variables are validated here, at startup: a malformed budget is logged at
ERROR naming the bad entry and the application starts without budgets.

``OTEL_INFERENCE_SPANS_FILE=path`` also writes every span to a local file in
OTLP JSON Lines (``FileSpanExporter`` of ``opentelemetry-exporter-otlp-json-file``),
the input of ``otel-inference report --spans``: the contrib exporter's own entry
point (``OTEL_TRACES_EXPORTER=otlp_json_file``) can only write to stdout.

If another distro (e.g. ``opentelemetry-distro``) is installed too, select ours
with ``OTEL_PYTHON_DISTRO=otel_inference`` and
``OTEL_PYTHON_CONFIGURATOR=otel_inference``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.environment_variables import (
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.metrics import MeterProvider, set_meter_provider
from opentelemetry.sdk._configuration import _OTelSDKConfigurator
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_inference._fork import after_fork_in_child
from otel_inference.budgets import budgets_from_env
from otel_inference.config import (
    ConfigurationError,
    exception_messages_enabled,
    metrics_fast_path_enabled,
    prometheus_ports,
    root_stage_policy,
    speedups_enabled,
)
from otel_inference.environment_variables import (
    OTEL_INFERENCE_SPANS_FILE,
)
from otel_inference.fastpath import build_meter_provider
from otel_inference.stages import log_once

TELEMETRY_AUTO_VERSION = "telemetry.auto.version"
# Configurator arguments and variables through which something else shapes the
# SDK's metrics: then the SDK builds them, as without us.
_FOREIGN_ARGS = ("metric_exporter_names", "exporter_args_map", "meter_configurator")
_FOREIGN_VARIABLES = ("OTEL_PYTHON_METER_CONFIGURATOR", "OTEL_CONFIG_FILE")

_SPANS_FILE_EXPORTER = "opentelemetry.exporter.otlp.json.file"
_PROMETHEUS_EXPORTER = "opentelemetry.exporter.prometheus"


def spans_file() -> Path | None:
    """The path of ``OTEL_INFERENCE_SPANS_FILE``, checked; ``None`` when unset or blank.

    Raises :class:`ConfigurationError` for a directory, a missing parent directory,
    a path this process cannot write, or a missing ``opentelemetry-exporter-otlp-json-file``.
    """
    raw = os.environ.get(OTEL_INFERENCE_SPANS_FILE, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    problem = None
    if path.is_dir():
        problem = "is a directory, not a file"
    elif not path.parent.is_dir():
        problem = f"names a directory that does not exist ({path.parent})"
    elif not os.access(path if path.exists() else path.parent, os.W_OK):
        problem = "is not writable"
    else:
        try:
            found = importlib.util.find_spec(_SPANS_FILE_EXPORTER) is not None
        except ImportError:
            found = False
        if not found:
            problem = "needs the package opentelemetry-exporter-otlp-json-file (pip install it)"
    if problem is not None:
        raise ConfigurationError(f"{OTEL_INFERENCE_SPANS_FILE}={raw!r} {problem}")
    return path


def add_spans_file_processor(tracer_provider: Any = None) -> Path | None:
    """Add ``BatchSpanProcessor(FileSpanExporter(path))`` for ``OTEL_INFERENCE_SPANS_FILE``
    to ``tracer_provider`` (default: the global one). Returns the path, or ``None`` when
    unset or unusable (logged at ERROR once). Never raises."""
    try:
        path = spans_file()
        if path is None:
            return None
        provider = trace.get_tracer_provider() if tracer_provider is None else tracer_provider
        if not hasattr(provider, "add_span_processor"):
            raise ConfigurationError(
                f"{OTEL_INFERENCE_SPANS_FILE} needs the SDK's tracer provider, not "
                f"{type(provider).__name__}"
            )
        from opentelemetry.exporter.otlp.json.file import FileSpanExporter

        exporter = FileSpanExporter(path)
        after_fork_in_child(functools.partial(_reopen_in_child, weakref.ref(exporter), path))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    except (ConfigurationError, OSError, ImportError) as exc:
        log_once(
            "spans-file-env",
            "otel-inference: %s; continuing without it",
            exc,
            level=logging.ERROR,
            exc_info=False,  # a configuration problem: the message says it all
        )
        return None
    return path


def _reopen_in_child(exporter_ref: weakref.ref[Any], path: Path) -> None:
    """A forked child writes through a stream of its own. The inherited one may hold
    a batch the parent was writing at fork time (its lock still held, its buffer not
    yet flushed): that batch is the parent's to write, so the child's copy of the
    descriptor is pointed at /dev/null and the buffer is dropped there. Every
    process appends (O_APPEND) one flushed write per batch, so lines never mix."""
    exporter = exporter_ref()
    inner = getattr(exporter, "_exporter", None)
    old = getattr(inner, "_stream", None)
    if old is None or not getattr(inner, "_owns_stream", False):
        return
    inner._stream = path.open("a", encoding="utf-8")
    inner._lock = threading.Lock()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, old.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # already closed: nothing left to write
        pass


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
        ("spans-file-env", spans_file),
        ("prometheus-ports-env", prometheus_ports),
        ("fast-path-env", metrics_fast_path_enabled),
        ("speedups-env", speedups_enabled),
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


_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def metric_exporter_names(environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """``OTEL_METRICS_EXPORTER`` as the SDK resolves it (``otlp`` by its protocol);
    ``None`` where the fast path does not apply (no exporter, an unknown OTLP protocol)."""
    raw = environ.get(OTEL_METRICS_EXPORTER, "")
    if not raw.strip() or raw.strip().lower() == "none":
        return None
    names = []
    for name in (part.strip() for part in raw.split(",")):
        if name == "otlp":
            protocol = (
                environ.get(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL)
                or environ.get(OTEL_EXPORTER_OTLP_PROTOCOL)
                or "grpc"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                return None
            name = _OTLP_BY_PROTOCOL[protocol]
        names.append(name)
    return names


def fast_path_meter_provider(**kwargs: Any) -> MeterProvider | None:
    """The meter provider the SDK's configurator would build from the environment,
    built by us so that otel-inference's instruments take the recording fast path
    (:mod:`otel_inference.fastpath`); ``None`` (said once) where that cannot be."""
    reason = None
    try:
        if not metrics_fast_path_enabled():
            return None
    except ConfigurationError:
        return None  # validate_environment() logged it
    names = metric_exporter_names()
    if names is None:
        reason = "no metrics exporter, or an OTLP protocol other than grpc and http/protobuf"
    elif any(kwargs.get(arg) for arg in _FOREIGN_ARGS) or any(
        os.environ.get(var) for var in _FOREIGN_VARIABLES
    ):
        reason = "another component configures the SDK's metrics"
    if reason is None:
        attributes = dict(kwargs.get("resource_attributes") or {})
        if kwargs.get("auto_instrumentation_version"):
            attributes[TELEMETRY_AUTO_VERSION] = kwargs["auto_instrumentation_version"]
        try:
            provider = build_meter_provider(Resource.create(attributes), names)  # type: ignore[arg-type]
        except Exception as exc:  # an exporter that cannot be built: the SDK says why
            provider, reason = None, f"{type(exc).__name__}: {exc}"
        else:
            return provider  # None: build_meter_provider said why
    if reason is not None:
        log_once(
            "fast-path-configurator",
            "otel-inference: stage metrics are recorded through the SDK (%s)",
            reason,
            level=logging.INFO,
        )
    return None


class _DropOverrideWarning(logging.Filter):
    """The SDK's configurator sets the global meter provider, already set to ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Overriding of current MeterProvider" not in record.getMessage()


class OtelInferenceConfigurator(_OTelSDKConfigurator):
    """The SDK's own configurator: providers and exporters from ``OTEL_*`` variables,
    plus the span file of ``OTEL_INFERENCE_SPANS_FILE``.

    Metrics: the meter provider and its readers are built here, from the same
    variables and the exporters' public entry points, so otel-inference's instruments
    take the recording fast path (:envvar:`OTEL_INFERENCE_METRICS_FAST_PATH`); the
    SDK's configurator then runs with ``OTEL_METRICS_EXPORTER=none``. ``prometheus``
    metrics are served by :class:`otel_inference.prometheus.PrometheusEndpointReader`
    either way: a port in use never costs the process its other signals, and every
    worker of a multi-process server can have an endpoint of its own."""

    def _configure(self, **kwargs: Any) -> None:
        with _prometheus_endpoint_reader():
            provider = fast_path_meter_provider(**kwargs)
            if provider is None:
                super()._configure(**kwargs)
            else:
                self._configure_with(provider, **kwargs)
        add_spans_file_processor()

    def _configure_with(self, provider: MeterProvider, **kwargs: Any) -> None:
        """The SDK's configurator for traces and logs, with our meter provider."""
        set_meter_provider(provider)
        exporters = os.environ.get(OTEL_METRICS_EXPORTER)
        os.environ[OTEL_METRICS_EXPORTER] = "none"
        quiet = _DropOverrideWarning()
        sdk_metrics_logger = logging.getLogger("opentelemetry.metrics._internal")
        sdk_metrics_logger.addFilter(quiet)
        try:
            super()._configure(**kwargs)
        finally:
            sdk_metrics_logger.removeFilter(quiet)
            if exporters is None:
                os.environ.pop(OTEL_METRICS_EXPORTER, None)
            else:
                os.environ[OTEL_METRICS_EXPORTER] = exporters


@contextmanager
def _prometheus_endpoint_reader() -> Iterator[None]:
    """While the SDK builds its readers, ``prometheus`` in ``OTEL_METRICS_EXPORTER``
    names our reader's entry point (the SDK reads exporter names only from there)."""
    raw = os.environ.get(OTEL_METRICS_EXPORTER)
    names = [name.strip() for name in (raw or "").split(",")]
    try:
        installed = importlib.util.find_spec(_PROMETHEUS_EXPORTER) is not None
    except ImportError:
        installed = False
    if "prometheus" not in names or not installed:
        yield  # not asked for, or not installed: the SDK says so itself
        return
    from otel_inference.prometheus import ENTRY_POINT

    os.environ[OTEL_METRICS_EXPORTER] = ",".join(
        ENTRY_POINT if name == "prometheus" else name for name in names
    )
    try:
        yield
    finally:
        os.environ[OTEL_METRICS_EXPORTER] = raw  # type: ignore[assignment]
