"""A FastAPI app served by several worker processes in tests (uvicorn --workers,
gunicorn with uvicorn workers, with and without --preload), under
opentelemetry-instrument. No OpenTelemetry setup code: exporters come from the
environment.

Importing it runs one ``warmup`` stage, as a service loading its model would:
under ``--preload`` that happens once, in the server's parent process, before
the workers are forked, and must be exported once (by the parent), never again
by each worker. ``GET /predict`` runs one ``model_forward`` stage and answers
which process served it (pid and ``service.instance.id``).
"""

import os
import time

from fastapi import FastAPI
from opentelemetry import trace

from otel_inference import stage

with stage("warmup"):
    time.sleep(0.001)

app = FastAPI()


@app.get("/predict")
async def predict() -> dict:
    # CPU-bound work holds the event loop, as a model on CPU does: while one
    # worker computes, the other accepts the next connection.
    with stage("model_forward"):
        time.sleep(0.005)
    resource = trace.get_tracer_provider().resource
    return {"pid": os.getpid(), "instance": resource.attributes.get("service.instance.id")}


@app.get("/health")
async def health() -> dict:
    return {"pid": os.getpid()}
