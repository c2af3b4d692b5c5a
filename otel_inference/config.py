"""Configuration errors and the settings read from ``OTEL_INFERENCE_*`` variables.

Bad input is rejected here, at configuration time, with a message that names the
variable and the bad entry, never deep inside a user's request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from otel_inference.environment_variables import (
    OTEL_INFERENCE_EXCEPTION_MESSAGES,
    OTEL_INFERENCE_MAX_SPANS_PER_REQUEST,
    OTEL_INFERENCE_METRICS_FAST_PATH,
    OTEL_INFERENCE_PROMETHEUS_PORTS,
    OTEL_INFERENCE_ROOT_STAGES,
    OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD,
    OTEL_INFERENCE_SPEEDUPS,
    OTEL_INFERENCE_STAGE_CALL_DURATION,
)


class ConfigurationError(ValueError):
    """Raised for malformed otel-inference configuration; the message names the problem."""


ROOT_STAGE_POLICIES = ("span", "metrics")


def root_stage_policy(environ: Mapping[str, str] | None = None) -> str:
    """Return the validated :envvar:`OTEL_INFERENCE_ROOT_STAGES` policy (default ``span``)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_INFERENCE_ROOT_STAGES, "").strip().lower()
    if not raw:
        return "span"
    if raw not in ROOT_STAGE_POLICIES:
        raise ConfigurationError(
            f"{OTEL_INFERENCE_ROOT_STAGES}={raw!r} is not a root stage policy; "
            f"expected one of: {', '.join(ROOT_STAGE_POLICIES)}"
        )
    return raw


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(name: str, environ: Mapping[str, str] | None = None, default: bool = False) -> bool:
    """A boolean variable (true/false, 1/0, yes/no, on/off); anything else is an error."""
    environ = os.environ if environ is None else environ
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use true or false")


def exception_messages_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """:envvar:`OTEL_INFERENCE_EXCEPTION_MESSAGES` (default false)."""
    return parse_bool(OTEL_INFERENCE_EXCEPTION_MESSAGES, environ)


def stage_call_durations_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """:envvar:`OTEL_INFERENCE_STAGE_CALL_DURATION` (default false)."""
    return parse_bool(OTEL_INFERENCE_STAGE_CALL_DURATION, environ)


def parse_count(
    name: str,
    what: str,
    default: int,
    environ: Mapping[str, str] | None = None,
    limit: int = 1_000_000,
) -> int:
    """A whole-number variable from 0 to ``limit`` (``what`` it counts, for the error)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > limit:
        raise ConfigurationError(
            f"{name}={raw!r} must be a whole number of {what} from 0 to {limit}"
        )
    return int(raw)


def metrics_fast_path_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """:envvar:`OTEL_INFERENCE_METRICS_FAST_PATH` (default true)."""
    return parse_bool(OTEL_INFERENCE_METRICS_FAST_PATH, environ, default=True)


def speedups_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """:envvar:`OTEL_INFERENCE_SPEEDUPS` (default true)."""
    return parse_bool(OTEL_INFERENCE_SPEEDUPS, environ, default=True)


DEFAULT_MAX_SPANS_PER_REQUEST = 500


def max_spans_per_request(environ: Mapping[str, str] | None = None) -> int:
    """:envvar:`OTEL_INFERENCE_MAX_SPANS_PER_REQUEST` (default 500)."""
    return parse_count(
        OTEL_INFERENCE_MAX_SPANS_PER_REQUEST, "spans", DEFAULT_MAX_SPANS_PER_REQUEST, environ
    )


DEFAULT_SPAN_COMPRESSION_THRESHOLD_S = 0.05
_ZERO_DURATION = re.compile(r"^0+(\.0*)?\s*(us|µs|ms|s)?$", re.IGNORECASE)


def span_compression_threshold(environ: Mapping[str, str] | None = None) -> float:
    """:envvar:`OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD` in seconds (default 50 ms; 0: off)."""
    from otel_inference.budgets import parse_duration

    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD, "").strip()
    if not raw:
        return DEFAULT_SPAN_COMPRESSION_THRESHOLD_S
    if _ZERO_DURATION.match(raw):
        return 0.0  # compression off
    return parse_duration(raw, entry=raw, source=OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD)


MAX_PROMETHEUS_PORTS = 1024


def prometheus_ports(environ: Mapping[str, str] | None = None) -> int:
    """:envvar:`OTEL_INFERENCE_PROMETHEUS_PORTS` (default 1: the base port only)."""
    what = "ports (one per process of the server)"
    count = parse_count(OTEL_INFERENCE_PROMETHEUS_PORTS, what, 1, environ, MAX_PROMETHEUS_PORTS)
    if count == 0:
        raise ConfigurationError(f"{OTEL_INFERENCE_PROMETHEUS_PORTS}='0' must be at least 1")
    return count
