"""otel_inference.auto.start(): the programmatic start for processes that
opentelemetry-instrument cannot wrap (framework workers, forked or spawned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.instrumented import OPENTELEMETRY_INSTRUMENT
from tests.test_spans_file import read_spans

APP = Path(__file__).resolve().parent / "apps" / "auto_start_app.py"
ALREADY = "telemetry already configured"


def run(scenario: str, spans: Path, *, instrument: bool = False) -> tuple[dict, str]:
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": "auto-start",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_INFERENCE_SPANS_FILE": str(spans),
    }
    command = [sys.executable, str(APP), scenario]
    if instrument:
        command.insert(0, OPENTELEMETRY_INSTRUMENT)
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return {line["role"]: line for line in lines}, completed.stderr


def probes(path: Path) -> dict[str, int]:
    """role -> pid of every exported ``auto_probe`` span."""
    spans, _ = read_spans(path)
    return {
        span["attrs"]["probe.role"]: int(span["attrs"]["probe.pid"])
        for span in spans
        if span["name"] == "auto_probe"
    }


@pytest.fixture(autouse=True)
def _require_exporter():
    pytest.importorskip("opentelemetry.exporter.otlp.json.file")


def test_start_configures_once_and_loads_every_instrumentor(tmp_path):
    roles, stderr = run("plain", tmp_path / "spans.jsonl")
    main = roles["main"]
    assert main["results"] == [True, False]  # the second call is a no-op
    assert main["tracer_provider"] == "TracerProvider"
    assert main["meter_provider"] == "MeterProvider"
    assert main["queues_instrumented"] is True
    assert main["configured_by"] == "otel_inference.auto.start()"
    assert ALREADY not in stderr  # our own second call is not "someone else's" setup
    assert probes(tmp_path / "spans.jsonl") == {"main": main["pid"]}


def test_forked_worker_keeps_the_parents_setup_and_exports(tmp_path):
    roles, stderr = run("fork", tmp_path / "spans.jsonl")
    forked, main = roles["forked"], roles["main"]
    assert forked["pid"] != main["pid"]
    assert forked["results"] == [False, False]
    assert forked["queues_instrumented"] is True
    assert stderr.count(ALREADY) == 1  # one line, from the child, once
    assert f"parent process {main['pid']}" in stderr
    assert probes(tmp_path / "spans.jsonl") == {"forked": forked["pid"], "main": main["pid"]}


def test_spawned_worker_starts_its_own(tmp_path):
    roles, stderr = run("spawn", tmp_path / "spans.jsonl")
    spawned = roles["spawned"]
    assert spawned["results"] == [True]
    assert spawned["queues_instrumented"] is True
    assert ALREADY not in stderr
    assert probes(tmp_path / "spans.jsonl") == {
        "spawned": spawned["pid"],
        "main": roles["main"]["pid"],
    }


def test_under_opentelemetry_instrument_start_logs_one_line_per_process(tmp_path):
    roles, stderr = run("spawn", tmp_path / "spans.jsonl", instrument=True)
    assert roles["main"]["results"] == [False, False]
    assert roles["spawned"]["results"] == [False]  # spawned workers inherit the wrapper
    assert stderr.count(ALREADY) == 2  # main and spawned worker, once each
    assert "(by opentelemetry-instrument)" in stderr
    assert set(probes(tmp_path / "spans.jsonl")) == {"main", "spawned"}


def test_provider_set_by_the_application_is_kept_and_completed(tmp_path):
    roles, stderr = run("user_provider", tmp_path / "spans.jsonl")
    main = roles["main"]
    assert main["results"] == [False, False]
    assert stderr.count(ALREADY) == 1
    assert "which set a tracer provider opentelemetry.sdk.trace.TracerProvider" in stderr
    # Metrics, which nobody had set up, come from the environment; instrumentors load.
    assert main["meter_provider"] == "MeterProvider"
    assert main["queues_instrumented"] is True
    assert probes(tmp_path / "spans.jsonl") == {"main": main["pid"]}
