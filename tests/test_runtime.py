"""Tail culprits outside the stages: GC pauses, downstream calls, cold start (issue 11)."""

from __future__ import annotations

import gc
import http.server
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from opentelemetry.instrumentation.requests import RequestsInstrumentor

from otel_inference import ConfigurationError, request, stage
from otel_inference.downstream import enable_downstream
from otel_inference.instrumentation.runtime import RuntimeInstrumentor
from otel_inference.runtime import COLD_START, gc_monitor, mark_warm
from tests.servers import LOCALHOST

SLOW_RESPONSE_S = 0.02


@pytest.fixture
def runtime(telemetry) -> Iterator[None]:
    RuntimeInstrumentor().instrument(cold_start_requests=0)
    yield
    RuntimeInstrumentor().uninstrument()


def gc_pause_points(telemetry):
    return {
        point.attributes["cpython.gc.generation"]: point
        for point in telemetry.metric_points("inference.runtime.gc.pause")
    }


def test_forced_collection_appears_on_the_request_and_in_the_histogram(telemetry, runtime):
    garbage = [[index] for index in range(20_000)]  # something for gen 2 to walk
    with request("embed"):
        with stage("model_forward"):
            gc.collect()
    del garbage

    (span,) = telemetry.spans("embed")
    assert span.attributes["inference.gc.pause.count"] >= 1
    assert span.attributes["inference.gc.pause.duration"] > 0
    events = [e for e in span.events if e.name == "gc.pause"]
    assert any(e.attributes["cpython.gc.generation"] == 2 for e in events)
    gen2 = next(e for e in events if e.attributes["cpython.gc.generation"] == 2)
    assert span.start_time <= gen2.timestamp <= span.end_time
    assert gc_pause_points(telemetry)[2].count >= 1


def test_unsampled_requests_still_feed_the_histogram(unsampled_telemetry):
    RuntimeInstrumentor().instrument(cold_start_requests=0)
    try:
        with request():
            gc.collect()
    finally:
        RuntimeInstrumentor().uninstrument()
    assert unsampled_telemetry.spans() == []
    assert gc_pause_points(unsampled_telemetry)[2].count >= 1


def test_pauses_outside_requests_touch_no_request(telemetry, runtime):
    gc.collect()
    with request("later"):
        pass
    (span,) = telemetry.spans("later")
    assert "inference.gc.pause.count" not in span.attributes
    assert not gc_monitor().in_flight


def test_uninstrument_removes_the_callback(telemetry):
    RuntimeInstrumentor().instrument(cold_start_requests=0)
    callbacks = len(gc.callbacks)
    RuntimeInstrumentor().uninstrument()
    assert len(gc.callbacks) == callbacks - 1
    assert not gc_monitor().started


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(SLOW_RESPONSE_S)
        body = b'{"features": [1, 2, 3]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def feature_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((LOCALHOST, 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOCALHOST}:{server.server_address[1]}/features"
    server.shutdown()
    server.server_close()


@pytest.fixture
def instrumented_requests(telemetry) -> Iterator[None]:
    enable_downstream(telemetry.tracer_provider)
    RequestsInstrumentor().instrument(tracer_provider=telemetry.tracer_provider)
    yield
    RequestsInstrumentor().uninstrument()


def test_http_client_call_is_a_downstream_stage(telemetry, instrumented_requests, feature_service):
    with request("embed"):
        with stage("feature_hydration"):
            response = requests.get(feature_service, timeout=5)
    assert response.json() == {"features": [1, 2, 3]}  # the app's result is untouched

    (client,) = [s for s in telemetry.spans() if s.kind.name == "CLIENT"]
    assert client.attributes["inference.stage"] == "downstream"
    assert client.attributes["inference.stage.parent"] == "feature_hydration"
    (hydration,) = telemetry.spans("feature_hydration")
    assert client.parent.span_id == hydration.context.span_id
    point = telemetry.stage_points()["feature_hydration/downstream"]
    assert point.count == 1
    assert point.sum >= SLOW_RESPONSE_S


def test_downstream_is_recorded_for_unsampled_requests(unsampled_telemetry, feature_service):
    enable_downstream(unsampled_telemetry.tracer_provider)
    RequestsInstrumentor().instrument(tracer_provider=unsampled_telemetry.tracer_provider)
    try:
        with request():
            requests.get(feature_service, timeout=5)
    finally:
        RequestsInstrumentor().uninstrument()
    assert unsampled_telemetry.spans() == []
    points = unsampled_telemetry.stage_points()
    assert points["downstream"].count == 1
    assert points["downstream"].sum >= SLOW_RESPONSE_S
    # A top-level downstream call covers request time: it is not "unattributed".
    assert points["unattributed"].sum < points["request"].sum - SLOW_RESPONSE_S / 2


def test_first_requests_are_flagged_cold(telemetry):
    COLD_START.reset(2)
    with stage("model_load"):  # before any request: cold
        pass
    for _ in range(4):
        with request("embed"), stage("model_forward"):
            pass
    cold = [bool(s.attributes.get("inference.cold_start")) for s in telemetry.spans("embed")]
    assert cold == [True, True, False, False]
    assert telemetry.spans("model_load")[0].attributes["inference.cold_start"] is True
    forward = {
        bool(p.attributes.get("inference.cold_start")): p.count
        for p in telemetry.metric_points("inference.stage.duration")
        if p.attributes["inference.stage"] == "model_forward"
    }
    assert forward == {True: 2, False: 2}


def test_zero_code_requests_are_counted_by_trace(telemetry):
    COLD_START.reset(1)
    tracer = telemetry.tracer_provider.get_tracer("web")
    for _ in range(2):
        with tracer.start_as_current_span("GET /embed"):
            with stage("tokenize"):
                pass
            with stage("model_forward"):  # same trace: not a new request
                pass
    flags = [
        bool(s.attributes.get("inference.cold_start"))
        for s in telemetry.spans()
        if "inference.stage" in s.attributes
    ]
    assert flags == [True, True, False, False]


def test_mark_warm_ends_the_window_and_can_freeze(telemetry):
    RuntimeInstrumentor().instrument(cold_start_requests=100, gc_freeze=True)
    try:
        frozen_before = gc.get_freeze_count()
        with request("embed"):
            pass
        mark_warm()
        with request("embed"):
            pass
        assert [
            bool(s.attributes.get("inference.cold_start")) for s in telemetry.spans("embed")
        ] == [True, False]
        assert gc.get_freeze_count() > frozen_before
    finally:
        RuntimeInstrumentor().uninstrument()
        gc.unfreeze()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_INFERENCE_COLD_START_REQUESTS", "ten"),
        ("OTEL_INFERENCE_GC_EVENT_THRESHOLD", "5 parsecs"),
        ("OTEL_INFERENCE_GC_FREEZE", "maybe"),
    ],
)
def test_bad_runtime_settings_name_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        RuntimeInstrumentor().instrument()
    assert not RuntimeInstrumentor().is_instrumented_by_opentelemetry


def test_stages_recorded_later_for_a_cold_request_are_cold(telemetry):
    """A batcher records each member's queue_wait and its share of the batch after
    the request moved on: they carry the request's cold-start flag all the same, or
    steady-state percentiles would include the slow first batches."""
    from otel_inference.batching import ThreadBatcher
    from otel_inference.stages import get_recorder

    COLD_START.reset(2)
    with ThreadBatcher(lambda items: list(items), max_batch_size=1, max_wait_ms=0) as batcher:
        for index in range(4):
            with request("embed"):
                assert batcher(index, timeout=10) == index
    # And a stage captured in a cold request, recorded after it ended.
    COLD_START.reset(1)
    with request("embed"):
        captured = get_recorder().capture()
    get_recorder().record_interval("postprocess", 0, 1_000, context=captured)

    counts: dict[tuple[str, bool], int] = {}
    for point in telemetry.metric_points("inference.stage.duration"):
        key = (
            point.attributes["inference.stage"],
            bool(point.attributes.get("inference.cold_start")),
        )
        counts[key] = counts.get(key, 0) + point.count
    assert counts[("queue_wait", True)] == 2 and counts[("queue_wait", False)] == 2
    assert counts[("batch", True)] == 2 and counts[("batch", False)] == 2
    assert counts[("postprocess", True)] == 1 and ("postprocess", False) not in counts
    cold_spans = [
        span.name
        for span in telemetry.spans()
        if span.name in ("queue_wait", "postprocess")
        and span.attributes.get("inference.cold_start")
    ]
    assert sorted(cold_spans) == ["postprocess", "queue_wait", "queue_wait"]
