"""Stages measured elsewhere: ``capture()``, ``record_interval()`` and ``start_batch()``."""

from __future__ import annotations

import threading
import time
from time import perf_counter_ns

import pytest
from opentelemetry import trace
from opentelemetry.trace import Link, StatusCode

from otel_inference import get_recorder, request, stage
from otel_inference.stages import StageContext


def _in_thread(fn):
    """Run ``fn`` in a fresh thread (empty context), as a consumer would."""
    result = {}

    def run():
        result["value"] = fn()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result.get("value")


def test_capture_reads_request_stage_and_span(telemetry):
    recorder = get_recorder()
    outside = recorder.capture()
    assert not outside.in_request and not outside.recording and outside.parent is None
    with request() as req:
        top = recorder.capture()
        with stage("handler"):
            nested = recorder.capture()
    assert top.account is req.account and top.parent is None and top.recording
    assert top.in_request and top.span_context.is_valid
    assert nested.account is req.account and nested.parent == "handler"


def test_interval_recorded_from_another_thread_joins_the_producer_request(telemetry):
    recorder = get_recorder()
    with request():
        context = recorder.capture()
        start = perf_counter_ns()
        time.sleep(0.02)
        end = perf_counter_ns()
        span_context = _in_thread(
            lambda: recorder.record_interval(
                "queue_wait", start, end, context=context, attributes={"inference.queue.depth": 3}
            )
        )
    (request_span,) = telemetry.spans("inference.request")
    (wait,) = telemetry.spans("queue_wait")
    assert span_context == wait.context
    assert wait.parent.span_id == request_span.context.span_id
    assert wait.attributes["inference.queue.depth"] == 3
    assert wait.attributes["inference.stage"] == "queue_wait"
    # Backdated to the interval: same duration as the histogram, inside the request.
    point = telemetry.stage_points()["queue_wait"]
    assert point.count == 1 and point.sum == pytest.approx((end - start) / 1e9)
    assert (wait.end_time - wait.start_time) == end - start
    assert request_span.start_time <= wait.start_time <= wait.end_time <= request_span.end_time
    # The interval covers the request: the 20 ms are not "unattributed".
    assert telemetry.stage_points()["unattributed"].sum < 0.01


def test_interval_in_unsampled_request_records_histogram_only(unsampled_telemetry):
    recorder = get_recorder()
    tracer = unsampled_telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server"):
        context = recorder.capture()
    assert context.in_request and not context.recording
    assert recorder.record_interval("queue_wait", 0, 5_000_000, context=context) is None
    assert unsampled_telemetry.spans() == []
    assert unsampled_telemetry.stage_points()["queue_wait"].sum == pytest.approx(0.005)


def test_nested_capture_labels_parent_and_does_not_cover(telemetry):
    recorder = get_recorder()
    with request(), stage("handler"):
        context = recorder.capture()
        start = perf_counter_ns()
        time.sleep(0.01)
        recorder.record_interval("queue_wait", start, perf_counter_ns(), context=context)
    points = telemetry.stage_points()
    assert "handler/queue_wait" in points and "queue_wait" not in points
    assert telemetry.spans("queue_wait")[0].attributes["inference.stage.parent"] == "handler"


def test_cover_false_and_span_false(telemetry):
    recorder = get_recorder()
    with request():
        context = recorder.capture()
        start = perf_counter_ns()
        time.sleep(0.02)
        end = perf_counter_ns()
        assert (
            recorder.record_interval(
                "queue_wait", start, end, context=context, span=False, cover=False
            )
            is None
        )
    assert telemetry.spans("queue_wait") == []
    assert telemetry.stage_points()["queue_wait"].count == 1
    # Inside a request a top-level stage's calls cover their time whatever ``cover``
    # says (it only spares a caller that covered already a second, harmless, cover).
    assert telemetry.stage_points()["unattributed"].sum < 0.02


def test_interval_outside_request_follows_root_stage_policy(telemetry):
    recorder = get_recorder()
    recorder.record_interval("queue_wait", 0, 1000)
    (root,) = telemetry.spans("queue_wait")
    assert root.parent is None
    recorder.configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets={}, root_stages="metrics"
    )
    recorder.record_interval("queue_wait", 0, 1000)
    assert len(telemetry.spans("queue_wait")) == 1
    assert telemetry.stage_points()["queue_wait"].count == 2


def test_interval_error_budget_and_links(telemetry):
    recorder = get_recorder()
    recorder.configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets="queue_wait=1ms"
    )
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("other") as other:
        pass
    with request():
        recorder.record_interval(
            "queue_wait",
            0,
            5_000_000,
            exc=TimeoutError("late"),
            links=[Link(other.get_span_context())],
        )
    (wait,) = telemetry.spans("queue_wait")
    assert wait.status.status_code is StatusCode.ERROR
    assert wait.attributes["error.type"] == "TimeoutError"
    assert wait.attributes["inference.budget.exceeded"] is True
    assert [link.context.span_id for link in wait.links] == [other.get_span_context().span_id]
    assert "queue_wait!TimeoutError" in telemetry.stage_points()
    (breach,) = telemetry.metric_points("inference.stage.budget.breaches")
    assert breach.value == 1


def test_record_interval_never_raises(telemetry, caplog):
    recorder = get_recorder()
    assert recorder.record_interval("queue_wait", 0, 10, context=object()) is None  # type: ignore[arg-type]
    assert "failed to record stage" in caplog.text


def _members(count: int, sampled: set[int]) -> tuple[list[StageContext], list]:
    """Capture ``count`` member contexts, each in its own request (sampled or not)."""
    recorder = get_recorder()
    contexts, scopes = [], []
    for index in range(count):
        with request() as scope:
            context = recorder.capture()
            if index not in sampled:
                # Same request account, but an unsampled span.
                context.recording = False
            contexts.append(context)
            scopes.append(scope)
    return contexts, scopes


def test_batch_span_once_linked_to_every_member(telemetry):
    recorder = get_recorder()
    contexts, _ = _members(4, sampled={1, 3})
    before = trace.get_current_span()
    scope = recorder.start_batch("model_forward", contexts, {"inference.batcher.name": "b"})
    assert scope.is_recording and scope.span_context is not None
    with stage("h2d_transfer"):
        time.sleep(0.01)
    scope.end()
    assert trace.get_current_span() is before
    (batch,) = telemetry.spans("model_forward")
    requests = telemetry.spans("inference.request")
    # Child of the first sampled member; linked to all of them.
    assert batch.parent.span_id == contexts[1].span_context.span_id
    assert {link.context.span_id for link in batch.links} == {
        c.span_context.span_id for c in contexts
    }
    assert len(requests) == 4
    assert batch.attributes["inference.batch.size"] == 4
    assert batch.attributes["inference.batcher.name"] == "b"
    (nested,) = telemetry.spans("h2d_transfer")
    assert nested.parent.span_id == batch.context.span_id
    points = telemetry.stage_points()
    # Every member experienced the whole duration; the cost is shared.
    forward = points["model_forward"]
    assert forward.count == 4
    duration = (batch.end_time - batch.start_time) / 1e9
    assert forward.sum == pytest.approx(4 * duration, rel=1e-3)
    (cost,) = telemetry.metric_points("inference.stage.cost")
    assert cost.count == 4 and cost.sum == pytest.approx(duration, rel=1e-3)
    # The nested stage is recorded once, under the batch stage.
    assert points["model_forward/h2d_transfer"].count == 1


def test_batch_covers_member_requests(telemetry):
    recorder = get_recorder()
    with request():
        member = recorder.capture()
        with recorder.start_batch("model_forward", [member, None]):
            time.sleep(0.02)
    points = telemetry.stage_points()
    assert points["unattributed"].sum < 0.01
    assert points["model_forward"].count == 1  # the None member is not recorded
    (cost,) = telemetry.metric_points("inference.stage.cost")
    assert cost.sum == pytest.approx(points["model_forward"].sum / 2)


def test_unsampled_batch_has_no_span_and_nested_stages_stay_cheap(unsampled_telemetry):
    recorder = get_recorder()
    tracer = unsampled_telemetry.tracer_provider.get_tracer("test")
    members = []
    for _ in range(3):
        with tracer.start_as_current_span("server"):
            members.append(recorder.capture())

    def run():
        with recorder.start_batch("model_forward", members) as scope:
            assert not scope.is_recording and scope.span_context is None
            with stage("h2d_transfer"):
                pass

    _in_thread(run)
    assert unsampled_telemetry.spans() == []
    points = unsampled_telemetry.stage_points()
    assert points["model_forward"].count == 3
    assert points["model_forward/h2d_transfer"].count == 1


def test_batch_error_and_budget_per_member(telemetry):
    recorder = get_recorder()
    recorder.configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets="model_forward=1ms"
    )
    contexts, _ = _members(3, sampled={0})
    scope = recorder.start_batch("model_forward", contexts)
    time.sleep(0.005)
    scope.end(ValueError("bad batch"))
    (batch,) = telemetry.spans("model_forward")
    assert batch.status.status_code is StatusCode.ERROR
    assert batch.attributes["inference.budget.exceeded"] is True
    assert telemetry.stage_points()["model_forward!ValueError"].count == 3
    (breaches,) = telemetry.metric_points("inference.stage.budget.breaches")
    assert breaches.value == 3


def test_batch_members_nested_in_a_stage_keep_their_parent(telemetry):
    recorder = get_recorder()
    with request(), stage("handler"):
        member = recorder.capture()
        with recorder.start_batch("model_forward", [member]):
            pass
    assert "handler/model_forward" in telemetry.stage_points()
