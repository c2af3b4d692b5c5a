"""otel_inference.auto.start() in the situations a serving framework creates.

``python auto_start_app.py SCENARIO`` prints one JSON line per process:
plain (two calls), fork (a forked child calls it too), spawn (a spawned child),
user_provider (the application set a tracer provider first). Each process
records one ``auto_probe`` stage, so the span file shows who exported.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")


def report(role: str, results: list[bool]) -> None:
    from opentelemetry import metrics, trace

    import otel_inference.auto
    from otel_inference import stage
    from otel_inference.instrumentation.queues import QueueInstrumentor

    with stage("auto_probe", **{"probe.role": role, "probe.pid": os.getpid()}):
        pass
    print(
        json.dumps(
            {
                "role": role,
                "pid": os.getpid(),
                "results": results,
                "tracer_provider": type(trace.get_tracer_provider()).__name__,
                "meter_provider": type(metrics.get_meter_provider()).__name__,
                "queues_instrumented": QueueInstrumentor().is_instrumented_by_opentelemetry,
                "configured_by": otel_inference.auto.configured_by(),
            }
        ),
        flush=True,
    )
    trace.get_tracer_provider().force_flush()


def spawned_child() -> None:
    import otel_inference.auto

    report("spawned", [otel_inference.auto.start()])


def main(scenario: str) -> None:
    import otel_inference.auto

    if scenario == "user_provider":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    results = [otel_inference.auto.start(), otel_inference.auto.start()]
    if scenario == "fork":
        child = os.fork()
        if child == 0:
            report("forked", [otel_inference.auto.start(), otel_inference.auto.start()])
            os._exit(0)
        os.waitpid(child, 0)
    elif scenario == "spawn":
        process = multiprocessing.get_context("spawn").Process(target=spawned_child)
        process.start()
        process.join(60)
    report("main", results)


if __name__ == "__main__":
    main(sys.argv[1])
