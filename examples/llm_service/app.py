"""A token-streaming LLM service: a small GPT-2 behind FastAPI, one model worker, SSE.

There is no OpenTelemetry code here: run it under ``opentelemetry-instrument`` and
otel-inference's instrumentors record each request's stages (docs/generation.md)::

    opentelemetry-instrument python -m examples.llm_service.app --port 8001

``POST /generate`` with ``{"prompt": "...", "max_new_tokens": 24}`` answers
``text/event-stream``: one ``data: <word>`` event per generated token as soon as
it exists, then ``event: end`` with ``{"tokens": n}``.

The serving path, in order:

1. parse the body (``orjson.loads``);
2. tokenise (a word-level ``tokenizers.Tokenizer`` built in process: no download);
3. queue for the model worker (a ``queue.Queue``: one generation at a time, in
   arrival order; the job carries the request's ``contextvars`` context, as any
   hand-off to a worker thread should, so the work is the request's);
4. on the worker thread: ``model.generate(..., streamer=...)`` on a 4-layer GPT-2
   built from ``GPT2Config`` with random weights (CPU, or CUDA when present);
   the streamer hands each token to the request's event stream;
5. stream the tokens back as server-sent events.

Settings (environment): ``LLM_LAYERS`` (4), ``LLM_WIDTH`` (256), ``LLM_DEVICE``
(``cuda`` when available, else ``cpu``), ``LLM_TORCH_THREADS`` (torch's default
when unset), ``LLM_MAX_NEW_TOKENS`` (64: the most a request may ask for).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import orjson
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as transformers_logging

from examples.llm_service.words import WORDS
from examples.serving import serve

logger = logging.getLogger("llm_service")

MAX_PROMPT_TOKENS = 448
MODEL_NAME = "tiny-gpt2"


@dataclass(frozen=True)
class Settings:
    layers: int = 4
    width: int = 256
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    torch_threads: int | None = None
    max_new_tokens: int = 64

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        threads = env.get("LLM_TORCH_THREADS", "").strip()
        return cls(
            layers=int(env.get("LLM_LAYERS", cls.layers)),
            width=int(env.get("LLM_WIDTH", cls.width)),
            device=env.get("LLM_DEVICE", "").strip() or cls.device,
            torch_threads=int(threads) if threads else None,
            max_new_tokens=int(env.get("LLM_MAX_NEW_TOKENS", cls.max_new_tokens)),
        )


def build_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer


def build_model(vocab_size: int, settings: Settings) -> GPT2LMHeadModel:
    """GPT-2 from a config with random (seeded) weights: no hub access needed."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=settings.layers,
        n_embd=settings.width,
        n_head=max(1, settings.width // 64),
        vocab_size=vocab_size,
        n_positions=MAX_PROMPT_TOKENS + settings.max_new_tokens,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).to(settings.device).eval()


class TokenStream(BaseStreamer):
    """A ``transformers`` streamer that hands tokens to an event loop: each ``put``
    after the first (the prompt) appends the new token ids and wakes the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._prompt_seen = False
        self.tokens: deque[int | None] = deque()
        self.ready = asyncio.Event()
        self.error: BaseException | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._loop.call_soon_threadsafe(self.ready.set)

    def end(self) -> None:
        self.tokens.append(None)
        self._loop.call_soon_threadsafe(self.ready.set)

    async def __aiter__(self) -> AsyncIterator[int]:
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.tokens:
                token = self.tokens.popleft()
                if token is None:
                    return
                yield token


@dataclass
class Job:
    ids: list[int]
    max_new_tokens: int
    stream: TokenStream
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class Generator:
    """The model worker: one thread, one generation at a time, in arrival order."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer) -> None:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = build_model(tokenizer.get_vocab_size(), settings)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self._thread.join(30)

    def generate(self, ids: list[int], max_new_tokens: int, streamer: BaseStreamer | None) -> Any:
        inputs = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            return self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # no early stop: every answer is its full length
                do_sample=False,
                streamer=streamer,
            )

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.context.run(self.generate, job.ids, job.max_new_tokens, job.stream)
            except Exception as exc:  # the stream ends with an error event, the worker goes on
                logger.exception("generation failed")
                job.stream.error = exc
                job.stream.end()


def bad_request(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


def parse_body(body: bytes, limit: int) -> tuple[str, int]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request("body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise bad_request("body must be a JSON object")
    prompt, max_new = payload.get("prompt"), payload.get("max_new_tokens", 24)
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt must be a non-empty string")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= limit:
        raise bad_request(f"max_new_tokens must be an integer from 1 to {limit}")
    return prompt, max_new


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    tokenizer = build_tokenizer()
    state: dict[str, Generator] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        generator = await asyncio.to_thread(Generator, settings, tokenizer)
        await asyncio.to_thread(generator.generate, [1, 2, 3, 4], 4, None)  # warm up
        generator.start()
        state["generator"] = generator
        logger.info(
            "ready: %d-layer GPT-2 (width %d, random weights) on %s, %d torch threads",
            settings.layers,
            settings.width,
            settings.device,
            torch.get_num_threads(),
        )
        try:
            yield
        finally:
            await asyncio.to_thread(generator.stop)

    app = FastAPI(title="llm-service", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.post("/generate")
    async def generate(request: Request) -> StreamingResponse:
        prompt, max_new = parse_body(await request.body(), settings.max_new_tokens)
        ids = tokenizer.encode(prompt).ids[-MAX_PROMPT_TOKENS:]
        stream = TokenStream(asyncio.get_running_loop())
        state["generator"].jobs.put(Job(ids, max_new, stream))

        async def events() -> AsyncIterator[bytes]:
            count = 0
            async for token in stream:
                count += 1
                yield b"data: " + tokenizer.id_to_token(token).encode() + b"\n\n"
            status = "error" if stream.error is not None else "ok"
            yield b'event: end\ndata: {"tokens": %d, "status": "%s"}\n\n' % (
                count,
                status.encode(),
            )

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    serve(
        create_app,
        "A token-streaming tiny GPT-2 service",
        default_port=8001,
        logger=logger,
        argv=argv,
    )


if __name__ == "__main__":
    main()
