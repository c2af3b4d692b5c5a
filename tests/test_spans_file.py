"""OTEL_INFERENCE_SPANS_FILE: every span also written to a local OTLP JSON Lines file.

The file is what ``FileSpanExporter`` (opentelemetry-exporter-otlp-json-file)
writes, one ExportTraceServiceRequest per line, and what ``otel-inference report
--spans`` reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from otel_inference.distro import add_spans_file_processor, spans_file, validate_environment
from otel_inference.environment_variables import OTEL_INFERENCE_SPANS_FILE
from tests.instrumented import OPENTELEMETRY_INSTRUMENT

APP = Path(__file__).resolve().parent / "apps" / "staged_app.py"


def _require_exporter() -> None:
    try:
        import opentelemetry.exporter.otlp.json.file  # noqa: F401
    except ImportError:
        message = "opentelemetry-exporter-otlp-json-file is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def read_spans(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(spans with flattened ``attrs``, resources) of an OTLP JSON Lines file."""
    spans, resources = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        request = json.loads(line)  # every line is one whole JSON document
        for resource_spans in request["resourceSpans"]:
            resources.append(resource_spans["resource"])
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    span["attrs"] = {
                        a["key"]: next(iter(a["value"].values()))
                        for a in span.get("attributes", [])
                    }
                    span["scope"] = scope_spans["scope"]["name"]
                    spans.append(span)
    return spans, resources


def duration_s(span: dict[str, Any]) -> float:
    return (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e9


def run_app(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "OTEL_SERVICE_NAME": "spans-file-app",
        "OTEL_TRACES_EXPORTER": "none",  # the file is the only destination
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_INFERENCE_COLD_START_REQUESTS": "0",
        **env,
    }
    return subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, *flags, sys.executable, str(APP)],
        input="",  # the app exits when stdin closes; the SDK flushes at exit
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["env", "flag"])
def test_instrumented_app_writes_our_stage_spans_as_otlp_json_lines(tmp_path, how):
    _require_exporter()
    path = tmp_path / "spans.jsonl"
    if how == "env":
        completed = run_app({OTEL_INFERENCE_SPANS_FILE: str(path)})
    else:
        completed = run_app({}, "--inference_spans_file", str(path))
    assert completed.returncode == 0, completed.stderr
    observed = json.loads(completed.stdout.splitlines()[0])

    spans, resources = read_spans(path)
    assert {
        a["key"]: a["value"]["stringValue"]
        for r in resources
        for a in r["attributes"]
        if a["key"] == "service.name"
    } == {"service.name": "spans-file-app"}
    requests = {s["spanId"]: s for s in spans if s["name"] == "inference.request"}
    assert len(requests) == 100  # every request sampled (default sampler), none dropped
    for name in ("tokenize", "model_forward"):
        stages = sorted(
            (s for s in spans if s["name"] == name), key=lambda s: int(s["startTimeUnixNano"])
        )
        assert len(stages) == 100
        for span, seen in zip(stages, observed[name], strict=True):
            assert span["scope"] == "otel_inference"
            assert span["attrs"]["inference.stage"] == name
            parent = requests[span["parentSpanId"]]
            assert parent["traceId"] == span["traceId"]
            # The app timed each stage from outside: the span is the inner interval.
            assert 0 < duration_s(span) <= seen + 1e-6
    # model_forward sleeps 10 ms: no span may be shorter than its sleep.
    assert min(duration_s(s) for s in spans if s["name"] == "model_forward") >= 0.010


@pytest.mark.e2e
def test_a_bad_spans_file_is_logged_and_the_app_still_runs(tmp_path):
    path = tmp_path / "no-such-dir" / "spans.jsonl"
    completed = run_app({OTEL_INFERENCE_SPANS_FILE: str(path)})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[0])["tokenize"]  # it served
    assert "OTEL_INFERENCE_SPANS_FILE" in completed.stderr
    assert "does not exist" in completed.stderr
    assert not path.parent.exists()


def test_unset_or_blank_means_no_file(monkeypatch):
    monkeypatch.delenv(OTEL_INFERENCE_SPANS_FILE, raising=False)
    assert spans_file() is None
    monkeypatch.setenv(OTEL_INFERENCE_SPANS_FILE, "  ")
    assert spans_file() is None
    provider = TracerProvider()
    assert add_spans_file_processor(provider) is None
    provider.shutdown()


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "missing" / "spans.jsonl", "does not exist"),
    ],
)
def test_bad_paths_are_rejected_with_the_variable_named(monkeypatch, tmp_path, make_path, message):
    monkeypatch.setenv(OTEL_INFERENCE_SPANS_FILE, str(make_path(tmp_path)))
    problems = [p for p in validate_environment() if OTEL_INFERENCE_SPANS_FILE in p]
    assert len(problems) == 1 and message in problems[0]
    provider = TracerProvider()
    assert add_spans_file_processor(provider) is None  # logged, never raised
    provider.shutdown()


def test_unwritable_path_is_rejected(monkeypatch, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv(OTEL_INFERENCE_SPANS_FILE, str(locked / "spans.jsonl"))
    with pytest.raises(Exception, match="not writable"):
        spans_file()


def test_processor_added_to_a_provider_writes_its_spans(monkeypatch, tmp_path):
    _require_exporter()
    path = tmp_path / "spans.jsonl"
    path.write_text("")  # appended to, never truncated
    monkeypatch.setenv(OTEL_INFERENCE_SPANS_FILE, str(path))
    provider = TracerProvider()
    assert add_spans_file_processor(provider) == path
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer"):
        with tracer.start_as_current_span("inner", attributes={"inference.stage": "tokenize"}):
            pass
    provider.shutdown()  # flushes the BatchSpanProcessor
    spans, _ = read_spans(path)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"outer", "inner"}
    assert by_name["inner"]["parentSpanId"] == by_name["outer"]["spanId"]
    assert by_name["inner"]["attrs"] == {"inference.stage": "tokenize"}
