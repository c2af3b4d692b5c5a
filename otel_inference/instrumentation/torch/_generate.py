"""transformers ``generate()`` as one ``generate`` stage with ``prefill`` and ``decode``.

The wrapper opens a :class:`~otel_inference.genai.GenerationScope` and,
for the length of the call, puts this thread's torch wrapper state in
*generating* mode: the model's forward calls are counted as steps instead of
being ``model_forward`` stages, and the host<->device copies generate makes
(``next_tokens.cpu()`` for a streamer...) are not transfer stages. So a
500-token answer is three stage records, not 500 forwards and 500 copies.

* ``prefill``: from the call to the first output token. The first token exists
  when it is handed to a ``streamer`` (its second ``put``: the first one is the
  prompt), or, without a streamer, when the first decode forward starts (the
  token was sampled and fed back); with a single new token, at the end.
  Forwards inside ``GenerationMixin._prefill`` (chunked prefill) are prefill.
* ``decode``: from the first token to the return; the step count
  (``inference.generation.decode.steps``) and output tokens on its span.
* Output tokens per sequence: the returned sequences' length minus the prompt
  (minus the decoder start token for encoder-decoder models), else the steps.

Host timing, no added synchronisation: on CUDA the first-token time is when
the host had the token. With a streamer it is exact (``put`` receives
``tokens.cpu()``, which waits for the device). Without one, transformers
checks its stopping criteria every step (a synchronisation) unless it can
defer that check (``DeferredStopCheck``, transformers 5 on CUDA with a static
cache), in which case the host may run a step ahead of the device: TTFT is
then early by at most one step and the decode end is when generate returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from otel_inference import semconv
from otel_inference.genai import GenerationScope
from otel_inference.stages import StageRecorder, log_once

PROVIDER = "transformers"


def _int_tensor(value: Any) -> torch.Tensor | None:
    if (
        isinstance(value, torch.Tensor)
        and value.dim() in (1, 2)
        and not value.is_floating_point()
        and not value.is_complex()
    ):
        return value
    return None


def _prompt(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The prompt's token ids tensor (shape only is read: no values)."""
    if args:
        found = _int_tensor(args[0])
        if found is not None:
            return found
    for name in ("input_ids", "inputs"):
        found = _int_tensor(kwargs.get(name))
        if found is not None:
            return found
    return None


def model_name(model: Any) -> str | None:
    """``gen_ai.request.model``: the checkpoint's last path component (never a full
    local path), else the architecture (``gpt2``) for a model built from a config."""
    config = getattr(model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "").rstrip("/\\")
    if path:
        return os.path.basename(path)[:64] or None
    kind = getattr(config, "model_type", None)
    return str(kind)[:64] if kind else None


def _strategy(model: Any, kwargs: Mapping[str, Any]) -> str:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str, default: Any) -> Any:
        if name in kwargs:
            return kwargs[name]
        return getattr(config, name, default) if config is not None else default

    num_beams = setting("num_beams", 1) or 1
    if num_beams > 1:
        return "beam"
    return "sample" if setting("do_sample", False) else "greedy"


class _StreamerProxy:
    """Forwards to the application's streamer; notes when the first generated
    token is handed to it (the first ``put`` is the prompt)."""

    def __init__(self, inner: Any, run: GenerateRun) -> None:
        self._inner = inner
        self._run = run
        self._puts = 0

    def put(self, value: Any) -> Any:
        self._puts += 1
        if self._puts == 2:
            self._run.first_token()
        return self._inner.put(value)

    def end(self) -> Any:
        return self._inner.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GenerateRun:
    """One ``generate()`` call: its scope and its step bookkeeping."""

    __slots__ = ("in_prefill", "prompt_length", "scope", "started_decode", "uses_prefill")

    def __init__(self, scope: GenerationScope, prompt_length: int | None) -> None:
        self.scope = scope
        self.prompt_length = prompt_length
        self.in_prefill = False
        self.uses_prefill = False  # GenerationMixin._prefill ran (transformers >= 5)
        self.started_decode = False

    def first_token(self) -> None:
        if self.scope.first_token_ns is None:
            self.scope.first_token()

    def before_forward(self) -> None:
        """A forward of the model is starting (called by the torch wrapper)."""
        if self.in_prefill:
            return
        if self.uses_prefill or self.started_decode:
            # A decode forward: the previous token exists (the first one, the first time).
            self.first_token()
            self.scope.steps += 1
        self.started_decode = True  # without _prefill: the first forward was the prefill

    def finish(self, result: Any, encoder_decoder: bool) -> None:
        """Output tokens from the returned sequences (shape only)."""
        scope = self.scope
        sequences = (
            result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None)
        )
        new = None
        rows = 1
        if isinstance(sequences, torch.Tensor) and sequences.dim() == 2:
            rows = int(sequences.shape[0])
            length = int(sequences.shape[1])
            if encoder_decoder:
                new = length - 1
            elif self.prompt_length is not None:
                new = length - self.prompt_length
        if new is None or new < 1:
            new = scope.steps + (1 if scope.first_token_ns is not None else 0)
        if new >= 1:
            self.first_token()  # a single new token: it exists now, at the latest
        scope.sequences = rows
        scope.output_tokens = new * rows


def make_generate_wrapper(
    recorder: StageRecorder,
    state: Any,
    generating: int,
    quiet: int,
) -> Callable[..., Any]:
    """The ``wrapt`` wrapper of ``GenerationMixin.generate``; ``state`` is the torch
    wrappers' per-thread state, ``generating`` its depth value in generate, ``quiet``
    the offset that silences everything (model moves, loads, a forward's inside)."""

    def generate(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        outer = state.depth
        if outer >= quiet or not is_instrumentation_enabled():
            # a nested generate (assisted decoding, a subclass calling super()): the outer
            # one records it; inside a model move or load: nothing is a stage
            return wrapped(*args, **kwargs)
        try:
            prompt = _prompt(args, kwargs)
            attributes: dict[str, Any] = {
                semconv.INFERENCE_GENERATION_STRATEGY: _strategy(instance, kwargs),
                semconv.INFERENCE_GENERATION_STREAMER: kwargs.get("streamer") is not None,
            }
            scope = GenerationScope(
                recorder,
                prompt_tokens=None if prompt is None else int(prompt.numel()),
                model=model_name(instance),
                provider=PROVIDER,
                attributes=attributes,
            )
            run = GenerateRun(scope, None if prompt is None else int(prompt.shape[-1]))
            if kwargs.get("streamer") is not None:
                kwargs = {**kwargs, "streamer": _StreamerProxy(kwargs["streamer"], run)}
            encoder_decoder = bool(
                getattr(getattr(instance, "config", None), "is_encoder_decoder", False)
            )
        except Exception:
            log_once("torch-generate-open", "otel-inference: failed to describe a generate() call")
            return wrapped(*args, **kwargs)
        scope.__enter__()
        previous = state.generation
        state.generation = run
        state.depth = generating
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            state.depth = outer
            state.generation = previous
            scope.close(exc)
            raise
        state.depth = outer
        state.generation = previous
        try:
            run.finish(result, encoder_decoder)
        except Exception:
            log_once("torch-generate-finish", "otel-inference: failed to count generated tokens")
        scope.close()
        return result

    return generate


def make_prefill_wrapper(state: Any, generating: int) -> Callable[..., Any]:
    """``GenerationMixin._prefill`` (transformers >= 5): its forwards are prefill."""

    def prefill(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        run = state.generation
        if run is None or state.depth != generating:
            return wrapped(*args, **kwargs)
        run.in_prefill = True
        run.uses_prefill = True
        try:
            return wrapped(*args, **kwargs)
        finally:
            run.in_prefill = False

    return prefill


def step_forward(
    run: GenerateRun,
    state: Any,
    generating: int,
    quiet: int,
    original: Callable[..., Any],
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """One forward inside generate: a step, not a stage; nothing inside it is one."""
    try:
        run.before_forward()
    except Exception:
        log_once("torch-generate-step", "otel-inference: failed to count a generation step")
    state.depth = generating + quiet
    try:
        return original(module, *args, **kwargs)
    finally:
        state.depth = generating
