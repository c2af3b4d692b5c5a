"""Configuration errors and the settings read from ``OTEL_INFERENCE_*`` variables.

Bad input is rejected here, at configuration time, with a message that names the
variable and the bad entry, never deep inside a user's request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from otel_inference.environment_variables import (
    OTEL_INFERENCE_EXCEPTION_MESSAGES,
    OTEL_INFERENCE_PROMETHEUS_PORTS,
    OTEL_INFERENCE_ROOT_STAGES,
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


MAX_PROMETHEUS_PORTS = 1024


def prometheus_ports(environ: Mapping[str, str] | None = None) -> int:
    """:envvar:`OTEL_INFERENCE_PROMETHEUS_PORTS` (default 1: the base port only)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_INFERENCE_PROMETHEUS_PORTS, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PROMETHEUS_PORTS:
        raise ConfigurationError(
            f"{OTEL_INFERENCE_PROMETHEUS_PORTS}={raw!r} must be a whole number of ports "
            f"from 1 to {MAX_PROMETHEUS_PORTS} (one per process of the server)"
        )
    return int(raw)
