"""The Prometheus endpoint of OTEL_METRICS_EXPORTER=prometheus (issue 21): a port in
use is one logged line naming the variable, never an exception; a range of ports
gives each process its own; under opentelemetry-instrument the configurator serves
``prometheus`` with this reader and the rest of the SDK is set up regardless."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider

from otel_inference.config import ConfigurationError, prometheus_ports
from otel_inference.prometheus import PrometheusEndpointReader, prometheus_base_port
from tests.instrumented import OPENTELEMETRY_INSTRUMENT, prometheus_env
from tests.servers import LOCALHOST, free_port

APP = Path(__file__).resolve().parent / "apps" / "staged_app.py"


@pytest.fixture
def readers():
    made = []

    def make(monkeypatch, port: int | str, ports: str | None = None) -> PrometheusEndpointReader:
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", LOCALHOST)
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
        if ports is None:
            monkeypatch.delenv("OTEL_INFERENCE_PROMETHEUS_PORTS", raising=False)
        else:
            monkeypatch.setenv("OTEL_INFERENCE_PROMETHEUS_PORTS", ports)
        reader = PrometheusEndpointReader()
        reader.provider = MeterProvider(metric_readers=[reader])
        made.append(reader.provider)
        return reader

    yield make
    for provider in made:
        provider.shutdown()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_serves_its_provider_on_the_base_port(readers, monkeypatch):
    port = free_port()
    reader = readers(monkeypatch, port)
    assert reader.port == port
    reader.provider.get_meter("t").create_counter("things").add(3)
    (line,) = [line for line in scrape(port).splitlines() if line.startswith("things_total{")]
    assert line.endswith(" 3.0")


def test_port_in_use_is_one_line_naming_the_variable(readers, monkeypatch, caplog):
    with socket.socket() as busy:
        busy.bind((LOCALHOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="otel_inference.prometheus"):
            reader = readers(monkeypatch, port)  # never raises
    assert reader.port is None
    (record,) = caplog.records
    assert f"OTEL_EXPORTER_PROMETHEUS_PORT={port} is already in use" in record.getMessage()
    assert "OTEL_INFERENCE_PROMETHEUS_PORTS" in record.getMessage()
    assert record.exc_info is None


def test_a_range_gives_each_reader_the_next_free_port(readers, monkeypatch, caplog):
    base = free_port()
    first = readers(monkeypatch, base, "2")
    # The parent took the base port; the next process takes the next one.
    with socket.socket() as probe:
        try:
            probe.bind((LOCALHOST, base + 1))
        except OSError:
            pytest.skip(f"port {base + 1} is taken on this machine")
    second = readers(monkeypatch, base, "2")
    assert (first.port, second.port) == (base, base + 1)
    with caplog.at_level(logging.ERROR, logger="otel_inference.prometheus"):
        third = readers(monkeypatch, base, "2")
    assert third.port is None
    assert f"every Prometheus port {base}-{base + 1}" in caplog.text


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1025", "1.5"])
def test_bad_port_counts_are_rejected(raw):
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_PROMETHEUS_PORTS"):
        prometheus_ports({"OTEL_INFERENCE_PROMETHEUS_PORTS": raw})


def test_default_is_the_base_port_only():
    assert prometheus_ports({}) == 1
    assert prometheus_ports({"OTEL_INFERENCE_PROMETHEUS_PORTS": " 3 "}) == 3


@pytest.mark.e2e
def test_instrumented_app_with_its_port_taken_still_traces(tmp_path):
    """The app of the issue, single process: its port is taken, yet it runs with
    its spans (console) and instrumentors, and says why there are no metrics."""
    with socket.socket() as busy:
        busy.bind((LOCALHOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = prometheus_env(port, OTEL_TRACES_EXPORTER="console")
        completed = subprocess.run(
            [OPENTELEMETRY_INSTRUMENT, sys.executable, str(APP)],
            input="",
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
            check=False,
        )
    assert completed.returncode == 0, completed.stderr
    # The app's own line (its observed durations) among the console spans.
    (observed,) = [line for line in completed.stdout.splitlines() if line.startswith('{"tokenize"')]
    assert len(json.loads(observed)["model_forward"]) == 100
    assert '"name": "model_forward"' in completed.stdout  # spans were exported
    assert "Traceback" not in completed.stderr, completed.stderr
    mentions = [line for line in completed.stderr.splitlines() if "already in use" in line]
    assert len(mentions) == 1 and f"OTEL_EXPORTER_PROMETHEUS_PORT={port}" in mentions[0]


@pytest.mark.parametrize("raw", ["http", "0", "70000"])
def test_a_bad_base_port_is_one_line_not_an_exception(readers, monkeypatch, caplog, raw):
    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_PROMETHEUS_PORT"):
        prometheus_base_port({"OTEL_EXPORTER_PROMETHEUS_PORT": raw})
    with caplog.at_level(logging.ERROR, logger="otel_inference.prometheus"):
        reader = readers(monkeypatch, raw)
    assert reader.port is None
    (record,) = caplog.records
    assert f"OTEL_EXPORTER_PROMETHEUS_PORT={raw!r}" in record.getMessage()
