"""Generations under opentelemetry-instrument for the live budget-alert test.

Each request: ``request()`` around ``generation()`` with a 30 ms prefill and three
2 ms decode steps (the TTFT breaches a 10 ms ``ttft`` budget; TPOT stays under
its budget). Prints ``{"ready": true}`` once the cold-start window is over and
keeps generating, serving /metrics, until stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from otel_inference import generation, request

stop = threading.Event()
ready = threading.Event()


def loop() -> None:
    count = 0
    while not stop.is_set():
        with request(), generation(prompt_tokens=8, model="alert-lm") as g:
            time.sleep(0.03)
            g.first_token()
            for _ in range(3):
                time.sleep(0.002)
                g.tokens(1)
        count += 1
        if count == 20:  # past the 10 cold-start requests
            ready.set()
        time.sleep(0.01)


def main() -> None:
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    ready.wait(60)
    print(json.dumps({"ready": ready.is_set()}), flush=True)
    sys.stdin.read()
    stop.set()
    thread.join(10)


if __name__ == "__main__":
    main()
