"""Environment variables read by the torch instrumentor.

Registered through the ``opentelemetry_environment_variables`` entry point.
Malformed values raise :class:`~otel_inference.ConfigurationError` from
``instrument()``, naming the variable (under ``opentelemetry-instrument`` the
error is logged and only this instrumentor is skipped).
"""

OTEL_INFERENCE_CUDA_TIMING = "OTEL_INFERENCE_CUDA_TIMING"
"""
.. envvar:: OTEL_INFERENCE_CUDA_TIMING

How stages on a CUDA device are timed: ``events`` (default), ``sync`` or ``off``.

* ``events``: CUDA events recorded on the current stream at the start and the
  end; the elapsed time is resolved off the hot path by a resolver thread and the
  span ends at the device's true end. The calling thread never synchronizes.
* ``sync``: ``torch.cuda.synchronize()`` before and after: exact, but it blocks
  the pipeline and perturbs what it measures.
* ``off``: host time only (kernel launches, not device work); flagged on the
  span as ``inference.timing.source=host_unsynced``.

Work on the CPU is always timed with the wall clock and never calls CUDA.
"""

OTEL_INFERENCE_TORCH_PROFILE_EVERY = "OTEL_INFERENCE_TORCH_PROFILE_EVERY"
"""
.. envvar:: OTEL_INFERENCE_TORCH_PROFILE_EVERY

``N`` > 0: every Nth sampled ``model_forward`` (one whose span is recorded) runs
under ``torch.profiler``; its span gets the kernel (or CPU op) time, the idle
gap between kernels, the memcpy time and the top ops. ``0`` (default): off.
Profiling costs milliseconds on the profiled forward (and synchronizes the
device at its end), so keep N large.
"""

OTEL_INFERENCE_TORCH_FORWARD_DEPTH = "OTEL_INFERENCE_TORCH_FORWARD_DEPTH"
"""
.. envvar:: OTEL_INFERENCE_TORCH_FORWARD_DEPTH

How many levels of nested ``nn.Module`` calls are ``model_forward`` stages
(1 to 8, default 1: only the outermost call). With 2, the outermost module's
direct submodule calls are stages too (nested, ``inference.stage.parent=
model_forward``); each level adds a span and a histogram record per call.
"""

OTEL_INFERENCE_TORCH_TRANSFERS = "OTEL_INFERENCE_TORCH_TRANSFERS"
"""
.. envvar:: OTEL_INFERENCE_TORCH_TRANSFERS

``true`` (default) records host<->device copies made outside a forward pass
(``Tensor.to``, ``.cuda()``, ``.cpu()``, ``copy_``) as ``h2d_transfer`` /
``d2h_transfer`` stages; ``false`` leaves tensor methods untouched.
"""

OTEL_INFERENCE_TORCH_GENERATE = "OTEL_INFERENCE_TORCH_GENERATE"
"""
.. envvar:: OTEL_INFERENCE_TORCH_GENERATE

``true`` (default): transformers ``generate()`` is one ``generate`` stage holding
``prefill`` and ``decode`` (each recorded once per call, the step count on the
``decode`` span), with the GenAI server metrics (time to first token, time per
output token, request duration, token usage); its forwards are not
``model_forward`` stages. ``false``: every forward inside it is a
``model_forward`` stage, as for any other model.
"""
