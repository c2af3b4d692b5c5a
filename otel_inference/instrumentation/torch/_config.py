"""Settings of the torch instrumentor: ``instrument()`` arguments, else environment.

Parsing needs no torch import, so a bad setting fails before torch is touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from otel_inference.config import ConfigurationError
from otel_inference.instrumentation.torch.environment_variables import (
    OTEL_INFERENCE_CUDA_TIMING,
    OTEL_INFERENCE_TORCH_FORWARD_DEPTH,
    OTEL_INFERENCE_TORCH_GENERATE,
    OTEL_INFERENCE_TORCH_PROFILE_EVERY,
    OTEL_INFERENCE_TORCH_TRANSFERS,
)
from otel_inference.timing import DEFAULT_MAX_PENDING, EVENTS, parse_cuda_timing

MAX_FORWARD_DEPTH = 8
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class TorchSettings:
    cuda_timing: str = EVENTS
    profile_every: int = 0
    forward_depth: int = 1
    transfers: bool = True
    max_pending: int = DEFAULT_MAX_PENDING
    generate: bool = True


def _parse_int(value: object, source: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = low - 1
    if isinstance(value, bool) or not low <= number <= high:
        raise ConfigurationError(f"{source}={value!r} must be a whole number from {low} to {high}")
    return number


def _parse_bool(value: object, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{source}={value!r} is not a boolean; use true or false")


def load_settings(
    cuda_timing: str | None = None,
    profile_every: int | None = None,
    forward_depth: int | None = None,
    transfers: bool | None = None,
    max_pending: int | None = None,
    generate: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> TorchSettings:
    """Arguments win over the environment. Raises :class:`ConfigurationError`."""
    environ = os.environ if environ is None else environ
    if cuda_timing is None:
        mode = parse_cuda_timing(
            environ.get(OTEL_INFERENCE_CUDA_TIMING), OTEL_INFERENCE_CUDA_TIMING
        )
    else:
        mode = parse_cuda_timing(cuda_timing, "cuda_timing")

    def setting(argument: object, name: str, env: str, parse, default):  # type: ignore[no-untyped-def]
        if argument is not None:
            return parse(argument, name)
        raw = environ.get(env, "").strip()
        return parse(raw, env) if raw else default

    every = setting(
        profile_every,
        "profile_every",
        OTEL_INFERENCE_TORCH_PROFILE_EVERY,
        lambda v, s: _parse_int(v, s, 0, 1_000_000_000),
        0,
    )
    depth = setting(
        forward_depth,
        "forward_depth",
        OTEL_INFERENCE_TORCH_FORWARD_DEPTH,
        lambda v, s: _parse_int(v, s, 1, MAX_FORWARD_DEPTH),
        1,
    )
    record_transfers = setting(
        transfers, "transfers", OTEL_INFERENCE_TORCH_TRANSFERS, _parse_bool, True
    )
    pending = (
        DEFAULT_MAX_PENDING
        if max_pending is None
        else _parse_int(max_pending, "max_pending", 1, 1_000_000)
    )
    record_generate = setting(
        generate, "generate", OTEL_INFERENCE_TORCH_GENERATE, _parse_bool, True
    )
    return TorchSettings(mode, every, depth, record_transfers, pending, record_generate)
