"""The stage core: histogram for every call, span only when sampled, nesting, errors, requests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from otel_inference import (
    StageRecorder,
    configure,
    current_request,
    current_stage,
    get_recorder,
    request,
    stage,
)
from tests.telemetry import Telemetry


def test_stage_records_histogram_and_child_span(telemetry):
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server", kind=SpanKind.SERVER) as server:
        with stage("tokenize", **{"inference.batch.size": 4}):
            time.sleep(0.002)

    (span,) = telemetry.spans("tokenize")
    assert span.parent.span_id == server.get_span_context().span_id
    assert span.attributes["inference.stage"] == "tokenize"
    assert span.attributes["inference.batch.size"] == 4
    assert span.kind is SpanKind.INTERNAL
    point = telemetry.stage_points()["tokenize"]
    assert point.count == 1
    assert point.sum >= 0.002
    # The span and the histogram report the same duration (one monotonic clock).
    span_seconds = (span.end_time - span.start_time) / 1e9
    assert span_seconds == pytest.approx(point.sum, abs=1e-6)


def test_histogram_attributes_carry_no_span_attributes(telemetry):
    with stage("tokenize", secret="do-not-label"):
        pass
    point = telemetry.stage_points()["tokenize"]
    assert dict(point.attributes) == {"inference.stage": "tokenize"}


def test_unsampled_request_records_histogram_without_span(unsampled_telemetry):
    tracer = unsampled_telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server"):
        parent = trace.get_current_span()
        assert not parent.is_recording() and parent.get_span_context().is_valid
        with stage("model_forward") as scope:
            # The cheap path: no span object at all, so attribute setting is a no-op.
            assert scope._span is None
            assert not scope.is_recording
            scope.set_attribute("ignored", 1)
    assert unsampled_telemetry.spans() == []
    assert unsampled_telemetry.stage_points()["model_forward"].count == 1


def test_root_stage_policy_span_starts_sampled_root(telemetry):
    with stage("warmup"), stage("model_forward"):
        pass
    warmup, forward = telemetry.spans("warmup")[0], telemetry.spans("model_forward")[0]
    assert warmup.parent is None
    assert forward.parent.span_id == warmup.context.span_id


def test_root_stage_policy_metrics_only(telemetry):
    get_recorder().configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets={}, root_stages="metrics"
    )
    with stage("warmup"):
        pass
    assert telemetry.spans() == []
    assert telemetry.stage_points()["warmup"].count == 1


def test_unsampled_root_keeps_nested_stages_off_the_span_path():
    telemetry = Telemetry(sampler=ALWAYS_OFF)
    recorder = StageRecorder(telemetry.tracer_provider, telemetry.meter_provider, budgets={})
    with recorder.stage("warmup"), recorder.stage("model_forward") as inner:
        # The unsampled root is attached, so the nested stage sees a valid,
        # non-recording parent and takes the cheap path (no second root).
        assert inner._span is None
    assert telemetry.spans() == []
    assert set(telemetry.stage_points()) == {"warmup", "warmup/model_forward"}


def test_nested_stage_is_inclusive_and_labelled_with_parent(telemetry):
    with request(), stage("preprocess"):
        time.sleep(0.002)
        with stage("tokenize"):
            time.sleep(0.003)
    points = telemetry.stage_points()
    outer, inner = points["preprocess"], points["preprocess/tokenize"]
    assert dict(inner.attributes) == {
        "inference.stage": "tokenize",
        "inference.stage.parent": "preprocess",
    }
    assert inner.sum >= 0.003
    assert outer.sum >= inner.sum + 0.002  # inclusive of the nested stage
    (tokenize,) = telemetry.spans("tokenize")
    assert tokenize.attributes["inference.stage.parent"] == "preprocess"


def test_request_records_request_and_unattributed(telemetry):
    with request():
        with stage("feature_hydration"):
            time.sleep(0.003)
        time.sleep(0.004)  # covered by no stage
        with stage("model_forward"), stage("inner"):
            time.sleep(0.002)
    points = telemetry.stage_points()
    total = points["request"].sum
    covered = points["feature_hydration"].sum + points["model_forward"].sum
    unattributed = points["unattributed"].sum
    assert unattributed >= 0.004
    (request_span,) = telemetry.spans("inference.request")
    ours = request_span.attributes["inference.instrumentation.duration"]
    # unattributed is what the top-level stages leave uncovered (nested stages are
    # inside their parents and must not be subtracted twice), minus our own time.
    assert unattributed + ours == pytest.approx(total - covered, abs=2e-5)
    assert request_span.kind is SpanKind.SERVER
    assert request_span.attributes["inference.unattributed.duration"] == pytest.approx(unattributed)


def test_instrumentation_time_is_not_blamed_on_the_app(telemetry):
    # 500 empty stages: the app does nothing between them; our own enter/exit work
    # (spans, histogram records) is all there is, and it is ours, not unattributed.
    with request():
        for _ in range(500):
            with stage("tokenize"):
                pass
    (request_span,) = telemetry.spans("inference.request")
    ours = request_span.attributes["inference.instrumentation.duration"]
    unattributed = request_span.attributes["inference.unattributed.duration"]
    assert ours > 0
    # What is left is the loop, the ``with`` protocol and the scope's allocation and
    # release around each stage (under a microsecond a call), which no clock inside the
    # stage can see: the application's, and smaller than ours (~1.5 us a call sampled
    # on the compiled core, ~3 us on the Python one; our first span's set-up included).
    assert unattributed < ours


def test_request_unattributed_uses_union_of_concurrent_stages(telemetry):
    async def lookup():
        with stage("feature_hydration"):
            await asyncio.sleep(0.02)

    async def handler():
        with request():
            await asyncio.gather(lookup(), lookup(), lookup())

    asyncio.run(handler())
    points = telemetry.stage_points()
    # One record for the request: three overlapping 20 ms lookups are ~20 ms of it, not 60.
    assert points["feature_hydration"].count == 1
    assert 0.02 <= points["feature_hydration"].sum < 0.04
    assert 0 <= points["unattributed"].sum < points["request"].sum
    assert points["request"].sum < 0.06


def test_request_inside_server_span_is_internal_child(telemetry):
    tracer = telemetry.tracer_provider.get_tracer("test")
    with (
        tracer.start_as_current_span("GET /embed", kind=SpanKind.SERVER) as server,
        request("embed"),
    ):
        with stage("tokenize"):
            pass
    (embed,) = telemetry.spans("embed")
    assert embed.kind is SpanKind.INTERNAL
    assert embed.parent.span_id == server.get_span_context().span_id


def test_exception_sets_status_error_type_and_propagates_unchanged(telemetry):
    class ModelError(RuntimeError):
        pass

    error = ModelError("boom")
    with pytest.raises(ModelError) as raised, stage("model_forward"):
        raise error
    assert raised.value is error
    (span,) = telemetry.spans("model_forward")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == error.__class__.__qualname__
    assert any(event.name == "exception" for event in span.events)
    point = telemetry.stage_points()[f"model_forward!{error.__class__.__qualname__}"]
    assert point.count == 1


def test_exception_in_request_is_recorded_on_request(telemetry):
    with pytest.raises(KeyError), request():
        raise KeyError("missing")
    assert "request!KeyError" in telemetry.stage_points()


def test_decorator_sync_and_async(telemetry):
    @stage("postprocess")
    def pool(values):
        return sum(values) / len(values)

    @stage("feature_hydration")
    async def fetch(user):
        await asyncio.sleep(0)
        return {"user": user}

    assert pool([1, 2, 3]) == 2
    assert pool([4]) == 4
    assert asyncio.run(fetch("u1")) == {"user": "u1"}
    assert pool.__name__ == "pool"
    points = telemetry.stage_points()
    assert points["postprocess"].count == 2
    assert points["feature_hydration"].count == 1


def test_async_with(telemetry):
    async def main():
        async with stage("serialize"):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert telemetry.stage_points()["serialize"].count == 1


def test_current_stage_and_request_are_context_local(telemetry):
    seen = {}

    def worker():
        seen["thread"] = current_stage()

    with request() as req, stage("tokenize"):
        assert current_stage() == "tokenize"
        assert current_request() is req.account
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen["thread"] is None  # a new thread does not inherit the stage
    assert current_stage() is None and current_request() is None


def test_concurrent_threads_do_not_cross_wire(telemetry):
    tracer = telemetry.tracer_provider.get_tracer("test")
    errors = []

    def handle(index):
        try:
            with tracer.start_as_current_span(f"req-{index}"), stage("tokenize", index=index):
                time.sleep(0.001)
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=handle, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    parents = {s.context.span_id: s.name for s in telemetry.spans() if s.name.startswith("req-")}
    for span in telemetry.spans("tokenize"):
        assert parents[span.parent.span_id] == f"req-{span.attributes['index']}"
    assert telemetry.stage_points()["tokenize"].count == 32


def test_budget_breach_sets_attribute_and_counter(telemetry):
    configure(
        telemetry.tracer_provider, telemetry.meter_provider, budgets="tokenize=1ms,serialize=1s"
    )
    with stage("tokenize"):
        time.sleep(0.003)
    with stage("serialize"):
        pass
    with stage("unbudgeted"):
        pass
    spans = {s.name: s for s in telemetry.spans()}
    assert spans["tokenize"].attributes["inference.budget.exceeded"] is True
    assert spans["serialize"].attributes["inference.budget.exceeded"] is False
    assert "inference.budget.exceeded" not in spans["unbudgeted"].attributes
    breaches = {
        p.attributes["inference.stage"]: p.value
        for p in telemetry.metric_points("inference.stage.budget.breaches")
    }
    assert breaches == {"tokenize": 1}
    gauge = {
        p.attributes["inference.stage"]: p.value
        for p in telemetry.metric_points("inference.stage.budget")
    }
    assert gauge == {"tokenize": 0.001, "serialize": 1.0}


def test_request_budget(telemetry):
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets={"request": "1ms"})
    with request():
        time.sleep(0.002)
    (span,) = telemetry.spans("inference.request")
    assert span.attributes["inference.budget.exceeded"] is True
    breaches = [
        p.attributes["inference.stage"]
        for p in telemetry.metric_points("inference.stage.budget.breaches")
    ]
    assert breaches == ["request"]


def test_budgets_are_histogram_boundaries():
    telemetry = Telemetry()
    recorder = StageRecorder(
        telemetry.tracer_provider,
        telemetry.meter_provider,
        budgets="model_forward=14ms,tokenize=0.37ms",
    )
    with recorder.stage("model_forward"):
        pass
    (point,) = telemetry.metric_points("inference.stage.duration")
    assert 0.014 in point.explicit_bounds
    assert 0.00037 in point.explicit_bounds


def test_budget_configured_after_first_histogram_warns(telemetry, caplog):
    # The SDK keeps the first registration's buckets: say so instead of lying.
    with stage("model_forward"):
        pass
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets="model_forward=14ms")
    assert any("not histogram bucket boundaries" in r.getMessage() for r in caplog.records)


def test_instrumentation_failure_never_breaks_the_app(telemetry, monkeypatch, caplog):
    binding = get_recorder()._bind()

    def broken_record(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(binding, "duration", type("H", (), {"record": broken_record})())
    with stage("tokenize"):
        result = 41 + 1
    assert result == 42
    with stage("tokenize"):
        pass  # logged once, not twice
    assert sum("failed to record stage" in r.getMessage() for r in caplog.records) <= 1


def test_separate_recorder_with_own_providers():
    telemetry = Telemetry()
    recorder = StageRecorder(TracerProvider(), telemetry.meter_provider, budgets={})
    with recorder.stage("custom"):
        pass
    assert telemetry.stage_points()["custom"].count == 1


def test_start_end_api_for_instrumentors(telemetry):
    recorder = get_recorder()
    scope = recorder.start("h2d_transfer", {"inference.transfer.bytes": 1024})
    assert current_stage() == "h2d_transfer"
    scope.end()
    assert current_stage() is None
    (span,) = telemetry.spans("h2d_transfer")
    assert span.attributes["inference.transfer.bytes"] == 1024


def test_deferred_record_uses_given_duration(telemetry):
    # The CUDA-events shape: leave the context now, record the resolved duration later.
    scope = get_recorder().start("model_forward")
    scope.exit_context()
    assert current_stage() is None
    scope.record(7_000_000, **{"inference.host.duration": 0.0001})
    (span,) = telemetry.spans("model_forward")
    assert span.end_time - span.start_time == 7_000_000
    assert span.attributes["inference.host.duration"] == 0.0001
    assert telemetry.stage_points()["model_forward"].sum == pytest.approx(0.007)


def _span_text(span) -> str:
    """Everything a span would export, as text."""
    events = [(e.name, dict(e.attributes)) for e in span.events]
    return repr((span.name, dict(span.attributes), events, span.status.description))


def test_exception_message_is_not_recorded_by_default(telemetry):
    secret = "user:4242-secret-feature-key"
    with pytest.raises(KeyError), stage("feature_hydration"):
        raise KeyError(secret)
    (span,) = telemetry.spans("feature_hydration")
    assert secret not in _span_text(span)
    (event,) = span.events
    assert event.attributes["exception.type"] == "KeyError"
    assert (
        "test_exception_message_is_not_recorded_by_default"
        in event.attributes["exception.stacktrace"]
    )
    assert span.status.description == "KeyError"


def test_exception_message_recorded_when_opted_in(telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_EXCEPTION_MESSAGES", "true")
    configure(telemetry.tracer_provider, telemetry.meter_provider, budgets={})
    with pytest.raises(ValueError), stage("preprocess"):
        raise ValueError("bad input shape")
    (span,) = telemetry.spans("preprocess")
    assert span.events[0].attributes["exception.message"] == "bad input shape"
    assert span.status.description == "ValueError: bad input shape"


def test_exception_messages_variable_is_validated(monkeypatch):
    from otel_inference import ConfigurationError

    monkeypatch.setenv("OTEL_INFERENCE_EXCEPTION_MESSAGES", "sometimes")
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_EXCEPTION_MESSAGES='sometimes'"):
        configure()


def test_histogram_exemplar_points_at_the_stage_span(telemetry):
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server"):
        with stage("model_forward"):
            pass
    (span,) = telemetry.spans("model_forward")
    point = telemetry.stage_points()["model_forward"]
    (exemplar,) = point.exemplars
    assert exemplar.span_id == span.context.span_id
    assert exemplar.trace_id == span.context.trace_id


def test_stage_names_in_metrics_are_bounded(telemetry, caplog):
    from otel_inference.stages import MAX_STAGE_NAMES, OTHER_STAGE

    for index in range(MAX_STAGE_NAMES + 50):
        with stage(f"user_{index}"):  # a per-request value where a stage name belongs
            pass
    labels = {
        p.attributes["inference.stage"] for p in telemetry.metric_points("inference.stage.duration")
    }
    assert len(labels) == MAX_STAGE_NAMES + 1
    assert OTHER_STAGE in labels
    other = next(
        p
        for p in telemetry.metric_points("inference.stage.duration")
        if p.attributes["inference.stage"] == OTHER_STAGE
    )
    assert other.count == 50
    # Spans keep the real name: they are sampled, and a trace is read one at a time.
    assert telemetry.spans(f"user_{MAX_STAGE_NAMES + 49}")
    assert sum("distinct stage names" in r.getMessage() for r in caplog.records) == 1
