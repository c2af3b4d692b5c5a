"""Programmatic start: what ``opentelemetry-instrument`` does, from inside a process.

Serving frameworks own their processes: Ray Serve runs replicas in Ray actor
processes, LitServe spawns its inference workers, Triton's Python backend and
TorchServe load a handler into their own workers. ``opentelemetry-instrument``
cannot wrap those, so call :func:`start` where the framework hands you control
in each worker (a replica's constructor, ``LitAPI.setup``, a handler's
``initialize``)::

    import otel_inference.auto

    otel_inference.auto.start()

It reads the same environment variables as ``opentelemetry-instrument``
(``OTEL_SERVICE_NAME``, ``OTEL_*_EXPORTER``, ``OTEL_TRACES_SAMPLER``,
``OTEL_INFERENCE_*``, ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` ...) and does
the same work through the same public entry point
(:func:`opentelemetry.instrumentation.auto_instrumentation.initialize`): the
distro (ours validates ``OTEL_INFERENCE_*``), the configurator (tracer and
meter providers, exporters, ``OTEL_INFERENCE_SPANS_FILE``) and every
instrumentor registered under ``opentelemetry_instrumentor`` whose library is
installed.

* Idempotent: a second call in the same process does nothing.
* Per process: the record of a call is kept with the process id, so a call in a
  worker forked from a started parent, or in a spawned one, is judged afresh.
* Telemetry already configured (the process runs under
  ``opentelemetry-instrument``, was forked from a started parent, or the
  application or framework set a tracer or meter provider, as Ray Serve's
  tracing does): it is kept, one line says so at INFO, a signal nobody set up
  yet (metrics beside Ray's traces, say) is set up from the environment, and
  only instrumentors not loaded yet are loaded.

Returns ``True`` when this call configured the SDK, ``False`` otherwise. It
never raises (``swallow_exceptions=False`` re-raises what the loader raises).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation import auto_instrumentation
from opentelemetry.instrumentation.dependencies import (
    DependencyConflictError,
    get_dist_dependency_conflicts,
)
from opentelemetry.instrumentation.environment_variables import (
    OTEL_PYTHON_DISABLED_INSTRUMENTATIONS,
)
from opentelemetry.util._importlib_metadata import entry_points

__all__ = ["configured_by", "exporter_span_processors", "start"]

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
# (pid of the call that started telemetry, pid of the last call): both survive a
# fork in the child's memory, which is how a forked worker knows its parent's.
_started_pid: int | None = None
_called_pid: int | None = None
# Processes whose spans-file processor was made by exporter_span_processors(), for
# a provider someone else builds (Ray Serve's): start() must not add a second.
_spans_file_pids: set[int] = set()
_AUTO_DIR = Path(auto_instrumentation.__file__).resolve().parent


def _new_lock_in_child() -> None:
    # A fork while another thread held the lock would leave it held forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _is_proxy(provider: Any) -> bool:
    return type(provider).__name__.startswith(("Proxy", "NoOp", "_Proxy"))


def _under_opentelemetry_instrument() -> bool:
    """The ``sitecustomize`` that ``opentelemetry-instrument`` puts first on
    PYTHONPATH ran in this process (also true in workers it spawned)."""
    module = sys.modules.get("sitecustomize")
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent == _AUTO_DIR


def configured_by() -> str | None:
    """Who configured telemetry in this process already, or ``None``."""
    if _under_opentelemetry_instrument():
        return "opentelemetry-instrument"
    if _started_pid is not None:
        if _started_pid == os.getpid():
            return "otel_inference.auto.start()"
        return f"otel_inference.auto.start() in parent process {_started_pid}, before the fork"
    found = []
    tracer_provider = trace.get_tracer_provider()
    if not _is_proxy(tracer_provider):
        found.append(
            f"tracer provider {type(tracer_provider).__module__}.{type(tracer_provider).__name__}"
        )
    meter_provider = metrics.get_meter_provider()
    if not _is_proxy(meter_provider):
        found.append(
            f"meter provider {type(meter_provider).__module__}.{type(meter_provider).__name__}"
        )
    if found:
        return "the application or its framework, which set a " + " and a ".join(found)
    return None


def start(*, swallow_exceptions: bool = True) -> bool:
    """Configure the SDK and load every instrumentor, as ``opentelemetry-instrument``
    does, once per process. See the module docstring."""
    global _called_pid, _started_pid
    pid = os.getpid()
    with _lock:
        if _called_pid == pid:
            return False
        _called_pid = pid
        try:
            owner = configured_by()
            if owner is None:
                auto_instrumentation.initialize(swallow_exceptions=swallow_exceptions)
                _started_pid = pid
                return True
            _logger.info(
                "otel-inference: telemetry already configured in process %d (by %s); "
                "start() keeps it",
                pid,
                owner,
            )
            if owner != "opentelemetry-instrument" and not owner.startswith("otel_inference"):
                _complete(owner)
        except Exception:
            if not swallow_exceptions:
                raise
            _logger.exception("otel-inference: start() failed; the application runs on")
        return False


def _complete(owner: str) -> None:
    """A provider set by someone else: set up what is missing, load the rest."""
    distro = auto_instrumentation._load_distro()
    distro.configure()  # our distro: exporter defaults, OTEL_INFERENCE_* validated
    _configure_missing_signals()
    _load_missing_instrumentors(distro)


def _configure_missing_signals() -> None:
    """The SDK configurator's own steps for the signal nobody configured (e.g.
    metrics beside the tracer provider Ray Serve's tracing sets)."""
    from opentelemetry.sdk import _configuration as sdk_configuration
    from opentelemetry.sdk.resources import Resource

    from otel_inference.distro import add_spans_file_processor

    tracer_missing = _is_proxy(trace.get_tracer_provider())
    meter_missing = _is_proxy(metrics.get_meter_provider())
    span_exporters, metric_exporters, _ = sdk_configuration._import_exporters(
        sdk_configuration._get_exporter_names("traces") if tracer_missing else [],
        sdk_configuration._get_exporter_names("metrics") if meter_missing else [],
        [],
    )
    resource = Resource.create({})
    if tracer_missing:
        sampler = sdk_configuration._import_sampler(sdk_configuration._get_sampler())
        sdk_configuration._init_tracing(span_exporters, sampler=sampler, resource=resource)
    # Ours even on a provider someone else set: the variable says where spans go.
    if os.getpid() not in _spans_file_pids:
        add_spans_file_processor()
    if meter_missing:
        sdk_configuration._init_metrics(metric_exporters, resource=resource)


def _load_missing_instrumentors(distro: Any) -> None:
    """``opentelemetry-instrument``'s loading loop, skipping instrumentors that are
    loaded already (instrumentors are singletons: a second ``instrument()`` only
    warns)."""
    disabled = {
        name.strip()
        for name in os.environ.get(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS, "").split(",")
        if name.strip()
    }
    if "*" in disabled:
        return
    for entry_point in entry_points(group="opentelemetry_pre_instrument"):
        entry_point.load()()
    for entry_point in entry_points(group="opentelemetry_instrumentor"):
        if entry_point.name in disabled:
            continue
        try:
            dist = getattr(entry_point, "dist", None)
            if dist is not None and get_dist_dependency_conflicts(dist) is not None:
                continue
            instrumentor = entry_point.load()()
            if getattr(instrumentor, "is_instrumented_by_opentelemetry", False):
                continue
            distro.load_instrumentor(entry_point, skip_dep_check=True)
        except (DependencyConflictError, ImportError) as exc:
            _logger.debug("otel-inference: skipping instrumentor %s: %s", entry_point.name, exc)
        except Exception:
            _logger.exception("otel-inference: instrumenting %s failed", entry_point.name)
    for entry_point in entry_points(group="opentelemetry_post_instrument"):
        entry_point.load()()


def exporter_span_processors() -> list[Any]:
    """A ``BatchSpanProcessor`` per ``OTEL_TRACES_EXPORTER`` exporter, plus one for
    ``OTEL_INFERENCE_SPANS_FILE``: for frameworks that build their own tracer
    provider from a list of processors (Ray Serve's tracing). Never raises: a
    bad exporter or file is logged and left out."""
    from opentelemetry.sdk import _configuration as sdk_configuration
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from otel_inference.config import ConfigurationError
    from otel_inference.distro import spans_file

    processors: list[Any] = []
    try:
        span_exporters, _, _ = sdk_configuration._import_exporters(
            sdk_configuration._get_exporter_names("traces"), [], []
        )
        processors.extend(BatchSpanProcessor(exporter()) for exporter in span_exporters.values())
    except Exception:
        _logger.exception("otel-inference: cannot build the OTEL_TRACES_EXPORTER exporters")
    try:
        path = spans_file()
        if path is not None:
            from opentelemetry.exporter.otlp.json.file import FileSpanExporter

            processors.append(BatchSpanProcessor(FileSpanExporter(path)))
            _spans_file_pids.add(os.getpid())
    except (ConfigurationError, OSError, ImportError) as exc:
        _logger.error("otel-inference: %s; continuing without it", exc)
    return processors
