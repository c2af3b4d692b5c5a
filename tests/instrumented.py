"""Run a test app under the real ``opentelemetry-instrument`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import LOCALHOST

OPENTELEMETRY_INSTRUMENT = str(Path(sys.executable).parent / "opentelemetry-instrument")


def prometheus_env(port: int, **variables: str) -> dict[str, str]:
    """Environment for metrics on a Prometheus scrape endpoint, no traces or logs."""
    return {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": LOCALHOST,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
        **variables,
    }


def otlp_env(endpoint: str, **variables: str) -> dict[str, str]:
    """Environment for traces and metrics over OTLP/gRPC to ``endpoint``, no logs."""
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_LOGS_EXPORTER": "none",
        **variables,
    }
    return env


def start(app: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``app`` instrumented; its stdin/stdout/stderr are text pipes."""
    return subprocess.Popen(
        [OPENTELEMETRY_INSTRUMENT, sys.executable, str(app)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
