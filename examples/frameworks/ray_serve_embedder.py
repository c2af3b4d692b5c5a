"""all-MiniLM-L6-v2 on Ray Serve, batched with ``@serve.batch``; no OpenTelemetry code
besides the one call that starts it in each replica (``otel_inference.auto.start()``).

Run (the ``OTEL_*`` variables must be set before ``ray.init``, which passes them
to Ray's processes)::

    OTEL_SERVICE_NAME=embedder OTEL_METRICS_EXPORTER=prometheus \\
    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=otel_inference.instrumentation.ray_serve:span_processors \\
      serve run examples.frameworks.ray_serve_embedder:app

    curl -s 127.0.0.1:8000/ -d '{"text": "hello"}'

See docs/ray-serve.md.
"""

from __future__ import annotations

from typing import Any

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Embedder:
    def __init__(
        self, instrument: bool = True, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02
    ) -> None:
        if instrument:
            import otel_inference.auto

            otel_inference.auto.start()  # before the model loads: its warm-up is measured too
        import torch

        from examples.embedding_service.app import Embedder as MiniLM
        from examples.embedding_service.app import model_dir

        torch.set_num_threads(1)
        self.model = MiniLM(model_dir(), "cpu", max_length=128)
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [vector.tolist() for vector in self.model(texts)]

    async def __call__(self, request: Any) -> dict[str, Any]:
        body = await request.json()
        return {"embedding": await self.embed(body["text"])}


app = Embedder.bind()
