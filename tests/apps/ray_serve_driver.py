"""Start Ray Serve for real on 127.0.0.1 (bounded: 2 CPUs, small object store, no
dashboard), deploy the instrumented MiniLM embedder (one replica), send it N
texts, print the answers and the same model's answers computed here without
Ray or instrumentation as JSON, and stop everything.

``python ray_serve_driver.py PORT N``. Two rounds: one text at a time (batches
of one: answers must be bit-identical to the baseline) and N at once (Serve
batches them; float tolerance, since the batch's padding and shape differ).
Every concurrent request carries its own W3C ``traceparent``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from examples.frameworks.baseline import embed_one_by_one
from examples.frameworks.ray_serve_embedder import Embedder

TEXTS = [f"request {i}: " + "the quick brown fox " * (1 + i % 5) for i in range(int(sys.argv[2]))]


def post(url: str, text: str, traceparent: str | None) -> list[float]:
    headers = {"Content-Type": "application/json"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    request = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["embedding"]


def main() -> None:
    port = int(sys.argv[1])
    baseline = embed_one_by_one(TEXTS)
    hook = os.environ.get("DRIVER_TRACING_HOOK")  # e.g. otel_inference.auto:start
    ray.init(
        _tracing_startup_hook=hook,
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=True,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            Embedder.options(name="embedder_instrumented").bind(instrument=hook is None),
            name="instrumented",
            route_prefix="/instrumented",
        )
        base = f"http://127.0.0.1:{port}"
        trace_ids = [secrets.token_hex(16) for _ in TEXTS]
        results = {"baseline": baseline}
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda t: post(f"{base}/instrumented", t, None), TEXTS[:2]))  # warm-up
            results["sequential"] = [post(f"{base}/instrumented", t, None) for t in TEXTS]
            results["concurrent"] = list(
                pool.map(
                    lambda args: post(
                        f"{base}/instrumented", args[0], f"00-{args[1]}-{secrets.token_hex(8)}-01"
                    ),
                    zip(TEXTS, trace_ids, strict=True),
                )
            )
        time.sleep(float(os.environ.get("DRIVER_EXPORT_WAIT_S", "2")))  # exporters' next tick
        print(json.dumps({**results, "trace_ids": trace_ids}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
