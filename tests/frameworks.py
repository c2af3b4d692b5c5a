"""Shared by the serving-framework tests (Ray Serve, LitServe): run a driver
script that starts the framework for real on 127.0.0.1, and read what its
workers exported (spans to an OTLP JSON Lines file, metrics over OTLP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.otlp_receiver import OtlpReceiver, attributes_of
from tests.servers import free_port
from tests.test_spans_file import read_spans

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def framework_env(receiver_endpoint: str, spans: Path, **variables: str) -> dict[str, str]:
    """Traces to ``spans`` only, metrics over OTLP every 500 ms, the model offline."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "OTEL_SERVICE_NAME": "framework-embedder",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_INFERENCE_SPANS_FILE": str(spans),
        "OTEL_INFERENCE_COLD_START_REQUESTS": "0",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel,process",  # process.pid per worker
        **variables,
    }


def run_driver(script: str, env: dict[str, str], requests: int, timeout: float) -> dict[str, Any]:
    """Run ``tests/apps/<script>`` (it starts and stops the framework); its last
    stdout line that is a JSON object is the result."""
    completed = subprocess.run(
        [sys.executable, str(APPS / script), str(free_port()), str(requests)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert lines, completed.stderr[-4000:]
    return {**json.loads(lines[-1]), "stderr": completed.stderr}


def stage_counts_by_process(
    receiver: Any, metric: str = "inference.stage.duration"
) -> dict[str, Counter[str]]:
    """Per exporting process (``process.pid``), the count of each ``parent/stage``
    series (``stage`` at top level), from that process's latest cumulative export."""
    latest: dict[str, Any] = {}
    with receiver._lock:
        requests = list(receiver.metric_requests)
    for request in requests:
        for resource_metrics in request.resource_metrics:
            resource = attributes_of(resource_metrics.resource.attributes)
            process = str(resource.get("process.pid"))
            for scope_metrics in resource_metrics.scope_metrics:
                for found in scope_metrics.metrics:
                    if found.name == metric:
                        latest[process] = found  # later exports are cumulative
    result: dict[str, Counter[str]] = {}
    for process, found in latest.items():
        counts: Counter[str] = Counter()
        for point in found.histogram.data_points:
            attributes = attributes_of(point.attributes)
            key = attributes["inference.stage"]
            if attributes.get("inference.stage.parent"):
                key = f"{attributes['inference.stage.parent']}/{key}"
            counts[key] += point.count
        result[process] = counts
    return result


def stage_counts(receiver: Any, metric: str = "inference.stage.duration") -> Counter[str]:
    """:func:`stage_counts_by_process` summed over the processes."""
    return sum(stage_counts_by_process(receiver, metric).values(), Counter())


def close(a: list[float], b: list[float], tolerance: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def serve_and_collect(
    script: str, workdir: Path, requests: int, **variables: str
) -> dict[str, Any]:
    """Run the driver ``script`` with an OTLP receiver for metrics and a span file;
    return its result with ``spans``, ``stages`` (counts summed over processes),
    ``workers`` (per process) and ``costs`` (``inference.stage.cost`` counts)."""
    spans_file = workdir / "spans.jsonl"
    receiver = OtlpReceiver().start()
    try:
        env = framework_env(receiver.endpoint, spans_file, **variables)
        result = run_driver(script, env, requests, timeout=300)
        spans, _ = read_spans(spans_file)
        return {
            **result,
            "spans": spans,
            "stages": stage_counts(receiver),
            "workers": stage_counts_by_process(receiver),
            "costs": stage_counts(receiver, "inference.stage.cost"),
        }
    finally:
        receiver.stop()


def assert_outputs_match_baseline(served: dict[str, Any], requests: int) -> None:
    """The baseline is the same model code run by the driver, with no framework and
    no instrumentation, one text at a time."""
    assert served["sequential"] == served["baseline"]  # batches of one: bit for bit
    assert len(served["concurrent"]) == requests
    for ours, theirs in zip(served["concurrent"], served["baseline"], strict=True):
        assert close(ours, theirs)  # batched: padding and batch shape move the last bits


def instrumentation_problems(stderr: str) -> list[str]:
    """Lines where otel-inference reported a failure of its own (never expected)."""
    return [
        line
        for line in stderr.splitlines()
        if "otel-inference" in line and any(word in line for word in ("fail", "cannot"))
    ]
