"""Run a test app under the real ``opentelemetry-instrument`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.servers import LOCALHOST, PrometheusServer, free_port

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


@contextmanager
def scraped(
    prometheus: PrometheusServer, app: Path, labels: dict[str, str], **variables: str
) -> Iterator[Any]:
    """Run ``app`` with a Prometheus endpoint that ``prometheus`` scrapes (target
    ``labels``); yields the JSON the app prints first, stops it on exit."""
    port = free_port()
    process = start(app, prometheus_env(port, **variables))
    try:
        first_line = json.loads(process.stdout.readline())
        prometheus.set_targets([f"{LOCALHOST}:{port}"], labels)
        yield first_line
    finally:
        prometheus.set_targets([])
        process.stdin.close()
        process.wait(timeout=30)
        assert process.returncode == 0, process.stderr.read()


def bucket_of(value: float, bounds: tuple[float, ...]) -> int:
    """Index of the histogram bucket holding ``value``."""
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))
