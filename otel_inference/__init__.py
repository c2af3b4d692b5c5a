"""otel-inference: per-stage latency for Python inference services, on OpenTelemetry.

Run a service under ``opentelemetry-instrument`` and every request's stages
(queue wait, feature hydration, tokenize, transfers, forward, serialize...) are
measured with no code change. Custom stages and request boundaries use the API::

    from otel_inference import request, stage

    with request():
        with stage("camera_ingest"):
            frame = camera.read()
"""

from otel_inference.config import ConfigurationError
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
    "RequestAccount",
    "StageRecorder",
    "__version__",
    "configure",
    "current_request",
    "current_stage",
    "get_recorder",
    "request",
    "stage",
]
