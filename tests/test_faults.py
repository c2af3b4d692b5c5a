"""Faults during traffic: observability must never become the outage (issue 10).

Redis stopped and restarted mid-run, a tokenizer and a model raising: every
error reaches the caller unchanged, each stage is recorded with ``error.type``,
the service recovers, and memory stays flat across the run.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from otel_inference import request
from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from otel_inference.instrumentation.tokenizers import TokenizersInstrumentor
from otel_inference.instrumentation.torch import TorchInstrumentor

INSTRUMENTORS = (RedisFeatureInstrumentor, TokenizersInstrumentor, TorchInstrumentor)
ROUNDS = 60


class Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.isnan(features).any():
            raise ValueError("features contain NaN")
        return self.linear(features)


@pytest.fixture
def instrumented(telemetry):
    for instrumentor in INSTRUMENTORS:
        instrumentor().instrument()
    yield
    for instrumentor in INSTRUMENTORS:
        instrumentor().uninstrument()


def test_faults_surface_unchanged_and_the_service_recovers(
    telemetry, instrumented, redis_server_factory
):
    server = redis_server_factory()
    # Fail fast while Redis is down (redis-py 8 retries with backoff by default).
    client = redis.Redis(
        host=server.host, port=server.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    client.set("user:1", "1.0")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["a b c"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    model = Scorer().eval()

    def serve(index: int) -> str:
        with request("score"):
            feature = float(client.get("user:1"))
            tokens = tokenizer.encode_batch(["a b", 7] if index % 10 == 3 else ["a b"])
            values = [
                feature,
                float(len(tokens[0].ids)),
                0.0,
                float("nan") if index % 10 == 5 else 1.0,
            ]
            with torch.inference_mode():
                return f"{model(torch.tensor([values])).item():.4f}"

    served, errors = 0, {}
    tracemalloc.start()
    for index in range(ROUNDS):
        if index == 20:
            server.stop()  # Redis dies mid-run...
        if index == 30:
            server.start()  # ...and comes back on the same port (empty: re-seed)
            client.set("user:1", "1.0")
        if index == 10:
            telemetry.span_exporter.clear()  # the test's exporter keeps spans; an app's does not
            gc.collect()
            memory_before, _ = tracemalloc.get_traced_memory()
        try:
            serve(index)
            served += 1
        except Exception as exc:  # the application's own errors, exactly as raised
            errors.setdefault(type(exc), []).append(index)
    telemetry.span_exporter.clear()
    gc.collect()
    memory_after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Redis down for rounds 20-29, a bad tokenizer input every 10th from 3, NaN every 10th from 5.
    assert set(errors[redis.ConnectionError]) == set(range(20, 30))
    assert errors[TypeError] == [i for i in range(3, ROUNDS, 10) if not 20 <= i < 30]
    assert errors[ValueError] == [i for i in range(5, ROUNDS, 10) if not 20 <= i < 30]
    assert served == ROUNDS - sum(len(v) for v in errors.values())
    assert served >= 40  # the service recovered after Redis came back

    recorded = {}
    for point in telemetry.metric_points("inference.stage.duration"):
        key = (point.attributes["inference.stage"], point.attributes.get("error.type"))
        recorded[key] = recorded.get(key, 0) + point.count
    assert recorded[("feature_hydration", "ConnectionError")] == 10
    assert recorded[("tokenize", "TypeError")] == len(errors[TypeError])
    assert recorded[("model_forward", "ValueError")] == len(errors[ValueError])
    assert recorded[("request", "ConnectionError")] == 10
    # No growth beyond a small bound over 50 instrumented requests (telemetry included).
    assert memory_after - memory_before < 512 * 1024
