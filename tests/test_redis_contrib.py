"""Coexistence with opentelemetry-instrumentation-redis (contrib RedisInstrumentor)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.client
import redis.commands.core
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.trace import SpanKind

from otel_inference.instrumentation.redis import RedisFeatureInstrumentor

STAGE = "feature_hydration"


@pytest.fixture(params=["contrib-first", "ours-first"])
def both(request, telemetry) -> Iterator[str]:
    """Both instrumentors on, in either order (auto-instrumentation order is arbitrary)."""
    contrib, ours = RedisInstrumentor(), RedisFeatureInstrumentor()
    steps = [
        lambda: contrib.instrument(tracer_provider=telemetry.tracer_provider),
        ours.instrument,
    ]
    if request.param == "ours-first":
        steps.reverse()
    for step in steps:
        step()
    yield request.param
    ours.uninstrument()
    contrib.uninstrument()


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


def _children(telemetry, parent) -> list:
    return [s for s in telemetry.spans() if s.parent and s.parent.span_id == parent.context.span_id]


def test_contrib_span_inside_our_stage(telemetry, both, client):
    key = uuid.uuid4().hex
    client.set(key, "1")
    assert client.get(key) == b"1"
    assert client.mget([key, key + "x"]) == [b"1", None]

    stages = telemetry.spans(STAGE)
    assert len(stages) == 2
    for stage, command in zip(stages, ("GET", "MGET"), strict=True):
        (child,) = _children(telemetry, stage)  # exactly one contrib span per command
        assert child.kind is SpanKind.CLIENT
        assert child.name == command
    # contrib's SET span is there too, outside any stage; nothing is counted twice
    assert [s.name for s in telemetry.spans() if s.kind is SpanKind.CLIENT] == [
        "SET",
        "GET",
        "MGET",
    ]
    assert telemetry.stage_points()[STAGE].count == 2
    points = {
        p.attributes["inference.cache.result"]: p.value
        for p in telemetry.metric_points("inference.cache.lookups")
    }
    assert points == {"hit": 2, "miss": 1}


def test_contrib_pipeline_span_inside_our_stage(telemetry, both, client):
    key = uuid.uuid4().hex
    with client.pipeline(transaction=False) as pipe:
        pipe.get(key).set(key, "1").get(key)
        assert pipe.execute() == [None, True, b"1"]

    (stage,) = telemetry.spans(STAGE)
    (child,) = _children(telemetry, stage)
    assert child.kind is SpanKind.CLIENT
    assert child.name == "GET SET GET"
    assert stage.attributes["db.operation.batch.size"] == 3
    assert (
        stage.attributes["inference.cache.hits"],
        stage.attributes["inference.cache.misses"],
    ) == (1, 1)
    assert telemetry.stage_points()[STAGE].count == 1


@pytest.mark.parametrize("first", ["ours", "contrib"])
def test_uninstrument_in_any_order_restores_originals(telemetry, client, first):
    originals = {
        "get": redis.commands.core.BasicKeyCommands.__dict__["get"],
        "execute_command": redis.Redis.__dict__["execute_command"],
        "execute": redis.client.Pipeline.__dict__["execute"],
    }
    contrib, ours = RedisInstrumentor(), RedisFeatureInstrumentor()
    contrib.instrument(tracer_provider=telemetry.tracer_provider)
    ours.instrument()
    if first == "ours":
        ours.uninstrument()
        client.get("k")  # contrib alone still works
        assert [s.name for s in telemetry.spans()] == ["GET"]
        contrib.uninstrument()
    else:
        contrib.uninstrument()
        client.get("k")  # ours alone still works
        assert [s.name for s in telemetry.spans()] == [STAGE]
        ours.uninstrument()
    assert redis.commands.core.BasicKeyCommands.__dict__["get"] is originals["get"]
    assert redis.Redis.__dict__["execute_command"] is originals["execute_command"]
    assert redis.client.Pipeline.__dict__["execute"] is originals["execute"]
