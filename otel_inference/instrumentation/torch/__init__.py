"""
Record PyTorch forward passes as ``model_forward`` stages, timed on the device,
and host<->device copies as ``h2d_transfer`` / ``d2h_transfer`` stages.

Forward passes: the OUTERMOST ``nn.Module`` call (plain, ``torch.compile``'d and
TorchScript modules, under ``inference_mode``/``no_grad`` or not) is one
``model_forward`` stage: its duration goes into ``inference.stage.duration`` for
every call; a sampled request also gets a span with the model class, batch size
(first dimension of the first tensor input), bounded input shapes, dtype,
device, grad mode, the timing source and, when the tokenize instrumentor left
them in the request, the token counts and padding ratio. Submodule calls are not
stages (``forward_depth`` > 1 makes the first levels stages too) and cost about
0.15 us each.

Timing (:envvar:`OTEL_INFERENCE_CUDA_TIMING`): on a CUDA device, ``events``
(default) records CUDA events on the current stream and resolves them on a
resolver thread: the histogram gets the device duration and the span ends at the
device's end, the host launch time is kept as ``inference.host.duration``, and
the calling thread never synchronizes. ``sync`` synchronizes around the work
(exact, perturbing); ``off`` times the launches only. CPU work is wall time and
makes no CUDA call at all. See :mod:`otel_inference.timing`.

Transfers: ``Tensor.to``, ``.cuda()``, ``.cpu()`` and ``copy_`` calls that cross
the host<->device boundary outside a forward pass, with bytes, pinned,
non_blocking and devices on the span, the ``inference.transfer.size``
histogram (``inference.transfer.direction`` = ``h2d`` | ``d2h``) for every one.
Dtype casts and same-device calls take a fast path. Moving or loading a model
(``module.to``, ``load_state_dict``) records nothing.

transformers ``generate()`` (:envvar:`OTEL_INFERENCE_TORCH_GENERATE`, on by
default): one ``generate`` stage holding ``prefill`` (to the first token) and
``decode`` (the rest), each recorded once per call with the step count on the
``decode`` span, plus the GenAI server metrics (time to first token, time per
output token, request duration, token usage); the forwards and copies inside it
are not stages of their own. See :mod:`otel_inference.genai` and
``docs/generation.md``.

Sampled kernel profile (:envvar:`OTEL_INFERENCE_TORCH_PROFILE_EVERY`, off by
default): every Nth sampled forward runs under ``torch.profiler`` and its span
gets kernel (or CPU op) time, idle gaps, memcpy time and the top ops.

No tensor values are ever recorded: shapes, dtypes, devices and sizes only.

Usage
-----

.. code:: python

    import torch
    from otel_inference import request
    from otel_inference.instrumentation.torch import TorchInstrumentor

    TorchInstrumentor().instrument()          # or run under opentelemetry-instrument

    model = MyModel().cuda().eval()            # moving the model: not a stage
    with request(), torch.inference_mode():
        batch = inputs.cuda(non_blocking=True)  # h2d_transfer
        out = model(batch)                      # model_forward (device-timed)
        result = out.cpu()                      # d2h_transfer

Options (``instrument()`` arguments win over the environment): ``cuda_timing``
(:envvar:`OTEL_INFERENCE_CUDA_TIMING`), ``profile_every``
(:envvar:`OTEL_INFERENCE_TORCH_PROFILE_EVERY`), ``forward_depth``
(:envvar:`OTEL_INFERENCE_TORCH_FORWARD_DEPTH`), ``transfers``
(:envvar:`OTEL_INFERENCE_TORCH_TRANSFERS`), ``generate``
(:envvar:`OTEL_INFERENCE_TORCH_GENERATE`), ``max_pending`` (bound of the
events queue, default 1024), ``tracer_provider``, ``meter_provider``. A
malformed value raises :class:`~otel_inference.ConfigurationError` naming the
variable. Instrumenting does not import torch: the wrappers are installed when
the application imports it.

API
---
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation._patch import Patches
from otel_inference.instrumentation.torch._config import TorchSettings, load_settings
from otel_inference.instrumentation.torch.package import _instruments
from otel_inference.stages import StageRecorder

__all__ = ["TorchInstrumentor", "TorchSettings"]


class TorchInstrumentor(InferenceInstrumentor):
    """PyTorch forward passes (device-timed), host<->device transfers, sampled profiles."""

    _patches: Patches | None = None
    _tracker: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        # Settings first: a configuration error must leave torch untouched.
        settings = load_settings(
            cuda_timing=kwargs.get("cuda_timing"),
            profile_every=kwargs.get("profile_every"),
            forward_depth=kwargs.get("forward_depth"),
            transfers=kwargs.get("transfers"),
            max_pending=kwargs.get("max_pending"),
            generate=kwargs.get("generate"),
        )
        timer = kwargs.get("timer")  # tests: a CudaTimer on a fake backend
        patches = self._patches = Patches("torch")

        def apply(_module: Any) -> None:
            from otel_inference.instrumentation.torch._wrappers import TorchTracker

            tracker = TorchTracker(recorder, settings, timer)
            tracker.install()
            self._tracker = tracker

        patches.when_imported("torch", apply)
        if settings.generate:
            patches.when_imported(
                "transformers.generation.utils",
                lambda module: _wrap_generate(patches, module, recorder),
            )

    @property
    def tracker(self) -> Any:
        """The installed wrappers' tracker (``None`` until torch is imported)."""
        return self._tracker

    def _uninstrument(self, **kwargs: Any) -> None:
        patches, self._patches = self._patches, None
        if patches is not None:
            patches.unwrap_all()  # deactivates the import hook
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.uninstall()


def _wrap_generate(patches: Patches, module: Any, recorder: StageRecorder) -> None:
    from otel_inference.instrumentation.torch._generate import (
        make_generate_wrapper,
        make_prefill_wrapper,
    )
    from otel_inference.instrumentation.torch._wrappers import _GENERATING, _QUIET, _state

    mixin = module.GenerationMixin
    patches.wrap(mixin, "generate", make_generate_wrapper(recorder, _state, _GENERATING, _QUIET))
    patches.wrap(mixin, "_prefill", make_prefill_wrapper(_state, _GENERATING))
