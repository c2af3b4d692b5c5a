"""Issue 11 under the real opentelemetry-instrument: downstream, GC pauses, cold start over OTLP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.instrumented import OPENTELEMETRY_INSTRUMENT, otlp_env
from tests.otlp_receiver import attributes_of
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "tail_culprits_app.py"


def test_tail_culprits_under_opentelemetry_instrument(otlp_receiver):
    env = otlp_env(
        otlp_receiver.endpoint,
        OTEL_SERVICE_NAME="e2e-tail-culprits",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_INFERENCE_COLD_START_REQUESTS="2",
    )
    completed = subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, sys.executable, str(APP)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    def downstream_points():
        return [
            point
            for metric in otlp_receiver.metrics("inference.stage.duration")
            for point in metric.histogram.data_points
            if attributes_of(point.attributes).get("inference.stage") == "downstream"
        ]

    points = wait_until(downstream_points, 20, "downstream stage histogram over OTLP")
    assert sum(point.count for point in points) == 5
    assert {attributes_of(p.attributes)["inference.stage.parent"] for p in points} == {
        "feature_hydration"
    }

    spans = otlp_receiver.spans()
    clients = [
        s for s in spans if attributes_of(s.attributes).get("inference.stage") == "downstream"
    ]
    assert len(clients) == 5  # contrib's own CLIENT spans, tagged: no second span
    embeds = sorted((s for s in spans if s.name == "embed"), key=lambda s: s.start_time_unix_nano)
    assert [bool(attributes_of(s.attributes).get("inference.cold_start")) for s in embeds] == [
        True,
        True,
        False,
        False,
        False,
    ]
    last = attributes_of(embeds[-1].attributes)
    assert last["inference.gc.pause.count"] >= 1
    assert any(event.name == "gc.pause" for event in embeds[-1].events)
    assert otlp_receiver.metrics("inference.runtime.gc.pause")
