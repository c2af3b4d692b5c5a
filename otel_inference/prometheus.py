"""The Prometheus scrape endpoint of ``OTEL_METRICS_EXPORTER=prometheus``, for one
process or several (pre-fork and multi-process servers).

Under ``opentelemetry-instrument`` our configurator serves ``prometheus`` with
:class:`PrometheusEndpointReader` instead of the exporter package's own reader,
which raises when its port is taken and so takes every other signal down with
it (the SDK's configuration fails as a whole). Here:

* a port already in use is one ERROR line naming
  ``OTEL_EXPORTER_PROMETHEUS_PORT`` and the remedy; the process keeps its
  traces, its other exporters and its instrumentors, only its metrics are not
  served;
* :envvar:`OTEL_INFERENCE_PROMETHEUS_PORTS` ``=N`` lets each process take the
  first free port of ``PORT .. PORT+N-1``: one endpoint per worker of
  ``uvicorn --workers`` or gunicorn (the server's own parent process takes the
  first), each serving only its own measurements; scrape the whole range
  (``docs/workers.md``);
* in a forked child (gunicorn workers, ``--preload``) the endpoint is served
  again, on the child's own port: the parent's server thread does not survive
  the fork, and its port belongs to the parent.

Usage (what the configurator does for ``OTEL_METRICS_EXPORTER=prometheus``)::

    from opentelemetry.sdk.metrics import MeterProvider
    from otel_inference.prometheus import PrometheusEndpointReader

    reader = PrometheusEndpointReader()   # OTEL_EXPORTER_PROMETHEUS_HOST/PORT
    provider = MeterProvider(metric_readers=[reader])
    print(reader.port)                    # None when no port could be had
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_PROMETHEUS_HOST,
    OTEL_EXPORTER_PROMETHEUS_PORT,
)
from prometheus_client import start_http_server

from otel_inference._fork import after_fork_in_child
from otel_inference.config import ConfigurationError, prometheus_ports
from otel_inference.environment_variables import OTEL_INFERENCE_PROMETHEUS_PORTS
from otel_inference.stages import log_once

_logger = logging.getLogger(__name__)

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 9464
# The entry point (group opentelemetry_metrics_exporter) our configurator uses
# in place of the exporter package's ``prometheus``.
ENTRY_POINT = "otel_inference_prometheus"


def prometheus_base_port(environ: Mapping[str, str] | None = None) -> int:
    """``OTEL_EXPORTER_PROMETHEUS_PORT`` (default 9464), checked."""
    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_EXPORTER_PROMETHEUS_PORT, "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigurationError(
            f"{OTEL_EXPORTER_PROMETHEUS_PORT}={raw!r} is not a TCP port (1 to 65535)"
        )
    return int(raw)


class PrometheusEndpointReader(PrometheusMetricReader):
    """A ``PrometheusMetricReader`` that serves its own HTTP endpoint and never
    raises over it (see the module docstring). ``port`` is the port served, or
    ``None``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port: int | None = None
        self._server: Any = None
        self._serve()
        after_fork_in_child(self._after_fork_in_child)

    def _serve(self) -> None:
        if _multiprocessing_helper():
            return  # runs no application code: leave the ports to the workers
        try:
            base = prometheus_base_port()
        except ConfigurationError as exc:
            _log_error("otel-inference: %s; metrics are not served", exc)
            return
        try:
            count = prometheus_ports()
        except ConfigurationError as exc:
            # The distro's startup check logs the same line once: the base port only.
            log_once(
                "prometheus-ports-env",
                "otel-inference: %s; continuing without it",
                exc,
                level=logging.ERROR,
                exc_info=False,
            )
            count = 1
        host = os.environ.get(OTEL_EXPORTER_PROMETHEUS_HOST, "").strip() or DEFAULT_HOST
        last = min(base + count, 65536)
        for port in range(base, last):
            try:
                served = start_http_server(port=port, addr=host)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                _log_error(
                    "otel-inference: cannot serve Prometheus metrics on %s:%d "
                    "(OTEL_EXPORTER_PROMETHEUS_HOST/PORT): %s; metrics are not served, "
                    "traces and other exporters continue",
                    host,
                    port,
                    exc,
                )
                return
            # prometheus_client >= 0.16 returns (server, thread).
            self._server = served[0] if isinstance(served, tuple) else None
            self.port = port
            _logger.debug(
                "otel-inference: Prometheus metrics on %s:%d (pid %d)", host, port, os.getpid()
            )
            return
        if count == 1:
            _log_error(
                "otel-inference: %s=%d is already in use on %s (another process, or the "
                "parent process of this server's workers, serves it): this process's metrics "
                "are not served; traces, other exporters and instrumentors continue. With "
                "several workers set %s to the number of processes (one port each, from %d "
                "up) or export OTLP to the collector: see docs/workers.md",
                OTEL_EXPORTER_PROMETHEUS_PORT,
                base,
                host,
                OTEL_INFERENCE_PROMETHEUS_PORTS,
                base,
            )
        else:
            _log_error(
                "otel-inference: every Prometheus port %d-%d (%s=%d, %s=%d) is in use on %s: "
                "this process's metrics are not served; traces, other exporters and "
                "instrumentors continue. Raise %s to the number of processes (workers + 1)",
                base,
                last - 1,
                OTEL_EXPORTER_PROMETHEUS_PORT,
                base,
                OTEL_INFERENCE_PROMETHEUS_PORTS,
                count,
                host,
                OTEL_INFERENCE_PROMETHEUS_PORTS,
            )

    def _after_fork_in_child(self) -> None:
        server, self._server, self.port = self._server, None, None
        if server is not None:
            # The parent's listening socket: the parent keeps serving it.
            with contextlib.suppress(OSError):
                server.socket.close()
        self._serve()

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        super().shutdown(timeout_millis=timeout_millis, **kwargs)


# Python processes that multiprocessing starts for itself (spawn start method:
# uvicorn --workers). opentelemetry-instrument's sitecustomize runs in them too.
_HELPER_MODULES = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _multiprocessing_helper() -> bool:
    command = " ".join(getattr(sys, "orig_argv", ()))
    return any(module in command for module in _HELPER_MODULES)


def _log_error(message: str, *args: object) -> None:
    # One line, no traceback: a configuration problem, and the message says it all.
    _logger.error(message, *args)
