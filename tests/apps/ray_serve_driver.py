"""Start Ray Serve for real on 127.0.0.1 (bounded: 2 CPUs, small object store, no
dashboard), deploy the MiniLM embedder twice (instrumented and not), send the
same N texts to each, print the answers as JSON, and stop everything.

``python ray_serve_driver.py PORT N``. Two rounds per app: one text at a time
(batches of one: answers must be bit-identical between the apps) and N at once
(Serve batches them; answers agree to float tolerance, since the batch's padding
and shape may differ). Every concurrent request to the instrumented app carries
its own W3C ``traceparent``.
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
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=True,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, instrument in (("plain", False), ("instrumented", True)):
            serve.run(
                Embedder.options(name=f"embedder_{name}").bind(instrument=instrument),
                name=name,
                route_prefix=f"/{name}",
            )
        base = f"http://127.0.0.1:{port}"
        trace_ids = [secrets.token_hex(16) for _ in TEXTS]
        results = {}
        with ThreadPoolExecutor(max_workers=8) as pool:
            # Warm both (first call pays model warm-up), then the measured round.
            list(pool.map(lambda t: post(f"{base}/plain", t, None), TEXTS[:2]))
            list(pool.map(lambda t: post(f"{base}/instrumented", t, None), TEXTS[:2]))
            for name in ("plain", "instrumented"):
                results[f"{name}_sequential"] = [post(f"{base}/{name}", t, None) for t in TEXTS]
            results["plain"] = list(pool.map(lambda t: post(f"{base}/plain", t, None), TEXTS))
            results["instrumented"] = list(
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
