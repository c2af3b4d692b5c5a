"""A service with known stage costs, run under opentelemetry-instrument in tests.

It uses only the public API (no OpenTelemetry setup code): the exporter comes
from the environment. It prints the durations it observed as JSON, then serves
its metrics until stdin closes.
"""

import json
import os
import sys
import time

from otel_inference import request, stage

REQUESTS = 100
observed: dict[str, list[float]] = {"tokenize": [], "model_forward": []}

# STAGED_APP_TOKENIZER=1: each request also runs a real padded tokenizer (recorded by
# the tokenizers instrumentor): 6 real of 8 token positions, for the padding figures.
tokenizer = None
if os.environ.get("STAGED_APP_TOKENIZER") == "1":
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["the", "quick", "brown", "fox", "lazy", "dog"]
    tokenizer = Tokenizer(
        WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, "[UNK]")
    )
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.enable_padding(pad_id=0, pad_token="[UNK]")


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
        if tokenizer is not None:
            tokenizer.encode_batch(["the quick brown fox", "lazy dog"])

print(json.dumps(observed), flush=True)
sys.stdin.read()  # keep serving /metrics until the test closes stdin
