"""A service that exercises every stage, run under opentelemetry-instrument for the
shipping tests (dashboards and alerts against a real Prometheus).

Real instrumentors do the work wherever one exists; they are loaded by
opentelemetry-instrument from their entry points, with no setup code here:

* feature_hydration: ``inference_redis`` (a real redis-server, ``SHIPPING_REDIS_URL``),
  hits and misses -> ``inference.cache.lookups``;
* tokenize: ``inference_tokenizers`` on a real ``tokenizers.Tokenizer`` (built in
  process, no download) with padding -> ``inference.tokens`` real/padding;
* parse / serialize: ``inference_serializers`` on ``orjson`` -> ``inference.serialize.size``;
* queue_wait and batch: ``otel_inference.batching.ThreadBatcher`` (concurrent
  clients, so real batches) -> ``inference.batch.size``, ``inference.stage.cost``.

The public ``stage()`` API covers the rest (and ``generation()`` the generate,
prefill and decode stages with the GenAI server metrics):

* preprocess and postprocess: application code, no library to instrument;
* h2d_transfer, model_forward and d2h_transfer: ``stage()`` blocks nested in the
  batch (no torch model here), and ``inference.transfer.size`` is recorded here by
  hand under its semconv name.

An asyncio client (its own thread and loop) runs requests whose ``preprocess``
awaits, and every 10th holds the loop with ``time.sleep``: the runtime
instrumentor's ``inference.runtime.event_loop.delay`` and ``...blocked``.

postprocess sleeps past its budget (the one breaching stage) and fails on every
10th request (``error_type`` series). Prints ``ready`` once the first requests
are done; serves /metrics until stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time

import orjson
import redis
from opentelemetry import metrics
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from otel_inference import generation, request, semconv, stage
from otel_inference.batching import ThreadBatcher

CLIENTS = 3
POSTPROCESS_SECONDS = float(os.environ.get("SHIPPING_POSTPROCESS_SECONDS", "0.004"))
# Attribute of the stand-in transfer-size histogram (no semconv constant yet).
TRANSFER_DIRECTION = "inference.transfer.direction"

stop = threading.Event()
transfer_size = metrics.get_meter("shipping_app").create_histogram(
    semconv.TRANSFER_SIZE, unit="By", description="Bytes copied between host and device"
)

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
tokenizer = Tokenizer(WordLevel({w: i + 1 for i, w in enumerate(WORDS)} | {"[UNK]": 0}, "[UNK]"))
tokenizer.pre_tokenizer = Whitespace()
tokenizer.enable_padding(pad_id=0, pad_token="[UNK]")

cache = redis.Redis.from_url(os.environ["SHIPPING_REDIS_URL"])
cache.set("user:1", "premium")  # user:2 stays missing: one hit, one miss per read


def forward(batch: list[list[int]]) -> list[int]:
    """The batch's work: transfers and the forward nested in it (stage() API: no torch model)."""
    with stage(semconv.H2D_TRANSFER):
        time.sleep(0.0005)
        transfer_size.record(64 * len(batch), {TRANSFER_DIRECTION: "h2d"})
    with stage(semconv.MODEL_FORWARD):
        time.sleep(0.005)  # well under the 60 ms model_forward budget of the live tests
    with stage(semconv.D2H_TRANSFER):
        time.sleep(0.0005)
        transfer_size.record(16 * len(batch), {TRANSFER_DIRECTION: "d2h"})
    return [sum(ids) for ids in batch]


def handle(batcher: ThreadBatcher, index: int) -> bytes:
    with request():
        body = orjson.loads(b'{"text": "the quick brown fox", "user": 1}')  # parse
        with stage(semconv.PREPROCESS):
            text = body["text"].lower()
        cache.mget(["user:1", "user:2"])  # feature_hydration
        encoding = tokenizer.encode_batch([text, "lazy dog"])[0]  # tokenize, padded
        score = batcher(encoding.ids, timeout=10)  # queue_wait + batch
        # generate (prefill, decode) + the GenAI metrics, through the generation() API
        with generation(prompt_tokens=len(encoding.ids), model="shipping-lm") as g:
            time.sleep(0.001)
            g.first_token()
            for _ in range(3):
                time.sleep(0.0005)
                g.tokens(1)
        with stage(semconv.POSTPROCESS):
            time.sleep(POSTPROCESS_SECONDS)  # over its budget: the breaching stage
            if index % 10 == 9:
                raise ValueError("postprocess failed")
        return orjson.dumps({"score": score})  # serialize


def client(batcher: ThreadBatcher, done: threading.Barrier) -> None:
    index = 0
    while not stop.is_set():
        with contextlib.suppress(ValueError):  # the failing postprocess: error series
            handle(batcher, index)
        index += 1
        if index == 20:
            done.wait()
        time.sleep(0.01)


def hold_the_loop() -> None:
    time.sleep(0.03)  # a blocking call on the event loop (over the 20 ms threshold)


async def async_client() -> None:
    index = 0
    while not stop.is_set():
        with request():
            async with stage(semconv.PREPROCESS):
                await asyncio.sleep(0.002)
            if index % 10 == 9:
                hold_the_loop()
        index += 1
        await asyncio.sleep(0.01)


def main() -> None:
    done = threading.Barrier(CLIENTS + 1)
    # Started once the cold-start window is over: it stays the three clients'.
    looped = threading.Thread(target=asyncio.run, args=(async_client(),), daemon=True)
    with ThreadBatcher(forward, max_batch_size=4, max_wait_ms=2) as batcher:
        threads = [
            threading.Thread(target=client, args=(batcher, done), daemon=True)
            for _ in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        done.wait()
        looped.start()
        print("ready", flush=True)
        sys.stdin.read()  # serve /metrics (and keep the traffic going) until stdin closes
        stop.set()
        for thread in threads:
            thread.join(10)
        looped.join(10)


if __name__ == "__main__":
    main()
