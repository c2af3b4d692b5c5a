"""otel-inference: per-stage latency for Python inference services, on OpenTelemetry.

Run a service under ``opentelemetry-instrument`` and every request's stages
(queue wait, feature hydration, tokenize, transfers, forward, serialize...) are
measured with no code change. Custom stages and request boundaries use the API::

    from otel_inference import request, stage

    with request():
        with stage("camera_ingest"):
            frame = camera.read()

A decoding loop of your own (transformers ``generate()`` needs no code)::

    from otel_inference import generation

    with generation(prompt_tokens=len(ids), model="my-llm") as g:
        token = sample(model.prefill(ids))
        g.first_token()
        while token != eos:
            token = sample(model.step(token))
            g.tokens(1)
"""

from otel_inference.config import ConfigurationError
from otel_inference.genai import GenerationScope, generation
from otel_inference.stages import (
    RequestAccount,
    StageRecorder,
    configure,
    current_request,
    current_stage,
    get_recorder,
    request,
    stage,
)
from otel_inference.version import __version__

__all__ = [
    "ConfigurationError",
    "GenerationScope",
    "RequestAccount",
    "StageRecorder",
    "__version__",
    "configure",
    "current_request",
    "current_stage",
    "generation",
    "get_recorder",
    "request",
    "stage",
]
