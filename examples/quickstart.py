"""Quickstart: custom stages in a plain Python loop, no OpenTelemetry setup code.

Run it under opentelemetry-instrument (``make demo`` does):

    opentelemetry-instrument --traces_exporter console --metrics_exporter console \
        --metric_export_interval 2000 --inference_budgets "model_forward=15ms" \
        python examples/quickstart.py

Every request records ``inference.stage.duration`` for each stage plus
``request`` and ``unattributed``; one request in four is kept as a trace
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, arg 0.25, set by the Makefile).
"""

import random
import time

from otel_inference import request, stage

random.seed(7)


@stage("preprocess")
def preprocess(text: str) -> list[str]:
    time.sleep(0.001)
    return text.lower().split()


def handle(text: str) -> int:
    with request("embed"):
        with stage("queue_wait"):
            time.sleep(random.expovariate(1 / 0.004))  # a bursty queue
        words = preprocess(text)
        with stage("model_forward", **{"inference.batch.size": 1}):
            time.sleep(0.010 + (0.010 if random.random() < 0.1 else 0.0))  # slow 10%
        time.sleep(0.002)  # work no stage covers: shows up as `unattributed`
        return len(words)


if __name__ == "__main__":
    for index in range(40):
        handle(f"Request number {index} for the quickstart")
    time.sleep(2.5)  # let the periodic metric reader export once more
