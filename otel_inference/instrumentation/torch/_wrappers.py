"""The wrappers: ``model_forward`` at the outermost ``nn.Module`` call, transfers outside it.

Why plain functions set on the classes (not ``wrapt``, not global module hooks):
every submodule call of a model goes through ``nn.Module.__call__``, so its
wrapper's cost is paid hundreds of times per forward. A plain function whose
inner-call path is one thread-local read and the original call costs about
0.15 us (see ``benchmarks/bench_torch.py``); a ``wrapt`` wrapper about 0.6 us,
global forward hooks about 1.7 us. ``uninstall()`` puts back the exact objects.

* ``nn.Module.__call__``: a per-thread depth counter. Depth 0 is the outermost
  call: one ``model_forward`` stage (one span when sampled, one histogram record
  always). Deeper calls run the original directly, unless ``forward_depth`` > 1.
  ``torch.compile``: while Dynamo traces, the wrapper passes through
  (``torch.compiler.is_compiling()``), so no graph break is added; the
  OptimizedModule call itself is the stage.
* ``Tensor.to/.cuda/.cpu/.copy_``: a stage only when the call crosses the
  host<->device boundary outside a forward pass. Same-device calls and dtype
  casts leave after a type check.
* ``nn.Module._apply`` / ``load_state_dict``: moving or loading a model is not a
  request's transfer: nothing inside them is a stage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from time import perf_counter_ns
from typing import Any

import torch
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import Counter, Histogram, Meter

from otel_inference import semconv
from otel_inference.instrumentation.torch import _names
from otel_inference.instrumentation.torch._config import TorchSettings
from otel_inference.instrumentation.torch._generate import GenerateRun, step_forward
from otel_inference.instrumentation.torch._profile import ActiveProfile, ForwardProfiler
from otel_inference.stages import StageRecorder, StageScope, current_request, log_once
from otel_inference.timing import SOURCE_FALLBACK, SOURCE_HOST, CudaTimer, Timing

_MISSING = object()
_QUIET = 1 << 16  # added to the depth inside model moves/loads: nothing there is a stage
# The depth while transformers' generate() runs, between its forwards: a forward
# there is a generation step (see _generate), a copy is no transfer stage.
_GENERATING = 1 << 20
_MAX_SHAPES = 8
_MAX_SCAN = 16
_MAX_NAME = 32
_H2D = "h2d"
_D2H = "d2h"
_TRANSFER_STAGE = {_H2D: semconv.H2D_TRANSFER, _D2H: semconv.D2H_TRANSFER}
_DIRECTION_ATTRIBUTES = {
    _H2D: {_names.TRANSFER_DIRECTION: _H2D},
    _D2H: {_names.TRANSFER_DIRECTION: _D2H},
}
# Token figures the tokenize instrumentor leaves in the request bag.
_REQUEST_FIGURES = (
    semconv.INFERENCE_TOKENS_REAL,
    semconv.INFERENCE_TOKENS_PADDED,
    semconv.INFERENCE_PADDING_RATIO,
    semconv.INFERENCE_TOKENIZE_PADDED_LENGTH,
)
# 1 KiB .. 1 GiB in powers of 4: token batches to image batches.
TRANSFER_SIZE_BOUNDARIES = tuple(float(1024 * 4**i) for i in range(11))

_Tensor = torch.Tensor
_dtype = torch.dtype
_device = torch.device
_is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", None
) or (lambda: bool(torch._dynamo.is_compiling()))


class _State(threading.local):
    depth = 0  # enclosing instrumented forward calls in this thread (+ _QUIET, _GENERATING)
    generation: GenerateRun | None = None  # the generate() call running in this thread


_state = _State()


# --- metrics -------------------------------------------------------------------------


def transfer_size_histogram(meter: Meter) -> Histogram:
    return meter.create_histogram(
        semconv.TRANSFER_SIZE,
        unit="By",
        description="Bytes copied between host and device, by inference.transfer.direction",
        explicit_bucket_boundaries_advisory=TRANSFER_SIZE_BOUNDARIES,
    )


def timing_fallbacks_counter(meter: Meter) -> Counter:
    return meter.create_counter(
        _names.TIMING_FALLBACKS,
        unit="{stage}",
        description=(
            "Device-timed stages recorded with host time instead "
            "(inference.timing.fallback_reason: queue_full, cuda_error, shutdown)"
        ),
    )


# --- inputs --------------------------------------------------------------------------


def _tensor_in(value: Any) -> _Tensor | None:
    if isinstance(value, _Tensor):
        return value
    if isinstance(value, Mapping):  # dicts, transformers' BatchEncoding
        for item in value.values():
            if isinstance(item, _Tensor):
                return item
    elif isinstance(value, (list, tuple)):
        for item in value[:_MAX_SCAN]:
            if isinstance(item, _Tensor):
                return item
    return None


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Tensor | None:
    """The first tensor input (one level into dicts, lists and tuples)."""
    for value in args:
        tensor = _tensor_in(value)
        if tensor is not None:
            return tensor
    for value in kwargs.values():
        tensor = _tensor_in(value)
        if tensor is not None:
            return tensor
    return None


def _shape(tensor: _Tensor) -> str:
    return "x".join(str(size) for size in tensor.shape) or "scalar"


def input_shapes(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[str]:
    """Bounded ``name:shape`` strings of the tensor inputs (no values, ever)."""
    shapes: list[str] = []

    def collect(name: str, value: Any) -> None:
        if len(shapes) >= _MAX_SHAPES:
            return
        if isinstance(value, _Tensor):
            shapes.append(f"{name[:_MAX_NAME]}:{_shape(value)}")
        elif isinstance(value, Mapping):
            for key, item in list(value.items())[:_MAX_SCAN]:
                if isinstance(item, _Tensor) and len(shapes) < _MAX_SHAPES:
                    shapes.append(f"{str(key)[:_MAX_NAME]}:{_shape(item)}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value[:_MAX_SCAN]):
                if isinstance(item, _Tensor) and len(shapes) < _MAX_SHAPES:
                    shapes.append(f"{name[:_MAX_NAME]}[{index}]:{_shape(item)}")

    for index, value in enumerate(args):
        collect(f"arg{index}", value)
    for key, value in kwargs.items():
        collect(key, value)
    return shapes


def grad_mode() -> str:
    if torch.is_inference_mode_enabled():
        return "inference_mode"
    return "grad" if torch.is_grad_enabled() else "no_grad"


def model_class(module: torch.nn.Module) -> str:
    """The user's model class: through ``torch.compile`` and TorchScript wrappers."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    inner = module.__dict__.get("_modules", {}).get("_orig_mod")  # OptimizedModule
    if inner is not None and type(module).__name__ == "OptimizedModule":
        return type(inner).__qualname__
    return type(module).__qualname__


def _module_cuda_device(module: torch.nn.Module) -> int | None:
    for tensor in module.parameters():
        return tensor.get_device() if tensor.is_cuda else None
    for tensor in module.buffers():
        return tensor.get_device() if tensor.is_cuda else None
    return None


# --- devices of transfers --------------------------------------------------------------

_DEVICE_TYPES: dict[str, str] = {}


def device_type(value: Any) -> str | None:
    """``"cuda"``, ``"cpu"``, ``"meta"``... of a device argument; ``None`` if it is not one."""
    kind = type(value)
    if kind is str:
        cached = _DEVICE_TYPES.get(value)
        if cached is None:
            cached = value.split(":", 1)[0].strip()
            if len(_DEVICE_TYPES) < 64:
                _DEVICE_TYPES[value] = cached
        return cached
    if kind is _device:
        return value.type
    if isinstance(value, _Tensor):
        return value.device.type
    if kind is int:
        return "cuda"  # a bare index means the accelerator
    return None


def _as_device(value: Any) -> _device | None:
    try:
        if isinstance(value, _Tensor):
            return value.device
        if type(value) is int:
            return _device("cuda", value)
        return _device(value)
    except Exception:
        return None


def _cuda_index(target: _device | None) -> int | None:
    """The CUDA device a host->device copy lands on, for device timing; ``None``
    (host timing) when CUDA is not initialized yet: the copy initializes it."""
    if target is None or target.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return target.index if target.index is not None else torch.cuda.current_device()


def _non_blocking(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    for value in args[1:]:
        if type(value) is bool:  # non_blocking precedes copy in every signature
            return value
    return bool(kwargs.get("non_blocking", False))


# --- the tracker --------------------------------------------------------------------


class _DeviceDone:
    """Records a device-timed stage once its duration is known (maybe on the
    resolver thread)."""

    __slots__ = ("attributes", "exc", "scope", "stage", "tracker")

    def __init__(
        self,
        tracker: TorchTracker,
        stage: str,
        scope: StageScope,
        exc: BaseException | None,
        attributes: dict[str, Any] | None,
    ) -> None:
        self.tracker = tracker
        self.stage = stage
        self.scope = scope
        self.exc = exc
        self.attributes = attributes

    def __call__(self, duration_ns: int, end_wall_ns: int | None, timing: Timing) -> None:
        attributes = self.attributes
        if attributes is not None:
            attributes[_names.TIMING_SOURCE] = timing.source
            attributes[_names.HOST_DURATION] = timing.host_ns / 1e9
            if timing.reason is not None:
                attributes[_names.TIMING_FALLBACK_REASON] = timing.reason
            self.scope.record(duration_ns, self.exc, end_time_ns=end_wall_ns, **attributes)
        else:
            self.scope.record(duration_ns, self.exc, end_time_ns=end_wall_ns)
        if timing.source == SOURCE_FALLBACK:
            self.tracker.count_fallback(self.stage, timing.reason)


class TorchTracker:
    """What one ``instrument()`` installed, and the recording logic."""

    def __init__(
        self, recorder: StageRecorder, settings: TorchSettings, timer: CudaTimer | None = None
    ) -> None:
        self.recorder = recorder
        self.settings = settings
        self.timer = timer or CudaTimer(settings.cuda_timing, max_pending=settings.max_pending)
        self.profiler = ForwardProfiler(settings.profile_every) if settings.profile_every else None
        self._replaced: list[tuple[Any, str, Any]] = []

    # installing --------------------------------------------------------------------

    def _replace(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        own = vars(owner).get(name, _MISSING)
        setattr(owner, name, make(original))
        self._replaced.append((owner, name, own))

    def install(self) -> None:
        module = torch.nn.Module
        self._replace(module, "__call__", self._make_call)
        self._replace(module, "_apply", _make_quiet)
        self._replace(module, "load_state_dict", _make_quiet)
        if self.settings.transfers:
            self._replace(_Tensor, "to", self._make_to)
            self._replace(_Tensor, "cuda", self._make_cuda)
            self._replace(_Tensor, "cpu", self._make_cpu)
            self._replace(_Tensor, "copy_", self._make_copy)

    def uninstall(self) -> None:
        replaced, self._replaced = self._replaced, []
        for owner, name, own in reversed(replaced):
            try:
                if own is _MISSING:
                    delattr(owner, name)  # it was inherited (e.g. from TensorBase)
                else:
                    setattr(owner, name, own)
            except Exception:
                log_once(
                    "torch-unwrap",
                    "otel-inference: could not restore %r.%s",
                    owner,
                    name,
                    level=logging.ERROR,
                )
        self.timer.close()

    # wrapper factories ------------------------------------------------------------------

    def _make_call(self, original: Callable[..., Any]) -> Callable[..., Any]:
        state = _state
        max_depth = self.settings.forward_depth
        forward = self.forward

        def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            depth = state.depth
            if depth >= max_depth:  # an inner call: nothing to record
                # A step of generate(); never while Dynamo traces (no side effects in a graph).
                if depth == _GENERATING and state.generation is not None and not _is_compiling():
                    return step_forward(
                        state.generation, state, _GENERATING, _QUIET, original, self, args, kwargs
                    )
                return original(self, *args, **kwargs)
            # Dynamo cannot trace a ContextVar read: ask whether it is tracing first.
            if _is_compiling() or not is_instrumentation_enabled():
                return original(self, *args, **kwargs)
            state.depth = depth + 1
            try:
                return forward(original, self, args, kwargs, depth)
            finally:
                state.depth = depth

        return __call__

    def _make_to(self, original: Callable[..., Any]) -> Callable[..., Any]:
        state = _state
        transfer = self.transfer

        def to(self: _Tensor, *args: Any, **kwargs: Any) -> Any:
            if state.depth:
                return original(self, *args, **kwargs)
            if args:
                target = args[0]
                if type(target) is _dtype:  # the common cast: fastest exit
                    return original(self, *args, **kwargs)
            else:
                target = kwargs.get("device")
                if target is None:
                    return original(self, *args, **kwargs)
            kind = device_type(target)
            if (
                kind is None
                or (kind == "cpu") == self.is_cpu
                or _is_compiling()
                or not is_instrumentation_enabled()
            ):
                return original(self, *args, **kwargs)
            direction = _D2H if kind == "cpu" else _H2D
            return transfer(original, "to", self, args, kwargs, direction, self, target)

        return to

    def _make_cuda(self, original: Callable[..., Any]) -> Callable[..., Any]:
        state = _state
        transfer = self.transfer

        def cuda(self: _Tensor, *args: Any, **kwargs: Any) -> Any:
            if (
                state.depth
                or not self.is_cpu
                or _is_compiling()
                or not is_instrumentation_enabled()
            ):
                return original(self, *args, **kwargs)
            target = args[0] if args else kwargs.get("device")
            return transfer(
                original,
                "cuda",
                self,
                args,
                kwargs,
                _H2D,
                self,
                "cuda" if target is None else target,
            )

        return cuda

    def _make_cpu(self, original: Callable[..., Any]) -> Callable[..., Any]:
        state = _state
        transfer = self.transfer

        def cpu(self: _Tensor, *args: Any, **kwargs: Any) -> Any:
            if state.depth or self.is_cpu or _is_compiling() or not is_instrumentation_enabled():
                return original(self, *args, **kwargs)
            return transfer(original, "cpu", self, args, kwargs, _D2H, self, "cpu")

        return cpu

    def _make_copy(self, original: Callable[..., Any]) -> Callable[..., Any]:
        state = _state
        transfer = self.transfer

        def copy_(self: _Tensor, *args: Any, **kwargs: Any) -> Any:
            if state.depth:
                return original(self, *args, **kwargs)
            src = args[0] if args else kwargs.get("src")
            if (
                not isinstance(src, _Tensor)
                or self.is_cpu == src.is_cpu
                or _is_compiling()
                or not is_instrumentation_enabled()
            ):
                return original(self, *args, **kwargs)
            direction = _H2D if src.is_cpu else _D2H
            return transfer(original, "copy_", self, args, kwargs, direction, src, self)

        return copy_

    # model_forward -------------------------------------------------------------------

    def forward(
        self,
        call: Callable[..., Any],
        module: torch.nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        depth: int,
    ) -> Any:
        tensor = first_tensor(args, kwargs)
        device: int | None = None
        if tensor is not None:
            if tensor.is_cuda:
                device = tensor.get_device()
        elif torch.cuda.is_initialized():  # no tensor input: where do the weights live?
            device = _module_cuda_device(module)
        timing = None if device is None else self.timer.begin(device)
        scope = self.recorder.start(semconv.MODEL_FORWARD)
        attributes = None
        profile = None
        if scope.is_recording:
            attributes = self._forward_attributes(module, tensor, args, kwargs, depth)
            if self.profiler is not None and depth == 0:
                profile = self.profiler.maybe_start(device is not None)
        start_ns = perf_counter_ns()
        try:
            result = call(module, *args, **kwargs)
        except BaseException as exc:
            self._finish(semconv.MODEL_FORWARD, scope, timing, start_ns, exc, attributes, profile)
            raise
        self._finish(semconv.MODEL_FORWARD, scope, timing, start_ns, None, attributes, profile)
        return result

    def _forward_attributes(
        self,
        module: torch.nn.Module,
        tensor: _Tensor | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        depth: int,
    ) -> dict[str, Any] | None:
        try:
            attributes: dict[str, Any] = {
                _names.MODEL_CLASS: model_class(module),
                _names.GRAD_MODE: grad_mode(),
                _names.TIMING_SOURCE: SOURCE_HOST,
            }
            if depth:
                attributes[_names.FORWARD_DEPTH] = depth + 1
            if tensor is not None:
                if tensor.dim():
                    attributes[semconv.INFERENCE_BATCH_SIZE] = int(tensor.shape[0])
                attributes[_names.INPUT_DTYPE] = str(tensor.dtype).removeprefix("torch.")
                attributes[_names.DEVICE] = str(tensor.device)
                attributes[_names.INPUT_SHAPES] = input_shapes(args, kwargs)
            account = current_request()
            if account is not None and account.attributes:
                bag = account.attributes
                for key in _REQUEST_FIGURES:
                    value = bag.get(key)
                    if value is not None:
                        attributes[key] = value
            return attributes
        except Exception:
            log_once("torch-forward-attributes", "otel-inference: failed to describe a forward")
            return None

    def _finish(
        self,
        stage: str,
        scope: StageScope,
        timing: Timing | None,
        start_ns: int,
        exc: BaseException | None,
        attributes: dict[str, Any] | None,
        profile: ActiveProfile | None,
    ) -> None:
        if timing is None:  # host work: wall time is the truth
            duration_ns = perf_counter_ns() - start_ns
            scope.exit_context()
            if profile is not None and attributes is not None:
                attributes.update(profile.stop())
            if attributes is None:
                scope.record(duration_ns, exc)
            else:
                scope.record(duration_ns, exc, **attributes)
            return
        timer = self.timer
        timer.stop(timing)
        scope.exit_context()
        if profile is not None and attributes is not None:
            attributes.update(profile.stop())  # after the end event: not in the duration
        timer.report(timing, _DeviceDone(self, stage, scope, exc, attributes))

    def count_fallback(self, stage: str, reason: str | None) -> None:
        try:
            self.recorder.instruments(timing_fallbacks_counter).add(
                1,
                {
                    semconv.INFERENCE_STAGE: stage,
                    _names.TIMING_FALLBACK_REASON: reason or "unknown",
                },
            )
        except Exception:
            log_once("torch-fallback-count", "otel-inference: failed to count a timing fallback")

    # transfers -----------------------------------------------------------------------

    def transfer(
        self,
        call: Callable[..., Any],
        operation: str,
        tensor: _Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        direction: str,
        source: _Tensor,
        target: Any,
    ) -> Any:
        stage = _TRANSFER_STAGE[direction]
        timing = None
        try:
            if direction == _D2H:
                device = source.get_device() if source.is_cuda else None
                target_device = None
            else:
                target_device = _as_device(target)
                device = _cuda_index(target_device)
            nbytes = source.nbytes
        except Exception:
            log_once("torch-transfer-device", "otel-inference: failed to describe a transfer")
            return call(tensor, *args, **kwargs)
        if device is not None:
            timing = self.timer.begin(device)
        scope = self.recorder.start(stage)
        attributes = None
        if scope.is_recording:
            try:
                host = source if direction == _H2D else tensor if operation == "copy_" else None
                attributes = {
                    _names.TRANSFER_DIRECTION: direction,
                    _names.TRANSFER_OPERATION: operation,
                    _names.TRANSFER_BYTES: nbytes,
                    _names.TRANSFER_NON_BLOCKING: _non_blocking(args, kwargs),
                    _names.TRANSFER_PINNED: bool(host is not None and host.is_pinned()),
                    _names.TRANSFER_SOURCE_DEVICE: str(source.device),
                    _names.TRANSFER_TARGET_DEVICE: str(
                        target.device if isinstance(target, _Tensor) else target_device or target
                    ),
                    _names.TIMING_SOURCE: SOURCE_HOST,
                }
            except Exception:
                log_once("torch-transfer-attributes", "otel-inference: failed to describe a copy")
        state = _state
        state.depth += _QUIET  # a tensor subclass calling super().to() is one copy
        start_ns = perf_counter_ns()
        try:
            result = call(tensor, *args, **kwargs)
        except BaseException as exc:
            state.depth -= _QUIET
            self._finish(stage, scope, timing, start_ns, exc, attributes, None)
            raise
        state.depth -= _QUIET
        self._finish(stage, scope, timing, start_ns, None, attributes, None)
        try:
            self.recorder.instruments(transfer_size_histogram).record(
                nbytes, _DIRECTION_ATTRIBUTES[direction]
            )
        except Exception:
            log_once("torch-transfer-size", "otel-inference: failed to record a transfer size")
        return result


def _make_quiet(original: Callable[..., Any]) -> Callable[..., Any]:
    state = _state

    def quiet(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state.depth += _QUIET
        try:
            return original(self, *args, **kwargs)
        finally:
            state.depth -= _QUIET

    quiet.__name__ = getattr(original, "__name__", "quiet")
    quiet.__doc__ = getattr(original, "__doc__", None)
    return quiet
