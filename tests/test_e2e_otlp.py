"""End to end over OTLP/gRPC: what opentelemetry-instrument actually sends.

Traces are sampled; stage histograms cover 100% of requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import instrumented
from tests.instrumented import otlp_env
from tests.otlp_receiver import attributes_of
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "staged_app.py"


def test_sampled_spans_and_all_request_histograms_over_otlp(otlp_receiver):
    env = otlp_env(
        otlp_receiver.endpoint,
        OTEL_SERVICE_NAME="e2e-otlp-app",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.3",
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        # One series per stage (no cold-start label) keeps the count check simple.
        OTEL_INFERENCE_COLD_START_REQUESTS="0",
    )
    # Defaults from our distro: OTLP for traces and metrics, no exporter variables set.
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.pop("OTEL_METRICS_EXPORTER", None)
    process = instrumented.start(APP, env)
    json.loads(process.stdout.readline())
    process.stdin.close()  # the app exits; the SDK flushes on shutdown
    assert process.wait(timeout=60) == 0, process.stderr.read()

    def exported_all_requests():
        points = [
            point
            for metric in otlp_receiver.metrics("inference.stage.duration")
            for point in metric.histogram.data_points
            if attributes_of(point.attributes).get("inference.stage") == "tokenize"
        ]
        return points and max(point.count for point in points) == 100

    wait_until(exported_all_requests, 20, "the tokenize histogram over OTLP")

    spans = otlp_receiver.spans()
    requests = [s for s in spans if s.name == "inference.request"]
    stages = [s for s in spans if s.name in ("tokenize", "model_forward")]
    # ~30% of 100 requests sampled: a sample, not all and not none.
    assert 5 <= len(requests) <= 60
    assert len(stages) == 2 * len(requests)
    request_ids = {(s.trace_id, s.span_id) for s in requests}
    for span in stages:
        assert (span.trace_id, span.parent_span_id) in request_ids
        assert attributes_of(span.attributes)["inference.stage"] == span.name
    # The histogram went over the wire in seconds.
    (metric, *_) = otlp_receiver.metrics("inference.stage.duration")
    assert metric.unit == "s"
