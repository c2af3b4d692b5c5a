"""64 threads and an asyncio load at once, with instrumentors cycled under traffic.

No lost or cross-wired stages (every stage lands in its own request's trace), no
deadlock, no exception from our code, and the application's results unchanged.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections import Counter

import pytest
import redis
import redis.asyncio

from otel_inference import request, stage
from otel_inference.instrumentation.queues import QueueInstrumentor
from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from otel_inference.instrumentation.runtime import RuntimeInstrumentor
from otel_inference.instrumentation.serializers import SerializersInstrumentor

THREADS = 64
REQUESTS_PER_THREAD = 5
ASYNC_REQUESTS = 200
INSTRUMENTORS = (
    RedisFeatureInstrumentor,
    SerializersInstrumentor,
    QueueInstrumentor,
    RuntimeInstrumentor,
)


@pytest.fixture
def instrumented(telemetry):
    for instrumentor in INSTRUMENTORS:
        instrumentor().instrument()
    yield
    for instrumentor in INSTRUMENTORS:
        if instrumentor().is_instrumented_by_opentelemetry:
            instrumentor().uninstrument()


def test_threads_and_asyncio_at_once_stay_in_their_own_traces(
    telemetry, instrumented, redis_server
):
    client = redis.Redis.from_url(redis_server.url)
    client.mset({f"user:{index}": index for index in range(THREADS)})
    errors: list[BaseException] = []
    results: dict[str, int] = {}
    results_lock = threading.Lock()
    stop_cycling = threading.Event()

    def handle(worker: int, number: int) -> None:
        tag = f"t{worker}-{number}"
        with request("embed", **{"app.request": tag}):
            with stage("preprocess", **{"app.request": tag}):
                value = int(client.get(f"user:{worker}"))
            work: queue.Queue = queue.Queue()
            work.put(value)
            with stage("model_forward", **{"app.request": tag}):
                doubled = work.get() * 2
            body = json.dumps({"value": doubled})
        with results_lock:
            results[tag] = json.loads(body)["value"]

    def thread_main(worker: int) -> None:
        try:
            for number in range(REQUESTS_PER_THREAD):
                handle(worker, number)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    async def async_load() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_server.url, max_connections=ASYNC_REQUESTS)

        async def one(number: int) -> None:
            tag = f"a{number}"
            with request("embed", **{"app.request": tag}):
                async with stage("preprocess", **{"app.request": tag}):
                    value = int(await aclient.get(f"user:{number % THREADS}"))
                    await asyncio.sleep(0)
            with results_lock:
                results[tag] = value * 2

        await asyncio.gather(*(one(number) for number in range(ASYNC_REQUESTS)))
        await aclient.aclose()

    def cycle_instrumentation() -> None:
        # uninstrument() then instrument() again while traffic flows.
        while not stop_cycling.is_set():
            SerializersInstrumentor().uninstrument()
            SerializersInstrumentor().instrument()

    cycler = threading.Thread(target=cycle_instrumentation)
    threads = [threading.Thread(target=thread_main, args=(worker,)) for worker in range(THREADS)]
    cycler.start()
    for thread in threads:
        thread.start()
    asyncio.run(async_load())
    for thread in threads:
        thread.join(timeout=120)
    stop_cycling.set()
    cycler.join(timeout=30)

    assert not errors, errors[:3]
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    expected = {f"t{w}-{n}": 2 * w for w in range(THREADS) for n in range(REQUESTS_PER_THREAD)}
    expected |= {f"a{n}": 2 * (n % THREADS) for n in range(ASYNC_REQUESTS)}
    assert results == expected  # the application's answers are untouched

    spans = telemetry.spans()
    by_id = {span.context.span_id: span for span in spans}
    requests = {s.attributes["app.request"]: s for s in spans if s.name == "embed"}
    assert len(requests) == len(expected)
    for span in spans:
        tag = span.attributes.get("app.request")
        if span.name in ("preprocess", "model_forward"):
            # Each stage is a child of its own request, in its own trace.
            parent = by_id[span.parent.span_id]
            assert parent.attributes["app.request"] == tag
            assert span.context.trace_id == requests[tag].context.trace_id
    for span in spans:
        if span.name == "feature_hydration":
            owner = by_id[span.parent.span_id]
            assert owner.name == "preprocess"
            assert span.context.trace_id == owner.context.trace_id
    names = Counter(span.name for span in spans)
    assert names["preprocess"] == len(expected)
    assert names["model_forward"] == THREADS * REQUESTS_PER_THREAD
    assert names["feature_hydration"] == len(expected)
    assert names["queue_wait"] == THREADS * REQUESTS_PER_THREAD
    # Every request recorded once, cold (the first 10) or warm.
    recorded = Counter()
    for point in telemetry.metric_points("inference.stage.duration"):
        recorded[point.attributes["inference.stage"]] += point.count
    assert recorded["request"] == len(expected)
    assert recorded["model_forward"] == THREADS * REQUESTS_PER_THREAD
    assert recorded["feature_hydration"] == len(expected)
