"""all-MiniLM-L6-v2 on LitServe, batched by LitServe (``max_batch_size`` /
``batch_timeout``) in several inference workers; no OpenTelemetry code besides
the one call that starts it in each worker (``otel_inference.auto.start()``).

Run::

    OTEL_SERVICE_NAME=embedder OTEL_METRICS_EXPORTER=prometheus \\
      python -m examples.frameworks.litserve_embedder --port 8000

    curl -s 127.0.0.1:8000/embed -d '{"text": "hello"}'

See docs/litserve.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls


class Embedder(ls.LitAPI):
    def __init__(self, instrument: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.instrument = instrument

    def setup(self, device: str) -> None:  # runs in each spawned worker
        if self.instrument:
            import otel_inference.auto

            otel_inference.auto.start()
        import torch

        from examples.embedding_service.app import Embedder as MiniLM
        from examples.embedding_service.app import model_dir

        torch.set_num_threads(1)
        self.model = MiniLM(model_dir(), "cpu", max_length=128)

    def decode_request(self, request):
        return request["text"]

    def predict(self, texts: list[str]) -> list[list[float]]:  # one call per batch
        return [vector.tolist() for vector in self.model(texts)]

    def encode_response(self, output: list[float]) -> dict[str, Any]:
        return {"embedding": output}


def server(max_batch_size: int = 4, batch_timeout: float = 0.05, workers: int = 2) -> ls.LitServer:
    api = Embedder(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/embed")
    return ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=workers, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    server(workers=args.workers).run(
        host="127.0.0.1", port=args.port, generate_client_file=False, num_api_servers=1
    )


if __name__ == "__main__":
    main()
