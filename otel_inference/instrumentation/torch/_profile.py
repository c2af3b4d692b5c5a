"""The sampled kernel profile: every Nth sampled forward runs under ``torch.profiler``.

Opt-in (:envvar:`OTEL_INFERENCE_TORCH_PROFILE_EVERY`). The profiled forward's
span gets a summary, never the trace itself: device kernel time, memcpy time,
the idle gap between kernels (CPU-only: CPU op time and the gaps between
top-level ops) and the top few ops by self time. Profiling costs milliseconds
and, on CUDA, synchronizes at its end: it is a deliberate, rare perturbation of
the profiled forward only (its span says so with ``inference.profile.*``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from otel_inference.instrumentation.torch import _names
from otel_inference.stages import log_once

TOP_OPS = 5
_MEMCPY_MARKERS = ("memcpy", "memset")


class ForwardProfiler:
    """Decides which forwards to profile (every ``every``-th call of :meth:`maybe_start`)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._count = itertools.count()

    def maybe_start(self, cuda: bool) -> ActiveProfile | None:
        if next(self._count) % self.every:
            return None
        try:
            if torch.autograd._profiler_enabled():
                return None  # the application is profiling: never nest or steal it
            activities = [ProfilerActivity.CPU]
            if cuda:
                activities.append(ProfilerActivity.CUDA)
            prof = profile(activities=activities, record_shapes=False, with_stack=False)
            prof.__enter__()
            return ActiveProfile(prof, cuda)
        except Exception:
            log_once("torch-profile-start", "otel-inference: could not start torch.profiler")
            return None


class ActiveProfile:
    __slots__ = ("_cuda", "_prof")

    def __init__(self, prof: Any, cuda: bool) -> None:
        self._prof = prof
        self._cuda = cuda

    def stop(self) -> dict[str, Any]:
        """Stop profiling and summarise; ``{}`` if anything fails."""
        try:
            self._prof.__exit__(None, None, None)
            return summarise(self._prof.events(), self._cuda)
        except Exception:
            log_once("torch-profile-stop", "otel-inference: could not summarise a torch profile")
            return {}


def _idle_us(intervals: list[tuple[float, float]]) -> float:
    """Time inside [first start, last end] that no interval covers."""
    if not intervals:
        return 0.0
    intervals.sort()
    idle = 0.0
    _, reach = intervals[0]
    for start, end in intervals[1:]:
        if start > reach:
            idle += start - reach
        reach = max(reach, end)
    return idle


def _top(totals: dict[str, float]) -> list[str]:
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:TOP_OPS]
    return [f"{name}={micros:.0f}us" for name, micros in ranked]


def summarise(events: Any, cuda: bool) -> dict[str, Any]:
    """Span attributes from a profiler's ``events()`` (times in seconds)."""
    cpu_self: dict[str, float] = {}
    top_level: list[tuple[float, float]] = []
    kernels: list[tuple[float, float]] = []
    kernel_self: dict[str, float] = {}
    kernel_us = memcpy_us = 0.0
    count = 0
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        if event.device_type == DeviceType.CPU:
            count += 1
            cpu_self[event.name] = cpu_self.get(event.name, 0.0) + event.self_cpu_time_total
            if event.cpu_parent is None:
                top_level.append((start, end))
        elif event.device_type == DeviceType.CUDA:
            duration = end - start
            kernels.append((start, end))
            if any(marker in event.name.lower() for marker in _MEMCPY_MARKERS):
                memcpy_us += duration
            else:
                kernel_us += duration
            kernel_self[event.name] = kernel_self.get(event.name, 0.0) + duration
    attributes: dict[str, Any] = {
        _names.PROFILE_ACTIVITIES: "cpu,cuda" if cuda else "cpu",
        _names.PROFILE_OP_COUNT: count,
        _names.PROFILE_OP_TIME: sum(cpu_self.values()) / 1e6,
    }
    if cuda:
        attributes[_names.PROFILE_KERNEL_TIME] = kernel_us / 1e6
        attributes[_names.PROFILE_MEMCPY_TIME] = memcpy_us / 1e6
        attributes[_names.PROFILE_IDLE_TIME] = _idle_us(kernels) / 1e6
        # Kernel names are long C++ signatures: keep the top ones bounded.
        attributes[_names.PROFILE_TOP_OPS] = [op[:120] for op in _top(kernel_self)] or _top(
            cpu_self
        )
    else:
        attributes[_names.PROFILE_IDLE_TIME] = _idle_us(top_level) / 1e6
        attributes[_names.PROFILE_TOP_OPS] = _top(cpu_self)
    return attributes
