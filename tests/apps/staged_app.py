"""A service with known stage costs, run under opentelemetry-instrument in tests.

It uses only the public API (no OpenTelemetry setup code): the exporter comes
from the environment. It prints the durations it observed as JSON, then serves
its metrics until stdin closes.
"""

import json
import sys
import time

from otel_inference import request, stage

REQUESTS = 100
observed: dict[str, list[float]] = {"tokenize": [], "model_forward": []}


def timed(name: str, seconds: float) -> None:
    start = time.perf_counter()
    with stage(name):
        time.sleep(seconds)
    observed[name].append(time.perf_counter() - start)


for index in range(REQUESTS):
    with request():
        # tokenize: 90 fast calls and a 10% slow tail (the p95 lies in the tail).
        timed("tokenize", 0.020 if index % 10 == 9 else 0.001)
        # model_forward: always ~10 ms, under its 14 ms budget.
        timed("model_forward", 0.010)

print(json.dumps(observed), flush=True)
sys.stdin.read()  # keep serving /metrics until the test closes stdin
